"""``EarlyStopping``: stop ``fit`` when a monitored epoch value stops improving."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainflow.callbacks._args import number, positive_int

__all__ = ["EarlyStopping"]

MODES = ("min", "max")


class EarlyStopping:
    """Call ``trainer.stop()`` after ``patience`` epochs in a row without improvement.

    At each epoch end ``logs[monitor]`` is compared with the best value so far: it improves
    when it is lower than ``best - min_delta`` (``mode="min"``) or higher than
    ``best + min_delta`` (``mode="max"``); a NaN never improves. The best value and the count
    of epochs without improvement are kept across ``fit`` calls and saved by ``state_dict``.
    The stop itself is part of the trainer's state: a run resumed from a checkpoint saved after
    it stays stopped (no update), as the uninterrupted run did.

    Args:
        monitor: the epoch value to watch, e.g. ``"val/loss"`` or ``"val/acc"``.
        mode: ``"min"`` when lower is better, ``"max"`` when higher is better.
        patience: epochs without improvement before stopping.
        min_delta: how much better than the best a value must be to count as an improvement.

    Example:
        >>> import torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import EarlyStopping
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()  # 0 from the start: it never improves
        >>> stopper = EarlyStopping("l2/loss", patience=2)
        >>> trainer = Trainer(model, [Step(l2, opt)], callbacks=[stopper])
        >>> trainer.fit(data, epochs=10)
        >>> trainer.epoch
        3
        >>> stopper.state_dict()
        {'best': 0.0, 'wait': 2}
    """

    def __init__(self, monitor: str, mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        expected = "EarlyStopping: `monitor` must be the name of an epoch value, e.g. 'val/loss'."
        if not isinstance(monitor, str):
            raise TypeError(f"{expected} Received: monitor={monitor!r} of type {type(monitor).__name__}.")
        if not monitor:
            raise ValueError(f"{expected} Received: monitor=''. Pass the key of a value in the epoch logs.")
        if mode not in MODES:
            raise ValueError(
                f"EarlyStopping: `mode` must be 'min' (lower is better) or 'max' (higher is better). "
                f"Received: mode={mode!r}. Pass mode='max' for accuracies, mode='min' for losses."
            )
        self.monitor = monitor
        self.mode = mode
        self.patience = positive_int(
            "EarlyStopping", "patience", patience, "epochs without improvement before stopping", "patience=3"
        )
        self.min_delta = number(
            "EarlyStopping", "min_delta", min_delta,
            positive=False, meaning="the smallest change that counts as an improvement", example="min_delta=0.001",
        )
        self.best: float | None = None
        self.wait = 0

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        if self.monitor not in logs:
            raise ValueError(
                f"EarlyStopping: `monitor` names no epoch value. Received: monitor={self.monitor!r}; "
                f"this epoch's values are: {', '.join(sorted(logs)) or 'none'}. Pass one of them "
                "(a 'val/...' value needs fit(..., val_data=..., val_step=...))."
            )
        value = float(logs[self.monitor])
        if self._improves(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop()

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return value == value  # the first value is the best so far, unless it is NaN
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict[str, Any]:
        """The best value so far and the number of epochs since it."""
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, Mapping) or not {"best", "wait"} <= set(state):
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                "EarlyStopping.load_state_dict: `state` must be a dict with 'best' and 'wait', "
                f"as returned by state_dict(). Received: {keys}."
            )
        self.best = None if state["best"] is None else float(state["best"])
        self.wait = int(state["wait"])
