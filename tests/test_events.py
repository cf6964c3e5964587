"""The callback timeline, pinned: every call recorded and compared with a literal list."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, regression_loader

from trainflow import Step, Trainer
from trainflow.events import Events, Every


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


# ------------------------------------------------------------------------------ filters


class Filtered(Recorder):
    """A Recorder whose update_end and epoch_end are filtered when it is registered."""

    def __init__(self, tag, calls, filters):
        super().__init__(tag, calls)
        self.event_filters = filters


def test_filters_are_applied_at_registration_and_pinned_in_the_call_order():
    calls = []
    trainer, model = _trainer(calls)  # a and b: unfiltered
    trainer.events.add(Filtered("u3", calls, {"on_update_end": Every(3)}))
    trainer.events.add(Filtered("e2", calls, {"on_epoch_end": Every(2), "on_validation_end": Every(2)}))
    trainer.events.add(Filtered("never", calls, {"on_update_end": None, "on_epoch_end": None}))
    trainer.events.add(Recorder("given", calls), filters={"on_update_end": Every(4)})
    loader = regression_loader(n=16)  # 2 batches: D G D G per epoch
    trainer.fit(loader, epochs=2, val_data=loader, val_step=lambda b: F.mse_loss(model(b[0]), b[1]))
    D, G = "update_end D ['D/loss']", "update_end G ['G/loss']"
    val = "validation_end ['val/loss']"
    end = "epoch_end ['D/loss', 'G/loss', 'val/loss']"
    every = ("a", "b", "u3", "e2", "never", "given")
    expected = [(t, "fit_start", 0, 0) for t in every] + [(t, "epoch_start", 0, 0) for t in every]
    expected += [("a", D, 0, 1), ("b", D, 0, 1), ("e2", D, 0, 1)]
    expected += [("a", G, 0, 2), ("b", G, 0, 2), ("e2", G, 0, 2)]
    expected += [("a", D, 0, 3), ("b", D, 0, 3), ("u3", D, 0, 3), ("e2", D, 0, 3)]
    expected += [("a", G, 0, 4), ("b", G, 0, 4), ("e2", G, 0, 4), ("given", G, 0, 4)]
    expected += [(t, val, 1, 4) for t in ("a", "b", "u3", "never", "given")]  # e2: epoch 1 is odd
    expected += [(t, end, 1, 4) for t in ("a", "b", "u3", "given")]  # never: not at all
    expected += [(t, "epoch_start", 1, 4) for t in every]
    expected += [("a", D, 1, 5), ("b", D, 1, 5), ("e2", D, 1, 5)]
    expected += [("a", G, 1, 6), ("b", G, 1, 6), ("u3", G, 1, 6), ("e2", G, 1, 6)]
    expected += [("a", D, 1, 7), ("b", D, 1, 7), ("e2", D, 1, 7)]
    expected += [("a", G, 1, 8), ("b", G, 1, 8), ("e2", G, 1, 8), ("given", G, 1, 8)]
    expected += [(t, val, 2, 8) for t in every]
    expected += [(t, end, 2, 8) for t in ("a", "b", "u3", "e2", "given")]
    expected += [(t, "fit_end", 2, 8) for t in every]
    assert calls == expected


def test_builtin_callbacks_filter_instead_of_testing_counters():
    from trainflow.callbacks import Checkpoint, JSONLLogger, LossLogger, SampleGrid

    assert LossLogger(every=7).event_filters == {"on_update_end": Every(7)}
    assert JSONLLogger(every=5).event_filters == {"on_update_end": Every(5)}
    assert Checkpoint(every_updates=3, every_epochs=None).event_filters == {
        "on_update_end": Every(3), "on_epoch_end": None}
    grid = SampleGrid(torch.nn.Linear(2, 4), torch.zeros(1, 2), every_epochs=2)
    assert grid.event_filters == {"on_update_end": None, "on_epoch_end": Every(2)}
    events = Events([grid])
    assert events.handlers["on_update_end"] == [] and len(events.handlers["on_epoch_end"]) == 1


def test_sample_grid_every_epochs_saves_after_those_epochs(tmp_path):
    from trainflow.callbacks import SampleGrid

    g = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Sigmoid())
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    grid = SampleGrid(g, torch.randn(4, 4), every_epochs=2)
    steps = [Step(lambda z: g(z).mean(), opt, name="D", repeat=2), Step(lambda z: g(z).mean(), opt, name="G")]
    trainer = Trainer(g, steps, callbacks=[grid], out_dir=tmp_path, device="cpu")
    trainer.fit([torch.randn(3, 4)] * 5, epochs=5)  # 5 updates per epoch, whatever the flow
    assert [p.name for p in grid.saved] == ["samples_10.png", "samples_20.png", "samples.png"]


def test_every_and_filter_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"Every: `n` must be an int >= 1 .* Received: n=2.5 of type float"):
        Every(2.5)
    with pytest.raises(ValueError, match=r"Every: `n` must be an int >= 1 .* Received: n=0\. Pass e\.g\. Every\(100\)"):
        Every(0)
    calls = []
    with pytest.raises(ValueError, match=r"Callback Filtered: `event_filters` filters 'on_fit_start', which takes no "
                                         r"filter\. .* Filters apply to on_update_end, on_validation_end, on_epoch_end"):
        Events([Filtered("x", calls, {"on_fit_start": Every(2)})])
    with pytest.raises(ValueError, match=r"`filters` filters 'on_update_end', but the callback has no on_update_end "
                                         r"method\. .* Define on_update_end or drop its filter"):
        class OnlyEpochs:
            def on_epoch_end(self, trainer, logs):
                pass

        Events().add(OnlyEpochs(), filters={"on_update_end": Every(2)})
    with pytest.raises(TypeError, match=r"`event_filters\['on_update_end'\]` must be Every\(n\) or None \(never call "
                                        r"it\)\. Received: 100 of type int\. Pass e\.g\. Every\(100\)"):
        Events([Filtered("x", calls, {"on_update_end": 100})])
    with pytest.raises(TypeError, match=r"`event_filters` must map event names to Every\(n\) or None\. "
                                        r"Received: event_filters=\[2\]"):
        Events([Filtered("x", calls, [2])])
