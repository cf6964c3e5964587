"""Resume that stays exact when the data, parameters or callbacks are unusual, and clear errors
(before anything is loaded) when the script changed between the runs.

Each "killed" run here is a trainer that stops after some updates and saves; the restart is a
new trainer built from scratch, as a new process would build it (the real-process versions, with
SIGKILL, are in test_kill_setups.py). Every comparison is with the run that was never interrupted.
"""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from trainflow import Step, Trainer, checkpoint
from trainflow.callbacks import Checkpoint, CSVLogger, EarlyStopping, Freeze, Unfreeze


def _tensors(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


def _trainer(out_dir, callbacks=(), opt="sgd", extra=None):
    torch.manual_seed(0)
    model = mlp()
    params = [*model.parameters(), *([extra] if extra is not None else [])]
    optimizer = torch.optim.SGD(params, lr=0.05) if opt == "sgd" else torch.optim.Adam(params, lr=0.01)

    def mse(batch):
        x, y = batch
        out = model(x)
        if extra is not None:
            out = out * torch.exp(extra)
        return F.mse_loss(out, y)

    return Trainer(model, [Step(mse, optimizer, name="mse")], callbacks=list(callbacks), device="cpu",
                   out_dir=out_dir)


def _same_models(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.models["model"].state_dict().values(),
                                                  b.models["model"].state_dict().values()))


# ---------------------------------------------------------------- item 1: an IterableDataset


class Ordered(IterableDataset):
    """Samples in an order drawn per pass from the global RNG, in __iter__."""

    def __iter__(self):
        g = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))
        x, y = _tensors().tensors
        for i in torch.randperm(len(x), generator=g).tolist():
            yield x[i], y[i]


def test_an_iterable_dataset_resumed_mid_epoch_continues_where_it_was(tmp_path):
    def run(folder, **fit):
        seen = []
        trainer = _trainer(folder, [Checkpoint(every_updates=1)])

        class Count:
            def on_update_end(self, trainer, step, losses):
                seen.append(trainer.epoch)

        trainer.events.add(Count())
        trainer.fit(DataLoader(Ordered(), batch_size=6), **fit)
        return trainer, seen

    full, seen_full = run(tmp_path / "full", epochs=5)
    run(tmp_path / "killed", max_updates=10)  # half-way through epoch 2 (4 batches per epoch)
    torch.manual_seed(99)  # a new process: other RNG states
    resumed, seen_resumed = run(tmp_path / "killed", epochs=5, resume="latest")
    assert full.updates == resumed.updates == 20  # the epoch is not reread from its start (25 before)
    assert seen_resumed == seen_full[10:]
    assert _same_models(full, resumed)


# ---------------------------------------------------------------- item 2: a parameter outside the models


def test_a_trained_tensor_outside_the_models_is_saved_and_restored(tmp_path):
    def run(folder, **fit):
        log_scale = torch.zeros(1, requires_grad=True)
        trainer = _trainer(folder, [Checkpoint(every_updates=1)], opt="adam", extra=log_scale)
        trainer.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), **fit)
        return trainer, log_scale

    full, full_scale = run(tmp_path / "full", epochs=2)
    _, killed_scale = run(tmp_path / "killed", max_updates=7)
    assert checkpoint.load(checkpoint.latest(tmp_path / "killed" / "checkpoints"))["params"] == {
        "mse.0.4": killed_scale.detach()
    }
    resumed, resumed_scale = run(tmp_path / "killed", epochs=2, resume="latest")
    assert full_scale.item() != 0.0
    assert torch.equal(full_scale, resumed_scale)
    assert _same_models(full, resumed)


def test_a_state_without_the_free_parameter_is_refused(tmp_path):
    saved = _trainer(tmp_path)
    saved.fit(DataLoader(_tensors(), batch_size=4), max_updates=2)
    other = _trainer(tmp_path, opt="sgd", extra=torch.zeros(1, requires_grad=True))
    with pytest.raises(ValueError, match=r"parameters outside the models: the state has \[\], this trainer has \['mse.0.4'\]"):
        other.load_state_dict(saved.state_dict())


# ---------------------------------------------------------------- item 3: a run that stopped itself


def test_an_early_stopped_run_resumed_stays_stopped(tmp_path):
    def run(folder):
        stopper = EarlyStopping("mse/loss", patience=2, min_delta=100.0)  # never improves: stops after epoch 3
        trainer = _trainer(folder, [stopper, Checkpoint(every_epochs=1)])
        trainer.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), epochs=8, resume="latest")
        return trainer

    first = run(tmp_path)
    assert (first.epoch, first.updates, first.stop_reason) == (3, 18, "requested")
    for _ in range(3):  # the same script again and again: no update, the same end
        with pytest.warns(UserWarning, match=r"fit: nothing to do: the run being resumed stopped itself "
                                             r"\(stop_reason='requested'\), so it stays stopped"):
            again = run(tmp_path)
        assert (again.epoch, again.updates, again.stop_reason) == (3, 18, "requested")
        assert _same_models(first, again)


# ---------------------------------------------------------------- item 6: toggles listed out of epoch order


def test_freeze_and_unfreeze_listed_out_of_epoch_order_resume_in_epoch_order(tmp_path):
    def run(folder, **fit):
        toggles = [Unfreeze("0.*", at_epoch=2), Freeze("0.*", at_epoch=1)]
        trainer = _trainer(folder, [*toggles, Checkpoint(every_epochs=1)])
        trainer.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), **fit)
        return trainer

    full = run(tmp_path / "full", epochs=4)
    run(tmp_path / "killed", epochs=3)
    resumed = run(tmp_path / "killed", epochs=4, resume="latest")
    assert full.models["model"][0].weight.requires_grad and resumed.models["model"][0].weight.requires_grad
    assert _same_models(full, resumed)


# ---------------------------------------------------------------- item 4: persistent workers


def test_resuming_persistent_workers_after_their_first_pass_warns(tmp_path):
    def run(**fit):
        loader = DataLoader(_tensors(), batch_size=4, shuffle=True, num_workers=1, persistent_workers=True,
                            multiprocessing_context="fork")
        trainer = _trainer(tmp_path, [Checkpoint(every_updates=1)])
        trainer.fit(loader, **fit)
        return trainer

    run(max_updates=9)  # inside the second pass
    with pytest.warns(UserWarning, match=r"Data stream 'train' resumes after its first pass with persistent_workers"):
        run(epochs=2, resume="latest")


# ---------------------------------------------------------------- item 9: a script changed between the runs


def _saved(tmp_path, **fit):
    trainer = _trainer(tmp_path, [Checkpoint(every_updates=4, every_epochs=1)])
    trainer.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), **fit)
    return trainer


@pytest.mark.parametrize("fit", [{"epochs": 1}, {"max_updates": 8}], ids=["epoch-end", "mid-epoch"])
def test_another_batch_size_is_refused_before_anything_is_loaded(tmp_path, fit):
    _saved(tmp_path, **fit)
    torch.manual_seed(5)
    fresh = _trainer(tmp_path)
    before = {k: v.clone() for k, v in fresh.models["model"].state_dict().items()}
    with pytest.raises(ValueError, match=r"stream 'train': batches 6 then, 3 now, batch_size 4 then, 8 now\. "
                                         r"Received: other data \(or another batch_size\)"):
        fresh.fit(DataLoader(_tensors(), batch_size=8, shuffle=True), epochs=2, resume="latest")
    assert all(torch.equal(before[k], v) for k, v in fresh.models["model"].state_dict().items())
    assert fresh.updates == 0


def test_another_optimizer_type_is_refused_before_anything_is_loaded(tmp_path):
    _saved(tmp_path, epochs=1)
    adam = _trainer(tmp_path, opt="adam")
    before = {k: v.clone() for k, v in adam.models["model"].state_dict().items()}
    with pytest.raises(ValueError, match=r"optimizer 'mse' is Adam here, SGD in the state"):
        adam.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), epochs=2, resume="latest")
    assert all(torch.equal(before[k], v) for k, v in adam.models["model"].state_dict().items())


def test_a_file_without_optimizer_types_is_checked_by_its_hyperparameters(tmp_path):
    state = _saved(tmp_path, epochs=1).state_dict()
    del state["optimizer_types"]  # as written before the types were saved
    with pytest.raises(ValueError, match=r"optimizer 'mse' \(Adam\) has hyperparameters \[.*'betas'.*\], the state's \[.*'momentum'"):
        _trainer(tmp_path, opt="adam").load_state_dict(state)


def test_a_shorter_iterable_than_the_saved_pass_is_refused(tmp_path):
    trainer = _trainer(tmp_path, [Checkpoint(every_updates=1)])
    trainer.fit([b for b in DataLoader(_tensors(), batch_size=4)], max_updates=5)
    again = _trainer(tmp_path)
    with pytest.raises(ValueError, match=r"data stream 'train' yields only 3 batch\(es\) now, but the state being "
                                         r"resumed had taken 5 in this pass"):
        again.fit(iter_once(DataLoader(_tensors(12), batch_size=4)), epochs=1, resume="latest")


class iter_once:  # noqa: N801 - a re-iterable without len(): only replay can notice the change
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


# ---------------------------------------------------------------- item 10: callback state keyed by name


def _csv_rows(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def test_a_stateful_callback_inserted_before_csvlogger_keeps_the_csv_history(tmp_path):
    first = _trainer(tmp_path, [CSVLogger(), Checkpoint(every_epochs=1)])
    first.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), epochs=2)
    stopper = EarlyStopping("mse/loss", patience=5)
    again = _trainer(tmp_path, [stopper, CSVLogger(), Checkpoint(every_epochs=1)])
    with pytest.warns(UserWarning, match=r"The state holds no callback state for \['EarlyStopping'\]: they start fresh"):
        again.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), epochs=3, resume="latest")
    assert _csv_rows(tmp_path) == ["1", "2", "3"]  # the first run's rows are kept
    assert sorted(again.state_dict()["callbacks"]) == ["CSVLogger", "EarlyStopping"]


def test_saved_callback_state_that_no_callback_takes_is_named_in_a_warning(tmp_path):
    first = _trainer(tmp_path, [EarlyStopping("mse/loss"), CSVLogger(), Checkpoint(every_epochs=1)])
    first.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), epochs=1)
    again = _trainer(tmp_path, [CSVLogger(), Checkpoint(every_epochs=1)])
    with pytest.warns(UserWarning, match=r"The state holds callback state for \['EarlyStopping'\], which no callback"):
        again.fit(DataLoader(_tensors(), batch_size=4, shuffle=True), epochs=2, resume="latest")


def test_two_callbacks_of_a_class_and_a_state_key():
    class Counter:
        def __init__(self, key=None):
            if key:
                self.state_key = key
            self.n = 0

        def on_update_end(self, trainer, step, losses):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    trainer = _trainer(None, [Counter(), Counter(), Counter("mine")])
    trainer.fit(DataLoader(_tensors(), batch_size=4), max_updates=2)
    assert sorted(trainer.state_dict()["callbacks"]) == ["Counter", "Counter.1", "mine"]
    # an older file keyed by position among stateful callbacks still loads, by position
    old = trainer.state_dict()
    old["callbacks"] = {"0:Counter": {"n": 5}, "1:Counter": {"n": 6}, "2:Counter": {"n": 7}}
    fresh = _trainer(None, [Counter(), Counter(), Counter("mine")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(old)
    assert [cb.n for cb in fresh.events.callbacks] == [5, 6, 7]
