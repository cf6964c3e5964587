"""The 8x8 handwritten digits bundled with scikit-learn, as train and validation DataLoaders.

1,797 images, ten classes, nothing downloaded: small enough for examples and tests to train
a real classifier (or a GAN) in seconds on a CPU.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits"]


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images scaled to [0, 1] as float32 (n, 64) and labels as int64 (n,), loaded once."""
    try:  # imported here: scikit-learn is part of the `examples` extra
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            f"trainflow.data.digits needs scikit-learn (its bundled digits dataset), which could not be imported "
            f"({error}). Install it with `pip install \"trainflow[examples]\"` (or `pip install scikit-learn`)."
        ) from error

    bunch = load_digits()
    images = (bunch.data / 16.0).astype(np.float32)  # pixels are counts 0..16
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # the cache is shared
    return images, labels


def _split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified indices: ``round(val_fraction * n_c)`` of each class ``c`` go to validation."""
    rng = np.random.Generator(np.random.PCG64(seed))
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _check(batch_size: Any, val_fraction: Any, flatten: Any, seed: Any, shuffle: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"digits: `batch_size` must be an int. Received: batch_size={batch_size!r}. Use e.g. 64.")
    if batch_size < 1:
        raise ValueError(f"digits: `batch_size` must be >= 1. Received: batch_size={batch_size!r}. Use e.g. 64.")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise TypeError(
            f"digits: `val_fraction` must be a number. Received: val_fraction={val_fraction!r}. Use e.g. 0.2."
        )
    if not 0 < val_fraction < 1:
        raise ValueError(
            f"digits: `val_fraction` must be strictly between 0 and 1 (the share of each class held out). "
            f"Received: val_fraction={val_fraction!r}. Use e.g. 0.2."
        )
    for arg, value in (("flatten", flatten), ("shuffle", shuffle)):
        if not isinstance(value, bool):
            raise TypeError(f"digits: `{arg}` must be True or False. Received: {arg}={value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"digits: `seed` must be an int >= 0. Received: seed={seed!r}. Use e.g. seed=0.")


def digits(
    batch_size: int = 64,
    val_fraction: float = 0.2,
    flatten: bool = True,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 8x8 digits as ``(train_loader, val_loader)`` of ``(image, label)`` batches.

    Images are float32 in [0, 1], of shape ``(64,)`` (``flatten=True``) or ``(1, 8, 8)``;
    labels are int64 class indices 0-9. The split is stratified (each class keeps its share)
    and depends on ``seed`` only: it is drawn from ``numpy.random.Generator``, so building the
    loaders never touches torch's global RNG. The train loader shuffles like a hand-written
    ``DataLoader(..., shuffle=True)`` (its order comes from the global torch RNG when each
    epoch's iterator is made, so ``torch.manual_seed`` makes runs repeatable); the validation
    loader keeps a fixed order.

    Args:
        batch_size: samples per batch, for both loaders.
        val_fraction: the share of each class held out for validation, in (0, 1).
        flatten: ``(64,)`` images for MLPs when True, ``(1, 8, 8)`` for convolutions when False.
        seed: the seed of the train/validation split.
        shuffle: shuffle the train loader each epoch.

    Example:
        >>> from trainflow.data import digits
        >>> train, val = digits(batch_size=32)
        >>> len(train.dataset), len(val.dataset)
        (1438, 359)
        >>> x, y = next(iter(val))
        >>> tuple(x.shape), x.dtype, tuple(y.shape), y.dtype
        ((32, 64), torch.float32, (32,), torch.int64)
        >>> bool(x.min() >= 0) and bool(x.max() <= 1)
        True
    """
    _check(batch_size, val_fraction, flatten, seed, shuffle)
    images, labels = _arrays()
    train_idx, val_idx = _split(labels, float(val_fraction), seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(
            f"digits: `val_fraction` leaves an empty {'validation' if len(val_idx) == 0 else 'train'} split. "
            f"Received: val_fraction={val_fraction!r}. Use a value such as 0.2."
        )
    shape = (-1, 64) if flatten else (-1, 1, 8, 8)

    def dataset(idx: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(images[idx]).reshape(shape), torch.from_numpy(labels[idx]))

    train = DataLoader(dataset(train_idx), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(dataset(val_idx), batch_size=batch_size, shuffle=False)
    return train, val
