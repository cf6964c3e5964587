"""``Trainer.describe()``: the training plan as a table a person can check before a long run."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from trainflow.trainer import Trainer

__all__ = ["describe"]

_HIDDEN = {"params", "name", "initial_lr"}  # group keys that are not hyperparameters


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _hparams(group: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={_fmt(v)}" for k, v in group.items() if k not in _HIDDEN and v is not None and v is not False
    )


def _count(n: int) -> str:
    return f"{n:,}"


def describe(trainer: Trainer) -> str:
    """Render ``trainer``'s plan: one row per parameter group of every step's optimizers.

    Below the table: frozen parameters, and a warning for trainable parameters no step updates.
    """
    table = Table(title="trainflow plan", title_justify="left", show_lines=False)
    for col in ("step", "schedule", "optimizer", "group", "params", "hyperparameters"):
        table.add_column(col, overflow="fold")
    updated: set[int] = set()
    for step in trainer.flow.steps:
        schedule = [f"x{step.repeat}", f"batch={step.batch}", f"data={step.data}"]
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
            for gi, group in enumerate(opt.param_groups):
                params = group["params"]
                trainable = [p for p in params if p.requires_grad]
                updated.update(id(p) for p in trainable)
                frozen = len(params) - len(trainable)
                count = _count(sum(p.numel() for p in trainable))
                if frozen:
                    count += f" ({frozen} frozen tensors)"
                table.add_row(
                    step.name if first else "",
                    " ".join(schedule) if first else "",
                    type(opt).__name__,
                    str(group.get("name", f"#{gi}")),
                    count,
                    _hparams(group),
                )
                first = False
        table.add_section()
    console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False)
    console.print(table)
    cycle = " ".join(s.name for s in trainer.flow.cycle)
    console.print(f"cycle: {cycle}")
    frozen = [n for n, p in trainer.named_parameters() if not p.requires_grad]
    total = sum(p.numel() for _, p in trainer.named_parameters())
    trainable = sum(p.numel() for _, p in trainer.named_parameters() if p.requires_grad)
    console.print(f"parameters: {_count(total)} total, {_count(trainable)} trainable")
    if frozen:
        console.print(f"frozen: {', '.join(frozen)}")
    idle = [n for n, p in trainer.named_parameters() if p.requires_grad and id(p) not in updated]
    if idle:
        console.print(f"WARNING: trainable parameters that no step updates: {', '.join(idle)}")
    return console.file.getvalue().rstrip() + "\n"
