"""The trainer's timeline: a small set of events, callbacks checked when registered, and filters.

A callback is any object with some of these methods (each takes the trainer first):

===============================  ================================================
``on_fit_start(trainer)``        before the first update of ``fit``
``on_epoch_start(trainer)``      before each epoch's first update
``on_update_end(trainer, step, losses)``  after each optimizer update; ``losses`` maps
                                 ``"<step>/<loss>"`` to a detached tensor
``on_validation_end(trainer, logs)``  after validation; ``logs`` holds ``val/...`` values
``on_epoch_end(trainer, logs)``  after the epoch and its validation; ``logs`` holds
                                 every epoch value (loss means, train and val metrics)
``on_fit_end(trainer)``          after the last update (also when stopped early)
``on_exception(trainer, error)`` when ``fit`` raises; the error is raised again afterwards
===============================  ================================================

Within an event, callbacks run in the order they were given.

**Filters** (as ignite's ``Events.ITERATION_COMPLETED(every=100)``): a callback that acts only
every N updates or epochs says so once, when it is registered, instead of testing a counter in
its method. Its ``event_filters`` attribute maps an event to :class:`Every` ``(n)`` (call the
method when the event's counter is a multiple of ``n``) or to ``None`` (never call it):

- ``on_update_end`` counts ``trainer.updates`` (all steps);
- ``on_validation_end`` and ``on_epoch_end`` count ``trainer.epoch`` (epochs completed, the
  one just ended included).

The other events happen once per fit or per epoch start and take no filter. The filters are
checked when the callback is registered; ``Events.add(callback, filters={...})`` adds filters
to (or overrides) the callback's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["EVENTS", "FILTERED", "Events", "Every"]

#: event name -> number of positional arguments after the trainer
EVENTS: dict[str, int] = {
    "on_fit_start": 0,
    "on_epoch_start": 0,
    "on_update_end": 2,
    "on_validation_end": 1,
    "on_epoch_end": 1,
    "on_fit_end": 0,
    "on_exception": 1,
}

#: the events that take a filter -> the trainer counter the filter counts
FILTERED: dict[str, str] = {"on_update_end": "updates", "on_validation_end": "epoch", "on_epoch_end": "epoch"}


class Every:
    """A filter: the event fires the method only when its counter is a multiple of ``n``.

    Put it in a callback's ``event_filters``: ``{"on_update_end": Every(100)}`` calls
    ``on_update_end`` at updates 100, 200, ...; ``{"on_epoch_end": Every(5)}`` after epochs
    5, 10, ...

    Example:
        >>> from trainflow.events import Every
        >>> every = Every(3)
        >>> [n for n in range(1, 10) if every(n)]
        [3, 6, 9]
        >>> Every(0)
        Traceback (most recent call last):
        ...
        ValueError: Every: `n` must be an int >= 1 (fire when the counter is a multiple of n). Received: n=0. Pass e.g. Every(100).
    """

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        expected = "Every: `n` must be an int >= 1 (fire when the counter is a multiple of n)."
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{expected} Received: n={n!r} of type {type(n).__name__}. Pass e.g. Every(100).")
        if n < 1:
            raise ValueError(f"{expected} Received: n={n!r}. Pass e.g. Every(100).")
        self.n = n

    def __call__(self, count: int) -> bool:
        """Whether the event fires at ``count``."""
        return count % self.n == 0

    def __repr__(self) -> str:
        return f"Every({self.n})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Every) and other.n == self.n

    def __hash__(self) -> int:
        return hash(("Every", self.n))


def _accepts(fn: Callable, n: int) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return True
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


def _filtered(fn: Callable, counter: str, every: Every) -> Callable:
    """``fn``, called only when ``trainer.<counter>`` is a multiple of ``every.n``."""
    n = every.n
    if counter == "updates":  # the hot path: one attribute read and one modulo per update
        def handler(trainer: Any, *args: Any) -> None:
            if trainer.updates % n == 0:
                fn(trainer, *args)
    else:
        def handler(trainer: Any, *args: Any) -> None:
            if trainer.epoch % n == 0:
                fn(trainer, *args)
    handler.__wrapped__ = fn  # type: ignore[attr-defined]
    return handler


class Events:
    """Callbacks, grouped by event in registration order, each checked (and filtered) when added.

    Example:
        >>> class Printer:
        ...     def on_epoch_end(self, trainer, logs):
        ...         print("epoch done", logs)
        >>> events = Events([Printer()])
        >>> events.fire("on_epoch_end", None, {"loss": 0.5})
        epoch done {'loss': 0.5}

        A filter, given by the callback or at registration:

        >>> from types import SimpleNamespace
        >>> events = Events()
        >>> events.add(Printer(), filters={"on_epoch_end": Every(2)})
        >>> for epoch in (1, 2, 3, 4):
        ...     events.fire("on_epoch_end", SimpleNamespace(epoch=epoch), {"epoch": epoch})
        epoch done {'epoch': 2}
        epoch done {'epoch': 4}
    """

    def __init__(self, callbacks: Iterable[Any] = (), rank_zero: bool = True) -> None:
        if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
            raise TypeError(
                "Trainer: `callbacks` must be a list of callback objects. "
                f"Received: callbacks={callbacks!r}. Wrap a single callback in a list: callbacks=[cb]."
            )
        self.callbacks: list[Any] = []
        #: False on the other ranks under torchrun: callbacks with ``rank_zero_only = True`` (loggers,
        #: progress bars, sample grids) are kept (their state is the run's) but never called there
        self.rank_zero = rank_zero
        self.handlers: dict[str, list[Callable]] = {name: [] for name in EVENTS}
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Any, filters: Mapping[str, Every | None] | None = None) -> None:
        """Register ``callback``'s event methods, checking names, signatures and filters now.

        ``filters`` maps events to :class:`Every` or ``None`` (never), on top of the
        callback's own ``event_filters``.
        """
        if isinstance(callback, type):  # its methods would be unbound: "on_epoch_end must accept 2 ..."
            raise TypeError(
                f"Trainer: a callback must be an object, not a class. Received: the class {callback.__name__}. "
                f"Pass an instance: {callback.__name__}(...)."
            )
        methods: dict[str, Callable] = {}
        for attr in dir(callback):
            if not attr.startswith("on_") or not callable(getattr(callback, attr)):
                continue
            if attr not in EVENTS:
                raise ValueError(
                    f"Callback {type(callback).__name__} has a method {attr!r}, which is not an event. "
                    f"Expected one of: {', '.join(EVENTS)}. Rename it (a typo?) or drop the 'on_' prefix."
                )
            fn = getattr(callback, attr)
            n = EVENTS[attr] + 1
            if not _accepts(fn, n):
                args = "trainer" + "".join(f", arg{i}" for i in range(1, n))
                raise TypeError(
                    f"Callback {type(callback).__name__}.{attr} must accept {n} positional argument(s) "
                    f"({args}). Received: a method with signature {inspect.signature(fn)}. "
                    f"Define it as `def {attr}(self, {_params(attr)})`."
                )
            methods[attr] = fn
        if not methods:
            raise TypeError(
                f"Trainer: callback {callback!r} has no event methods. "
                f"Expected an object with any of: {', '.join(EVENTS)}."
            )
        chosen = _check_filters(callback, methods, getattr(callback, "event_filters", None), "event_filters")
        chosen.update(_check_filters(callback, methods, filters, "filters"))
        if not self.rank_zero and getattr(callback, "rank_zero_only", False):
            methods = {}  # it writes: rank 0's copy does
        for attr in EVENTS:  # in the events' order: the same as dir()'s for the names that are there
            if attr not in methods:
                continue
            if attr in chosen and chosen[attr] is None:
                continue  # filtered out entirely: never called
            fn = methods[attr]
            every = chosen.get(attr)
            self.handlers[attr].append(fn if every is None else _filtered(fn, FILTERED[attr], every))
        self.callbacks.append(callback)

    def fire(self, event: str, trainer: Any, *args: Any) -> None:
        """Call every handler of ``event`` in registration order."""
        for fn in self.handlers[event]:
            fn(trainer, *args)


def _check_filters(callback: Any, methods: dict[str, Callable], filters: Any, arg: str) -> dict[str, Every | None]:
    """``filters`` as ``{event: Every | None}``, each naming a filterable event the callback handles."""
    if filters is None:
        return {}
    owner = type(callback).__name__
    if not isinstance(filters, Mapping):
        raise TypeError(
            f"Callback {owner}: `{arg}` must map event names to Every(n) or None. "
            f"Received: {arg}={filters!r}. Pass e.g. {{'on_update_end': Every(100)}}."
        )
    for event, every in filters.items():
        if event not in FILTERED:
            raise ValueError(
                f"Callback {owner}: `{arg}` filters {event!r}, which takes no filter. "
                f"Received: {arg}={dict(filters)!r}. Filters apply to {', '.join(FILTERED)} "
                "(counting updates, epochs, epochs)."
            )
        if event not in methods:
            raise ValueError(
                f"Callback {owner}: `{arg}` filters {event!r}, but the callback has no {event} method. "
                f"Received: {arg}={dict(filters)!r}. Define {event} or drop its filter."
            )
        if every is not None and not isinstance(every, Every):
            raise TypeError(
                f"Callback {owner}: `{arg}[{event!r}]` must be Every(n) or None (never call it). "
                f"Received: {every!r} of type {type(every).__name__}. Pass e.g. Every({every if isinstance(every, int) and not isinstance(every, bool) else 100})."
            )
    return dict(filters)


def _params(event: str) -> str:
    return {
        "on_update_end": "trainer, step, losses",
        "on_validation_end": "trainer, logs",
        "on_epoch_end": "trainer, logs",
        "on_exception": "trainer, error",
    }.get(event, "trainer")
