"""Batches as nested structures of tensors: move them, count their samples, split them.

A batch is a tensor, or a tuple / list / dict / dataclass of batches; any other leaf
(a string, a number) is carried along unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["move", "sample_count", "split"]


def _map(batch: Any, fn: Callable[[Any], Any], samples: int | None = None) -> Any:
    """Apply ``fn`` to every tensor (and, given ``samples``, every per-sample list) of ``batch``."""
    if isinstance(batch, torch.Tensor) or (samples is not None and _per_sample_list(batch, samples)):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        items = [_map(b, fn, samples) for b in batch]
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    if isinstance(batch, dict):
        return type(batch)((k, _map(v, fn, samples)) for k, v in batch.items())
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: _map(getattr(batch, f.name), fn, samples) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


def move(batch: Any, device: torch.device) -> Any:
    """Move every tensor in ``batch`` to ``device`` (non-blocking from pinned memory).

    Example:
        >>> import torch
        >>> x, y = move((torch.zeros(2), torch.ones(2)), torch.device("cpu"))
        >>> x.device.type
        'cpu'
    """
    non_blocking = device.type == "cuda"
    return _map(batch, lambda t: t.to(device, non_blocking=non_blocking))


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in ``batch`` in depth-first order, or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        children = batch.values()
    elif isinstance(batch, (list, tuple)):
        children = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        children = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return None
    for child in children:
        found = first_tensor(child)
        if found is not None:
            return found
    return None


def sample_count(batch: Any, step: str = "?") -> int:
    """The number of samples in ``batch``: the first tensor's first dimension.

    Example:
        >>> import torch
        >>> sample_count({"x": torch.zeros(5, 3), "y": torch.zeros(5)})
        5
    """
    tensor = first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            f"Step {step!r}: cannot infer how many samples the batch holds (it contains no tensor with a "
            f"batch dimension). Received: a batch of type {type(batch).__name__}. Return the loss as "
            "trainflow.Average(total, count) so the count is explicit, or put tensors in the batch."
        )
    return int(tensor.shape[0])


def split(batch: Any, size: int, step: str = "?") -> list[Any]:
    """Split ``batch`` along its first dimension into chunks of at most ``size`` samples.

    Every tensor is sliced along its first dimension, and so is a list of per-sample values
    (strings, numbers: what ``DataLoader``'s default collate makes of them). A tensor whose
    first dimension is not the batch's sample count cannot be split: that is an error.

    Example:
        >>> import torch
        >>> chunks = split((torch.arange(5), torch.arange(5) * 10), 2)
        >>> [c[0].tolist() for c in chunks]
        [[0, 1], [2, 3], [4]]
    """
    n = sample_count(batch, step)
    if n <= size:
        return [batch]
    _check_splittable(batch, n, step, "batch")
    return [_map(batch, lambda t, i=i: t[i : i + size], samples=n) for i in range(0, n, size)]


_SCALARS = (str, bytes, int, float, bool, type(None))


def _per_sample_list(batch: Any, n: int) -> bool:
    return type(batch) is list and len(batch) == n and all(isinstance(b, _SCALARS) for b in batch)


def _check_splittable(batch: Any, n: int, step: str, path: str) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0 or batch.shape[0] != n:
            raise ValueError(
                f"Step {step!r}: microbatch_size splits every tensor of the batch along its first dimension, "
                f"but {path} has shape {tuple(batch.shape)} while the batch holds {n} samples (the first "
                "tensor's first dimension). Received: a batch with a tensor that is not per sample. Keep "
                "per-batch values out of the batch (e.g. in the loss function), or put the sample dimension first."
            )
    elif _per_sample_list(batch, n):
        return
    elif isinstance(batch, (list, tuple)):
        for i, b in enumerate(batch):
            _check_splittable(b, n, step, f"{path}[{i}]")
    elif isinstance(batch, dict):
        for k, v in batch.items():
            _check_splittable(v, n, step, f"{path}[{k!r}]")
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            _check_splittable(getattr(batch, f.name), n, step, f"{path}.{f.name}")
