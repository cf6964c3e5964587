"""``nas-digits``: a multi-trial architecture search on the 8x8 digits, in a space whose best part is known.

The space (:func:`space`) is ``input -> Linear(64, width) -> ReLU -> block -> Linear(width, 10)``
with three decisions, 12 architectures in all:

- ``input``: ``"clean"`` pixels, or ``"noisy"`` ones (Gaussian noise of std 1 added to pixels
  in [0, 1], in training and in evaluation alike: a corrupted sensor);
- ``block``: ``"mlp"`` (one more ``Linear(width, width)`` and ReLU), ``"identity"``, or
  ``"zero"`` (the head sees no signal: 10% accuracy, chance);
- ``width``: ``ValueChoice([4, 32])``.

What is known before searching: clean beats noisy (about 0.95 against 0.4 validation
accuracy), any block beats ``"zero"``, and width 32 beats 4 (four ReLU units often die:
0.37-0.86). ``"mlp"`` and ``"identity"`` are within a point or two of each other on these
digits, so the best architecture is
``{"input": "clean", "block": "mlp" or "identity", "width": 32}``; the search must find one of
these two. Each trial trains with trainflow's own ``Trainer`` (SGD with momentum, 10 epochs by
default), reports the validation accuracy after every epoch and at the end
(seed 002's ``FunctionalTrainer``), and the experiment's grid search tries every architecture
once. ``runs/nas-digits/`` gets ``trials.csv``, ``best_arch.json`` and ``history.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from trainflow import Step, Trainer
from trainflow.data import digits
from trainflow.examples.artifacts import epochs_or_default
from trainflow.nas import (
    Experiment,
    FunctionalTrainer,
    GridSearch,
    LayerChoice,
    ValueChoice,
    report_final_result,
    report_intermediate_result,
)

__all__ = ["DESCRIPTION", "EPOCHS", "KNOWN_BEST", "NOISE", "WIDTHS", "Noisy", "Zero", "evaluate", "space", "run"]

DESCRIPTION = "architecture search on 8x8 digits: input x block x width, grid over 12 (seed 002)"
# Measured (benchmarks/nas.py, seeds 0-2): 10 epochs give 0.930-0.953 for the two best architectures and
# 0.37-0.86 for width 4; on a busy 2-core machine a trial takes 0.4-1 s, the 12-trial grid 5-14 s.
EPOCHS = 10
NOISE = 1.0
WIDTHS = [4, 32]
#: the architectures that are known to be best (see the module docstring)
KNOWN_BEST = [{"input": "clean", "block": block, "width": 32} for block in ("mlp", "identity")]


class Noisy(nn.Module):
    """Adds Gaussian noise of standard deviation ``std`` to its input, in training and in evaluation.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)  # the noise is drawn from torch's global generator
        >>> x = torch.zeros(1000)
        >>> round(Noisy(1.0)(x).std().item(), 1), torch.equal(Noisy(0.0)(x), x)
        (1.0, True)
    """

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x)

    def extra_repr(self) -> str:
        return f"std={self.std}"


class Zero(nn.Module):
    """Returns zeros shaped like its input: a block that passes no signal on.

    Example:
        >>> import torch
        >>> Zero()(torch.ones(2, 3)).tolist()
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def space() -> nn.Module:
    """The search space: ``input -> Linear(64, width) -> ReLU -> block -> Linear(width, 10)``.

    Candidates are given as zero-argument callables, so only the chosen one is constructed
    (and draws initial weights) when an architecture is fixed.

    Example:
        >>> from trainflow.nas import fixed_arch, search_space
        >>> search_space(space)
        {'input': ['clean', 'noisy'], 'width': [4, 32], 'block': ['mlp', 'identity', 'zero']}
        >>> with fixed_arch({"input": "clean", "block": "mlp", "width": 32}):
        ...     print(space())
        Sequential(
          (0): Identity()
          (1): Linear(in_features=64, out_features=32, bias=True)
          (2): ReLU()
          (3): Sequential(
            (0): Linear(in_features=32, out_features=32, bias=True)
            (1): ReLU()
          )
          (4): Linear(in_features=32, out_features=10, bias=True)
        )
    """
    transform = LayerChoice({"clean": nn.Identity, "noisy": lambda: Noisy(NOISE)}, label="input")
    width = ValueChoice(WIDTHS, label="width")
    block = LayerChoice(
        {"mlp": lambda: nn.Sequential(nn.Linear(width, width), nn.ReLU()), "identity": nn.Identity, "zero": Zero},
        label="block",
    )
    return nn.Sequential(transform, nn.Linear(64, width), nn.ReLU(), block, nn.Linear(width, 10))


class _ReportEachEpoch:
    """Sends each epoch's validation accuracy to the experiment (for pruning and the trial's curve)."""

    def on_validation_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        report_intermediate_result(logs["val/acc"])


def train_classifier(
    model: nn.Module, train: Any, val: Any, *, epochs: int, name: str = "fit", callbacks: Any = (), progress: bool = True
) -> float:
    """Train ``model`` on digit batches (SGD with momentum, cross-entropy); return its validation accuracy.

    What both architecture-search examples do with an architecture: a trial of ``nas-digits``,
    the retraining of the choice of ``darts-digits``.

    Example:
        >>> import torch
        >>> from trainflow.data import digits
        >>> from trainflow.nas import fixed_arch
        >>> _ = torch.manual_seed(0)
        >>> with fixed_arch({"input": "clean", "block": "zero", "width": 4}):
        ...     model = space()
        >>> train, val = digits(batch_size=64)
        >>> round(train_classifier(model, train, val, epochs=1, progress=False), 2)  # nothing reaches the head
        0.1
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    accuracy = MulticlassAccuracy(num_classes=10, average="micro")

    def loss(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def val_step(batch: Any) -> None:
        x, y = batch
        accuracy.update(model(x), y)

    trainer = Trainer(model, Step(loss, optimizer, name=name), metrics={"val/acc": accuracy},
                      callbacks=callbacks, device="cpu", progress=progress)
    trainer.fit(train, epochs=epochs, val_data=val, val_step=val_step)
    return trainer.logs["val/acc"]


def evaluate(model: nn.Module, *, epochs: int = EPOCHS, data_seed: int = 0) -> float:
    """Train ``model`` on the digits with trainflow's ``Trainer``; report and return its validation accuracy.

    The training function of a ``FunctionalTrainer``: the validation accuracy is reported after
    every epoch (``report_intermediate_result``) and once at the end (``report_final_result``).
    The train/validation split depends on ``data_seed`` only; the shuffling and the noise come
    from the global torch RNG, which an experiment seeds for each trial.

    Example:
        >>> import torch
        >>> from trainflow.nas import fixed_arch
        >>> _ = torch.manual_seed(0)
        >>> with fixed_arch({"input": "clean", "block": "zero", "width": 4}):
        ...     model = space()
        >>> round(evaluate(model, epochs=1), 2)  # no signal reaches the head: chance
        0.1
    """
    train, val = digits(batch_size=64, seed=data_seed)
    value = train_classifier(model, train, val, epochs=epochs, callbacks=[_ReportEachEpoch()])
    report_final_result(value)
    return value


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Search the space with a grid; write trials.csv, best_arch.json and history.png under ``out_dir``.

    ``epochs`` is the training length of each trial. ``resume=True`` continues the experiment
    stored in ``out_dir`` (its finished trials are kept); without it a fresh experiment starts
    and replaces an earlier one there. ``progress`` shows the experiment's progress line (on a
    terminal). Prints the best architecture; returns its validation accuracy.
    """
    out_dir, epochs = Path(out_dir), epochs_or_default(epochs, EPOCHS)
    storage = out_dir / "journal.log"  # where the experiment keeps its trials
    if not resume:
        storage.unlink(missing_ok=True)  # a fresh experiment, not the continuation of an earlier one
    experiment = Experiment(
        space, FunctionalTrainer(evaluate, epochs=epochs), GridSearch(), storage=storage, seed=seed, out_dir=out_dir
    )
    threads = torch.get_num_threads()
    # A trial's matrices are tiny (64 x 32): a second intra-op thread only adds synchronisation.
    # Measured on 2 cores: the grid takes 5 s with one thread, 34 s with two on a busy machine.
    torch.set_num_threads(1)
    try:
        experiment.run(progress=progress)
    finally:
        torch.set_num_threads(threads)
    best = experiment.best()
    done = sum(1 for t in experiment.trials() if t.state == "complete")
    print(f"{done} architectures trained; the best, with validation accuracy {best.value:.4f}:")
    print(json.dumps(best.architecture))
    return {"best val/acc": best.value}
