"""The CUDA paths: placement, mixed precision with loss scaling, compile, the NaN check.

These run only where a CUDA device exists; on CPU-only machines they are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, regression_loader

from trainflow import Step, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _build(seed=0):
    torch.manual_seed(seed)
    model = mlp(hidden=32).cuda()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _hand(precision: str, epochs: int = 3):
    model, opt = _build()
    scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
    dtype = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    torch.manual_seed(1)
    for _ in range(epochs):
        for x, y in regression_loader():
            x, y = x.cuda(), y.cuda()
            opt.zero_grad()
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                loss = F.mse_loss(model(x).float(), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    return model


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_cuda_run_matches_hand_loop(precision):
    hand = _hand(precision)
    model, opt = _build()
    torch.manual_seed(1)
    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]).float(), b[1]), opt)],
                      device="cuda", precision=precision)
    trainer.fit(regression_loader(), epochs=3)  # CPU batches: the trainer moves them
    for a, b in zip(hand.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert b.dtype == torch.float32 and b.device.type == "cuda"
    if precision == "16-mixed":
        assert trainer.state_dict()["precision"]["scaler"]["scale"] > 0


def test_models_and_metrics_moved_to_cuda():
    import torchmetrics

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mae = torchmetrics.MeanAbsoluteError()

    def val_step(batch):
        pred = model(batch[0])
        assert pred.device.type == "cuda"
        mae.update(pred, batch[1])

    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt)], metrics={"val/mae": mae},
                      device="auto")
    assert trainer.device.type == "cuda" and next(model.parameters()).device.type == "cuda"
    trainer.fit(regression_loader(), epochs=1, val_data=regression_loader(), val_step=val_step)
    assert mae.device.type == "cuda"


def test_compile_on_cuda_matches_eager():
    eager, opt = _build()
    Trainer(eager, [Step(lambda b: F.mse_loss(eager(b[0]), b[1]), opt)], device="cuda").fit(regression_loader(shuffle=False), epochs=2)
    model, opt = _build()
    Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt)], device="cuda", compile=True).fit(
        regression_loader(shuffle=False), epochs=2
    )
    for a, b in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_nonfinite_is_caught_on_cuda_without_a_sync_per_update():
    model, opt = _build()
    calls = []

    def loss(batch):
        calls.append(1)
        value = F.mse_loss(model(batch[0]), batch[1])
        return value * float("nan") if len(calls) == 5 else value

    trainer = Trainer(model, [Step(loss, opt, name="fit")], device="cuda")
    with pytest.raises(FloatingPointError, match=r"Step 'fit': loss 'loss' is nan"):
        trainer.fit(regression_loader(n=8 * 60), epochs=1)
    assert 5 <= trainer.updates <= 5 + 50  # caught at the next sampled check


def _loader_run(compile: bool = False, n_batches: int = 64, max_updates: int | None = None):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(3)
    data = DataLoader(TensorDataset(torch.randn(n_batches * 8, 4, generator=g), torch.randn(n_batches * 8, 1,
                                                                                         generator=g)),
                      batch_size=8, shuffle=True)
    model, opt = _build()
    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt)], device="cuda", compile=compile)
    return model, opt, data, trainer


def test_batched_input_is_copied_ahead_on_a_side_stream_and_matches_the_hand_loop():
    from trainflow.data.fetch import BatchedIterator

    model, opt, data, trainer = _loader_run(n_batches=16)
    torch.manual_seed(1)
    trainer.fit(data, epochs=2)
    it = trainer._streams["train"].iterator
    assert isinstance(it, BatchedIterator) and it.device is not None and it.side is not None
    hand, hand_opt = _build()
    torch.manual_seed(1)
    for _ in range(2):
        for x, y in data:
            x, y = x.cuda(), y.cuda()
            hand_opt.zero_grad()
            F.mse_loss(hand(x), y).backward()
            hand_opt.step()
    for a, b in zip(hand.parameters(), model.parameters()):
        assert torch.equal(a, b)  # the same kernels on the same batches


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_updates_that_do_not_log_never_synchronise_the_host(compile):
    import warnings

    model, opt, data, trainer = _loader_run(compile=compile)
    trainer.fit(data, max_updates=8)  # the first updates compile and read the first loss
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(data, max_updates=60)  # inside the epoch: nothing logs; the NaN check at update 50
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert trainer.updates == 60 and syncs == []
    assert all(v.device.type == "cuda" for v in trainer.losses.values())  # loss records stay on the device


def test_compiled_whole_update_under_cuda_graphs_matches_eager():
    eager, _, data, trainer = _loader_run(n_batches=16)
    torch.manual_seed(1)
    trainer.fit(data, epochs=2)
    model, _, data, compiled = _loader_run(compile=True, n_batches=16)
    torch.manual_seed(1)
    compiled.fit(data, epochs=2)
    runner = compiled._runners[compiled.flow.steps[0]]
    assert runner.compiled.cuda_graphs and runner.compiled.eager_reason is None and runner.compiled.opt_steps
    for a, b in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
