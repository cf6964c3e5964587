"""The Trainer against hand-written PyTorch loops: bit-identical weights on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_changed, assert_same_weights, mlp, regression_loader
from torch import nn

from trainflow import Step, Trainer

EPOCHS = 3


def _fresh(seed: int = 0, dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(dropout=dropout)


# ---------------------------------------------------------------- one loss, two losses


def test_one_loss_matches_hand_loop():
    loader = regression_loader()
    hand = _fresh()
    start = copy.deepcopy(hand.state_dict())
    opt = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    hand.train()
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            loss = F.mse_loss(hand(x), y)
            loss.backward()
            opt.step()
    hand_rng = torch.get_rng_state()

    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt)], device="cpu")
    trainer.fit(loader, epochs=EPOCHS)

    assert_changed(start, model)
    assert_same_weights(hand, model)
    assert torch.equal(hand_rng, torch.get_rng_state()), "the trainer drew extra random numbers"
    assert trainer.epoch == EPOCHS and trainer.updates == EPOCHS * len(loader)


def test_two_summed_losses_match_hand_loop():
    loader = regression_loader()
    hand = _fresh()
    opt = torch.optim.SGD(hand.parameters(), lr=0.03)
    torch.manual_seed(1)
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            p = hand(x)
            loss = F.mse_loss(p, y) + F.l1_loss(p, y)
            loss.backward()
            opt.step()

    model = _fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    seen = []

    def losses(batch):
        p = model(batch[0])
        return {"mse": F.mse_loss(p, batch[1]), "l1": F.l1_loss(p, batch[1])}

    class Keys:
        def on_update_end(self, trainer, step, values):
            seen.append(sorted(values))

    torch.manual_seed(1)
    Trainer(model, [Step(losses, opt, name="fit")], callbacks=[Keys()], device="cpu").fit(loader, epochs=EPOCHS)
    assert_same_weights(hand, model)
    assert seen[0] == ["fit/l1", "fit/mse"]


def test_alternating_steps_share_one_optimizer():
    """NeMo's training_loop [(opt, [mse]), (opt, [l1])]: an MSE update, then an L1 update."""
    loader = regression_loader(n=44)  # 6 batches: the cycle position crosses epoch ends
    hand = _fresh()
    opt = torch.optim.Adam(hand.parameters(), lr=0.01)
    torch.manual_seed(1)
    position = 0
    for _ in range(EPOCHS):
        for x, y in loader:
            loss_fn = F.mse_loss if position % 2 == 0 else F.l1_loss
            opt.zero_grad()
            loss_fn(hand(x), y).backward()
            opt.step()
            position += 1

    model = _fresh()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    steps = [
        Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="mse"),
        Step(lambda b: F.l1_loss(model(b[0]), b[1]), opt, name="l1"),
    ]
    torch.manual_seed(1)
    Trainer(model, steps, device="cpu").fit(loader, epochs=EPOCHS)
    assert_same_weights(hand, model)


# ---------------------------------------------------------------- GAN schedules


def _gan(seed: int = 0):
    torch.manual_seed(seed)
    gen = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    disc = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Dropout(0.1), nn.Linear(8, 1))
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(gen.parameters(), lr=2e-3, betas=(0.5, 0.999))
    return gen, disc, d_opt, g_opt


def _d_loss(gen, disc, real):
    fake = gen(torch.randn(real.shape[0], 3))
    logits = torch.cat([disc(real), disc(fake)])
    labels = torch.cat([torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)])
    labels = labels + 0.05 * torch.rand(labels.shape)  # Keras's label-noise trick
    return F.binary_cross_entropy_with_logits(logits, labels)


def _g_loss(gen, disc, real):
    fake = gen(torch.randn(real.shape[0], 3))
    return F.binary_cross_entropy_with_logits(disc(fake), torch.ones(real.shape[0], 1))


@pytest.mark.parametrize("g_batch", ["next", "same"])
def test_gan_d3_g1_matches_hand_loop(g_batch):
    loader = regression_loader(n=56, batch_size=8)  # 7 batches per epoch: cycles straddle epochs
    gen, disc, d_opt, g_opt = _gan()
    torch.manual_seed(1)
    position = 0  # persists across epochs, like the flow's cycle position
    for _ in range(EPOCHS):
        for real, _ in loader:
            if g_batch == "next":
                if position % 4 < 3:
                    d_opt.zero_grad()
                    _d_loss(gen, disc, real).backward()
                    d_opt.step()
                else:
                    g_opt.zero_grad()
                    _g_loss(gen, disc, real).backward()
                    g_opt.step()
                position += 1
            else:  # G reuses the batch of the third D update
                d_opt.zero_grad()
                _d_loss(gen, disc, real).backward()
                d_opt.step()
                position += 1
                if position % 3 == 0:
                    g_opt.zero_grad()
                    _g_loss(gen, disc, real).backward()
                    g_opt.step()
    hand = (copy.deepcopy(gen), copy.deepcopy(disc))

    gen, disc, d_opt, g_opt = _gan()
    steps = [
        Step(lambda b: _d_loss(gen, disc, b[0]), d_opt, name="D", repeat=3),
        Step(lambda b: _g_loss(gen, disc, b[0]), g_opt, name="G", batch=g_batch),
    ]
    torch.manual_seed(1)
    trainer = Trainer({"G": gen, "D": disc}, steps, device="cpu")
    trainer.fit(loader, epochs=EPOCHS)
    assert_same_weights(hand[0], gen)
    assert_same_weights(hand[1], disc)


def test_keras_style_gan_step_reuses_batch():
    """Keras's train_step: one D update then one G update on the same real batch."""
    loader = regression_loader(n=40)
    gen, disc, d_opt, g_opt = _gan()
    torch.manual_seed(1)
    for _ in range(EPOCHS):
        for real, _ in loader:
            d_opt.zero_grad()
            _d_loss(gen, disc, real).backward()
            d_opt.step()
            g_opt.zero_grad()
            _g_loss(gen, disc, real).backward()
            g_opt.step()
    hand = copy.deepcopy(gen.state_dict())

    gen2, disc2, d_opt, g_opt = _gan()
    steps = [
        Step(lambda b: _d_loss(gen2, disc2, b[0]), d_opt, name="D"),
        Step(lambda b: _g_loss(gen2, disc2, b[0]), g_opt, name="G", batch="same"),
    ]
    torch.manual_seed(1)
    trainer = Trainer({"G": gen2, "D": disc2}, steps, device="cpu")
    trainer.fit(loader, epochs=EPOCHS)
    for k, v in hand.items():
        assert torch.equal(v, gen2.state_dict()[k])
    assert trainer.updates == 2 * EPOCHS * len(loader)


def _hand_two_optimizers(model, first, rest, loader, epochs):
    """The hand-written loop for one MSE step with two optimizers stepped together."""
    torch.manual_seed(1)
    for _ in range(epochs):
        for x, y in loader:
            first.zero_grad()
            rest.zero_grad()
            F.mse_loss(model(x), y).backward()
            first.step()
            rest.step()
    return model


def test_two_optimizers_stepped_together():
    """MegEngine's MultipleOptimizer: SGD for the first layer, Adam for the rest, one backward."""
    loader = regression_loader()

    def build():
        model = _fresh()
        first = torch.optim.SGD(model[0].parameters(), lr=0.05)
        rest = torch.optim.Adam([p for m in list(model)[1:] for p in m.parameters()], lr=0.01)
        return model, first, rest

    hand = _hand_two_optimizers(*build(), loader, EPOCHS)

    model, first, rest = build()
    torch.manual_seed(1)
    Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), [first, rest])], device="cpu").fit(
        loader, epochs=EPOCHS
    )
    assert_same_weights(hand, model)


def test_optimizer_with_its_own_zero_grad_is_called_and_others_are_cleared():
    """The trainer clears gradients itself only for optimizers that keep Optimizer.zero_grad."""
    loader = regression_loader()

    class CountingSGD(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            CountingSGD.calls += 1
            super().zero_grad(set_to_none)

    def build():
        model = _fresh()
        return model, CountingSGD(model[0].parameters(), lr=0.05), torch.optim.SGD(
            [p for m in list(model)[1:] for p in m.parameters()], lr=0.05, momentum=0.9
        )

    hand = _hand_two_optimizers(*build(), loader, epochs=1)
    hand_calls, CountingSGD.calls = CountingSGD.calls, 0

    model, first, rest = build()
    grads_at_loss = []

    def loss(batch):
        grads_at_loss.append([p.grad for p in model.parameters()])
        return F.mse_loss(model(batch[0]), batch[1])

    torch.manual_seed(1)
    Trainer(model, [Step(loss, [first, rest])], device="cpu").fit(loader, epochs=1)
    assert_same_weights(hand, model)
    assert CountingSGD.calls == hand_calls == len(loader)
    assert all(g is None for grads in grads_at_loss for g in grads)  # cleared before every forward


# ---------------------------------------------------------------- isolation


def test_generator_update_leaves_discriminator_and_its_grads_untouched():
    loader = regression_loader(n=64)
    gen, disc, d_opt, g_opt = _gan()
    steps = [
        Step(lambda b: _d_loss(gen, disc, b[0]), d_opt, name="D", repeat=3),
        Step(lambda b: _g_loss(gen, disc, b[0]), g_opt, name="G"),
    ]
    snapshots = []

    class Snapshot:
        def on_update_end(self, trainer, step, losses):
            snapshots.append(
                (
                    step.name,
                    [p.detach().clone() for p in disc.parameters()],
                    [None if p.grad is None else p.grad.clone() for p in disc.parameters()],
                    [None if p.grad is None else p.grad.clone() for p in gen.parameters()],
                )
            )

    Trainer({"G": gen, "D": disc}, steps, callbacks=[Snapshot()], device="cpu").fit(loader, epochs=1)
    g_updates = 0
    for before, after in zip(snapshots, snapshots[1:]):
        if after[0] != "G":
            continue
        g_updates += 1
        for p0, p1 in zip(before[1], after[1]):
            assert torch.equal(p0, p1)  # discriminator weights unchanged
        for g0, g1 in zip(before[2], after[2]):
            assert g0 is not None and torch.equal(g0, g1)  # its gradients too
    assert g_updates == 2  # 8 batches: D D D G D D D G
    # the generator never got a gradient during D updates: its .grad was None until its first update
    assert all(g is None for g in snapshots[0][3])


# ---------------------------------------------------------------- modes, validation, counters


def test_train_mode_in_updates_eval_mode_in_validation_and_modes_restored():
    loader = regression_loader(n=16)
    model = _fresh(dropout=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = {"train": set(), "val": set()}

    def loss(batch):
        seen["train"].add(model[2].training)
        return F.mse_loss(model(batch[0]), batch[1])

    def val_step(batch):
        seen["val"].add(model[2].training)
        out1, out2 = model(batch[0]), model(batch[0])
        assert torch.equal(out1, out2)  # dropout inactive: deterministic
        return F.mse_loss(out1, batch[1])

    model.eval()
    model[0].train()  # a deliberately mixed state must come back as it was
    trainer = Trainer(model, [Step(loss, opt)], device="cpu")
    trainer.fit(loader, epochs=2, val_data=loader, val_step=val_step)
    assert seen == {"train": {True}, "val": {False}}
    assert [m.training for m in model.modules()] == [False, True, False, False, False]


def test_validation_loss_is_exact_sample_weighted_mean_and_metrics_logged():
    import torchmetrics

    loader = regression_loader(n=20, batch_size=8, shuffle=False)  # batches of 8, 8, 4
    model = _fresh(dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mae = torchmetrics.MeanAbsoluteError()
    logs = {}

    class Capture:
        def on_epoch_end(self, trainer, epoch_logs):
            logs.update(epoch_logs)

    def val_step(batch):
        pred = model(batch[0])
        mae.update(pred, batch[1])
        return F.mse_loss(pred, batch[1])

    trainer = Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit")],
                      metrics={"val/mae": mae}, callbacks=[Capture()], device="cpu")
    trainer.fit(loader, epochs=1, val_data=loader, val_step=val_step)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        expected = F.mse_loss(model(x), y).item()
        expected_mae = (model(x) - y).abs().mean().item()
    assert logs["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert logs["val/mae"] == pytest.approx(expected_mae, rel=1e-6)
    assert set(logs) == {"fit/loss", "val/loss", "val/mae"}
    assert mae.update_count == 0  # reset after validation


def test_fit_in_two_calls_equals_one_call():
    """max_updates is a total: a second fit continues mid-epoch exactly where the first stopped."""
    loader = regression_loader()
    model_a = _fresh()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.05)
    torch.manual_seed(1)
    Trainer(model_a, [Step(lambda b: F.mse_loss(model_a(b[0]), b[1]), opt_a)], device="cpu").fit(loader, max_updates=13)

    model_b = _fresh()
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.05)
    torch.manual_seed(1)
    trainer = Trainer(model_b, [Step(lambda b: F.mse_loss(model_b(b[0]), b[1]), opt_b)], device="cpu")
    trainer.fit(loader, max_updates=7)
    assert (trainer.epoch, trainer.updates) == (1, 7)
    trainer.fit(loader, max_updates=13)
    assert (trainer.epoch, trainer.updates) == (2, 13)
    assert_same_weights(model_a, model_b)


def test_named_streams_cycle_independently():
    """DARTS-like: weights on 'train', a second step on 'valid', which cycles on its own."""
    train = regression_loader(n=48, batch_size=8)  # 6 batches
    valid = regression_loader(n=16, batch_size=8, seed=7)  # 2 batches: restarts every 2 draws

    def build():
        model = _fresh()
        w_opt = torch.optim.SGD(model[0].parameters(), lr=0.05)
        a_opt = torch.optim.SGD(model[-1].parameters(), lr=0.05)
        return model, w_opt, a_opt

    hand, w_opt, a_opt = build()
    torch.manual_seed(1)
    valid_iter = None
    for _ in range(2):
        for x, y in train:
            w_opt.zero_grad()
            F.mse_loss(hand(x), y).backward()
            w_opt.step()
            try:
                vx, vy = next(valid_iter) if valid_iter else next(valid_iter := iter(valid))
            except StopIteration:
                valid_iter = iter(valid)
                vx, vy = next(valid_iter)
            a_opt.zero_grad()
            F.mse_loss(hand(vx), vy).backward()
            a_opt.step()

    model, w_opt, a_opt = build()
    steps = [
        Step(lambda b: F.mse_loss(model(b[0]), b[1]), w_opt, name="w"),
        Step(lambda b: F.mse_loss(model(b[0]), b[1]), a_opt, name="a", data="valid"),
    ]
    torch.manual_seed(1)
    trainer = Trainer(model, steps, device="cpu")
    trainer.fit({"train": train, "valid": valid}, epochs=2)
    assert_same_weights(hand, model)
    assert trainer.updates == 2 * 2 * len(train)


def test_state_dict_round_trip_restores_weights_optimizer_and_position():
    loader = regression_loader()
    gen, disc, d_opt, g_opt = _gan()
    steps = [
        Step(lambda b: _d_loss(gen, disc, b[0]), d_opt, name="D", repeat=3),
        Step(lambda b: _g_loss(gen, disc, b[0]), g_opt, name="G"),
    ]
    trainer = Trainer({"G": gen, "D": disc}, steps, device="cpu")
    trainer.fit(loader, max_updates=6)
    state = copy.deepcopy(trainer.state_dict())
    assert state["flow"]["position"] == 2 and state["loop"]["updates"] == 6

    gen2, disc2, d_opt2, g_opt2 = _gan(seed=5)
    steps2 = [
        Step(lambda b: _d_loss(gen2, disc2, b[0]), d_opt2, name="D", repeat=3),
        Step(lambda b: _g_loss(gen2, disc2, b[0]), g_opt2, name="G"),
    ]
    other = Trainer({"G": gen2, "D": disc2}, steps2, device="cpu")
    other.load_state_dict(state)
    assert_same_weights(gen, gen2)
    assert_same_weights(disc, disc2)
    assert other.flow.current.name == "D" and other.flow.position == 2
    assert other.updates == 6
    assert d_opt2.state_dict()["state"][0]["step"] == d_opt.state_dict()["state"][0]["step"]


def test_accumulate_two_batches_of_8_equals_one_batch_of_16():
    """Seed 001's update cycle; the full property test lives in test_accumulation.py."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = torch.randn(48, 1, generator=g, dtype=torch.float64)
    from torch.utils.data import DataLoader, TensorDataset

    def build():
        torch.manual_seed(0)
        model = mlp().double()
        return model, torch.optim.AdamW(model.parameters())

    big, opt = build()
    for xb, yb in DataLoader(TensorDataset(x, y), batch_size=16):
        opt.zero_grad()
        F.mse_loss(big(xb), yb).backward()
        opt.step()

    model, opt = build()
    Trainer(model, [Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, accumulate=2)], device="cpu").fit(
        DataLoader(TensorDataset(x, y), batch_size=8), epochs=1
    )
    for a, b in zip(big.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def hyperparameter_cells(plan: str) -> list[str]:
    """The hyperparameters column of each row of a plan, with the cells rich folds joined."""
    rows: list[str] = []
    for line in plan.splitlines():
        cells = line.split("│")
        if len(cells) == 8:
            optimizer, text = cells[3].strip(), cells[6].strip()
            if optimizer:
                rows.append(text)
            elif text:  # a folded continuation of the row above
                rows[-1] += " " + text
    return rows


def test_describe_shows_only_the_hyperparameters_that_differ_from_the_optimizer_defaults():
    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    sgd = torch.optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "lr": 0.01, "momentum": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    adam = torch.optim.Adam(c.parameters(), betas=(0.5, 0.999))
    adamw = torch.optim.AdamW(c.parameters(), lr=1e-3, weight_decay=0.01)  # both AdamW's defaults
    trainer = Trainer({"a": a, "b": b, "c": c}, [Step(lambda x: x, [sgd, adam], name="s"),
                                                 Step(lambda x: x, adamw, name="t")], device="cpu")
    assert hyperparameter_cells(trainer.describe()) == [
        "lr=0.1, momentum=0.9, nesterov=True", "lr=0.01, nesterov=True",  # momentum=0.0 is SGD's default
        "betas=(0.5, 0.999)", "(defaults)",
    ]
    every = hyperparameter_cells(trainer.describe(all_hyperparameters=True))
    assert every[1] == "lr=0.01, momentum=0, dampening=0, weight_decay=0, nesterov=True, maximize=False"
    assert every[2].startswith("lr=0.001, betas=(0.5, 0.999), eps=1e-08, weight_decay=0, amsgrad=False")
    assert every[3].startswith("lr=0.001, betas=(0.9, 0.999), eps=1e-08, weight_decay=0.01, amsgrad=False")
    with pytest.raises(TypeError, match=r"`all_hyperparameters` must be True .*Received: all_hyperparameters='yes' "
                                        r"of type str\. Pass e\.g\. all_hyperparameters=True\."):
        trainer.describe(all_hyperparameters="yes")


def test_describe_lists_steps_groups_frozen_and_idle_parameters():
    model = mlp(hidden=5)
    model[0].bias.requires_grad_(False)
    extra = nn.Linear(2, 2)  # trainable, in the models, but no step updates it
    opt = torch.optim.SGD([{"params": model[0].parameters(), "name": "first", "lr": 0.5},
                           {"params": model[2].parameters(), "name": "head"}], lr=0.1, momentum=0.9)
    trainer = Trainer({"net": model, "extra": extra}, [Step(lambda b: b, opt, name="fit", repeat=2)], device="cpu")
    text = trainer.describe()
    assert "fit" in text and "x2" in text and "SGD" in text
    assert "first" in text and "head" in text and "lr=0.5" in text and "momentum=0.9" in text
    assert "20 (1 frozen tensors)" in text  # 4*5 weights trainable, the bias frozen
    assert "frozen: net.0.bias" in text
    assert "WARNING: trainable parameters that no step updates: extra.weight, extra.bias" in text


# ---------------------------------------------------------------- defaults a person sees

_PROGRESS_SCRIPT = """
import sys, torch
from trainflow import Step, Trainer
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
data = [torch.ones(4, 2)] * 3
Trainer(model, Step(lambda x: model(x).pow(2).mean(), opt, name="l2"), progress=sys.argv[1] == "on").fit(data, epochs=2)
print("DONE")
"""


def _run_progress_script(progress: str, terminal: bool) -> str:
    import os
    import pty
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "COLUMNS": "100"}
    for key in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "TERM"):
        env.pop(key, None)
    env["TERM"] = "xterm"
    if not terminal:
        done = subprocess.run([sys.executable, "-c", _PROGRESS_SCRIPT, progress], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _PROGRESS_SCRIPT, progress], env=env, stdout=follower,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    return b"".join(chunks).decode(errors="replace")


def test_a_terminal_gets_a_progress_bar_and_epoch_lines_by_default():
    shown = _run_progress_script("on", terminal=True)
    assert "epoch 1/2" in shown and "epoch 2/2" in shown and "DONE" in shown


def test_no_progress_output_in_a_pipe_or_with_progress_false():
    assert _run_progress_script("on", terminal=False) == "DONE\n"
    assert "epoch" not in _run_progress_script("off", terminal=True)


def test_a_given_progress_bar_is_not_doubled():
    from trainflow.callbacks import ProgressBar

    bar = ProgressBar()
    model = nn.Linear(2, 1)
    trainer = Trainer(model, Step(lambda x: model(x).sum(), torch.optim.SGD(model.parameters(), lr=0.1)),
                      callbacks=[bar])
    assert [type(cb) for cb in trainer.events.callbacks] == [ProgressBar]


def test_error_progress_not_a_bool():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"`progress` must be True or False. Received: progress='auto'"):
        Trainer(model, Step(lambda x: model(x).sum(), torch.optim.SGD(model.parameters(), lr=0.1)),
                progress="auto")


@pytest.mark.parametrize(
    ("limits", "match"),
    [
        ({"epochs": 2}, r"already reached epochs=2 \(trainer.epoch == 2\).*e.g. fit\(data, epochs=4\)"),
        ({"max_updates": 3}, r"already reached max_updates=3 \(trainer.updates == \d+\).*fit\(data, max_updates="),
    ],
)
def test_fit_with_nothing_to_do_says_so_and_how_to_train_further(limits, match):
    model = nn.Linear(2, 1)
    trainer = Trainer(model, Step(lambda x: model(x).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1)))
    data = [torch.ones(4, 2)] * 3
    trainer.fit(data, epochs=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"fit: nothing to do: this trainer has " + match):
        trainer.fit(data, **limits)
    assert_same_weights_dict(before, model.state_dict())
    assert trainer.epoch == 2


def assert_same_weights_dict(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_flow_names_a_nameless_step_by_its_place_without_renaming_the_users_step():
    """A Step without a name is ``step<i>`` in each flow it is in; the user's object keeps ``name=None``."""
    model = nn.Linear(3, 1)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    shared = Step(lambda b: model(b[0]).pow(2).mean(), opt_a)
    first = Trainer(model, [shared], device="cpu")
    other = Step(lambda b: model(b[0]).abs().mean(), torch.optim.SGD(model.parameters(), lr=0.1), name="other")
    second = Trainer(model, [other, shared], device="cpu")
    assert shared.name is None
    assert [s.name for s in first.flow.steps] == ["step0"] and [s.name for s in second.flow.steps] == ["other", "step1"]
    data = [(torch.randn(4, 3),)] * 2
    second.fit(data, epochs=1)
    assert sorted(second.logs) == ["other/loss", "step1/loss"]
    first.fit(data, epochs=1)
    assert sorted(first.logs) == ["step0/loss"]
