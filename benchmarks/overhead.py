"""Framework overhead: trainflow's ``Trainer.fit`` vs the equivalent hand-written PyTorch loop.

Three cases, all measured in the same process, interleaved so that machine noise hits both:

- ``mlp``: 784-64-64-10 ReLU MLP, batch 64, SGD(lr=1e-3), cross-entropy, synthetic data;
- ``mlp-loader``: the same MLP, both sides fed by the same
  ``DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)`` (the hand loop iterates it
  as usual; trainflow reads each batch in one indexing call, :mod:`trainflow.data.fetch`);
- ``gan``: MLP generator (latent 64 -> 128 -> 784) and discriminator (784 -> 128 -> 1), Adam,
  BCE-with-logits, cycle D x3 / G x1 (``[Step(d_loss, d_opt, name="D", repeat=3),
  Step(g_loss, g_opt, name="G")]``).

Both sides do the same work: the same list of pre-made batches (so data loading costs the
same, and little; ``mlp-loader``: the same DataLoader), models and optimizers rebuilt fresh from the same seed for every run, and
the same number of optimizer updates (``max_updates`` for trainflow; the hand loop iterates the
same batches, epoch after epoch, and stops at the same count). Only the loop itself is timed
(``time.perf_counter`` around ``fit`` / the hand loop), not building models or optimizers.

Before timing, the script checks that both produce bit-identical weights (``torch.equal`` on
every parameter after 50 updates from the same seed) and exits with status 1 if not.

Run:
    python benchmarks/overhead.py                 # full: 5 rounds x 1000 updates per case
    python benchmarks/overhead.py --quick         # smoke run
    python benchmarks/overhead.py --rounds 7 --updates 2000
    python benchmarks/overhead.py --threads 1     # steadier when other jobs share the cores
    python benchmarks/overhead.py --device cuda

Results and analysis: docs/performance.md ("Framework overhead").
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import trainflow
from trainflow import Step, Trainer

BATCH = 64
N_BATCHES = 32  # 2048 samples: the epoch the loops cycle over ("several epochs" per run)
LATENT = 64
SEED = 4
CHECK_UPDATES = 50


# ---------------------------------------------------------------------------- data


def make_mlp_batches(device: torch.device, n: int = N_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(BATCH, 784, generator=g).to(device), torch.randint(0, 10, (BATCH,), generator=g).to(device))
        for _ in range(n)
    ]


def make_mlp_loader(device: torch.device, n: int = N_BATCHES) -> torch.utils.data.DataLoader:
    """The MLP's data as a shuffling DataLoader over a TensorDataset (on the CPU, as a user has it)."""
    x, y = (torch.cat(t) for t in zip(*make_mlp_batches(torch.device("cpu"), n)))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def make_gan_batches(device: torch.device, n: int = N_BATCHES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5678)
    return [(torch.rand(BATCH, 784, generator=g) * 2 - 1).to(device) for _ in range(n)]


# ---------------------------------------------------------------------------- MLP


def build_mlp(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model.to(device)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def hand_mlp(batches: list, updates: int, device: torch.device) -> tuple[float, list[nn.Module]]:
    model, opt = build_mlp(device)
    model.train()
    n = 0
    start = _now(device)
    while n < updates:
        for x, y in batches:
            if device.type != "cpu":  # a loader's batches are on the CPU (pre-made ones are moved already)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            n += 1
            if n == updates:
                break
    return _now(device) - start, [model]


def trainflow_mlp(batches: list, updates: int, device: torch.device) -> tuple[float, list[nn.Module]]:
    model, opt = build_mlp(device)

    def ce(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    trainer = Trainer(model, [Step(ce, opt)], device=device)
    start = _now(device)
    trainer.fit(batches, max_updates=updates)
    elapsed = _now(device) - start
    assert trainer.updates == updates, trainer.updates
    return elapsed, [model]


# ---------------------------------------------------------------------------- GAN


def build_gan(device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    gen = nn.Sequential(nn.Linear(LATENT, 128), nn.ReLU(), nn.Linear(128, 784), nn.Tanh()).to(device)
    disc = nn.Sequential(nn.Linear(784, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1)).to(device)
    g_opt = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return gen, disc, g_opt, d_opt


def _gan_losses(gen: nn.Module, disc: nn.Module) -> tuple[Callable, Callable]:
    def d_loss(real: torch.Tensor) -> torch.Tensor:
        fake = gen(torch.randn(real.shape[0], LATENT, device=real.device)).detach()
        real_logits, fake_logits = disc(real), disc(fake)
        return F.binary_cross_entropy_with_logits(
            real_logits, torch.ones_like(real_logits)
        ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))

    def g_loss(real: torch.Tensor) -> torch.Tensor:
        logits = disc(gen(torch.randn(real.shape[0], LATENT, device=real.device)))
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

    return d_loss, g_loss


def hand_gan(batches: list, updates: int, device: torch.device) -> tuple[float, list[nn.Module]]:
    gen, disc, g_opt, d_opt = build_gan(device)
    d_loss, g_loss = _gan_losses(gen, disc)
    gen.train()
    disc.train()
    n = 0
    start = _now(device)
    while n < updates:
        for real in batches:
            if n % 4 < 3:  # D, D, D, G, ...
                d_opt.zero_grad()
                loss = d_loss(real)
                loss.backward()
                d_opt.step()
            else:
                g_opt.zero_grad()
                loss = g_loss(real)
                loss.backward()
                g_opt.step()
            n += 1
            if n == updates:
                break
    return _now(device) - start, [gen, disc]


def trainflow_gan(batches: list, updates: int, device: torch.device) -> tuple[float, list[nn.Module]]:
    gen, disc, g_opt, d_opt = build_gan(device)
    d_loss, g_loss = _gan_losses(gen, disc)
    trainer = Trainer(
        {"G": gen, "D": disc},
        [Step(d_loss, d_opt, name="D", repeat=3), Step(g_loss, g_opt, name="G")],
        device=device,
    )
    start = _now(device)
    trainer.fit(batches, max_updates=updates)
    elapsed = _now(device) - start
    assert trainer.updates == updates, trainer.updates
    return elapsed, [gen, disc]


#: ``--clock cpu``: this process's CPU time instead of wall time (other jobs on the machine do not inflate it)
CPU_CLOCK = False


def _now(device: torch.device) -> float:
    """``time.perf_counter()``, after the device's queued work has finished (CUDA is asynchronous)."""
    if CPU_CLOCK:
        return time.process_time()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


CASES: dict[str, dict[str, Any]] = {
    "mlp": {"hand": hand_mlp, "trainflow": trainflow_mlp, "data": make_mlp_batches},
    "mlp-loader": {"hand": hand_mlp, "trainflow": trainflow_mlp, "data": make_mlp_loader},
    "gan": {"hand": hand_gan, "trainflow": trainflow_gan, "data": make_gan_batches},
}


# ---------------------------------------------------------------------------- measuring


def same_weights(a: list[nn.Module], b: list[nn.Module]) -> bool:
    pa = [p for m in a for p in m.parameters()]
    pb = [p for m in b for p in m.parameters()]
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


def run_once(fn: Callable, batches: list, updates: int, device: torch.device) -> float:
    gc.collect()
    elapsed, _ = fn(batches, updates, device)
    return elapsed / updates * 1e6  # microseconds per update


def measure(case: str, rounds: int, updates: int, warmup: int, device: torch.device,
            sides: tuple[str, ...] = ("hand", "trainflow")) -> dict[str, Any]:
    spec = CASES[case]
    batches = spec["data"](device)
    for side in sides:
        if warmup:
            run_once(spec[side], batches, warmup, device)
    times: dict[str, list[float]] = {"hand": [], "trainflow": []}
    for r in range(rounds):
        # alternate which side goes first so that drifts in machine load do not favour one
        for name in (sides if r % 2 == 0 else sides[::-1]):
            times[name].append(run_once(spec[name], batches, updates, device))
    if len(sides) == 1:  # one side only (an instruction count under callgrind): its time, no ratio
        med = statistics.median(times[sides[0]])
        times[{"hand": "trainflow", "trainflow": "hand"}[sides[0]]] = [math.nan] * rounds
        return {"case": case, sides[0]: med, {"hand": "trainflow", "trainflow": "hand"}[sides[0]]: math.nan,
                "ratio": math.nan, "paired": math.nan, "times": times}
    hand_med = statistics.median(times["hand"])
    flow_med = statistics.median(times["trainflow"])
    return {
        "case": case,
        "hand": hand_med,
        "trainflow": flow_med,
        "ratio": flow_med / hand_med,
        "paired": statistics.median(f / h for f, h in zip(times["trainflow"], times["hand"])),
        "times": times,
    }


def check_identical(device: torch.device) -> bool:
    """Same seed, same batches, CHECK_UPDATES updates each: every parameter must be bit-identical."""
    ok = True
    for case in CASES:
        spec = CASES[case]
        batches = spec["data"](device)
        _, hand_models = spec["hand"](batches, CHECK_UPDATES, device)
        _, flow_models = spec["trainflow"](batches, CHECK_UPDATES, device)
        same = same_weights(hand_models, flow_models)
        print({"mlp": "weights identical", "gan": "weights identical (gan, G and D)"}.get(
            case, f"weights identical ({case})") + f": {same}")
        ok = ok and same
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved hand/trainflow runs per case (default 5)")
    parser.add_argument("--updates", type=int, default=1000, help="optimizer updates per timed run (default 1000)")
    parser.add_argument("--warmup", type=int, default=300, help="untimed updates per side before timing (default 300)")
    parser.add_argument("--case", choices=["all", *CASES], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 100 updates, 50 warm-up")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--side", choices=["both", "hand", "trainflow"], default="both",
                        help="run one side only, e.g. to count its instructions under callgrind")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or this process's CPU time (CPU only; steadier on a shared machine)")
    parser.add_argument("--no-check", action="store_true", help="skip the bit-identity check before timing")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.updates, args.warmup = 2, 100, 50
    if args.rounds < 1 or args.updates < 1 or args.warmup < 0:
        parser.error("--rounds and --updates must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    global CPU_CLOCK
    CPU_CLOCK = args.clock == "cpu"
    if CPU_CLOCK and device.type != "cpu":
        parser.error("--clock cpu measures CPU work only: use it with --device cpu")

    print(
        f"trainflow {trainflow.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.machine()}, device={device}, torch.get_num_threads()={torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
    )
    print(f"rounds={args.rounds} updates/run={args.updates} warmup={args.warmup} batch={BATCH} clock={args.clock}")
    if not args.no_check and not check_identical(device):
        print("FAIL: trainflow and the hand-written loop produced different weights", file=sys.stderr)
        return 1

    cases = list(CASES) if args.case == "all" else [args.case]
    sides = ("hand", "trainflow") if args.side == "both" else (args.side,)
    results = [measure(c, args.rounds, args.updates, args.warmup, device, sides) for c in cases]
    print()
    print(f"{'case':<10} {'hand us/update':>15} {'trainflow us/update':>20} {'ratio':>7} {'paired':>7}")
    for res in results:
        print(
            f"{res['case']:<10} {res['hand']:>15.1f} {res['trainflow']:>20.1f} "
            f"{res['ratio']:>7.3f} {res['paired']:>7.3f}"
        )
    print("median over rounds; ratio = trainflow/hand of the medians; paired = median of the per-round ratios")
    for res in results:
        for side in ("hand", "trainflow"):
            print(f"  {res['case']} {side:<9} per round: " + " ".join(f"{t:.1f}" for t in res["times"][side]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
