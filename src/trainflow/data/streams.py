"""Named data streams: where each stream is, and when its iterators are made.

An iterator is made exactly when a hand-written loop would make one: the "train" stream's at
the start of each epoch (``for batch in loader``), any other stream's when it is first drawn
from and again each time it runs out (``it = iter(loader)`` on ``StopIteration``). A
``DataLoader`` draws its shuffle seed from the global RNG when its iterator is made and first
advanced, so making iterators at these same moments keeps runs bit-identical to such loops.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from trainflow import rng
from trainflow.data.batch import move
from trainflow.data.fetch import BatchedIterator, iterate, placed

__all__ = ["Stream", "open_streams"]

TRAIN = "train"


class Stream:
    """One named iterable, its live iterator and how many batches this pass has taken.

    To resume mid-pass, a stream records the RNG state at the two moments a ``DataLoader``
    draws from it (making the iterator, taking its first batch); :meth:`replay` makes the
    iterator again under those states and skips what was consumed, so the batches that follow
    are exactly those the interrupted run would have seen.

    Example:
        >>> import torch
        >>> train = Stream("train", [1, 2, 3], torch.device("cpu"))
        >>> train.restart()
        >>> train.take(2), train.take(2), train.take(2), train.exhausted
        ([1, 2], [3], [], True)
        >>> other = Stream("valid", [1, 2], torch.device("cpu"))  # other streams cycle
        >>> [other.next_batch() for _ in range(3)]
        [1, 2, 1]
    """

    __slots__ = (
        "name", "iterable", "device", "on_cpu", "iterator", "consumed", "exhausted", "rng_start", "rng_first", "reused",
    )

    def __init__(self, name: str, iterable: Iterable, device: torch.device) -> None:
        self.name = name
        self.iterable = iterable
        self.device = device
        self.on_cpu = device.type == "cpu"  # batches stay where the loader put them
        self.iterator: Iterator | None = None
        self.consumed = 0
        self.exhausted = False
        self.rng_start: dict[str, Any] | None = None
        self.rng_first: dict[str, Any] | None = None
        self.reused = False  # whether this pass's iterator is a persistent-workers one, made earlier

    def restart(self) -> None:
        """Begin a new pass over the data (a new epoch for "train")."""
        self.rng_start = rng.capture_torch(self.iterable)
        self.rng_first = None
        self.reused = _persistent(self.iterable) and self.iterable._iterator is not None
        self.open()
        self.consumed = 0
        self.exhausted = False

    def open(self) -> None:
        """Make this pass's iterator: the loader's own, read in batches where it can be
        (:mod:`trainflow.data.fetch`); on CUDA such batches arrive on the device already."""
        self.iterator = iterate(self.iterable, self.device)
        self.on_cpu = self.device.type == "cpu" or placed(self.iterator)

    def next_batch(self) -> Any:
        """The next batch; None when the "train" stream has run out (other streams start over)."""
        if self.exhausted:
            return None
        if self.iterator is None:
            self.restart()
        if self.rng_first is None:
            self.rng_first = rng.capture_torch(self.iterable)
        try:
            batch = next(self.iterator)
        except StopIteration:
            if self.name == TRAIN:
                self.exhausted = True
                return None
            self.restart()  # other streams cycle on their own
            self.rng_first = rng.capture_torch(self.iterable)
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ValueError(
                    f"Data stream {self.name!r} yielded no batch. Pass a non-empty iterable for it."
                ) from None
        self.consumed += 1
        return batch if self.on_cpu else move(batch, self.device)

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` batches; fewer (maybe none) when the "train" stream runs out."""
        if n == 1:  # the common case, once per update
            batch = self.next_batch()
            return [] if batch is None else [batch]
        batches = []
        for _ in range(n):
            batch = self.next_batch()
            if batch is None:
                break
            batches.append(batch)
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "exhausted": self.exhausted,
            "started": self.iterator is not None,
            "rng_start": self.rng_start,
            "rng_first": self.rng_first,
            "reused": self.reused,
            "shape": self.shape(),
            # the loader's own generators as they are now (a sampler may draw again at the end of a
            # pass, when it raises StopIteration, which skipping to the saved position does not do)
            "generators": [g.get_state() for g in rng._generators(self.iterable)],
        }

    def shape(self) -> dict[str, int | None]:
        """What a pass looks like: its number of batches and the loader's batch size (None: unknown)."""
        try:
            length = len(self.iterable)
        except TypeError:  # an iterable dataset without __len__, a generator-like iterable
            length = None
        batch_size = getattr(self.iterable, "batch_size", None)
        return {"batches": length, "batch_size": batch_size if isinstance(batch_size, int) else None}

    def mismatch(self, state: dict[str, Any]) -> str | None:
        """How this stream's shape differs from the one ``state`` was saved with (None: it does not)."""
        saved, mine = state.get("shape"), self.shape()
        if not state["started"] or saved is None:
            return None
        differ = [f"{k} {saved[k]} then, {mine[k]} now" for k in ("batches", "batch_size")
                  if saved[k] is not None and mine[k] is not None and saved[k] != mine[k]]
        return f"stream {self.name!r}: {', '.join(differ)}" if differ else None

    def replay(self, state: dict[str, Any], keep: int = 0) -> list[Any]:
        """Re-create the pass ``state`` describes; return its last ``keep`` batches (loaded)."""
        if not state["started"]:
            self.iterator = None
            return []
        rng.restore_torch(state["rng_start"], self.iterable)
        self.open()
        if state.get("reused") and _persistent(self.iterable):
            # The pass was made by resetting persistent workers' iterator, which draws only the
            # sampler's seed; a new iterator draws the workers' base seed first. Reset the new
            # one under the same state, so the sampler draws exactly what it drew then.
            rng.restore_torch(state["rng_start"], self.iterable)
            self.open()
            warnings.warn(
                f"Data stream {self.name!r} resumes after its first pass with persistent_workers=True: its "
                "worker processes are new, seeded afresh, while the interrupted run's kept drawing from the "
                "seeds of the first pass (worker generators are in no checkpoint). The batches are the same "
                "unless the dataset draws random numbers (augmentation in __getitem__). For an exact resume "
                "then, use persistent_workers=False or draw them in collate_fn.",
                UserWarning,
                stacklevel=4,
            )
        self.rng_start, self.rng_first, self.reused = state["rng_start"], state["rng_first"], bool(state.get("reused"))
        consumed = state["consumed"]
        if self.rng_first is not None:
            rng.restore_torch(self.rng_first, self.iterable)
        skip = consumed - keep
        # a map-style DataLoader in this process: advance its sampler without loading samples;
        # anything else (an iterable dataset, workers): read the batches and drop them
        loader_iter = self.iterator.loader_iter if isinstance(self.iterator, BatchedIterator) else self.iterator
        fast = _map_style_in_process(loader_iter)
        advance = loader_iter._next_index if fast else self.iterator.__next__
        for taken in range(max(skip, 0)):
            try:
                advance()
            except StopIteration:
                raise ValueError(
                    f"fit: data stream {self.name!r} yields only {taken} batch(es) now, but the state being "
                    f"resumed had taken {consumed} in this pass. Received: other data than the interrupted "
                    "run's. Resume with the same data (and batch size), or start a fresh run."
                ) from None
        if fast:
            loader_iter._num_yielded += max(skip, 0)
        kept = [next(self.iterator) for _ in range(keep)]
        for gen, saved in zip(rng._generators(self.iterable), state.get("generators", [])):
            gen.set_state(saved)
        if not self.on_cpu:
            kept = [move(b, self.device) for b in kept]
        self.consumed = consumed
        self.exhausted = state["exhausted"]
        return kept


def _persistent(iterable: Any) -> bool:
    """A DataLoader that keeps its worker processes (and their iterator) from one pass to the next."""
    return (isinstance(iterable, torch.utils.data.DataLoader) and iterable.persistent_workers
            and iterable.num_workers > 0)


def _map_style_in_process(iterator: Any) -> bool:
    """An iterator over a map-style dataset in this process: its sampler can advance without loading."""
    return (type(iterator).__name__ == "_SingleProcessDataLoaderIter" and hasattr(iterator, "_next_index")
            and getattr(iterator, "_dataset_kind", None) == torch.utils.data.dataloader._DatasetKind.Map)


def open_streams(data: Any, needed: Mapping[str, str], device: torch.device) -> dict[str, Stream]:
    """Check ``fit``'s ``data`` against the streams the steps name; wrap each in a Stream.

    ``needed`` maps each stream name to a step that draws from it (for error messages).

    Example:
        >>> import torch
        >>> streams = open_streams({"train": [1, 2], "valid": [3]}, {"train": "w", "valid": "arch"}, torch.device("cpu"))
        >>> sorted(streams), streams["valid"].next_batch()
        (['train', 'valid'], 3)
    """
    if isinstance(data, Mapping):
        streams = dict(data)
        if TRAIN not in streams:
            raise ValueError(
                f"fit: `data` must have a 'train' stream; an epoch ends when it runs out. "
                f"Received: data with streams {sorted(streams)}. Name the main stream 'train'."
            )
    else:
        streams = {TRAIN: data}
    for name, iterable in streams.items():
        if isinstance(iterable, torch.Tensor):  # iterable, but row by row: each row would be a "batch"
            raise TypeError(
                f"fit: data stream {name!r} is a tensor, which iterates row by row: each row would be one batch. "
                f"Received: a Tensor of shape {tuple(iterable.shape)}. Wrap it in a DataLoader, e.g. "
                "DataLoader(TensorDataset(x, y), batch_size=32), or pass a list of batches."
            )
        if isinstance(iterable, (str, bytes)) or not isinstance(iterable, Iterable):
            raise TypeError(
                f"fit: data stream {name!r} must be an iterable of batches (e.g. a DataLoader). "
                f"Received: stream {name!r} of type {type(iterable).__name__}. Wrap tensors in a "
                "DataLoader(TensorDataset(...))."
            )
        if isinstance(iterable, Iterator):
            raise TypeError(
                f"fit: data stream {name!r} is an iterator, which can be read only once. "
                "Pass the re-iterable object itself (the DataLoader, a list), not iter(...)."
            )
    for name, step in needed.items():
        if name not in streams:
            raise ValueError(
                f"fit: step {step!r} draws from data stream {name!r}, which `data` does not have. "
                f"Received: streams {sorted(streams)}. Pass data={{'train': ..., {name!r}: ...}} "
                f"or set Step(..., data=...) to one of them."
            )
    if TRAIN not in needed:
        raise ValueError(
            "fit: no step draws from the 'train' stream, so an epoch would never end. "
            f"Received: steps draw from {sorted(needed)}. Give at least one step data='train'."
        )
    return {name: Stream(name, iterable, device) for name, iterable in streams.items()}
