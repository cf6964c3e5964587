"""``two-losses``: seed 000's first example: an MSE and an L1 loss, summed, one SGD optimizer.

NeMo's Hello World pieces, in plain PyTorch: ``RealFunctionDataLayer`` (y = sin(x) with x
uniform in [-4, 4], n=10000, batch 128) and ``TaylorNet(dim=4)`` (a linear layer on the
powers x^0 .. x^3). The loss function returns ``{"mse": ..., "l1": ...}``; the trainer sums
the two for the update and logs each.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step
from trainflow.callbacks import LossLogger
from trainflow.examples.artifacts import start, train_and_finish

__all__ = ["DESCRIPTION", "EPOCHS", "LR", "TaylorNet", "real_function_data", "run"]

DESCRIPTION = "TaylorNet on y = sin(x): MSE + L1 summed in one update, SGD (seed 000)"
EPOCHS = 3
LR = 3e-4  # the seed's; it already takes the MSE from ~46 to ~0.35 in 3 epochs


class TaylorNet(nn.Module):
    """NeMo's tutorial regressor: ``Linear(dim, 1)`` on the powers ``x^0, ..., x^(dim-1)``.

    Example:
        >>> import torch
        >>> TaylorNet(dim=4)(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(dim, 1)
        nn.init.xavier_uniform_(self.fc1.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(torch.cat([x**p for p in range(self.dim)], dim=-1))


def real_function_data(n: int = 10000, batch_size: int = 128, seed: int = 0) -> DataLoader:
    """NeMo's ``RealFunctionDataLayer``: ``(x, sin(x))`` pairs, x uniform in [-4, 4], shape (n, 1).

    The points come from a ``torch.Generator`` seeded with ``seed`` (not the global RNG);
    the loader shuffles each epoch from the global RNG, like a hand-written loop.

    Example:
        >>> x, y = next(iter(real_function_data(n=10, batch_size=4)))
        >>> tuple(x.shape), bool(torch.allclose(y, torch.sin(x)))
        ((4, 1), True)
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=gen) * 8 - 4
    return DataLoader(TensorDataset(x, torch.sin(x)), batch_size=batch_size, shuffle=True)


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Train TaylorNet on both losses; write metrics.csv, curves.png and weights.pt under ``out_dir``.

    A checkpoint is saved after every epoch in ``out_dir/checkpoints``; ``resume=True``
    continues from the newest one there (a fresh start when there is none).
    """
    out_dir, epochs = start(out_dir, epochs, EPOCHS, seed)
    data = real_function_data(seed=seed)
    model = TaylorNet(dim=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def both(batch):
        x, y = batch
        p = model(x)
        return {"mse": F.mse_loss(p, y), "l1": F.l1_loss(p, y)}

    # the seed's print_func: the sum of the two losses
    logger = LossLogger(every=25, print_func=lambda x: print(f"Train Loss: {x['loss/mse'] + x['loss/l1']:.4f}"))
    return train_and_finish(
        out_dir, model, Step(both, optimizer, name="loss"), data,  # logs "loss/mse" and "loss/l1"
        epochs=epochs, progress=progress, resume=resume, callbacks=(logger,),
    )
