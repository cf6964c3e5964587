"""Shared helpers: small models and data, and weight comparison."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# The models here are tiny: on a small shared machine, intra-op threads only contend. Every
# comparison runs both sides in this process, so the thread count never changes a verdict.
torch.set_num_threads(1)


def mlp(n_in: int = 4, n_out: int = 1, hidden: int = 8, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*layers)


def regression_loader(n: int = 40, batch_size: int = 8, shuffle: bool = True, seed: int = 123) -> DataLoader:
    """A DataLoader over fixed random data (made with its own generator: no global RNG draw)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    """Every parameter and buffer bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


def assert_changed(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Guard against vacuous equality: training must have moved the weights."""
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
