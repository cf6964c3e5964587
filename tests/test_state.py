"""The run's state (``trainflow.state``): state -> load -> state gives the same state, part by part."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from trainflow import Schedule, Step, Trainer
from trainflow.state import Callbacks, FreeParameters, Optimizers, RunState, Schedules

PARTS = ("flow", "models", "optimizers", "optimizer_types", "schedulers", "params", "precision", "metrics",
         "callbacks", "data", "loop")


class Count:
    """A stateful callback: the updates it has seen."""

    def __init__(self) -> None:
        self.n = 0

    def on_update_end(self, trainer, step, losses) -> None:
        self.n += 1

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def build(seed: int) -> Trainer:
    """A GAN-shaped run with every kind of part: two models, a cycle, schedules per update and per
    epoch, a parameter outside the models, a metric and a stateful callback."""
    torch.manual_seed(seed)
    gen, disc = nn.Linear(2, 3), nn.Linear(3, 1)
    log_scale = nn.Parameter(torch.zeros(1))
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    g_opt = torch.optim.SGD([*gen.parameters(), log_scale], lr=1e-2, momentum=0.9)
    mean = MeanMetric()

    def d_loss(batch):
        fake = gen(torch.randn(len(batch[0]), 2)).detach()
        loss = F.softplus(-disc(batch[0])).mean() + F.softplus(disc(fake)).mean()
        mean.update(loss.detach())
        return loss

    def g_loss(batch):
        return F.softplus(-disc(gen(torch.randn(len(batch[0]), 2)) * log_scale.exp())).mean()

    steps = [
        Step(d_loss, d_opt, name="D", repeat=2, scheduler=lambda n: 1e-2 / (1 + n)),
        Step(g_loss, g_opt, name="G", scheduler=Schedule(torch.optim.lr_scheduler.StepLR(g_opt, 1, 0.5),
                                                         interval="epoch")),
    ]
    return Trainer({"G": gen, "D": disc}, steps, metrics={"train/d_mean": mean}, callbacks=[Count()],
                   device="cpu", progress=False)


def data() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, generator=g),) for _ in range(4)]


def equal(a, b, where: str = "state") -> None:
    """Deep equality of two states, tensors bit for bit; the failure names the path."""
    assert type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))), where
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.fixture()
def trained() -> tuple[Trainer, dict]:
    trainer = build(seed=0)
    trainer.fit(data(), epochs=3, max_updates=7)  # stopped mid-epoch (4 batches an epoch), mid-cycle
    return trainer, trainer.state_dict()


def test_state_load_state_is_idempotent_part_by_part(trained):
    _, state = trained
    assert list(state) == list(PARTS)
    other = build(seed=1)  # other weights, other optimizer moments
    other.load_state_dict(state)
    again = other.state_dict()
    for part in PARTS:
        equal(state[part], again[part], part)


def test_a_loaded_state_keeps_the_data_position_until_fit_applies_it(trained):
    """The loaded run's stream positions and RNG are part of the state from the load on, not after fit."""
    _, state = trained
    other = build(seed=1)
    other.load_state_dict(state)
    torch.randn(3)  # a draw between the load and the state: the loaded RNG state is still the run's
    again = other.state_dict()
    equal(state["data"]["streams"], again["data"]["streams"], "streams")
    equal(state["data"]["rng"], again["data"]["rng"], "rng")
    assert again["data"]["in_epoch"] is True


def test_a_loaded_trainer_continues_exactly_as_the_uninterrupted_one(trained):
    _, state = trained
    other = build(seed=1)
    other.load_state_dict(state)
    other.fit(data(), epochs=3)
    trainer = build(seed=0)
    trainer.fit(data(), epochs=3)
    for part in ("models", "optimizers", "schedulers", "params", "flow", "metrics", "callbacks"):
        equal(trainer.state_dict()[part], other.state_dict()[part], part)
    assert other.events.callbacks[0].n == trainer.events.callbacks[0].n == 12


@pytest.mark.parametrize("part", ["optimizers", "schedulers", "params"])
def test_every_named_part_round_trips_on_its_own(trained, part):
    trainer, state = trained
    other = build(seed=1)
    named = {
        "optimizers": (Optimizers(trainer.flow.steps), Optimizers(other.flow.steps)),
        "schedulers": (Schedules(trainer.flow.steps), Schedules(other.flow.steps)),
        "params": (FreeParameters(trainer.named_parameters(), Optimizers(trainer.flow.steps)),
                   FreeParameters(other.named_parameters(), Optimizers(other.flow.steps))),
    }
    mine, theirs = named[part]
    assert theirs.mismatch(mine.state_dict()) == []
    theirs.load_state_dict(mine.state_dict())
    equal(mine.state_dict(), theirs.state_dict(), part)


def test_callback_states_round_trip_by_name_whatever_their_place():
    first, second = Count(), Count()
    first.n = 5
    saved = Callbacks(lambda: [object(), first]).state_dict()
    Callbacks(lambda: [second, object(), object()]).load_state_dict(saved)
    assert saved == {"Count": {"n": 5}} and second.n == 5


def test_a_state_that_does_not_fit_is_refused_before_any_part_is_loaded(trained):
    _, state = trained
    other = build(seed=1)
    before = other.state_dict()
    bad = dict(state, optimizer_types={"D": "SGD", "G": "SGD"})  # D was an Adam
    with pytest.raises(ValueError, match=r"^The state does not fit this trainer: optimizer 'D' is Adam here, SGD in "
                                         r"the state\. Load a state saved by a trainer with the same models"):
        other.load_state_dict(bad)
    for part in ("models", "optimizers", "params", "flow", "callbacks"):
        equal(before[part], other.state_dict()[part], part)


def test_a_run_state_refuses_what_is_not_a_state():
    with pytest.raises(ValueError, match=r"^The state is not a trainflow Trainer state: expected the parts "
                                         r"\['optimizers'\]\. Received: \['models'\]\."):
        RunState({"optimizers": Optimizers([])}, required=("optimizers",)).load_state_dict({"models": {}})
