"""Exact resume in-process: stop at any update, save, load into a fresh trainer, finish —
the final state is bit-identical to the run that was never interrupted."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from conftest import regression_loader
from torch import nn

from trainflow import Step, Trainer, checkpoint

EPOCHS = 3


def _digest(trainer: Trainer) -> str:
    """SHA-256 over every tensor of models, optimizers, schedules and the torch RNG."""
    state = trainer.state_dict()
    h = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    feed({k: state[k] for k in ("models", "optimizers", "schedulers", "metrics")})
    feed(torch.get_rng_state())
    return h.hexdigest()


def _gan_trainer(out_dir, accumulate=1):
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    disc = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(8, 1))
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    g_opt = torch.optim.Adam(gen.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.StepLR(g_opt, step_size=2, gamma=0.9)
    acc = torchmetrics.MeanMetric()

    def d_loss(b):
        real = b[0]
        fake = gen(torch.randn(len(real), 3))
        logits = torch.cat([disc(real), disc(fake)])
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)]) + 0.05 * torch.rand(2 * len(real), 1)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        acc.update(loss.detach())
        return loss

    def g_loss(b):
        return F.binary_cross_entropy_with_logits(disc(gen(torch.randn(len(b[0]), 3))), torch.ones(len(b[0]), 1))

    def w_loss(b):  # a second stream: cycles on its own
        return F.mse_loss(disc(b[0]), b[1])

    steps = [
        Step(d_loss, d_opt, name="D", repeat=3, accumulate=accumulate),
        Step(g_loss, g_opt, name="G", batch="same", scheduler=sched),
        Step(w_loss, d_opt, name="W", data="extra"),
    ]
    return Trainer({"G": gen, "D": disc}, steps, metrics={"train/d": acc}, device="cpu", out_dir=out_dir)


def _data():
    return {"train": regression_loader(n=60, batch_size=8), "extra": regression_loader(n=24, batch_size=8, seed=9)}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("stop_at", [1, 3, 4, 7, 11, 16, 19])
def test_resume_anywhere_is_bit_identical(tmp_path, stop_at, accumulate):
    torch.manual_seed(42)
    full = _gan_trainer(tmp_path / "a", accumulate)
    full.fit(_data(), epochs=EPOCHS)
    expected, expected_logs = _digest(full), dict(full.logs)
    total = full.updates
    assert stop_at < total

    torch.manual_seed(42)
    first = _gan_trainer(tmp_path / "b", accumulate)
    first.fit(_data(), max_updates=stop_at)
    path = checkpoint.save(first.state_dict(), checkpoint.path_for(tmp_path / "b" / "checkpoints", first.updates))
    torch.manual_seed(12345)  # a restarted process starts from another RNG state

    resumed = _gan_trainer(tmp_path / "b", accumulate)
    resumed.fit(_data(), epochs=EPOCHS, resume="latest")
    assert resumed.updates == total
    assert _digest(resumed) == expected
    assert resumed.logs == expected_logs  # epoch loss means and metrics too
    assert path.exists()


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    torch.manual_seed(42)
    a = _gan_trainer(tmp_path / "a")
    a.fit(_data(), epochs=1)
    torch.manual_seed(42)
    b = _gan_trainer(tmp_path / "b")
    b.fit(_data(), epochs=1, resume="latest")
    assert _digest(a) == _digest(b)


def test_loading_the_state_of_other_models_names_every_mismatch(tmp_path):
    state = _gan_trainer(tmp_path).state_dict()
    state["models"]["D"]["0.weight"] = torch.zeros(5, 4)
    del state["models"]["G"]["2.bias"]
    state["models"]["G"]["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"model 'G' missing keys \['2.bias'\]; model 'G' unexpected keys \['extra'\]; "
                                         r"model 'D' shape mismatches \(saved vs model\) \['0.weight \(5, 4\) vs \(8, 4\)'\]"):
        _gan_trainer(tmp_path).load_state_dict(state)


def test_loading_the_state_of_another_flow(tmp_path):
    state = _gan_trainer(tmp_path).state_dict()
    state["flow"]["cycle"] = ["D", "G"]
    with pytest.raises(ValueError, match=r"Flow state is for the cycle \['D', 'G'\], but this flow's cycle is \['D', 'D', 'D', 'G', 'W'\]"):
        _gan_trainer(tmp_path).load_state_dict(state)


def test_not_a_state(tmp_path):
    with pytest.raises(ValueError, match=r"not a trainflow Trainer state.*Received: \['weights'\]"):
        _gan_trainer(tmp_path).load_state_dict({"weights": 1})


def test_resume_latest_needs_out_dir():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), torch.optim.SGD(model.parameters(), lr=0.1))])
    with pytest.raises(ValueError, match=r"resume='latest' looks in <out_dir>/checkpoints, but the trainer has no out_dir"):
        trainer.fit(regression_loader(), epochs=1, resume="latest")
