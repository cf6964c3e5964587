"""Freezing during a run: ``freeze(..., batchnorm=)``, ``callbacks.Freeze`` / ``Unfreeze``, hand loops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights, regression_loader
from torch import nn

from trainflow import Step, Trainer, freeze, param_groups, unfreeze
from trainflow.callbacks import Freeze, Unfreeze
from trainflow.params import KEEP_EVAL

EPOCHS = 3


class Net(nn.Module):
    """A backbone with batch norm, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> bool:
    return all(torch.equal(a[k], b[k]) for k in (keys or a))


PARAMS = ["0.weight", "0.bias", "1.weight", "1.bias"]
STATS = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]


class Snapshots:
    """The backbone's state at the start and at the end of every epoch."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.ends: list[dict[str, torch.Tensor]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer) -> None:
        self.start = _snapshot(self.net.backbone)

    def on_epoch_end(self, trainer, logs) -> None:
        self.ends.append(_snapshot(self.net.backbone))


# ---------------------------------------------------------------- freeze(batchnorm=)


def test_freeze_batchnorm_eval_marks_only_wholly_frozen_norms_and_unfreeze_clears():
    net = _net()
    assert freeze(net, "backbone*", batchnorm="eval") == [f"backbone.{p}" for p in PARAMS]
    assert getattr(net.backbone[1], KEEP_EVAL) is True
    assert not hasattr(net.backbone[0], KEEP_EVAL)  # only batch-norm layers are marked
    assert net.backbone[1].training  # the mode itself is the trainer's business
    unfreeze(net, "backbone.1.bias")  # any parameter unfrozen: statistics train again
    assert not hasattr(net.backbone[1], KEEP_EVAL)
    freeze(net, "backbone.1.*", batchnorm="eval")
    freeze(net, "backbone*")  # the latest call decides: "train" clears the mark
    assert not hasattr(net.backbone[1], KEEP_EVAL)
    freeze(net, "head*", batchnorm="eval")  # no batch-norm layer involved: nothing to mark
    assert not any(hasattr(m, KEEP_EVAL) for m in net.modules())


def test_freeze_batchnorm_eval_on_a_dict_of_models():
    net = _net()
    models = {"enc": net.backbone, "dec": net.head}
    assert freeze(models, "enc.*", batchnorm="eval") == [f"enc.{p}" for p in PARAMS]
    assert getattr(net.backbone[1], KEEP_EVAL) is True


@pytest.mark.parametrize("batchnorm", ["train", "eval"])
def test_frozen_batchnorm_running_statistics_move_only_with_train(batchnorm):
    net = _net()
    opt = torch.optim.SGD(net.head.parameters(), lr=0.1)
    freeze(net, "backbone*", batchnorm=batchnorm)
    modes = []

    def mse(batch):
        modes.append(net.backbone[1].training)
        return F.mse_loss(net(batch[0]), batch[1])

    snaps = Snapshots(net)
    Trainer(net, Step(mse, opt), callbacks=[snaps], device="cpu").fit(regression_loader(), epochs=2)
    assert _same(snaps.start, snaps.ends[-1], PARAMS)  # frozen weights never move
    assert _same(snaps.start, snaps.ends[-1], STATS) == (batchnorm == "eval")
    assert set(modes) == {batchnorm == "train"}
    assert net.backbone[1].training  # the mode it had before fit is restored


def test_describe_lists_norms_kept_in_eval_and_frozen_tensors_in_groups():
    net = _net()
    opt = torch.optim.SGD(param_groups(net, {"backbone*": {"lr": 0.01}, "head*": {}}), lr=0.1)
    freeze(net, "backbone*", batchnorm="eval")
    text = Trainer(net, Step(lambda b: b, opt, name="fit"), device="cpu").describe()
    assert "backbone*" in text and "0 (4 frozen tensors)" in text and "lr=0.01" in text
    assert "eval mode during fit (running statistics fixed): backbone.1" in text


# ---------------------------------------------------------------- Unfreeze / Freeze callbacks


def _hand_unfreeze(opt_cls, keep_eval: bool) -> Net:
    """The hand-written loop: the backbone frozen for epoch 0, trained from epoch 1 on."""
    net = _net()
    opt = opt_cls(net.parameters())
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    loader = regression_loader()
    torch.manual_seed(1)
    net.train()
    for epoch in range(EPOCHS):
        if epoch == 1:
            for p in net.backbone.parameters():
                p.requires_grad_(True)
        net.backbone[1].train(not (keep_eval and epoch == 0))
        for x, y in loader:
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
    return net


@pytest.mark.parametrize(
    ("opt_cls", "batchnorm"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3), "train"),
        (lambda ps: torch.optim.Adam(ps, lr=0.01), "eval"),
    ],
    ids=["sgd-train", "adam-eval"],
)
def test_unfreeze_backbone_after_epoch_0_matches_hand_loop(opt_cls, batchnorm):
    net = _net()
    opt = opt_cls(net.parameters())  # every parameter: the frozen ones wait in the optimizer
    freeze(net, "backbone*", batchnorm=batchnorm)
    snaps = Snapshots(net)
    torch.manual_seed(1)
    trainer = Trainer(
        net,
        Step(lambda b: F.mse_loss(net(b[0]), b[1]), opt),
        callbacks=[Unfreeze("backbone*", at_epoch=1), snaps],
        device="cpu",
    )
    trainer.fit(regression_loader(), epochs=EPOCHS)

    first, second, third = snaps.ends
    assert _same(snaps.start, first, PARAMS)  # unchanged during epoch 0
    assert _same(snaps.start, first, STATS) == (batchnorm == "eval")
    assert not _same(first, second, PARAMS) and not _same(second, third, PARAMS)  # trained after
    assert not _same(first, second, STATS)
    assert all(p.requires_grad for p in net.parameters())
    assert not hasattr(net.backbone[1], KEEP_EVAL)
    assert_same_weights(_hand_unfreeze(opt_cls, batchnorm == "eval"), net)


def test_freeze_callback_stops_the_backbone_and_its_statistics_from_epoch_1():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    snaps = Snapshots(net)
    modes = []

    def mse(batch):
        modes.append((trainer.epoch, net.backbone[1].training))
        return F.mse_loss(net(batch[0]), batch[1])

    callbacks = [Freeze("backbone*", at_epoch=1, batchnorm="eval"), snaps]
    trainer = Trainer(net, Step(mse, opt), callbacks=callbacks, device="cpu")
    trainer.fit(regression_loader(), epochs=EPOCHS)
    first, second, third = snaps.ends
    assert not _same(snaps.start, first)  # trained during epoch 0
    assert _same(first, second) and _same(second, third)  # weights and statistics fixed after
    assert sorted(set(modes)) == [(0, True), (1, False), (2, False)]
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == [f"backbone.{p}" for p in PARAMS]


def test_unfreeze_on_a_dict_of_models_uses_prefixed_names():
    net = _net()
    enc, dec = net.backbone, net.head
    opt = torch.optim.SGD([*enc.parameters(), *dec.parameters()], lr=0.05)
    freeze({"enc": enc, "dec": dec}, "enc.*")
    trainer = Trainer(
        {"enc": enc, "dec": dec},
        Step(lambda b: F.mse_loss(dec(enc(b[0])), b[1]), opt),
        callbacks=[Unfreeze("enc.0.*|enc.1.*", at_epoch=2)],
        device="cpu",
    )
    trainer.fit(regression_loader(), epochs=2)
    assert not enc[0].weight.requires_grad
    trainer.fit(regression_loader(), epochs=3)
    assert enc[0].weight.requires_grad


def test_unfreeze_with_an_explicit_model():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    freeze(net.backbone, "*")
    cb = Unfreeze("0.*", at_epoch=1, model=net.backbone)  # names relative to the backbone
    Trainer({"net": net}, Step(lambda b: F.mse_loss(net(b[0]), b[1]), opt), callbacks=[cb], device="cpu").fit(
        regression_loader(), epochs=2
    )
    assert [p.requires_grad for p in net.backbone.parameters()] == [True, True, False, False]


def test_a_run_resumed_after_at_epoch_starts_unfrozen():
    loader = regression_loader(shuffle=False)

    def build():
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        freeze(net, "backbone*", batchnorm="eval")  # the script freezes at start, every run
        step = Step(lambda b: F.mse_loss(net(b[0]), b[1]), opt, name="fit")
        return net, Trainer(net, step, callbacks=[Unfreeze("backbone*", at_epoch=1)], device="cpu")

    whole, trainer = build()
    trainer.fit(loader, epochs=EPOCHS)

    first, trainer = build()
    trainer.fit(loader, epochs=2)
    state = copy.deepcopy(trainer.state_dict())
    resumed, trainer = build()
    trainer.load_state_dict(state)
    trainer.fit(loader, epochs=EPOCHS)
    assert_same_weights(whole, resumed)


# ---------------------------------------------------------------- errors


def test_error_batchnorm_value():
    net = _net()
    with pytest.raises(
        ValueError,
        match=r"freeze: `batchnorm` must be 'train' \(.*\) or 'eval' \(.*trainable=False\)\. "
        r"Received: batchnorm='Eval'\. Pass batchnorm='eval'",
    ):
        freeze(net, "backbone*", batchnorm="Eval")
    with pytest.raises(TypeError, match=r"`batchnorm` must be 'train'.*Received: batchnorm=True"):
        freeze(net, "backbone*", batchnorm=True)
    assert all(p.requires_grad for p in net.parameters())  # nothing changed on error


def test_error_batchnorm_eval_freezing_part_of_a_norm_layer():
    net = _net()
    with pytest.raises(
        ValueError,
        match=r"batchnorm='eval' keeps a batch-norm layer in eval mode only when all of its parameters are "
        r"frozen, but `patterns` freezes part of 'backbone.1': \['backbone.1.weight'\] but not "
        r"\['backbone.1.bias'\]\. Received: patterns='backbone\.\*\.weight', batchnorm='eval'\. "
        r"Widen the patterns to the whole layer \(e\.g\. 'backbone\.1\.\*'\)",
    ):
        freeze(net, "backbone.*.weight", batchnorm="eval")
    assert all(p.requires_grad for p in net.parameters())
    assert freeze(net, "backbone.*.weight") == ["backbone.0.weight", "backbone.1.weight"]  # fine with "train"


@pytest.mark.parametrize("cls", [Freeze, Unfreeze])
def test_error_callback_at_epoch(cls):
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name}: `at_epoch` must be an int >= 0 .* Received: at_epoch=-1\."):
        cls("backbone*", at_epoch=-1)
    for bad in ("1", 1.0, True):
        with pytest.raises(TypeError, match=rf"{name}: `at_epoch` must be an int >= 0 .* Received: at_epoch="):
            cls("backbone*", at_epoch=bad)


@pytest.mark.parametrize("cls", [Freeze, Unfreeze])
def test_error_callback_patterns_and_model(cls):
    name = cls.__name__
    with pytest.raises(TypeError, match=rf"{name}: `patterns` must be a str .* Received: patterns=3"):
        cls(3, at_epoch=1)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module or a dict .* Received: model='net'"):
        cls("backbone*", at_epoch=1, model="net")
    with pytest.raises(
        ValueError,
        match=rf"{name}: Pattern 'bakbone\*' in `patterns` matches no parameter of `model`\. "
        r"Closest parameter names: \['backbone.0.weight'",
    ):
        cls("bakbone*", at_epoch=1, model=_net())  # checked when built, not at epoch 1


def test_error_freeze_callback_batchnorm():
    with pytest.raises(ValueError, match=r"Freeze: `batchnorm` must be 'train' .* Received: batchnorm='fixed'"):
        Freeze("backbone*", at_epoch=1, batchnorm="fixed")


def test_error_callback_pattern_checked_at_fit_start_against_the_trainers_models():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = Trainer(net, Step(lambda b: F.mse_loss(net(b[0]), b[1]), opt), callbacks=[Unfreeze("enc*", 5)])
    with pytest.raises(ValueError, match=r"Unfreeze: Pattern 'enc\*' in `patterns` matches no parameter"):
        trainer.fit(regression_loader(), epochs=1)
    assert trainer.updates == 0


def test_error_unfreezing_parameters_that_no_optimizer_holds():
    net = _net()
    freeze(net, "backbone*")
    opt = torch.optim.SGD(param_groups(net, {"head*": {}}), lr=0.1)  # leaves the frozen backbone out
    trainer = Trainer(net, Step(lambda b: F.mse_loss(net(b[0]), b[1]), opt), callbacks=[Unfreeze("backbone*", 1)])
    with pytest.raises(
        ValueError,
        match=r"Unfreeze: 4 parameter\(s\) matching `patterns` are in no optimizer of the trainer: "
        r"\['backbone.0.weight', .*\], so unfreezing them at epoch 1 would not train them\. "
        r"Received: patterns=\['backbone\*'\]\. Build the optimizer before freezing",
    ):
        trainer.fit(regression_loader(), epochs=2)
    assert trainer.updates == 0


def test_error_freeze_callback_partial_norm_checked_when_built_and_at_fit_start():
    with pytest.raises(ValueError, match=r"Freeze: batchnorm='eval' keeps a batch-norm layer .* part of '1'"):
        Freeze("0.*|1.weight", at_epoch=2, model=_net().backbone, batchnorm="eval")
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    late = Freeze("backbone.*.weight", at_epoch=2, batchnorm="eval")  # acts at epoch 2...
    trainer = Trainer(net, Step(lambda b: F.mse_loss(net(b[0]), b[1]), opt), callbacks=[late])
    with pytest.raises(ValueError, match=r"Freeze: batchnorm='eval' .* part of 'backbone.1'"):
        trainer.fit(regression_loader(), epochs=3)
    assert trainer.updates == 0  # ...but fails before the first update
    assert all(p.requires_grad for p in net.parameters())
