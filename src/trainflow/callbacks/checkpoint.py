"""``Checkpoint``: save the trainer's whole state every N updates and/or epochs, and when ``fit`` stops early."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainflow import checkpoint
from trainflow.callbacks._args import optional_path, output_path, positive_int
from trainflow.events import Every
from trainflow.fsdp import is_sharded_state

__all__ = ["Checkpoint"]

MODES = ("min", "max")
INDEX = checkpoint.INDEX
INDEX_FORMAT = checkpoint.INDEX_FORMAT


class Checkpoint:
    """Write ``trainer.state_dict()`` to ``<out_dir>/checkpoints/`` every N updates and/or epochs.

    Each save is a :func:`trainflow.checkpoint.save`: complete and durable before it takes a
    checkpoint's name, so the newest checkpoint in the folder always loads, whenever the
    process dies. Files are named ``ckpt-u<updates>-e<epochs completed>.pt`` (under
    ``distributed="fsdp"``: folders ``ckpt-u<updates>-e<epochs>.dcp`` that every rank writes
    its shards into, :func:`trainflow.checkpoint.save_sharded`) and
    ``fit(..., resume="latest")`` continues from the newest one, bit-identical (CPU) to a run
    that was never interrupted.

    - ``every_updates=N`` saves after every N-th update (``on_update_end``); ``every_epochs=N``
      after every N-th epoch, once validation has run (``on_epoch_end``: the epoch's logs,
      ``val/...`` included, are known). Both are event filters (``Every(N)``, see
      :mod:`trainflow.events`); ``None`` leaves that event out. A save at the same update as
      the one before it (an epoch that ends on an every-N-updates save) replaces that one.
    - ``keep_last=K`` keeps the K newest files; ``keep_best=K`` also keeps the K with the best
      ``monitor`` value (``mode="min"`` or ``"max"``), which ``keep_last`` then never deletes.
      Older files are deleted only after the new one is complete. The value is read from
      the epoch's logs, or from the update's losses for an every-N-updates save; a save
      without it (or with NaN) is never "best".
    - ``index.json`` in the folder lists the kept files (update, epoch, time, monitored value,
      why it was saved, which are best, and ``"last": true`` on the newest one only: the file
      ``resume="latest"`` picks); it is rewritten atomically after each save. Read it with
      :func:`trainflow.checkpoint.read_index`. It is informational: the checkpoint files
      themselves are the truth.
    - When ``fit`` stops early (``trainer.stop_reason`` set: ``"nonfinite"``, ``"signal"``,
      ``"requested"`` by e.g. ``EarlyStopping``), the state is saved at ``on_fit_end``; a
      signal's stop is recorded as ``"reason": "signal"`` even when that point was saved already.
    - **Preemption** (SIGTERM, Ctrl-C) is the :class:`~trainflow.callbacks.Preemption`
      callback's: it turns a signal into ``trainer.stop("signal")`` at the next update
      boundary, and this callback then saves. Pass both: ``[Checkpoint(), Preemption()]``.

    A ``fit`` that starts from an earlier point than a checkpoint already in the folder (a
    fresh run into an old run's folder) raises, since ``resume="latest"`` would later pick the
    old run's file: resume, pick another folder, or delete the old files. Temporary files left
    by a process killed mid-save are deleted when ``fit`` starts.

    Put ``Checkpoint`` after the other stateful callbacks (``CSVLogger``, ``EarlyStopping``): it
    saves their state as it is when it runs, so one listed after it would be saved one event
    behind (a warning says so).

    Args:
        every_updates: save after every N-th update, or None.
        every_epochs: save after every N-th epoch, or None (not both None).
        keep_last: how many of the newest checkpoints to keep (>= 1).
        monitor: an epoch value (e.g. ``"val/loss"``) recorded in ``index.json`` and ranked by
            ``keep_best``.
        mode: ``"min"`` when a lower ``monitor`` is better, ``"max"`` when higher is better.
        keep_best: how many of the best checkpoints by ``monitor`` to keep as well (needs
            ``monitor``).
        dir: the folder (default: ``<trainer.out_dir>/checkpoints``, where ``resume="latest"``
            looks; with another folder resume from a path: ``resume=checkpoint.latest(dir)``).

    Example:
        >>> import json, tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import Checkpoint
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()
        >>> tmp = tempfile.TemporaryDirectory()
        >>> trainer = Trainer(model, [Step(l2, opt)], callbacks=[Checkpoint(keep_last=2)], out_dir=tmp.name)
        >>> trainer.fit(data, epochs=3)
        >>> [e["file"] for e in json.load(open(f"{tmp.name}/checkpoints/index.json"))["checkpoints"]]
        ['ckpt-u000000008-e2.pt', 'ckpt-u000000012-e3.pt']
        >>> again = Trainer(model, [Step(l2, opt)], callbacks=[Checkpoint()], out_dir=tmp.name)
        >>> again.fit(data, epochs=4, resume="latest")  # continues from update 12
        >>> again.updates
        16
        >>> tmp.cleanup()
    """

    def __init__(
        self,
        every_updates: int | None = None,
        every_epochs: int | None = 1,
        keep_last: int = 2,
        monitor: str | None = None,
        mode: str = "min",
        keep_best: int = 0,
        dir: str | Path | None = None,
    ) -> None:
        if every_updates is None and every_epochs is None:
            raise ValueError(
                "Checkpoint: `every_updates` and `every_epochs` are both None, so it would never save. "
                "Received: every_updates=None, every_epochs=None. "
                "Pass every_epochs=1, every_updates=500, or both."
            )
        self.every_updates = None if every_updates is None else positive_int(
            "Checkpoint", "every_updates", every_updates, "save after every N-th update, or None", "every_updates=500"
        )
        self.every_epochs = None if every_epochs is None else positive_int(
            "Checkpoint", "every_epochs", every_epochs, "save after every N-th epoch, or None", "every_epochs=1"
        )
        self.keep_last = positive_int(
            "Checkpoint", "keep_last", keep_last, "how many of the newest checkpoints to keep", "keep_last=2"
        )
        expected = "Checkpoint: `monitor` must be the name of an epoch value, e.g. 'val/loss', or None."
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(f"{expected} Received: monitor={monitor!r} of type {type(monitor).__name__}.")
        if monitor == "":
            raise ValueError(f"{expected} Received: monitor=''. Pass the key of a value in the epoch logs.")
        if mode not in MODES:
            raise ValueError(
                "Checkpoint: `mode` must be 'min' (lower is better) or 'max' (higher is better). "
                f"Received: mode={mode!r}. Pass mode='max' for accuracies, mode='min' for losses."
            )
        if isinstance(keep_best, bool) or not isinstance(keep_best, int):
            raise TypeError(
                "Checkpoint: `keep_best` must be an int >= 0 (how many of the best checkpoints to keep). "
                f"Received: keep_best={keep_best!r} of type {type(keep_best).__name__}. Pass e.g. keep_best=1."
            )
        if keep_best < 0:
            raise ValueError(
                "Checkpoint: `keep_best` must be an int >= 0 (how many of the best checkpoints to keep). "
                f"Received: keep_best={keep_best}. Pass keep_best=0 to keep only the newest ones."
            )
        if keep_best > 0 and monitor is None:
            raise ValueError(
                "Checkpoint: `keep_best` ranks checkpoints by `monitor`, which is None. "
                f"Received: keep_best={keep_best}, monitor=None. Pass e.g. monitor='val/loss' (mode='min'), "
                "or keep_best=0."
            )
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best
        self.dir = optional_path("Checkpoint", "dir", dir, "checkpoints")
        #: the kept checkpoints, oldest first: dicts as listed in index.json
        self.records: list[dict[str, Any]] = []
        self._folder: Path | None = None
        self._saved_at: tuple[int, int] | None = None  # (updates, epoch) of the last save
        self.event_filters = {
            "on_update_end": None if self.every_updates is None else Every(self.every_updates),
            "on_epoch_end": None if self.every_epochs is None else Every(self.every_epochs),
        }

    # ------------------------------------------------------------------ events

    def on_fit_start(self, trainer: Any) -> None:
        self._folder = output_path("Checkpoint", "dir", self.dir, trainer, "checkpoints")
        self._folder.mkdir(parents=True, exist_ok=True)
        if getattr(trainer, "is_global_zero", True):  # under torchrun rank 0 writes (and cleans up) the folder
            _remove_temporary_files(self._folder)
        self.records = self._read_records(self._folder)
        ahead = [r["file"] for r in self.records if r["update"] > trainer.updates]
        if ahead:
            raise ValueError(
                f"Checkpoint: {str(self._folder)!r} holds checkpoints from later than where this fit starts "
                f"(update {trainer.updates}): {ahead[-3:]}. resume='latest' would pick them over this run's. "
                "Received: a fresh or earlier start in an existing run's folder. Continue that run with "
                "fit(..., resume='latest'), or write this one elsewhere (Trainer(out_dir=...) or "
                "Checkpoint(dir=...)), or delete those files."
            )
        self._warn_about_later_callbacks(trainer)
        self._saved_at = None

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        self._save(trainer, self._value(losses, required=self.every_epochs is None), "update")

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self._save(trainer, self._value(logs, required=True), "epoch")

    def on_fit_end(self, trainer: Any) -> None:
        if trainer.stop_reason is not None:
            self._save(trainer, None, trainer.stop_reason)

    # ------------------------------------------------------------------ saving

    def _value(self, values: dict[str, Any], required: bool) -> float | None:
        if self.monitor is None:
            return None
        if self.monitor not in values:
            if not required:
                return None
            raise ValueError(
                f"Checkpoint: `monitor` names no value known when it saves. Received: monitor={self.monitor!r}; "
                f"the values are: {', '.join(sorted(values)) or 'none'}. Pass one of them (a 'val/...' value "
                "needs fit(..., val_data=..., val_step=...); every_updates saves see only the step losses)."
            )
        return float(values[self.monitor])

    def _save(self, trainer: Any, value: float | None, reason: str) -> None:
        point = (trainer.updates, trainer.epoch)
        if point == self._saved_at:  # nothing happened since the last save (e.g. a signal right after an epoch end)
            relabel = reason == "signal" and self.records and self.records[-1]["reason"] != reason
            if relabel and getattr(trainer, "is_global_zero", True):  # under torchrun rank 0 writes
                self.records[-1]["reason"] = reason  # what a restarted job looks for: it was interrupted
                self._write_index()
            return
        state = trainer.state_dict()  # under torchrun a collective: every rank takes part, rank 0 writes
        path = checkpoint.path_for(self._folder, *point)
        if is_sharded_state(state):  # distributed="fsdp": every rank writes its shards (a collective)
            path = checkpoint.save_sharded(state, path)
        if not getattr(trainer, "is_global_zero", True):
            self._saved_at = point
            return
        if path.suffix != checkpoint.SHARDED:
            path = checkpoint.save(state, path)
        self._saved_at = point
        record = {
            "file": path.name,
            "update": trainer.updates,
            "epoch": trainer.epoch,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "value": value,
            "reason": reason,
        }
        # the new file replaces one of the same name, and one saved at the same update (it is newer)
        self.records = [r for r in self.records if r["update"] != record["update"]] + [record]
        self.records.sort(key=_order)
        kept = self._kept()
        dropped = [r for r in self.records if r["file"] not in kept]
        dropped += [{"file": name} for name in self._files_at(trainer.updates) if name != path.name]
        self.records = [r for r in self.records if r["file"] in kept]
        self._write_index()
        for r in dropped:  # only now: the new checkpoint and the index are complete
            checkpoint.remove(self._folder / r["file"])

    def _files_at(self, updates: int) -> list[str]:
        """Checkpoint files at ``updates`` (an earlier save at the same update, under another epoch)."""
        return [p.name for p in checkpoint.checkpoints(self._folder) if _parse(p.name)[0] == updates]

    def _best(self) -> list[str]:
        ranked = [r for r in self.records if r["value"] is not None and math.isfinite(r["value"])]
        sign = 1.0 if self.mode == "min" else -1.0
        ranked.sort(key=lambda r: (sign * r["value"], r["update"]))  # ties: the earlier one
        return [r["file"] for r in ranked[: self.keep_best]]

    def _kept(self) -> set[str]:
        return {r["file"] for r in self.records[-self.keep_last :]} | set(self._best())

    def _write_index(self) -> None:
        best = self._best()
        last = self.records[-1]["file"] if self.records else None  # the newest file: the one resume picks
        index = {
            "format": INDEX_FORMAT,
            "monitor": self.monitor,
            "mode": self.mode,
            "latest": last,
            "best": best[0] if best else None,
            "checkpoints": [
                {**r, "best": r["file"] in best, "last": r["file"] == last} for r in self.records
            ],
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX}.", suffix=".tmp", dir=self._folder)
        os.fchmod(fd, 0o644)  # readable like the checkpoints it lists
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            os.replace(tmp, self._folder / INDEX)
        except BaseException as error:
            Path(tmp).unlink(missing_ok=True)
            if checkpoint._disk_full(error, self._folder):
                raise checkpoint._no_space(self._folder / INDEX, error) from error
            raise

    @staticmethod
    def _read_records(folder: Path) -> list[dict[str, Any]]:
        """The checkpoint files in ``folder``, with what ``index.json`` says about them."""
        listed: dict[str, dict[str, Any]] = {}
        try:
            listed = {e["file"]: e for e in checkpoint.read_index(folder)}
        except ValueError:
            warnings.warn(
                f"Checkpoint: {str(folder / INDEX)!r} is not a readable index; it is rebuilt from the "
                "checkpoint files (their monitored values are forgotten).",
                UserWarning,
                stacklevel=3,
            )
        records = []
        for path in checkpoint.checkpoints(folder):
            update, epoch = _parse(path.name)
            entry = listed.get(path.name, {})
            value = entry.get("value")
            records.append({
                "file": path.name,
                "update": update,
                "epoch": epoch,
                "time": entry.get("time") or datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
                .isoformat(timespec="seconds"),
                "value": float(value) if isinstance(value, (int, float)) else None,
                "reason": entry.get("reason", "unknown"),
            })
        return sorted(records, key=_order)

    def _warn_about_later_callbacks(self, trainer: Any) -> None:
        callbacks = list(trainer.events.callbacks)
        later = [
            type(cb).__name__ for cb in callbacks[callbacks.index(self) + 1 :]
            if callable(getattr(cb, "state_dict", None)) and any(
                callable(getattr(cb, event, None)) for event in ("on_update_end", "on_validation_end", "on_epoch_end")
            )
        ] if self in callbacks else []
        if later:
            warnings.warn(
                f"Checkpoint is listed before the stateful callback(s) {later}: it saves their state before "
                "they have seen the update or epoch being saved, so a resumed run would differ from an "
                "uninterrupted one. Put Checkpoint after them in `callbacks`.",
                UserWarning,
                stacklevel=3,
            )

def _order(record: dict[str, Any]) -> tuple[int, int]:
    """Oldest first: by update, then epoch (an epoch-end save follows the update's own save)."""
    return record["update"], -1 if record["epoch"] is None else record["epoch"]


def _parse(name: str) -> tuple[int, int | None]:
    """(updates, epoch) from a checkpoint file name."""
    match = checkpoint._NAME.match(name)
    return int(match.group(1)), None if match.group(2) is None else int(match.group(2))


def _remove_temporary_files(folder: Path) -> None:
    """Delete what a process killed mid-save left: ``.ckpt-*.tmp`` (files, or sharded checkpoints'
    folders) and ``.index.json.*.tmp``."""
    for path in folder.iterdir():
        name = path.name
        if name.endswith(".tmp") and (name.startswith(".ckpt-u") or name.startswith(f".{INDEX}.")):
            checkpoint.remove(path)
