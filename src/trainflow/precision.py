"""Numeric precision of the forward pass: float32, or mixed bfloat16 / float16 autocast."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


class Precision:
    """Autocast for forward passes and, for float16, a gradient scaler.

    ``"32"``: plain float32 (no autocast). ``"bf16-mixed"``: autocast to bfloat16 (CPU or CUDA).
    ``"16-mixed"``: autocast to float16 with a ``torch.amp.GradScaler`` (CUDA only).

    Example:
        >>> import torch
        >>> p = Precision("bf16-mixed", torch.device("cpu"))
        >>> with p.autocast():
        ...     y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        >>> y.dtype
        torch.bfloat16
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in PRECISIONS:
            raise ValueError(
                f"Trainer: `precision` must be one of {PRECISIONS}. Received: precision={precision!r}. "
                "Use '32' for float32, 'bf16-mixed' for bfloat16 autocast."
            )
        if precision == "16-mixed" and device.type != "cuda":
            raise ValueError(
                f"Trainer: precision='16-mixed' needs a CUDA device. Received: device={str(device)!r}. "
                "Use precision='bf16-mixed' on CPU."
            )
        self.name = precision
        self.device_type = device.type
        self.dtype = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run forward passes in."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate (scaled under float16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def update(self) -> None:
        """Adjust the loss scale once per update."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
