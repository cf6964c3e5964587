"""Every benchmark's --quick mode runs, so that none of them rots between measurements."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_has_a_quick_mode():
    assert [p.name for p in BENCHMARKS] == [
        "accumulation.py", "checkpoint.py", "distributed.py", "gan_quality.py", "nas.py", "overhead.py"
    ]
    for path in BENCHMARKS:
        assert '"--quick"' in path.read_text(), path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_quick_mode_runs(path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    # each takes 8-30 s on a loaded 2-core machine (about 75 s for all five); the timeout catches a hang
    done = subprocess.run([sys.executable, str(path), "--quick"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip(), path.name  # it printed its table
