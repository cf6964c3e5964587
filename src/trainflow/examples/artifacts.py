"""What every example leaves behind: curves plotted from ``metrics.csv``, and the weights.

Plots are drawn on a bare ``matplotlib.figure.Figure`` (the Agg renderer), never through
``pyplot``: no window opens and the caller's global matplotlib backend is left alone.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from rich.console import Console
from matplotlib.ticker import MaxNLocator
from torch import nn

from trainflow.callbacks import Checkpoint, CSVLogger, Preemption, ProgressBar
from trainflow.trainer import Trainer

__all__ = [
    "curves_figure", "epochs_or_default", "finish", "is_loss", "plot_curves", "save_weights", "start", "train_and_finish",
]

#: columns that CSVLogger writes before the epoch values; not curves
_BOOKKEEPING = ("epoch", "updates", "seconds")
#: prefixes of values that are not losses: metrics of training and validation, and figures
#: measured on generated samples (``trainflow.examples.quality``: no validation data involved)
_PHASES = ("train", "val", "samples")
_LN10 = math.log(10)
#: panels of their own for the sample-quality figures, each on its own scale:
#: key -> (title, y label, y range, reference line (value, label) or None)
_SCALES: dict[str, tuple[str, str, tuple[float, float], tuple[float, str] | None]] = {
    "samples/confidence": (
        "samples/confidence", "mean max softmax probability", (0.0, 1.0), None,
    ),
    "samples/entropy": (
        "samples/entropy", "predicted-class entropy (nats)", (0.0, _LN10),
        (_LN10, "ln 10 = 2.303: all ten digits equally often"),
    ),
}


def epochs_or_default(epochs: int | None, default: int) -> int:
    """An example's epoch count: ``default`` for None; an int >= 1 otherwise (there must be a curve).

    Example:
        >>> epochs_or_default(None, 20), epochs_or_default(3, 20)
        (20, 3)
    """
    if epochs is None:
        return default
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(
            f"run: `epochs` must be an int >= 1, or None for the example's default ({default}). "
            f"Received: epochs={epochs!r}. Pass e.g. epochs=1 for a quick check."
        )
    return epochs


def is_loss(key: str) -> bool:
    """Whether a log key is a loss (plotted with the losses) rather than a metric.

    Step losses are keyed ``"<step>/<loss>"``; metrics are ``"train/<name>"`` or
    ``"val/<name>"``, where validation losses (``"val/loss"``) also live, and the quality of
    a GAN's generated samples is ``"samples/<name>"``.

    Example:
        >>> [is_loss(k) for k in ("D/loss", "mse/loss", "train/acc", "val/acc", "val/loss", "samples/entropy")]
        [True, True, False, False, True, False]
    """
    phase, _, name = key.partition("/")
    return phase not in _PHASES or "loss" in name


def _read(csv_path: Path) -> tuple[list[float], dict[str, list[float]]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(
            f"plot_curves: `csv_path` holds no rows. Received: csv_path={str(csv_path)!r}. "
            "Plot after at least one epoch has been logged by CSVLogger."
        )
    if "epoch" not in rows[0]:
        raise ValueError(
            f"plot_curves: `csv_path` has no 'epoch' column. Received: columns {list(rows[0])} in "
            f"{str(csv_path)!r}. Pass a metrics.csv written by trainflow.callbacks.CSVLogger."
        )
    epochs = [float(row["epoch"]) for row in rows]
    series = {
        key: [float(row[key]) if row.get(key) not in (None, "") else math.nan for row in rows]
        for key in rows[0]
        if key not in _BOOKKEEPING
    }
    return epochs, series


def _panel(ax, epochs: list[float], series: dict[str, list[float]], title: str, ylabel: str) -> None:
    marker = "o" if len(epochs) <= 30 else None  # a single epoch is still visible as a dot
    for key, values in series.items():
        ax.plot(epochs, values, marker=marker, markersize=3, label=key)
    finite = [v for values in series.values() for v in values if math.isfinite(v)]
    # losses that fall by orders of magnitude (seed 000's MSE) read better on a log axis
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _scaled_panel(ax, epochs: list[float], key: str, values: list[float]) -> None:
    """A sample-quality figure on its own fixed scale, with its reference line labelled on it."""
    title, ylabel, (low, high), reference = _SCALES[key]
    marker = "o" if len(epochs) <= 30 else None
    ax.plot(epochs, values, marker=marker, markersize=3, color="tab:green")  # the title names the curve
    span = high - low
    ax.set_ylim(low, high + 0.12 * span)  # the top of the scale, its line and label stay in view
    if reference is not None:
        value, label = reference
        ax.axhline(value, color="grey", linestyle="--", linewidth=1)
        # above the line, where a curve on this scale never goes: the label is never covered
        ax.text(0.02, value + 0.015 * span, label, transform=ax.get_yaxis_transform(),
                color="dimgrey", fontsize="small", va="bottom")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


#: metric names spelled out on the y axis
_SPELLED = {"acc": "accuracy"}


def _metric_label(keys: list[str]) -> str:
    """The y label of the metrics panel: the metric names, e.g. ``accuracy`` for train/acc and val/acc."""
    names = dict.fromkeys(key.partition("/")[2] or key for key in keys)
    return ", ".join(_SPELLED.get(name, name) for name in names)


def curves_figure(csv_path: str | Path) -> Figure:
    """The figure :func:`plot_curves` saves: one panel per kind of value in a ``CSVLogger`` file.

    Panels, in order: the losses (see :func:`is_loss`; y axis "loss", on a log scale when they
    span more than a factor of 20); the train/val metrics such as ``train/acc`` and ``val/acc``
    (y axis: their names, ``acc`` spelled ``accuracy``); and each sample-quality figure on its own scale:
    ``samples/confidence`` from 0 to 1, ``samples/entropy`` from 0 to ``ln 10`` with that
    maximum drawn as a dashed reference line. Empty panels are left out; empty cells (a value
    that appears only in later epochs) are gaps in the curve.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> csv_path = Path(tempfile.mkdtemp()) / "metrics.csv"
        >>> _ = csv_path.write_text("epoch,updates,seconds,G/loss,samples/confidence,samples/entropy\\n"
        ...                         "1,90,0.5,0.9,0.61,1.9\\n2,180,0.5,0.8,0.72,2.2\\n")
        >>> [(ax.get_title(), ax.get_ylabel()) for ax in curves_figure(csv_path).axes]  # doctest: +NORMALIZE_WHITESPACE
        [('losses', 'loss'), ('samples/confidence', 'mean max softmax probability'),
         ('samples/entropy', 'predicted-class entropy (nats)')]
    """
    epochs, series = _read(Path(csv_path))
    losses = {k: v for k, v in series.items() if is_loss(k)}
    metrics = {k: v for k, v in series.items() if not is_loss(k) and k not in _SCALES}
    panels: list[Any] = []
    if losses:
        panels.append(lambda ax: _panel(ax, epochs, losses, "losses", "loss"))
    if metrics:
        panels.append(lambda ax: _panel(ax, epochs, metrics, "metrics", _metric_label(list(metrics))))
    for key in (k for k in series if k in _SCALES):
        panels.append(lambda ax, key=key: _scaled_panel(ax, epochs, key, series[key]))
    columns = min(max(len(panels), 1), 3)
    rows = max(math.ceil(len(panels) / columns), 1)
    fig = Figure(figsize=(5 * columns, 4 * rows), layout="constrained")
    for i, draw in enumerate(panels):
        draw(fig.add_subplot(rows, columns, i + 1))
    return fig


def plot_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Plot the per-epoch curves of a ``CSVLogger`` file to a PNG (see :func:`curves_figure`).

    Returns:
        The path of the PNG.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = Path(tempfile.mkdtemp())
        >>> _ = (tmp / "metrics.csv").write_text(
        ...     "epoch,updates,seconds,train/loss,val/acc\\n1,23,0.1,0.9,0.8\\n2,46,0.1,0.4,0.9\\n")
        >>> plot_curves(tmp / "metrics.csv", tmp / "curves.png").name
        'curves.png'
    """
    fig = curves_figure(csv_path)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path


def save_weights(models: Mapping[str, nn.Module], path: str | Path) -> Path:
    """Save ``{name: model.state_dict()}`` with ``torch.save``; it loads with ``weights_only=True``.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> path = save_weights({"model": torch.nn.Linear(2, 1)}, Path(tempfile.mkdtemp()) / "weights.pt")
        >>> sorted(torch.load(path, weights_only=True)["model"])
        ['bias', 'weight']
    """
    if not isinstance(models, Mapping) or not all(isinstance(m, nn.Module) for m in models.values()):
        raise TypeError(
            f"save_weights: `models` must be a dict of named nn.Modules. Received: models of type "
            f"{type(models).__name__}. "
            "Pass e.g. {'G': generator, 'D': discriminator}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: model.state_dict() for name, model in models.items()}, path)
    return path


def run_callbacks(progress: bool, *extra: Any, first: tuple[Any, ...] = ()) -> list[Any]:
    """The callbacks every example uses, in the order that matters.

    ``first`` (callbacks that add epoch values the loggers must see), then CSVLogger, then
    Checkpoint (after it, so a checkpoint holds the CSV rows), then Preemption (SIGTERM or
    Ctrl-C: a checkpoint at the next update boundary and a clean exit), then ``extra``, then a
    progress bar (when ``progress`` is False, only its one line per epoch).
    """
    bar = ProgressBar() if progress else ProgressBar(console=Console(force_terminal=False))
    return [*first, CSVLogger(), Checkpoint(every_epochs=1), Preemption(), *extra, bar]


def interrupted(trainer: Trainer) -> bool:
    """True when a signal stopped the run: the checkpoint holds it; artifacts come at its end."""
    return trainer.stop_reason == "signal"


def finish(out_dir: str | Path, trainer: Trainer) -> dict[str, float]:
    """Write ``curves.png`` (from ``metrics.csv``) and ``weights.pt``; return the last epoch's logs.

    An interrupted run writes nothing (its epoch may not have ended) and returns its logs so far.
    """
    if interrupted(trainer) or not trainer.is_global_zero:  # under torchrun rank 0 writes
        return dict(trainer.logs)
    out_dir = Path(out_dir)
    plot_curves(out_dir / "metrics.csv", out_dir / "curves.png")
    save_weights(trainer.models, out_dir / "weights.pt")
    return dict(trainer.logs)


def start(out_dir: str | Path, epochs: int | None, default: int, seed: int) -> tuple[Path, int]:
    """An example's ``run()`` opening: the output folder, the epoch count, and the global seed set.

    Example:
        >>> import torch
        >>> out_dir, epochs = start("runs/mlp", None, 20, seed=0)
        >>> out_dir, epochs, torch.initial_seed()
        (PosixPath('runs/mlp'), 20, 0)
    """
    epochs = epochs_or_default(epochs, default)
    torch.manual_seed(seed)
    return Path(out_dir), epochs


def train_and_finish(
    out_dir: Path,
    models: nn.Module | Mapping[str, nn.Module],
    steps: Any,
    data: Any,
    *,
    epochs: int,
    progress: bool,
    resume: bool,
    callbacks: tuple[Any, ...] = (),
    first: tuple[Any, ...] = (),
    metrics: Mapping[str, Any] | None = None,
    after: Any = None,
    **fit: Any,
) -> dict[str, float]:
    """An example's ``run()`` closing: train with the examples' callbacks, then write the artifacts.

    Builds the ``Trainer`` with :func:`run_callbacks` (``first``, CSVLogger, Checkpoint,
    Preemption, ``callbacks``, a progress bar), fits ``data`` (``resume=True``: from the newest
    checkpoint in ``out_dir/checkpoints``; ``fit`` takes the other keywords, e.g. ``val_data``),
    then, unless a signal stopped the run, calls ``after(trainer)`` (an example's own
    artifacts) and :func:`finish`. Returns the last epoch's logs.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from rich.console import Console
        >>> from trainflow import Step
        >>> model = torch.nn.Linear(2, 1)
        >>> step = Step(lambda x: model(x).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1), name="l2")
        >>> out = Path(tempfile.mkdtemp())
        >>> logs = train_and_finish(out, model, step, [torch.ones(4, 2)] * 3, epochs=2, progress=False, resume=False)
        ... # doctest: +ELLIPSIS
        epoch 1/2 ...
        epoch 2/2 ...
        >>> sorted(logs), sorted(p.name for p in out.iterdir())
        (['l2/loss'], ['checkpoints', 'curves.png', 'metrics.csv', 'weights.pt'])
    """
    trainer = Trainer(
        models, steps, metrics=metrics, callbacks=run_callbacks(progress, *callbacks, first=first), out_dir=out_dir
    )
    trainer.fit(data, epochs=epochs, resume="latest" if resume else None, **fit)
    if after is not None and not interrupted(trainer) and trainer.is_global_zero:  # under torchrun: rank 0 writes
        after(trainer)
    return finish(out_dir, trainer)
