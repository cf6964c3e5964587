"""Several machines as one experiment: two worker processes against a real PostgreSQL server.

The test starts a throwaway cluster (initdb + pg_ctl on a free port of 127.0.0.1, in a temporary
directory) from the PostgreSQL server binaries, and stops it at the end. It skips only where the
binaries are absent outside CI; under CI (CI=true) a missing server is a failure: .ci/run installs it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_experiment import ENV, SCRIPTS, TIMEOUT, experiment, replay
from trainflow.nas import Random


def server_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_server_user(*cmd: str) -> list[str]:
    # initdb refuses to run as root: the cluster belongs to the `postgres` user
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture
def postgres_url():
    bin_dir = server_binaries()
    if bin_dir is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found; `apt-get install postgresql`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (under CI this test must run: .ci/run installs them)")
        pytest.skip(message)
    import psycopg2  # noqa: F401  (the test extra installs it: a missing driver is a failure, not a skip)
    root = Path(tempfile.mkdtemp(prefix="trainflow-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    started = False
    try:
        subprocess.run(as_server_user(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
                       check=True, capture_output=True, timeout=TIMEOUT)
        subprocess.run(
            as_server_user(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                           "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"),
            check=True, capture_output=True, timeout=TIMEOUT,
        )
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(as_server_user(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
                           capture_output=True, timeout=TIMEOUT)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_run_one_experiment_against_postgresql(postgres_url, tmp_path):
    go = tmp_path / "go"
    script = [sys.executable, str(SCRIPTS / "nas_worker.py"), postgres_url, "pg", "6", "--go-file", str(go)]
    workers = [subprocess.Popen(script, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        for w in workers:  # both have imported torch and built their experiment: start them together
            assert w.stdout.readline() == "ready\n"
        go.touch()
        outputs = [w.communicate(timeout=TIMEOUT)[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert all(out.rstrip().endswith("done") for out in outputs), outputs
    exp = experiment(Random(), max_trials=6, storage=postgres_url, name="pg")
    records = exp.trials()
    assert [r.number for r in records] == list(range(6))  # none lost
    assert [r.state for r in records] == ["complete"] * 6
    for r in records:  # none run twice with another seed: each value is its own trial's
        assert r.value == replay(r.architecture, r.number)[1]
    pids = {t.user_attrs["trainflow.pid"] for t in exp.study.trials if "trainflow.pid" in t.user_attrs}
    assert pids == {w.pid for w in workers}
    alone = experiment(Random(), max_trials=6)
    alone.run()
    assert [(r.architecture, r.value) for r in records] == [(r.architecture, r.value) for r in alone.trials()]
