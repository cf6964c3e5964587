"""The data and models of the distributed scenarios, shared by dist_run.py (under torchrun) and
tests/test_distributed.py (the one-process hand-written loops they are compared with).

Everything is float64 and built from fixed seeds, so both sides build the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainflow import Average

WORLD = 2  # the number of ranks of the scenarios


def dataset(n: int, seed: int, nan_at: int | None = None) -> TensorDataset:
    """``n`` samples (x in R^3, y in R): a regression set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    if nan_at is not None:
        x[nan_at, 0] = float("nan")
    return TensorDataset(x, y)


def tokens(n: int, seed: int) -> TensorDataset:
    """``n`` sequences of up to 5 tokens (x in R^3 per token), their targets and a mask of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 5, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 6, (n,), generator=g)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).to(torch.float64)
    return TensorDataset(x, y, mask)


def gan_data(n: int, seed: int) -> TensorDataset:
    """``n`` real samples in R^3 with the generator's noise z1, z2 in R^2 carried by each sample."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(*(torch.randn(n, d, generator=g, dtype=torch.float64) for d in (3, 2, 2)))


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, dtype=torch.float64), nn.Tanh(), nn.Linear(4, 1, dtype=torch.float64))


def gan(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    f64 = torch.float64
    return (nn.Sequential(nn.Linear(2, 4, dtype=f64), nn.Tanh(), nn.Linear(4, 3, dtype=f64)),
            nn.Linear(3, 1, dtype=f64))


def float32_mlp() -> nn.Module:
    torch.manual_seed(53)
    return nn.Sequential(nn.Linear(3, 4, dtype=torch.float32), nn.Tanh(), nn.Linear(4, 1, dtype=torch.float32))


def float32_data() -> TensorDataset:
    """12 float32 samples (the other scenarios are float64)."""
    return TensorDataset(*(t.float() for t in dataset(12, seed=54).tensors))


def sq_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).sum()


def token_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed squared error over the real tokens, and their count."""
    return ((model(x).squeeze(-1) - y).pow(2) * mask).sum(), mask.sum()


def d_loss_sum(G: nn.Module, D: nn.Module, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The discriminator's BCE summed over the batch's real and fake samples (2 per sample)."""
    fake = G(z)
    logits = D(torch.cat([fake, real]))
    labels = torch.cat([torch.zeros(len(real), 1), torch.ones(len(real), 1)]).double()
    return nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / 2


def g_loss_sum(G: nn.Module, D: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(D(G(z)), torch.ones(len(z), 1).double(), reduction="sum")


def gan_losses(G: nn.Module, D: nn.Module) -> tuple[Callable, Callable]:
    """The D and G losses of the GAN scenarios, for ``Step``: each reaches both models, so the
    steps' isolation is what keeps the other model's gradients untouched."""

    def d_loss(batch):
        real, z, _ = batch
        logits = D(torch.cat([G(z), real]))
        labels = torch.cat([torch.zeros(len(real), 1), torch.ones(len(real), 1)])
        return Average(nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / 2, len(real))

    def g_loss(batch):
        _, z, _ = batch
        return nn.functional.binary_cross_entropy_with_logits(D(G(z)), torch.ones(len(z), 1))

    return d_loss, g_loss
