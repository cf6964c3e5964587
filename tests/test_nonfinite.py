"""``Trainer(on_nonfinite=...)``: a NaN or infinite loss (or gradient) raises, is skipped, or stops
``fit`` cleanly with a checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer, checkpoint
from trainflow.callbacks import Checkpoint

BATCHES = 5


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(4 * BATCHES, 3, generator=g), torch.randn(4 * BATCHES, 1, generator=g)),
                      batch_size=4)


class InfGrad(torch.autograd.Function):
    """The identity forward (a finite loss); an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def build(bad_updates=(), *, policy="skip", bad="nan", callbacks=(), out_dir=None, accumulate=1):
    """Linear regression with Adam and a per-update StepLR; the loss (or gradient) of ``bad_updates`` is non-finite."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    holder: list[Trainer] = []

    def loss(batch):
        x, y = batch
        pred = model(x)
        if holder[0].updates + 1 in bad_updates:
            if bad == "grad":
                return {"mse": F.mse_loss(InfGrad.apply(pred), y)}
            pred = pred * float(bad)
        return {"mse": F.mse_loss(pred, y), "l1": F.l1_loss(model(x), y)}

    trainer = Trainer(model, [Step(loss, opt, name="fit", scheduler=sched, accumulate=accumulate)],
                      device="cpu", on_nonfinite=policy, callbacks=list(callbacks), out_dir=out_dir)
    holder.append(trainer)
    return trainer, model, opt


def hand_loop(epochs: int, skip_batches: set[int]) -> nn.Module:
    """The same run by hand, skipping the given batches (counted over the whole run)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    i = 0
    for _ in range(epochs):
        for x, y in data():
            i += 1
            if i in skip_batches:
                continue
            opt.zero_grad(set_to_none=True)
            (F.mse_loss(model(x), y) + F.l1_loss(model(x), y)).backward()
            opt.step()
            sched.step()
    return model


class Snapshots:
    """Model and optimizer state after every update, deep-copied."""

    def __init__(self, model, opt):
        self.model, self.opt, self.at, self.no_grads = model, opt, {}, {}

    def on_update_end(self, trainer, step, losses):
        self.at[trainer.updates] = (copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.opt.state_dict()))
        self.no_grads[trainer.updates] = all(p.grad is None for p in self.model.parameters())


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------ raise


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_raise_names_the_step_the_loss_and_the_update(bad):
    trainer, _, _ = build({3}, policy="raise", bad=bad)
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(data(), epochs=1)
    assert str(info.value) == (
        f"Step 'fit': loss 'mse' is {bad} at update 3. Lower the learning rate, clip gradients "
        "(Step(..., clip_grad_norm=1.0)), or check the data for NaN/inf."
    )
    assert trainer.updates == 2


def test_raise_is_the_default_and_catches_an_infinite_gradient_at_the_next_loss():
    trainer, model, _ = build({3}, bad="grad", policy="raise")
    assert Trainer(model, [Step(lambda b: model(b[0]).sum(), torch.optim.SGD(model.parameters(), lr=0.1))],
                   device="cpu").on_nonfinite == "raise"
    # "raise" reads only the loss: the infinite gradient of update 3 shows in the loss of update 4
    with pytest.raises(FloatingPointError, match=r"^Step 'fit': loss 'mse' is (nan|inf) at update 4\."):
        trainer.fit(data(), epochs=1)


def test_a_bad_policy_is_refused_when_the_trainer_is_built():
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError) as info:
        Trainer(model, [Step(lambda b: model(b[0]).sum(), torch.optim.SGD(model.parameters(), lr=0.1))],
                on_nonfinite="ignore")
    assert str(info.value) == (
        "Trainer: `on_nonfinite` must be one of ('raise', 'skip', 'stop'). Received: on_nonfinite='ignore'. "
        "Use 'raise' to fail at once, 'skip' to drop the update, 'stop' to end fit (and checkpoint)."
    )


# ------------------------------------------------------------------------------ skip


@pytest.mark.parametrize("bad", ["nan", "inf", "grad"])
def test_skip_leaves_weights_and_optimizer_state_bit_identical(bad):
    trainer, model, opt = build({3, 7}, bad=bad)
    snaps = Snapshots(model, opt)
    trainer.events.add(snaps)
    trainer.fit(data(), epochs=2)
    assert trainer.skipped == 2 and trainer.updates == 2 * BATCHES  # a skipped batch still counts as an update
    for dropped in (3, 7):
        assert same_state(snaps.at[dropped], snaps.at[dropped - 1]), f"update {dropped} changed the state"
        assert not same_state(snaps.at[dropped + 1], snaps.at[dropped])  # training went on
        assert snaps.no_grads[dropped] and not snaps.no_grads[dropped - 1]  # its gradients are not left behind
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_equals_a_hand_loop_that_skips_those_batches():
    trainer, model, _ = build({3, 7})
    trainer.fit(data(), epochs=2)
    expected = hand_loop(2, {3, 7})
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def test_skip_drops_a_whole_accumulation_window():
    trainer, model, opt = build({2}, accumulate=2)  # windows: batches 1-2, 3-4, 5; update 2 = batches 3-4
    snaps = Snapshots(model, opt)
    trainer.events.add(snaps)
    trainer.fit(data(), epochs=1)
    assert trainer.skipped == 1 and trainer.updates == 3
    assert same_state(snaps.at[2], snaps.at[1])


def test_the_skip_count_is_saved_and_resumed(tmp_path):
    trainer, _, _ = build({2}, out_dir=tmp_path, callbacks=[Checkpoint(every_updates=4, every_epochs=None)])
    trainer.fit(data(), max_updates=4)
    resumed, _, _ = build(out_dir=tmp_path, callbacks=[Checkpoint(every_updates=4, every_epochs=None)])
    resumed.fit(data(), max_updates=4, resume="latest")
    assert resumed.skipped == 1


# ------------------------------------------------------------------------------ stop


def test_stop_ends_fit_cleanly_and_the_checkpoint_holds_the_last_finite_state(tmp_path):
    trainer, model, opt = build({7}, policy="stop", out_dir=tmp_path, callbacks=[Checkpoint(every_epochs=1)])
    snaps = Snapshots(model, opt)
    trainer.events.add(snaps)
    trainer.fit(data(), epochs=3)  # no exception
    assert trainer.stop_reason == "nonfinite"
    assert (trainer.updates, trainer.epoch, trainer.skipped) == (7, 1, 1)
    folder = tmp_path / "checkpoints"
    assert [p.name for p in checkpoint.checkpoints(folder)] == ["ckpt-u000000005-e1.pt", "ckpt-u000000007-e1.pt"]
    state = checkpoint.load(folder / "ckpt-u000000007-e1.pt")
    assert same_state(state["models"]["model"], snaps.at[6][0])  # the weights before the non-finite update
    assert same_state(state["optimizers"]["fit"], snaps.at[6][1])
    assert json.loads((folder / "index.json").read_text())["checkpoints"][-1]["reason"] == "nonfinite"
