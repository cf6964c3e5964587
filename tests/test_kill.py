"""Exact resume with real processes and real signals (invariants 4 and 5).

A training script (tests/scripts/kill_run.py) runs in a child process and is killed with
SIGKILL at a random update: in the middle of an update (mid-cycle of D x3 / G x1, mid-way
through an accumulation window), in validation, half-way through writing a checkpoint, between
the fsync and the rename, before index.json is updated, or at a random moment of a throttled
run. After every kill the newest checkpoint loads and no temporary file counts as one; the run
is restarted (``resume="latest"``) in a new process, killed again further on, and so on, and the
last restart runs to the end: its final state (models, optimizers, schedulers, metrics, loop,
RNG) must hash to the same SHA-256 as an uninterrupted run's, and its metrics.csv must hold the
same rows.

The children are forked from a server process that has imported torch once (see
kill_run.py), so a kill point costs a few tenths of a second instead of seconds; the SIGTERM
test preempts a fresh interpreter. Kill points are random: set TRAINFLOW_KILL_SEED to replay a
failing plan (the seed is in every assertion message).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainflow import checkpoint

SCRIPT = Path(__file__).resolve().parent / "scripts" / "kill_run.py"
SRC = Path(__file__).resolve().parent.parent / "src"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
}
TIMEOUT = 60.0  # seconds for any one child to reach a line; far above the normal fraction of a second
#: flow -> (epochs, updates per epoch): see kill_run.py
FLOWS = {"gan": (3, 10), "accum": (4, 5)}
KILLS_PER_FLOW = 14
KILL_SEED = int(os.environ.get("TRAINFLOW_KILL_SEED", random.randrange(2**32)))
UPDATE = re.compile(r"^update (\d+)$", re.M)


class Child:
    """A process running kill_run.py, its log, and how to wait for a line of it."""

    def __init__(self, pid: int, log: Path, server: Server) -> None:
        self.pid, self.log, self.server = pid, log, server

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, pattern: str) -> re.Match | None:
        """The first match of ``pattern`` in the log; None if the run ends (or fails) first."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            text = self.text()
            match = regex.search(text)
            if match:
                return match
            if "digest " in text or "Traceback" in text:
                return None
            time.sleep(0.002)
        self.kill()
        raise AssertionError(f"no line matching {pattern!r} within {TIMEOUT} s. Log:\n{self.text()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        os.kill(self.pid, sig)

    def wait(self) -> int:
        return self.server.wait(self.pid)


class Server:
    """kill_run.py --serve: forks children from an interpreter that has imported torch already."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=ENV,
        )
        assert self._answer() == "ready"

    def _answer(self) -> str:
        line = self.proc.stdout.readline()
        assert line, "the fork server exited"
        return line.strip()

    def start(self, argv: list[str], log: Path) -> Child:
        self.proc.stdin.write(f"run {json.dumps({'argv': argv, 'log': str(log)})}\n")
        self.proc.stdin.flush()
        kind, pid = self._answer().split()
        assert kind == "pid"
        return Child(int(pid), log, self)

    def wait(self, pid: int) -> int:
        self.proc.stdin.write(f"wait {pid}\n")
        self.proc.stdin.flush()
        kind, code = self._answer().split()
        assert kind == "exit"
        return int(code)

    def close(self) -> None:
        self.proc.kill()  # nothing to flush: a clean interpreter exit would only cost a second
        self.proc.wait(timeout=30)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def run_to_end(server: Server, flow: str, out: Path, log: Path) -> tuple[str, str]:
    child = server.start([flow, str(out)], log)
    assert child.wait() == 0, child.text()
    text = child.text()
    done = re.search(r"^done .*$", text, re.M).group(0)
    return done, re.search(r"^digest (\w+)$", text, re.M).group(1)


def csv_rows(out: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-time column."""
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def check_folder(folder: Path, context: str) -> int:
    """After a kill: the newest checkpoint loads, every listed one is complete. Its update count."""
    found = checkpoint.checkpoints(folder)
    assert all(not p.name.startswith(".") and not p.name.endswith(".tmp") for p in found), (context, found)
    for path in found:  # every file named as a checkpoint is complete, not only the newest
        state = checkpoint.load(path)
        assert f"ckpt-u{state['loop']['updates']:09d}" in path.name, (context, path.name)
    newest = checkpoint.latest(folder)
    return -1 if newest is None else checkpoint.load(newest)["loop"]["updates"]


def save_points(flow: str, total: int) -> list[int]:
    """The updates at which the flow writes a checkpoint."""
    per_epoch = FLOWS[flow][1]
    return [u for u in range(1, total + 1) if flow == "gan" or u % 2 == 0 or u % per_epoch == 0]


def kill_plan(flow: str, rnd: random.Random) -> list[tuple[str, int]]:
    """(kind, target update) pairs, targets rising: every kind of kill at least once."""
    kinds = ["forward", "forward", "write", "replace", "index", "free", "free", "free"]
    kinds += ["val"] if flow == "accum" else ["forward"]
    kinds += rnd.choices(["forward", "write", "free"], k=KILLS_PER_FLOW - len(kinds))
    rnd.shuffle(kinds)
    epochs, per_epoch = FLOWS[flow]
    # a margin before the end: a throttled run may pass its kill line by an update or two
    targets = sorted(rnd.sample(range(1, epochs * per_epoch - 4), KILLS_PER_FLOW))
    return list(zip(kinds, targets))


def pause_at(flow: str, kind: str, target: int, newest: int, rnd: random.Random) -> str:
    """The --pause argument of a kill of ``kind`` near ``target``, past the newest checkpoint."""
    epochs, per_epoch = FLOWS[flow]
    total = epochs * per_epoch
    update = max(target, newest + 1)
    if kind == "forward":
        # the accum flow's windows hold 3 batches (the last of each epoch only 1): kill after the
        # window's first or second batch, mid-accumulation
        calls = 1 if flow == "gan" or update % per_epoch == 0 else rnd.choice([2, 3])
        return f"forward:{update}:{calls}"
    if kind == "val":
        return f"val:{-(-update // per_epoch)}"  # after the epoch this update is in
    update = next((u for u in save_points(flow, total) if u >= update), total)
    return f"{kind}:{update}"


@pytest.mark.parametrize("flow", list(FLOWS))
def test_killed_anywhere_and_resumed_ends_bit_identical(server, tmp_path, flow):
    rnd = random.Random(f"{KILL_SEED}-{flow}")
    context = f"TRAINFLOW_KILL_SEED={KILL_SEED}, flow={flow}"
    expected_done, expected = run_to_end(server, flow, tmp_path / "uninterrupted", tmp_path / "uninterrupted.log")
    expected_rows = csv_rows(tmp_path / "uninterrupted")

    out, folder = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    kills = []
    newest = -1
    for i, (kind, target) in enumerate(kill_plan(flow, rnd)):
        before = newest
        log = tmp_path / f"run{i}.log"
        if kind == "free":  # a throttled run killed a random moment after it reports an update
            update = max(target, newest + 1)
            child = server.start([flow, str(out), "--throttle", "0.02"], log)
            reached = child.wait_for(rf"^update {update}$")
            time.sleep(rnd.uniform(0, 0.03))
            what = f"free:{update}"
        else:
            what = pause_at(flow, kind, target, newest, rnd)
            child = server.start([flow, str(out), "--pause", what], log)
            reached = child.wait_for(rf"^paused {what}$")
        assert reached, f"{context}: the run ended before {what}:\n{child.text()}"
        child.kill()
        assert child.wait() == -signal.SIGKILL, f"{context}: {what}\n{child.text()}"
        updates_seen = [int(n) for n in UPDATE.findall(child.text())]
        newest = check_folder(folder, f"{context}, after kill {i} at {what}")
        kills.append((what, newest))
        if kind in ("write", "replace"):  # killed mid-save: its temporary file is there, not counted
            update = int(what.split(":")[1])
            assert any(p.name.startswith(f".ckpt-u{update:09d}") for p in folder.iterdir()), (context, what)
            assert newest < update, (context, what, newest)
        if kind == "index":  # the checkpoint is complete; index.json not yet updated
            assert newest == int(what.split(":")[1]), (context, what, newest)
        assert before <= newest <= max(updates_seen, default=before), (context, what, before, newest)

    done, final = run_to_end(server, flow, out, tmp_path / "final.log")
    assert done == expected_done, f"{context}, kills (where, newest checkpoint): {kills}"
    assert final == expected, f"{context}: the resumed state differs; kills (where, newest checkpoint): {kills}"
    assert csv_rows(out) == expected_rows, f"{context}, kills: {kills}"
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # cleaned up at the restart
    index = json.loads((folder / "index.json").read_text())
    assert [e["file"] for e in index["checkpoints"]] == [p.name for p in checkpoint.checkpoints(folder)]
    assert index["latest"] == checkpoint.latest(folder).name


def fresh_process(flow: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), flow, str(out), "--throttle", "0.02"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )


def test_sigterm_stops_at_an_update_boundary_and_resume_is_bit_identical(server, tmp_path):
    _, expected = run_to_end(server, "gan", tmp_path / "uninterrupted", tmp_path / "uninterrupted.log")

    out = tmp_path / "preempted"
    first = fresh_process("gan", out)
    lines = []
    for line in first.stdout:  # a fresh interpreter, like a preempted job
        lines.append(line)
        if line.strip() == "update 12":
            first.send_signal(signal.SIGTERM)
            break
    rest, _ = first.communicate(timeout=TIMEOUT)
    text = "".join(lines) + rest
    assert first.returncode == 0, text  # fit returned normally; the script exited 0
    stopped_at = max(int(n) for n in UPDATE.findall(text))
    assert f"done updates={stopped_at} epoch=1 stop_reason=signal" in text
    assert 12 <= stopped_at < 30
    newest = checkpoint.latest(out / "checkpoints")
    assert newest.name == f"ckpt-u{stopped_at:09d}-e1.pt"
    assert checkpoint.load(newest)["loop"]["updates"] == stopped_at  # saved at the update boundary
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    assert index["checkpoints"][-1]["reason"] == "signal"

    second = server.start(["gan", str(out)], tmp_path / "resumed.log")
    assert second.wait() == 0, second.text()
    assert UPDATE.findall(second.text())[0] == str(stopped_at + 1)  # continues, nothing redone
    assert re.search(r"^digest (\w+)$", second.text(), re.M).group(1) == expected


def test_sigint_in_a_forked_child_and_twice_interrupts_at_once(server, tmp_path):
    # once: like SIGTERM, a clean stop at the next update boundary
    child = server.start(["accum", str(tmp_path / "once"), "--throttle", "0.02"], tmp_path / "once.log")
    assert child.wait_for(r"^update 7$")
    child.kill(signal.SIGINT)
    assert child.wait() == 0, child.text()
    assert re.search(r"^done updates=\d+ epoch=1 stop_reason=signal$", child.text(), re.M), child.text()

    # twice while an update is still running: the second goes to Python's handler (KeyboardInterrupt)
    child = server.start(["accum", str(tmp_path / "twice"), "--pause", "forward:4:2"], tmp_path / "twice.log")
    assert child.wait_for(r"^paused forward:4:2$")
    child.kill(signal.SIGINT)
    assert child.wait_for(r"^signal taken$")  # the first one is handled; the second cannot merge with it
    child.kill(signal.SIGINT)
    assert child.wait() == 1
    assert "KeyboardInterrupt" in child.text() and "done " not in child.text()
    assert checkpoint.latest(tmp_path / "twice" / "checkpoints").name == "ckpt-u000000002-e0.pt"
