"""The data-loading and training set-ups that the kill harness kills and resumes (not a test module).

Each set-up builds ``(trainer, data, fit_kwargs)`` from scratch, as a training script would, and
stresses one way a resumed run can drift from an uninterrupted one: a shuffle, worker seeds, a
sampler's own generator, random numbers drawn in a collate function or a worker, dropout,
schedulers that depend on the update or epoch count, metrics and validation, an early stop, a
second stream, an iterable dataset, a parameter outside the models, persistent workers, a
batch sampler's generator, freezing callbacks listed out of epoch order, a dataset's own
generator. Every loss calls ``pauser.loss_call()`` so that ``kill_run.py --pause forward:U:M``
can stop it there.

Every set-up trains for ``EPOCHS[name]`` epochs, checkpointing every 3 updates and every epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, RandomSampler, TensorDataset
from torch.utils.data import WeightedRandomSampler

from trainflow import Step, Trainer
from trainflow.callbacks import Checkpoint, CSVLogger, EarlyStopping, Freeze, Unfreeze

EPOCHS = {
    "shuffled": 3, "workers": 3, "weighted": 3, "collate": 3, "dropout": 3, "onecycle": 3, "warm_restarts": 4,
    "val_best": 3, "early_stop": 8, "two_streams": 3, "iterable": 3, "free_param": 3, "persistent": 3,
    "batch_sampler": 3, "freeze_order": 4, "dataset_generator": 3, "persistent_random": 3,
}
#: set-ups outside the promise (docs/guides/checkpoints.md, limits): run for the figures, expected to differ
LIMITS = {"persistent_random": "persistent workers drawing random numbers in __getitem__: their generators "
                               "live in the worker processes, in no checkpoint"}


def _tensors(n: int = 24, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)  # the data is fixed; only the loading draws random numbers
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))


class Noisy(Dataset):
    """Map-style: each sample gets noise drawn from torch's global RNG (in a worker: the worker's)."""

    def __init__(self, n: int = 24) -> None:
        self.x, self.y = _tensors(n).tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


class OwnNoise(Noisy):
    """Map-style: the noise comes from the dataset's own generator (an attribute: it is checkpointed)."""

    def __init__(self, n: int = 24) -> None:
        super().__init__(n)
        self.generator = torch.Generator().manual_seed(11)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4, generator=self.generator), self.y[i]


class Stream(IterableDataset):
    """An iterable dataset whose order is drawn, per pass, from a generator seeded in ``__iter__``."""

    def __init__(self, n: int = 24) -> None:
        self.x, self.y = _tensors(n).tensors

    def __iter__(self):
        g = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))  # seeded from the global RNG
        for i in torch.randperm(len(self.x), generator=g).tolist():
            yield self.x[i], self.y[i]


def _mlp(dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(4, 8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, 1))


def _callbacks(printer: Any, *before: Any, **checkpoint: Any) -> list[Any]:
    return [*before, CSVLogger(), printer, Checkpoint(every_updates=3, every_epochs=1, keep_last=2, **checkpoint)]


def _simple(out: Path, pauser: Any, printer: Any, loader: DataLoader, *, dropout: float = 0.0,
            scheduler: Any = None, callbacks: tuple = (), opt: str = "sgd") -> tuple[Trainer, Any, dict]:
    model = _mlp(dropout)
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-2))
    sched = scheduler(optimizer) if scheduler else None

    def mse(batch):
        pauser.loss_call()
        x, y = batch
        return F.mse_loss(model(x), y)

    trainer = Trainer(model, [Step(mse, optimizer, name="mse", scheduler=sched)],
                      callbacks=_callbacks(printer, *callbacks), device="cpu", out_dir=out)
    return trainer, loader, {}


def shuffled(out, pauser, printer):
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, shuffle=True))


def workers(out, pauser, printer):
    # two worker processes, each drawing noise in __getitem__ from its own seed (base seed + id)
    loader = DataLoader(Noisy(), batch_size=4, shuffle=True, num_workers=2, multiprocessing_context="fork")
    return _simple(out, pauser, printer, loader)


def weighted(out, pauser, printer):
    sampler = WeightedRandomSampler(torch.linspace(0.1, 1.0, 24), num_samples=24, replacement=True,
                                    generator=torch.Generator().manual_seed(3))
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, sampler=sampler))


def _noisy_collate(samples):
    x = torch.stack([s[0] for s in samples])
    y = torch.stack([s[1] for s in samples])
    return x + 0.1 * torch.randn_like(x), y  # augmentation drawn from the global RNG, in this process


def collate(out, pauser, printer):
    loader = DataLoader(_tensors(), batch_size=4, shuffle=True, collate_fn=_noisy_collate)
    return _simple(out, pauser, printer, loader)


def dropout(out, pauser, printer):
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, shuffle=True), dropout=0.3)


def onecycle(out, pauser, printer):
    sched = lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=3 * 6)  # noqa: E731
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, shuffle=True), scheduler=sched)


def warm_restarts(out, pauser, printer):
    sched = lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2)  # noqa: E731
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, shuffle=True), scheduler=sched,
                   opt="adam")


def val_best(out, pauser, printer):
    model = _mlp(0.2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_mse, val_mse = torchmetrics.MeanSquaredError(), torchmetrics.MeanSquaredError()

    def mse(batch):
        pauser.loss_call()
        x, y = batch
        pred = model(x)
        train_mse.update(pred.detach(), y)
        return F.mse_loss(pred, y)

    def val_step(batch):
        x, y = batch
        pred = model(x)
        val_mse.update(pred, y)
        return F.mse_loss(pred, y)

    trainer = Trainer(model, [Step(mse, opt, name="mse")], metrics={"train/mse": train_mse, "val/mse": val_mse},
                      callbacks=_callbacks(printer, monitor="val/mse", keep_best=1), device="cpu", out_dir=out)
    val = DataLoader(_tensors(12, seed=2), batch_size=6)
    return trainer, DataLoader(_tensors(), batch_size=4, shuffle=True), {"val_data": val, "val_step": val_step}


def early_stop(out, pauser, printer):
    # min_delta is larger than any change: the loss never "improves", so the run stops after epoch 3 of 8
    stopper = EarlyStopping("mse/loss", patience=2, min_delta=100.0)
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, shuffle=True), callbacks=(stopper,))


def two_streams(out, pauser, printer):
    model = _mlp(0.2)
    head = nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    head_opt = torch.optim.SGD(head.parameters(), lr=0.05)

    def main(batch):
        pauser.loss_call()
        return F.mse_loss(model(batch[0]), batch[1])

    def side(batch):
        pauser.loss_call()
        return F.mse_loss(head(batch[0]), batch[1])

    steps = [Step(main, opt, name="main", repeat=2), Step(side, head_opt, name="side", data="extra")]
    trainer = Trainer({"model": model, "head": head}, steps, callbacks=_callbacks(printer), device="cpu", out_dir=out)
    data = {"train": DataLoader(_tensors(), batch_size=4, shuffle=True),
            "extra": DataLoader(_tensors(10, seed=5), batch_size=4, shuffle=True)}
    return trainer, data, {}


def iterable(out, pauser, printer):
    return _simple(out, pauser, printer, DataLoader(Stream(), batch_size=4), dropout=0.2)


def free_param(out, pauser, printer):
    model = _mlp()
    log_scale = torch.zeros(1, requires_grad=True)  # learnt, but in no module
    opt = torch.optim.Adam([*model.parameters(), log_scale], lr=1e-2)

    def nll(batch):
        pauser.loss_call()
        x, y = batch
        return (((model(x) - y) ** 2) * torch.exp(-log_scale) + log_scale).mean()

    trainer = Trainer(model, [Step(nll, opt, name="nll")], callbacks=_callbacks(printer), device="cpu", out_dir=out)
    return trainer, DataLoader(_tensors(), batch_size=4, shuffle=True), {}


def persistent(out, pauser, printer):
    # persistent workers whose samples draw no random numbers: exact (see the guide's limits)
    loader = DataLoader(_tensors(), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                        multiprocessing_context="fork")
    return _simple(out, pauser, printer, loader)


def dataset_generator(out, pauser, printer):
    return _simple(out, pauser, printer, DataLoader(OwnNoise(), batch_size=4, shuffle=True))


def persistent_random(out, pauser, printer):
    # persistent workers whose __getitem__ draws noise: not exact after the first epoch (a known limit)
    loader = DataLoader(Noisy(), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True,
                        multiprocessing_context="fork")
    return _simple(out, pauser, printer, loader)


def batch_sampler(out, pauser, printer):
    sampler = BatchSampler(RandomSampler(range(24), generator=torch.Generator().manual_seed(7)), 4, drop_last=False)
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_sampler=sampler))


def freeze_order(out, pauser, printer):
    # listed out of epoch order: frozen at epoch 1, trainable again from epoch 2
    toggles = (Unfreeze("0.*", at_epoch=2), Freeze("0.*", at_epoch=1))
    return _simple(out, pauser, printer, DataLoader(_tensors(), batch_size=4, shuffle=True), callbacks=toggles)


SETUPS = {name: globals()[name] for name in EPOCHS}
