"""Kill every set-up of setups.py with SIGKILL at several points, resume each, compare SHA-256s.

    python tests/scripts/kill_harness.py [--points N] [--seed S] [--setups a,b,...] [--json FILE]

For each set-up: one uninterrupted run, then for each kill point a run into a fresh folder that
is killed there (real SIGKILL, in a real process) and a restart in a new process
(``resume="latest"``) that runs to the end. The restart's final state (models, optimizers,
schedulers, metrics, loop counters, stream positions, RNG states, logs) must hash to the
uninterrupted run's SHA-256, and it must end with the same ``done`` line (updates, epoch, stop).

Kill points (``kill_run.py --pause``): ``end`` (after ``fit`` returned, its last checkpoint
written), ``forward:U:1`` for the update before the last (inside its loss: the newest checkpoint,
up to 2 updates behind, is inside the last epoch), one ``write:U`` (half-way through writing a
checkpoint file) and the rest ``forward:U:1`` at random updates. ``tests/test_kill_setups.py``
runs a reduced set in the suite; this script writes the figures of docs/guides/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the fork server's client
from test_kill import Server, run_to_end  # noqa: E402

from setups import LIMITS, SETUPS  # noqa: E402

UPDATE = re.compile(r"^update (\d+)$", re.M)
#: checkpoints are written every this many updates (see setups.py)
EVERY = 3


def kill_points(total: int, n: int, rnd: random.Random) -> list[str]:
    """``n`` kill points of a run of ``total`` updates.

    First the update before the last (mid-epoch in the last epoch: resumed from a checkpoint
    inside that epoch), then the end; from 3 on, one mid-save and random mid-update points.
    """
    points = [f"forward:{total - 1}:1", "end"][:n]
    if n >= 3:
        points.append(f"write:{rnd.choice(range(EVERY, total + 1, EVERY))}")
    candidates = [u for u in range(1, total - 1)]
    for u in sorted(rnd.sample(candidates, min(n - len(points), len(candidates)))):
        points.append(f"forward:{u}:1")
    return points


def kill_and_resume(server: Server, setup: str, point: str, root: Path) -> tuple[str, str]:
    """Kill a run of ``setup`` at ``point``, restart it to the end; its ``done`` line and digest."""
    out = root / re.sub(r"\W", "_", point)
    child = server.start([setup, str(out), "--pause", point], root / f"{out.name}.killed.log")
    reached = child.wait_for(rf"^paused {re.escape(point)}$")
    if reached is None:
        raise RuntimeError(f"{setup}: the run ended before {point}:\n{child.text()}")
    child.kill()
    if child.wait() != -signal.SIGKILL:
        raise RuntimeError(f"{setup}: {point}: not killed:\n{child.text()}")
    return run_to_end(server, setup, out, root / f"{out.name}.resumed.log")


def run_setup(server: Server, setup: str, root: Path, points: list[str] | None = None, n: int = 5,
              rnd: random.Random | None = None) -> dict:
    """The uninterrupted run and every kill point of ``setup``: {"points": {point: identical}, ...}."""
    root.mkdir(parents=True, exist_ok=True)
    child = server.start([setup, str(root / "uninterrupted")], root / "uninterrupted.log")
    assert child.wait() == 0, child.text()
    text = child.text()
    expected_done = re.search(r"^done .*$", text, re.M).group(0)
    expected = re.search(r"^digest (\w+)$", text, re.M).group(1)
    total = max(int(u) for u in UPDATE.findall(text))
    if points is None:
        points = kill_points(total, n, rnd or random.Random(setup))
    results = {}
    for point in points:
        done, final = kill_and_resume(server, setup, point, root)
        results[point] = done == expected_done and final == expected
    return {"done": expected_done, "points": results}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kill_harness.py")
    parser.add_argument("--points", type=int, default=5, help="kill points per set-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    rnd = random.Random(args.seed)
    server = Server()
    figures = {}
    start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for setup in args.setups.split(","):
                result = run_setup(server, setup, Path(tmp) / setup, n=args.points, rnd=rnd)
                same = sum(result["points"].values())
                differ = [p for p, ok in result["points"].items() if not ok]
                figures[setup] = {"tried": len(result["points"]), "identical": same, "differ": differ}
                note = " (a known limit)" if setup in LIMITS else ""
                print(f"{setup:17} {same}/{len(result['points'])} identical{note}"
                      + (f"  differ: {', '.join(differ)}" if differ else ""), flush=True)
    finally:
        server.close()
    promised = {name: f for name, f in figures.items() if name not in LIMITS}
    tried = sum(f["tried"] for f in promised.values())
    same = sum(f["identical"] for f in promised.values())
    limits = sorted(set(figures) & set(LIMITS))
    print(f"total             {same}/{tried} identical, {len(promised)} set-ups, {time.monotonic() - start:.0f} s"
          + (f" (known limits, not counted: {', '.join(limits)})" if limits else ""))
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "setups": figures, "limits": LIMITS}, indent=1) + "\n")
    return 0 if same == tried else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
