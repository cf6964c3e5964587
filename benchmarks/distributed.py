"""Data-parallel training: 2 gloo processes against 1 process on the same global batch (CPU).

For each model the same flow runs for ``--updates`` timed updates (after ``--warmup``), once in
one process on global batches of ``--batch`` samples, and once under ``torchrun
--nproc-per-node 2`` where each rank loads half of every global batch (``Trainer`` shards the
DataLoader). Each run is a fresh process (``--child``) with one torch thread per process.

Reported per model: milliseconds per update (median of the ranks' means for the 2-process run),
with the gradients sent in buckets during the window's last backward (overlap, the default) and
all at once after it (``trainflow.distributed.OVERLAP = False``), and the milliseconds per update
spent inside trainflow's blocking collectives (waiting for the buckets, the counts and loss sums,
the one-flag stop agreement) and that share of the update. The ``fsdp`` row is
``Trainer(..., distributed="fsdp")`` (each model sharded with ``fully_shard``): its gradients
travel in FSDP2's reduce-scatter and its parameters in all-gathers, both inside the forward and
backward, so its comm column counts trainflow's own collectives only (counts, loss sums, stop
and non-finite agreement).

Models:

- ``mlp``: 64 -> 512 -> 512 -> 10 ReLU MLP (300k parameters), cross-entropy, SGD;
- ``gan``: G 32 -> 256 -> 64, D 64 -> 256 -> 1, D x3 / G x1 (the G step on the same batch), Adam.

On a machine with fewer than 4 free cores the two ranks compete with each other (and with any
other load) for the CPU, so the 2-process time there says little about speed-up; the share in
communication is the figure to read.

Run:
    python benchmarks/distributed.py                 # 30 warm-up + 200 timed updates per run
    python benchmarks/distributed.py --quick         # smoke run (2 + 5 updates, mlp only, overlap only)
    python benchmarks/distributed.py --modes fsdp    # 1 process against fsdp only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> None:
    """One run: train, time the updates and the collectives; each rank writes its JSON file in ``--results``."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from trainflow import Step, Trainer
    import trainflow.distributed
    from trainflow.distributed import Replicate, _Buckets

    torch.set_num_threads(1)
    trainflow.distributed.OVERLAP = not args.no_overlap
    comm = [0.0]
    for owner, name in ((Replicate, "sum_"), (Replicate, "any"), (_Buckets, "receive")):  # the blocking ones
        inner = getattr(owner, name)

        def timed(self, *a, _inner=inner, **k):
            start = time.perf_counter()
            try:
                return _inner(self, *a, **k)
            finally:
                comm[0] += time.perf_counter() - start

        setattr(owner, name, timed)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    per_rank = args.batch // world
    total = args.batch * (args.warmup + args.updates + 1)
    if args.model == "mlp":
        x, y = torch.randn(total, 64), torch.randint(0, 10, (total,))
        model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        models = model
        steps = [Step(lambda b: F.cross_entropy(model(b[0]), b[1]), opt, name="fit")]
        data = DataLoader(TensorDataset(x, y), batch_size=per_rank)
    else:
        real, z = torch.randn(total, 64), torch.randn(total, 32)
        G = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 64))
        D = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
        d_opt, g_opt = torch.optim.Adam(D.parameters(), 1e-4), torch.optim.Adam(G.parameters(), 1e-4)
        ones = torch.ones(args.batch, 1)

        def d_loss(b):
            r, zz = b
            logits = D(torch.cat([G(zz), r]))
            labels = torch.cat([torch.zeros(len(r), 1), torch.ones(len(r), 1)])
            return F.binary_cross_entropy_with_logits(logits, labels)

        def g_loss(b):
            _, zz = b
            return F.binary_cross_entropy_with_logits(D(G(zz)), ones[: len(zz)])

        models = {"G": G, "D": D}
        steps = [Step(d_loss, d_opt, name="D", repeat=3), Step(g_loss, g_opt, name="G", batch="same")]
        data = DataLoader(TensorDataset(real, z), batch_size=per_rank)

    class Clock:
        def __init__(self):
            self.marks = []

        def on_update_end(self, trainer, step, losses):
            self.marks.append((time.perf_counter(), comm[0]))

    clock = Clock()
    trainer = Trainer(models, steps, callbacks=[clock], progress=False,
                      distributed=args.mode if world > 1 else "off")
    trainer.fit(data, max_updates=args.warmup + args.updates)
    (t0, c0), (t1, c1) = clock.marks[args.warmup - 1], clock.marks[-1]
    n = len(clock.marks) - args.warmup
    rank = int(os.environ.get("RANK", "0"))
    (Path(args.results) / f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "ms": 1e3 * (t1 - t0) / n, "comm_ms": 1e3 * (c1 - c0) / n}))


def launch(args: argparse.Namespace, model: str, nproc: int, overlap: bool = True,
           mode: str = "replicate") -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    results = Path(tempfile.mkdtemp(prefix="trainflow-dist-bench-"))
    flags = ["--child", "--model", model, "--batch", str(args.batch), "--warmup", str(args.warmup),
             "--updates", str(args.updates), "--results", str(results), "--mode", mode] + (
                 [] if overlap else ["--no-overlap"])
    if nproc == 1:
        cmd = [sys.executable, __file__, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"{model} with {nproc} process(es) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
    shutil.rmtree(results)
    if len(found) != nproc:
        sys.exit(f"{model} with {nproc} process(es): {len(found)} result file(s), expected {nproc}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--no-overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["mlp", "gan"], default="mlp")
    parser.add_argument("--mode", choices=["replicate", "fsdp"], default="replicate", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="replicate,fsdp", help="the distributed modes to compare (comma-separated)")
    parser.add_argument("--models", default="mlp,gan", help="the models to compare (comma-separated)")
    parser.add_argument("--batch", type=int, default=256, help="the global batch (split over the ranks)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--updates", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 + 5 updates, mlp only, overlap only")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.quick:
        args.warmup, args.updates, args.models = 2, 5, "mlp"
    print(f"global batch {args.batch}, {args.warmup} warm-up + {args.updates} timed updates, "
          f"1 torch thread per process, {os.cpu_count()} CPU(s)")
    print(f"{'model':<6} {'1 proc ms/upd':>14} {'2 procs':>16} {'ms/upd':>7} {'comm ms/upd':>12} {'comm share':>11}")
    modes = args.modes.split(",")
    for model in args.models.split(","):
        one = launch(args, model, 1)[0]
        runs = [] if "replicate" not in modes else [("replicate", True)] if args.quick else \
            [("replicate", True), ("replicate", False)]
        runs += [("fsdp", True)] if "fsdp" in modes else []
        for mode, overlap in runs:
            two = launch(args, model, 2, overlap, mode)
            ms = statistics.median(r["ms"] for r in two)
            comm = statistics.median(r["comm_ms"] for r in two)
            label = "fsdp" if mode == "fsdp" else "overlap" if overlap else "after backward"
            print(f"{model:<6} {one['ms']:>14.3f} {label:>16} {ms:>7.3f} {comm:>12.3f} {comm / ms:>10.0%}")


if __name__ == "__main__":
    main()
