"""Hyperparameter schedules against hand-written loops: same weights, same values, same counts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_changed, assert_same_weights, mlp, regression_loader
from torch import nn

from trainflow import Schedule, Step, Trainer, param_groups

EPOCHS = 3


def _fresh(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp()


def _lr(opt: torch.optim.Optimizer) -> float:
    return opt.param_groups[0]["lr"]


class Net(nn.Module):
    """Three named layers, for schedules restricted to some parameter groups."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.body(x)))))


# ---------------------------------------------------------------- torch schedulers


def test_torch_steplr_matches_hand_loop_weights_and_lr_history():
    loader = regression_loader()
    hand = _fresh()
    start = copy.deepcopy(hand.state_dict())
    opt = torch.optim.SGD(hand.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    hand_lrs = []
    torch.manual_seed(1)
    for _ in range(EPOCHS):
        for x, y in loader:
            hand_lrs.append(_lr(opt))
            opt.zero_grad()
            F.mse_loss(hand(x), y).backward()
            opt.step()
            sched.step()

    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    lrs = []

    def mse(batch):
        lrs.append(_lr(opt))  # the lr this update uses
        return F.mse_loss(model(batch[0]), batch[1])

    torch.manual_seed(1)
    trainer = Trainer(model, Step(mse, opt, scheduler=sched), device="cpu")
    trainer.fit(loader, epochs=EPOCHS)

    assert_changed(start, model)
    assert_same_weights(hand, model)
    assert lrs == hand_lrs
    assert lrs[:7] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    assert sched.last_epoch == trainer.updates == EPOCHS * len(loader)


@pytest.mark.parametrize("split", [{"accumulate": 2}, {"microbatch_size": 3}], ids=["accumulate", "microbatch"])
def test_schedulers_step_once_per_update_not_per_batch(split):
    loader = regression_loader(n=40, batch_size=8)  # 5 batches: accumulate=2 ends on a window of 1
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch_sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    calls = []

    def momentum(t):
        calls.append(t)
        return 0.5

    seen = []  # (update count, lr) at every loss call: several per update

    def mse(batch):
        seen.append((trainer.updates, _lr(opt)))
        return F.mse_loss(model(batch[0]), batch[1])

    step = Step(mse, opt, scheduler=[torch_sched, Schedule(momentum, key="momentum")], **split)
    trainer = Trainer(model, step, device="cpu")
    trainer.fit(loader, epochs=2)

    updates = 2 * (3 if "accumulate" in split else 5)
    assert trainer.updates == updates
    assert torch_sched.last_epoch == updates
    assert calls == list(range(updates + 1))  # t=0 when the step is built, then once per update
    by_update: dict[int, set[float]] = {}
    for update, lr in seen:
        by_update.setdefault(update, set()).add(lr)
    assert by_update == {u: {0.1 * 0.5**u} for u in range(updates)}  # one lr per update
    # really several loss calls per update: 5 batches per epoch, or 5 batches in chunks of 3, 3, 2
    assert len(seen) == 2 * (5 if "accumulate" in split else 15)


# ---------------------------------------------------------------- function schedules


def test_epoch_schedule_gives_seed_003_linear_decay_and_matches_hand_loop():
    total_epochs, learning_rate = 10, 0.05
    loader = regression_loader(n=16, batch_size=8)  # 2 updates per epoch: fast
    hand = _fresh()
    opt = torch.optim.SGD(hand.parameters(), lr=learning_rate)
    torch.manual_seed(1)
    for epoch in range(total_epochs):  # seed 003, as written there
        for param_group in opt.param_groups:
            param_group["lr"] = learning_rate * (1 - float(epoch) / total_epochs)
        for x, y in loader:
            opt.zero_grad()
            F.mse_loss(hand(x), y).backward()
            opt.step()

    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=learning_rate)
    seen: dict[int, set[float]] = {}

    def mse(batch):
        seen.setdefault(trainer.epoch, set()).add(_lr(opt))
        return F.mse_loss(model(batch[0]), batch[1])

    decay = Schedule(lambda epoch: learning_rate * (1 - epoch / total_epochs), interval="epoch")
    trainer = Trainer(model, Step(mse, opt, scheduler=decay), device="cpu")
    torch.manual_seed(1)
    trainer.fit(loader, epochs=total_epochs)

    assert seen == {k: {0.05 * (1 - k / 10)} for k in range(total_epochs)}
    assert [round(next(iter(seen[k])), 3) for k in (0, 1, 9)] == [0.05, 0.045, 0.005]
    assert_same_weights(hand, model)


def test_function_schedule_of_momentum_changes_only_the_named_groups():
    def rules():
        return {"body*": {}, "fc1*": {}, "fc2*": {"lr": 0.01}}

    def momentum(t):
        return 0.9 - 0.1 * t

    loader = regression_loader()
    torch.manual_seed(0)
    hand = Net()
    model = copy.deepcopy(hand)
    opt = torch.optim.SGD(param_groups(hand, rules()), lr=0.1, momentum=0.5)
    torch.manual_seed(1)
    t = 0
    for x, y in loader:
        for g in opt.param_groups[1:]:  # the fc groups
            g["momentum"] = momentum(t)
        opt.zero_grad()
        F.mse_loss(hand(x), y).backward()
        opt.step()
        t += 1

    opt = torch.optim.SGD(param_groups(model, rules()), lr=0.1, momentum=0.5)
    schedule = Schedule(momentum, key="momentum", groups="fc*")
    torch.manual_seed(1)
    trainer = Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, scheduler=schedule), device="cpu")
    trainer.fit(loader, epochs=1)

    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("body*", 0.1), ("fc1*", 0.1), ("fc2*", 0.01)]
    assert [g["momentum"] for g in opt.param_groups] == [0.5, momentum(5), momentum(5)]
    assert_same_weights(hand, model)


def test_function_passed_as_scheduler_sets_lr_per_update():
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lrs = []

    def mse(batch):
        lrs.append(_lr(opt))
        return F.mse_loss(model(batch[0]), batch[1])

    step = Step(mse, opt, scheduler=lambda t: 0.1 / (1 + t))
    assert _lr(opt) == 0.1  # applied for t=0 when the step is built
    (schedule,) = step.schedulers
    assert schedule.interval == "update" and schedule.key == "lr"
    Trainer(model, step, device="cpu").fit(regression_loader(), epochs=2)
    assert lrs == [0.1 / (1 + t) for t in range(10)]


# ---------------------------------------------------------------- state


def _scheduled_run(kind: str):
    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = {
        "steplr": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
        "update": lambda: Schedule(lambda t: 0.1 * 0.9**t),
        "epoch": lambda: Schedule(lambda e: 0.1 / (1 + e), interval="epoch"),
    }[kind]()
    lrs = []

    def mse(batch):
        lrs.append(_lr(opt))
        return F.mse_loss(model(batch[0]), batch[1])

    return model, opt, lrs, Trainer(model, Step(mse, opt, scheduler=scheduler), device="cpu")


@pytest.mark.parametrize(
    "kind", ["steplr", "update", "epoch"]
)
def test_schedule_state_round_trips_and_the_loaded_run_continues_with_the_same_lr(kind, tmp_path):
    loader = regression_loader(shuffle=False)
    model, opt, lrs, trainer = _scheduled_run(kind)
    trainer.fit(loader, epochs=2)
    state = trainer.state_dict()
    assert set(state["schedulers"]) == {"mse.0"}
    assert state["schedulers"]["mse.0"]["count"] == (2 if kind == "epoch" else 10)
    torch.save(state, tmp_path / "state.pt")

    model2, opt2, lrs2, resumed = _scheduled_run(kind)
    assert _lr(opt2) != _lr(opt)  # a fresh schedule starts over...
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert _lr(opt2) == _lr(opt)  # ...the loaded one continues
    assert resumed.state_dict()["schedulers"] == state["schedulers"]

    trainer.fit(loader, epochs=4)
    resumed.fit(loader, epochs=4)
    assert lrs2 == lrs[10:]
    assert_same_weights(model, model2)
    assert len(set(lrs)) > 2  # the schedule really moved


# ---------------------------------------------------------------- errors


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)


def test_error_bad_interval():
    with pytest.raises(
        ValueError, match=r"Schedule: `interval` must be one of \('update', 'epoch'\)\. Received: interval='batch'"
    ):
        Schedule(lambda t: 0.1, interval="batch")


def test_error_bad_schedule_type():
    with pytest.raises(TypeError, match=r"`schedule` must be a function of progress .* Received: schedule=3 of type int\. Pass e\.g\."):
        Schedule(3)
    with pytest.raises(
        TypeError, match=r"Step: `scheduler` must be a torch.optim.lr_scheduler .* Received: scheduler\[0\] of type int"
    ):
        Step(lambda b: b, _opt(), scheduler=3)


@pytest.mark.parametrize("extra", [{"key": "momentum"}, {"groups": "fc*"}])
def test_error_key_or_groups_with_a_torch_scheduler(extra):
    sched = torch.optim.lr_scheduler.StepLR(_opt(), step_size=1)
    with pytest.raises(
        ValueError, match=r"`key` and `groups` apply to function schedules only.*Received: key=.*groups=.*Drop them"
    ):
        Schedule(sched, **extra)


def test_error_key_not_a_str():
    with pytest.raises(TypeError, match=r"Schedule: `key` must be a group entry name .* Received: key=1"):
        Schedule(lambda t: 0.1, key=1)


def test_error_scheduler_built_on_another_optimizer():
    mine, other = _opt(), _opt()
    sched = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(ValueError, match=r"Step 'fit': its scheduler was built on an optimizer that the step does not update.*Received: a scheduler of type StepLR on an optimizer of type SGD that"):
        Step(lambda b: b, mine, name="fit", scheduler=sched)


def test_error_groups_pattern_matches_no_group():
    torch.manual_seed(0)
    opt = torch.optim.SGD(param_groups(Net(), {"body*": {}, "fc*": {}}), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"Step 'fit': Schedule\(groups='head\*'\) matches no parameter group\. "
        r"Received: groups named \['body\*', 'fc\*'\]",
    ):
        Step(lambda b: b, opt, name="fit", scheduler=Schedule(lambda t: 0.1, groups="head*"))


def test_error_key_not_in_the_groups():
    opt = torch.optim.Adam(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(
        ValueError,
        match=r"Step 'fit': Schedule\(key='momentum'\) is not a hyperparameter of group\(s\) \['#0'\]\. "
        r"Received: key='momentum'; the groups have \[.*'betas'.*\]\. Use one of them",
    ):
        Step(lambda b: b, opt, name="fit", scheduler=Schedule(lambda t: 0.9, key="momentum"))
