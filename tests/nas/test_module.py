"""Single-architecture trainers: FunctionalTrainer, TrainModule and ModuleTrainer against hand loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainflow
from tests.conftest import assert_changed, assert_same_weights
from trainflow.callbacks import Checkpoint
from trainflow.data import digits
from trainflow.nas import FunctionalTrainer, ModuleTrainer, TrainModule
from trainflow.nas.trial import _reporting


class Recorder:
    """Receives a trial's reports (what an experiment's reporter gets)."""

    def __init__(self) -> None:
        self.intermediate_values: list = []
        self.final_values: list = []

    def intermediate(self, value) -> None:
        self.intermediate_values.append(value)

    def final(self, value) -> None:
        self.final_values.append(value)


def data(n: int, batch_size: int, seed: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)),
                      batch_size=batch_size, shuffle=shuffle)


class Head(TrainModule):
    """A head on the sampled model, Adam on both."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.head(self.model(x)), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.head(self.model(x)), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Regression(Head):
    """Head, with the validation loss reported each epoch and at the end."""

    def on_validation_epoch_end(self):
        trainflow.nas.report_intermediate_result(self.trainer.callback_metrics["val_loss"].item())

    def teardown(self, stage):
        if stage == "fit":
            trainflow.nas.report_final_result(self.trainer.callback_metrics["val_loss"].item())


def hand_loop(model: nn.Module, head: nn.Module, train: DataLoader, val: DataLoader, epochs: int):
    """The same training written out: Lightning's order, and its sample-weighted validation mean."""
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=0.01)
    means, last_train = [], None
    for _ in range(epochs):
        model.train(), head.train()
        for x, y in train:
            opt.zero_grad()
            loss = F.mse_loss(head(model(x)), y)
            loss.backward()
            opt.step()
            last_train = loss.detach()
        model.eval(), head.eval()
        total, count = None, 0
        with torch.no_grad():
            for x, y in val:
                part = F.mse_loss(head(model(x)), y) * len(x)
                total = part if total is None else total + part
                count += len(x)
        means.append((total / count).item())
    return means, last_train


def test_module_trainer_ends_bit_identical_to_the_hand_loop() -> None:
    train, val = data(40, 8, seed=1, shuffle=True), data(10, 4, seed=2, shuffle=False)  # val batches 4, 4, 2
    torch.manual_seed(0)
    template = Regression()  # an instance: deep-copied for the evaluation
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    before = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    head_before = {k: v.clone() for k, v in template.head.state_dict().items()}
    recorder = Recorder()
    torch.manual_seed(7)
    with _reporting(recorder):
        trained = ModuleTrainer(template, train_data=train, val_data=val, epochs=3, device="cpu").evaluate(model)

    hand_model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    hand_model.load_state_dict({k[len("model."):]: v for k, v in before.items()})
    hand_head = nn.Linear(3, 2)
    hand_head.load_state_dict(head_before)
    torch.manual_seed(7)
    means, last_train = hand_loop(hand_model, hand_head, train, val, epochs=3)

    assert trained.model is model
    assert_changed(before, nn.ModuleDict({"model": model}))
    assert_same_weights(model, hand_model)
    assert_same_weights(trained.head, hand_head)
    assert recorder.intermediate_values == means  # the sample-weighted means, to the bit
    assert recorder.final_values == [means[-1]]
    metrics = trained.trainer.callback_metrics
    assert torch.equal(metrics["train_loss"], last_train)  # training values: the last update's
    assert metrics["val_loss"].dtype == torch.float32 and metrics["val_loss"].item() == means[-1]
    assert trained.trainer.trainer.updates == 15 and trained.current_epoch == 3 and trained.global_step == 15
    assert all(torch.equal(template.head.state_dict()[k], v) for k, v in head_before.items())  # template untouched


# --- seed 002's AutoEncoder ---------------------------------------------------------------------


class AutoEncoder(TrainModule):  # seed 002's class body, with nni. -> trainflow.nas. and 28*28 -> 64
    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Linear(3, 64),
            nn.ReLU(),
            nn.Linear(64, 64)
        )

    def forward(self, x):
        embedding = self.model(x)  # let's search for encoder
        return embedding

    def training_step(self, batch, batch_idx):
        # training_step 定义了训练循环
        # 它独立于 forward 函数
        x, y = batch
        x = x.view(x.size(0), -1)
        z = self.model(x)  # model is the one that is searched for
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        # 默认日志记录到 TensorBoard
        self.log('train_loss', loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        x = x.view(x.size(0), -1)
        z = self.model(x)
        x_hat = self.decoder(z)
        loss = F.mse_loss(x_hat, x)
        self.log('val_loss', loss)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        return optimizer

    def on_validation_epoch_end(self):
        trainflow.nas.report_intermediate_result(self.trainer.callback_metrics['val_loss'].item())

    def teardown(self, stage):
        if stage == 'fit':
            trainflow.nas.report_final_result(self.trainer.callback_metrics['val_loss'].item())


def test_seed_autoencoder_runs_unchanged_and_reports_the_hand_loop_values() -> None:
    train, val = digits(batch_size=100)  # validation: 359 samples, a last batch of 59
    torch.manual_seed(0)
    encoder = nn.Linear(64, 3)
    hand_encoder = nn.Linear(64, 3)
    hand_encoder.load_state_dict(encoder.state_dict())
    recorder = Recorder()
    torch.manual_seed(1)
    with _reporting(recorder):
        trained = ModuleTrainer(AutoEncoder, train_data=train, val_data=val, epochs=2, device="cpu").evaluate(encoder)

    torch.manual_seed(1)
    decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 64))  # AutoEncoder() draws it first
    opt = torch.optim.Adam([*hand_encoder.parameters(), *decoder.parameters()], lr=1e-3)
    means = []
    for _ in range(2):
        for x, _y in train:
            opt.zero_grad()
            loss = F.mse_loss(decoder(hand_encoder(x)), x)
            loss.backward()
            opt.step()
        with torch.no_grad():
            parts = [(F.mse_loss(decoder(hand_encoder(x)), x) * len(x), len(x)) for x, _y in val]
        total = parts[0][0]
        for part, _ in parts[1:]:
            total = total + part
        means.append((total / sum(n for _, n in parts)).item())

    assert_same_weights(trained.model, hand_encoder)
    assert_same_weights(trained.decoder, decoder)
    assert recorder.intermediate_values == means and len(means) == 2
    assert recorder.final_values == [means[-1]]
    assert means[1] < means[0]  # it trains


# --- optimizers, hooks, options -----------------------------------------------------------------


class TwoOptimizers(Head):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.model.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=0.01)]


def test_a_list_of_optimizers_is_stepped_together() -> None:
    train = data(24, 8, seed=3, shuffle=False)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    module = TwoOptimizers()
    hand_model, hand_head = nn.Linear(4, 3), nn.Linear(3, 2)
    hand_model.load_state_dict(model.state_dict()), hand_head.load_state_dict(module.head.state_dict())
    trained = ModuleTrainer(module, train_data=train, epochs=2, device="cpu").evaluate(model)

    sgd, adam = torch.optim.SGD(hand_model.parameters(), lr=0.1), torch.optim.Adam(hand_head.parameters(), lr=0.01)
    for _ in range(2):
        for x, y in train:
            sgd.zero_grad(), adam.zero_grad()
            F.mse_loss(hand_head(hand_model(x)), y).backward()
            sgd.step(), adam.step()
    assert_same_weights(trained.model, hand_model)
    assert_same_weights(trained.head, hand_head)


class Manual(Head):
    """Two updates per batch, as a GAN's training_step does under Lightning's manual optimization."""

    automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_model, opt_head = self.optimizers()
        x, y = batch
        head_loss = F.mse_loss(self.head(self.model(x)), y)
        opt_head.zero_grad()
        self.manual_backward(head_loss)
        opt_head.step()
        model_loss = F.l1_loss(self.head(self.model(x)), y)
        opt_model.zero_grad()
        self.manual_backward(model_loss)
        opt_model.step()
        self.log("model_loss", model_loss)
        return model_loss

    def configure_optimizers(self):
        return [torch.optim.SGD(self.model.parameters(), lr=0.1), torch.optim.Adam(self.head.parameters(), lr=0.01)]


def test_manual_optimization_runs_as_a_custom_step_bit_identical_to_the_hand_loop() -> None:
    train = data(24, 8, seed=3, shuffle=True)
    torch.manual_seed(0)
    model, module = nn.Linear(4, 3), Manual()
    hand_model, hand_head = nn.Linear(4, 3), nn.Linear(3, 2)
    hand_model.load_state_dict(model.state_dict()), hand_head.load_state_dict(module.head.state_dict())
    torch.manual_seed(1)
    trained = ModuleTrainer(module, train_data=train, epochs=2, device="cpu").evaluate(model)

    sgd, adam = torch.optim.SGD(hand_model.parameters(), lr=0.1), torch.optim.Adam(hand_head.parameters(), lr=0.01)
    torch.manual_seed(1)
    for _ in range(2):
        for x, y in train:
            adam.zero_grad()
            F.mse_loss(hand_head(hand_model(x)), y).backward()
            adam.step()
            sgd.zero_grad()
            last = F.l1_loss(hand_head(hand_model(x)), y)
            last.backward()
            sgd.step()
    assert_same_weights(trained.model, hand_model)
    assert_same_weights(trained.head, hand_head)
    assert torch.equal(trained.trainer.callback_metrics["model_loss"], last.detach())
    assert trained.trainer.trainer.updates == 6 and torch.equal(trained.trainer.trainer.losses["training_step/loss"], last.detach())


def test_manual_optimization_errors() -> None:
    train = data(8, 4, seed=0, shuffle=False)

    class BackwardInAutomatic(Head):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            return loss

    class Closure(Manual):
        def training_step(self, batch, batch_idx):
            self.optimizers()[0].step(lambda: None)

    class NeverSteps(Manual):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(RuntimeError, match=r"BackwardInAutomatic\.manual_backward is for manual optimization, inside training_step: set `automatic_optimization = False`"):
        ModuleTrainer(BackwardInAutomatic, train_data=train, epochs=1, device="cpu").evaluate(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"step\(closure\) is not supported under manual optimization\. Received: closure=<function"):
        ModuleTrainer(Closure, train_data=train, epochs=1, device="cpu").evaluate(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"the custom update returned without stepping an optimizer"):
        ModuleTrainer(NeverSteps, train_data=train, epochs=1, device="cpu").evaluate(nn.Linear(4, 3))


class Scheduled(Head):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)}


class StepScheduled(Head):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_lr_scheduler_steps_per_epoch_by_default_and_per_update_on_request() -> None:
    train = data(24, 8, seed=3, shuffle=False)  # 3 updates per epoch
    per_epoch = ModuleTrainer(Scheduled, train_data=train, epochs=2, device="cpu").evaluate(nn.Linear(4, 3))
    per_update = ModuleTrainer(StepScheduled, train_data=train, epochs=2, device="cpu").evaluate(nn.Linear(4, 3))
    assert per_epoch.trainer.trainer.optimizers["training_step"].param_groups[0]["lr"] == 0.1 * 0.5**2
    assert per_update.trainer.trainer.optimizers["training_step"].param_groups[0]["lr"] == 0.1 * 0.5**6


class Hooked(Regression):
    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def training_step(self, batch, batch_idx):
        self.calls.append(("training_step", self.current_epoch, batch_idx))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.calls.append(("validation_step", self.current_epoch, batch_idx))
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self):
        self.calls.append(("on_validation_epoch_end", sorted(self.trainer.callback_metrics)))

    def teardown(self, stage):
        self.calls.append(("teardown", stage))


def test_hooks_run_in_lightning_order_and_teardown_once_at_the_end() -> None:
    calls: list = []
    train, val = data(16, 8, seed=4, shuffle=True), data(6, 4, seed=5, shuffle=False)
    ModuleTrainer(lambda: Hooked(calls), train_data=train, val_data=val, epochs=2, device="cpu").evaluate(nn.Linear(4, 3))
    assert calls == [
        ("training_step", 0, 0), ("training_step", 0, 1),
        ("validation_step", 1, 0), ("validation_step", 1, 1),
        ("on_validation_epoch_end", ["train_loss", "val_loss"]),
        ("training_step", 1, 0), ("training_step", 1, 1),
        ("validation_step", 2, 0), ("validation_step", 2, 1),
        ("on_validation_epoch_end", ["train_loss", "val_loss"]),
        ("teardown", "fit"),
    ]


def test_each_evaluation_trains_a_fresh_module() -> None:
    train = data(16, 8, seed=4, shuffle=False)
    torch.manual_seed(0)
    template = Head()
    head = {k: v.clone() for k, v in template.head.state_dict().items()}
    trainer = ModuleTrainer(template, train_data=train, epochs=1, device="cpu")
    torch.manual_seed(1)
    first = trainer.evaluate(nn.Linear(4, 3))
    torch.manual_seed(1)
    second = trainer.evaluate(nn.Linear(4, 3))
    assert first is not second and first.head is not second.head
    assert_same_weights(first, second)  # the same seed, the same start: no weights shared
    assert all(torch.equal(template.head.state_dict()[k], v) for k, v in head.items())
    assert template.model is None


def test_trainer_options_apply_callbacks_metrics_and_checkpoints(tmp_path) -> None:
    seen = []

    class EpochLogs:
        def on_epoch_end(self, trainer, logs):
            seen.append(sorted(logs))

    train, val = data(16, 8, seed=4, shuffle=False), data(8, 4, seed=5, shuffle=False)
    ModuleTrainer(
        Regression, train_data=train, val_data=val, epochs=2,
        device="cpu", out_dir=tmp_path, callbacks=[EpochLogs(), Checkpoint(every_epochs=1, keep_last=5)],
    ).evaluate(nn.Linear(4, 3))
    assert seen == [["training_step/loss", "val/val_loss"]] * 2
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == 2


def test_validation_metrics_reach_callback_metrics() -> None:
    class WithMetric(Head):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.mae.update(self.head(self.model(x)), y)

    train, val = data(16, 8, seed=4, shuffle=False), data(10, 4, seed=5, shuffle=False)
    mae = torchmetrics.MeanAbsoluteError()

    def build() -> WithMetric:
        module = WithMetric()
        module.mae = mae
        return module

    trained = ModuleTrainer(build, train_data=train, val_data=val, epochs=1, device="cpu", metrics={"val/mae": mae})
    trained = trained.evaluate(nn.Linear(4, 3))
    by_hand = torchmetrics.MeanAbsoluteError()
    with torch.no_grad():
        for x, y in val:
            by_hand.update(trained.head(trained.model(x)), y)
    assert trained.trainer.callback_metrics["mae"].item() == by_hand.compute().item()


def test_training_step_may_return_a_dict_with_the_loss() -> None:
    class DictLoss(Head):
        def training_step(self, batch, batch_idx):
            return {"loss": super().training_step(batch, batch_idx), "other": 1}

    trained = ModuleTrainer(DictLoss, train_data=data(8, 4, seed=6, shuffle=False), epochs=1, device="cpu")
    assert trained.evaluate(nn.Linear(4, 3)).trainer.trainer.updates == 2


# --- FunctionalTrainer --------------------------------------------------------------------------


def test_functional_trainer_runs_the_seed_fit_function() -> None:
    loader = data(16, 8, seed=8, shuffle=False)

    def train(model, dataloader):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in dataloader:
            opt.zero_grad()
            F.mse_loss(model(x), y[:, :1]).backward()
            opt.step()

    def test(model, dataloader):
        with torch.no_grad():
            return sum(F.mse_loss(model(x), y[:, :1]).item() for x, y in dataloader)

    def fit(model, dataloader):  # seed 002
        train(model, dataloader)
        acc = test(model, dataloader)
        trainflow.nas.report_final_result(acc)

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    hand = nn.Linear(4, 1)
    hand.load_state_dict(model.state_dict())
    recorder = Recorder()
    with _reporting(recorder):
        assert FunctionalTrainer(fit, dataloader=loader).evaluate(model) is None
    train(hand, loader)
    assert recorder.final_values == [test(hand, loader)]


# --- errors -------------------------------------------------------------------------------------


class NoTrainingStep(TrainModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoValidation(Regression):
    validation_step = TrainModule.validation_step


class NoOptimizers(TrainModule):
    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).mean()


def test_module_trainer_argument_errors() -> None:
    train = data(8, 4, seed=0, shuffle=False)
    with pytest.raises(TypeError, match=r"module must be a TrainModule \(an instance, its class, or a function returning one\)\. Received: module=Linear"):
        ModuleTrainer(nn.Linear(2, 2), train_data=train, epochs=1)
    with pytest.raises(TypeError, match=r"module must be a TrainModule.*Received: module=<class 'torch\.nn\.modules\.linear\.Linear'>"):
        ModuleTrainer(nn.Linear, train_data=train, epochs=1)
    with pytest.raises(TypeError, match=r"module must be a TrainModule.*Received: module=3 of type int"):
        ModuleTrainer(3, train_data=train, epochs=1)
    with pytest.raises(TypeError, match=r"NoTrainingStep does not define training_step\(\)\. .*Define `def training_step\(self, \.\.\.\)`"):
        ModuleTrainer(NoTrainingStep, train_data=train, epochs=1)
    with pytest.raises(TypeError, match=r"NoOptimizers does not define configure_optimizers\(\)"):
        ModuleTrainer(NoOptimizers(), train_data=train, epochs=1)
    with pytest.raises(ValueError, match=r"val_data is given but NoValidation defines no validation_step\(batch, batch_idx\)"):
        ModuleTrainer(NoValidation, train_data=train, val_data=train, epochs=1)
    for epochs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"epochs must be an int >= 1\. Received: epochs={epochs!r}"):
            ModuleTrainer(Regression, train_data=train, epochs=epochs)
    with pytest.raises(TypeError, match=r"train_data must be a DataLoader or an iterable of batches\. Received: train_data=None"):
        ModuleTrainer(Regression, train_data=None, epochs=1)
    with pytest.raises(TypeError, match=r"val_data must be a DataLoader or an iterable of batches\. Received: val_data=3"):
        ModuleTrainer(Regression, train_data=train, val_data=3, epochs=1)
    with pytest.raises(TypeError, match=r"unknown trainer option\(s\) \['max_epochs'\]\. .*Trainer options are \['metrics', 'callbacks'"):
        ModuleTrainer(Regression, train_data=train, epochs=1, max_epochs=3)


def test_errors_found_when_the_module_runs() -> None:
    train = data(8, 4, seed=0, shuffle=False)

    class NoLoss(Head):
        def training_step(self, batch, batch_idx):
            super().training_step(batch, batch_idx)

    class NothingToOptimize(Head):
        def configure_optimizers(self):
            return None

    class BadDict(Head):
        def configure_optimizers(self):
            return {"optimizer": torch.optim.SGD(self.parameters(), lr=0.1), "scheduler": None}

    with pytest.raises(TypeError, match=r"NoLoss\.training_step must return the loss: a scalar tensor, or a dict with a 'loss' tensor\. Received: None\. End it with `return loss`"):
        ModuleTrainer(NoLoss, train_data=train, epochs=1, device="cpu").evaluate(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"NothingToOptimize\.configure_optimizers must return what trains the module\. Received: None\. Return an optimizer, a list of optimizers"):
        ModuleTrainer(NothingToOptimize, train_data=train, epochs=1).evaluate(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"BadDict\.configure_optimizers returned a dict with keys \['optimizer', 'scheduler'\]; expected 'optimizer' and optionally 'lr_scheduler'"):
        ModuleTrainer(BadDict, train_data=train, epochs=1).evaluate(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"the module factory must return a TrainModule\. Received: it returned Linear"):
        ModuleTrainer(lambda: nn.Linear(4, 3), train_data=train, epochs=1).evaluate(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"TrainModule\.set_model: model must be an nn\.Module\. Received: model=3"):
        ModuleTrainer(Regression, train_data=train, epochs=1).evaluate(3)


def test_log_and_trainer_outside_a_fit() -> None:
    module = Regression()
    with pytest.raises(RuntimeError, match=r"Regression is not attached to a trainer: self\.trainer exists while \(and after\) a ModuleTrainer fits it"):
        module.log("loss", 1.0)

    class BadLog(Head):
        def training_step(self, batch, batch_idx):
            self.log("vector", torch.ones(2))

    with pytest.raises(ValueError, match=r"TrainModule\.log: 'vector' must be a scalar\. Received: a tensor of shape \(2,\)"):
        ModuleTrainer(BadLog, train_data=data(8, 4, seed=0, shuffle=False), epochs=1).evaluate(nn.Linear(4, 3))


def test_functional_trainer_errors() -> None:
    with pytest.raises(TypeError, match=r"fn must be a function fn\(model, \*\*kwargs\)\. Received: fn=3 of type int"):
        FunctionalTrainer(3)
    with pytest.raises(TypeError, match=r"fn must accept the model as its first positional argument and the keyword arguments given \(.*\)\. Received: fn\(\) with kwargs \[\]"):
        FunctionalTrainer(lambda: None)
    with pytest.raises(TypeError, match=r"Received: fn\(model\) with kwargs \['dataloader'\]"):
        FunctionalTrainer(lambda model: None, dataloader=[])
