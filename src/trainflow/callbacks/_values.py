"""Loss values as floats, read with as few device syncs as possible, and as short text."""

from __future__ import annotations

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
    """A value in a log line: 4 significant digits."""
    return f"{value:.4g}"
