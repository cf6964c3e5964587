"""``CSVLogger``: one row per epoch in a CSV file, rewritten atomically as columns appear."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainflow.callbacks._args import optional_path, output_path

__all__ = ["CSVLogger"]

FIRST_COLUMNS = ("epoch", "updates", "seconds")


class CSVLogger:
    """Write one row per epoch: ``epoch``, ``updates``, ``seconds``, then every epoch value.

    ``seconds`` is the epoch's wall time, validation included. A value may first appear in a
    later epoch (a metric updated from epoch 2 on): the rows are kept in memory and the whole
    file is rewritten each epoch with the union of the columns, in first-seen order (missing
    cells are empty). Each write goes to a temporary file in the same folder that then
    replaces the CSV, so a reader never sees half a file. Several ``fit`` calls of one trainer
    add to the same rows; a file left by another run at that path is replaced.

    The rows are part of ``state_dict``, so they are saved in checkpoints: a run resumed with
    ``fit(..., resume=...)`` rewrites the file with the rows up to the checkpoint and goes on
    adding to them (rows a killed process wrote after its last checkpoint are replaced).

    Args:
        path: the CSV file (default: ``<trainer.out_dir>/metrics.csv``).

    Example:
        >>> import csv, tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import CSVLogger
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()
        >>> tmp = tempfile.TemporaryDirectory()
        >>> trainer = Trainer(model, [Step(l2, opt)], callbacks=[CSVLogger()], out_dir=tmp.name)
        >>> trainer.fit(data, epochs=2)
        >>> with open(f"{tmp.name}/metrics.csv", newline="") as f:
        ...     rows = list(csv.DictReader(f))
        >>> list(rows[0]), [(row["epoch"], row["updates"]) for row in rows]
        (['epoch', 'updates', 'seconds', 'l2/loss'], [('1', '4'), ('2', '8')])
        >>> tmp.cleanup()
    """

    #: under torchrun only rank 0 calls it: it writes (see trainflow.distributed)
    rank_zero_only = True

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = optional_path("CSVLogger", "path", path, "metrics.csv")
        self.rows: list[dict[str, Any]] = []
        self._file: Path | None = None  # where the rows are written
        self._columns: dict[str, None] = dict.fromkeys(FIRST_COLUMNS)  # an ordered set
        self._epoch_start = time.monotonic()
        self._restored = False  # rows came from load_state_dict: keep them at the next fit

    def on_fit_start(self, trainer: Any) -> None:
        file = output_path("CSVLogger", "path", self.path, trainer, "metrics.csv")
        if self._restored:  # a resumed run: its rows so far, in the file it writes
            self._file, self._restored = file, False
            self._write()
        elif file != self._file:  # a new file (another trainer's out_dir): new rows
            self._file, self.rows, self._columns = file, [], dict.fromkeys(FIRST_COLUMNS)
        self._epoch_start = time.monotonic()

    def on_epoch_start(self, trainer: Any) -> None:
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        seconds = round(time.monotonic() - self._epoch_start, 3)
        row = {"epoch": trainer.epoch, "updates": trainer.updates, "seconds": seconds, **logs}
        self.rows.append(row)
        self._columns.update(dict.fromkeys(row))
        self._write()

    def state_dict(self) -> dict[str, Any]:
        """The rows so far and the columns in their order (plain numbers and strings)."""
        return {"rows": [dict(row) for row in self.rows], "columns": list(self._columns)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next ``fit`` rewrites the file with these rows."""
        if not isinstance(state, Mapping) or not {"rows", "columns"} <= set(state):
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                "CSVLogger.load_state_dict: `state` must be a dict with 'rows' and 'columns', "
                f"as returned by state_dict(). Received: {keys}."
            )
        self.rows = [dict(row) for row in state["rows"]]
        self._columns = dict.fromkeys(state["columns"])
        self._restored = True

    def _write(self) -> None:
        file = self._file
        if file is None:
            return
        tmp = file.with_name(f".{file.name}.tmp")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(self._columns), restval="")
                writer.writeheader()
                writer.writerows(self.rows)
            os.replace(tmp, file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
