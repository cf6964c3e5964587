"""Micro-batching: peak memory and time per sample of one batch of 512, whole vs split in chunks.

Each configuration runs in a FRESH Python process (``--child``), because a process's peak
resident memory only ever grows (and freed activations stay in the allocator's pools):

1. build the model, the optimizer and the batch, and prime the runtime with one forward and
   backward on 2 samples (it loads kernels and starts thread pools once per process); reset
   the peak RSS to the current RSS (Linux: ``/proc/self/clear_refs``) and read it: the
   baseline (interpreter, torch, weights, data and runtime);
2. run ``--warmup`` updates and ``--updates`` timed updates on the same batch;
3. read the peak RSS again (``VmHWM`` in ``/proc/self/status``; ``ru_maxrss`` elsewhere: on
   Linux it also counts the parent's RSS at fork time, see ``peak_rss_mb``).
   ``step = peak - baseline`` is what an update adds: activations
   (the part that scales with the chunk), gradients and temporaries. For the default conv
   model the gradients are negligible (the row ``grads`` shows their size).

Configurations (one batch of 512 samples per update, SGD, cross-entropy, float32, CPU):

- ``hand-512``: a hand-written loop on the whole batch (``zero_grad; loss.backward(); step``);
- ``tf-512``: ``Trainer`` with ``Step(loss, opt)``, the whole batch;
- ``tf-micro128`` / ``tf-micro64``: ``Step(loss, opt, microbatch_size=128 / 64)``;
- ``hand-micro64``: a hand-written loop over chunks of 64, each loss weighted by 64/512.

Models (``--model``), both with activations far larger than weights:

- ``conv`` (default): 3x64x64 inputs; conv3x3 3->16, ReLU, conv3x3 16->16, ReLU, maxpool 4,
  conv3x3 16->32, ReLU, global average pool, linear 32->10 (7.7k parameters);
- ``mlp``: 1024 -> 4096 -> 4096 -> 10 ReLU MLP (21M parameters: gradients are 84 MB of ``step``).

Before measuring, a float64 check runs the conv model on a 64-sample batch of 24x24 crops whole and in chunks
of 24 (uneven) and requires equal weights (rtol 1e-10) after 3 updates; it exits 1 otherwise.

Rounds are interleaved (every configuration once per round, in a fresh process each time) so
that machine noise hits all of them; the table shows medians over rounds (and the best time). The measured
processes use one torch thread (``--threads``) and a fixed glibc mmap threshold
(``MMAP_THRESHOLD``, ``--default-malloc`` to drop it), so that the figures are repeatable on a
shared machine.

Run:
    python benchmarks/accumulation.py                  # conv, 5 rounds x 3 timed updates
    python benchmarks/accumulation.py --model mlp
    python benchmarks/accumulation.py --quick          # smoke run (1 round, no warm-up, 1 update, batch 128,
                                                       # one fresh process)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 512
#: glibc serves blocks from this size up with mmap and unmaps them when freed, so the process's
#: RSS follows the live tensors. Its default threshold adapts (up to 32 MiB): after the first
#: free of a block, blocks that size stay in the heap, which added up to +-50 MB of noise to
#: 'step MB' at chunks of 64 (16 MB activations). --default-malloc measures without it.
MMAP_THRESHOLD = 1 << 20
CONFIGS = {
    "hand-512": ("hand", None),
    "tf-512": ("trainflow", None),
    "tf-micro128": ("trainflow", 128),
    "tf-micro64": ("trainflow", 64),
    "hand-micro64": ("hand", 64),
}


def build(model: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if model == "conv":
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        x = torch.randn(BATCH, 3, 64, 64, generator=g)
    elif model == "mlp":
        net = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
        x = torch.randn(BATCH, 1024, generator=g)
    else:
        raise ValueError(f"--model must be 'conv' or 'mlp'. Received: {model!r}.")
    y = torch.randint(0, 10, (BATCH,), generator=g)
    return net.to(dtype), x.to(dtype), y


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    Linux's ``VmHWM`` when there is one: ``ru_maxrss`` of a process started by fork + exec
    also counts the RSS of the parent at fork time (the kernel carries the larger of the two
    into the new program), which here hid every step smaller than the parent's ~800 MB.
    """
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0, ``clear_refs`` 5), so that transient
    peaks of the imports do not hide the update's. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- one configuration


def child(config: str, model: str, warmup: int, updates: int) -> dict:
    from trainflow import Step, Trainer

    side, chunk = CONFIGS[config]
    net, x, y = build(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    batches = [(x, y)] * (warmup + updates)
    if side == "trainflow":
        step = Step(lambda b: F.cross_entropy(net(b[0]), b[1]), opt, microbatch_size=chunk)
        trainer = Trainer(net, step, device="cpu")
    # Prime the runtime: the first forward/backward loads kernels and starts thread pools
    # (tens of MB that do not depend on the batch); 2 samples, so no activation memory to speak of.
    F.cross_entropy(net(x[:2]), y[:2]).backward()
    net.zero_grad(set_to_none=True)
    reset = reset_peak()
    baseline = peak_rss_mb()

    def run(n: int) -> None:
        if n == 0:
            return
        if side == "trainflow":
            trainer.fit(batches[:n], max_updates=trainer.updates + n)
            return
        net.train()
        for xb, yb in batches[:n]:
            opt.zero_grad()
            if chunk is None:
                F.cross_entropy(net(xb), yb).backward()
            else:
                for xc, yc in zip(xb.split(chunk), yb.split(chunk)):
                    (F.cross_entropy(net(xc), yc) * (len(xc) / len(xb))).backward()
            opt.step()

    run(warmup)
    start = time.perf_counter()
    run(updates)
    elapsed = time.perf_counter() - start
    grads_mb = sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20
    return {
        "config": config,
        "baseline_mb": baseline,
        "peak_reset": reset,
        "step_mb": peak_rss_mb() - baseline,
        "grads_mb": grads_mb,
        "us_per_sample": elapsed / (updates * BATCH) * 1e6,
    }


def spawn(config: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--updates", str(args.updates), "--batch", str(BATCH)]
    env = dict(os.environ)
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- exactness check


def check_exact() -> bool:
    """Whole batch vs uneven chunks, float64: the same weights after 3 updates."""
    from trainflow import Step, Trainer

    results = []
    for chunk in (None, 24):
        net, x, y = build("conv", torch.float64)
        x, y = x[:64, :, :24, :24], y[:64]  # small images: the check is about the chunks, not the size
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        step = Step(lambda b, net=net: F.cross_entropy(net(b[0]), b[1]), opt, microbatch_size=chunk)
        Trainer(net, step, device="cpu").fit([(x, y)] * 3, epochs=1)
        results.append(list(net.parameters()))
    return all(torch.allclose(a, b, rtol=1e-10, atol=0) for a, b in zip(*results))


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global BATCH  # --batch / --quick: build() and child() read it
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("conv", "mlp"), default="conv")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on a shared machine, a busy core stalls "
                             "every parallel region of a 2-thread run; 0 keeps torch's default)")
    parser.add_argument("--default-malloc", action="store_true",
                        help=f"do not set MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in the measured processes")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"samples per update (default {BATCH})")
    parser.add_argument("--quick", action="store_true", help="1 round, no warm-up, 1 timed update, batch 128")
    parser.add_argument("--child", choices=tuple(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    BATCH = 128 if args.quick else args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.warmup, args.updates)))
        return 0
    if args.quick:
        args.rounds, args.warmup, args.updates = 1, 0, 1

    print(f"python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    exact = check_exact()
    print(f"whole batch vs chunks of 24 (float64, 3 updates): {'equal' if exact else 'DIFFERENT'}")
    if not exact:
        return 1
    malloc = "glibc default" if args.default_malloc else f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    print(f"model={args.model} batch={BATCH} rounds={args.rounds} warmup={args.warmup} updates/run={args.updates} "
          f"threads/process={torch.get_num_threads()} malloc: {malloc}")

    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(args.rounds):
        for config in CONFIGS:
            # --quick is a smoke run: one fresh process (the path of a real measurement), the rest
            # in this one, whose peak memory says nothing about them
            fresh = not args.quick or config == "hand-512"
            runs[config].append(spawn(config, args) if fresh else child(config, args.model, args.warmup, args.updates))
    if args.quick:
        print("--quick: only hand-512 ran in a fresh process; the other rows' memory figures are not measurements")

    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[config])

    def best(config: str) -> float:
        return min(r["us_per_sample"] for r in runs[config])

    hand_time, hand_best = med("hand-512", "us_per_sample"), best("hand-512")
    whole_mem = med("tf-512", "step_mb")
    print()
    print(f"{'config':<13} {'chunk':>5} {'baseline MB':>12} {'step MB':>8} {'vs tf-512':>9} "
          f"{'us/sample':>10} {'vs hand-512':>11} {'best us/sample':>15} {'vs hand-512':>11}")
    for config, (side, chunk) in CONFIGS.items():
        step_mb, t = med(config, "step_mb"), med(config, "us_per_sample")
        print(f"{config:<13} {chunk or BATCH:>5} {med(config, 'baseline_mb'):>12.0f} {step_mb:>8.0f} "
              f"{step_mb / whole_mem:>9.2f} {t:>10.1f} {t / hand_time:>11.2f} {best(config):>15.1f} "
              f"{best(config) / hand_best:>11.2f}")
    print(f"grads: {runs['tf-512'][0]['grads_mb']:.1f} MB (part of every 'step MB')")
    reset = all(r["peak_reset"] for rs in runs.values() for r in rs)
    print("step MB = peak RSS (VmHWM) - baseline RSS of a fresh process, median over rounds"
          + ("; the peak was reset to the baseline before the updates" if reset else
             "; WARNING: the peak could not be reset, so the baseline is the peak of the setup"))
    print("us/sample = time of the timed updates / samples: median and best (min) over rounds; on a shared "
          "machine the best is the steadier estimate of the cost")
    for config in CONFIGS:
        print(f"  {config:<13} per round: step MB " + " ".join(f"{r['step_mb']:.0f}" for r in runs[config])
              + ", us/sample " + " ".join(f"{r['us_per_sample']:.1f}" for r in runs[config]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
