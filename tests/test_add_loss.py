"""``add_loss``: model-tracked losses (Keras's ``self.add_loss``) against hand-written loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_changed, assert_same_weights, regression_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer, add_loss

EPOCHS = 3


class ActivityRegularizationLayer(nn.Module):
    """Seed 004's layer: ``self.add_loss(1e-2 * tf.reduce_sum(inputs))``.

    It also appends the value to ``sink`` (Keras's ``model.losses``), which the hand loops read.
    """

    def __init__(self, sink: list, rate: float = 1e-2, reduce: str = "sum"):
        super().__init__()
        self.sink, self.rate, self.reduce = sink, rate, reduce

    def forward(self, inputs):
        value = self.rate * (inputs.sum() if self.reduce == "sum" else inputs.pow(2).mean())
        add_loss(value)
        self.sink.append(value)
        return inputs


def regularized(sink: list, seed: int = 0, **layer) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), ActivityRegularizationLayer(sink, **layer), nn.Linear(8, 1))


class Record:
    def __init__(self):
        self.values: list[dict[str, torch.Tensor]] = []

    def on_update_end(self, trainer, step, losses):
        self.values.append(dict(losses))


def test_activity_regularization_matches_the_keras_loop():
    loader = regression_loader()
    losses: list[torch.Tensor] = []  # Keras's model.losses
    hand = regularized(losses)
    start = {k: v.clone() for k, v in hand.state_dict().items()}
    opt = torch.optim.SGD(hand.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(1)
    hand_aux = []
    for _ in range(EPOCHS):
        for x, y in loader:
            losses.clear()
            loss_value = F.mse_loss(hand(x), y)
            loss_value += sum(losses)  # "add any extra losses created during the forward pass"
            hand_aux.append(sum(losses).detach())
            opt.zero_grad()
            loss_value.backward()
            opt.step()

    sink: list = []
    model = regularized(sink)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    record = Record()
    torch.manual_seed(1)
    trainer = Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit"), callbacks=[record],
                      device="cpu")
    trainer.fit(loader, epochs=EPOCHS)

    assert_changed(start, model)
    assert_same_weights(hand, model)
    assert [sorted(v) for v in record.values] == [["fit/aux", "fit/loss"]] * len(hand_aux)
    assert torch.equal(torch.stack([v["fit/aux"] for v in record.values]), torch.stack(hand_aux))
    assert set(trainer.logs) == {"fit/loss", "fit/aux"}


def test_two_layers_sum_like_keras():
    loader = regression_loader(n=16)
    losses: list = []
    torch.manual_seed(0)
    hand = nn.Sequential(nn.Linear(4, 6), ActivityRegularizationLayer(losses), nn.Tanh(),
                         ActivityRegularizationLayer(losses, rate=0.1, reduce="mean"), nn.Linear(6, 1))
    opt = torch.optim.Adam(hand.parameters(), lr=0.01)
    for x, y in loader:
        losses.clear()
        loss = F.mse_loss(hand(x), y) + sum(losses)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sink: list = []
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), ActivityRegularizationLayer(sink), nn.Tanh(),
                          ActivityRegularizationLayer(sink, rate=0.1, reduce="mean"), nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt), device="cpu").fit(loader, epochs=1)
    assert_same_weights(hand, model)


def test_ignored_in_validation_and_nothing_accumulates():
    sink: list = []
    model = regularized(sink)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    record = Record()
    trainer = Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit"), callbacks=[record],
                      device="cpu")
    val = regression_loader(n=12, batch_size=5, shuffle=False)
    trainer.fit(regression_loader(n=8, batch_size=8), epochs=1, val_data=val,
                val_step=lambda b: F.mse_loss(model(b[0]), b[1]))

    # the validation loss is the plain MSE: no aux term, no "val/aux"
    with torch.no_grad():
        x, y = val.dataset.tensors
        expected = F.mse_loss(model(x), y).item()
    assert set(trainer.logs) == {"fit/loss", "fit/aux", "val/loss"}
    assert trainer.logs["val/loss"] == pytest.approx(expected, rel=1e-6)

    # forwards outside a step (validation above, inference here) leave nothing for the next step
    for _ in range(3):
        model(torch.randn(5, 4))
    sink.clear()
    trainer.fit(regression_loader(n=8, batch_size=8), epochs=2)
    assert len(sink) == 1 and torch.equal(record.values[-1]["fit/aux"], sink[0].detach())


def _float64(loader_batch: int, accumulate: int) -> tuple[nn.Module, list]:
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(23, 4, generator=g, dtype=torch.float64),
                         torch.randn(23, 1, generator=g, dtype=torch.float64))
    sink: list = []
    # a mean regulariser: like the main loss, a mean over the batch's samples
    model = regularized(sink, rate=0.1, reduce="mean").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    record = Record()
    step = Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", accumulate=accumulate)
    Trainer(model, step, callbacks=[record], device="cpu").fit(
        DataLoader(data, batch_size=loader_batch), epochs=2
    )
    return model, record.values


def test_accumulation_weights_it_like_the_main_loss():
    # batches of 5 accumulated 2 at a time (windows 10, 10, 3) == batches of 10 (10, 10, 3)
    small, small_logs = _float64(5, accumulate=2)
    big, big_logs = _float64(10, accumulate=1)
    for (name, a), b in zip(small.state_dict().items(), big.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0, msg=name)
    assert len(small_logs) == len(big_logs) == 6
    for a, b in zip(small_logs, big_logs):
        torch.testing.assert_close(a["fit/aux"], b["fit/aux"], rtol=1e-10, atol=0)
        torch.testing.assert_close(a["fit/loss"], b["fit/loss"], rtol=1e-10, atol=0)


def test_an_aux_loss_belongs_to_the_step_whose_forward_made_it():
    a_sink: list = []
    b_sink: list = []
    torch.manual_seed(0)
    A = nn.Sequential(nn.Linear(4, 4), ActivityRegularizationLayer(a_sink))
    B = nn.Sequential(nn.Linear(4, 1), ActivityRegularizationLayer(b_sink, rate=1.0, reduce="mean"))
    C = nn.Linear(4, 1)
    opt_a, opt_b, opt_c = (torch.optim.SGD(m.parameters(), lr=0.01) for m in (A, B, C))
    record = Record()
    steps = [
        Step(lambda b: A(b[0]).pow(2).mean(), opt_a, name="a"),                    # A's layer only
        Step(lambda b: F.mse_loss(B(A(b[0])), b[1]), opt_b, name="b", batch="same"),  # A's and B's layers
        Step(lambda b: F.mse_loss(C(b[0]), b[1]), opt_c, name="c", batch="same"),     # none
    ]
    sinks_per_update = []

    class Sinks:
        def on_update_end(self, trainer, step, losses):
            sinks_per_update.append((len(a_sink), len(b_sink)))
            a_sink.clear(), b_sink.clear()

    Trainer({"A": A, "B": B, "C": C}, steps, callbacks=[record, Sinks()], device="cpu").fit(
        regression_loader(n=16), max_updates=6
    )
    assert [sorted(v) for v in record.values[:3]] == [["a/aux", "a/loss"], ["b/aux", "b/loss"], ["c/loss"]]
    assert sinks_per_update[:3] == [(1, 0), (1, 1), (0, 0)]


def test_aux_value_of_each_step(tmp_path):
    sink: list = []
    model = regularized(sink)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the values are easy to recompute
    record = Record()
    loader = regression_loader(n=8, batch_size=4, shuffle=False)
    Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit"), callbacks=[record],
            device="cpu").fit(loader, epochs=1)
    for values, (x, _) in zip(record.values, loader):
        with torch.no_grad():
            expected = 1e-2 * F.relu(model[0](x)).sum()
        torch.testing.assert_close(values["fit/aux"], expected)


# ---------------------------------------------------------------- errors


def test_add_loss_rejects_a_non_tensor():
    message = r"add_loss: `value` must be a scalar tensor\. Received: value=0\.5 of type float"
    with pytest.raises(TypeError, match=message):
        add_loss(0.5)


def test_add_loss_rejects_a_non_scalar_inside_a_step():
    model = nn.Linear(4, 3)

    def loss(batch):
        out = model(batch[0])
        add_loss(out.abs())  # forgot to reduce
        return out.mean()

    trainer = Trainer(model, Step(loss, torch.optim.SGD(model.parameters(), lr=0.1)), device="cpu")
    with pytest.raises(ValueError, match=r"must be a scalar \(0-dim or one-element\) tensor\. Received: a tensor of shape \(8, 3\)"):
        trainer.fit(regression_loader(n=8), epochs=1)
    with pytest.raises(ValueError, match=r"Received: a tensor of shape \(2,\)"):
        add_loss(torch.ones(2))  # outside a step too


def test_a_loss_term_named_aux_clashes_with_add_loss():
    sink: list = []
    model = regularized(sink)

    def loss(batch):
        p = model(batch[0])
        return {"mse": F.mse_loss(p, batch[1]), "aux": p.abs().mean()}

    trainer = Trainer(model, Step(loss, torch.optim.SGD(model.parameters(), lr=0.1), name="fit"), device="cpu")
    with pytest.raises(ValueError, match=r"Step 'fit': the loss function returns a term named 'aux'.*Rename that term"):
        trainer.fit(regression_loader(n=8), epochs=1)
    assert trainer.updates == 0


def test_a_term_named_aux_is_fine_without_add_loss():
    model = nn.Linear(4, 1)
    loss = lambda b: {"mse": F.mse_loss(model(b[0]), b[1]), "aux": model.weight.pow(2).sum()}  # noqa: E731
    trainer = Trainer(model, Step(loss, torch.optim.SGD(model.parameters(), lr=0.1), name="fit"), device="cpu")
    trainer.fit(regression_loader(n=8), epochs=1)
    assert set(trainer.logs) == {"fit/mse", "fit/aux"}
