"""World-size-invariant sharding of a plain DataLoader: rank r takes rows r, r+W, ... of each global batch.

With W ranks and a loader of ``batch_size=B`` (per rank, as with DDP), a global batch is the
next ``W*B`` indices the loader's own sampler yields, in order; rank ``r`` loads rows
``r::W`` of it. The union of the ranks' batches is then exactly the batch one process would
load with ``batch_size=W*B``, and nothing is padded: a last global batch of fewer than W
samples leaves some ranks an empty batch (no sample is trained twice, unlike
``DistributedSampler``, which pads with the first samples). Every rank yields the same number of
batches, so every rank's epoch ends at the same update.

A sampler that draws its shuffle seed from the global torch generator (``shuffle=True``
without ``generator=``) draws it with rank 0's generator on every rank, so every rank draws
the same order, which is the order one process with the same seed would draw.

A share keeps the loader's dataset and collate function; its collate wrapper only makes the
empty share. So a share of a loader that :mod:`trainflow.data.fetch` reads in one indexing call
per batch is read that way too, with the same batches as the share's own per-sample path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from trainflow.data.batch import _map

__all__ = ["ShardedBatches", "shard"]


class ShardedBatches(Sampler[list[int]]):
    """The index batches of one rank: the ``sampler``'s order in global batches of
    ``batch_size * world_size``, of which this rank takes rows ``rank::world_size``.

    Args:
        sampler: the loader's sampler (its order is the global order).
        batch_size: the per-rank batch size ``B``.
        drop_last: drop a last global batch of fewer than ``B * world_size`` indices.
        rank, world_size: this rank and the number of ranks.
        shared_rng: a context under which the sampler draws its first value (its shuffle seed),
            e.g. one that lends every rank rank 0's generator; None: the sampler draws as it is.

    Example:
        >>> [b for b in ShardedBatches(range(7), 2, False, rank=1, world_size=2)]
        [[1, 3], [5]]
        >>> [b for b in ShardedBatches(range(7), 2, False, rank=0, world_size=2)]
        [[0, 2], [4, 6]]
    """

    def __init__(
        self,
        sampler: Any,
        batch_size: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        shared_rng: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.shared_rng = shared_rng

    def __iter__(self) -> Iterator[list[int]]:
        size = self.batch_size * self.world_size
        order = iter(self.sampler)
        draws = self.shared_rng is not None and getattr(self.sampler, "generator", False) is None
        with self.shared_rng() if draws else nullcontext():
            first = next(order, None)  # a random sampler draws its seed here
        if first is None:
            return
        batch = [first]
        for index in order:
            batch.append(index)
            if len(batch) == size:
                yield batch[self.rank :: self.world_size]
                batch = []
        if batch and not self.drop_last:
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        n = len(self.sampler)
        return n // size if self.drop_last else math.ceil(n / size)


class _EmptyAware:
    """The loader's collate function; an empty share (a rank's part of a short last batch) is
    collated as the dataset's first sample, cut to no rows, so it has the batch's structure."""

    def __init__(self, collate: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate = collate
        self.dataset = dataset

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            return self.collate(samples)
        return _map(self.collate([self.dataset[0]]), lambda t: t[:0], samples=1)


def shard(
    loader: DataLoader, rank: int, world_size: int, shared_rng: Callable[[], AbstractContextManager] | None = None
) -> DataLoader:
    """Rank ``rank``'s share of ``loader``: the same dataset, sampler, collate function and
    workers, batched by :class:`ShardedBatches`. A loader with a ``DistributedSampler`` is
    already sharded and is returned as it is (with a warning: that sampler pads).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.arange(5)), batch_size=2)
        >>> [b[0].tolist() for b in shard(loader, rank=1, world_size=2)]
        [[1, 3], []]
    """
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "fit: under torchrun every rank must read its own part of the data, but this DataLoader reads an "
            f"IterableDataset ({type(loader.dataset).__name__}), which trainflow cannot shard. Received: a "
            "DataLoader over an IterableDataset. Use a map-style dataset (with __getitem__ and __len__), which "
            "is sharded so that the ranks' batches together are one process's batches."
        )
    if isinstance(loader.sampler, DistributedSampler):
        warnings.warn(
            "fit: the DataLoader has a DistributedSampler, which is kept as it is: it pads the data to a "
            "multiple of the world size by repeating its first samples (trained twice per epoch), and needs "
            "sampler.set_epoch(epoch) every epoch to reshuffle. A plain DataLoader is sharded without padding.",
            UserWarning,
            stacklevel=4,
        )
        return loader
    if loader.batch_size is None:
        raise ValueError(
            "fit: under torchrun trainflow shards a DataLoader by its batch_size, but this one has a "
            "batch_sampler (batch_size=None). Received: DataLoader(batch_sampler=...). Pass batch_size= and "
            "sampler= instead, or a DistributedSampler of your own."
        )
    batches = ShardedBatches(loader.sampler, loader.batch_size, loader.drop_last, rank, world_size, shared_rng)
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_EmptyAware(loader.collate_fn, loader.dataset),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order,
    )


def is_sharded(loader: Any) -> bool:
    """Whether ``loader`` is a share made by :func:`shard`.

    Example:
        >>> is_sharded([1, 2])
        False
    """
    return isinstance(getattr(loader, "batch_sampler", None), ShardedBatches)


def empty(batch: Any) -> bool:
    """Whether ``batch`` holds no sample (a rank's share of a short last batch).

    Example:
        >>> import torch
        >>> empty((torch.zeros(0, 3), torch.zeros(0))), empty(torch.ones(2))
        (True, False)
    """
    from trainflow.data.batch import first_tensor

    t = first_tensor(batch)
    return t is not None and t.ndim > 0 and t.shape[0] == 0

