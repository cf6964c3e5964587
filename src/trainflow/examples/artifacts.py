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

from trainflow.callbacks import Checkpoint, CSVLogger, ProgressBar
from trainflow.trainer import Trainer

__all__ = ["epochs_or_default", "finish", "is_loss", "plot_curves", "save_weights"]

#: columns that CSVLogger writes before the epoch values; not curves
_BOOKKEEPING = ("epoch", "updates", "seconds")
_PHASES = ("train", "val")


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
    ``"val/<name>"``, where validation losses (``"val/loss"``) also live.

    Example:
        >>> [is_loss(k) for k in ("D/loss", "mse/loss", "train/acc", "val/acc", "val/loss")]
        [True, True, False, False, True]
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


def _panel(ax, epochs: list[float], series: dict[str, list[float]], title: str) -> None:
    marker = "o" if len(epochs) <= 30 else None  # a single epoch is still visible as a dot
    for key, values in series.items():
        ax.plot(epochs, values, marker=marker, markersize=3, label=key)
    finite = [v for values in series.values() for v in values if math.isfinite(v)]
    # losses that fall by orders of magnitude (seed 000's MSE) read better on a log axis
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def plot_curves(csv_path: str | Path, png_path: str | Path) -> Path:
    """Plot the per-epoch curves of a ``CSVLogger`` file to a PNG: losses, then metrics.

    Losses (see :func:`is_loss`) go in the left panel, metrics such as ``train/acc`` and
    ``val/acc`` in the right one (omitted when there are none). Empty cells (a value that
    appears only in later epochs) are gaps in the curve.

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
    csv_path, png_path = Path(csv_path), Path(png_path)
    epochs, series = _read(csv_path)
    losses = {k: v for k, v in series.items() if is_loss(k)}
    metrics = {k: v for k, v in series.items() if not is_loss(k)}
    panels = [(losses, "losses"), (metrics, "metrics")]
    panels = [(s, t) for s, t in panels if s]
    fig = Figure(figsize=(5.5 * max(len(panels), 1), 4), layout="constrained")
    for i, (values, title) in enumerate(panels):
        _panel(fig.add_subplot(1, len(panels), i + 1), epochs, values, title)
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
            f"save_weights: `models` must be a dict of named nn.Modules. Received: {type(models).__name__}. "
            "Pass e.g. {'G': generator, 'D': discriminator}."
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: model.state_dict() for name, model in models.items()}, path)
    return path


def run_callbacks(progress: bool, *extra: Any, first: tuple[Any, ...] = ()) -> list[Any]:
    """The callbacks every example uses, in the order that matters.

    ``first`` (callbacks that add epoch values the loggers must see), then CSVLogger, then
    Checkpoint (after it, so a checkpoint holds the CSV rows), then ``extra``, then a progress
    bar (when ``progress`` is False, only its one line per epoch).
    """
    bar = ProgressBar() if progress else ProgressBar(console=Console(force_terminal=False))
    return [*first, CSVLogger(), Checkpoint(every_epochs=1), *extra, bar]


def interrupted(trainer: Trainer) -> bool:
    """True when a signal stopped the run: the checkpoint holds it; artifacts come at its end."""
    return trainer.stop_reason == "signal"


def finish(out_dir: str | Path, trainer: Trainer) -> dict[str, float]:
    """Write ``curves.png`` (from ``metrics.csv``) and ``weights.pt``; return the last epoch's logs.

    An interrupted run writes nothing (its epoch may not have ended) and returns its logs so far.
    """
    if interrupted(trainer):
        return dict(trainer.logs)
    out_dir = Path(out_dir)
    plot_curves(out_dir / "metrics.csv", out_dir / "curves.png")
    save_weights(trainer.models, out_dir / "weights.pt")
    return dict(trainer.logs)
