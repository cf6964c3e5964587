"""``darts-digits``: a one-shot DARTS search on the 8x8 digits, then the chosen architecture retrained.

The space (:func:`space`) is ``input -> Linear(64, 32) -> ReLU -> block -> Linear(32, 10)``
with two decisions, the ones of ``nas-digits`` without its width (one-shot search has no
``ValueChoice``):

- ``input``: ``"clean"`` pixels, or ``"noisy"`` ones (Gaussian noise of std 1 added, in
  training and in evaluation: a corrupted sensor);
- ``block``: ``"mlp"`` (one more ``Linear(32, 32)`` and ReLU), ``"identity"``, or ``"zero"``
  (the head sees no signal).

What is known before searching (``nas-digits`` trains all of them): clean beats noisy by far,
and ``"mlp"`` and ``"identity"`` are within a point or two of each other while ``"zero"`` is
chance; so the search must pick ``"clean"`` and ``"mlp"`` or ``"identity"`` (:data:`KNOWN_BEST`).

The search is :class:`~trainflow.nas.DartsTrainer` (first order): the digits' training split
is halved, one half trains the weights (SGD with momentum), the other the architecture
(Adam, ``arch_lr=3e-3``). After every epoch the example prints the architecture chosen so far
and its probabilities; at the end it writes ``alphas.png`` (the probabilities over epochs),
``best_arch.json`` (what ``fixed_arch`` reads), ``metrics.csv``, ``curves.png`` and
``weights.pt`` (the supernet), then builds the chosen architecture under ``fixed_arch``, trains
it from scratch on the whole training split and reports its accuracy on the held-out split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from trainflow.data import digits
from trainflow.examples.artifacts import finish, interrupted, run_callbacks, start
from trainflow.examples.nas_digits import NOISE, Noisy, Zero, train_classifier
from trainflow.nas import DartsTrainer, LayerChoice, fixed_arch

__all__ = [
    "DESCRIPTION", "EPOCHS", "KNOWN_BEST", "RETRAIN_EPOCHS", "ArchitectureLog", "alphas_figure", "halves", "retrain",
    "space", "run",
]

DESCRIPTION = "DARTS on 8x8 digits: input {clean, noisy} x block {mlp, identity, zero}, then retrain (seed 002)"
# Measured (benchmarks/nas.py --darts-only, seeds 0-4): 10 epochs pick clean + identity, with
# probabilities near 0.78 and 0.57; the search takes about 1.5 s on one thread, the retraining 1 s.
EPOCHS = 10
RETRAIN_EPOCHS = 10
#: the architectures that are known to be best (see the module docstring)
KNOWN_BEST = [{"input": "clean", "block": block} for block in ("mlp", "identity")]


def space() -> nn.Module:
    """The search space: ``input -> Linear(64, 32) -> ReLU -> block -> Linear(32, 10)``.

    Example:
        >>> from trainflow.nas import fixed_arch, search_space
        >>> search_space(space)
        {'input': ['clean', 'noisy'], 'block': ['mlp', 'identity', 'zero']}
        >>> with fixed_arch({"input": "clean", "block": "identity"}):
        ...     print(space())
        Sequential(
          (0): Identity()
          (1): Linear(in_features=64, out_features=32, bias=True)
          (2): ReLU()
          (3): Identity()
          (4): Linear(in_features=32, out_features=10, bias=True)
        )
    """
    transform = LayerChoice({"clean": nn.Identity, "noisy": lambda: Noisy(NOISE)}, label="input")
    block = LayerChoice(
        {"mlp": lambda: nn.Sequential(nn.Linear(32, 32), nn.ReLU()), "identity": nn.Identity, "zero": Zero},
        label="block",
    )
    return nn.Sequential(transform, nn.Linear(64, 32), nn.ReLU(), block, nn.Linear(32, 10))


class ArchitectureLog:
    """After every epoch: record the architecture's probabilities and print the choice so far.

    Its record is part of the checkpoints (``state_dict``), so a resumed search plots every epoch.

    Example:
        >>> from types import SimpleNamespace
        >>> log = ArchitectureLog(lambda: {"op": {"a": 0.75, "b": 0.25}})
        >>> log.on_epoch_end(SimpleNamespace(epoch=1), {})
        epoch 1: {"op": "a"}  op: a 0.750, b 0.250
        >>> log.history
        [{'op': {'a': 0.75, 'b': 0.25}}]
    """

    def __init__(self, probs: Any) -> None:
        self.probs = probs
        self.history: list[dict[str, dict[str, float]]] = []

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        probs = self.probs()
        self.history.append(probs)
        chosen = {label: max(p, key=p.get) for label, p in probs.items()}
        shown = "  ".join(f"{label}: " + ", ".join(f"{o} {v:.3f}" for o, v in p.items()) for label, p in probs.items())
        print(f"epoch {trainer.epoch}: {json.dumps(chosen)}  {shown}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


def alphas_figure(history: list[dict[str, dict[str, float]]]) -> Figure:
    """One panel per label: each option's probability after each epoch.

    Example:
        >>> fig = alphas_figure([{"op": {"a": 0.6, "b": 0.4}}, {"op": {"a": 0.7, "b": 0.3}}])
        >>> [ax.get_title() for ax in fig.axes], [line.get_label() for line in fig.axes[0].lines]
        (['op'], ['a', 'b'])
    """
    labels = list(history[0]) if history else []
    fig = Figure(figsize=(6, 2.8 * max(len(labels), 1)))
    epochs = list(range(1, len(history) + 1))
    for i, label in enumerate(labels):
        ax = fig.add_subplot(len(labels), 1, i + 1)
        for option in history[0][label]:
            ax.plot(epochs, [h[label][option] for h in history], marker="o", markersize=3, label=option)
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.set_ylabel("probability")
        ax.set_ylim(0, 1)
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def halves(loader: DataLoader, seed: int) -> tuple[DataLoader, DataLoader]:
    """The training split cut in two shuffled loaders (weights, architecture), fixed by ``seed`` (its own generator).

    Example:
        >>> from trainflow.data import digits
        >>> weights, arch = halves(digits(batch_size=64)[0], seed=0)
        >>> len(weights.dataset), len(arch.dataset)
        (719, 719)
    """
    n = len(loader.dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return tuple(DataLoader(Subset(loader.dataset, part), batch_size=loader.batch_size, shuffle=True)
                 for part in (order[: n // 2], order[n // 2:]))


def retrain(arch: dict[str, Any], train: DataLoader, val: DataLoader, seed: int, epochs: int = RETRAIN_EPOCHS) -> float:
    """Train the plain model of ``arch`` from scratch (SGD with momentum, ``epochs`` epochs); its accuracy on ``val``.

    Example:
        >>> from trainflow.data import digits
        >>> train, val = digits(batch_size=64)
        >>> round(retrain({"input": "clean", "block": "zero"}, train, val, seed=0, epochs=1), 2)  # chance
        0.1
    """
    torch.manual_seed(seed)
    with fixed_arch(arch):
        model = space()
    return train_classifier(model, train, val, epochs=epochs, name="retrain", progress=False)


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Search with DARTS, plot and write the architecture, retrain it; return the losses and its accuracy.

    A checkpoint is saved after every epoch in ``out_dir/checkpoints``; ``resume=True``
    continues the search from the newest one there (a fresh start when there is none).
    """
    out_dir, epochs = start(out_dir, epochs, EPOCHS, seed)
    train, val = digits(batch_size=64, seed=seed)
    weights_half, arch_half = halves(train, seed)
    model = space()

    def loss(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    log = ArchitectureLog(lambda: None)
    search = DartsTrainer(model, loss, optimizer, arch_lr=3e-3, callbacks=run_callbacks(progress, first=(log,)),
                          out_dir=out_dir)
    log.probs = search.export_probs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64 x 32 matrices: a second intra-op thread only adds synchronisation
    try:
        search.fit(weights_half, arch_half, epochs=epochs, resume="latest" if resume else None)
        if interrupted(search.trainer):
            return dict(search.trainer.logs)
        arch = search.export()
        (out_dir / "best_arch.json").write_text(json.dumps(arch) + "\n")
        alphas_figure(log.history).savefig(out_dir / "alphas.png", dpi=100)
        logs = finish(out_dir, search.trainer)
        accuracy = retrain(arch, train, val, seed)
    finally:
        torch.set_num_threads(threads)
    print(f"chosen: {json.dumps(arch)}; retrained from scratch for {RETRAIN_EPOCHS} epochs: "
          f"held-out accuracy {accuracy:.4f}")
    return {**logs, "retrained val/acc": accuracy}
