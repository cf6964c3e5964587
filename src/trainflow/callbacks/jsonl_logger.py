"""``JSONLLogger``: one JSON object per line for updates, validations and epochs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from trainflow.callbacks._args import optional_path, output_path, positive_int
from trainflow.callbacks._values import floats
from trainflow.events import Every

__all__ = ["JSONLLogger"]


class JSONLLogger:
    """Append records to a JSON Lines file, one object per line, easy to load with pandas.

    - every ``every`` updates (the filter ``Every(every)`` on ``on_update_end``):
      ``{"type": "update", "update": n, "epoch": e, "<step>/<loss>": float, ...}`` with the
      latest value of each loss key (``trainer.latest_losses``, read from the device only then);
    - after each validation: ``{"type": "validation", "update": n, "epoch": e, "val/...": float, ...}``;
    - at each epoch end: ``{"type": "epoch", "update": n, "epoch": e, ...every epoch value}``.

    ``epoch`` is ``trainer.epoch``, the number of completed epochs (so updates of the first
    epoch say 0, and its epoch record says 1). The file is opened for appending at fit start,
    flushed at each epoch end and closed when ``fit`` ends or raises.

    Args:
        path: the file (default: ``<trainer.out_dir>/metrics.jsonl``).
        every: write an update record when ``trainer.updates`` is a multiple of this.

    Example:
        >>> import json, tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import JSONLLogger
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()
        >>> tmp = tempfile.TemporaryDirectory()
        >>> logger = JSONLLogger(every=2)
        >>> Trainer(model, [Step(l2, opt)], callbacks=[logger], out_dir=tmp.name).fit(data, epochs=1)
        >>> with open(f"{tmp.name}/metrics.jsonl") as f:
        ...     records = [json.loads(line) for line in f]
        >>> [(r["type"], r["update"], r["epoch"], sorted(r)) for r in records]  # doctest: +NORMALIZE_WHITESPACE
        [('update', 2, 0, ['epoch', 'l2/loss', 'type', 'update']),
         ('update', 4, 0, ['epoch', 'l2/loss', 'type', 'update']),
         ('epoch', 4, 1, ['epoch', 'l2/loss', 'type', 'update'])]
        >>> tmp.cleanup()
    """

    #: under torchrun only rank 0 calls it: it writes (see trainflow.distributed)
    rank_zero_only = True

    def __init__(self, path: str | Path | None = None, every: int = 50) -> None:
        self.path = optional_path("JSONLLogger", "path", path, "metrics.jsonl")
        self.every = positive_int("JSONLLogger", "every", every, "write every N updates", "every=50")
        self.event_filters = {"on_update_end": Every(self.every)}
        self._file: IO[str] | None = None

    def on_fit_start(self, trainer: Any) -> None:
        path = output_path("JSONLLogger", "path", self.path, trainer, "metrics.jsonl")
        self._close()
        self._file = open(path, "a", encoding="utf-8")

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        self._write("update", trainer, floats(trainer.latest_losses))

    def on_validation_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self._write("validation", trainer, logs)

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self._write("epoch", trainer, logs)
        if self._file is not None:
            self._file.flush()

    def on_fit_end(self, trainer: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self._close()

    def _write(self, kind: str, trainer: Any, values: dict[str, float]) -> None:
        if self._file is not None:
            record = {"type": kind, "update": trainer.updates, "epoch": trainer.epoch, **values}
            self._file.write(json.dumps(record) + "\n")

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()
