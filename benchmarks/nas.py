"""Search strategies on the nas-digits space: which finds the true best, after how many trials; trials per minute.

The space is ``trainflow.examples.nas_digits.space`` (input {clean, noisy} x block {mlp,
identity, zero} x width {4, 32}: 12 architectures), each trial trained by the example's
``evaluate`` (trainflow ``Trainer``, SGD with momentum, ``--epochs`` epochs, the validation
accuracy reported after each epoch and at the end).

1. Ground truth: every architecture built under ``fixed_arch`` and trained with torch seeds
   0 .. ``--seeds``-1; the *true best* is the architecture with the best mean. The two
   architectures the example knows to be best (``KNOWN_BEST``: clean input, width 32, an
   ``mlp`` or ``identity`` block) are within seed noise of each other, so the table also
   counts reaching either of them.
2. Strategies, each as an ``Experiment`` with ``--budget`` trials (the grid: all 12), run
   with experiment seeds 0 .. ``--repeats``-1: ``GridSearch``, ``Random``,
   ``TPE(n_startup_trials=4)`` and ``RegularizedEvolution(population_size=4, sample_size=2,
   mutation_prob=0.5)``. For each: in how many runs the true best architecture was sampled and,
   when it was, at which trial (1-based; median and range); the same for either known best;
   and how often the experiment's ``best()`` is the true best or a known best. A trial's value
   depends on its seed (experiment seed, trial number), so ``best()`` can pick the other known
   best even when both were sampled.
3. Throughput: trials per minute of a full ``GridSearch`` (12 trials) with concurrency 1 and 2
   (worker processes sharing a journal file), and, as the baseline, the same 12 trainings in a
   plain loop without an experiment; interleaved round by round in a rotating order, because
   the machine is shared, after one untimed training; wall time of ``run()``, worker start-up
   included.

4. One-shot search on the ``darts-digits`` space (input {clean, noisy} x block {mlp, identity,
   zero}: 6 architectures; ``trainflow.examples.darts_digits``), the digits' training split halved
   (weights, architecture) as the example does, ``--darts-epochs`` epochs:
   - overhead: ``DartsTrainer`` (first order) against a hand-written first-order DARTS loop
     (``for x in train: v = next(valid); arch update on v; weight update on x``), same model,
     data and epochs, one thread, rotating which runs first, the minimum of ``--darts-runs``
     runs each: the ratio should be <= 1.05. The hand loop is timed twice: as seed 002 writes
     it (each ``backward()`` fills every gradient) and with ``backward(inputs=...)`` into the
     updated parameters only, the work trainflow's isolation does (the like-for-like ratio).
     And the cost of second order (``unrolled=True``) over first order, the same way;
   - picks: the architecture that first order, second order, Gumbel (``gumbel=(2, 0.5)``) and
     SPOS (supernet training, then a grid over the 6 paths scored on the architecture half with
     the shared weights) export on seeds 0 .. ``--seeds``-1, against the exhaustive ground truth:
     each of the 6 architectures retrained from scratch (``darts_digits.retrain``) and scored
     on the held-out split, ``--seeds`` seeds each.

Run:
    OMP_NUM_THREADS=1 python benchmarks/nas.py              # as in docs/performance.md
    OMP_NUM_THREADS=1 python benchmarks/nas.py --quick      # smoke run
    OMP_NUM_THREADS=1 python benchmarks/nas.py --throughput-only --rounds 9
    OMP_NUM_THREADS=1 python benchmarks/nas.py --oneshot-only --seeds 5   # the one-shot figures
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import trainflow
from trainflow.data import digits
from trainflow.examples import darts_digits, nas_digits
from trainflow.nas import TPE, DartsTrainer, Experiment, FunctionalTrainer, GridSearch, Random, RegularizedEvolution
from trainflow.nas import SinglePathTrainer, fixed_arch, replace_layer_choice, search_space
from trainflow.nas.darts import DartsLayerChoice


def strategies() -> dict:
    return {
        "GridSearch": GridSearch(),
        "Random": Random(),
        "TPE": TPE(n_startup_trials=4),
        "RegularizedEvolution": RegularizedEvolution(population_size=4, sample_size=2, mutation_prob=0.5),
    }


LABELS = list(search_space(nas_digits.space))


def key(arch: dict) -> str:
    """An architecture as a JSON string, its labels in the space's order."""
    return json.dumps({label: arch[label] for label in LABELS})


def ground_truth(epochs: int, seeds: int) -> dict[str, list[float]]:
    """Every architecture trained with torch seeds 0 .. seeds-1: {arch key: values}."""
    space = search_space(nas_digits.space)
    values: dict[str, list[float]] = {}
    for options in itertools.product(*space.values()):
        arch = dict(zip(space, options))
        values[key(arch)] = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            with fixed_arch(arch):
                model = nas_digits.space()
            values[key(arch)].append(nas_digits.evaluate(model, epochs=epochs))
    return values


def search(strategy, budget: int | None, seed: int, epochs: int) -> Experiment:
    experiment = Experiment(
        nas_digits.space, FunctionalTrainer(nas_digits.evaluate, epochs=epochs), strategy, max_trials=budget, seed=seed
    )
    experiment.run()
    return experiment


def first_at(trials, targets: set[str]) -> int | None:
    """The 1-based position of the first trial whose architecture is in ``targets``."""
    return next((i for i, t in enumerate(trials, 1) if key(t.architecture) in targets), None)


def spread(found: list[int]) -> str:
    if not found:
        return "-"
    return f"{statistics.median(found):g} ({min(found)}-{max(found)})"


def plain_loop(epochs: int, seed: int) -> int:
    """The 12 architectures trained one after the other without an experiment: the baseline."""
    space = search_space(nas_digits.space)
    for i, options in enumerate(itertools.product(*space.values())):
        torch.manual_seed(seed * 100 + i)
        with fixed_arch(dict(zip(space, options))):
            model = nas_digits.space()
        nas_digits.evaluate(model, epochs=epochs)
    return i + 1


def throughput(epochs: int, rounds: int) -> dict[str, list[float]]:
    """Trials per minute of a full grid with concurrency 1 and 2, and of a plain loop, interleaved."""
    order = [("loop", 1, 2), (2, 1, "loop"), (1, "loop", 2)]
    rates: dict = {"loop": [], 1: [], 2: []}
    with fixed_arch(nas_digits.KNOWN_BEST[0]):
        nas_digits.evaluate(nas_digits.space(), epochs=1)  # untimed: the first training loads the data, the metrics
    for r in range(rounds):
        for concurrency in order[r % 3]:
            if concurrency == "loop":
                start = time.perf_counter()
                done = plain_loop(epochs, r)
                wall = time.perf_counter() - start
                rates["loop"].append(60 * done / wall)
                print(f"  round {r + 1}, plain loop: {done} trainings in {wall:.1f} s = {60 * done / wall:.0f} per min",
                      flush=True)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                experiment = Experiment(
                    nas_digits.space, FunctionalTrainer(nas_digits.evaluate, epochs=epochs), GridSearch(),
                    concurrency=concurrency, storage=Path(tmp) / "journal.log", seed=r,
                )
                start = time.perf_counter()
                experiment.run()
                wall = time.perf_counter() - start
                done = sum(t.state == "complete" for t in experiment.trials())
            rates[concurrency].append(60 * done / wall)
            print(f"  round {r + 1}, concurrency {concurrency}: {done} trials in {wall:.1f} s = "
                  f"{60 * done / wall:.0f} trials/min", flush=True)
    return rates


ONESHOT = ("first order", "second order", "gumbel", "spos")


def _oneshot_model(seed: int):
    """The darts-digits supernet, its loss and optimizer, and the data halves, from ``seed``."""
    torch.manual_seed(seed)
    train, val = digits(batch_size=64, seed=seed)
    weights_half, arch_half = darts_digits.halves(train, seed)
    model = darts_digits.space()

    def loss(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    return model, loss, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), weights_half, arch_half, train, val


def oneshot_search(method: str, seed: int, epochs: int) -> dict:
    """One search of the darts-digits space by ``method``; the architecture it exports."""
    model, loss, opt, weights_half, arch_half, _, _ = _oneshot_model(seed)
    if method == "spos":
        spos = SinglePathTrainer(model, loss, opt, seed=seed, progress=False)
        spos.fit(weights_half, epochs=epochs)

        def score(m):
            m.eval()
            with torch.no_grad():
                right = sum((m(x).argmax(1) == y).sum().item() for x, y in arch_half)
            m.train()
            return right / len(arch_half.dataset)

        return spos.search(score, strategy=GridSearch())
    options = {"second order": {"unrolled": True}, "gumbel": {"gumbel": (2.0, 0.5)}}.get(method, {})
    search = DartsTrainer(model, loss, opt, arch_lr=3e-3, progress=False, **options)
    search.fit(weights_half, arch_half, epochs=epochs)
    return search.export()


def hand_darts(seed: int, epochs: int, isolated: bool = False) -> dict:
    """First-order DARTS written by hand on the same supernet and data: the overhead baseline.

    Written as seed 002's sketch is, each ``backward()`` fills every gradient (the weights' in the
    architecture update, the alphas' in the weight update); ``isolated`` differentiates into the
    updated parameters only (``backward(inputs=...)``), the work trainflow's isolation does.
    """
    model, loss, opt, weights_half, arch_half, _, _ = _oneshot_model(seed)
    modules = replace_layer_choice(model, DartsLayerChoice)
    alphas = [m.alpha for _, m in modules]
    weights = [p for p in model.parameters() if all(p is not a for a in alphas)]
    arch_opt = torch.optim.Adam(alphas, lr=3e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    valid = iter(arch_half)
    for _ in range(epochs):
        for x in weights_half:
            try:
                v = next(valid)
            except StopIteration:
                valid = iter(arch_half)
                v = next(valid)
            arch_opt.zero_grad()
            loss(v).backward(inputs=alphas if isolated else None)
            arch_opt.step()
            opt.zero_grad()
            loss(x).backward(inputs=weights if isolated else None)
            opt.step()
    return {label: m.options[int(m.alpha.argmax())] for label, m in modules}


def oneshot(epochs: int, seeds: int, runs: int, retrain_epochs: int) -> None:
    """Overhead against a hand loop, second order's cost, and the picks against the ground truth."""
    timed = {
        "hand loop": lambda s: hand_darts(s, epochs),
        "hand, inputs=": lambda s: hand_darts(s, epochs, isolated=True),
        "first order": lambda s: oneshot_search("first order", s, epochs),
        "second order": lambda s: oneshot_search("second order", s, epochs),
    }
    times: dict[str, list[float]] = {name: [] for name in timed}
    oneshot_search("first order", 0, 1)  # untimed: the first run loads the data and imports the rest
    for r in range(runs):
        names = list(timed)[r % len(timed):] + list(timed)[: r % len(timed)]  # rotate which runs first
        for name in names:
            start = time.perf_counter()
            timed[name](0)
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    print(f"\none-shot search of the darts-digits space ({epochs} epochs, minimum of {runs} runs, one thread):")
    for name, values in times.items():
        print(f"  {name:<13} {best[name]:.3f} s  (runs: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"  DartsTrainer / hand loop: {best['first order'] / best['hand loop']:.3f}; DartsTrainer / hand loop "
          f"with backward(inputs=): {best['first order'] / best['hand, inputs=']:.3f}; "
          f"second order / first order: {best['second order'] / best['first order']:.2f}x", flush=True)

    labels = list(search_space(darts_digits.space))
    every = [dict(zip(labels, options)) for options in itertools.product(*search_space(darts_digits.space).values())]
    truth = {}
    for arch in every:
        values = []
        for seed in range(seeds):
            _, _, _, _, _, train, val = _oneshot_model(seed)
            values.append(darts_digits.retrain(arch, train, val, seed, epochs=retrain_epochs))
        truth[json.dumps(arch)] = statistics.mean(values)
    ranked = sorted(truth, key=truth.get, reverse=True)
    known = {json.dumps(a) for a in darts_digits.KNOWN_BEST}
    print(f"  ground truth (each architecture retrained from scratch for {retrain_epochs} epochs, {seeds} seeds, "
          "held-out accuracy), best first:")
    for k in ranked:
        print(f"    {k:<40} {truth[k]:.4f}" + (" <- true best" if k == ranked[0] else " <- known best" if k in known else ""))
    print(f"  {'method':<13} {'true best':>9} {'known best':>10}  picks (seeds 0-{seeds - 1})")
    for method in ONESHOT:
        picks = [json.dumps(oneshot_search(method, seed, epochs)) for seed in range(seeds)]
        print(f"  {method:<13} {f'{sum(p == ranked[0] for p in picks)}/{seeds}':>9} "
              f"{f'{sum(p in known for p in picks)}/{seeds}':>10}  {'; '.join(picks)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=nas_digits.EPOCHS, help="epochs per trial (default: the example's)")
    parser.add_argument("--seeds", type=int, default=3, help="ground-truth seeds per architecture (default 3)")
    parser.add_argument("--budget", type=int, default=8, help="trials per search, except the grid's 12 (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="experiment seeds per strategy (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per concurrency (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 seed, 1 repeat, 4 trials, 1 round")
    parser.add_argument("--throughput-only", action="store_true", help="skip the ground truth and the strategies")
    parser.add_argument("--oneshot-only", action="store_true", help="only the one-shot search figures")
    parser.add_argument("--darts-epochs", type=int, default=darts_digits.EPOCHS, help="epochs of a one-shot search")
    parser.add_argument("--darts-runs", type=int, default=5, help="timed runs per one-shot method (default 5)")
    parser.add_argument("--retrain-epochs", type=int, default=darts_digits.RETRAIN_EPOCHS,
                        help="epochs of each ground-truth retraining of the one-shot space")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.seeds, args.repeats, args.budget, args.rounds = 1, 1, 1, 4, 1
        args.darts_epochs, args.darts_runs, args.retrain_epochs = 1, 1, 1
    torch.set_num_threads(1)
    print(f"trainflow {trainflow.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads 1, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"epochs per trial {args.epochs}, budget {args.budget}, repeats {args.repeats}")

    start = time.perf_counter()
    if args.oneshot_only:
        oneshot(args.darts_epochs, args.seeds, args.darts_runs, args.retrain_epochs)
        print(f"total {time.perf_counter() - start:.0f} s")
        return 0
    if not args.throughput_only:
        truth = ground_truth(args.epochs, args.seeds)
        means = {k: statistics.mean(v) for k, v in truth.items()}
        ranked = sorted(means, key=means.get, reverse=True)
        true_best = ranked[0]
        known = {key(a) for a in nas_digits.KNOWN_BEST}
        print(f"\nground truth ({args.seeds} seeds per architecture, {time.perf_counter() - start:.0f} s), best first:")
        print(f"  {'architecture':<52} {'mean':>6}  values")
        for k in ranked:
            mark = " <- true best" if k == true_best else " <- known best" if k in known else ""
            print(f"  {k:<52} {means[k]:6.4f}  {' '.join(f'{v:.4f}' for v in truth[k])}{mark}")

        print(f"\nstrategies ({args.repeats} experiment seeds each):")
        header = (f"  {'strategy':<21} {'trials':>6} {'true best sampled':>17} {'at trial':>12} "
                  f"{'a known best sampled':>20} {'at trial':>12} {'best() true':>11} {'best() known':>12}")
        print(header)
        for name, strategy in strategies().items():
            budget = None if name == "GridSearch" else args.budget
            found_true, found_known, picked_true, picked_known, n_trials = [], [], 0, 0, 0
            for seed in range(args.repeats):
                experiment = search(strategy, budget, seed, args.epochs)
                trials = experiment.trials()
                n_trials = len(trials)
                if (at := first_at(trials, {true_best})) is not None:
                    found_true.append(at)
                if (at := first_at(trials, known)) is not None:
                    found_known.append(at)
                best = key(experiment.best().architecture)
                picked_true += best == true_best
                picked_known += best in known
            n = args.repeats
            print(f"  {name:<21} {n_trials:>6} {f'{len(found_true)}/{n}':>17} {spread(found_true):>12} "
                  f"{f'{len(found_known)}/{n}':>20} {spread(found_known):>12} {f'{picked_true}/{n}':>11} "
                  f"{f'{picked_known}/{n}':>12}", flush=True)

    print("\nthroughput (a full grid: 12 trials; the plain loop: the same 12 trainings, no experiment):")
    rates = throughput(args.epochs, args.rounds)
    for concurrency, values in rates.items():
        name = "plain loop" if concurrency == "loop" else f"concurrency {concurrency}"
        print(f"  {name:<13}: median {statistics.median(values):.0f} per min "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"  concurrency 1 / plain loop: {median[1] / median['loop']:.2f}; "
          f"concurrency 2 / concurrency 1: {median[2] / median[1]:.2f}x")
    if not args.throughput_only:
        oneshot(args.darts_epochs, args.seeds, args.darts_runs, args.retrain_epochs)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
