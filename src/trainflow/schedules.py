"""Hyperparameter schedules: any hyperparameter of any parameter group, per update or per epoch.

A schedule is either a ``torch.optim.lr_scheduler`` object or a function of progress. A
function ``f(t)`` gives the value used during the step's ``t``-th update (``interval="update"``,
counted from 0 for this step alone) or during epoch ``t`` (``interval="epoch"``). It sets
``key`` ("lr", "momentum", "weight_decay", "betas", ...) in every group of the step's
optimizers, or in the groups whose ``"name"`` matches ``groups`` (glob, ``|`` alternatives).

Schedules are never stepped per micro-batch: once per update or once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch

__all__ = ["Schedule"]

INTERVALS = ("update", "epoch")


def _group_name(optimizer: torch.optim.Optimizer, index: int) -> str:
    return str(optimizer.param_groups[index].get("name", f"#{index}"))


class Schedule:
    """A hyperparameter schedule for a :class:`~trainflow.Step`.

    Args:
        schedule: a function ``f(t) -> value``, or a ``torch.optim.lr_scheduler`` object
            (built on the step's optimizer) that is stepped at each interval.
        interval: ``"update"`` (after each of the step's updates) or ``"epoch"`` (after each epoch).
        key: the group entry a function sets (default ``"lr"``).
        groups: glob over group names (``param_groups`` names them); default: every group.

    Example: seed 003's linear learning-rate decay, one value per epoch.

        >>> import torch
        >>> from trainflow import Schedule, Step
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
        >>> decay = Schedule(lambda epoch: 0.05 * (1 - epoch / 10), interval="epoch")
        >>> step = Step(lambda b: model(b).mean(), opt, scheduler=decay)
        >>> opt.param_groups[0]["lr"]
        0.05
        >>> decay.step()  # the trainer does this at each epoch end
        >>> round(opt.param_groups[0]["lr"], 6)
        0.045
    """

    def __init__(
        self,
        schedule: Callable[[int], Any] | Any,
        *,
        interval: str = "update",
        key: str = "lr",
        groups: str | None = None,
    ) -> None:
        if interval not in INTERVALS:
            raise ValueError(
                f"Schedule: `interval` must be one of {INTERVALS}. Received: interval={interval!r}. "
                "Use 'update' to change the value after each update, 'epoch' after each epoch."
            )
        is_scheduler = callable(getattr(schedule, "step", None))
        if not is_scheduler and not callable(schedule):
            raise TypeError(
                "Schedule: `schedule` must be a function of progress f(t) -> value or a "
                f"torch.optim.lr_scheduler object. Received: schedule={schedule!r} of type {type(schedule).__name__}. "
                "Pass e.g. lambda t: 0.1 * 0.95 ** t."
            )
        if is_scheduler and (key != "lr" or groups is not None):
            raise ValueError(
                "Schedule: `key` and `groups` apply to function schedules only; a torch scheduler "
                f"sets what it was built for. Received: key={key!r}, groups={groups!r}. Drop them."
            )
        if not isinstance(key, str):
            raise TypeError(f"Schedule: `key` must be a group entry name such as 'lr'. Received: key={key!r}.")
        self.schedule = schedule
        self.interval = interval
        self.key = key
        self.groups = groups
        self.count = 0
        self._targets: list[tuple[torch.optim.Optimizer, int]] = []

    @property
    def is_function(self) -> bool:
        return not callable(getattr(self.schedule, "step", None))

    def bind(self, optimizers: Sequence[torch.optim.Optimizer], step: str) -> None:
        """Attach to the step's optimizers: check the groups and set the value for t=0."""
        if not self.is_function:
            owner = getattr(self.schedule, "optimizer", None)
            if owner is not None and all(owner is not opt for opt in optimizers):
                raise ValueError(
                    f"Step {step!r}: its scheduler was built on an optimizer that the step does not update, so "
                    f"stepping it would change nothing the step trains. Received: a scheduler of type "
                    f"{type(self.schedule).__name__} on an optimizer of type {type(owner).__name__} "
                    "that is not among the step's optimizers. "
                    "Build the scheduler on one of this step's optimizers, or give it to the step that owns it."
                )
            return
        # Targets are (optimizer, group index): optimizer.load_state_dict replaces the group
        # dicts, so dicts held from here would go stale after a resume.
        slots = [(opt, i) for opt in optimizers for i in range(len(opt.param_groups))]
        if self.groups is not None:
            names = [_group_name(opt, i) for opt, i in slots]
            alternatives = [a.strip() for a in self.groups.split("|")]
            slots = [s for s, n in zip(slots, names) if any(fnmatchcase(n, a) for a in alternatives)]
            if not slots:
                raise ValueError(
                    f"Step {step!r}: Schedule(groups={self.groups!r}) matches no parameter group. "
                    f"Received: groups named {names}. Name groups with trainflow.param_groups, or fix the pattern."
                )
        missing = [_group_name(opt, i) for opt, i in slots if self.key not in opt.param_groups[i]]
        if missing:
            keys = sorted({k for opt, i in slots for k in opt.param_groups[i] if k != "params"})
            raise ValueError(
                f"Step {step!r}: Schedule(key={self.key!r}) is not a hyperparameter of group(s) {missing}. "
                f"Received: key={self.key!r}; the groups have {keys}. Use one of them."
            )
        self._targets = slots
        self._apply()

    def _apply(self) -> None:
        value = self.schedule(self.count)
        for opt, i in self._targets:
            opt.param_groups[i][self.key] = value

    def step(self) -> None:
        """Advance one interval (called by the trainer after each update or epoch)."""
        self.count += 1
        if self.is_function:
            self._apply()
        else:
            self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"count": self.count}
        if not self.is_function:
            state["scheduler"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        if self.is_function:
            if self._targets:
                self._apply()
        else:
            self.schedule.load_state_dict(state["scheduler"])

    def __repr__(self) -> str:
        what = getattr(self.schedule, "__name__", type(self.schedule).__name__)
        return f"Schedule({what}, interval={self.interval!r}, key={self.key!r})"
