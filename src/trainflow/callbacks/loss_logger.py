"""``LossLogger``: the latest value of every loss, handed to a print function every N updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainflow.callbacks._args import positive_int
from trainflow.callbacks._values import floats, fmt
from trainflow.events import Every

__all__ = ["LossLogger"]


def print_line(values: dict[str, float], updates: int) -> None:
    """The default output: ``update 200  D/loss=0.6931  G/loss=0.7012``."""
    print(f"update {updates}  " + "  ".join(f"{key}={fmt(v)}" for key, v in values.items()))


class LossLogger:
    """Every ``every`` updates, call ``print_func`` with the latest value of each loss key.

    Its ``on_update_end`` is registered with the filter ``Every(every)`` (see
    :mod:`trainflow.events`): it runs only at those updates, and reads
    ``trainer.latest_losses``, the tensors the trainer keeps, as floats only then, so a CUDA
    run waits on the device once per ``every`` updates, not at every update. With several
    steps (a GAN's ``D`` and ``G``), each key holds the value of its step's latest update.

    Args:
        every: log when ``trainer.updates`` is a multiple of this.
        print_func: called with ``{"<step>/<loss>": float}``; the default prints one line,
            ``update 200  D/loss=0.6931  G/loss=0.7012``. E.g.
            ``print_func=lambda x: logging.info(f"Train Loss: {x['mse/loss'] + x['l1/loss']}")``.

    Example:
        >>> import torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import LossLogger
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = [torch.ones(4, 2)] * 4  # 4 batches
        >>> def l2(x):
        ...     return model(x).pow(2).mean()
        >>> trainer = Trainer(model, [Step(l2, opt)], callbacks=[LossLogger(every=2)])
        >>> trainer.fit(data, epochs=1)
        update 2  l2/loss=0.0000
        update 4  l2/loss=0.0000
    """

    #: under torchrun only rank 0 calls it: it writes (see trainflow.distributed)
    rank_zero_only = True

    def __init__(self, every: int = 100, print_func: Callable[[dict[str, float]], Any] | None = None) -> None:
        self.every = positive_int("LossLogger", "every", every, "log every N updates", "every=100")
        if print_func is not None and not callable(print_func):
            raise TypeError(
                "LossLogger: `print_func` must be a function of the values dict, or None for the "
                f"default line. Received: print_func={print_func!r}. "
                "Pass e.g. print_func=lambda values: logging.info(values)."
            )
        self.print_func = print_func
        self.event_filters = {"on_update_end": Every(self.every)}

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        values = floats(trainer.latest_losses)
        if self.print_func is None:
            print_line(values, trainer.updates)
        else:
            self.print_func(values)
