"""``Trainer(on_nonfinite=...)``: a NaN or infinite loss (or gradient) raises, is skipped, or stops
``fit`` cleanly with a checkpoint."""

from __future__ import annotations

import copy
import json
import math

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


def build(bad_updates=(), *, policy="skip", bad="nan", callbacks=(), out_dir=None, accumulate=1, clip=None):
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

    trainer = Trainer(model, [Step(loss, opt, name="fit", scheduler=sched, accumulate=accumulate, clip_grad_norm=clip)],
                      device="cpu", on_nonfinite=policy, callbacks=list(callbacks), out_dir=out_dir)
    holder.append(trainer)
    return trainer, model, opt


def hand_loop(epochs: int, skip_batches: set[int], clip: float | None = None, means: list | None = None) -> nn.Module:
    """The same run by hand, skipping the given batches (counted over the whole run).

    ``means`` receives each epoch's mean of the updates' "mse" and "l1" losses.
    """
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    i = 0
    for _ in range(epochs):
        mse, l1 = [], []
        for x, y in data():
            i += 1
            if i in skip_batches:
                continue
            opt.zero_grad(set_to_none=True)
            mse.append(F.mse_loss(model(x), y))
            l1.append(F.l1_loss(model(x), y))
            (mse[-1] + l1[-1]).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
        if means is not None:
            means.append({"fit/mse": torch.stack(mse).detach().mean().item(),
                          "fit/l1": torch.stack(l1).detach().mean().item()})
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


def test_a_skipped_update_is_counted_not_averaged_into_the_epoch_mean():
    trainer, model, _ = build({3, 7})
    epochs = []
    trainer.events.add(type("Logs", (), {"on_epoch_end": lambda self, t, logs: epochs.append(dict(logs))})())
    trainer.fit(data(), epochs=2)
    expected = []
    hand_loop(2, {3, 7}, means=expected)
    assert trainer.skipped == 2
    assert epochs == expected  # the means of the 4 updates kept in each epoch, exactly; no NaN


def test_skip_with_clipping_drops_an_infinite_gradient_before_clipping_turns_it_into_nan():
    trainer, model, opt = build({3}, bad="grad", clip=0.5)
    snaps = Snapshots(model, opt)
    trainer.events.add(snaps)
    trainer.fit(data(), epochs=2)
    assert trainer.skipped == 1 and same_state(snaps.at[3], snaps.at[2])
    for a, b in zip(model.parameters(), hand_loop(2, {3}, clip=0.5).parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ custom steps


def custom_gan(bad: dict[int, str], policy: str):
    """A GAN as one custom step; ``bad`` maps an update to the loss ("D" or "G") that is NaN in it."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 3), nn.Linear(3, 1)
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), lr=0.01), torch.optim.Adam(disc.parameters(), lr=0.01)
    holder: list[Trainer] = []

    def train_step(batch, ctx):
        z, real = batch
        which = bad.get(holder[0].updates + 1)
        d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(gen(z).detach())).mean()
        ctx.minimize(d_loss * float("nan") if which == "D" else d_loss, d_opt)
        g_loss = F.softplus(-disc(gen(z))).mean()
        ctx.minimize(g_loss * float("nan") if which == "G" else g_loss, g_opt)
        return {"d": d_loss, "g": g_loss}

    trainer = Trainer({"G": gen, "D": disc}, [Step.custom(train_step, [d_opt, g_opt], name="gan")],
                      device="cpu", on_nonfinite=policy)
    holder.append(trainer)
    return trainer, gen, disc


def gan_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g)) for _ in range(BATCHES)]


def custom_gan_by_hand(bad: dict[int, str], updates: int):
    """The hand loop: a NaN D loss drops both steps of its update, a NaN G loss only the G step."""
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 3), nn.Linear(3, 1)
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), lr=0.01), torch.optim.Adam(disc.parameters(), lr=0.01)
    batches = gan_data() * 2
    for i, (z, real) in enumerate(batches[:updates], start=1):
        d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(gen(z).detach())).mean()
        if bad.get(i) == "D":
            continue
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        g_loss = F.softplus(-disc(gen(z))).mean()
        if bad.get(i) == "G":
            continue
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    return gen, disc


def test_skip_in_a_custom_step_is_decided_before_each_optimizer_steps():
    bad = {2: "G", 4: "D"}
    trainer, gen, disc = custom_gan(bad, "skip")
    trainer.fit(gan_data(), epochs=2)
    assert trainer.skipped == 2 and trainer.updates == 2 * BATCHES
    hand_gen, hand_disc = custom_gan_by_hand(bad, 2 * BATCHES)
    for a, b in zip([*gen.parameters(), *disc.parameters()], [*hand_gen.parameters(), *hand_disc.parameters()]):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    assert all(math.isfinite(v) for v in trainer.logs.values())  # the dropped updates' values are not averaged


def test_stop_in_a_custom_step_ends_fit_with_the_weights_before_the_bad_step():
    trainer, gen, disc = custom_gan({3: "D"}, "stop")
    trainer.fit(gan_data(), epochs=2)
    assert (trainer.stop_reason, trainer.updates, trainer.skipped) == ("nonfinite", 3, 1)
    hand_gen, hand_disc = custom_gan_by_hand({3: "D"}, 3)
    for a, b in zip([*gen.parameters(), *disc.parameters()], [*hand_gen.parameters(), *hand_disc.parameters()]):
        assert torch.equal(a, b)


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
