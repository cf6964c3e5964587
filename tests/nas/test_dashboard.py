"""optuna-dashboard serves an experiment's study: started on 127.0.0.1, its HTTP API lists the trials."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_experiment import ENV, TIMEOUT, experiment
from trainflow.nas import Random


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.mark.slow
def test_optuna_dashboard_lists_the_experiments_trials(tmp_path):
    import optuna_dashboard  # noqa: F401  (a test extra: missing, the test fails)
    exe = Path(sys.executable).parent / "optuna-dashboard"
    command = [str(exe)] if exe.exists() else [shutil.which("optuna-dashboard") or "optuna-dashboard"]
    exp = experiment(Random(), max_trials=3, out_dir=tmp_path, name="served")
    exp.run()
    port = free_port()
    server = subprocess.Popen(
        [*command, str(tmp_path / "journal.log"), "--host", "127.0.0.1", "--port", str(port)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline, studies = time.monotonic() + TIMEOUT, None
        while studies is None:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "optuna-dashboard did not answer"
            try:
                studies = get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        (study,) = [s for s in studies if s["study_name"] == "served"]
        detail = get(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
        served = [
            (t["number"], t["state"], t["values"], {p["name"]: p["param_external_value"] for p in t["params"]})
            for t in detail["trials"]
        ]
        expected = []
        for r, t in zip(exp.trials(), exp.study.trials):
            expected.append((r.number, "Complete", [r.value], {k: str(v) for k, v in t.params.items()}))
        assert served == expected
        assert len(served) == 3
    finally:
        server.send_signal(signal.SIGTERM)  # stopped by its process id
        try:
            server.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
