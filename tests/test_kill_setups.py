"""Exact resume of every data-loading and training set-up, with real processes and real SIGKILLs.

Each set-up of tests/scripts/setups.py (shuffled loader, workers, weighted sampler, random
collate, dropout, OneCycleLR, CosineAnnealingWarmRestarts, metrics + validation + keep_best,
EarlyStopping, two streams, an IterableDataset, a parameter outside the models, persistent
workers, a BatchSampler's generator, Freeze/Unfreeze out of epoch order) runs once to the end,
then is killed with SIGKILL inside the last epoch's second-to-last update (so it resumes from a
checkpoint inside that epoch) and restarted in a new process; the early-stopping set-up is also
killed after ``fit`` returned (a finished run must stay finished). The restart's final state
must hash to the same SHA-256 as the uninterrupted run's. The full harness (more kill points per set-up, the figures
of docs/guides/checkpoints.md) is ``python tests/scripts/kill_harness.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from kill_harness import run_setup  # noqa: E402
from setups import LIMITS, SETUPS  # noqa: E402
from test_kill import Server  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.mark.slow
@pytest.mark.parametrize("setup", [name for name in SETUPS if name not in LIMITS])
def test_killed_and_resumed_in_a_new_process_ends_bit_identical(server, tmp_path, setup):
    n = 2 if setup == "early_stop" else 1
    result = run_setup(server, setup, tmp_path, n=n)
    assert len(result["points"]) == n
    assert all(result["points"].values()), f"{setup}: {result}"
