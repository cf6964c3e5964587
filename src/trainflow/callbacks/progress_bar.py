"""``ProgressBar``: a rich progress bar per epoch in a terminal, one plain line per epoch elsewhere."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from trainflow.callbacks._args import number
from trainflow.callbacks._values import Columns, duration, floats, fmt

__all__ = ["ProgressBar", "is_terminal"]


def summary(trainer: Any, logs: dict[str, float], seconds: float, columns: Columns | None = None) -> str:
    """One epoch as a line: ``epoch 3/20   updates 84   D/loss 0.6120  val/acc 0.9530  (1.2s)``.

    Values have 4 decimals (see ``fmt``); the time is in ms below a second. With the same
    ``columns`` for every epoch of a run, the columns of successive lines align: the counters
    are padded to the width of their final value (``20/20``, and the updates at the end of
    the run when the epoch limit tells), each value to the widest it has been.

    Example:
        >>> from types import SimpleNamespace
        >>> columns = Columns()
        >>> for epoch, loss in ((9, 12.5), (10, 0.25)):
        ...     trainer = SimpleNamespace(epoch=epoch, max_epochs=10, updates=9 * epoch, max_updates=None)
        ...     print(summary(trainer, {"D/loss": loss, "val/acc": 1.0}, 0.0421, columns))
        epoch 9/10   updates 81  D/loss 12.5000  val/acc 1.0000  (42ms)
        epoch 10/10  updates 90  D/loss  0.2500  val/acc 1.0000  (42ms)
    """
    columns = columns if columns is not None else Columns()
    max_epochs, max_updates = getattr(trainer, "max_epochs", None), getattr(trainer, "max_updates", None)
    of = f"/{max_epochs}" if max_epochs else ""
    epoch = columns.cell("epoch", f"{trainer.epoch}{of}", left=True, width=len(f"{max_epochs}{of}") if of else 0)
    final = max_updates
    if max_epochs and trainer.epoch > 0:  # this many updates at the end, if epochs keep their length
        final = max(final or 0, math.ceil(trainer.updates * max_epochs / trainer.epoch))
    updates = columns.cell("updates", str(trainer.updates), left=True, width=len(str(final)) if final else 0)
    values = "".join(f"  {key} {columns.cell(key, fmt(v))}" for key, v in logs.items())
    return f"epoch {epoch}  updates {updates}{values}  ({duration(seconds)})"


def is_terminal() -> bool:
    """Whether standard output is a terminal (rich's test: it also honours FORCE_COLOR and TTY_COMPATIBLE).

    Example:
        >>> is_terminal()  # under a test runner, output is captured
        False
    """
    return Console().is_terminal


class ProgressBar:
    """A progress bar for each epoch, with the update count and the latest losses.

    In a terminal, a rich bar counts the epoch's train batches (out of the epoch length when
    the data has one); its text is refreshed at most ``refresh_per_second`` times a second,
    which is also the only time the loss values are read from the device. Each finished epoch
    leaves one summary line above the bar. When the console is not a terminal (a log file,
    CI, pytest) there is no bar: only the summary line per epoch,
    ``epoch 3/20   updates 84   D/loss 0.6120  val/acc 0.9530  (1.2s)``, whose columns align
    from one epoch to the next (see :func:`summary`).

    Args:
        refresh_per_second: how often the bar and its text are redrawn.
        console: the ``rich.console.Console`` to draw on (default: a new one on stdout).

    Attributes:
        progress: the running ``rich.progress.Progress`` while ``fit`` draws a bar, else None.

    Example:
        >>> import io, torch
        >>> from rich.console import Console
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import ProgressBar
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()
        >>> out = io.StringIO()  # a file, not a terminal: one line per epoch
        >>> bar = ProgressBar(console=Console(file=out, force_terminal=False))
        >>> Trainer(model, [Step(l2, opt)], callbacks=[bar]).fit(data, epochs=2)
        >>> print(out.getvalue(), end="")  # doctest: +ELLIPSIS
        epoch 1/2  updates 4  l2/loss 0.0000  (...s)
        epoch 2/2  updates 8  l2/loss 0.0000  (...s)
    """

    #: under torchrun only rank 0 calls it: it writes (see trainflow.distributed)
    rank_zero_only = True

    def __init__(self, refresh_per_second: float = 4, console: Console | None = None) -> None:
        self.refresh_per_second = number(
            "ProgressBar", "refresh_per_second", refresh_per_second,
            positive=True, meaning="redraws per second", example="refresh_per_second=4",
        )
        if console is not None and not isinstance(console, Console):
            raise TypeError(
                "ProgressBar: `console` must be a rich.console.Console or None (a new console on stdout). "
                f"Received: console={console!r} of type {type(console).__name__}. "
                "Pass e.g. console=rich.console.Console(stderr=True)."
            )
        self.console = console if console is not None else Console()
        self.progress: Progress | None = None
        self._task: TaskID | None = None
        self._latest: dict[str, Any] = {}
        self._next_redraw = 0.0
        self._epoch_start = time.monotonic()
        self._columns = Columns()

    def on_fit_start(self, trainer: Any) -> None:
        self._epoch_start = time.monotonic()
        self._next_redraw = 0.0
        self._columns = Columns()  # the epoch lines of one fit align
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                # erased when fit ends: a run stopped mid-epoch (Ctrl-C, a signal, an error) would
                # otherwise leave its last, stale frame on screen; the summary lines stay
                transient=True,
            )
            self.progress.start()

    def on_epoch_start(self, trainer: Any) -> None:
        self._epoch_start = time.monotonic()
        if self.progress is not None:
            self._new_task(self.progress, trainer)

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        if self.progress is None:
            return
        self._latest.update(losses)
        now = time.monotonic()  # the hot path: the values are read only when the text is redrawn
        if now < self._next_redraw:
            return
        self._next_redraw = now + 1.0 / self.refresh_per_second
        if self._task is None:  # fit resumed inside an epoch an earlier fit stopped in
            self._new_task(self.progress, trainer)
        values = "".join(f"  {key} {fmt(v)}" for key, v in floats(self._latest).items())
        self.progress.update(
            self._task,
            completed=trainer.epoch_progress[0],
            description=f"epoch {trainer.epoch + 1}  updates {trainer.updates}{values}",
        )
        self.progress.refresh()  # draw now: a short epoch may end before the refresh thread wakes

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        line = summary(trainer, logs, time.monotonic() - self._epoch_start, self._columns)
        if self.progress is None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
            self.progress.refresh()  # else the finished bar is drawn again below its summary
        self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)  # above the bar

    def on_fit_end(self, trainer: Any) -> None:
        self._stop()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self._stop()

    def _new_task(self, progress: Progress, trainer: Any) -> None:
        taken, length = trainer.epoch_progress
        self._task = progress.add_task(f"epoch {trainer.epoch + 1}", total=length, completed=taken)
        self._next_redraw = 0.0

    def _stop(self) -> None:
        """End the live display (also after an error): the bar is erased, the summary lines stay."""
        progress, self.progress, self._task = self.progress, None, None
        if progress is not None:
            progress.stop()
