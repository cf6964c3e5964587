"""``Preemption``: SIGTERM or Ctrl-C stops ``fit`` cleanly at the next update boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["Preemption"]

#: the signals that ask a run to stop at the next update boundary (preemption, Ctrl-C)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Turn SIGTERM and SIGINT into ``trainer.stop("signal")`` at the next update boundary.

    During ``fit`` (in the main thread: Python delivers signals there only) the signals only
    set a flag. After the update that is running (or after the epoch's validation, when the
    signal came during it) the callback calls ``trainer.stop("signal")``, so ``fit`` returns
    normally; a :class:`~trainflow.callbacks.Checkpoint` then saves the state at
    ``on_fit_end``, and the script decides how to exit (it may exit 0: a job restarted with
    ``fit(..., resume="latest")`` ends bit-identical to one never interrupted). A signal that
    arrives when ``fit`` ends anyway (its last update) changes nothing.

    A second signal before that boundary goes to the handler from before ``fit`` (Ctrl-C twice
    interrupts at once). The previous handlers are put back when ``fit`` ends or raises.

    Example:
        >>> import signal, tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import Checkpoint, Preemption
        >>> from trainflow.checkpoint import read_index
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> class SigtermAt3:  # what a cluster's scheduler sends before it takes the machine
        ...     def on_update_end(self, trainer, step, losses):
        ...         if trainer.updates == 3:
        ...             signal.raise_signal(signal.SIGTERM)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> callbacks = [SigtermAt3(), Checkpoint(), Preemption()]
        >>> trainer = Trainer(model, Step(lambda x: model(x).pow(2).mean(), opt), callbacks=callbacks, out_dir=tmp.name)
        >>> trainer.fit([torch.ones(4, 2)] * 4, epochs=2)  # returns normally
        >>> trainer.stop_reason, trainer.updates, read_index(f"{tmp.name}/checkpoints")[-1]["reason"]
        ('signal', 3, 'signal')
        >>> tmp.cleanup()
    """

    def __init__(self) -> None:
        self.signal: int | None = None  # the signal received during the current fit, if any
        self._previous: dict[int, Any] = {}  # signal -> the handler before fit

    def on_fit_start(self, trainer: Any) -> None:
        self.signal = None
        self._install()

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        if self.signal is not None and not _finished(trainer):
            trainer.stop("signal")

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        if self.signal is not None and not _finished(trainer):  # a signal during validation
            trainer.stop("signal")

    def on_fit_end(self, trainer: Any) -> None:
        self._restore()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self._restore()

    def _install(self) -> None:
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum  # handled at the next update boundary
            return
        # a second signal: the user does not want to wait; hand it to the handler from before fit
        previous = self._previous.get(signum)
        self._restore()
        if callable(previous):
            previous(signum, frame)
        elif previous in (signal.SIG_DFL, None):
            signal.raise_signal(signum)


def _finished(trainer: Any) -> bool:
    """Whether ``fit`` ends now anyway (its epoch or update limit is reached)."""
    return (trainer.max_epochs is not None and trainer.epoch >= trainer.max_epochs) or (
        trainer.max_updates is not None and trainer.updates >= trainer.max_updates
    )
