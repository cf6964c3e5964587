"""Streaming metrics: any object with ``update/compute/reset`` (torchmetrics), grouped by phase.

The user calls ``update`` (in the loss or validation function, as in a hand-written loop);
the trainer computes, logs and resets ``train/`` metrics at each epoch end and ``val/``
metrics after each validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["Metrics"]

PHASES = ("train", "val")


def _as_logs(name: str, value: Any) -> dict[str, float]:
    """A computed metric as flat ``{name: float}`` entries (dicts flatten to ``name/key``)."""
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, v in value.items():
            out.update(_as_logs(f"{name}/{key}", v))
        return out
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return {name: value.item()}
        return {f"{name}/{i}": v for i, v in enumerate(value.flatten().tolist())}
    return {name: float(value)}


class Metrics:
    """Named metrics keyed ``"train/<name>"`` or ``"val/<name>"``, checked when built.

    Example:
        >>> import torch, torchmetrics
        >>> acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
        >>> metrics = Metrics({"val/acc": acc})
        >>> acc.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
        >>> metrics.collect("val")
        {'val/acc': 0.75}
    """

    def __init__(self, metrics: Mapping[str, Any] | None) -> None:
        metrics = {} if metrics is None else metrics
        if not isinstance(metrics, Mapping):
            raise TypeError(
                "Trainer: `metrics` must be a dict like {'train/acc': metric, 'val/acc': metric}. "
                f"Received: metrics of type {type(metrics).__name__}."
            )
        self.by_phase: dict[str, dict[str, Any]] = {phase: {} for phase in PHASES}
        for key, metric in metrics.items():
            phase, _, name = str(key).partition("/")
            if phase not in PHASES or not name:
                raise ValueError(
                    f"Trainer: metric names must start with 'train/' or 'val/'. Received: {key!r}. "
                    f"Use e.g. 'train/{key}' for a metric updated in the loss, 'val/{key}' in val_step."
                )
            missing = [m for m in ("update", "compute", "reset") if not callable(getattr(metric, m, None))]
            if missing:
                raise TypeError(
                    f"Trainer: metric {key!r} must have update/compute/reset methods (a torchmetrics "
                    f"Metric). Received: metrics[{key!r}] of type {type(metric).__name__}, "
                    f"which lacks {', '.join(missing)}."
                )
            if callable(getattr(metric, "persistent", None)):
                metric.persistent(True)  # torchmetrics: put the running state in state_dict (resume)
            self.by_phase[phase][key] = metric

    def to(self, device: torch.device) -> None:
        """Move metrics that hold tensors to ``device``."""
        for metrics in self.by_phase.values():
            for metric in metrics.values():
                if callable(getattr(metric, "to", None)):
                    metric.to(device)

    def collect(self, phase: str) -> dict[str, float]:
        """Compute and reset every metric of ``phase``; metrics never updated are skipped."""
        logs: dict[str, float] = {}
        for key, metric in self.by_phase[phase].items():
            if getattr(metric, "update_count", 1) == 0:
                continue  # torchmetrics warns and returns garbage when computed before any update
            logs.update(_as_logs(key, metric.compute()))
            metric.reset()
        return logs

    def state_dict(self) -> dict[str, Any]:
        """The running state of every metric that has one (mid-epoch resume)."""
        state = {}
        for metrics in self.by_phase.values():
            for key, metric in metrics.items():
                if callable(getattr(metric, "state_dict", None)):
                    state[key] = {"state": metric.state_dict(), "updates": getattr(metric, "_update_count", 0)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for metrics in self.by_phase.values():
            for key, metric in metrics.items():
                if key in state:
                    metric.load_state_dict(state[key]["state"])
                    if hasattr(metric, "_update_count"):
                        metric._update_count = state[key]["updates"]
