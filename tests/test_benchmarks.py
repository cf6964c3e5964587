"""Every benchmark's --quick mode runs, so that none of them rots between measurements."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_every_benchmark_has_a_quick_mode():
    assert [p.name for p in BENCHMARKS] == ["accumulation.py", "checkpoint.py", "distributed.py", "gan_quality.py",
                                            "gpu.py", "nas.py", "overhead.py", "peers.py"]
    for path in BENCHMARKS:
        assert '"--quick"' in path.read_text(), path.name


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every benchmark's ``--quick`` run, two at a time (each is single-threaded: one per core).

    Each takes 3-30 s on a loaded 2-core machine (about 100 s for all of them one after another,
    about half that two at a time); the timeout catches a hang.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def run(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(path), "--quick"], cwd=tmp_path_factory.mktemp(path.stem),
                              env=env, capture_output=True, text=True, timeout=150)

    slowest_first = sorted(BENCHMARKS, key=lambda p: p.stem != "gan_quality")  # the longest one starts first
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((p.stem for p in slowest_first), pool.map(run, slowest_first)))


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_quick_mode_runs(path, quick_runs):
    done = quick_runs[path.stem]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip(), path.name  # it printed its table


@pytest.mark.slow
def test_peers_reports_a_missing_framework_and_still_compares_hand_loop_and_trainflow(tmp_path):
    # where the bench extra is not installed: importing each peer fails as it would there
    script = ("import runpy, sys\n"
              "for name in ('lightning', 'ignite', 'keras'):\n"
              "    sys.modules[name] = None\n"
              f"sys.argv = ['peers.py', '--quick', '--flow', 'mlp']\n"
              f"runpy.run_path({str(ROOT / 'benchmarks' / 'peers.py')!r}, run_name='__main__')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("framework")) + 1:]
    rows: dict[str, str] = {}
    for line in table:
        if line.strip():
            rows.setdefault(line.split()[0], line)  # the table's row, not the per-round line below it
    for peer in ("lightning", "ignite", "keras"):
        assert rows[peer].startswith(f"{peer:<22} not installed (") and rows[peer].endswith(
            'pip install "trainflow[bench]"'), rows[peer]
    assert rows["hand"].split()[2:] == ["1.000", "yes"] and rows["trainflow"].split()[-1] == "yes"
