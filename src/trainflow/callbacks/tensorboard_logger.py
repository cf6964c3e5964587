"""``TensorBoardLogger``: losses every N updates and epoch values as TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainflow.callbacks._args import optional_path, output_path, positive_int
from trainflow.callbacks._values import floats
from trainflow.events import Every

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger:
    """Write scalars for TensorBoard with ``torch.utils.tensorboard.SummaryWriter``.

    The x axis is always ``trainer.updates``, so update and epoch curves line up:

    - every ``every`` updates (the filter ``Every(every)`` on ``on_update_end``), the latest
      value of each loss key, tagged ``update/<step>/<loss>`` (read from the device only then);
    - at each epoch end, every epoch value under its own key (``D/loss`` as the epoch mean,
      ``train/acc``, ``val/acc``...), and the epoch count under the tag ``epoch``.

    A writer is opened at fit start and closed when ``fit`` ends or raises. TensorBoard is an
    optional extra: ``pip install tensorboard`` (or ``pip install trainflow[tensorboard]``).

    Args:
        log_dir: the folder for the event files (default: ``<trainer.out_dir>/tensorboard``).
        every: write the losses when ``trainer.updates`` is a multiple of this.

    Example:
        >>> import os, tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import TensorBoardLogger
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = TensorBoardLogger(every=2)
        >>> Trainer(model, [Step(l2, opt)], callbacks=[logger], out_dir=tmp.name).fit(data, epochs=1)
        >>> [name.startswith("events.out.tfevents") for name in os.listdir(f"{tmp.name}/tensorboard")]
        [True]
        >>> tmp.cleanup()
    """

    #: under torchrun only rank 0 calls it: it writes (see trainflow.distributed)
    rank_zero_only = True

    def __init__(self, log_dir: str | Path | None = None, every: int = 50) -> None:
        try:  # imported here: tensorboard is an optional extra
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoardLogger needs the `tensorboard` package, which could not be imported "
                f"({error}). Install it with `pip install tensorboard` "
                "(or `pip install trainflow[tensorboard]`), or drop this callback."
            ) from error
        self._writer_class = SummaryWriter
        self.log_dir = optional_path("TensorBoardLogger", "log_dir", log_dir, "tensorboard")
        self.every = positive_int("TensorBoardLogger", "every", every, "write every N updates", "every=50")
        self.event_filters = {"on_update_end": Every(self.every)}
        self.writer: Any = None  # the SummaryWriter while fit runs

    def on_fit_start(self, trainer: Any) -> None:
        log_dir = output_path("TensorBoardLogger", "log_dir", self.log_dir, trainer, "tensorboard")
        log_dir.mkdir(exist_ok=True)  # output_path made its parent
        self._close()
        self.writer = self._writer_class(log_dir=str(log_dir))

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        if self.writer is not None:
            for key, value in floats(trainer.latest_losses).items():
                self.writer.add_scalar(f"update/{key}", value, global_step=trainer.updates)

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in logs.items():
            self.writer.add_scalar(key, value, global_step=trainer.updates)
        self.writer.add_scalar("epoch", trainer.epoch, global_step=trainer.updates)
        self.writer.flush()

    def on_fit_end(self, trainer: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
