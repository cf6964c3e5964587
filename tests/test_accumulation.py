"""Invariant 2, exact accumulation: an update over a window of batches or chunks (``accumulate``,
``microbatch_size``) equals the one big-batch update, against hand-written float64 loops.

The references are plain PyTorch: one ``optimizer.step()`` per window, on the concatenation of
the window's batches, with the big-batch loss (a mean over all the window's samples, or an
``Average``'s total over the window's total count). Weights are compared with rtol 1e-10.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Average, Step, Trainer, freeze

RTOL = 1e-10
F64 = torch.float64


def assert_close_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=RTOL, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def windows(batches: list, n: int) -> list[list]:
    """The update windows of one epoch: ``n`` consecutive batches, the last one maybe fewer."""
    return [batches[i : i + n] for i in range(0, len(batches), n)]


def concat(window: list) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(parts) for parts in zip(*window))


def tensor_batches(*tensors: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Consecutive batches (a list is a re-iterable "train" stream, like an unshuffled DataLoader)."""
    return list(zip(*(t.split(batch_size) for t in tensors)))


# ---------------------------------------------------------------- seed 001: the update cycle


class FFNN(nn.Module):
    """Seed 001's FFNN (dropout=None): Linear/ReLU hidden layers, then a Linear output."""

    def __init__(self, input_size: int, num_hidden_layers: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        current = input_size
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(current, hidden_size), nn.ReLU()]
            current = hidden_size
        layers.append(nn.Linear(current, output_size))
        self.ffnn = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffnn(x)


def seed_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(42)
    model = FFNN(3, 2, 5, 1).double()
    for tensor in model.parameters():
        nn.init.uniform_(tensor)
    return model, torch.optim.AdamW(model.parameters())


def seed_data(data_size: int = 64) -> TensorDataset:
    """The seed's examples [0, log x, 5x] -> x for x in 1 .. data_size - 1 (63 by default)."""
    labels = torch.arange(1, data_size, dtype=F64).unsqueeze(1)
    examples = torch.cat([torch.zeros_like(labels), torch.log(labels), labels * 5], dim=1)
    return TensorDataset(examples, labels)


def seed_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return torch.mean((label - output) ** 2)  # the seed's loss_fn, as a scalar


def seed_naive_loop(data: TensorDataset, batch_size: int, update_cycle: int, epochs: int) -> nn.Module:
    """The seed's loop verbatim: ``loss / update_cycle``, a step every ``update_cycle`` batches."""
    model, optimizer = seed_model()
    model.train()
    counter = 0
    optimizer.zero_grad()
    for _ in range(epochs):
        for input, label in DataLoader(data, batch_size=batch_size):
            loss = seed_loss(model(input), label) / update_cycle
            loss.backward()
            counter += 1
            if counter % update_cycle == 0:
                optimizer.step()
                optimizer.zero_grad()
    return model


def test_seed_001_accumulate_2_batch_8_equals_batch_16_with_uneven_last_window():
    data = seed_data()  # 63 samples: batches of 8 end with one of 7, the last window has 15
    epochs = 10
    big = seed_naive_loop(data, batch_size=16, update_cycle=1, epochs=epochs)
    start, _ = seed_model()

    model, optimizer = seed_model()
    trainer = Trainer(model, Step(lambda b: seed_loss(model(b[0]), b[1]), optimizer, accumulate=2), device="cpu")
    trainer.fit(DataLoader(data, batch_size=8), epochs=epochs)

    assert trainer.updates == epochs * 4
    assert max_abs_diff(start, big) > 0.01  # 40 AdamW updates of lr 1e-3 moved the weights
    assert_close_weights(big, model)
    # the seed's naive division by update_cycle weighs the 7 samples of the last batch like 8:
    naive = seed_naive_loop(data, batch_size=8, update_cycle=2, epochs=epochs)
    with pytest.raises(AssertionError):
        assert_close_weights(big, naive)
    assert max_abs_diff(big, naive) > 1e3 * max(max_abs_diff(big, model), 1e-15)


def test_seed_001_naive_loop_is_exact_only_when_every_window_is_even():
    data = seed_data(65)  # 64 samples: every window is two batches of 8
    big = seed_naive_loop(data, batch_size=16, update_cycle=1, epochs=3)
    naive = seed_naive_loop(data, batch_size=8, update_cycle=2, epochs=3)
    assert_close_weights(big, naive)


# ---------------------------------------------------------------- the property test


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def _chunk_loss(kind: str, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
    """What a user returns for one batch (or chunk)."""
    if kind == "mean":
        return F.mse_loss(out, y)
    if kind == "average":  # sum of squared errors over the samples
        return Average(((out - y) ** 2).sum(), len(y))
    first = F.mse_loss(out[:, 0], y[:, 0])
    rest = (out[:, 1:] - y[:, 1:]) ** 2
    if kind == "dict_pairs":  # a mean, and an Average over 2 values per sample
        return {"first": first, "pairs": Average(rest.sum(), 2 * len(y))}
    return {"first": first, "tokens": Average((rest * mask).sum(), mask.sum())}  # token-like count


def _big_batch_loss(kind: str, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same loss written for one big batch: means over all samples, totals over total counts."""
    if kind == "mean":
        return F.mse_loss(out, y)
    if kind == "average":
        return ((out - y) ** 2).sum() / len(y)
    first = F.mse_loss(out[:, 0], y[:, 0])
    rest = (out[:, 1:] - y[:, 1:]) ** 2
    if kind == "dict_pairs":
        return first + rest.sum() / (2 * len(y))
    return first + (rest * mask).sum() / mask.sum()


def _regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=F64)
    y = torch.randn(n, 3, generator=g, dtype=F64)
    mask = (torch.rand(n, 2, generator=g) < 0.6).to(F64)
    mask[:, 0] = 1  # every sample has at least one token
    return x, y, mask


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(5, 60),
    batch_size=st.integers(1, 12),
    mode=st.sampled_from(["accumulate", "microbatch", "both"]),
    accumulate=st.integers(1, 4),
    microbatch_size=st.integers(1, 7),
    optimizer=st.sampled_from(["sgd", "adam", "adamw"]),
    loss=st.sampled_from(["mean", "average", "dict_pairs", "dict_tokens"]),
    epochs=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_accumulated_update_equals_big_batch_update(
    n, batch_size, mode, accumulate, microbatch_size, optimizer, loss, epochs, seed
):
    accumulate = 1 if mode == "microbatch" else accumulate
    microbatch_size = None if mode == "accumulate" else microbatch_size
    batches = tensor_batches(*_regression_data(n, seed), batch_size=batch_size)

    ref = _net()
    opt = _optimizer(optimizer, ref)
    updates = 0
    for _ in range(epochs):
        for window in windows(batches, accumulate):
            x, y, mask = concat(window)
            opt.zero_grad()
            _big_batch_loss(loss, ref(x), y, mask).backward()
            opt.step()
            updates += 1

    model = _net()
    step = Step(lambda b: _chunk_loss(loss, model(b[0]), b[1], b[2]), _optimizer(optimizer, model),
                accumulate=accumulate, microbatch_size=microbatch_size)
    trainer = Trainer(model, step, device="cpu")
    trainer.fit(batches, epochs=epochs)

    assert trainer.updates == updates
    assert_close_weights(ref, model)


def test_chunk_with_no_tokens_adds_nothing_and_the_update_stays_exact():
    """A chunk that is all padding (count 0) is fine inside a window: only the window's total count divides."""
    x, y, _ = _regression_data(12, seed=4)
    mask = torch.ones(12, 2, dtype=F64)
    mask[4:8] = 0  # the second chunk of 4 has no token

    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _big_batch_loss("dict_tokens", ref(x), y, mask).backward()
    opt.step()

    model = _net()
    step = Step(lambda b: _chunk_loss("dict_tokens", model(b[0]), b[1], b[2]),
                torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)
    Trainer(model, step, device="cpu").fit([(x, y, mask)], epochs=1)
    assert_close_weights(ref, model)


# ---------------------------------------------------------------- the last, incomplete window


def _partial_window_case(partial_window: str, epochs: int = 3):
    x, y, _ = _regression_data(44, seed=7)
    batches = tensor_batches(x, y, batch_size=8)  # 8, 8, 8, 8, 8, 4: windows of 4 + 2 batches
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    step = Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, accumulate=4, partial_window=partial_window)
    trainer = Trainer(model, step, device="cpu")
    trainer.fit(batches, epochs=epochs)
    return batches, model, trainer


def _reference(window_lists: list[list], epochs: int) -> nn.Module:
    ref = _net()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    for _ in range(epochs):
        for window in window_lists:
            x, y = concat(window)
            opt.zero_grad()
            F.mse_loss(ref(x), y).backward()
            opt.step()
    return ref


def test_partial_window_is_applied_as_one_exactly_weighted_update_by_default():
    batches, model, trainer = _partial_window_case("apply")
    assert trainer.updates == 3 * 2
    assert len(windows(batches, 4)[-1]) == 2  # 12 samples, weighted by 1/12, not 1/4 per batch
    assert_close_weights(_reference(windows(batches, 4), epochs=3), model)


def test_partial_window_drop_discards_the_incomplete_window():
    batches, model, trainer = _partial_window_case("drop")
    assert trainer.updates == 3 * 1 and trainer.epoch == 3
    assert_close_weights(_reference([batches[:4]], epochs=3), model)  # the last 12 samples never used
    with pytest.raises(AssertionError):  # not vacuous: applying it gives other weights
        assert_close_weights(_reference(windows(batches, 4), epochs=3), model)


def test_partial_window_drop_keeps_complete_windows():
    x, y, _ = _regression_data(64, seed=7)
    batches = tensor_batches(x, y, batch_size=8)  # 8 batches: two complete windows of 4
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, accumulate=4,
                                  partial_window="drop"), device="cpu")
    trainer.fit(batches, epochs=2)
    assert trainer.updates == 4
    assert_close_weights(_reference(windows(batches, 4), epochs=2), model)


# ---------------------------------------------------------------- a flow of two steps


def _d_and_g():
    torch.manual_seed(3)
    d = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    return d, g, torch.optim.Adam(d.parameters(), lr=0.01), torch.optim.SGD(g.parameters(), lr=0.05, momentum=0.9)


def test_flow_of_accumulating_and_microbatching_steps_matches_hand_loop():
    x, y, _ = _regression_data(34, seed=11)
    y = y[:, :1]
    batches = tensor_batches(x, y, batch_size=6)  # 6, 6, 6, 6, 6, 4: cycles straddle epochs
    epochs = 4

    # Hand-written: D takes 2 batches per update, 2 updates; then G takes one batch split in
    # chunks of 4, each chunk weighted by its share of the batch. The cycle D, D, G goes on
    # across epochs; a window cut by the epoch end is one update on the batches it has.
    d, g, d_opt, g_opt = _d_and_g()
    order = []
    cycle, position = ["D", "D", "G"], 0
    for _ in range(epochs):
        batch_iter = iter(batches)
        while True:
            if cycle[position] == "D":
                window = list(itertools.islice(batch_iter, 2))
                if not window:
                    break
                n = sum(len(xb) for xb, _ in window)
                d_opt.zero_grad()
                for xb, yb in window:
                    (F.mse_loss(d(xb), yb) * (len(xb) / n)).backward()
                d_opt.step()
            else:
                batch = next(batch_iter, None)
                if batch is None:
                    break
                xb, yb = batch
                g_opt.zero_grad()
                for xc, yc in zip(xb.split(4), yb.split(4)):
                    (F.mse_loss(d(g(xc)), yc) * (len(xc) / len(xb))).backward()
                g_opt.step()
            order.append(cycle[position])
            position = (position + 1) % len(cycle)
    hand_d, hand_g = copy.deepcopy(d), copy.deepcopy(g)

    d, g, d_opt, g_opt = _d_and_g()
    seen = []

    class Order:
        def on_update_end(self, trainer, step, losses):
            seen.append(step.name)

    steps = [
        Step(lambda b: F.mse_loss(d(b[0]), b[1]), d_opt, name="D", accumulate=2, repeat=2),
        Step(lambda b: F.mse_loss(d(g(b[0])), b[1]), g_opt, name="G", microbatch_size=4),
    ]
    trainer = Trainer({"D": d, "G": g}, steps, callbacks=[Order()], device="cpu")
    trainer.fit(batches, epochs=epochs)

    assert seen == order and trainer.updates == len(order)
    assert {"D", "G"} <= set(order)
    assert_close_weights(hand_d, d)
    assert_close_weights(hand_g, g)


# ---------------------------------------------------------------- schedulers and clipping


def test_scheduler_steps_once_per_update_not_per_batch():
    x, y, _ = _regression_data(40, seed=5)
    batches = tensor_batches(x, y, batch_size=4)  # 10 batches: windows of 3, 3, 3, 1
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    lr_in_loss, lr_after_update = [], []

    def loss(batch):
        lr_in_loss.append(opt.param_groups[0]["lr"])
        return F.mse_loss(model(batch[0]), batch[1])

    class RecordLr:
        def on_update_end(self, trainer, step, losses):
            lr_after_update.append((trainer.updates, opt.param_groups[0]["lr"]))

    trainer = Trainer(model, Step(loss, opt, accumulate=3, scheduler=scheduler), callbacks=[RecordLr()], device="cpu")
    trainer.fit(batches, epochs=2)

    assert trainer.updates == 8 and scheduler.last_epoch == 8
    assert lr_after_update == [(u, 0.1 * 0.5 ** (u // 2)) for u in range(1, 9)]
    per_window = [3, 3, 3, 1] * 2  # every batch of a window sees the lr of its update
    expected = [0.1 * 0.5 ** (u // 2) for u, k in enumerate(per_window) for _ in range(k)]
    assert lr_in_loss == expected


@pytest.mark.parametrize("how", ["accumulate", "microbatch"])
def test_clip_grad_norm_clips_the_full_window_gradient_once(how):
    clip = 0.05
    x, y, _ = _regression_data(48, seed=9)
    big_batches = tensor_batches(x, y, batch_size=16)

    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in big_batches:
        opt.zero_grad()
        F.mse_loss(ref(xb), yb).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        assert norm > clip  # clipping is active
        opt.step()

    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, clip_grad_norm=clip,
                **({"accumulate": 2} if how == "accumulate" else {"microbatch_size": 8}))
    data = tensor_batches(x, y, batch_size=8 if how == "accumulate" else 16)
    Trainer(model, step, device="cpu").fit(data, epochs=1)
    assert_close_weights(ref, model)

    # Clipping each half-batch gradient before summing them is another update:
    per_chunk = _net()
    opt = torch.optim.SGD(per_chunk.parameters(), lr=0.1)
    for xb, yb in big_batches:
        total = [torch.zeros_like(p) for p in per_chunk.parameters()]
        for xc, yc in zip(xb.split(8), yb.split(8)):
            opt.zero_grad()
            F.mse_loss(per_chunk(xc), yc).backward()
            torch.nn.utils.clip_grad_norm_(per_chunk.parameters(), clip)
            for t, p in zip(total, per_chunk.parameters()):
                t += p.grad * (len(xc) / len(xb))
        for t, p in zip(total, per_chunk.parameters()):
            p.grad = t
        opt.step()
    assert max_abs_diff(ref, per_chunk) > 1e-4


# ---------------------------------------------------------------- counters, events, logged losses


def test_updates_events_and_logged_losses_are_per_window_and_exact():
    x, y, mask = _regression_data(37, seed=13)
    batches = tensor_batches(x, y, mask, batch_size=5)  # 7 batches of 5 and one of 2: windows 3, 3, 2
    epochs = 2

    ref = _net()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    expected = []
    for _ in range(epochs):
        for window in windows(batches, 3):
            xw, yw, mw = concat(window)
            out = ref(xw)
            first = F.mse_loss(out[:, 0], yw[:, 0])
            tokens = (((out[:, 1:] - yw[:, 1:]) ** 2) * mw).sum() / mw.sum()
            expected.append({"fit/first": first.detach(), "fit/tokens": tokens.detach()})
            opt.zero_grad()
            (first + tokens).backward()
            opt.step()

    model = _net()
    calls = []
    logged = []

    def fit(batch):
        calls.append(len(batch[0]))
        return _chunk_loss("dict_tokens", model(batch[0]), batch[1], batch[2])

    class Record:
        def on_update_end(self, trainer, step, losses):
            logged.append((trainer.updates, losses))

    step = Step(fit, torch.optim.Adam(model.parameters(), lr=0.01), accumulate=3, microbatch_size=3)
    trainer = Trainer(model, step, callbacks=[Record()], device="cpu")
    trainer.fit(batches, epochs=epochs)

    assert trainer.updates == len(expected) == 6
    assert [u for u, _ in logged] == list(range(1, 7))  # once per update, counter already advanced
    assert calls == ([3, 2] * 7 + [2]) * epochs  # a forward per chunk, an update per window
    for (_, got), want in zip(logged, expected):
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=0)
    assert_close_weights(ref, model)


# ---------------------------------------------------------------- batch norm


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))


def _bn_trainer(model: nn.Module, **step_args) -> tuple[Trainer, list]:
    x, y, _ = _regression_data(16, seed=1)  # two batches of 8: one update per epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", **step_args)
    return Trainer(model, step, device="cpu"), tensor_batches(x.float(), y[:, :1].float(), batch_size=8)


def _bn_warnings(record) -> list:
    return [w for w in record if "batch-norm" in str(w.message)]


@pytest.mark.parametrize("step_args", [{"accumulate": 2}, {"microbatch_size": 4}])
def test_batchnorm_in_accumulating_step_warns_once_per_fit(step_args):
    trainer, data = _bn_trainer(_bn_model(), **step_args)
    match = r"Step 'fit' accumulates gradients.*batch-norm layers in train mode \(1\).*GroupNorm/LayerNorm"
    for epochs in (2, 4):  # each fit (2 updates, then 2 more) warns exactly once
        with pytest.warns(UserWarning, match=match) as record:
            trainer.fit(data, epochs=epochs)
        assert len(_bn_warnings(record)) == 1


def test_batchnorm_without_accumulation_or_kept_in_eval_does_not_warn():
    for model, step_args in [(_bn_model(), {}), (_bn_model(), {"accumulate": 2})]:
        if step_args:
            freeze(model, "1.*", batchnorm="eval")  # the fix the warning suggests
        trainer, data = _bn_trainer(model, **step_args)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.fit(data, epochs=2)
        assert _bn_warnings(record) == []


# ---------------------------------------------------------------- errors


def _tiny():
    model = nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_bad_step_arguments():
    _, opt = _tiny()
    with pytest.raises(ValueError, match=r"`accumulate` must be >= 1\. Received: accumulate=0\. Use accumulate=1"):
        Step(lambda b: b, opt, accumulate=0)
    with pytest.raises(ValueError, match=r"`microbatch_size` must be >= 1\. Received: microbatch_size=0\. Use None"):
        Step(lambda b: b, opt, microbatch_size=0)
    with pytest.raises(TypeError, match=r"`accumulate` must be an int\. Received: accumulate=2\.0"):
        Step(lambda b: b, opt, accumulate=2.0)
    with pytest.raises(ValueError, match=r"`partial_window` must be one of \('apply', 'drop'\)\. "
                                         r"Received: partial_window='sometimes'"):
        Step(lambda b: b, opt, partial_window="sometimes")


@pytest.mark.parametrize("step_args", [{"accumulate": 2}, {"microbatch_size": 1}])
def test_batch_without_sample_count_and_a_mean_loss_suggests_average(step_args):
    model, opt = _tiny()
    data = [{"text": ["a", "b"], "x": [1.0, 2.0]}] * 2  # no tensor: the sample count is unknown

    def loss(batch):
        return model(torch.tensor([batch["x"]]).T.repeat(1, 4)).mean()

    trainer = Trainer(model, Step(loss, opt, name="fit", **step_args), device="cpu")
    with pytest.raises(ValueError, match=r"Step 'fit': cannot infer how many samples the batch holds.*"
                                         r"Return the loss as trainflow\.Average\(total, count\)"):
        trainer.fit(data, epochs=1)


def test_batch_without_sample_count_accumulates_with_an_average_loss():
    """The fix the error suggests: with an explicit count, no sample count is needed."""
    model, opt = _tiny()
    model.double()
    data = [{"x": [1.0, 2.0, 3.0]}, {"x": [4.0]}]

    def loss(batch):
        x = torch.tensor(batch["x"], dtype=F64).unsqueeze(1).repeat(1, 4)
        return Average((model(x) ** 2).sum(), len(batch["x"]))

    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    (ref(torch.arange(1.0, 5.0, dtype=F64).unsqueeze(1).repeat(1, 4)) ** 2).mean().backward()
    ref_opt.step()
    Trainer(model, Step(loss, opt, accumulate=2), device="cpu").fit(data, epochs=1)
    assert_close_weights(ref, model)


@pytest.mark.parametrize("second", [{"b": "mean"}, {"a": "average"}])
def test_loss_with_different_terms_within_one_window(second):
    model, opt = _tiny()
    calls = []

    def loss(batch):
        calls.append(1)
        value = F.mse_loss(model(batch[0]), batch[1])
        kinds = {"a": "mean"} if len(calls) % 2 else second
        return {k: value if v == "mean" else Average(value * len(batch[0]), len(batch[0])) for k, v in kinds.items()}

    x, y, _ = _regression_data(8, seed=0)
    trainer = Trainer(model.double(), Step(loss, opt, name="fit", accumulate=2), device="cpu")
    with pytest.raises(ValueError, match=r"Step 'fit': the loss returned different terms for two batches of one "
                                         r"update .*Return the same names, each always a mean or always an Average"):
        trainer.fit(tensor_batches(x, y[:, :1], batch_size=4), epochs=1)


# ---------------------------------------------------------------- isolation


@pytest.mark.parametrize("loss_kind", ["mean", "dict_tokens"])
def test_isolation_holds_under_accumulation(loss_kind):
    """Only the step's parameters get gradients; the other model's weights and .grad are untouched."""
    torch.manual_seed(0)
    trained = nn.Linear(4, 4).double()
    other = nn.Sequential(nn.Linear(4, 3)).double()  # in the graph of the loss, but not optimized
    other[0].weight.grad = torch.full_like(other[0].weight, 7.0)  # other.bias.grad stays None
    before = copy.deepcopy(other.state_dict())
    x, y, mask = _regression_data(30, seed=2)

    def loss(batch):
        return _chunk_loss(loss_kind, other(trained(batch[0])), batch[1], batch[2])

    step = Step(loss, torch.optim.Adam(trained.parameters(), lr=0.01), accumulate=2, microbatch_size=3)
    Trainer({"trained": trained, "other": other}, step, device="cpu").fit(
        tensor_batches(x, y, mask, batch_size=4), epochs=2
    )
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(other[0].weight.grad, torch.full_like(other[0].weight, 7.0))
    assert other[0].bias.grad is None
    assert all(p.grad is not None for p in trained.parameters())


# ---------------------------------------------------------------- fixed bugs, kept as tests


def test_drop_with_fewer_batches_than_accumulate_is_an_error_not_an_endless_loop():
    import signal

    def timeout(signum, frame):
        raise TimeoutError("fit did not return within 2 s")

    model, opt = _tiny()
    x, y, _ = _regression_data(8, seed=0)
    step = Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit", accumulate=2, partial_window="drop")
    trainer = Trainer(model.double(), step, device="cpu")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(2)
    try:
        with pytest.raises(ValueError, match=r"Step 'fit'.*accumulate=2.*partial_window='drop'"):
            trainer.fit(tensor_batches(x, y[:, :1], batch_size=8), max_updates=3)  # one batch per epoch
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_microbatch_splits_per_sample_lists_with_the_tensors():
    model, opt = _tiny()
    seen = []

    def loss(batch):
        seen.append((batch["x"].shape[0], list(batch["ids"])))
        return F.mse_loss(model(batch["x"]), torch.zeros(len(batch["x"]), 1, dtype=F64))

    batch = {"x": torch.randn(6, 4, dtype=F64), "ids": ["a", "b", "c", "d", "e", "f"]}
    Trainer(model.double(), Step(loss, opt, microbatch_size=4), device="cpu").fit([batch], epochs=1)
    assert seen == [(4, ["a", "b", "c", "d"]), (2, ["e", "f"])]
