"""``Trainer.describe()``: the training plan as a table a person can check before a long run."""

from __future__ import annotations

import inspect
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from trainflow.flow import Flow

__all__ = ["describe"]

_HIDDEN = {"params", "name", "initial_lr"}  # group keys that are not hyperparameters
#: implementation switches: they change speed, never the numbers, so they are shown only when set
_SWITCHES = {"foreach", "fused", "differentiable", "capturable"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer class's own defaults: its constructor's keyword defaults (``SGD``: ``momentum=0``...).

    For PyTorch's optimizers, also what the class sets itself (``AdamW``'s
    ``decoupled_weight_decay=True``), read from one built on a dummy parameter.
    """
    cls = type(optimizer)
    try:
        parameters = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):  # no signature to read: every value is shown
        return {}
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    if cls.__module__.startswith("torch.optim"):
        try:
            defaults.update(cls([torch.zeros(1, requires_grad=True)]).defaults)
        except (TypeError, ValueError, RuntimeError):  # one that needs more arguments: the signature's
            pass
    return defaults


def _same(value: Any, default: Any) -> bool:
    """``value == default``, with lists and tuples alike (``betas``) and tensors never equal."""
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return len(value) == len(default) and all(_same(v, d) for v, d in zip(value, default))
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # a value that cannot be compared is shown
        return False


def _hparams(group: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    """The group's hyperparameters that differ from ``defaults`` (all of them for None).

    ``None`` values and implementation switches left off (``foreach``, ``fused``...) are never
    shown: they change speed, not the numbers.
    """
    shown = [
        f"{k}={_fmt(v)}"
        for k, v in group.items()
        if k not in _HIDDEN and v is not None and not (k in _SWITCHES and v is False)
        and not (defaults is not None and k in defaults and _same(v, defaults[k]))
    ]
    return ", ".join(shown) if shown else "(defaults)"


def _count(n: int) -> str:
    return f"{n:,}"


def describe(
    flow: Flow,
    named: Sequence[tuple[str, torch.Tensor]],
    kept_in_eval: Sequence[str] = (),
    *,
    all_hyperparameters: bool = False,
    inputs: Mapping[str, str] | None = None,
) -> str:
    """Render the plan of ``flow`` over the models' ``named`` parameters: one row per parameter
    group of every step's optimizers (``Trainer.describe()`` passes its parts).

    Each row shows the group's name (its ``param_groups`` pattern, or the ``"name"`` given;
    ``#i`` for an unnamed group), the number of trainable parameter elements, how many of its
    tensors are frozen, and the hyperparameters that differ from the optimizer class's own
    defaults (its constructor's: ``SGD(lr=0.1)`` shows ``lr=0.1``, not ``momentum=0``), or
    ``(defaults)``; ``all_hyperparameters=True`` shows every one. Below the table: the cycle, the totals, the
    frozen parameters, the modules kept in eval mode during fit (``freeze(...,
    batchnorm="eval")``), how each data stream reads its batches (``inputs``: stream name to
    :func:`trainflow.data.fetch.input_path`; the trainer passes those of its last ``fit``), and a
    warning for trainable parameters that no step updates.

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> from trainflow.flow import Flow
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> flow = Flow([Step(lambda b: model(b).pow(2).mean(), opt, name="fit")])
        >>> text = describe(flow, list(model.named_parameters()))
        >>> "trainflow plan" in text and "SGD" in text and "lr=0.1" in text and "momentum" not in text
        True
        >>> "lr=0.1, momentum=0, dampening=0" in describe(flow, list(model.named_parameters()), all_hyperparameters=True)
        True
        >>> text = describe(flow, [], inputs={"train": "batched: TensorDataset indexed once per batch"})
        >>> [line for line in text.splitlines() if line.startswith("input")]
        ['input train: batched: TensorDataset indexed once per batch']
    """
    if not isinstance(all_hyperparameters, bool):
        raise TypeError(
            "describe: `all_hyperparameters` must be True (every hyperparameter) or False (those that differ "
            f"from the optimizer's defaults). Received: all_hyperparameters={all_hyperparameters!r} of type "
            f"{type(all_hyperparameters).__name__}. Pass e.g. all_hyperparameters=True."
        )
    table = Table(title="trainflow plan", title_justify="left", show_lines=False)
    for col in ("step", "schedule", "optimizer", "group", "params", "hyperparameters"):
        table.add_column(col, overflow="fold")
    updated: set[int] = set()
    for step in flow.steps:
        schedule = [f"x{step.repeat}", f"batch={step.batch}", f"data={'+'.join(step.streams)}"]
        if step.accumulate != 1:
            schedule.append(f"accumulate={step.accumulate}")
        if step.microbatch_size is not None:
            schedule.append(f"microbatch={step.microbatch_size}")
        if step.partial_window != "apply":
            schedule.append(f"partial_window={step.partial_window}")
        if step.clip_grad_norm is not None:
            schedule.append(f"clip={step.clip_grad_norm:g}")
        schedule += [repr(s) for s in step.schedulers]
        first = True
        for opt in step.optimizers:
            defaults = None if all_hyperparameters else _defaults(opt)
            for gi, group in enumerate(opt.param_groups):
                params = group["params"]
                trainable = [p for p in params if p.requires_grad]
                updated.update(id(p) for p in trainable)
                frozen = len(params) - len(trainable)
                count = _count(sum(p.numel() for p in trainable))
                if frozen:
                    count += f" ({frozen} frozen tensors)"
                cells = (
                    step.name if first else "",
                    " ".join(schedule) if first else "",
                    type(opt).__name__,
                    str(group.get("name", f"#{gi}")),
                    count,
                    _hparams(group, defaults),
                )
                table.add_row(*(Text(cell) for cell in cells))  # Text: brackets are not markup
                first = False
        table.add_section()
    console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False)
    console.print(table)
    # The lines below the table are plain text: never wrapped (one line per fact, easy to grep)
    # and never read as rich markup (names may contain brackets).
    lines = [f"cycle: {' '.join(s.name for s in flow.cycle)}"]
    lines += [f"input {name}: {path}" for name, path in (inputs or {}).items()]
    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    lines.append(f"parameters: {_count(total)} total, {_count(trainable)} trainable")
    frozen = [n for n, p in named if not p.requires_grad]
    if frozen:
        lines.append(f"frozen: {', '.join(frozen)}")
    if kept_in_eval:
        lines.append(f"eval mode during fit (running statistics fixed): {', '.join(kept_in_eval)}")
    idle = [n for n, p in named if p.requires_grad and id(p) not in updated]
    if idle:
        lines.append(f"WARNING: trainable parameters that no step updates: {', '.join(idle)}")
    rendered = [line.rstrip() for line in console.file.getvalue().rstrip().splitlines()]
    return "\n".join(rendered + lines) + "\n"
