"""One-shot architecture searches that the kill harness kills and resumes (not a test module).

Each set-up builds ``(trainer, data, fit_kwargs)`` as a search script would, with checkpoints
every 3 updates and every epoch, and every loss call goes through ``pauser.loss_call()``:

- ``darts``: second-order DARTS (``darts_flow(..., unrolled=True)``) with Gumbel-softmax mixing
  annealed over the 2 epochs, SGD with momentum for the weights (the virtual step reads its
  momentum buffers), Adam for the alphas; both loaders shuffle from the global RNG, the
  validation loader cycles (6 training batches, 4 validation batches per pass).
- ``spos``: single-path one-shot training, the path of each update drawn by the sampler's own
  generator (checkpointed as the ``path_sampler`` callback state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer
from trainflow.callbacks import Checkpoint
from trainflow.nas import InputChoice, LayerChoice, SinglePathTrainer, darts_flow

EPOCHS = {"darts": 2, "spos": 2}


def _loader(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x[:, :1].abs() - x[:, 1:2]).detach()
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)


class Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.act = LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh(), "lin": nn.Linear(6, 6)}, label="act")
        self.skip = InputChoice(2, 1, label="skip")
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.head(self.skip([h, self.act(h)]))


def _callbacks(printer: Any) -> list[Any]:
    return [printer, Checkpoint(every_updates=3, every_epochs=1, keep_last=2)]


def darts(out: Path, pauser: Any, printer: Any) -> tuple[Trainer, Any, dict]:
    model = Cell()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def mse(batch):
        pauser.loss_call()
        x, y = batch
        return F.mse_loss(model(x), y)

    flow = darts_flow(Step(mse, opt, name="weights"), model, arch_lr=0.05, unrolled=True, gumbel=(2.0, 0.5),
                      epochs=EPOCHS["darts"])
    trainer = Trainer(model, flow, callbacks=_callbacks(printer), device="cpu", out_dir=out)
    return trainer, {"train": _loader(24, 1), "valid": _loader(16, 2)}, {}


def spos(out: Path, pauser: Any, printer: Any) -> tuple[Trainer, Any, dict]:
    model = Cell()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def mse(batch):
        pauser.loss_call()
        x, y = batch
        return F.mse_loss(model(x), y)

    search = SinglePathTrainer(model, mse, opt, seed=5, callbacks=_callbacks(printer), device="cpu", out_dir=out)
    return search.trainer, _loader(24, 1), {}


SETUPS = {name: globals()[name] for name in EPOCHS}
