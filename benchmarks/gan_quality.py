"""How good are the DCGAN example's digits, and how long does it take to get them?

Runs ``trainflow.examples.dcgan.run`` with its defaults (120 epochs) in a fresh output folder
for each seed, then prints the per-epoch quality figures from its ``metrics.csv``:

- ``confidence``: a digits CNN's mean max softmax probability on 1,000 generated samples;
- ``entropy``: the entropy (nats) of the CNN's predicted-class histogram (max ln 10 = 2.303);

and the wall time of the whole run (the classifier's training included: the folder is new),
the first epoch at which both targets (confidence >= 0.90, entropy >= 2.25) are met, and the
elapsed time at that epoch. Exits 1 when a seed misses the targets at the end or takes over
``--limit`` seconds.

``--compare`` times the same run against the equivalent hand-written PyTorch loop
(:func:`hand_run`: the same models, optimizers, seed, data order and updates, the same
per-epoch quality measure, CSV row and checkpoint, the same sample grids and final files),
interleaved round by round (the order alternates), with the digits classifier trained once
beforehand and copied into every run's folder, so neither side trains it. It checks that
both end with bit-identical weights (G, D, G_ema; ``torch.equal``) and exits 1 if not, then
prints the wall and CPU time of each side per round, their medians and the ratios.

Run:
    OMP_NUM_THREADS=1 python benchmarks/gan_quality.py                 # seed 0, one torch thread
    OMP_NUM_THREADS=2 python benchmarks/gan_quality.py --threads 2     # both cores
    python benchmarks/gan_quality.py --seeds 0 1 2 3 4 --every 20      # robustness over seeds
    OMP_NUM_THREADS=1 python benchmarks/gan_quality.py --compare --rounds 3   # against the hand loop
    # instructions per epoch: one side under callgrind, a 4-epoch run minus a 2-epoch run, halved
    OMP_NUM_THREADS=1 valgrind --tool=callgrind python benchmarks/gan_quality.py --compare --side hand \
        --rounds 1 --epochs 2 --out /tmp/dcgan-cg   # --out keeps the classifier: later runs load it
    python benchmarks/gan_quality.py --quick                           # smoke run: 1 epoch, no targets
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainflow.callbacks import SampleGrid
from trainflow.data import digits
from trainflow.examples import dcgan
from trainflow.examples.artifacts import plot_curves, save_weights
from trainflow.examples.quality import CLASSIFIER_FILE, SampleQuality, digits_classifier

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


def hand_run(out_dir: Path, seed: int, epochs: int) -> dict[str, torch.nn.Module]:
    """``dcgan.run`` as a hand-written loop: what a user writes for the same run without trainflow.

    The same opening (global seed, classifier, loader, models, optimizers, fixed noise, in the
    same order, so the same random draws), then per batch: D's update, G's update on the same
    batch, the EMA of G; per epoch: the quality of 1,000 samples, a CSV row with the mean losses,
    a checkpoint (models, optimizers, RNG state; written to a temporary file, fsynced, renamed,
    the last two kept) and every 10 epochs a sample grid; at the end the final grid, the curves
    and the weights. Returns the models.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    classifier = digits_classifier(out_dir)
    train, _ = digits(batch_size=dcgan.BATCH, flatten=False, seed=seed)
    generator, discriminator = dcgan.build_generator(), dcgan.build_discriminator()
    g_ema = dcgan.build_generator().requires_grad_(False)
    g_ema.load_state_dict(generator.state_dict())
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=6e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(generator.parameters(), lr=8e-4, betas=(0.5, 0.999))
    fixed = torch.Generator().manual_seed(seed)
    grid_noise = torch.randn(64, dcgan.LATENT, generator=fixed)
    quality = SampleQuality(g_ema, classifier, torch.randn(dcgan.QUALITY_SAMPLES, dcgan.LATENT, generator=fixed))
    grid = SampleGrid(g_ema, grid_noise)
    models = {"G": generator, "D": discriminator, "G_ema": g_ema}
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    rows, saved, updates = [], [], 0
    for model in models.values():
        model.train()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        d_sum = g_sum = torch.zeros(())
        n = 0
        for real, _ in train:
            b = len(real)
            fake = generator(torch.randn(b, dcgan.LATENT)).detach()
            labels = torch.cat([torch.ones(b, 1), torch.zeros(b, 1)])
            labels = labels + dcgan.LABEL_NOISE * torch.rand_like(labels)
            d_opt.zero_grad()
            d_loss = F.binary_cross_entropy_with_logits(discriminator(torch.cat([fake, real])), labels)
            d_loss.backward()
            d_opt.step()
            g_opt.zero_grad()
            g_loss = F.binary_cross_entropy_with_logits(discriminator(generator(torch.randn(b, dcgan.LATENT))),
                                                        torch.zeros(b, 1))
            g_loss.backward()
            g_opt.step()
            with torch.no_grad():  # the example's WeightAverage, written out
                for avg, value in (*zip(g_ema.parameters(), generator.parameters()),
                                   *zip(g_ema.buffers(), generator.buffers())):
                    if avg.is_floating_point():
                        avg.lerp_(value, 1 - dcgan.EMA_DECAY)
            d_sum, g_sum, n, updates = d_sum + d_loss.detach(), g_sum + g_loss.detach(), n + 1, updates + 2
        row = {"epoch": epoch, "updates": updates, "seconds": 0.0, "D/loss": (d_sum / n).item(),
               "G/loss": (g_sum / n).item(), **quality.measure()}
        if epoch % dcgan.SAMPLE_EVERY_EPOCHS == 0:
            grid.save(out_dir / f"samples_{updates}.png", f"samples at update {updates:,} (epoch {epoch})")
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        with open(out_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(rows)
        path = out_dir / "checkpoints" / f"epoch-{epoch:04d}.pt"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save({"models": {k: m.state_dict() for k, m in models.items()}, "D": d_opt.state_dict(),
                        "G": g_opt.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch, "rows": rows}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        saved.append(path)
        if len(saved) > 2:
            saved.pop(0).unlink()
    grid.save(out_dir / "samples.png", f"samples at update {updates:,} (epoch {epochs})")
    plot_curves(out_dir / "metrics.csv", out_dir / "curves.png")
    save_weights(models, out_dir / "weights.pt")
    return models


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def compare(root: Path, seed: int, rounds: int, epochs: int | None, warmup: bool = True,
            sides: tuple[str, ...] = ("hand", "trainflow")) -> int:
    """Interleaved rounds of ``dcgan.run`` and :func:`hand_run`; 1 if their weights differ.

    ``warmup``: first one untimed epoch of each side (imports, matplotlib's first figure).
    ``sides``: one side alone runs only that side (an instruction count under callgrind).
    """
    epochs = epochs or dcgan.EPOCHS
    classifier = root / "classifier"
    digits_classifier(classifier)  # trained once, outside the timings (loaded when --out holds it)
    times: dict[str, list[tuple[float, float]]] = {"hand": [], "trainflow": []}
    order = list(sides)
    if warmup:
        for side in order:
            out = _fresh(root / f"warmup-{side}")
            shutil.copy(classifier / CLASSIFIER_FILE, out / CLASSIFIER_FILE)
            hand_run(out, seed, 1) if side == "hand" else dcgan.run(out, epochs=1, progress=False, seed=seed)
    for r in range(rounds):
        for side in order if r % 2 == 0 else order[::-1]:
            out = _fresh(root / f"{side}-{r}")
            shutil.copy(classifier / CLASSIFIER_FILE, out / CLASSIFIER_FILE)
            wall, cpu = time.perf_counter(), time.process_time()
            if side == "hand":
                hand_run(out, seed, epochs)
            else:
                dcgan.run(out, epochs=epochs, progress=False, seed=seed)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times[side].append((wall, cpu))
            print(f"round {r + 1} {side:<9} wall {wall:7.2f} s  cpu {cpu:7.2f} s", flush=True)
        if len(order) == 1:
            continue
        weights = [torch.load(root / f"{side}-{r}" / "weights.pt", weights_only=True) for side in order]
        same = all(torch.equal(weights[0][m][k], weights[1][m][k]) for m in weights[0] for k in weights[0][m])
        print(f"round {r + 1}: weights identical (G, D, G_ema): {same}")
        if not same:
            return 1
    if len(order) == 1:
        return 0
    hand_wall, tf_wall = (statistics.median(w for w, _ in times[s]) for s in order)
    hand_cpu, tf_cpu = (statistics.median(c for _, c in times[s]) for s in order)
    print(f"\n{epochs} epochs, {rounds} rounds, medians:  hand wall {hand_wall:.2f} s, cpu {hand_cpu:.2f} s;  "
          f"trainflow wall {tf_wall:.2f} s, cpu {tf_cpu:.2f} s")
    paired = [t[0] / h[0] for h, t in zip(times["hand"], times["trainflow"])]
    print(f"trainflow / hand: wall {tf_wall / hand_wall:.3f} (paired rounds {', '.join(f'{x:.3f}' for x in paired)}), "
          f"cpu {tf_cpu / hand_cpu:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--every", type=int, default=5, help="print every N-th epoch (default 5)")
    parser.add_argument("--limit", type=float, default=180.0, help="wall-time budget per run in s (default 180)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch of seed 0, and 1 of each side of --compare; no targets")
    parser.add_argument("--compare", action="store_true", help="time trainflow against the hand-written loop")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="--compare: epochs per run (default the example's)")
    parser.add_argument("--side", choices=["both", "hand", "trainflow"], default="both",
                        help="--compare: run one side only, without warm-up (for callgrind; default both)")
    args = parser.parse_args()
    epochs = 1 if args.quick else None
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.compare:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) if args.out is None else args.out
            return compare(root, args.seeds[0], args.rounds, args.epochs, warmup=args.side == "both",
                           sides=("hand", "trainflow") if args.side == "both" else (args.side,))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out if args.out is not None else Path(tmp)
        summary = []
        for seed in args.seeds:
            wall, rows, met = one_run(root / f"dcgan-seed{seed}", seed, args.every, epochs)
            last = rows[-1]
            summary.append((seed, wall, float(last["samples/confidence"]), float(last["samples/entropy"]), met))
            ok &= args.quick or (met and wall <= args.limit)
        if args.quick:  # and one epoch of --compare, with the classifier that run trained
            (root / "compare" / "classifier").mkdir(parents=True)
            shutil.copy(root / f"dcgan-seed{args.seeds[0]}" / CLASSIFIER_FILE, root / "compare" / "classifier")
            if compare(root / "compare", args.seeds[0], 1, 1, warmup=False):
                return 1
    print("\nseed  wall_s  confidence  entropy  targets")
    for seed, wall, conf, ent, met in summary:
        print(f"{seed:>4} {wall:7.1f} {conf:11.4f} {ent:8.4f}  {'met' if met else 'MISSED'}"
              f"{'' if wall <= args.limit else f' (over {args.limit:.0f} s)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
