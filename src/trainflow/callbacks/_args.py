"""Argument checks shared by the callbacks: errors name the argument, the value and the fix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def positive_int(owner: str, arg: str, value: Any, meaning: str, example: str) -> int:
    """``value`` as an int >= 1; TypeError for a non-int, ValueError for one below 1."""
    expected = f"{owner}: `{arg}` must be an int >= 1 ({meaning})."
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{expected} Received: {arg}={value!r} of type {type(value).__name__}. Pass e.g. {example}.")
    if value < 1:
        raise ValueError(f"{expected} Received: {arg}={value!r}. Pass e.g. {example}.")
    return value


def number(owner: str, arg: str, value: Any, *, positive: bool, meaning: str, example: str) -> float:
    """``value`` as a finite float that is > 0 (``positive``) or >= 0."""
    bound = "> 0" if positive else ">= 0"
    expected = f"{owner}: `{arg}` must be a finite number {bound} ({meaning})."
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{expected} Received: {arg}={value!r} of type {type(value).__name__}. Pass e.g. {example}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{expected} Received: {arg}={value!r}. Pass e.g. {example}.")
    return float(value)


def optional_path(owner: str, arg: str, value: Any, default: str) -> Path | None:
    """``value`` as a Path, or None to use the default under the trainer's ``out_dir``."""
    if value is None or isinstance(value, (str, Path)):
        return None if value is None else Path(value)
    raise TypeError(
        f"{owner}: `{arg}` must be a path (str or pathlib.Path) or None. "
        f"Received: {arg}={value!r} of type {type(value).__name__}. "
        f"Pass e.g. {arg}='runs/exp/{default}', or None to write <out_dir>/{default}."
    )


def output_path(owner: str, arg: str, value: Path | None, trainer: Any, default: str) -> Path:
    """Where to write: ``value`` if given, else ``<trainer.out_dir>/<default>``; the folder is created."""
    out_dir = getattr(trainer, "out_dir", None)
    if value is None and out_dir is None:
        raise ValueError(
            f"{owner}: no place to write: `{arg}` is None and the trainer has no `out_dir`. "
            f"Received: {arg}=None, trainer.out_dir=None. Pass {owner}({arg}='runs/exp/{default}'), "
            "or give the trainer an output folder: Trainer(..., out_dir='runs/exp')."
        )
    path = value if value is not None else Path(out_dir) / default
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
