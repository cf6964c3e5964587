"""Where a run is in its data: each stream's place in its pass, the last window, the random generators.

A :class:`DataPosition` is the part of a run's state that needs the data to be complete:
``state_dict()`` records where every stream is, ``load_state_dict(state)`` holds a saved
position, and :meth:`DataPosition.place` — called when ``fit`` opens the data — puts the
streams there (each pass made again under its saved random states, what was consumed skipped),
then restores the random generators. Until then, ``state_dict()`` returns the position held,
so saving a loaded, not yet resumed run loses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from trainflow import rng

if TYPE_CHECKING:
    from trainflow.data.streams import Stream
    from trainflow.step import Step

__all__ = ["DataPosition", "split_loop_state"]

#: the keys of a data position in a state written before it was a part of its own (under "loop")
_OLD_KEYS = ("in_epoch", "streams", "dataset_rng", "last_stream", "last_batches", "rng")


class DataPosition:
    """The data streams of a run, where each is, and the batches of the latest window.

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> from trainflow.data.streams import open_streams
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> step = Step(lambda b: b, opt, name="fit")
        >>> position = DataPosition()
        >>> position.place(open_streams([1, 2, 3], {"train": "fit"}, torch.device("cpu")))
        >>> position.start_epoch()
        >>> position.window(step), position.window(step)
        ([1], [2])
        >>> saved = position.state_dict()
        >>> again = DataPosition()
        >>> again.load_state_dict(saved)
        >>> again.place(open_streams([1, 2, 3], {"train": "fit"}, torch.device("cpu")))
        >>> again.window(step), again.window(step)
        ([3], None)
    """

    __slots__ = ("streams", "in_epoch", "last", "saved")

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.in_epoch = False  # a pass over "train" is under way
        self.last: dict[str, list[Any]] = {}  # the latest window, by stream (what batch="same" reuses)
        self.saved: dict[str, Any] | None = None  # a loaded position, applied by place()

    # ---------------------------------------------------------------- the loop's use

    def place(self, streams: dict[str, Stream]) -> None:
        """Go on in ``streams``: at a loaded position, in the epoch an earlier ``fit`` stopped in
        (the same data), or before a fresh epoch."""
        if self.saved is not None:
            self.check(self.saved, streams)
            self._replay(streams, self.saved)
            self.saved = None
        elif self.in_epoch and self._same_data(streams):
            return  # continue the epoch an earlier fit stopped in, with its live iterators
        else:
            self.in_epoch = False
        self.streams = streams

    def start_epoch(self) -> None:
        """A new pass over the "train" stream."""
        self.streams["train"].restart()
        self.in_epoch = True

    def end_epoch(self) -> None:
        self.in_epoch = False

    def window(self, step: Step) -> list[Any] | None:
        """The batches of ``step``'s next update; None when the "train" stream has run out.

        A step on several streams gets one dict ``{stream: batch}``, its streams drawn in order.
        """
        names = step.streams
        if step.batch == "same":
            if len(names) == 1:
                return self.last[names[0]]
            return [{name: self.last[name][0] for name in names}]
        if len(names) == 1:
            name = names[0]
            batches = self.streams[name].take(step.accumulate)
            if not batches or (len(batches) < step.accumulate and step.partial_window == "drop"):
                return None
            self.last = {name: batches}
            return batches
        batch = {}
        for name in names:
            drawn = self.streams[name].next_batch()
            if drawn is None:  # "train" ran out
                return None
            batch[name] = drawn
        self.last = {name: [drawn] for name, drawn in batch.items()}
        return [batch]

    def _same_data(self, streams: dict[str, Stream]) -> bool:
        return set(streams) == set(self.streams) and all(
            streams[n].iterable is self.streams[n].iterable for n in streams
        )

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        if self.saved is not None:  # loaded, not yet placed: where the loaded run was
            return dict(self.saved)
        return {
            "in_epoch": self.in_epoch,
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
            "dataset_rng": {  # generators a dataset keeps for itself (augmentation in __getitem__)
                name: [g.get_state() for g in rng.dataset_generators(stream.iterable)]
                for name, stream in self.streams.items()
            },
            "last_batches": {name: len(batches) for name, batches in self.last.items()},
            "rng": rng.capture(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Hold ``state`` until :meth:`place` has the data (an empty state: start afresh)."""
        self.saved = dict(state) if state else None
        self.in_epoch = False

    @staticmethod
    def check(saved: Mapping[str, Any], streams: dict[str, Stream]) -> None:
        """The data matches the streams the state was taken with: same names, batch size, batches."""
        missing = sorted(set(saved["streams"]) - set(streams))
        if missing:
            raise ValueError(
                f"fit: the state being resumed was taken with data streams {sorted(saved['streams'])}; "
                f"`data` lacks {missing}. Pass the same streams as the interrupted run."
            )
        differ = [m for name, s in saved["streams"].items() if (m := streams[name].mismatch(s)) is not None]
        if differ:
            raise ValueError(
                "fit: the data differs from the data of the state being resumed: " + "; ".join(differ) + ". "
                "Received: other data (or another batch_size) than the interrupted run's. A checkpoint says "
                "where the run was in its data, so resume with the same loaders, or start a fresh run."
            )

    def _replay(self, streams: dict[str, Stream], saved: Mapping[str, Any]) -> None:
        """Put every stream where the saved run was, then the random generators."""
        keep = _last_batches(saved)
        self.last = {}
        for name, stream_state in saved["streams"].items():
            kept = streams[name].replay(stream_state, keep.get(name, 0))
            if kept:
                self.last[name] = kept
        for name, states in saved.get("dataset_rng", {}).items():  # after the replay, which may have drawn
            for generator, state in zip(rng.dataset_generators(streams[name].iterable), states):
                generator.set_state(state)
        self.in_epoch = bool(saved["in_epoch"])
        rng.restore(saved["rng"])


def _last_batches(saved: Mapping[str, Any]) -> dict[str, int]:
    """How many batches of each stream the latest window held (older states: one stream's count)."""
    last = saved.get("last_batches", {})
    if isinstance(last, Mapping):
        return dict(last)
    stream = saved.get("last_stream")
    return {stream: int(last)} if stream is not None and last else {}


def split_loop_state(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A state written when the data position was kept under "loop", with it as its own "data" part."""
    loop = state.get("loop") if isinstance(state, Mapping) else None
    if not isinstance(loop, Mapping) or "streams" not in loop or "data" in state:
        return state
    state = dict(state)
    state["data"] = {key: loop[key] for key in _OLD_KEYS if key in loop}
    state["loop"] = {key: value for key, value in loop.items() if key not in _OLD_KEYS}
    return state
