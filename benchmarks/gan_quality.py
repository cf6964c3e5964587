"""How good are the DCGAN example's digits, and how long does it take to get them?

Runs ``trainflow.examples.dcgan.run`` with its defaults (120 epochs) in a fresh output folder
for each seed, then prints the per-epoch quality figures from its ``metrics.csv``:

- ``confidence``: a digits CNN's mean max softmax probability on 1,000 generated samples;
- ``entropy``: the entropy (nats) of the CNN's predicted-class histogram (max ln 10 = 2.303);

and the wall time of the whole run (the classifier's training included: the folder is new),
the first epoch at which both targets (confidence >= 0.90, entropy >= 2.25) are met, and the
elapsed time at that epoch. Exits 1 when a seed misses the targets at the end or takes over
``--limit`` seconds.

Run:
    OMP_NUM_THREADS=1 python benchmarks/gan_quality.py                 # seed 0, one torch thread
    OMP_NUM_THREADS=2 python benchmarks/gan_quality.py --threads 2     # both cores
    python benchmarks/gan_quality.py --seeds 0 1 2 3 4 --every 20      # robustness over seeds
    python benchmarks/gan_quality.py --quick                           # smoke run: 2 epochs, no targets
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainflow.examples import dcgan

CONFIDENCE, ENTROPY = 0.90, 2.25


def one_run(out_dir: Path, seed: int, every: int, epochs: int | None = None) -> tuple[float, list[dict[str, str]], bool]:
    start = time.perf_counter()
    dcgan.run(out_dir, epochs=epochs, progress=False, seed=seed)
    wall = time.perf_counter() - start
    with open(out_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"\nseed {seed}: {len(rows)} epochs, {rows[-1]['updates']} updates, wall {wall:.1f} s")
    print(f"{'epoch':>5} {'elapsed_s':>9} {'D/loss':>7} {'G/loss':>7} {'confidence':>10} {'entropy':>7}")
    elapsed, first = 0.0, None
    for row in rows:
        elapsed += float(row["seconds"])
        conf, ent = float(row["samples/confidence"]), float(row["samples/entropy"])
        if first is None and conf >= CONFIDENCE and ent >= ENTROPY:
            first = (int(row["epoch"]), elapsed)
        if int(row["epoch"]) % every == 0 or row is rows[-1]:
            print(f"{row['epoch']:>5} {elapsed:9.1f} {float(row['D/loss']):7.3f} {float(row['G/loss']):7.3f} "
                  f"{conf:10.4f} {ent:7.4f}")
    last = rows[-1]
    met = float(last["samples/confidence"]) >= CONFIDENCE and float(last["samples/entropy"]) >= ENTROPY
    when = f"epoch {first[0]} ({first[1]:.1f} s of training)" if first else "never"
    print(f"targets (confidence >= {CONFIDENCE}, entropy >= {ENTROPY}) first met: {when}; "
          f"at the end: {'met' if met else 'MISSED'}  (train loop {elapsed:.1f} s, "
          f"classifier and artifacts {wall - elapsed:.1f} s)")
    return wall, rows, met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--every", type=int, default=5, help="print every N-th epoch (default 5)")
    parser.add_argument("--limit", type=float, default=180.0, help="wall-time budget per run in s (default 180)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs of seed 0, the targets not required")
    args = parser.parse_args()
    epochs = 2 if args.quick else None
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out if args.out is not None else Path(tmp)
        summary = []
        for seed in args.seeds:
            wall, rows, met = one_run(root / f"dcgan-seed{seed}", seed, args.every, epochs)
            last = rows[-1]
            summary.append((seed, wall, float(last["samples/confidence"]), float(last["samples/entropy"]), met))
            ok &= args.quick or (met and wall <= args.limit)
    print("\nseed  wall_s  confidence  entropy  targets")
    for seed, wall, conf, ent, met in summary:
        print(f"{seed:>4} {wall:7.1f} {conf:11.4f} {ent:8.4f}  {'met' if met else 'MISSED'}"
              f"{'' if wall <= args.limit else f' (over {args.limit:.0f} s)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
