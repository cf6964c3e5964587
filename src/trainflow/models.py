"""The trainer's models: their names, device, compilation, train/eval modes and weights' state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["KEEP_EVAL", "Models", "named_modules", "pick_device"]

#: A module with this attribute set to True stays in eval mode during ``Trainer.fit``.
#: ``freeze(..., batchnorm="eval")`` sets it; ``Models.train`` reads it.
KEEP_EVAL = "_trainflow_keep_eval"


def named_modules(models: nn.Module | Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` with the prefixes of ``trainflow.params.named_parameters``; shared modules once.

    >>> from torch import nn
    >>> [name for name, _ in named_modules({"G": nn.Sequential(nn.Linear(2, 2))})]
    ['G', 'G.0']
    """
    if isinstance(models, nn.Module):
        return list(models.named_modules())
    seen: set[int] = set()
    named = []
    for key, module in models.items():
        for name, sub in module.named_modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                named.append((f"{key}.{name}" if name else key, sub))
    return named


def pick_device(device: Any) -> torch.device:
    """``Trainer(device=...)`` as a ``torch.device``: ``"auto"`` is CUDA when available, else the CPU.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Trainer: `device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device. "
            f"Received: device={device!r}. Use device='auto' to pick CUDA when it is available."
        ) from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (chosen.index is not None and chosen.index >= count):
            have = "no CUDA device is available" if count == 0 else f"only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            raise ValueError(
                f"Trainer: `device` names a CUDA device this machine does not have: {have}. "
                f"Received: device={device!r}. Use device='auto' (CUDA when available, else the CPU), 'cpu', "
                "or an index below torch.cuda.device_count()."
            )
    return chosen


def _as_dict(models: Any) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {"model": models}
    if isinstance(models, Mapping) and models:
        for name, m in models.items():
            if not isinstance(name, str) or not isinstance(m, nn.Module):
                raise TypeError(
                    "Trainer: `models` must map names to nn.Modules. "
                    f"Received: models[{name!r}] of type {type(m).__name__}. Pass e.g. {{'G': gen, 'D': disc}}."
                )
        return dict(models)
    raise TypeError(
        "Trainer: `models` must be an nn.Module or a non-empty dict of named nn.Modules. "
        f"Received: models of type {type(models).__name__}. Pass the model, or {{'G': gen, 'D': disc}}."
    )


class Models:
    """The models a trainer trains, by name: placed on a device, compiled on request.

    ``models`` is an ``nn.Module`` (named ``"model"``) or a dict of named modules; ``tree``
    is what was given (parameters are named from it, as in ``describe()``).

    Example:
        >>> import torch
        >>> models = Models({"G": torch.nn.Linear(2, 2), "D": torch.nn.Linear(2, 1)}, torch.device("cpu"))
        >>> list(models.by_name), sorted(models.state_dict())
        (['G', 'D'], ['D', 'G'])
    """

    def __init__(self, models: nn.Module | Mapping[str, nn.Module], device: torch.device, compile: bool = False) -> None:
        if not isinstance(compile, bool):
            raise TypeError(f"Trainer: `compile` must be True or False. Received: compile={compile!r}.")
        self.compiled = compile  # whether the trainer compiles (its steps' updates too)
        self.by_name = _as_dict(models)
        #: the models as given: the module itself, or the dict (for naming parameters)
        self.tree: nn.Module | dict[str, nn.Module] = models if isinstance(models, nn.Module) else self.by_name
        for model in self.by_name.values():
            model.to(device)
            if compile:  # in a region of its own, as the steps' functions (trainflow.compiled): a process's
                # ninth model of a class compiles like the first instead of silently running eagerly
                from trainflow.compiled import region_options

                model.compile(**region_options())

    def kept_in_eval(self) -> list[str]:
        """The modules that stay in eval mode during fit (``freeze(..., batchnorm="eval")``)."""
        return [n for n, m in named_modules(self.tree) if getattr(m, KEEP_EVAL, False)]

    def batchnorms_in_train(self, params: Any) -> dict[str, list[str]]:
        """Per model owning some of ``params``: its batch-norm layers that train mode normalises per batch."""
        owned = {id(p) for p in params}
        out = {}
        for name, model in self.by_name.items():
            if any(id(p) in owned for p in model.parameters()):
                norms = [n for n, m in model.named_modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, KEEP_EVAL, False)]
                if norms:
                    out[name] = norms
        return out

    @contextmanager
    def mode(self, training: bool) -> Iterator[None]:
        """Train mode (modules marked ``KEEP_EVAL`` stay in eval) or eval mode; every module's mode
        is restored afterwards."""
        modes = [(m, m.training) for model in self.by_name.values() for m in model.modules()]
        try:
            for model in self.by_name.values():
                model.train(training)
                if training:
                    for module in model.modules():
                        if getattr(module, KEEP_EVAL, False):
                            module.eval()
            yield
        finally:
            for module, was in modes:
                module.training = was

    def state_dict(self) -> dict[str, Any]:
        return {name: m.state_dict() for name, m in self.by_name.items()}

    def mismatch(self, state: Mapping[str, Any]) -> list[str]:
        """What keeps ``state`` from loading into these models (missing or extra models, keys, shapes)."""
        problems = []
        for name, model in self.by_name.items():
            if name not in state:
                problems.append(f"model {name!r} is not in the state (it has {sorted(state)})")
            else:
                problems += _model_mismatch(name, model, state[name])
        problems += [f"the state has a model {n!r} this trainer lacks" for n in state if n not in self.by_name]
        return problems

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        problems = self.mismatch(state)
        if problems:
            raise ValueError(
                "The state does not fit these models: " + "; ".join(problems) + ". Load a state saved with "
                "the same models."
            )
        for name, model in self.by_name.items():
            model.load_state_dict(state[name])


def _model_mismatch(name: str, model: nn.Module, saved: Mapping[str, Any]) -> list[str]:
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in mine.items()
        if k in saved and isinstance(v, torch.Tensor) and tuple(saved[k].shape) != tuple(v.shape)
    ]
    out = []
    if missing:
        out.append(f"model {name!r} missing keys {missing[:8]}")
    if unexpected:
        out.append(f"model {name!r} unexpected keys {unexpected[:8]}")
    if shapes:
        out.append(f"model {name!r} shape mismatches (saved vs model) {shapes[:8]}")
    return out
