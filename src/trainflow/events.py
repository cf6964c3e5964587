"""The trainer's timeline: a small set of events, and callbacks checked when registered.

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
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["EVENTS", "Events"]

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


class Events:
    """Callbacks, grouped by event in registration order, each checked when added.

    Example:
        >>> class Printer:
        ...     def on_epoch_end(self, trainer, logs):
        ...         print("epoch done", logs)
        >>> events = Events([Printer()])
        >>> events.fire("on_epoch_end", None, {"loss": 0.5})
        epoch done {'loss': 0.5}
    """

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
            raise TypeError(
                "Trainer: `callbacks` must be a list of callback objects. "
                f"Received: callbacks={callbacks!r}. Wrap a single callback in a list: callbacks=[cb]."
            )
        self.callbacks: list[Any] = []
        self.handlers: dict[str, list[Callable]] = {name: [] for name in EVENTS}
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: Any) -> None:
        """Register ``callback``'s event methods, checking names and signatures now."""
        if isinstance(callback, type):  # its methods would be unbound: "on_epoch_end must accept 2 ..."
            raise TypeError(
                f"Trainer: a callback must be an object, not a class. Received: the class {callback.__name__}. "
                f"Pass an instance: {callback.__name__}(...)."
            )
        found = False
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
            self.handlers[attr].append(fn)
            found = True
        if not found:
            raise TypeError(
                f"Trainer: callback {callback!r} has no event methods. "
                f"Expected an object with any of: {', '.join(EVENTS)}."
            )
        self.callbacks.append(callback)

    def fire(self, event: str, trainer: Any, *args: Any) -> None:
        """Call every handler of ``event`` in registration order."""
        for fn in self.handlers[event]:
            fn(trainer, *args)


def _params(event: str) -> str:
    return {
        "on_update_end": "trainer, step, losses",
        "on_validation_end": "trainer, logs",
        "on_epoch_end": "trainer, logs",
        "on_exception": "trainer, error",
    }.get(event, "trainer")
