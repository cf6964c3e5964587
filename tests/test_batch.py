"""Batch structures: moved, counted and split whatever their nesting."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch

from trainflow.data.batch import move, sample_count, split

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    names: list


def _nested():
    return {
        "pair": Pair(torch.arange(6.0).reshape(6, 1), torch.arange(6)),
        "dc": Batch(torch.zeros(6, 2), torch.ones(6), ["a"] * 6),
        "list": [torch.arange(6), "tag"],
    }


def test_move_keeps_structure_and_types():
    moved = move(_nested(), torch.device("meta"))
    assert isinstance(moved["pair"], Pair) and moved["pair"].x.device.type == "meta"
    assert isinstance(moved["dc"], Batch) and moved["dc"].images.device.type == "meta"
    assert moved["dc"].names == ["a"] * 6  # non-tensor leaves carried unchanged
    assert moved["list"][1] == "tag" and moved["list"][0].device.type == "meta"


def test_sample_count_is_first_tensor_first_dim():
    assert sample_count(_nested()) == 6
    assert sample_count((torch.zeros(3, 5), torch.zeros(7))) == 3
    with pytest.raises(ValueError, match=r"cannot infer how many samples"):
        sample_count({"text": "no tensors"}, "s")
    with pytest.raises(ValueError, match=r"cannot infer how many samples"):
        sample_count(torch.tensor(1.0))


def test_split_chunks_every_tensor_in_step():
    chunks = split(_nested(), 4)
    assert len(chunks) == 2
    assert chunks[0]["pair"].y.tolist() == [0, 1, 2, 3] and chunks[1]["pair"].y.tolist() == [4, 5]
    assert chunks[1]["dc"].images.shape == (2, 2) and chunks[1]["list"][0].tolist() == [4, 5]
    assert split((torch.zeros(3),), 4)[0][0].shape == (3,)  # small batches stay whole
