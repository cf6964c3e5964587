"""``Freeze`` / ``Unfreeze``: change which parameters train at the start of a given epoch.

Fine-tuning often trains the new head first and unfreezes the backbone later. The trainer
asks every update which of a step's parameters need gradients, so flipping
``requires_grad`` between epochs is all it takes, provided the optimizer already holds the
parameters: build the optimizer over every parameter (or with ``param_groups``) *before*
freezing. A frozen parameter in an optimizer gets no gradient, and torch optimizers skip
parameters without one (no momentum, no weight decay) until it is unfrozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from trainflow.params import (
    KEEP_EVAL,
    _listing,
    _short,
    check_batchnorm,
    check_patterns,
    match,
    toggle,
)

__all__ = ["Freeze", "Unfreeze"]


def _epoch(owner: str, value: Any) -> int:
    expected = f"{owner}: `at_epoch` must be an int >= 0 (the epoch, counted from 0, at whose start it acts)."
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{expected} Received: at_epoch={value!r} of type {type(value).__name__}. Pass e.g. at_epoch=1.")
    if value < 0:
        raise ValueError(f"{expected} Received: at_epoch={value!r}. Pass e.g. at_epoch=1 for the second epoch.")
    return value


class _Toggle:
    """Set ``requires_grad`` of the parameters matching ``patterns`` when epoch ``at_epoch`` starts."""

    trainable: bool  # what the parameters become

    def __init__(
        self, patterns: str | list[str], at_epoch: int, model: Any, batchnorm: str
    ) -> None:
        owner = type(self).__name__
        self.patterns = check_patterns(patterns, owner=owner)
        self.at_epoch = _epoch(owner, at_epoch)
        self.batchnorm = check_batchnorm(batchnorm, owner=owner)
        self.model = model
        if model is not None:
            self._toggle(model, apply=False)  # a bad model or a typo fails here, not at epoch N

    def _target(self, trainer: Any) -> nn.Module | Mapping[str, nn.Module]:
        if self.model is not None:
            return self.model
        # the trainer's own naming: a single model unprefixed, a dict as "<key>.<name>"
        return trainer.model_tree

    def _toggle(self, target: Any, *, apply: bool) -> list[nn.Module]:
        return toggle(
            target, self.patterns, trainable=self.trainable,
            batchnorm=self.batchnorm, owner=type(self).__name__, apply=apply,
        )[1]

    def _check(self, trainer: Any, target: Any) -> None:
        """Checks at fit start, before any update: the patterns fit the models, and more."""
        self._toggle(target, apply=False)

    def _apply(self, trainer: Any) -> None:
        for module in self._toggle(self._target(trainer), apply=True):
            module.train(not getattr(module, KEEP_EVAL, False))  # inside fit: the modes are set

    def on_fit_start(self, trainer: Any) -> None:
        toggles = [cb for cb in trainer.events.callbacks if isinstance(cb, _Toggle)]
        if self not in toggles:
            toggles = [self]  # called by hand, not as one of the trainer's callbacks
        if toggles[0] is not self:
            return  # the first Freeze/Unfreeze of the trainer acts for all of them
        for toggle in toggles:
            toggle._check(trainer, toggle._target(trainer))
        # A run resumed (or a fit continued) past at_epoch starts in the state the
        # uninterrupted run had then: requires_grad is not part of a checkpoint. So every
        # toggle due by now acts again, in the order they acted then: by epoch, then as listed.
        for toggle in sorted(toggles, key=lambda t: t.at_epoch):
            if trainer.epoch >= toggle.at_epoch:
                toggle._apply(trainer)

    def on_epoch_start(self, trainer: Any) -> None:
        if trainer.epoch == self.at_epoch:  # also done at fit start when it starts here: idempotent
            self._apply(trainer)

    def __repr__(self) -> str:
        extra = f", batchnorm={self.batchnorm!r}" if self.batchnorm != "train" else ""
        return f"{type(self).__name__}({self.patterns!r}, at_epoch={self.at_epoch}{extra})"


class Unfreeze(_Toggle):
    """Unfreeze the parameters matching ``patterns`` at the start of epoch ``at_epoch``.

    Args:
        patterns: glob(s) over parameter names, as in :func:`trainflow.unfreeze`.
        at_epoch: the epoch (counted from 0) at whose start they become trainable:
            ``at_epoch=1`` trains them from the second epoch on.
        model: the module (or dict of modules) the names refer to; default: the trainer's
            models, named as in ``trainer.describe()`` (``"<key>.<name>"`` for a dict).

    The parameters must already be in one of the trainer's optimizers, or nothing would
    train them: ``fit`` checks this at its start. Build the optimizer before freezing
    (``param_groups`` leaves parameters that are already frozen out). Batch-norm layers
    frozen with ``batchnorm="eval"`` go back to train mode when their parameters unfreeze.
    A run resumed after ``at_epoch`` unfreezes them when ``fit`` starts; every ``Freeze`` and
    ``Unfreeze`` due by then acts again in epoch order (then list order), as they acted first.

    Example:
        >>> import torch
        >>> from trainflow import Step, Trainer, freeze
        >>> from trainflow.callbacks import Unfreeze
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)  # every parameter, frozen or not
        >>> freeze(net, "0.*")
        ['0.weight', '0.bias']
        >>> start = net[0].weight.detach().clone()
        >>> seen = []
        >>> def loss(x):
        ...     seen.append(torch.equal(net[0].weight, start))
        ...     return net(x).pow(2).mean()
        >>> trainer = Trainer(net, Step(loss, opt), callbacks=[Unfreeze("0.*", at_epoch=1)])
        >>> trainer.fit([torch.ones(4, 2)] * 2, epochs=2)
        >>> seen  # unchanged through epoch 0 and the first update of epoch 1, then trained
        [True, True, True, False]
    """

    trainable = True

    def __init__(self, patterns: str | list[str], at_epoch: int, model: Any = None) -> None:
        super().__init__(patterns, at_epoch, model, "train")

    def _check(self, trainer: Any, target: Any) -> None:
        super()._check(trainer, target)
        matched = match(target, self.patterns, owner="Unfreeze")
        held = {id(p) for opt in trainer.optimizers.values() for g in opt.param_groups for p in g["params"]}
        outside = [name for name, p in matched if id(p) not in held]
        if outside:
            raise ValueError(
                f"Unfreeze: {len(outside)} parameter(s) matching `patterns` are in no optimizer of the "
                f"trainer: {_listing(outside)}, so unfreezing them at epoch {self.at_epoch} would not "
                f"train them. Received: patterns={_short(self.patterns)}. Build the optimizer before "
                "freezing (param_groups leaves out parameters that are already frozen), e.g. "
                "opt = torch.optim.SGD(param_groups(model, rules), lr=...) and then freeze(model, ...)."
            )


class Freeze(_Toggle):
    """Freeze the parameters matching ``patterns`` at the start of epoch ``at_epoch``.

    Args:
        patterns: glob(s) over parameter names, as in :func:`trainflow.freeze`.
        at_epoch: the epoch (counted from 0) from whose start they stop training.
        model: the module (or dict of modules) the names refer to; default: the trainer's
            models, named as in ``trainer.describe()``.
        batchnorm: ``"train"`` (their batch-norm layers keep updating their running
            statistics) or ``"eval"`` (those layers switch to eval mode: statistics fixed),
            as in :func:`trainflow.freeze`.

    Example:
        >>> import torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import Freeze
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> trainer = Trainer(net, Step(lambda x: net(x).pow(2).mean(), opt),
        ...                   callbacks=[Freeze("0.*", at_epoch=1)])
        >>> trainer.fit([torch.ones(4, 2)] * 2, epochs=1)
        >>> net[0].weight.requires_grad
        True
        >>> trainer.fit([torch.ones(4, 2)] * 2, epochs=2)
        >>> net[0].weight.requires_grad
        False
    """

    trainable = False

    def __init__(
        self, patterns: str | list[str], at_epoch: int, model: Any = None, batchnorm: str = "train"
    ) -> None:
        super().__init__(patterns, at_epoch, model, batchnorm)
