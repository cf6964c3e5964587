"""The run's state: a dict of named stateful parts, each behind its own ``state_dict`` / ``load_state_dict``.

:class:`RunState` gathers the parts into one dict (what ``Trainer.state_dict()`` returns and a
checkpoint holds) and restores them: every part that can say why a state does not fit it
(``mismatch``) is asked first, so a state that does not fit is refused with every reason
before anything is loaded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainflow.step import Step

__all__ = ["Callbacks", "FreeParameters", "Optimizers", "RunState", "Schedules", "Stateful"]


class Stateful:
    """A part made of two functions: ``get()`` gives its state, ``set(state)`` restores it.

    >>> box = {"n": 1}
    >>> part = Stateful(lambda: dict(box), box.update)
    >>> part.load_state_dict({"n": 2}); part.state_dict()
    {'n': 2}
    """

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]) -> None:
        self.state_dict, self.load_state_dict = get, set


class Optimizers:
    """The flow's optimizers by name: the step's name, ``"<step>.<i>"`` when it has several.

    Each optimizer once, under the first step that has it.

    >>> import torch
    >>> from trainflow import Step
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> list(Optimizers([Step(lambda b: b, opt, name="fit")]).by_name)
    ['fit']
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self.by_name: dict[str, torch.optim.Optimizer] = {}
        seen: set[int] = set()
        for step in steps:
            for i, opt in enumerate(step.optimizers):
                if id(opt) not in seen:
                    seen.add(id(opt))
                    self.by_name[step.name if len(step.optimizers) == 1 else f"{step.name}.{i}"] = opt

    def state_dict(self) -> dict[str, Any]:
        return {name: o.state_dict() for name, o in self.by_name.items()}

    def types(self) -> dict[str, str]:
        """Each optimizer's class name (saved, so that a resume with another optimizer is refused)."""
        return {name: type(o).__name__ for name, o in self.by_name.items()}

    def mismatch(self, saved: Mapping[str, Any]) -> list[str]:
        """Other optimizer names than the state's."""
        if sorted(saved) != sorted(self.by_name):
            return [f"optimizers: the state has {sorted(saved)}, this trainer has {sorted(self.by_name)}"]
        return []

    def kind_mismatch(self, saved: Mapping[str, Any], types: Mapping[str, str] | None) -> list[str]:
        """Other types (SGD then, Adam now) or other parameter groups than the state's (same names)."""
        problems = []
        for name, opt in self.by_name.items():
            saved_groups = saved[name].get("param_groups", [])
            if types is not None and types.get(name) != type(opt).__name__:
                problems.append(f"optimizer {name!r} is {type(opt).__name__} here, {types.get(name)} in the state")
            elif types is None and saved_groups and opt.param_groups and (
                set(saved_groups[0]) - {"params"} != set(opt.param_groups[0]) - {"params"}
            ):  # a file from before the types were saved: other hyperparameters, another optimizer
                problems.append(
                    f"optimizer {name!r} ({type(opt).__name__}) has hyperparameters "
                    f"{sorted(set(opt.param_groups[0]) - {'params'})}, the state's "
                    f"{sorted(set(saved_groups[0]) - {'params'})}"
                )
        if problems:
            return problems
        for name, opt in self.by_name.items():
            mine = [len(g["params"]) for g in opt.param_groups]
            theirs = [len(g["params"]) for g in saved[name]["param_groups"]]
            if mine != theirs:
                problems.append(f"optimizer {name!r} has parameter groups of {mine} parameter(s), the state {theirs}")
        return problems

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, opt in self.by_name.items():
            opt.load_state_dict(state[name])


class FreeParameters:
    """Tensors an optimizer trains that are in none of the models (e.g. a learnt ``log_scale``).

    Named by their place in the optimizer: ``"<optimizer>.<group>.<index>"``.

    >>> import torch
    >>> from trainflow import Step
    >>> scale = torch.nn.Parameter(torch.zeros(1))
    >>> opts = Optimizers([Step(lambda b: b, torch.optim.SGD([scale], lr=0.1), name="fit")])
    >>> list(FreeParameters([], opts).by_name)
    ['fit.0.0']
    """

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], optimizers: Optimizers) -> None:
        in_models = {id(p) for _, p in named}
        self.by_name: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for opt_name, opt in optimizers.by_name.items():
            for g, group in enumerate(opt.param_groups):
                for i, p in enumerate(group["params"]):
                    if id(p) not in in_models and id(p) not in seen:
                        seen.add(id(p))
                        self.by_name[f"{opt_name}.{g}.{i}"] = p

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.by_name.items()}

    def mismatch(self, saved: Mapping[str, Any]) -> list[str]:
        if sorted(saved) != sorted(self.by_name):
            return [
                f"parameters outside the models: the state has {sorted(saved)}, this trainer has "
                f"{sorted(self.by_name)}"
            ]
        return [
            f"parameter {n!r} has shape {tuple(p.shape)}, the state {tuple(saved[n].shape)}"
            for n, p in self.by_name.items() if tuple(saved[n].shape) != tuple(p.shape)
        ]

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.by_name.items():
                p.copy_(state[name])


class Schedules:
    """Every step's schedules, named ``"<step>.<i>"``.

    >>> import torch
    >>> from trainflow import Step
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> list(Schedules([Step(lambda b: b, opt, name="fit", scheduler=lambda n: 0.1)]).by_name)
    ['fit.0']
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self.by_name = {f"{step.name}.{i}": s for step in steps for i, s in enumerate(step.schedulers)}

    def state_dict(self) -> dict[str, Any]:
        return {name: s.state_dict() for name, s in self.by_name.items()}

    def mismatch(self, saved: Mapping[str, Any]) -> list[str]:
        if sorted(saved) != sorted(self.by_name):
            return [f"schedulers: the state has {sorted(saved)}, this trainer has {sorted(self.by_name)}"]
        return []

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, s in self.by_name.items():
            s.load_state_dict(state[name])


class Callbacks:
    """The state of every callback that has one, keyed by a stable name.

    ``state_key`` if the callback has one, else its class name, with ``.1``, ``.2``... for the
    second, third of the same key (in list order): inserting or moving another callback
    changes no key. ``callbacks`` is read when the state is taken (callbacks may be added later).

    >>> class Count:
    ...     def __init__(self): self.n = 0
    ...     def state_dict(self): return {"n": self.n}
    ...     def load_state_dict(self, state): self.n = state["n"]
    >>> a, b = Count(), Count()
    >>> a.n = 3
    >>> states = Callbacks(lambda: [a]).state_dict()
    >>> Callbacks(lambda: [b]).load_state_dict(states); states, b.n
    ({'Count': {'n': 3}}, 3)
    """

    def __init__(self, callbacks: Callable[[], Iterable[Any]]) -> None:
        self._callbacks = callbacks

    def keyed(self) -> dict[str, Any]:
        keyed: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for cb in self._callbacks():
            if not (callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))):
                continue
            base = getattr(cb, "state_key", None)
            if not isinstance(base, str) or not base:
                base = type(cb).__name__
            n = counts[base] = counts.get(base, -1) + 1
            keyed[base if n == 0 else f"{base}.{n}"] = cb
        return keyed

    def state_dict(self) -> dict[str, Any]:
        return {key: cb.state_dict() for key, cb in self.keyed().items()}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Give each callback its saved state; warn of saved states that fit no callback, and the reverse."""
        mine = self.keyed()
        if saved and all(re.fullmatch(r"\d+:\w+", k) for k in saved):
            # a file keyed by position among stateful callbacks (older trainflow): map the positions
            by_position = {f"{i}:{type(cb).__name__}": key for i, (key, cb) in enumerate(mine.items())}
            saved = {by_position.get(k, k): v for k, v in saved.items()}
        unknown = sorted(k for k in saved if k not in mine)
        fresh = sorted(k for k in mine if k not in saved)
        for key, cb in mine.items():
            if key in saved:
                cb.load_state_dict(saved[key])
        if unknown:
            warnings.warn(
                f"The state holds callback state for {unknown}, which no callback of this trainer has (its "
                f"stateful callbacks: {sorted(mine)}): that state is not loaded. Pass the same callbacks as "
                "the interrupted run, or give a renamed one `state_key` = the old name.",
                UserWarning,
                stacklevel=4,
            )
        if fresh:
            warnings.warn(
                f"The state holds no callback state for {fresh}: they start fresh (the state has "
                f"{sorted(saved)}). Expected when a callback was added since the checkpoint was taken.",
                UserWarning,
                stacklevel=4,
            )


#: the parts a state must have; the others ("params", "metrics", "callbacks") may be absent (older files)
REQUIRED = ("models", "optimizers", "schedulers", "precision", "flow", "loop")


class RunState:
    """Named stateful parts, gathered into one dict and restored from it.

    ``parts`` maps each key of the state to its part, in the order they are restored; a part
    with ``mismatch(saved)`` is asked before anything is loaded. ``optimizers`` also saves
    the optimizers' types under ``"optimizer_types"``.

    >>> import torch
    >>> from trainflow import Step
    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opts = Optimizers([Step(lambda b: b, torch.optim.SGD([w], lr=0.1), name="fit")])
    >>> state = RunState({"optimizers": opts}, required=("optimizers",))
    >>> sorted(state.state_dict())
    ['optimizer_types', 'optimizers']
    >>> state.load_state_dict(state.state_dict())
    """

    def __init__(self, parts: Mapping[str, Any], required: Sequence[str] = REQUIRED) -> None:
        self.parts = dict(parts)
        self.required = tuple(required)

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for key, part in self.parts.items():
            state[key] = part.state_dict()
            if isinstance(part, Optimizers):
                state["optimizer_types"] = part.types()
        return state

    def mismatch(self, state: Mapping[str, Any]) -> list[str]:
        """Every reason ``state`` does not fit these parts (empty when it does)."""
        problems = []
        for key, part in self.parts.items():
            if callable(getattr(part, "mismatch", None)):
                problems += part.mismatch(state.get(key, {}))
        for key, part in self.parts.items():  # of optimizers that fit otherwise: their kinds
            if not problems and isinstance(part, Optimizers):
                problems += part.kind_mismatch(state[key], state.get("optimizer_types"))
        return problems

    def load_state_dict(self, state: Any) -> None:
        """Check the whole state, then restore every part; a ValueError naming every mismatch."""
        if not isinstance(state, Mapping) or any(p not in state for p in self.required):
            have = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                f"The state is not a trainflow Trainer state: expected the parts {list(self.required)}. "
                f"Received: {have}. Pass what Trainer.state_dict() returned (or a file written by "
                "trainflow.checkpoint.save)."
            )
        problems = self.mismatch(state)
        if problems:
            raise ValueError(
                "The state does not fit this trainer: " + "; ".join(problems) + ". Load a state saved by a "
                "trainer with the same models, steps and optimizers."
            )
        for key, part in self.parts.items():
            if key in state or key in self.required:
                part.load_state_dict(state[key])
            else:
                part.load_state_dict({})
