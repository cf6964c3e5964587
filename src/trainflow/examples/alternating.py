"""``alternating``: seed 000's second example: an MSE update, then an L1 update, one optimizer.

NeMo's ``training_loop = [(optimizer, [mse_loss]), (optimizer, [l1_loss])]`` is a flow of two
steps sharing one optimizer. As in NeMo, each update takes a fresh batch: an epoch of 79
batches is 79 updates, MSE and L1 in turn, and the turn carries over into the next epoch.
Same model and data as ``two-losses``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from trainflow import Step
from trainflow.callbacks import LossLogger
from trainflow.examples.artifacts import start, train_and_finish
from trainflow.examples.two_losses import LR, TaylorNet, real_function_data

__all__ = ["DESCRIPTION", "EPOCHS", "run"]

DESCRIPTION = "TaylorNet on y = sin(x): an MSE update then an L1 update, one shared SGD (seed 000)"
EPOCHS = 3


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Alternate MSE and L1 updates; write metrics.csv, curves.png and weights.pt under ``out_dir``.

    A checkpoint is saved after every epoch in ``out_dir/checkpoints``; ``resume=True``
    continues from the newest one there (a fresh start when there is none).
    """
    out_dir, epochs = start(out_dir, epochs, EPOCHS, seed)
    data = real_function_data(seed=seed)
    model = TaylorNet(dim=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def mse(batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    def l1(batch):
        x, y = batch
        return F.l1_loss(model(x), y)

    # the seed's print_func: each loss on its own (each key holds its step's latest update)
    logger = LossLogger(
        every=25, print_func=lambda x: print(f"L1 Loss: {x['l1/loss']:.4f}  MSE Loss: {x['mse/loss']:.4f}")
    )
    return train_and_finish(
        out_dir, model, [Step(mse, optimizer, name="mse"), Step(l1, optimizer, name="l1")], data,
        epochs=epochs, progress=progress, resume=resume, callbacks=(logger,),
    )
