"""trainflow on a CUDA device: the compiled whole update against the hand-written eager loop,
the input path, and the host synchronisations of updates that do not log.

One short run measures everything the GPU part of the performance work promises:

1. **Equivalence**: trainflow eager and the hand loop on the device (MLP and GAN, 50 updates,
   max abs weight difference), and the compiled update against eager (max abs difference).
2. **Speed at batch 64**, MLP (784-64-64-10, SGD) and GAN (D x3 / G x1, Adam), the models of
   ``benchmarks/overhead.py``: the hand-written eager loop, trainflow eager, trainflow
   ``compile=True`` (the whole update compiled, CUDA graphs), on batches already on the device;
   then the MLP fed by a shuffling ``DataLoader(TensorDataset)`` on the host (the hand loop
   copies each batch with ``.to(device, non_blocking=True)``; trainflow gathers it in one
   indexing call into pinned memory and copies it one batch ahead on a side stream). Each
   contender is built once and warmed up (compiling included), then timed in interleaved
   rounds of ``--updates`` updates (``torch.cuda.synchronize`` before reading the clock); the
   table shows the median µs per update and the speed-up over the hand loop.
3. **Host synchronisations** during updates that do not log: fit inside one long epoch under
   ``torch.cuda.set_sync_debug_mode("warn")``, counting the warnings (eager and compiled, both
   input paths). The target is zero.

The targets (the last lines say which are met): ``compile=True`` at least 1.5x faster than the
hand-written eager loop for the MLP and the GAN; zero synchronisations in every row of part 3;
no compiled step falling back to eager. Exit status 0 only when every check and target holds.

Run:
    python benchmarks/gpu.py                          # 5 rounds x 1000 updates
    python benchmarks/gpu.py --quick                  # 2 rounds x 100 updates (still compiles: a minute or two)
    python benchmarks/gpu.py --quick --device cpu     # the same script on the CPU: checks that it runs

Without a CUDA device (and without ``--device cpu``) it says so and exits 0. On the CPU the
figures mean nothing for the GPU targets and part 3 is skipped (there is no device to wait for).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import BATCH, LATENT, build_gan, build_mlp, make_gan_batches, make_mlp_batches  # noqa: E402

import trainflow  # noqa: E402
from trainflow import Step, Trainer  # noqa: E402


class Contender:
    """One way of training, built once: ``run(n)`` does ``n`` more updates; ``models`` are its modules."""

    def __init__(self, name: str, run: Callable[[int], None], models: list[torch.nn.Module]) -> None:
        self.name, self.run, self.models = name, run, models


def hand(case: str, data: Any, device: torch.device) -> Contender:
    if case == "gan":
        gen, disc, g_opt, d_opt = build_gan(device)
        fake_noise = lambda real: torch.randn(real.shape[0], LATENT, device=device)  # noqa: E731
        models = [gen, disc]
    else:
        model, opt = build_mlp(device)
        models = [model]
    state = {"n": 0, "it": iter(())}

    def batch() -> Any:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(data)
            return next(state["it"])

    def run(updates: int) -> None:
        for _ in range(updates):
            b = batch()
            if case == "gan":
                real = b
                if state["n"] % 4 < 3:
                    d_opt.zero_grad()
                    fake = gen(fake_noise(real)).detach()
                    r, f = disc(real), disc(fake)
                    loss = (F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
                            + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))
                    loss.backward()
                    d_opt.step()
                else:
                    g_opt.zero_grad()
                    logits = disc(gen(fake_noise(real)))
                    F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
                    g_opt.step()
            else:
                x, y = b
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                opt.zero_grad()
                F.cross_entropy(models[0](x), y).backward()
                opt.step()
            state["n"] += 1

    return Contender("hand eager", run, models)


def flow(case: str, data: Any, device: torch.device, compile: bool) -> Contender:
    # compiled contenders are built one after another in this process: each step compiles in a
    # region of its own (trainflow.compiled), so none of them meets dynamo's recompile limit
    if case == "gan":
        gen, disc, g_opt, d_opt = build_gan(device)

        def d_loss(real):
            fake = gen(torch.randn(real.shape[0], LATENT, device=real.device)).detach()
            r, f = disc(real), disc(fake)
            return (F.binary_cross_entropy_with_logits(r, torch.ones_like(r))
                    + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)))

        def g_loss(real):
            logits = disc(gen(torch.randn(real.shape[0], LATENT, device=real.device)))
            return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))

        models = {"G": gen, "D": disc}
        steps = [Step(d_loss, d_opt, name="D", repeat=3), Step(g_loss, g_opt, name="G")]
    else:
        model, opt = build_mlp(device)
        models = {"model": model}
        steps = [Step(lambda b: F.cross_entropy(model(b[0]), b[1]), opt)]
    trainer = Trainer(models, steps, device=device, compile=compile, progress=False)

    def run(updates: int) -> None:
        trainer.fit(data, max_updates=trainer.updates + updates)

    contender = Contender("trainflow compiled" if compile else "trainflow eager", run, list(models.values()))
    contender.trainer = trainer  # type: ignore[attr-defined]
    return contender


def loader(device: torch.device, n_batches: int) -> torch.utils.data.DataLoader:
    x, y = (torch.cat(t) for t in zip(*make_mlp_batches(torch.device("cpu"), n_batches)))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=True)


def max_diff(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> float:
    pa, pb = [p for m in a for p in m.parameters()], [p for m in b for p in m.parameters()]
    return max((x - y).abs().max().item() for x, y in zip(pa, pb))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fell_back(contender: Contender) -> list[str]:
    """Why the compiled steps of ``contender`` run (partly) eagerly: fallbacks and dynamo's limit."""
    runners = [r.compiled for r in contender.trainer._runners.values() if r.compiled is not None]
    return ([c.eager_reason for c in runners if c.eager_reason is not None]
            + [f"{c.name}: dynamo's recompile limit" for c in runners if c.limit_warned])


def timed(contenders: list[Contender], rounds: int, updates: int, device: torch.device) -> dict[str, float]:
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
        for c in order:
            synchronize(device)
            start = time.perf_counter()
            c.run(updates)
            synchronize(device)
            times[c.name].append((time.perf_counter() - start) / updates * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def syncs_during(run: Callable[[], None]) -> int:
    """How many synchronising CUDA calls ``run`` makes (torch.cuda.set_sync_debug_mode("warn"))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed segments per contender (default 5)")
    parser.add_argument("--updates", type=int, default=1000, help="updates per timed segment (default 1000)")
    parser.add_argument("--warmup", type=int, default=200, help="updates before timing, compiling included")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 100 updates, 60 warm-up")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: run the same checks on the CPU, to check the script itself (default cuda)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.updates, args.warmup = 2, 100, 60
    print(f"trainflow {trainflow.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure here (run this on a machine with one, or pass --device cpu "
              "to check the script on the CPU)")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"device: {name}; rounds={args.rounds} updates/segment={args.updates} "
          f"warmup={args.warmup} batch={BATCH}")
    speedups: dict[str, float] = {}
    ok = True

    print("\n1. equivalence (50 updates from the same seed)")
    for case, data in (("mlp", make_mlp_batches(device)), ("gan", make_gan_batches(device))):
        ref = hand(case, data, device)
        ref.run(50)
        eager = flow(case, data, device, compile=False)
        eager.run(50)
        compiled = flow(case, data, device, compile=True)
        compiled.run(50)
        eager_parts = fell_back(compiled)
        print(f"  {case}: trainflow eager vs hand max |dw| = {max_diff(eager.models, ref.models):.3g}; "
              f"compiled vs eager max |dw| = {max_diff(compiled.models, eager.models):.3g}"
              + (" (the GAN's noise is drawn by inductor's generator when compiled)" if case == "gan" else "")
              + (f"; FELL BACK: {eager_parts}" if eager_parts else ""))
        ok = ok and not eager_parts

    print("\n2. speed (µs per update, median of rounds; speed-up = hand / contender)")
    print(f"  {'case':<12} {'contender':<20} {'us/update':>10} {'speed-up':>9}")
    cases = [("mlp", make_mlp_batches(device)), ("gan", make_gan_batches(device)), ("mlp-loader", None)]
    for case, data in cases:
        kind = "gan" if case == "gan" else "mlp"
        data = data if data is not None else loader(device, 64)
        contenders = [hand(kind, data, device), flow(kind, data, device, False), flow(kind, data, device, True)]
        for c in contenders:
            c.run(args.warmup)
        medians = timed(contenders, args.rounds, args.updates, device)
        base = medians["hand eager"]
        for name, us in medians.items():
            print(f"  {case:<12} {name:<20} {us:>10.1f} {base / us:>9.2f}x")
        speedups[case] = base / medians["trainflow compiled"]
        eager_parts = fell_back(contenders[2])
        if eager_parts:
            print(f"  {case:<12} compiled: FELL BACK: {eager_parts}")
            ok = False

    print("\n3. host synchronisations during updates that do not log (inside one epoch of 64 batches)")
    for compile in (False, True) if device.type == "cuda" else ():
        for case in ("mlp", "mlp-loader", "gan"):
            kind = "gan" if case == "gan" else "mlp"
            data = loader(device, 64) if case == "mlp-loader" else \
                (make_gan_batches(device, 64) if kind == "gan" else make_mlp_batches(device, 64))
            c = flow(kind, data, device, compile)
            c.run(8)  # first updates (compiling, the first loss read) are not counted; no epoch end follows
            n = syncs_during(lambda: c.run(40))
            print(f"  {case:<12} {'compiled' if compile else 'eager':<9} syncs in 40 updates: {n}")
            ok = ok and n == 0
    if device.type != "cuda":
        print("  skipped: no CUDA device (set_sync_debug_mode counts CUDA synchronisations only)")
    for case in ("mlp", "gan"):
        met = speedups[case] >= 1.5
        print(f"target: {case} compile=True >= 1.5x the hand eager loop: {speedups[case]:.2f}x, "
              f"{'met' if met else 'NOT MET'}")
        ok = ok and met
    if device.type != "cuda":
        print("\n(CPU run: the script works; its figures say nothing about the GPU targets)")
        return 0
    print("\nall checks and targets met" if ok else "\nSOME CHECK OR TARGET FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
