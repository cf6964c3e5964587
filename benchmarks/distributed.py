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

``--cuda`` runs, instead, the checks a CUDA machine is needed for, each a fresh process, float64,
a shuffled loader, ``accumulate=2`` with an uneven last window, Adam, clipping:

1. ``replicate``: ``torchrun --nproc-per-node 1`` with ``distributed="replicate"`` (NCCL on CUDA)
   against the same script in one process (``distributed="off"``): rel 1e-10.
2. ``fsdp``: the same with ``distributed="fsdp"`` (``fully_shard`` over one rank, NCCL): rel 1e-10,
   with a DCP checkpoint after every update.
3. ``dcp``: that run's checkpoint at update 5 (a ``.dcp`` folder written from CUDA shards) read
   whole in this process without a process group, then a fresh ``torchrun`` resuming from it to
   the end: bit-identical to the uninterrupted fsdp run.

Without CUDA (or with ``--device cpu``) the same checks run on the CPU (gloo). One line per
check; exit status 1 when one fails.

Run:
    python benchmarks/distributed.py                 # 30 warm-up + 200 timed updates per run
    python benchmarks/distributed.py --cuda          # the CUDA checks (about a minute)
    python benchmarks/distributed.py --quick         # smoke run (2 + 5 updates, mlp, replicate with overlap)
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


# ---------------------------------------------------------------- --cuda: the checks for a CUDA machine

CHECK_UPDATES = 8  # 2 per epoch: 27 samples in batches of 8 (8, 8, 8, 3), windows of 2
CHECK_SAVED_AT = 5


def check_child(args: argparse.Namespace) -> None:
    """One CUDA-check run: train to the end (or from ``--resume``), write the final weights (whole, on the CPU)."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader, TensorDataset

    from trainflow import Step, Trainer
    from trainflow.callbacks import Checkpoint

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    f64 = torch.float64
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(27, 3, generator=g, dtype=f64), torch.randn(27, 1, generator=g, dtype=f64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16, dtype=f64), torch.nn.Tanh(), torch.nn.Linear(16, 1, dtype=f64))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", accumulate=2, clip_grad_norm=0.5)
    callbacks = [Checkpoint(every_updates=1, keep_last=CHECK_UPDATES)] if args.mode == "fsdp" and not args.resume else []
    trainer = Trainer(model, [step], device=args.device, callbacks=callbacks, out_dir=args.out / args.mode,
                      progress=False, distributed=args.mode)
    torch.manual_seed(2)  # the sampler's shuffle
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), max_updates=CHECK_UPDATES,
                resume=args.resume)
    weights = {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
               for k, p in model.named_parameters()}
    if trainer.is_global_zero:
        torch.save({"weights": weights, "updates": trainer.updates, "device": str(trainer.device),
                    "backend": None if trainer.world_size == 1 and args.mode == "off" else _backend()},
                   args.out / f"{args.mode}{'-resumed' if args.resume else ''}.pt")


def _backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else "none"


def check_launch(args: argparse.Namespace, mode: str, torchrun: bool, resume: Path | None = None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    flags = ["--check-child", mode, "--device", args.device, "--out", str(args.out)]
    if resume is not None:
        flags += ["--resume", str(resume)]
    cmd = [sys.executable, __file__, *flags]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", __file__, *flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        sys.exit(f"{mode} run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return time.perf_counter() - start


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)).item() for k in b)


def cuda_checks(args: argparse.Namespace) -> None:
    """The checks of ``--cuda``: one line each; exit status 1 when one fails."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))  # this checkout's trainflow, as in the children
    from trainflow import checkpoint

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out = Path(tempfile.mkdtemp(prefix="trainflow-cuda-checks-"))
    print(f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", torch {torch.__version__}")
    failed = []

    def report(name: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
        if not ok:
            failed.append(name)

    try:
        seconds = {mode: check_launch(args, mode, torchrun=mode != "off") for mode in ("off", "replicate", "fsdp")}
        runs = {mode: torch.load(args.out / f"{mode}.pt", weights_only=True) for mode in seconds}
        one = runs["off"]["weights"]
        for mode in ("replicate", "fsdp"):
            rel = max_rel(runs[mode]["weights"], one)
            report(f"{mode} at --nproc-per-node 1", rel <= 1e-10 and runs[mode]["updates"] == CHECK_UPDATES,
                   f"backend {runs[mode]['backend']}, {runs[mode]['updates']} updates, max rel diff {rel:.1e} "
                   f"against one process (<= 1e-10), {seconds[mode]:.1f} s")
        folder = args.out / "fsdp" / "checkpoints"
        saved = next(p for p in checkpoint.checkpoints(folder) if p.name.startswith(f"ckpt-u{CHECK_SAVED_AT:09d}"))
        state = checkpoint.load(saved)  # here: one process, no process group
        ok = state["loop"]["updates"] == CHECK_SAVED_AT and sorted(state["models"]["model"]) == sorted(one)
        report("dcp read in one process", ok, f"{saved.name}: {sorted(os.listdir(saved))}")
        check_launch(args, "fsdp", torchrun=True, resume=saved)  # a fresh process group resumes from it
        resumed = torch.load(args.out / "fsdp-resumed.pt", weights_only=True)["weights"]
        same = all(torch.equal(resumed[k], runs["fsdp"]["weights"][k]) for k in resumed)
        report("dcp round trip", same, f"resumed from update {CHECK_SAVED_AT} to {CHECK_UPDATES}: "
               f"{'bit-identical to' if same else 'differs from'} the uninterrupted fsdp run")
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    sys.exit(1 if failed else 0)




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
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 + 5 updates, mlp only, replicate with overlap only")
    parser.add_argument("--cuda", action="store_true",
                        help="the checks for a CUDA machine: NCCL at one rank against one process, a DCP round trip")
    parser.add_argument("--device", default=None, help="with --cuda: cuda or cpu (default: cuda when available)")
    parser.add_argument("--check-child", choices=["off", "replicate", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.check_child:
        args.mode = args.check_child
        check_child(args)
        return
    if args.cuda:
        cuda_checks(args)
        return
    if args.quick:  # the fsdp path is the trainer's, run by the test suite's torchrun scenarios
        args.warmup, args.updates, args.models, args.modes = 2, 5, "mlp", "replicate"
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
