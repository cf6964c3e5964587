"""Batched fetching (trainflow.data.fetch): the loader's own batches, in one indexing call each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_changed, assert_same_weights, mlp
from torch.utils.data import DataLoader, Dataset, IterableDataset, StackDataset, Subset, TensorDataset

from trainflow import Step, Trainer
from trainflow.data import digits
from trainflow.data.fetch import BatchedIterator, input_path, iterate


def _data(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 2, generator=g), torch.randint(0, 5, (n,), generator=g),
                         torch.rand(n, generator=g, dtype=torch.float64))


class Batched(Dataset):
    """A dataset with ``__getitems__`` that counts its calls and never serves one sample."""

    def __init__(self, n=30):
        self.x = torch.arange(n * 2.0).reshape(n, 2)
        self.calls = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        raise AssertionError("read one sample at a time")

    def __getitems__(self, idx):
        self.calls += 1
        return [{"x": self.x[i], "i": int(i)} for i in idx]


class OwnItem(TensorDataset):
    def __getitem__(self, i):
        return self.tensors[0][i] * 2


def _epochs(iterable, batched: bool, epochs=2, seed=7):
    torch.manual_seed(seed)
    out = []
    for _ in range(epochs):
        it = iterate(iterable) if batched else iter(iterable)
        if batched:
            assert isinstance(it, BatchedIterator)
        out.append(list(it))
    return out, torch.get_rng_state()


def _assert_same_batches(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous() == b.is_contiguous()
        assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_batches(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_batches(a[k], b[k])
    else:
        assert a == b


LOADERS = {
    "tensor-shuffled": lambda: DataLoader(_data(), batch_size=8, shuffle=True),
    "tensor-drop-last": lambda: DataLoader(_data(), batch_size=8, shuffle=True, drop_last=True),
    "tensor-own-generator": lambda: DataLoader(_data(), batch_size=5, shuffle=True,
                                               generator=torch.Generator().manual_seed(3)),
    "subset": lambda: DataLoader(Subset(_data(), [5, -1, 0, 9, 9, 30, 2, -7, 11]), batch_size=4, shuffle=True),
    "subset-of-subset": lambda: DataLoader(Subset(Subset(_data(), list(range(3, 30))), range(0, 27, 2)),
                                           batch_size=3, shuffle=True),
    "subset-tensor-indices": lambda: DataLoader(Subset(_data(), torch.tensor([4, 1, 8, 2])), batch_size=3),
    "digits": lambda: digits(batch_size=64)[0],
    "getitems": lambda: DataLoader(Batched(), batch_size=7, shuffle=True),
    "subset-of-getitems": lambda: DataLoader(Subset(Batched(), [3, 1, 4, 1, 5, 9, 2, 6]), batch_size=3, shuffle=True),
    "stack-dataset": lambda: DataLoader(StackDataset(a=_data(), b=_data(seed=1)), batch_size=6, shuffle=True),
}


@pytest.mark.parametrize("name", LOADERS)
def test_batches_are_bit_identical_to_the_loaders_own(name):
    theirs, rng_theirs = _epochs(LOADERS[name](), batched=False)
    mine, rng_mine = _epochs(LOADERS[name](), batched=True)
    assert len(mine) == len(theirs) and all(len(a) == len(b) for a, b in zip(mine, theirs))
    for epoch_a, epoch_b in zip(mine, theirs):
        for a, b in zip(epoch_a, epoch_b):
            _assert_same_batches(a, b)
    assert torch.equal(rng_mine, rng_theirs)  # the same random draws, the same number of them


def test_getitems_is_called_once_per_batch_and_no_sample_is_read_alone():
    data = Batched(30)
    batches = list(iterate(DataLoader(data, batch_size=7)))
    assert data.calls == 5 and [b["x"].shape[0] for b in batches] == [7, 7, 7, 7, 2]


@pytest.mark.parametrize("loader, why", [
    (lambda: DataLoader(_data(), batch_size=4, collate_fn=lambda s: s), "a custom collate_fn"),
    (lambda: DataLoader(_data(), batch_size=None), "batch_size=None"),
    (lambda: DataLoader(OwnItem(torch.zeros(4, 2)), batch_size=2), "OwnItem is read one sample at a time"),
    (lambda: DataLoader(_data(), batch_size=4, num_workers=2), "num_workers=2"),
    (lambda: DataLoader(TensorDataset(torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last)), batch_size=2),
     "TensorDataset is read one sample at a time"),
])
def test_other_loaders_take_their_own_path(loader, why):
    assert input_path(loader()) == f"the loader's own iterator ({why})"


def test_other_loaders_yield_what_they_always_did():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.arange(6.0))

    for loader in (DataLoader(Stream(), batch_size=4), DataLoader(OwnItem(torch.ones(4, 2)), batch_size=2),
                   DataLoader(_data(), batch_size=4, collate_fn=lambda s: len(s))):
        it = iterate(loader)
        assert not isinstance(it, BatchedIterator)
        assert [str(b) for b in it] == [str(b) for b in loader]
    assert input_path([1, 2]) == "iterated as given (a list, not a DataLoader)"


def _model(seed=0):
    torch.manual_seed(seed)
    model = mlp(n_in=64, n_out=10, hidden=16, dropout=0.2)  # dropout: the global RNG is drawn per update
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_fit_on_batched_loader_matches_a_hand_loop_bit_for_bit():
    train, _ = digits(batch_size=64)
    model, opt = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    for _ in range(2):
        for x, y in train:  # the loader's per-sample path and default_collate
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    mine, opt2 = _model()
    trainer = Trainer(mine, Step(lambda b: F.cross_entropy(mine(b[0]), b[1]), opt2), device="cpu")
    torch.manual_seed(1)
    trainer.fit(train, epochs=2)
    assert isinstance(trainer._data.streams["train"].iterator, BatchedIterator)
    assert "input train: batched: TensorDataset indexed once per batch" in trainer.describe()
    assert_changed(before, model)
    assert_same_weights(model, mine)


@pytest.mark.parametrize("stop_at", [3, 22, 25])  # mid-epoch, the last batch of an epoch, into the second
def test_resume_from_state_dict_on_the_batched_path_is_bit_identical(stop_at):
    loaders = lambda: {"train": DataLoader(Subset(_data(n=90), list(range(5, 88))), batch_size=4, shuffle=True),  # noqa: E731
                       "valid": DataLoader(_data(n=20, seed=2), batch_size=6, shuffle=True)}

    def build():
        torch.manual_seed(0)
        w, a = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)
        ow, oa = torch.optim.Adam(w.parameters(), lr=0.01), torch.optim.SGD(a.parameters(), lr=0.1)
        ce = lambda m: lambda b: F.cross_entropy(F.dropout(m(b[0].flatten(1)), 0.3), b[1])  # noqa: E731
        steps = [Step(ce(w), ow, name="w", data="train"), Step(ce(a), oa, name="a", data="valid")]
        return {"w": w, "a": a}, Trainer({"w": w, "a": a}, steps, device="cpu")

    whole_models, whole = build()
    torch.manual_seed(5)
    whole.fit(loaders(), epochs=3)
    models, first = build()
    torch.manual_seed(5)
    first.fit(loaders(), max_updates=stop_at)
    assert isinstance(first._data.streams["train"].iterator, BatchedIterator)
    state = first.state_dict()
    resumed_models, resumed = build()
    torch.manual_seed(99)  # the state restores every generator
    resumed.load_state_dict(state)
    resumed.fit(loaders(), epochs=3)
    assert resumed.updates == whole.updates
    for name in ("w", "a"):
        assert_same_weights(resumed_models[name], whole_models[name])


@pytest.mark.parametrize("name", ["tensor-shuffled", "tensor-drop-last", "subset", "getitems", "stack-dataset"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_ranks_share_is_fetched_in_batches_bit_identical_to_the_shares_own(name, world_size):
    from trainflow.data.sharding import shard

    for rank in range(world_size):  # each rank's share as torchrun makes it, read in this process
        share = lambda: shard(LOADERS[name](), rank, world_size)  # noqa: E731
        theirs, rng_theirs = _epochs(share(), batched=False)
        mine, rng_mine = _epochs(share(), batched=True)
        assert [len(e) for e in mine] == [len(e) for e in theirs] and len(mine[0]) > 0
        for epoch_a, epoch_b in zip(mine, theirs):
            for a, b in zip(epoch_a, epoch_b):
                _assert_same_batches(a, b)  # the empty share of a short last global batch included
        assert torch.equal(rng_mine, rng_theirs)
    assert input_path(share()).startswith(f"batched: {LOADERS[name]().dataset.__class__.__name__}")
    assert input_path(share()).endswith(f", rank {world_size - 1}'s rows of each global batch of {world_size} ranks")


def test_an_empty_share_keeps_the_batch_structure_on_the_batched_path():
    from trainflow.data.sharding import shard

    batches = list(iterate(shard(DataLoader(_data(n=7), batch_size=2), rank=2, world_size=3)))  # 6, then 1
    assert [b[0].shape[0] for b in batches] == [2, 0]
    assert [(t.dtype, tuple(t.shape[1:])) for t in batches[1]] == [(torch.float32, (3, 2)), (torch.int64, ()),
                                                                  (torch.float64, ())]
    assert input_path(shard(DataLoader(_data(), batch_size=2, collate_fn=lambda s: s), 0, 2)) == (
        "the loader's own iterator (a custom collate_fn)")  # a share of a loader that was not batched is not
