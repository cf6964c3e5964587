"""The one update path (``trainflow.update``) against the hand-written loop.

One matrix: the loss as a scalar, a dict, an ``Average`` or with an ``add_loss`` term; the
update on one batch, on an accumulation window (two batches, an uneven last one) or on
micro-batches (5, 5, 2 samples of a batch of 12); the step declarative or ``Step.custom``
(whose function accumulates the same chunks by hand with ``ctx.backward``). The hand loop
differentiates the big-batch loss of each update. One batch is bit-identical; a window or
micro-batches equal the big batch in float64 to rtol 1e-10 (DESIGN invariant 2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainflow import Average, Step, Trainer, add_loss
from trainflow.precision import Precision
from trainflow.update import StepRunner, declarative_update

KINDS = ("scalar", "dict", "Average", "add_loss")
SHAPES = ("one batch", "window", "micro-batches")
N = 24  # samples; 3 batches of 8 or 2 of 12
AUX_RATE = 1e-2


class Activity(nn.Module):
    """Adds ``AUX_RATE * mean(h**2)`` (a per-sample mean, so it accumulates exactly) when enabled."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.enabled = enabled
        self.seen: list[torch.Tensor] = []  # what the hand loop adds (Keras's model.losses)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = AUX_RATE * h.pow(2).mean()
            add_loss(value)
            self.seen.append(value)
        return h


def build(kind: str) -> tuple[nn.Module, Activity, torch.optim.Optimizer]:
    torch.manual_seed(0)
    activity = Activity(kind == "add_loss")
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), activity, nn.Linear(8, 1)).double()
    return model, activity, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 4, (N,), generator=g).double()  # each sample's token count
    return x, y, tokens


def batches(shape: str) -> list[tuple[torch.Tensor, ...]]:
    size = 12 if shape == "micro-batches" else 8
    x, y, t = dataset()
    return [(x[i:i + size], y[i:i + size], t[i:i + size]) for i in range(0, N, size)]


def windows(shape: str) -> list[list[tuple[torch.Tensor, ...]]]:
    """The chunks each update sees."""
    if shape == "one batch":
        return [[b] for b in batches(shape)]
    if shape == "window":  # accumulate=2 over 3 batches: a window of 2, then the partial one
        bs = batches(shape)
        return [bs[:2], bs[2:]]
    return [[tuple(t[i:i + 5] for t in b) for i in range(0, 12, 5)] for b in batches(shape)]


def concat(chunks: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*chunks))


def loss_of(kind: str, model: nn.Module, batch: tuple[torch.Tensor, ...]):
    """The step's loss in the form trainflow takes."""
    x, y, t = batch
    out = model(x)
    if kind in ("scalar", "add_loss"):
        return F.mse_loss(out, y)
    if kind == "dict":
        return {"mse": F.mse_loss(out, y), "l1": F.l1_loss(out, y)}
    return Average(((out - y).squeeze(1) ** 2 * t).sum(), t.sum())


def hand_loss(kind: str, model: nn.Module, activity: Activity, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The big-batch loss as a hand-written loop writes it."""
    activity.seen.clear()
    x, y, t = batch
    out = model(x)
    if kind == "scalar":
        return F.mse_loss(out, y)
    if kind == "add_loss":
        return F.mse_loss(out, y) + sum(activity.seen)
    if kind == "dict":
        return F.mse_loss(out, y) + F.l1_loss(out, y)
    return ((out - y).squeeze(1) ** 2 * t).sum() / t.sum()


def hand_run(kind: str, shape: str) -> tuple[nn.Module, list[float]]:
    model, activity, opt = build(kind)
    model.train()
    losses = []
    for _ in range(2):  # epochs
        for chunks in windows(shape):
            opt.zero_grad()
            loss = hand_loss(kind, model, activity, concat(chunks))
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return model, losses


def custom_update(kind: str, model: nn.Module, opt: torch.optim.Optimizer, shape: str):
    """A Step.custom function doing the same update by hand: each chunk's share of the big-batch loss."""

    def update(window, ctx):
        chunks = window if shape == "window" else [window]
        if shape == "micro-batches":
            chunks = [tuple(t[i:i + 5] for t in window) for i in range(0, len(window[0]), 5)]
        if len(chunks) == 1:
            (chunk,) = chunks
            out = loss_of(kind, model, chunk)
            loss = out["mse"] + out["l1"] if kind == "dict" else out.value() if kind == "Average" else out
            if kind == "add_loss":
                loss = loss + ctx.aux_loss()
            ctx.minimize(loss, opt)
            return {"loss": loss}
        samples = sum(len(c[0]) for c in chunks)
        tokens = sum(c[2].sum() for c in chunks)
        ctx.zero_grad(opt)
        total = 0.0
        for chunk in chunks:
            out = loss_of(kind, model, chunk)
            if kind == "Average":
                share = out.total / tokens
            else:
                mean = out["mse"] + out["l1"] if kind == "dict" else out
                if kind == "add_loss":
                    mean = mean + ctx.aux_loss()
                share = mean * (len(chunk[0]) / samples)
            ctx.backward(share, opt)
            total = total + share.detach()
        ctx.step(opt)
        return {"loss": total}

    return update


def trainflow_run(kind: str, shape: str, how: str) -> tuple[nn.Module, list[float]]:
    model, _, opt = build(kind)
    if how == "declarative":
        step = Step(lambda b: loss_of(kind, model, b), opt, name="fit",
                    accumulate=2 if shape == "window" else 1,
                    microbatch_size=5 if shape == "micro-batches" else None)
        data = batches(shape)
    else:
        step = Step.custom(custom_update(kind, model, opt, shape), opt, name="fit")
        data = windows("window") if shape == "window" else batches(shape)
    totals: list[float] = []

    class Totals:
        def on_update_end(self, trainer, step, losses):
            totals.append(sum(v for v in losses.values()).item() if how == "custom" or kind != "dict"
                          else (losses["fit/mse"] + losses["fit/l1"]).item())

    trainer = Trainer(model, step, callbacks=[Totals()], device="cpu", progress=False)
    trainer.fit(data, epochs=2)
    return model, totals


@pytest.mark.parametrize("how", ["declarative", "custom"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_update_equals_the_hand_loop(kind, shape, how):
    hand, hand_losses = hand_run(kind, shape)
    flow, flow_losses = trainflow_run(kind, shape, how)
    start, _, _ = build(kind)
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), hand.parameters()))  # it trained
    if shape == "one batch":  # nothing accumulated: bit for bit
        for a, b in zip(hand.parameters(), flow.parameters()):
            assert torch.equal(a, b)
        assert flow_losses == hand_losses
    else:
        for a, b in zip(hand.parameters(), flow.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
        torch.testing.assert_close(flow_losses, hand_losses, rtol=1e-10, atol=0)


# ------------------------------------------------------------------ the runner on its own


def runner_for(loss, params, **step):
    opt = torch.optim.SGD(params, lr=0.5)
    return StepRunner(Step(loss, opt, name="fit", **step), [(f"p{i}", p) for i, p in enumerate(params)],
                      Precision("32", torch.device("cpu")), on_nonfinite="skip"), opt


def test_a_dropped_update_steps_nothing_and_clears_the_gradients():
    w = nn.Parameter(torch.ones(2))
    runner, opt = runner_for(lambda b: (b @ w).mean() * float("nan"), [w])
    values, applied = declarative_update(runner, [torch.ones(1, 2)], 0)
    assert not applied and torch.isnan(values["fit/loss"])
    assert torch.equal(w.detach(), torch.ones(2)) and w.grad is None
    assert opt.state_dict()["state"] == {}


def test_per_update_schedules_step_once_per_applied_update_only():
    w = nn.Parameter(torch.ones(2))
    factor = {"value": 1.0}
    opt = torch.optim.SGD([w], lr=0.5)
    lrs = []
    step = Step(lambda b: (b @ w).mean() * factor["value"], opt, name="fit", accumulate=2,
                scheduler=lambda n: 0.5 / (n + 1))
    runner = StepRunner(step, [("w", w)], Precision("32", torch.device("cpu")), on_nonfinite="skip")
    for value in (1.0, float("inf"), 1.0):
        factor["value"] = value
        runner.run([torch.ones(1, 2), torch.ones(1, 2)], 0)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.25, 0.25, 0.5 / 3]  # the dropped update did not advance the schedule


def test_the_gradients_of_a_window_are_the_big_batch_gradient():
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    runner, _ = runner_for(lambda b: (b @ w).pow(2).mean(), [w])
    loss, values = runner.gradients([x[:2], x[2:]])
    big = nn.Parameter(w.detach().clone())
    (x @ big).pow(2).mean().backward()
    torch.testing.assert_close(w.grad, big.grad, rtol=1e-12, atol=0)
    assert torch.equal(loss, values["fit/loss"]) and values["fit/loss"].item() == pytest.approx(((x @ w) ** 2).mean().item())
