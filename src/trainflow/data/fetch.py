"""Batched fetching: one indexing call per batch for the common ``DataLoader``.

A ``DataLoader`` over a map-style dataset, in this process, with the default collate, builds
each batch from one ``dataset[i]`` call per sample and a ``torch.stack`` per field
(``default_collate``). For the datasets whose samples are rows of tensors that is the same as
indexing the tensors once with the batch's indices, which costs a few microseconds instead of
one Python call per sample. :func:`iterate` makes the loader's own iterator (so its sampler,
its seeds and every random draw stay the loader's) and, where it can, fetches each batch
through it in one call:

- ``TensorDataset`` (trainflow's own datasets are ones): each tensor indexed once;
- ``Subset`` of a dataset that can be fetched so: its indices mapped, then that dataset's fetch;
- a dataset with ``__getitems__``: one call for the batch, then ``default_collate``, as the
  loader itself does (minus its per-batch profiler range).

The batch is bit-identical to the loader's: the same values, dtypes, shapes and structure
(``default_collate`` turns a tuple sample into a list), pinned when the loader pins. Anything
else (worker processes, a custom ``collate_fn`` or sampler output, an iterable dataset, a
dataset with its own ``__getitem__``) is iterated the loader's way, unchanged.

Under torchrun a rank reads its share of the loader (:func:`trainflow.data.sharding.shard`): a
loader over the same dataset whose batch sampler picks the rank's rows of each global batch,
collated by the default collate behind a wrapper that only adds the empty share (a rank's part
of a last global batch shorter than the world size). That share is fetched in batches as the
loader it came from would be; the empty share is still made by the wrapper.

On CUDA the batched path also copies one batch ahead: the next batch is gathered into pinned
host memory and copied on a side stream while the current update runs; the update's stream
waits for that copy before using the batch. Only rows of tensors (``TensorDataset`` and its
subsets) under samplers that draw their random numbers when the pass starts (sequential,
shuffling without replacement) are read ahead, so the draws and the batches are those of the
loader read one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, Subset, TensorDataset
from torch.utils.data import default_collate
from torch.utils.data._utils.pin_memory import pin_memory

from trainflow.data.batch import move
from trainflow.data.sharding import ShardedBatches, _EmptyAware

__all__ = ["BatchedIterator", "input_path", "iterate"]

#: fetch(indices, pinned) -> the batch; ``indices`` a LongTensor (tensor plans) or a list (list plans)
Fetch = Callable[[Any, bool], Any]


class _Plan:
    """How to fetch a batch of one dataset: ``fetch`` takes a LongTensor (``tensor=True``) or a list."""

    __slots__ = ("fetch", "tensor", "what")

    def __init__(self, fetch: Fetch, tensor: bool, what: str) -> None:
        self.fetch, self.tensor, self.what = fetch, tensor, what


def _tensor_dataset(dataset: TensorDataset) -> _Plan:
    tensors = dataset.tensors

    def fetch(idx: torch.Tensor, pinned: bool) -> list[torch.Tensor]:
        if not pinned:
            return [t.index_select(0, idx) for t in tensors]
        out = []
        for t in tensors:  # gathered straight into pinned memory, ready for an asynchronous copy
            buf = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
            out.append(torch.index_select(t, 0, idx, out=buf))
        return out

    return _Plan(fetch, True, "TensorDataset")


def _subset(dataset: Subset, inner: _Plan) -> _Plan:
    indices = dataset.indices
    if inner.tensor:
        mapped = torch.as_tensor(indices if not isinstance(indices, range) else list(indices))
        if mapped.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or mapped.ndim != 1:
            return None  # type: ignore[return-value]  # indices that only Python indexing understands
        mapped = mapped.long()
        n = len(dataset.dataset)
        mapped = torch.where(mapped < 0, mapped + n, mapped)  # Python's negative indices
        fetch = inner.fetch
        return _Plan(lambda idx, pinned: fetch(mapped.index_select(0, idx), pinned), True, f"Subset({inner.what})")
    fetch = inner.fetch
    return _Plan(lambda idx, pinned: fetch([indices[i] for i in idx], pinned), False, f"Subset({inner.what})")


def _getitems(dataset: Any) -> _Plan:
    getitems = dataset.__getitems__
    return _Plan(lambda idx, pinned: default_collate(getitems(idx)), False, f"{type(dataset).__name__}.__getitems__")


def _plan(dataset: Any, depth: int = 0) -> _Plan | None:
    """The batched fetch of ``dataset`` as the default collate would see it, or None."""
    if depth > 16:
        return None
    kind = type(dataset)
    if isinstance(dataset, TensorDataset) and kind.__getitem__ is TensorDataset.__getitem__:
        # stacking rows of a tensor laid out otherwise (channels-last images) keeps that layout,
        # which indexing would not: such datasets keep the loader's path
        if all(type(t) is torch.Tensor and t.is_contiguous() for t in dataset.tensors):
            return _tensor_dataset(dataset)
        return None
    if (isinstance(dataset, Subset) and kind.__getitem__ is Subset.__getitem__
            and getattr(kind, "__getitems__", None) is Subset.__getitems__):
        inner = _plan(dataset.dataset, depth + 1)
        return None if inner is None else _subset(dataset, inner)
    if callable(getattr(dataset, "__getitems__", None)):
        return _getitems(dataset)
    return None


def _why_not(loader: Any) -> str | None:
    """Why ``loader`` cannot be fetched in batches (None: it can, given a plan for its dataset)."""
    if not isinstance(loader, DataLoader):
        return f"a {type(loader).__name__}, not a DataLoader"
    kind = type(loader)
    if kind.__iter__ is not DataLoader.__iter__ or kind._get_iterator is not DataLoader._get_iterator:
        return f"{kind.__name__} makes its own iterator"
    if loader.num_workers != 0:
        return f"num_workers={loader.num_workers}"
    if loader._dataset_kind != torch.utils.data.dataloader._DatasetKind.Map:
        return "an iterable dataset"
    if not loader._auto_collation:
        return "batch_size=None"
    collate = loader.collate_fn
    if isinstance(collate, _EmptyAware):  # a rank's share: the default collate plus the empty share
        collate = collate.collate
    if collate is not default_collate:
        return "a custom collate_fn"
    return None


class BatchedIterator:
    """The loader's own iterator, read through a batched fetch (see the module's docstring).

    ``loader_iter`` is the ``DataLoader``'s iterator: its sampler gives the indices and its
    counters advance as they would, so a stream can fast-forward it on resume. ``device``
    (CUDA only) copies one batch ahead on a side stream.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.arange(10.0), torch.arange(10)), batch_size=4, shuffle=True)
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> theirs = [[t.tolist() for t in b] for b in loader]
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> batches = iterate(loader)
        >>> type(batches).__name__, [[t.tolist() for t in b] for b in batches] == theirs
        ('BatchedIterator', True)
    """

    __slots__ = ("loader_iter", "plan", "pin", "device", "side", "ahead", "what", "empty")

    def __init__(self, loader_iter: Any, plan: _Plan, device: torch.device | None = None) -> None:
        self.loader_iter = loader_iter
        self.plan = plan
        collate = loader_iter._collate_fn
        self.empty = collate if isinstance(collate, _EmptyAware) else None  # a rank's empty share
        self.pin = bool(loader_iter._pin_memory)
        self.device = device
        self.side = None if device is None else torch.cuda.Stream(device)
        self.ahead: Any = None  # the batch being copied on the side stream (CUDA)
        self.what = plan.what

    def __iter__(self) -> Iterator[Any]:
        return self

    def fetch(self, pinned: bool = False) -> Any:
        """The next batch from the loader's sampler, in one indexing call (StopIteration at the end)."""
        it = self.loader_iter
        index = it._next_index()  # the loader's sampler: its order, its random draws
        plan = self.plan
        if not index and self.empty is not None:  # a rank's share of a short last batch: no sample
            it._num_yielded += 1
            batch = self.empty(index)
            return pin_memory(batch) if self.pin or pinned else batch
        batch = plan.fetch(torch.tensor(index, dtype=torch.long) if plan.tensor else index, pinned and plan.tensor)
        it._num_yielded += 1
        if (self.pin or pinned) and not (pinned and plan.tensor):
            batch = pin_memory(batch)
        return batch

    def __next__(self) -> Any:
        if self.device is None:
            return self.fetch()
        # CUDA: hand out the batch copied ahead (the first one now), then start copying the next
        if self.ahead is None:
            self.ahead = self._copy()
        batch, self.ahead = self.ahead, None
        if batch is StopIteration:
            self.ahead = StopIteration
            raise StopIteration
        self.ahead = self._copy()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.side)  # the copy is done before the update reads the batch
        _record(batch, current)
        return batch

    def _copy(self) -> Any:
        try:
            host = self.fetch(pinned=True)
        except StopIteration:
            return StopIteration
        with torch.cuda.stream(self.side):
            return move(host, self.device)


def _record(batch: Any, stream: Any) -> None:
    """Tell the caching allocator that ``stream`` uses the side stream's tensors of ``batch``."""
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, (list, tuple)):
        for b in batch:
            _record(b, stream)
    elif isinstance(batch, dict):
        for b in batch.values():
            _record(b, stream)


def _reads_ahead(loader: DataLoader) -> bool:
    """Whether the sampler draws its random numbers only when a pass starts (safe to read ahead)."""
    batches = loader.batch_sampler
    if type(batches) is not BatchSampler and type(batches) is not ShardedBatches:
        return False
    sampler = batches.sampler
    return type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement)


def iterate(iterable: Iterable, device: torch.device | None = None) -> Iterator[Any]:
    """``iter(iterable)``; for a DataLoader that allows it, through a :class:`BatchedIterator`.

    ``device``: where the batches go. On CUDA a batched loader's batches arrive there already,
    copied one ahead (see the module's docstring); ``placed(iterator)`` says so.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.zeros(8, 2))
        >>> type(iterate(DataLoader(data, batch_size=4))).__name__
        'BatchedIterator'
        >>> type(iterate(DataLoader(data, batch_size=4, collate_fn=lambda s: s))).__name__
        '_SingleProcessDataLoaderIter'
    """
    if _why_not(iterable) is not None:
        return iter(iterable)
    plan = _plan(iterable.dataset)
    loader_iter = iter(iterable)
    if plan is None or type(loader_iter).__name__ != "_SingleProcessDataLoaderIter":
        return loader_iter
    # read ahead only rows of tensors: a dataset's own __getitems__ may draw random numbers, whose
    # order against the update's draws reading ahead would change
    ahead = device is not None and device.type == "cuda" and plan.tensor and _reads_ahead(iterable)
    return BatchedIterator(loader_iter, plan, device if ahead else None)


def placed(iterator: Any) -> bool:
    """Whether ``iterator`` yields batches already on their device (CUDA, copied ahead)."""
    return isinstance(iterator, BatchedIterator) and iterator.device is not None


def input_path(iterable: Any) -> str:
    """How a stream over ``iterable`` reads its batches, in words (``describe()`` shows it).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, Subset, TensorDataset
        >>> data = TensorDataset(torch.zeros(8, 2))
        >>> input_path(DataLoader(Subset(data, [0, 1, 2]), batch_size=2, shuffle=True))
        'batched: Subset(TensorDataset) indexed once per batch'
        >>> input_path(DataLoader(data, batch_size=2, num_workers=2))
        "the loader's own iterator (num_workers=2)"
    """
    why = _why_not(iterable)
    if why is None:
        plan = _plan(iterable.dataset)
        if plan is not None:
            how = "called once per batch, then default_collate" if plan.what.endswith("__getitems__") else \
                "indexed once per batch"
            batches = iterable.batch_sampler
            share = (f", rank {batches.rank}'s rows of each global batch of {batches.world_size} ranks"
                     if isinstance(batches, ShardedBatches) else "")
            return f"batched: {plan.what} {how}{share}"
        why = f"{type(iterable.dataset).__name__} is read one sample at a time"
    if not isinstance(iterable, DataLoader):
        return f"iterated as given ({why})"
    return f"the loader's own iterator ({why})"
