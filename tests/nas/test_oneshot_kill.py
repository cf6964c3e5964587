"""Exact resume of one-shot searches, with real processes and real SIGKILLs.

Each search of tests/scripts/nas_setups.py (second-order DARTS with Gumbel mixing; SPOS) runs once
to the end, then is killed with SIGKILL inside the last epoch's second-to-last update (so it
resumes from a checkpoint inside that epoch) and restarted in a new process. The restart's final
state (the weights and alphas, both optimizers, the schedules, streams, RNG states and, for SPOS,
the path sampler's generator) must hash to the same SHA-256 as the uninterrupted run's. More kill
points (mid-update at random updates, mid-save): ``python tests/scripts/kill_harness.py --setups
darts,spos --points 6`` (12 of 12 identical when this was written).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from kill_harness import run_setup  # noqa: E402
from nas_setups import SETUPS  # noqa: E402
from test_kill import Server  # noqa: E402


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SETUPS))
def test_search_killed_mid_epoch_and_resumed_ends_bit_identical(server, tmp_path, setup):
    result = run_setup(server, setup, tmp_path, n=1)
    assert len(result["points"]) == 1 and all(result["points"].values()), f"{setup}: {result}"
