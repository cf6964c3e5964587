"""The distributed paths on one CUDA device: NCCL at ``torchrun --nproc-per-node 1``, and a DCP round trip.

Three checks, each a fresh process (``--child``), float64, a shuffled loader, ``accumulate=2``
with an uneven last window, Adam, clipping:

1. ``replicate``: ``torchrun --nproc-per-node 1`` with ``distributed="replicate"`` (NCCL on CUDA)
   against the same script in one process (``distributed="off"``): rel 1e-10.
2. ``fsdp``: the same with ``distributed="fsdp"`` (``fully_shard`` over one rank, NCCL): rel 1e-10,
   with a DCP checkpoint after every update.
3. ``dcp round trip``: that run's checkpoint at update 5 (a ``.dcp`` folder written from CUDA
   shards) read whole in this process without a process group (every tensor equal to what the
   run held there), then a fresh ``torchrun`` resuming from it to the end: bit-identical to the
   uninterrupted fsdp run.

On a machine without CUDA it runs the same on the CPU (gloo), which is how it is tested.

Run:
    python benchmarks/cuda_checks.py                # CUDA when available, else the CPU
    python benchmarks/cuda_checks.py --device cpu   # gloo on the CPU
Exit status 0 when every check passes; one line per check either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPDATES = 8  # 2 per epoch: 27 samples in batches of 8 (8, 8, 8, 3), windows of 2
SAVED_AT = 5


def child(args: argparse.Namespace) -> None:
    """One run: train to the end (or from ``--resume``), write the final weights (whole, on the CPU)."""
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
    callbacks = [Checkpoint(every_updates=1, keep_last=UPDATES)] if args.mode == "fsdp" and not args.resume else []
    trainer = Trainer(model, [step], device=args.device, callbacks=callbacks, out_dir=args.out / args.mode,
                      progress=False, distributed=args.mode)
    torch.manual_seed(2)  # the sampler's shuffle
    trainer.fit(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), max_updates=UPDATES,
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


def launch(args: argparse.Namespace, mode: str, torchrun: bool, resume: Path | None = None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    flags = ["--child", mode, "--device", args.device, "--out", str(args.out)]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["off", "replicate", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
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
        seconds = {mode: launch(args, mode, torchrun=mode != "off") for mode in ("off", "replicate", "fsdp")}
        runs = {mode: torch.load(args.out / f"{mode}.pt", weights_only=True) for mode in seconds}
        one = runs["off"]["weights"]
        for mode in ("replicate", "fsdp"):
            rel = max_rel(runs[mode]["weights"], one)
            report(f"{mode} at --nproc-per-node 1", rel <= 1e-10 and runs[mode]["updates"] == UPDATES,
                   f"backend {runs[mode]['backend']}, {runs[mode]['updates']} updates, max rel diff {rel:.1e} "
                   f"against one process (<= 1e-10), {seconds[mode]:.1f} s")
        folder = args.out / "fsdp" / "checkpoints"
        saved = next(p for p in checkpoint.checkpoints(folder) if p.name.startswith(f"ckpt-u{SAVED_AT:09d}"))
        state = checkpoint.load(saved)  # here: one process, no process group
        ok = state["loop"]["updates"] == SAVED_AT and sorted(state["models"]["model"]) == sorted(one)
        report("dcp read in one process", ok, f"{saved.name}: {sorted(os.listdir(saved))}")
        launch(args, "fsdp", torchrun=True, resume=saved)  # a fresh process group resumes from it
        resumed = torch.load(args.out / "fsdp-resumed.pt", weights_only=True)["weights"]
        same = all(torch.equal(resumed[k], runs["fsdp"]["weights"][k]) for k in resumed)
        report("dcp round trip", same, f"resumed from update {SAVED_AT} to {UPDATES}: "
               f"{'bit-identical to' if same else 'differs from'} the uninterrupted fsdp run")
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
