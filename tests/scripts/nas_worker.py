"""A tiny NAS search space and training function for the NAS tests, also run as a worker process.

    python tests/scripts/nas_worker.py STORAGE NAME MAX_TRIALS [--strategy S] [--hang-on-call N --hang-file F] [--go-file G]

Runs ``Experiment(space, FunctionalTrainer(fit), ...)`` against STORAGE (a journal file or a
database URL) and prints ``done`` at the end. With ``--hang-on-call N``, the N-th trial this
process runs writes F and sleeps (the test kills the process there).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainflow.nas import (
    FunctionalTrainer,
    TPE,
    Experiment,
    GridSearch,
    InputChoice,
    LayerChoice,
    Random,
    RegularizedEvolution,
    ValueChoice,
    fixed_arch,
    report_final_result,
    report_intermediate_result,
)
from trainflow.nas.strategies import TRIAL_STREAM, derive_seed
from trainflow.nas.trial import _reporting

torch.set_num_threads(1)
_g = torch.Generator().manual_seed(0)
X = torch.randn(48, 4, generator=_g)
Y = torch.tanh(X[:, :1] - X[:, 1:2])


class Net(nn.Module):
    """Two branches of one width, one chosen input, one activation: 2 x 2 x 2 = 8 architectures."""

    def __init__(self) -> None:
        super().__init__()
        width = ValueChoice([4, 8], label="width")
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(4, width)
        self.pick = InputChoice(2, 1, label="input")
        self.act = LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act")
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.pick([self.a(x), self.b(x)])))


def space() -> nn.Module:
    return Net()


def fit(model: nn.Module, epochs: int = 2) -> None:
    """SGD on shuffled batches (the order drawn from torch's global RNG: the trial seed decides it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(X, Y), batch_size=16, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            report_intermediate_result(-F.mse_loss(model(X), Y).item())
    with torch.no_grad():
        report_final_result(-F.mse_loss(model(X), Y).item())


class _Last:
    def __init__(self) -> None:
        self.intermediate_values: list = []
        self.final_value = None

    def intermediate(self, value):
        self.intermediate_values.append(value)

    def final(self, value):
        self.final_value = value


def replay(arch: dict, index: int, seed: int = 0, fn=fit) -> tuple[list, float]:
    """One trial by hand: seed as documented, build under fixed_arch, train; (intermediate, final)."""
    s = derive_seed(seed, index, TRIAL_STREAM)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    with fixed_arch(arch):
        model = space()
    last = _Last()
    with _reporting(last):
        fn(model)
    return last.intermediate_values, last.final_value


STRATEGIES = {
    "random": Random,
    "grid": GridSearch,
    "tpe": lambda: TPE(n_startup_trials=3),
    "evolution": lambda: RegularizedEvolution(population_size=3, sample_size=2, mutation_prob=0.5),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("storage")
    parser.add_argument("name")
    parser.add_argument("max_trials", type=int)
    parser.add_argument("--strategy", default="random", choices=sorted(STRATEGIES))
    parser.add_argument("--hang-on-call", type=int, default=0)
    parser.add_argument("--hang-file", type=Path)
    parser.add_argument("--go-file", type=Path, help="print 'ready', then wait for this file before running")
    args = parser.parse_args()
    calls = 0

    def hanging_fit(model: nn.Module) -> None:
        nonlocal calls
        calls += 1
        if calls == args.hang_on_call:
            args.hang_file.write_text("hanging\n")
            time.sleep(600)
        fit(model)

    exp = Experiment(space, FunctionalTrainer(hanging_fit), STRATEGIES[args.strategy](), max_trials=args.max_trials,
                     storage=args.storage, name=args.name)
    if args.go_file is not None:  # workers started together: none finishes before another begins
        print("ready", flush=True)
        while not args.go_file.exists():
            time.sleep(0.02)
    exp.run()
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
