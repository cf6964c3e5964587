"""Random number generator states: captured and restored, as plain tensors and numbers.

Everything here survives ``torch.load(..., weights_only=True)``: NumPy's state is stored as a
tensor and a tuple of plain numbers, never as pickled NumPy objects.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture", "restore", "capture_torch", "restore_torch", "dataset_generators"]


def _generators(iterable: Any) -> list[torch.Generator]:
    """The private generators of a DataLoader and its samplers (they advance on each new epoch).

    Wherever the standard samplers keep them: the loader's, its sampler's and batch sampler's,
    and those of the samplers they wrap (``BatchSampler(RandomSampler(..., generator=g))``), in
    a fixed order (loader, then depth first through ``sampler`` and ``batch_sampler``).
    """
    found: list[torch.Generator] = []
    seen: set[int] = set()

    def visit(owner: Any, depth: int) -> None:
        if owner is None or id(owner) in seen or depth > 8:
            return
        seen.add(id(owner))
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
        for attr in ("sampler", "batch_sampler"):
            visit(getattr(owner, attr, None), depth + 1)

    visit(iterable, 0)
    return found


def capture_torch(iterable: Any = None) -> dict[str, Any]:
    """torch's global CPU state, plus the private generators of ``iterable`` if it has any.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(range(6), shuffle=True, generator=torch.Generator().manual_seed(0))
        >>> state = capture_torch(loader)
        >>> first = [b.tolist() for b in loader]
        >>> restore_torch(state, loader)
        >>> first == [b.tolist() for b in loader]  # the same shuffle again
        True
    """
    return {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in _generators(iterable)],
    }


def restore_torch(state: dict[str, Any], iterable: Any = None) -> None:
    """Put back what :func:`capture_torch` returned.

    Example:
        >>> import torch
        >>> state = capture_torch()
        >>> a = torch.rand(2)
        >>> restore_torch(state)
        >>> torch.equal(a, torch.rand(2))
        True
    """
    torch.set_rng_state(state["torch"])
    for gen, s in zip(_generators(iterable), state["generators"]):
        gen.set_state(s)


def capture() -> dict[str, Any]:
    """Every global generator a training run may draw from: Python, NumPy, torch CPU and CUDA.

    Example:
        >>> import torch
        >>> state = capture()
        >>> a = torch.rand(1)
        >>> restore(state)
        >>> torch.equal(a, torch.rand(1))
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` returned.

    Example:
        >>> import random
        >>> state = capture()
        >>> a = random.random()
        >>> restore(state)
        >>> a == random.random()
        True
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def dataset_generators(iterable: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` s a DataLoader's dataset keeps as attributes (augmentation drawn in ``__getitem__``).

    Looked for on the dataset and, through wrappers such as ``Subset`` and ``ConcatDataset``
    (their ``dataset`` / ``datasets``), on the datasets inside it; each generator once, in the
    order found. A run's checkpoint holds their states, so a resumed run draws what the
    interrupted one would have drawn next.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, Subset
        >>> class Noisy(torch.utils.data.Dataset):
        ...     def __init__(self):
        ...         self.generator = torch.Generator().manual_seed(0)
        ...     def __len__(self):
        ...         return 4
        ...     def __getitem__(self, i):
        ...         return torch.randn(2, generator=self.generator)
        >>> data = Noisy()
        >>> dataset_generators(DataLoader(Subset(data, [0, 1]))) == [data.generator]
        True
    """
    found: list[torch.Generator] = []
    queue, seen = [getattr(iterable, "dataset", None)], set()
    while queue:
        dataset = queue.pop(0)
        if dataset is None or id(dataset) in seen:
            continue
        seen.add(id(dataset))
        attrs = getattr(dataset, "__dict__", {})
        for value in attrs.values():
            if isinstance(value, torch.Generator) and all(value is not g for g in found):
                found.append(value)
        queue.append(attrs.get("dataset"))
        inner = attrs.get("datasets")
        if isinstance(inner, (list, tuple)):
            queue.extend(inner)
    return found
