"""Mixed precision on CPU: bfloat16 autocast runs and trains; float16 needs CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import mlp, regression_loader

from trainflow import Step, Trainer


def test_bf16_mixed_autocasts_forward_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtypes = set()

    def loss(batch):
        out = model(batch[0])
        dtypes.add(out.dtype)
        return F.mse_loss(out.float(), batch[1])

    before = model[0].weight.detach().clone()
    trainer = Trainer(model, [Step(loss, opt)], device="cpu", precision="bf16-mixed")
    trainer.fit(regression_loader(), epochs=2, val_data=regression_loader(), val_step=loss)
    assert dtypes == {torch.bfloat16}
    assert model[0].weight.dtype == torch.float32 and not torch.equal(before, model[0].weight)
