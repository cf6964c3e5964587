"""Random generators a run's numbers depend on, restored on resume: here a dataset's own
``torch.Generator`` (augmentation drawn in ``__getitem__``), which lives outside the global RNG."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_weights
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from trainflow import Step, Trainer, rng
from trainflow.callbacks import Checkpoint

N, BATCH, EPOCHS = 24, 4, 2  # 6 updates per epoch


class Augmented(Dataset):
    """Samples with noise drawn from the dataset's own generator, as torchvision-style transforms may do."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(N, 4, generator=g), torch.randn(N, 1, generator=g)
        self.generator = torch.Generator().manual_seed(5)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(4, generator=self.generator), self.y[i]


def build(out_dir, wrap=False, save=True):
    """What a fresh process builds: the model, and a new dataset whose generator starts from its seed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def mse(batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    dataset = Augmented()
    loader = DataLoader(Subset(dataset, range(N)) if wrap else dataset, batch_size=BATCH, shuffle=True)
    trainer = Trainer(model, [Step(mse, opt, name="fit")], callbacks=[Checkpoint(every_updates=1)] if save else [],
                      device="cpu", out_dir=out_dir)
    return trainer, model, loader


@pytest.mark.parametrize("wrap", [False, True], ids=["dataset", "subset"])
@pytest.mark.parametrize("stop_at", [3, 6, 8])  # mid-epoch 1, its end, mid-epoch 2
def test_a_dataset_generator_is_resumed(tmp_path, stop_at, wrap):
    reference, ref_model, loader = build(tmp_path / "reference", wrap, save=False)
    reference.fit(loader, epochs=EPOCHS)

    first, _, loader = build(tmp_path / "run", wrap)
    first.fit(loader, max_updates=stop_at)
    torch.manual_seed(999)  # a restarted process starts from other global states
    resumed, model, loader = build(tmp_path / "run", wrap)
    resumed.fit(loader, epochs=EPOCHS, resume="latest")
    assert resumed.updates == reference.updates == EPOCHS * N // BATCH
    assert_same_weights(model, ref_model)
    assert resumed.logs == reference.logs


def test_dataset_generators_are_found_through_wrappers():
    dataset = Augmented()
    loader = DataLoader(Subset(Subset(dataset, range(8)), range(4)), batch_size=2)
    assert rng.dataset_generators(loader) == [dataset.generator]
    assert rng.dataset_generators([1, 2]) == []
