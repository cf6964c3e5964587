"""The callback timeline, pinned: every call recorded and compared with a literal list."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, regression_loader

from trainflow import Step, Trainer


class Recorder:
    def __init__(self, tag: str, calls: list):
        self.tag, self.calls = tag, calls

    def on_fit_start(self, trainer):
        self.calls.append((self.tag, "fit_start", trainer.epoch, trainer.updates))

    def on_epoch_start(self, trainer):
        self.calls.append((self.tag, "epoch_start", trainer.epoch, trainer.updates))

    def on_update_end(self, trainer, step, losses):
        self.calls.append((self.tag, f"update_end {step.name} {sorted(losses)}", trainer.epoch, trainer.updates))

    def on_validation_end(self, trainer, logs):
        self.calls.append((self.tag, f"validation_end {sorted(logs)}", trainer.epoch, trainer.updates))

    def on_epoch_end(self, trainer, logs):
        self.calls.append((self.tag, f"epoch_end {sorted(logs)}", trainer.epoch, trainer.updates))

    def on_fit_end(self, trainer):
        self.calls.append((self.tag, "fit_end", trainer.epoch, trainer.updates))

    def on_exception(self, trainer, error):
        self.calls.append((self.tag, f"exception {type(error).__name__}", trainer.epoch, trainer.updates))


def _trainer(calls, loss=None):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = loss or (lambda b: F.mse_loss(model(b[0]), b[1]))
    steps = [Step(loss, opt, name="D"), Step(lambda b: F.l1_loss(model(b[0]), b[1]), opt, name="G", batch="same")]
    return Trainer(model, steps, callbacks=[Recorder("a", calls), Recorder("b", calls)], device="cpu"), model


def test_call_order_over_two_epochs_with_validation():
    calls = []
    trainer, model = _trainer(calls)
    loader = regression_loader(n=16)  # 2 batches: D G D G per epoch
    trainer.fit(loader, epochs=2, val_data=loader, val_step=lambda b: F.mse_loss(model(b[0]), b[1]))
    D, G = "update_end D ['D/loss']", "update_end G ['G/loss']"
    val = "validation_end ['val/loss']"
    end = "epoch_end ['D/loss', 'G/loss', 'val/loss']"
    expected = []
    for tag_event in [
        ("fit_start", 0, 0),
        ("epoch_start", 0, 0), (D, 0, 1), (G, 0, 2), (D, 0, 3), (G, 0, 4), (val, 1, 4), (end, 1, 4),
        ("epoch_start", 1, 4), (D, 1, 5), (G, 1, 6), (D, 1, 7), (G, 1, 8), (val, 2, 8), (end, 2, 8),
        ("fit_end", 2, 8),
    ]:
        event, epoch, updates = tag_event
        expected += [("a", event, epoch, updates), ("b", event, epoch, updates)]
    assert calls == expected


def test_exception_fires_on_exception_then_propagates():
    calls = []
    count = []
    models = []

    def failing(batch):
        count.append(1)
        if len(count) == 2:
            raise RuntimeError("boom")
        return F.mse_loss(models[0](batch[0]), batch[1])

    trainer, model = _trainer(calls, loss=failing)
    models.append(model)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(regression_loader(n=32), epochs=1)
    assert [c[1] for c in calls if c[0] == "a"] == [
        "fit_start", "epoch_start", "update_end D ['D/loss']", "update_end G ['G/loss']", "exception RuntimeError"
    ]


def test_stop_from_callback_ends_fit_after_the_current_update():
    calls = []
    trainer, _ = _trainer(calls)

    class StopAt3:
        def on_update_end(self, trainer, step, losses):
            if trainer.updates == 3:
                trainer.stop()

    trainer.events.add(StopAt3())
    trainer.fit(regression_loader(n=40), epochs=5)
    assert trainer.updates == 3 and trainer.epoch == 0
    assert calls[-1] == ("b", "fit_end", 0, 3)
