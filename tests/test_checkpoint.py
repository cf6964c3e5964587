"""The Checkpoint callback (when it saves, what it keeps, index.json, signals) and loading
checkpoint files: corrupt, foreign, malicious, or written to a full disk."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import signal
import struct
import subprocess
import threading
import zipfile
import warnings
from datetime import datetime

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainflow.checkpoint
from trainflow import Step, Trainer, checkpoint
from trainflow.callbacks import Checkpoint, CSVLogger, EarlyStopping, Preemption

BATCHES = 4  # per epoch


def data(n: int = 4 * BATCHES, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=4)


def trainer_with(callbacks, out_dir, *, hidden: int | None = None, seed: int = 0, **kwargs) -> Trainer:
    torch.manual_seed(seed)
    model = nn.Linear(3, 1) if hidden is None else nn.Sequential(nn.Linear(3, hidden), nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def fit(batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    return Trainer(model, [Step(fit, opt, name="fit")], callbacks=callbacks, device="cpu", out_dir=out_dir, **kwargs)


def names(folder) -> list[str]:
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


def index(folder) -> dict:
    return json.loads((pathlib.Path(folder) / "index.json").read_text())


def csv_without_seconds(folder) -> list[list[str]]:
    """metrics.csv's lines, split, without the wall-time column (the third)."""
    lines = (pathlib.Path(folder) / "metrics.csv").read_text().splitlines()
    return [[cell for i, cell in enumerate(line.split(",")) if i != 2] for line in lines]


def val_losses(trainer_ref: list, values: list[float]):
    """A val_step whose loss after epoch E is values[E - 1] (to rank checkpoints by)."""
    def val_step(batch):
        return torch.tensor(values[trainer_ref[0].epoch - 1])
    return val_step


# ------------------------------------------------------------------------------ when it saves


def test_every_updates_names_the_files_by_update_and_epoch(tmp_path):
    trainer = trainer_with([Checkpoint(every_updates=3, every_epochs=None, keep_last=10)], tmp_path)
    trainer.fit(data(), epochs=3)  # 12 updates
    folder = tmp_path / "checkpoints"
    assert names(folder) == [
        "ckpt-u000000003-e0.pt", "ckpt-u000000006-e1.pt", "ckpt-u000000009-e2.pt", "ckpt-u000000012-e2.pt",
        "index.json",
    ]
    state = checkpoint.load(folder / "ckpt-u000000006-e1.pt")
    assert (state["loop"]["updates"], state["loop"]["epoch"], state["data"]["in_epoch"]) == (6, 1, True)


def test_every_epochs_saves_after_validation_and_not_at_a_normal_end(tmp_path):
    seen = []

    class Spy:  # what the epoch logs held when the checkpoint was written
        def on_epoch_end(self, trainer, logs):
            seen.append(dict(logs))

    ref: list = []
    trainer = trainer_with([Spy(), Checkpoint(every_epochs=2, keep_last=5, monitor="val/loss")], tmp_path)
    ref.append(trainer)
    trainer.fit(data(), epochs=5, val_data=data(seed=1), val_step=val_losses(ref, [5.0, 4.0, 3.0, 2.0, 1.0]))
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["ckpt-u000000008-e2.pt", "ckpt-u000000016-e4.pt", "index.json"]  # not e5
    assert [e["value"] for e in index(folder)["checkpoints"]] == [4.0, 2.0]  # val/loss of epochs 2 and 4
    state = checkpoint.load(folder / "ckpt-u000000016-e4.pt")
    assert (state["loop"]["epoch"], state["data"]["in_epoch"]) == (4, False)


def test_an_epoch_end_on_an_update_save_replaces_it(tmp_path):
    trainer = trainer_with([Checkpoint(every_updates=2, every_epochs=1, keep_last=10)], tmp_path)
    trainer.fit(data(), epochs=2)
    folder = tmp_path / "checkpoints"
    # update 4 ends epoch 1: its update save (e0) is replaced by the epoch save (e1)
    assert names(folder) == ["ckpt-u000000002-e0.pt", "ckpt-u000000004-e1.pt", "ckpt-u000000006-e1.pt",
                             "ckpt-u000000008-e2.pt", "index.json"]
    assert [(e["update"], e["reason"]) for e in index(folder)["checkpoints"]] == [
        (2, "update"), (4, "epoch"), (6, "update"), (8, "epoch"),
    ]


def test_keep_last_prunes_only_after_the_new_file_is_complete(tmp_path, monkeypatch):
    trainer = trainer_with([Checkpoint(every_updates=1, every_epochs=None, keep_last=2)], tmp_path)
    trainer.fit(data(), epochs=1)
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["ckpt-u000000003-e0.pt", "ckpt-u000000004-e0.pt", "index.json"]
    before = {name: (folder / name).read_bytes() for name in names(folder)}

    def full_disk(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainflow.checkpoint, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.fit(data(), epochs=2)
    assert {name: (folder / name).read_bytes() for name in names(folder)} == before  # nothing pruned


@pytest.mark.parametrize(
    ("mode", "kept", "best"),
    [
        ("min", ["ckpt-u000000016-e4.pt", "ckpt-u000000020-e5.pt", "ckpt-u000000024-e6.pt"], "ckpt-u000000016-e4.pt"),
        ("max", ["ckpt-u000000004-e1.pt", "ckpt-u000000024-e6.pt"], "ckpt-u000000024-e6.pt"),
    ],
)
def test_keep_best_by_monitor_is_exempt_from_keep_last(tmp_path, mode, kept, best):
    values = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0]
    ref: list = []
    cb = Checkpoint(keep_last=1, monitor="val/loss", mode=mode, keep_best=2)
    trainer = trainer_with([cb], tmp_path)
    ref.append(trainer)
    trainer.fit(data(), epochs=6, val_data=data(seed=1), val_step=val_losses(ref, values))
    folder = tmp_path / "checkpoints"
    assert names(folder) == [*kept, "index.json"]
    listed = index(folder)
    assert listed["best"] == best and listed["latest"] == "ckpt-u000000024-e6.pt"
    assert listed["monitor"] == "val/loss" and listed["mode"] == mode
    flags = {e["file"]: (e["value"], e["best"], e["last"]) for e in listed["checkpoints"]}
    if mode == "min":  # best: 1.0 (epoch 4) and 2.0 (epoch 5); last: epoch 6
        assert flags == {kept[0]: (1.0, True, False), kept[1]: (2.0, True, False), kept[2]: (6.0, False, True)}
    else:  # best: 6.0 (epoch 6, also the last) and 5.0 (epoch 1)
        assert flags == {kept[0]: (5.0, True, False), kept[1]: (6.0, True, True)}


def test_index_json_lists_every_kept_checkpoint(tmp_path):
    trainer = trainer_with([Checkpoint(every_updates=3, every_epochs=1, keep_last=2)], tmp_path)
    trainer.fit(data(), epochs=2)
    listed = index(tmp_path / "checkpoints")
    assert listed["format"] == "trainflow-checkpoint-index-1"
    assert listed["latest"] == "ckpt-u000000008-e2.pt" and listed["best"] is None and listed["monitor"] is None
    entries = listed["checkpoints"]
    assert [{k: e[k] for k in ("file", "update", "epoch", "value", "reason", "best", "last")} for e in entries] == [
        {"file": "ckpt-u000000006-e1.pt", "update": 6, "epoch": 1, "value": None, "reason": "update",
         "best": False, "last": False},  # kept (keep_last=2), but not the newest
        {"file": "ckpt-u000000008-e2.pt", "update": 8, "epoch": 2, "value": None, "reason": "epoch",
         "best": False, "last": True},
    ]
    for entry in entries:
        assert datetime.fromisoformat(entry["time"]).tzinfo is not None  # an ISO 8601 UTC time
    assert not [n for n in names(tmp_path / "checkpoints") if n.startswith(".")]  # no temporary file left


def test_saves_when_fit_stops_early(tmp_path):
    class StopAt5:
        def on_update_end(self, trainer, step, losses):
            if trainer.updates == 5:
                trainer.stop()

    trainer = trainer_with([StopAt5(), Checkpoint(every_epochs=1)], tmp_path)
    trainer.fit(data(), epochs=3)
    assert trainer.stop_reason == "requested"
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["ckpt-u000000004-e1.pt", "ckpt-u000000005-e1.pt", "index.json"]
    assert index(folder)["checkpoints"][-1]["reason"] == "requested"

    # the stop is part of the state: the same script run again ends where the first run ended
    again = trainer_with([StopAt5(), Checkpoint(every_epochs=1)], tmp_path)
    again.fit(data(), epochs=3, resume="latest")
    assert (again.updates, again.stop_reason) == (5, "requested")

    # with the stop taken out of the state it continues to the same end as a run that never stopped
    full = trainer_with([], tmp_path / "full")
    full.fit(data(), epochs=3)
    resumed = trainer_with([Checkpoint(every_epochs=1)], tmp_path)
    state = checkpoint.load(checkpoint.latest(tmp_path / "checkpoints"))
    state["loop"]["stop_reason"] = None
    resumed.load_state_dict(state)
    resumed.fit(data(), epochs=3)
    assert resumed.updates == 12
    for a, b in zip(full.models["model"].parameters(), resumed.models["model"].parameters()):
        assert torch.equal(a, b)


def test_early_stopping_at_an_epoch_end_is_saved_once(tmp_path):
    trainer = trainer_with([EarlyStopping("fit/loss", mode="max", patience=1), Checkpoint()], tmp_path)
    trainer.fit(data(), epochs=10)
    assert trainer.stop_reason == "requested" and trainer.epoch < 10
    entries = index(tmp_path / "checkpoints")["checkpoints"]
    assert entries[-1]["update"] == trainer.updates and entries[-1]["reason"] == "epoch"


def test_monitor_must_name_a_value_it_sees(tmp_path):
    trainer = trainer_with([Checkpoint(monitor="val/acc")], tmp_path)
    with pytest.raises(ValueError, match=r"^Checkpoint: `monitor` names no value known when it saves\. "
                                         r"Received: monitor='val/acc'; the values are: fit/loss\. Pass one of them"):
        trainer.fit(data(), epochs=1)
    only_updates = trainer_with([Checkpoint(every_updates=2, every_epochs=None, monitor="val/loss")], tmp_path / "u")
    with pytest.raises(ValueError, match=r"monitor='val/loss'; the values are: fit/loss\."):
        only_updates.fit(data(), epochs=1)
    # a step loss is known at update saves
    ok = trainer_with([Checkpoint(every_updates=2, every_epochs=None, monitor="fit/loss", keep_best=1)], tmp_path / "l")
    ok.fit(data(), epochs=1)
    assert all(isinstance(e["value"], float) for e in index(tmp_path / "l" / "checkpoints")["checkpoints"])


# ------------------------------------------------------------------------------ the folder


def test_a_fresh_run_into_an_old_runs_folder_is_refused(tmp_path):
    trainer_with([Checkpoint()], tmp_path).fit(data(), epochs=2)
    with pytest.raises(ValueError, match=r"Checkpoint: '.*checkpoints' holds checkpoints from later than where this fit "
                                         r"starts \(update 0\): \['ckpt-u000000004-e1\.pt', 'ckpt-u000000008-e2\.pt'\]\. "
                                         r"resume='latest' would pick them over this run's\."):
        trainer_with([Checkpoint()], tmp_path).fit(data(), epochs=2)
    resumed = trainer_with([Checkpoint()], tmp_path)
    resumed.fit(data(), epochs=3, resume="latest")
    assert resumed.updates == 12


def test_temporary_files_of_a_killed_save_are_removed_and_missing_entries_rebuilt(tmp_path):
    trainer_with([Checkpoint(keep_last=5)], tmp_path).fit(data(), epochs=2)
    folder = tmp_path / "checkpoints"
    (folder / ".ckpt-u000000009-e2.pt.x1y2.tmp").write_bytes(b"half a file")
    (folder / ".index.json.abc.tmp").write_text("{")
    (folder / ".notes.tmp").write_text("not ours")
    (folder / "index.json").unlink()  # as if killed between the checkpoint and the index
    resumed = trainer_with([Checkpoint(keep_last=2)], tmp_path)
    resumed.fit(data(), epochs=3, resume="latest")
    assert names(folder) == [".notes.tmp", "ckpt-u000000008-e2.pt", "ckpt-u000000012-e3.pt", "index.json"]
    assert [e["reason"] for e in index(folder)["checkpoints"]] == ["unknown", "epoch"]


def test_an_unreadable_index_is_rebuilt_with_a_warning(tmp_path):
    trainer_with([Checkpoint()], tmp_path).fit(data(), epochs=1)
    (tmp_path / "checkpoints" / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"index.json' is not a readable index; it is rebuilt"):
        trainer_with([Checkpoint()], tmp_path).fit(data(), epochs=2, resume="latest")
    assert index(tmp_path / "checkpoints")["latest"] == "ckpt-u000000008-e2.pt"


def test_dir_and_the_need_for_a_place(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    trainer_with([Checkpoint(dir=elsewhere)], None).fit(data(), epochs=1)
    assert names(elsewhere) == ["ckpt-u000000004-e1.pt", "index.json"]
    resumed = trainer_with([Checkpoint(dir=elsewhere)], None)
    resumed.fit(data(), epochs=2, resume=checkpoint.latest(elsewhere))
    assert resumed.updates == 8
    with pytest.raises(ValueError, match=r"^Checkpoint: no place to write: `dir` is None and the trainer has no "
                                         r"`out_dir`\. Received: dir=None, trainer.out_dir=None\."):
        trainer_with([Checkpoint()], None).fit(data(), epochs=1)


def test_a_stateful_callback_listed_after_it_is_warned_about(tmp_path):
    with pytest.warns(UserWarning, match=r"Checkpoint is listed before the stateful callback\(s\) \['CSVLogger', "
                                         r"'EarlyStopping'\]: it saves their state before they have seen"):
        trainer_with([Checkpoint(), CSVLogger(), EarlyStopping("fit/loss")], tmp_path).fit(data(), epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_with([CSVLogger(), Checkpoint()], tmp_path / "ok").fit(data(), epochs=1)


def test_csv_rows_survive_a_resume(tmp_path):
    full = trainer_with([CSVLogger(), Checkpoint()], tmp_path / "full")
    full.fit(data(), epochs=3)
    first = trainer_with([CSVLogger(), Checkpoint()], tmp_path / "run")
    first.fit(data(), max_updates=6)  # stopped mid-epoch 2; the epoch-1 row is in the checkpoint
    checkpoint.save(first.state_dict(), checkpoint.path_for(tmp_path / "run" / "checkpoints", 6, 1))
    resumed = trainer_with([CSVLogger(), Checkpoint()], tmp_path / "run")
    resumed.fit(data(), epochs=3, resume="latest")
    rows = csv_without_seconds(tmp_path / "run")
    assert rows == csv_without_seconds(tmp_path / "full") and len(rows) == 4  # a header and 3 epochs


class Noisy(torch.utils.data.Dataset):
    """Samples with noise drawn where they are loaded (in the worker processes)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((3,), float(i % 5)) + torch.randn(3), torch.tensor([float(i % 3)])


def test_resume_with_worker_processes_is_exact(tmp_path):
    def build(out):
        loader = DataLoader(Noisy(), batch_size=4, shuffle=True, num_workers=2)
        return trainer_with([Checkpoint(every_updates=13, every_epochs=None)], out), loader

    full, loader = build(tmp_path / "full")
    full.fit(loader, epochs=2)
    first, loader = build(tmp_path / "run")
    first.fit(loader, max_updates=13)  # mid-epoch 2, with a checkpoint at update 13
    torch.manual_seed(99)
    resumed, loader = build(tmp_path / "run")
    resumed.fit(loader, epochs=2, resume="latest")
    for a, b in zip(full.models["model"].parameters(), resumed.models["model"].parameters()):
        assert torch.equal(a, b)


def test_the_last_epoch_logs_are_resumed(tmp_path):
    done = trainer_with([Checkpoint()], tmp_path)
    done.fit(data(), epochs=2)
    resumed = trainer_with([Checkpoint()], tmp_path)
    resumed.fit(data(), epochs=2, resume="latest")
    assert resumed.logs == done.logs


def test_latest_orders_files_of_one_update_by_epoch(tmp_path):
    for epoch in (9, 10):
        checkpoint.save({"epoch": epoch}, checkpoint.path_for(tmp_path, 100, epoch))
    assert checkpoint.latest(tmp_path).name == "ckpt-u000000100-e10.pt"


# ------------------------------------------------------------------------------ signals


class RaiseAt:
    """Sends this process ``signum`` (a real signal) when update ``at`` ends."""

    def __init__(self, at: int, signum: int = signal.SIGTERM) -> None:
        self.at, self.signum = at, signum

    def on_update_end(self, trainer, step, losses):
        if trainer.updates == self.at:
            signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_update_boundary_with_a_checkpoint(tmp_path, signum):
    before = signal.getsignal(signum)
    trainer = trainer_with([RaiseAt(6, signum), Checkpoint(), Preemption()], tmp_path)
    trainer.fit(data(), epochs=3)  # returns normally
    assert trainer.stop_reason == "signal" and trainer.updates == 6
    assert signal.getsignal(signum) is before  # the handler from before fit is back
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["ckpt-u000000004-e1.pt", "ckpt-u000000006-e1.pt", "index.json"]
    assert index(folder)["checkpoints"][-1]["reason"] == "signal"
    assert checkpoint.load(folder / "ckpt-u000000006-e1.pt")["loop"]["updates"] == 6


def test_a_signal_during_validation_stops_at_the_epoch_end(tmp_path):
    ref: list = []
    sent = []

    def val_step(batch):
        if ref[0].epoch == 1 and not sent:  # once: a second SIGTERM would end the process at once
            sent.append(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return F.mse_loss(ref[0].models["model"](batch[0]), batch[1])

    trainer = trainer_with([Checkpoint(every_epochs=5), Preemption()], tmp_path)
    ref.append(trainer)
    trainer.fit(data(), epochs=3, val_data=data(seed=1), val_step=val_step)
    assert trainer.stop_reason == "signal" and (trainer.epoch, trainer.updates) == (1, 4)
    assert index(tmp_path / "checkpoints")["latest"] == "ckpt-u000000004-e1.pt"


def test_handlers_are_restored_after_an_exception_and_not_installed_off_the_main_thread(tmp_path):
    before = signal.getsignal(signal.SIGTERM)

    class Boom:
        def on_update_end(self, trainer, step, losses):
            assert signal.getsignal(signal.SIGTERM) is not before  # installed during fit
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer_with([Checkpoint(), Preemption(), Boom()], tmp_path).fit(data(), epochs=1)
    assert signal.getsignal(signal.SIGTERM) is before

    seen = []

    class Look:
        def on_update_end(self, trainer, step, losses):
            seen.append(signal.getsignal(signal.SIGTERM))

    errors = []
    thread = threading.Thread(target=lambda: _fit_catching(trainer_with([Checkpoint(), Preemption(), Look()], tmp_path / "t"), errors))
    thread.start()
    thread.join()
    assert not errors and seen and all(h is before for h in seen)


def _fit_catching(trainer, errors):
    try:
        trainer.fit(data(), epochs=1)
    except BaseException as error:  # reported to the main thread
        errors.append(error)


# ------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"every_updates": None, "every_epochs": None}, ValueError,
         "Checkpoint: `every_updates` and `every_epochs` are both None, so it would never save. "
         "Received: every_updates=None, every_epochs=None. Pass every_epochs=1, every_updates=500, or both."),
        ({"every_updates": 0}, ValueError,
         "Checkpoint: `every_updates` must be an int >= 1 (save after every N-th update, or None). "
         "Received: every_updates=0. Pass e.g. every_updates=500."),
        ({"every_updates": 2.5}, TypeError,
         "Checkpoint: `every_updates` must be an int >= 1 (save after every N-th update, or None). "
         "Received: every_updates=2.5 of type float. Pass e.g. every_updates=500."),
        ({"every_epochs": 0}, ValueError,
         "Checkpoint: `every_epochs` must be an int >= 1 (save after every N-th epoch, or None). "
         "Received: every_epochs=0. Pass e.g. every_epochs=1."),
        ({"every_epochs": "1"}, TypeError,
         "Checkpoint: `every_epochs` must be an int >= 1 (save after every N-th epoch, or None). "
         "Received: every_epochs='1' of type str. Pass e.g. every_epochs=1."),
        ({"keep_last": 0}, ValueError,
         "Checkpoint: `keep_last` must be an int >= 1 (how many of the newest checkpoints to keep). "
         "Received: keep_last=0. Pass e.g. keep_last=2."),
        ({"keep_last": True}, TypeError,
         "Checkpoint: `keep_last` must be an int >= 1 (how many of the newest checkpoints to keep). "
         "Received: keep_last=True of type bool. Pass e.g. keep_last=2."),
        ({"mode": "best"}, ValueError,
         "Checkpoint: `mode` must be 'min' (lower is better) or 'max' (higher is better). Received: mode='best'. "
         "Pass mode='max' for accuracies, mode='min' for losses."),
        ({"keep_best": -1, "monitor": "val/loss"}, ValueError,
         "Checkpoint: `keep_best` must be an int >= 0 (how many of the best checkpoints to keep). "
         "Received: keep_best=-1. Pass keep_best=0 to keep only the newest ones."),
        ({"keep_best": 1.0, "monitor": "val/loss"}, TypeError,
         "Checkpoint: `keep_best` must be an int >= 0 (how many of the best checkpoints to keep). "
         "Received: keep_best=1.0 of type float. Pass e.g. keep_best=1."),
        ({"keep_best": 2}, ValueError,
         "Checkpoint: `keep_best` ranks checkpoints by `monitor`, which is None. Received: keep_best=2, monitor=None. "
         "Pass e.g. monitor='val/loss' (mode='min'), or keep_best=0."),
        ({"monitor": 3}, TypeError,
         "Checkpoint: `monitor` must be the name of an epoch value, e.g. 'val/loss', or None. "
         "Received: monitor=3 of type int."),
        ({"monitor": ""}, ValueError,
         "Checkpoint: `monitor` must be the name of an epoch value, e.g. 'val/loss', or None. "
         "Received: monitor=''. Pass the key of a value in the epoch logs."),
        ({"dir": 3}, TypeError,
         "Checkpoint: `dir` must be a path (str or pathlib.Path) or None. Received: dir=3 of type int. "
         "Pass e.g. dir='runs/exp/checkpoints', or None to write <out_dir>/checkpoints."),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error) as info:
        Checkpoint(**kwargs)
    assert str(info.value) == message


# ------------------------------------------------------------------------------ loading


@pytest.fixture
def saved(tmp_path):
    """A complete checkpoint of a small run, and its bytes."""
    trainer = trainer_with([], tmp_path)
    trainer.fit(data(), epochs=1)
    path = checkpoint.save(trainer.state_dict(), checkpoint.path_for(tmp_path / "checkpoints", 4, 1))
    return path


def test_a_truncated_file(saved):
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(ValueError) as info:
        checkpoint.load(saved)
    assert str(info.value).startswith(f"Checkpoint {str(saved)!r} is truncated or corrupt and cannot be read (")
    assert str(info.value).endswith("). Resume from an earlier checkpoint in the same folder.")
    with pytest.raises(ValueError, match=r"is truncated or corrupt"):
        trainer_with([], saved.parent.parent).fit(data(), epochs=2, resume=saved)


def test_an_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as info:
        checkpoint.load(path)
    assert str(info.value).startswith(f"Checkpoint {str(path)!r} is truncated or corrupt and cannot be read (")
    assert str(info.value).endswith("). Resume from an earlier checkpoint in the same folder.")


def test_random_bytes_are_refused_without_running_anything(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=rf"^Checkpoint {str(path)!r} (is truncated or corrupt|was refused)"):
        checkpoint.load(path)


def test_random_bytes_are_reported_as_corrupt(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match=r"is truncated or corrupt and cannot be read"):
        checkpoint.load(path)


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(ValueError) as info:
        checkpoint.load(path)
    assert str(info.value) == (
        f"{str(path)!r} is not a trainflow checkpoint (expected a file written by trainflow.checkpoint.save, "
        "format 'trainflow-checkpoint-1'). Received: an object of type dict with keys ['a']."
    )
    torch.save(torch.ones(2), path)
    with pytest.raises(ValueError, match=r"is not a trainflow checkpoint .*Received: an object of type Tensor\.$"):
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match=r"^Checkpoint not found\. Received: path='.*missing\.pt'\. Pass a "
                                                r"file written by trainflow\.callbacks\.Checkpoint, or resume='latest'\."):
        checkpoint.load(tmp_path / "missing.pt")


def test_a_checkpoint_of_another_model_lists_every_mismatch(saved, tmp_path):
    other = trainer_with([], tmp_path / "other", hidden=5)  # Sequential(Linear(3, 5), Linear(5, 1))
    with pytest.raises(ValueError) as info:
        other.fit(data(), epochs=2, resume=saved)
    assert str(info.value) == (
        "The state does not fit this trainer: model 'model' missing keys ['0.weight', '0.bias', '1.weight', "
        "'1.bias']; model 'model' unexpected keys ['weight', 'bias']. Load a state saved by a trainer with the same "
        "models, steps and optimizers."
    )
    torch.manual_seed(0)
    wide = nn.Linear(3, 2)
    wide_trainer = Trainer(wide, [Step(lambda b: wide(b[0]).sum(), torch.optim.Adam(wide.parameters()), name="fit")],
                           device="cpu")
    with pytest.raises(ValueError) as info:
        wide_trainer.fit(data(), epochs=2, resume=saved)
    assert str(info.value) == (
        "The state does not fit this trainer: model 'model' shape mismatches (saved vs model) "
        "['weight (1, 3) vs (2, 3)', 'bias (1,) vs (2,)']. Load a state saved by a trainer with the same "
        "models, steps and optimizers."
    )


def test_a_checkpoint_of_another_flow(saved):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters())
    two_steps = Trainer(model, [Step(lambda b: model(b[0]).sum(), opt, name="fit", repeat=2)], device="cpu")
    with pytest.raises(ValueError) as info:
        two_steps.fit(data(), epochs=2, resume=saved)
    assert str(info.value) == (
        "Flow state is for the cycle ['fit'], but this flow's cycle is ['fit', 'fit']. "
        "Load a state saved by the same flow (same steps, names and repeats)."
    )
    renamed = Trainer(model, [Step(lambda b: model(b[0]).sum(), opt, name="other")], device="cpu")
    with pytest.raises(ValueError, match=r"^The state does not fit this trainer: optimizers: the state has \['fit'\], "
                                         r"this trainer has \['other'\]\."):
        renamed.fit(data(), epochs=2, resume=saved)


def test_an_optimizer_over_other_parameters_is_refused_before_anything_is_loaded(saved):
    torch.manual_seed(1)
    model = nn.Linear(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}])  # two groups, not one
    trainer = Trainer(model, [Step(lambda b: model(b[0]).sum(), opt, name="fit")], device="cpu")
    with pytest.raises(ValueError, match=r"^The state does not fit this trainer: optimizer 'fit'"):
        trainer.fit(data(), epochs=2, resume=saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Malicious:
    """Unpickling this runs ``Path.touch(marker)``: the shape of any code-execution payload."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "checkpoints" / "ckpt-u000000099-e9.pt"
    path.parent.mkdir()
    torch.save({"format": checkpoint.FORMAT, "state": Malicious(marker)}, path)
    # the payload is live: an unsafe load would run it (shown on a copy with another marker)
    live, live_marker = tmp_path / "live.pt", tmp_path / "ran"
    torch.save({"format": checkpoint.FORMAT, "state": Malicious(live_marker)}, live)
    torch.load(live, weights_only=False)
    assert live_marker.exists()

    with pytest.raises(ValueError, match=rf"^Checkpoint {str(path)!r} was refused: loading it would run pickled code "
                                         r"or build objects other than tensors and plain containers \(.*\)\. "
                                         r"trainflow never loads such files; re-create the checkpoint with trainflow\."):
        checkpoint.load(path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"was refused: loading it would run pickled code"):
        trainer_with([], tmp_path).fit(data(), epochs=1, resume=path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"was refused"):  # resume="latest" finds it in <out_dir>/checkpoints
        trainer_with([Checkpoint()], tmp_path).fit(data(), epochs=1, resume="latest")
    assert not marker.exists()


def test_a_malicious_checkpoint_message_names_the_refused_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "state": Malicious(tmp_path / "pwned")}, path)
    with pytest.raises(ValueError) as info:
        checkpoint.load(path)
    assert "\x1b[" not in str(info.value) and "Unsupported global" in str(info.value)


def _tensor_spans(path: pathlib.Path) -> list[tuple[str, int, int]]:
    """(member, first byte, end) of every tensor's data inside a checkpoint archive."""
    raw = path.read_bytes()
    spans = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
                start = info.header_offset + 30 + name_len + extra_len
                spans.append((info.filename, start, start + info.file_size))
    return spans


def test_a_flipped_bit_inside_a_tensor_is_refused_naming_the_file(saved):
    """torch.load reads a tensor whose bytes changed without a word; the archive's CRC-32 does not."""
    good = saved.read_bytes()
    spans = _tensor_spans(saved)
    assert len(spans) >= 4  # weights, bias and Adam's moments
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        member, start, end = spans[trial % len(spans)]
        offset = start + int(torch.randint(0, end - start, (1,), generator=g))
        bit = int(torch.randint(0, 8, (1,), generator=g))
        flipped = bytearray(good)
        flipped[offset] ^= 1 << bit
        saved.write_bytes(bytes(flipped))
        # the flip is real: the unchecked load gives other numbers
        unchecked = torch.load(saved, weights_only=True)["state"]
        reference = torch.load(_write(saved.parent / "good.pt", good), weights_only=True)["state"]
        assert any(not torch.equal(a, b) for a, b in zip(_tensors(unchecked), _tensors(reference)))
        with pytest.raises(ValueError) as info:
            checkpoint.load(saved)
        assert str(info.value) == (
            f"Checkpoint {str(saved)!r} is truncated or corrupt and cannot be read (BadZipFile: CRC-32 mismatch "
            f"in {member!r}: the file changed after it was written). Resume from an earlier checkpoint in the "
            "same folder."
        )
    saved.write_bytes(good)
    assert checkpoint.load(saved)["loop"]["updates"] == 4


def test_resume_latest_refuses_a_flipped_checkpoint(tmp_path):
    trainer = trainer_with([Checkpoint(every_updates=2, every_epochs=None)], tmp_path)
    trainer.fit(data(), epochs=1)
    newest = checkpoint.latest(tmp_path / "checkpoints")
    _, start, end = _tensor_spans(newest)[0]
    raw = bytearray(newest.read_bytes())
    raw[(start + end) // 2] ^= 0x01
    newest.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"^Checkpoint {re.escape(repr(str(newest)))} is truncated or corrupt .*CRC-32"):
        trainer_with([Checkpoint(every_updates=2, every_epochs=None)], tmp_path).fit(data(), epochs=2, resume="latest")


def _write(path: pathlib.Path, raw: bytes) -> pathlib.Path:
    path.write_bytes(raw)
    return path


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


# ------------------------------------------------------------------------------ failed writes


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions (the disk-full test covers this)")
def test_a_read_only_folder_raises_and_keeps_the_previous_checkpoint(saved):
    before = saved.read_bytes()
    saved.parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            checkpoint.save({"w": torch.ones(1)}, saved)
        assert saved.read_bytes() == before and names(saved.parent) == [saved.name]
    finally:
        saved.parent.chmod(0o755)


def test_a_full_disk_raises_and_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    before = saved.read_bytes()
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 some bytes of the new checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainflow.checkpoint.torch, "save", half_then_full)
    with pytest.raises(OSError) as info:
        checkpoint.save({"w": torch.ones(1)}, saved)  # over the same name
    assert info.value.errno == errno.ENOSPC
    assert saved.read_bytes() == before and names(saved.parent) == [saved.name]  # no temporary file left
    monkeypatch.setattr(trainflow.checkpoint.torch, "save", real_save)
    assert checkpoint.load(saved)["loop"]["updates"] == 4


def test_a_full_disk_during_fit_raises_and_keeps_the_folder_as_it_was(tmp_path, monkeypatch):
    trainer = trainer_with([Checkpoint(every_updates=2, every_epochs=None)], tmp_path)
    trainer.fit(data(), epochs=1)
    folder = tmp_path / "checkpoints"
    before = {name: (folder / name).read_bytes() for name in names(folder)}

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainflow.checkpoint.torch, "save", full)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.fit(data(), epochs=2)
    assert {name: (folder / name).read_bytes() for name in names(folder)} == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (a real full disk, not a faked OSError); skipped where mounting is impossible."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()[:120]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _fill(folder: pathlib.Path, leave: int) -> pathlib.Path:
    """Take all the free space of ``folder``'s disk but ``leave`` bytes."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as f:
        chunk = b"\0" * 4096
        try:
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_real_full_disk_names_the_checkpoint_and_says_the_disk_is_full(small_disk):
    path = checkpoint.path_for(small_disk / "checkpoints", 1)
    with pytest.raises(OSError) as info:
        checkpoint.save({"w": torch.zeros(512 * 1024)}, path)  # 2 MiB on a 1 MiB disk
    assert info.value.errno == errno.ENOSPC
    assert re.fullmatch(
        rf"\[Errno 28\] The disk is full: writing {re.escape(repr(str(path)))} failed \(\d+ bytes free; RuntimeError: "
        r"\[enforce fail at inline_container\.cc:\d+\] \. unexpected pos \d+ vs \d+\)\. Nothing was replaced: the "
        r"earlier checkpoints in that folder are intact\. Free some space \(or lower Checkpoint\(keep_last=\.\.\.\), "
        r"or write to another disk with Checkpoint\(dir=\.\.\.\)\) and resume with fit\(\.\.\., resume='latest'\)\.",
        str(info.value),
    )
    assert names(path.parent) == []  # no temporary file left behind


@pytest.mark.parametrize("full_at", ["checkpoint", "index"])
def test_a_real_full_disk_during_fit_loses_nothing_and_the_run_resumes_exactly(small_disk, tmp_path, full_at):
    out = small_disk / "run"
    reference = trainer_with([], tmp_path / "reference", hidden=64)
    reference.fit(data(), epochs=3)

    first = trainer_with([Checkpoint(every_updates=1, every_epochs=None, keep_last=2)], out, hidden=64)
    first.fit(data(), epochs=1)
    folder = out / "checkpoints"
    before = {name: (folder / name).read_bytes() for name in names(folder)}
    size = max(len(b) for name, b in before.items() if name.endswith(".pt"))
    block = os.statvfs(small_disk).f_frsize
    # "checkpoint": the next checkpoint does not fit; "index": it fits to the last block, index.json does not
    filler = _fill(small_disk, leave=size // 2 if full_at == "checkpoint" else -(-size // block) * block)
    failed = "ckpt-u000000005-e1.pt" if full_at == "checkpoint" else "index.json"
    with pytest.raises(OSError, match=rf"^\[Errno 28\] The disk is full: writing '.*/{re.escape(failed)}' failed"):
        first.fit(data(), epochs=3)
    after = {name: (folder / name).read_bytes() for name in names(folder)}
    assert {n: b for n, b in after.items() if n in before} == before  # nothing lost, index.json included
    assert sorted(set(after) - set(before)) == ([] if full_at == "checkpoint" else ["ckpt-u000000005-e1.pt"])

    filler.unlink()  # space freed: the same script resumes and ends like the uninterrupted run
    torch.manual_seed(1234)
    again = trainer_with([Checkpoint(every_updates=1, every_epochs=None, keep_last=2)], out, hidden=64)
    again.fit(data(), epochs=3, resume="latest")
    assert again.updates == reference.updates == 3 * BATCHES
    for a, b in zip(again.models["model"].state_dict().values(), reference.models["model"].state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ the command line


def test_cli_resume_after_a_signal_ends_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    from trainflow.cli import main
    from trainflow.examples import artifacts

    class SignalAt100(Preemption):  # a real SIGTERM to this process at update 100 (epoch 2 of 3)
        def on_update_end(self, trainer, step, losses):
            if trainer.updates == 100:
                signal.raise_signal(signal.SIGTERM)
            super().on_update_end(trainer, step, losses)

    out = tmp_path / "run"
    argv = ["run", "two-losses", "--epochs", "3", "--out", str(out), "--no-progress"]
    monkeypatch.setattr(artifacts, "Preemption", SignalAt100)  # the examples' callbacks come from there
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert re.search(
        rf"^'two-losses' was interrupted by a signal after [\d.]+ s, at update 100 \(1 epoch\(s\) done\); it saved "
        rf"{re.escape(str(out / 'checkpoints' / 'ckpt-u000000100-e1.pt'))}\.\n"
        rf"Continue with: trainflow run two-losses --out {re.escape(str(out))} --resume$", text, re.M), text
    assert not (out / "weights.pt").exists()  # the artifacts come when the run completes
    monkeypatch.undo()

    assert main(["run", "two-losses", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert f"{out} holds an earlier run; this run writes {out}-2 " in capsys.readouterr().out  # never mixed
    assert checkpoint.latest(out / "checkpoints").name == "ckpt-u000000100-e1.pt"  # the interrupted run, untouched

    assert main([*argv, "--resume"]) == 0  # continues `out` itself: the interrupted run
    assert "'two-losses' finished in" in capsys.readouterr().out
    assert main(["run", "two-losses", "--epochs", "3", "--out", str(tmp_path / "full"), "--no-progress"]) == 0
    resumed, full = (torch.load(d / "weights.pt", weights_only=True)["model"] for d in (out, tmp_path / "full"))
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert csv_without_seconds(out) == csv_without_seconds(tmp_path / "full")


def test_cli_resume_without_checkpoints_starts_fresh(tmp_path, capsys):
    from trainflow.cli import main

    assert main(["run", "alternating", "--epochs", "1", "--out", str(tmp_path), "--no-progress", "--resume"]) == 0
    assert "'alternating' finished in" in capsys.readouterr().out
    assert index(tmp_path / "checkpoints")["latest"] == "ckpt-u000000079-e1.pt"


def test_a_signal_at_a_saved_update_is_recorded_as_a_signal_and_read_by_read_index(tmp_path):
    trainer = trainer_with([RaiseAt(6), Checkpoint(every_updates=2, keep_last=3), Preemption()], tmp_path)
    trainer.fit(data(), epochs=3)
    entries = checkpoint.read_index(tmp_path / "checkpoints")
    assert [(e["update"], e["reason"]) for e in entries] == [(2, "update"), (4, "epoch"), (6, "signal")]  # 6: saved once
    assert entries == index(tmp_path / "checkpoints")["checkpoints"]


def test_read_index_refuses_a_file_that_is_not_an_index(tmp_path):
    assert checkpoint.read_index(tmp_path) == []
    (tmp_path / "index.json").write_text('{"checkpoints": 3}')
    with pytest.raises(ValueError, match=r"index\.json' is not a trainflow checkpoint index \(TypeError: int\)\. "
                                         r"Received: a file without a 'checkpoints' list\. Delete it"):
        checkpoint.read_index(tmp_path)
