"""The built-in callbacks, each on a tiny real Trainer, checked against what the trainer passed."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchmetrics
from rich.console import Console
from rich.file_proxy import FileProxy
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer
from trainflow.callbacks import (
    Checkpoint, CSVLogger, EarlyStopping, JSONLLogger, LossLogger, Preemption, ProgressBar, TensorBoardLogger,
)
from trainflow.callbacks._values import Columns, duration, fmt
from trainflow.callbacks.progress_bar import summary

BATCHES = 4  # per epoch: 32 samples in batches of 8


class Recorder:
    """What the trainer passed to callbacks, as floats, for comparison."""

    def __init__(self) -> None:
        self.latest: dict[str, float] = {}
        self.at_update: dict[int, dict[str, float]] = {}  # updates -> latest value of every key
        self.val_logs: list[dict[str, float]] = []
        self.epoch_logs: list[dict[str, float]] = []

    def on_update_end(self, trainer, step, losses):
        self.latest.update({key: value.item() for key, value in losses.items()})
        self.at_update[trainer.updates] = dict(self.latest)

    def on_validation_end(self, trainer, logs):
        self.val_logs.append(dict(logs))

    def on_epoch_end(self, trainer, logs):
        self.epoch_logs.append(dict(logs))


def data(seed: int = 0, n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)), batch_size=8)


def linear_trainer(callbacks, tmp_path=None, *, metrics=None, fail_at=None):
    """A Linear model fit by SGD on MSE; ``fail_at``: the update whose loss raises."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calls = []

    def mse(batch):
        calls.append(None)
        if len(calls) == fail_at:
            raise RuntimeError(f"boom at update {fail_at}")
        x, y = batch
        return F.mse_loss(model(x), y)

    def val_step(batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    trainer = Trainer(
        model, [Step(mse, opt)], callbacks=callbacks, device="cpu", metrics=metrics, out_dir=tmp_path
    )
    return trainer, val_step


# ---------------------------------------------------------------------------------- LossLogger


def test_loss_logger_calls_print_func_every_n_updates_with_latest_values():
    # two steps in a cycle (a, a, b): each key keeps its own step's latest value
    torch.manual_seed(0)
    model_a, model_b = nn.Linear(3, 1), nn.Linear(3, 1)
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05)

    def a(batch):
        x, y = batch
        return {"mse": F.mse_loss(model_a(x), y), "l1": F.l1_loss(model_a(x), y)}

    def b(batch):
        x, y = batch
        return F.mse_loss(model_b(x), y)

    calls = []
    recorder = Recorder()
    logger = LossLogger(every=3, print_func=lambda values: calls.append((trainer.updates, values)))
    trainer = Trainer(
        {"A": model_a, "B": model_b}, [Step(a, opt_a, repeat=2), Step(b, opt_b)],
        callbacks=[recorder, logger], device="cpu",
    )
    trainer.fit(data(), epochs=3)  # 12 updates

    assert [u for u, _ in calls] == [3, 6, 9, 12]
    for updates, values in calls:
        assert set(values) == {"a/mse", "a/l1", "b/loss"}
        assert all(isinstance(v, float) for v in values.values())
        assert values == recorder.at_update[updates]
    assert calls[0][1]["b/loss"] != calls[1][1]["b/loss"]  # really the latest, not the first


def test_loss_logger_default_prints_one_line(capsys):
    recorder = Recorder()
    trainer, _ = linear_trainer([recorder, LossLogger(every=4)])
    trainer.fit(data(), epochs=2)
    lines = capsys.readouterr().out.splitlines()
    expected = [f"update {u}  mse/loss={recorder.at_update[u]['mse/loss']:.4f}" for u in (4, 8)]
    assert lines == expected


def test_loss_logger_user_print_func_as_in_seed_000(caplog):
    import logging

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def fit(batch):
        x, y = batch
        return {"mse": F.mse_loss(model(x), y), "l1": F.l1_loss(model(x), y)}

    recorder = Recorder()
    logger = LossLogger(every=4, print_func=lambda x: logging.info(f"Train Loss: {x['fit/mse'] + x['fit/l1']}"))
    with caplog.at_level(logging.INFO):
        Trainer(model, [Step(fit, opt)], callbacks=[recorder, logger], device="cpu").fit(data(), epochs=1)
    last = recorder.at_update[4]
    assert caplog.messages == [f"Train Loss: {last['fit/mse'] + last['fit/l1']}"]


# ---------------------------------------------------------------------------------- ProgressBar


def test_progress_bar_without_terminal_prints_one_line_per_epoch():
    out = io.StringIO()
    recorder = Recorder()
    mae = torchmetrics.MeanAbsoluteError()
    trainer, _ = linear_trainer(
        [recorder, ProgressBar(console=Console(file=out, force_terminal=False))], metrics={"val/mae": mae}
    )

    def val_step(batch):
        x, y = batch
        mae.update(trainer.models["model"](x), y)

    trainer.fit(data(), epochs=3, val_data=data(seed=1), val_step=val_step)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for epoch, (line, logs) in enumerate(zip(lines, recorder.epoch_logs), start=1):
        # a 4-batch epoch takes milliseconds: shown as such, never "(0.0s)"
        assert re.fullmatch(
            rf"epoch {epoch}/3  updates {epoch * BATCHES:<2}  mse/loss {logs['mse/loss']:.4f}  "
            rf"val/mae {logs['val/mae']:.4f}  \(\d+(\.\d)?ms\)",
            line,
        ), line
    assert "\x1b" not in out.getvalue()  # plain text, no escape codes


def test_epoch_lines_have_fixed_decimals_and_aligned_columns():
    class Run:
        max_epochs, max_updates = 12, None

    columns, lines = Columns(), []
    for epoch, (d_loss, acc, seconds) in enumerate([(0.15, 1.0, 0.0004), (12.5, 0.5, 0.34), (0.25, 0.75, 75.0)], 9):
        run = Run()
        run.epoch, run.updates = epoch, 7 * epoch
        lines.append(summary(run, {"D/loss": d_loss, "train/acc": acc}, seconds, columns))
    assert lines == [
        "epoch 9/12   updates 63  D/loss 0.1500  train/acc 1.0000  (0.4ms)",
        "epoch 10/12  updates 70  D/loss 12.5000  train/acc 0.5000  (340ms)",
        "epoch 11/12  updates 77  D/loss  0.2500  train/acc 0.7500  (1m15s)",
    ]
    assert [fmt(v) for v in (0.0, -0.41, 44.0, 1.5e-5, 123456.0, float("inf"))] == [
        "0.0000", "-0.4100", "44.0000", "1.5000e-05", "1.2346e+05", "inf"
    ]
    assert [duration(s) for s in (0.0, 0.0123, 0.9994, 0.9996, 59.9, 60.0)] == [
        "0.0ms", "12ms", "999ms", "1.0s", "59.9s", "1m00s"
    ]


def test_epoch_lines_pad_the_updates_to_the_run_s_final_count():
    class Run:
        max_epochs, max_updates, epoch, updates = 20, None, 3, 84  # 560 updates after 20 epochs

    assert summary(Run(), {"D/loss": 0.612}, 1.25) == "epoch 3/20   updates 84   D/loss 0.6120  (1.2s)"
    Run.max_epochs, Run.max_updates = None, 1000
    assert summary(Run(), {}, 1.25) == "epoch 3  updates 84    (1.2s)"


def test_progress_bar_default_console_is_plain_under_pytest(capsys, monkeypatch):
    for var in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(var, raising=False)
    trainer, val_step = linear_trainer([ProgressBar()])
    trainer.fit(data(), epochs=2, val_data=data(seed=1), val_step=val_step)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  mse/loss")[0] for line in lines] == ["epoch 1/2  updates 4", "epoch 2/2  updates 8"]
    assert all("  val/loss " in line for line in lines)


def test_progress_bar_in_terminal_draws_a_bar_and_stops():
    out = io.StringIO()
    bar = ProgressBar(console=Console(file=out, force_terminal=True, width=100))
    trainer, val_step = linear_trainer([bar])
    trainer.fit(data(), epochs=2, val_data=data(seed=1), val_step=val_step)
    text = out.getvalue()
    assert "epoch 1  updates 1  mse/loss " in text  # the bar's description, drawn at the first update
    assert "1/4" in text  # the bar's batch count
    assert re.search(r"epoch 2/2  updates 8  mse/loss \S+  val/loss \S+  \(\d+(\.\d)?ms\)", text)  # the summary
    assert not re.search(r"ms\)\n[^\r]*━", text)  # a finished epoch's bar is not drawn again
    assert bar.progress is None
    assert "\x1b[?25h" in text  # the live display stopped: cursor shown again
    assert screen(text) == [line for line in screen(text) if line.startswith("epoch ") and line.endswith("ms)")]


def test_progress_bar_stops_the_live_display_when_fit_raises():
    out = io.StringIO()
    bar = ProgressBar(console=Console(file=out, force_terminal=True, width=100))
    seen = {}

    class Spy:
        def on_update_end(self, trainer, step, losses):
            seen["progress"] = bar.progress
            seen["started"] = bar.progress.live.is_started

    trainer, _ = linear_trainer([bar, Spy()], fail_at=3)
    stdout = sys.stdout
    with pytest.raises(RuntimeError, match="boom at update 3"):
        trainer.fit(data(), epochs=2)
    assert seen["started"] is True
    assert seen["progress"].live.is_started is False
    assert bar.progress is None
    assert sys.stdout is stdout and not isinstance(sys.stdout, FileProxy)  # stdout no longer redirected


def screen(text: str) -> list[str]:
    """The non-empty lines a terminal shows after ``text``: the cursor moves rich's live display makes.

    Handles what rich writes: ``\\r``, ``\\n``, cursor up (``ESC[nA``), erase line (``ESC[2K``);
    colours and cursor visibility (``ESC[...m``, ``ESC[?25l``) draw nothing.
    """
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.endswith("A"):
            row = max(0, row - int(token[2:-1] or 1))
        elif token == "\x1b[2K":
            lines[row] = ""
        elif not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row], col = line[:col] + token + line[col + len(token):], col + len(token)
    return [line for line in lines if line.strip()]


class Interrupt:
    """At update 6 (in epoch 2 of 4-batch epochs): SIGINT as Ctrl-C sends it, or a KeyboardInterrupt raised."""

    def __init__(self, how: str) -> None:
        self.how = how

    def on_update_end(self, trainer, step, losses):
        if trainer.updates == 6:
            if self.how == "signal":
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt


@pytest.mark.parametrize("how", ["signal", "KeyboardInterrupt"])
def test_progress_bar_leaves_no_stale_frame_after_ctrl_c(tmp_path, how):
    out = io.StringIO()
    bar = ProgressBar(console=Console(file=out, force_terminal=True, width=100))
    # Preemption turns SIGINT into a clean stop at the next update boundary, where Checkpoint saves
    trainer, _ = linear_trainer([Checkpoint(), Preemption(), Interrupt(how), bar], tmp_path)
    if how == "signal":
        trainer.fit(data(), epochs=3)
        assert trainer.stop_reason == "signal" and trainer.updates == 7  # the next update boundary
    else:
        with pytest.raises(KeyboardInterrupt):
            trainer.fit(data(), epochs=3)
    assert "epoch 2  updates 5  mse/loss" in out.getvalue()  # the bar was drawn in epoch 2
    shown = screen(out.getvalue())
    assert len(shown) == 1 and re.fullmatch(r"epoch 1/3  updates 4   mse/loss \d\.\d{4}  \(\d+(\.\d)?ms\)", shown[0])
    assert bar.progress is None


CTRL_C_SCRIPT = """
import sys, time, torch
from trainflow import Step, Trainer
from trainflow.callbacks import Checkpoint, Preemption
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
def mse(batch):
    time.sleep(0.02)  # an epoch of 10 batches lasts about 0.2 s: the bar is drawn in each
    return model(batch).pow(2).mean()
trainer = Trainer(model, [Step(mse, opt)], callbacks=[Checkpoint(), Preemption()], out_dir=sys.argv[1], device="cpu")
trainer.fit([torch.randn(4, 3)] * 10, epochs=100)
print(f"stopped: {trainer.stop_reason} at update {trainer.updates}")
"""


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_ctrl_c_in_a_real_terminal_leaves_the_epoch_lines_and_no_bar(tmp_path):
    # the default progress bar of a Trainer whose output is a terminal (a pty), stopped by SIGINT
    master, slave = os.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    env.update(COLUMNS="100", TERM="xterm-256color", PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, str(tmp_path)],
                             stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out, sent, deadline = b"", False, time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            out += chunk
        if not sent and "━".encode() in out.partition(b"epoch 2/100")[2]:  # the bar, in epoch 3
            child.send_signal(signal.SIGINT)  # what Ctrl-C sends
            sent = True
    os.close(master)
    assert child.wait(timeout=30) == 0 and sent
    shown = screen(out.decode())
    assert [line.split("updates")[0].rstrip() for line in shown[:2]] == ["epoch 1/100", "epoch 2/100"]
    assert re.fullmatch(r"stopped: signal at update 2\d", shown[-1]) and len(shown) == 3, shown
    assert not any("━" in line for line in shown)  # no stale bar left on screen


# ---------------------------------------------------------------------------------- CSVLogger


def test_csv_logger_one_row_per_epoch_with_late_column(tmp_path):
    mae = torchmetrics.MeanAbsoluteError()
    recorder = Recorder()
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def mse(batch):
        x, y = batch
        pred = model(x)
        if trainer.epoch >= 1:  # the train metric is only updated from epoch 2 on
            mae.update(pred.detach(), y)
        return F.mse_loss(pred, y)

    def val_step(batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    trainer = Trainer(
        model, [Step(mse, opt)], metrics={"train/mae": mae}, callbacks=[recorder, CSVLogger()],
        device="cpu", out_dir=tmp_path,
    )
    trainer.fit(data(), epochs=3, val_data=data(seed=1), val_step=val_step)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no temporary file left
    with open(tmp_path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["epoch", "updates", "seconds", "mse/loss", "val/loss", "train/mae"]
    assert len(rows) == 3
    assert "train/mae" not in recorder.epoch_logs[0] and "train/mae" in recorder.epoch_logs[1]
    for epoch, (row, logs) in enumerate(zip(rows, recorder.epoch_logs), start=1):
        assert int(row["epoch"]) == epoch
        assert int(row["updates"]) == epoch * BATCHES
        assert float(row["seconds"]) >= 0
        for key in ("mse/loss", "val/loss", "train/mae"):
            if key in logs:
                assert float(row[key]) == logs[key]  # written in full precision
            else:
                assert row[key] == ""
    assert rows[0]["train/mae"] == ""


def test_csv_logger_appends_across_fit_calls_and_takes_a_path(tmp_path):
    path = tmp_path / "logs" / "run.csv"
    trainer, _ = linear_trainer([CSVLogger(path=path)])  # no out_dir: the path is enough
    trainer.fit(data(), epochs=1)
    trainer.fit(data(), epochs=3)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["epoch"], row["updates"]) for row in rows] == [("1", "4"), ("2", "8"), ("3", "12")]


def test_csv_logger_without_path_or_out_dir_says_how_to_fix():
    trainer, _ = linear_trainer([CSVLogger()])
    with pytest.raises(ValueError, match=r"`path` is None and the trainer has no `out_dir`.*out_dir='runs/exp'"):
        trainer.fit(data(), epochs=1)
    assert trainer.updates == 0


# ---------------------------------------------------------------------------------- JSONLLogger


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_logger_records(tmp_path):
    recorder = Recorder()
    trainer, val_step = linear_trainer([recorder, JSONLLogger(every=3)], tmp_path)
    trainer.fit(data(), epochs=2, val_data=data(seed=1), val_step=val_step)

    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["type"], r["update"], r["epoch"]) for r in records] == [
        ("update", 3, 0), ("validation", 4, 1), ("epoch", 4, 1),
        ("update", 6, 1), ("validation", 8, 2), ("epoch", 8, 2),
    ]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("type", "update", "epoch")}  # noqa: E731
    assert strip(records[0]) == recorder.at_update[3]
    assert strip(records[3]) == recorder.at_update[6]
    assert [strip(r) for r in records if r["type"] == "validation"] == recorder.val_logs
    assert [strip(r) for r in records if r["type"] == "epoch"] == recorder.epoch_logs

    trainer.fit(data(), epochs=3, val_data=data(seed=1), val_step=val_step)  # appends
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["type"], r["update"]) for r in records[6:]] == [
        ("update", 9), ("update", 12), ("validation", 12), ("epoch", 12)
    ]


def test_jsonl_logger_closes_the_file_on_exception(tmp_path):
    trainer, _ = linear_trainer([JSONLLogger(every=1)], tmp_path, fail_at=7)
    with pytest.raises(RuntimeError, match="boom at update 7"):
        trainer.fit(data(), epochs=2)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    # updates 5 and 6 were written after the last epoch-end flush: they are on disk because of the close
    assert [(r["type"], r["update"]) for r in records] == [
        ("update", 1), ("update", 2), ("update", 3), ("update", 4), ("epoch", 4), ("update", 5), ("update", 6)
    ]


# ---------------------------------------------------------------------------------- TensorBoardLogger


def test_tensorboard_logger_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = Recorder()
    trainer, val_step = linear_trainer([recorder, TensorBoardLogger(every=3)], tmp_path)
    trainer.fit(data(), epochs=2, val_data=data(seed=1), val_step=val_step)

    log_dir = tmp_path / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"update/mse/loss", "mse/loss", "val/loss", "epoch"}

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("epoch") == [(4, 1.0), (8, 2.0)]
    assert [s for s, _ in scalars("update/mse/loss")] == [3, 6]
    assert [v for _, v in scalars("update/mse/loss")] == pytest.approx(
        [recorder.at_update[3]["mse/loss"], recorder.at_update[6]["mse/loss"]], rel=1e-6
    )
    assert [s for s, _ in scalars("val/loss")] == [4, 8]
    val_losses = [logs["val/loss"] for logs in recorder.val_logs]
    assert [v for _, v in scalars("val/loss")] == pytest.approx(val_losses, rel=1e-6)
    epoch_losses = [logs["mse/loss"] for logs in recorder.epoch_logs]
    assert [v for _, v in scalars("mse/loss")] == pytest.approx(epoch_losses, rel=1e-6)


def test_tensorboard_logger_without_tensorboard_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it could not be imported
    with pytest.raises(ImportError, match=re.escape("pip install tensorboard") + ".*trainflow\\[tensorboard\\]"):
        TensorBoardLogger()


# ---------------------------------------------------------------------------------- EarlyStopping


def test_early_stopping_ends_fit_after_patience_epochs_without_improvement():
    scheduled = [1.0, 0.5, 0.6, 0.7, 0.4, 0.3]  # val loss per epoch; stops improving after epoch 2
    stopper = EarlyStopping("val/loss", patience=2)
    trainer, _ = linear_trainer([stopper])

    def val_step(batch):
        return torch.tensor(scheduled[trainer.epoch - 1])  # trainer.epoch counts the epoch just done

    trainer.fit(data(), epochs=6, val_data=data(seed=1), val_step=val_step)
    assert trainer.epoch == 4  # epochs 3 and 4 did not improve on 0.5
    assert trainer.updates == 4 * BATCHES
    assert stopper.state_dict() == {"best": pytest.approx(0.5), "wait": 2}


class StopSpy:
    def __init__(self) -> None:
        self.stopped_at = None
        self.epoch = 0

    def stop(self) -> None:
        self.stopped_at = self.epoch


def feed(stopper, values, key="m"):
    spy = StopSpy()
    for value in values:
        spy.epoch += 1
        stopper.on_epoch_end(spy, {key: value})
        if spy.stopped_at is not None:
            break
    return spy.stopped_at


@pytest.mark.parametrize(
    "kwargs, values, stopped_at",
    [
        (dict(mode="min", patience=1), [3.0, 2.0, 2.0], 3),
        (dict(mode="max", patience=2), [0.5, 0.6, 0.6, 0.59, 0.9], 4),
        (dict(mode="max", patience=3), [0.5, 0.6, 0.6, 0.7, 0.7, 0.7], None),
        (dict(mode="min", patience=2, min_delta=0.1), [1.0, 0.95, 0.91, 0.5], 3),  # too small to count
        (dict(mode="min", patience=2), [float("nan"), 1.0, float("nan"), float("nan")], 4),  # NaN never improves
    ],
)
def test_early_stopping_modes_and_min_delta(kwargs, values, stopped_at):
    assert feed(EarlyStopping("m", **kwargs), values) == stopped_at


def test_early_stopping_state_dict_round_trip():
    stopper = EarlyStopping("m", patience=3)
    assert feed(stopper, [1.0, 0.5, 0.7, 0.8]) is None
    state = stopper.state_dict()
    assert state == {"best": 0.5, "wait": 2}

    restored = EarlyStopping("m", patience=3)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert feed(restored, [0.9]) == 1  # the third epoch without improvement, counted across the restore


def test_early_stopping_load_state_dict_rejects_a_wrong_dict():
    expected = re.escape("must be a dict with 'best' and 'wait'") + r".*Received: \['best'\]"
    with pytest.raises(ValueError, match=expected):
        EarlyStopping("m").load_state_dict({"best": 1.0})


def test_early_stopping_missing_monitor_lists_available_keys():
    trainer, _ = linear_trainer([EarlyStopping("val/loss")])
    expected = r"Received: monitor='val/loss'; this epoch's values are: mse/loss\. .*val_data"
    with pytest.raises(ValueError, match=expected):
        trainer.fit(data(), epochs=2)


# ---------------------------------------------------------------------------------- arguments


CONSTRUCTOR_ERRORS = [
    (lambda: LossLogger(every=0), ValueError,
     "LossLogger: `every` must be an int >= 1 (log every N updates). Received: every=0. Pass e.g. every=100."),
    (lambda: LossLogger(every=2.5), TypeError,
     "LossLogger: `every` must be an int >= 1 (log every N updates). Received: every=2.5 of type float."),
    (lambda: LossLogger(every=True), TypeError, "Received: every=True of type bool"),
    (lambda: LossLogger(print_func="print"), TypeError,
     "LossLogger: `print_func` must be a function of the values dict, or None for the default line. "
     "Received: print_func='print'."),
    (lambda: ProgressBar(refresh_per_second=0), ValueError,
     "ProgressBar: `refresh_per_second` must be a finite number > 0 (redraws per second). "
     "Received: refresh_per_second=0."),
    (lambda: ProgressBar(refresh_per_second="4"), TypeError, "Received: refresh_per_second='4' of type str"),
    (lambda: ProgressBar(refresh_per_second=float("inf")), ValueError, "Received: refresh_per_second=inf."),
    (lambda: ProgressBar(console=sys.stdout), TypeError,
     "ProgressBar: `console` must be a rich.console.Console or None"),
    (lambda: CSVLogger(path=3), TypeError,
     "CSVLogger: `path` must be a path (str or pathlib.Path) or None. Received: path=3 of type int."),
    (lambda: JSONLLogger(path=b"x.jsonl"), TypeError,
     "JSONLLogger: `path` must be a path (str or pathlib.Path) or None. Received: path=b'x.jsonl'"),
    (lambda: JSONLLogger(every=0), ValueError,
     "JSONLLogger: `every` must be an int >= 1 (write every N updates). Received: every=0. Pass e.g. every=50."),
    (lambda: TensorBoardLogger(log_dir=1.5), TypeError,
     "TensorBoardLogger: `log_dir` must be a path (str or pathlib.Path) or None. Received: log_dir=1.5"),
    (lambda: TensorBoardLogger(every=-1), ValueError,
     "TensorBoardLogger: `every` must be an int >= 1 (write every N updates). Received: every=-1."),
    (lambda: EarlyStopping(3), TypeError,
     "EarlyStopping: `monitor` must be the name of an epoch value, e.g. 'val/loss'. "
     "Received: monitor=3 of type int."),
    (lambda: EarlyStopping(""), ValueError, "Received: monitor=''. Pass the key of a value in the epoch logs."),
    (lambda: EarlyStopping("val/loss", mode="minimum"), ValueError,
     "EarlyStopping: `mode` must be 'min' (lower is better) or 'max' (higher is better). Received: mode='minimum'."),
    (lambda: EarlyStopping("val/loss", patience=0), ValueError,
     "EarlyStopping: `patience` must be an int >= 1 (epochs without improvement before stopping). "
     "Received: patience=0. Pass e.g. patience=3."),
    (lambda: EarlyStopping("val/loss", min_delta=-0.1), ValueError,
     "EarlyStopping: `min_delta` must be a finite number >= 0 (the smallest change that counts as an improvement). "
     "Received: min_delta=-0.1."),
    (lambda: EarlyStopping("val/loss", min_delta=None), TypeError, "Received: min_delta=None of type NoneType"),
]


@pytest.mark.parametrize("build, error, message", CONSTRUCTOR_ERRORS)
def test_constructor_errors(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()
