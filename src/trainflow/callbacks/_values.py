"""Loss values as floats, read with as few device syncs as possible, and as short text."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def floats(values: Mapping[str, Any]) -> dict[str, float]:
    """``{key: float}`` for tensors and numbers, with one read per (device, dtype) group.

    Each ``.item()`` on a CUDA tensor waits for the device; stacking the 0-dim tensors of a
    group and reading them with one ``tolist()`` waits once.
    """
    out: dict[str, float] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            groups.setdefault((value.device, value.dtype), []).append(key)
        else:
            out[key] = float(value)
    for keys in groups.values():
        read = torch.stack([values[k] for k in keys]).tolist()
        out.update(zip(keys, (float(v) for v in read)))
    return {key: out[key] for key in values}  # keep the caller's key order


def fmt(value: float) -> str:
    """A value in a log line: 4 decimals from 0.001 to 10,000, else 5 significant digits.

    Fixed decimals keep a column of epochs readable (``0.1500`` under ``0.1234``, ``1.0000``
    for a perfect accuracy), where ``%g`` would print ``0.15`` and ``1``.

    Example:
        >>> [fmt(v) for v in (0.15, 1.0, 0.0, -0.41, 44.0, 1.5e-5, 123456.0, float("nan"))]
        ['0.1500', '1.0000', '0.0000', '-0.4100', '44.0000', '1.5000e-05', '1.2346e+05', 'nan']
    """
    if value == 0 or (math.isfinite(value) and 1e-3 <= abs(value) < 1e4):
        return f"{value:.4f}"
    return f"{value:.4e}" if math.isfinite(value) else f"{value}"


def duration(seconds: float) -> str:
    """A short wall time: ``340ms`` below a second (never ``0.0s``), ``12.3s``, ``2m05s``.

    Example:
        >>> [duration(s) for s in (0.0004, 0.0123, 0.34, 1.25, 125.0)]
        ['0.4ms', '12ms', '340ms', '1.2s', '2m05s']
    """
    if seconds < 0.9995:
        ms = seconds * 1000
        return f"{ms:.1f}ms" if ms < 9.95 else f"{ms:.0f}ms"
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


class Columns:
    """Pads each named cell to the widest text it has held, so that successive lines align.

    A column only ever widens; until a value needs more room, lines are as short as they can be.

    Example:
        >>> columns = Columns()
        >>> [columns.cell("loss", text) for text in ("0.5000", "12.0000", "0.2500")]
        ['0.5000', '12.0000', ' 0.2500']
        >>> columns.cell("epoch", "3/20", left=True)
        '3/20'
    """

    def __init__(self) -> None:
        self.widths: dict[str, int] = {}

    def cell(self, key: str, text: str, *, left: bool = False, width: int = 0) -> str:
        """``text`` padded to the column's width (at least ``width``): numbers right-aligned, or ``left``."""
        room = self.widths[key] = max(self.widths.get(key, 0), len(text), width)
        return text.ljust(room) if left else text.rjust(room)
