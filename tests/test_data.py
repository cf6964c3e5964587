"""``trainflow.data.digits``: shapes, dtypes, range, a stratified deterministic split, no RNG draw."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from trainflow.data import digits

N, N_CLASSES = 1797, 10


def tensors(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a loader's images and labels, in dataset order."""
    return loader.dataset.tensors


def test_flat_shapes_dtypes_and_range():
    train, val = digits(batch_size=32)
    x, y = next(iter(train))
    assert x.shape == (32, 64) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    for loader in (train, val):
        images, labels = tensors(loader)
        assert images.min() == 0 and images.max() == 1  # pixel counts 0..16, divided by 16
        assert set(labels.tolist()) == set(range(N_CLASSES))


def test_image_shape_when_not_flattened():
    flat, _ = digits(shuffle=False)
    train, val = digits(flatten=False, shuffle=False)
    x, _ = next(iter(train))
    assert x.shape == (64, 1, 8, 8)
    assert torch.equal(tensors(train)[0].reshape(-1, 64), tensors(flat)[0])
    assert next(iter(val))[0].shape[1:] == (1, 8, 8)


def test_split_sizes_and_stratification():
    train, val = digits(val_fraction=0.2)
    y_train, y_val = tensors(train)[1].numpy(), tensors(val)[1].numpy()
    assert len(y_train) + len(y_val) == N
    per_class = np.bincount(load_digits().target)
    assert np.array_equal(np.bincount(y_val), np.round(per_class * 0.2).astype(int))
    assert np.array_equal(np.bincount(y_train), per_class - np.bincount(y_val))
    assert (len(y_train), len(y_val)) == (1438, 359)


def test_split_partitions_the_dataset():
    train, val = digits(seed=3)
    ours = torch.cat([torch.cat([x, y[:, None].float()], 1) for x, y in (tensors(train), tensors(val))]).numpy()
    bunch = load_digits()
    theirs = np.concatenate([bunch.data / 16.0, bunch.target[:, None]], 1).astype(np.float32)
    assert np.array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])


def test_split_is_deterministic_and_depends_on_seed():
    a, b, c = (tensors(digits(seed=s)[1]) for s in (0, 0, 1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_building_draws_from_no_global_rng():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    digits(seed=5)
    digits(flatten=False, val_fraction=0.5)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))


def test_train_shuffles_like_a_hand_written_loader_and_val_does_not():
    train, val = digits(batch_size=16)
    torch.manual_seed(0)
    first = [y for _, y in train]
    torch.manual_seed(0)
    again = [y for _, y in train]
    torch.manual_seed(0)
    by_hand = [y for _, y in DataLoader(train.dataset, batch_size=16, shuffle=True)]
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, by_hand, strict=True))
    assert not torch.equal(torch.cat(first), tensors(train)[1])  # shuffled
    assert torch.equal(torch.cat([y for _, y in val]), tensors(val)[1])  # dataset order


def test_no_shuffle_keeps_dataset_order():
    train, _ = digits(shuffle=False, batch_size=100)
    assert torch.equal(torch.cat([y for _, y in train]), tensors(train)[1])
    assert len(train) == 15  # 1438 samples, the last batch partial


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, r"`batch_size` must be >= 1\. Received: batch_size=0"),
        ({"batch_size": 2.5}, TypeError, r"`batch_size` must be an int\. Received: batch_size=2\.5"),
        ({"batch_size": True}, TypeError, r"`batch_size` must be an int\. Received: batch_size=True"),
        ({"val_fraction": 0}, ValueError, r"`val_fraction` must be strictly between 0 and 1.*val_fraction=0\."),
        ({"val_fraction": 1.0}, ValueError, r"Received: val_fraction=1\.0\. Use e\.g\. 0\.2"),
        ({"val_fraction": "0.2"}, TypeError, r"`val_fraction` must be a number\. Received: val_fraction='0\.2'"),
        ({"val_fraction": 0.001}, ValueError, r"leaves an empty validation split\. Received: val_fraction=0\.001"),
        ({"val_fraction": 0.999}, ValueError, r"leaves an empty train split\. Received: val_fraction=0\.999"),
        ({"flatten": 1}, TypeError, r"`flatten` must be True or False\. Received: flatten=1"),
        ({"shuffle": "yes"}, TypeError, r"`shuffle` must be True or False\. Received: shuffle='yes'"),
        ({"seed": -1}, ValueError, r"`seed` must be an int >= 0\. Received: seed=-1\. Use e\.g\. seed=0"),
        ({"seed": 1.5}, ValueError, r"`seed` must be an int >= 0\. Received: seed=1\.5"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        digits(**kwargs)
