"""Seed 003 (MegEngine, advanced parameter optimization) reproduced on a LeNet for 8x8 digits.

Each section of the seed: per-group learning rates, setting one group's lr to zero after the
second epoch, linear decay, one optimizer per group (stepped together, or apart), and freezing
by giving parameters to no optimizer. Each trainflow run is checked against the hand loop.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights
from torch import nn

from trainflow import Schedule, Step, Trainer, freeze, group, param_groups
from trainflow.data import digits

CONV, FC = "conv*", "fc*|classifier*"


class LeNet(nn.Module):
    """The seed's LeNet, sized for 1x8x8 digits; its layers are named as in the seed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)  # 8x8 -> 8x8, pooled to 4x4
        self.conv2 = nn.Conv2d(6, 16, 3)  # 4x4 -> 2x2
        self.fc1 = nn.Linear(16 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.classifier = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x)).flatten(1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.classifier(x)


@pytest.fixture(scope="module")
def loader():
    train, _ = digits(batch_size=64, flatten=False)
    return train


@pytest.fixture(scope="module")
def few(loader):
    """The first 4 batches, as a fixed list: several epochs stay fast."""
    torch.manual_seed(0)
    return list(itertools.islice(loader, 4))


def _lenet(seed: int = 0) -> LeNet:
    torch.manual_seed(seed)
    return LeNet()


def _named(net: nn.Module, prefix: str) -> list[torch.Tensor]:
    return [p for n, p in net.named_parameters() if n.startswith(prefix)]


def _fc(net: nn.Module) -> list[torch.Tensor]:
    return [p for n, p in net.named_parameters() if not n.startswith("conv")]


def _copy(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _loss(net):
    def cross_entropy(batch):
        x, y = batch
        return F.cross_entropy(net(x), y)

    return cross_entropy


def _groups(net):
    return param_groups(net, {CONV: {}, FC: {"lr": 0.01}})


# ---------------------------------------------------------------- different lr per group


def test_group_sizes_and_lrs_and_the_plan_lists_them(capsys):
    le_net = _lenet()
    optimizer = torch.optim.SGD(_groups(le_net), lr=0.05)
    for g in optimizer.param_groups:
        print(len(g["params"]), g["lr"])
    assert capsys.readouterr().out == "4 0.05\n6 0.01\n"
    assert [n for n, _ in le_net.named_parameters() if n.startswith("conv")] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
    ]

    plan = Trainer(le_net, Step(_loss(le_net), optimizer), device="cpu").describe()
    rows = [line for line in plan.splitlines() if "SGD" in line]
    assert len(rows) == 2
    # only what differs from SGD's defaults (momentum=0, nesterov=False... are not repeated)
    assert [[cell.strip() for cell in row.split("│")[3:7]] for row in rows] == [
        ["SGD", "conv*", "940", "lr=0.05"], ["SGD", "fc*|classifier*", "18,814", "lr=0.01"],
    ]
    assert "parameters: 19,754 total, 19,754 trainable" in plan
    assert "WARNING" not in plan and "frozen" not in plan


# ---------------------------------------------------------------- changing lr during training


class LrZero:
    """The seed's `optimizer.param_groups[1]['lr'] = 0.0` after the second epoch, by group name."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def on_epoch_end(self, trainer, logs) -> None:
        if trainer.epoch == 2:
            group(self.optimizer, FC)["lr"] = 0.0


class Record:
    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.conv: list[list[torch.Tensor]] = []
        self.fc: list[list[torch.Tensor]] = []

    def on_fit_start(self, trainer) -> None:
        self.on_epoch_end(trainer, {})

    def on_epoch_end(self, trainer, logs) -> None:
        self.conv.append(_copy(_named(self.net, "conv")))
        self.fc.append(_copy(_fc(self.net)))


def test_fc_lr_zero_after_epoch_2_stops_fc_while_conv_keeps_training(few):
    le_net = _lenet()
    optimizer = torch.optim.SGD(_groups(le_net), lr=0.05)
    record = Record(le_net)
    Trainer(le_net, Step(_loss(le_net), optimizer), callbacks=[LrZero(optimizer), record], device="cpu").fit(
        few, epochs=4
    )
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.0]
    fc_moved = [not _equal(a, b) for a, b in itertools.pairwise(record.fc)]
    conv_moved = [not _equal(a, b) for a, b in itertools.pairwise(record.conv)]
    assert fc_moved == [True, True, False, False]
    assert conv_moved == [True, True, True, True]

    hand = _lenet()  # the seed's loop
    optimizer = torch.optim.SGD([{"params": _named(hand, "conv")}, {"params": _fc(hand), "lr": 0.01}], lr=0.05)
    for epoch in range(4):
        for x, y in few:
            optimizer.zero_grad()
            F.cross_entropy(hand(x), y).backward()
            optimizer.step()
        if epoch == 1:
            optimizer.param_groups[1]["lr"] = 0.0
    assert_same_weights(hand, le_net)


def test_linear_decay_one_value_per_epoch_for_every_group(few):
    total_epochs, learning_rate = 10, 0.05
    data = few[:2]
    le_net = _lenet()
    optimizer = torch.optim.SGD(_groups(le_net), lr=learning_rate)
    seen: dict[int, set[tuple[float, ...]]] = {}

    def cross_entropy(batch):
        seen.setdefault(trainer.epoch, set()).add(tuple(g["lr"] for g in optimizer.param_groups))
        return F.cross_entropy(le_net(batch[0]), batch[1])

    decay = Schedule(lambda epoch: learning_rate * (1 - epoch / total_epochs), interval="epoch")
    trainer = Trainer(le_net, Step(cross_entropy, optimizer, scheduler=decay), device="cpu")
    trainer.fit(data, epochs=total_epochs)
    expected = [0.05 * (1 - k / 10) for k in range(total_epochs)]
    assert seen == {k: {(lr, lr)} for k, lr in enumerate(expected)}  # the seed sets every group

    hand = _lenet()
    optimizer = torch.optim.SGD([{"params": _named(hand, "conv")}, {"params": _fc(hand), "lr": 0.01}], lr=0.05)
    for epoch in range(total_epochs):
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate * (1 - float(epoch) / total_epochs)
        for x, y in data:
            optimizer.zero_grad()
            F.cross_entropy(hand(x), y).backward()
            optimizer.step()
    assert_same_weights(hand, le_net)


# ---------------------------------------------------------------- different optimizers per group


class MultipleOptimizer:
    """The seed's MultipleOptimizer, in PyTorch spelling."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts

    def clear_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad()

    def step(self) -> None:
        for opt in self.opts:
            opt.step()


def test_sgd_for_conv_and_adam_for_fc_stepped_together_matches_multiple_optimizer(loader):
    hand = _lenet()
    optimizer = MultipleOptimizer(
        torch.optim.SGD(_named(hand, "conv"), lr=0.05), torch.optim.Adam(_fc(hand), lr=0.01)
    )
    start = copy.deepcopy(hand.state_dict())
    torch.manual_seed(1)
    hand.train()
    for x, y in loader:
        optimizer.clear_grad()
        F.cross_entropy(hand(x), y).backward()
        optimizer.step()

    le_net = _lenet()
    groups = _groups(le_net)
    sgd, adam = torch.optim.SGD(groups[:1], lr=0.05), torch.optim.Adam(groups[1:])
    torch.manual_seed(1)
    trainer = Trainer(le_net, Step(_loss(le_net), [sgd, adam]), device="cpu")
    trainer.fit(loader, epochs=1)
    assert trainer.updates == len(loader) == 23
    assert not _equal(start.values(), le_net.state_dict().values())
    assert_same_weights(hand, le_net)


def test_separate_steps_per_optimizer_when_not_stepped_together(few):
    hand = _lenet()
    sgd, adam = torch.optim.SGD(_named(hand, "conv"), lr=0.05), torch.optim.Adam(_fc(hand), lr=0.01)
    for i, (x, y) in enumerate(few * 3):  # conv on one batch, fc on the next
        opt = sgd if i % 2 == 0 else adam
        opt.zero_grad()
        F.cross_entropy(hand(x), y).backward()
        opt.step()

    le_net = _lenet()
    groups = _groups(le_net)
    sgd, adam = torch.optim.SGD(groups[:1], lr=0.05), torch.optim.Adam(groups[1:])
    loss = _loss(le_net)
    steps = [Step(loss, sgd, name="conv"), Step(loss, adam, name="fc")]
    Trainer(le_net, steps, device="cpu").fit(few, epochs=3)
    assert_same_weights(hand, le_net)


# ---------------------------------------------------------------- freezing by optimizing only some


def _grads(net: nn.Module) -> list[str]:
    """The seed's printout, sorted by name like MegEngine's named_parameters."""
    lines = []
    for name, param in sorted(net.named_parameters()):
        lines.append(f"{name} {None if param.grad is None else round(param.grad.sum().item(), 4)}")
    return lines


def _conv_only(net: LeNet, by_freezing: bool) -> torch.optim.Optimizer:
    if by_freezing:  # the explicit way: freeze, then group what trains
        freeze(net, FC)
        return torch.optim.SGD(param_groups(net, {CONV: {}}), lr=0.05)
    return torch.optim.SGD([p for n, p in net.named_parameters() if "conv" in n], lr=0.05)  # the seed's


@pytest.mark.parametrize("by_freezing", [False, True], ids=["seed", "freeze"])
def test_only_conv_parameters_get_gradients_when_only_they_are_optimized(loader, by_freezing):
    hand = _lenet()
    optimizer = _conv_only(hand, by_freezing)
    torch.manual_seed(1)
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(hand(x), y).backward()
        optimizer.step()

    le_net = _lenet()
    optimizer = _conv_only(le_net, by_freezing)
    torch.manual_seed(1)
    trainer = Trainer(le_net, Step(_loss(le_net), optimizer), device="cpu")
    trainer.fit(loader, epochs=1)
    assert_same_weights(hand, le_net)

    printout = _grads(le_net)
    assert [line.split()[0] for line in printout] == [
        "classifier.bias", "classifier.weight", "conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight",
        "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight",
    ]
    for line in printout:
        assert line.endswith(" None") != line.startswith("conv"), line
    plan = trainer.describe()
    if by_freezing:
        assert "frozen: fc1.weight, fc1.bias, fc2.weight, fc2.bias, classifier.weight, classifier.bias" in plan
    else:  # trainable but in no optimizer: the plan says so
        assert "WARNING: trainable parameters that no step updates: fc1.weight" in plan
