"""Step: a step that reads several streams, reserved names, and their errors."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_weights
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer


def loaders(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.randn(20, 3, generator=g, dtype=torch.float64),
                          torch.randn(20, 1, generator=g, dtype=torch.float64))
    valid = TensorDataset(torch.randn(12, 3, generator=g, dtype=torch.float64),
                          torch.randn(12, 1, generator=g, dtype=torch.float64))
    # shuffled: each loader draws its order from the global RNG when its iterator starts, so the
    # order in which the streams are drawn shows in the weights
    return DataLoader(train, batch_size=4, shuffle=True), DataLoader(valid, batch_size=5, shuffle=True)


def models():
    torch.manual_seed(1)
    body, head = nn.Linear(3, 4).double(), nn.Linear(4, 1).double()
    return body, head, torch.optim.SGD(body.parameters(), lr=0.1, momentum=0.9), torch.optim.Adam(head.parameters(), 1e-2)


def mse(body, head, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(head(torch.tanh(body(x))), y)


def hand_loop(epochs: int):
    """A DARTS-shaped loop: for each train batch, one valid batch; a step on both, then a step
    on the train batch again."""
    body, head, body_opt, head_opt = models()
    train, valid = loaders()
    torch.manual_seed(2)
    valid_it = None
    for _ in range(epochs):
        for batch in train:
            try:
                v = next(valid_it) if valid_it is not None else None
            except StopIteration:
                v = None
            if v is None:
                valid_it = iter(valid)
                v = next(valid_it)
            head_opt.zero_grad()
            (mse(body, head, v) + 0.5 * mse(body, head, batch)).backward(inputs=list(head.parameters()))
            head_opt.step()
            body_opt.zero_grad()
            mse(body, head, batch).backward(inputs=list(body.parameters()))
            body_opt.step()
    return body, head


def trainflow_run(epochs: int, *, stop_after: int | None = None, state=None):
    body, head, body_opt, head_opt = models()
    train, valid = loaders()
    torch.manual_seed(2)

    def both(batch):  # one batch of each stream, as a dict
        return mse(body, head, batch["valid"]) + 0.5 * mse(body, head, batch["train"])

    flow = [Step(both, head_opt, name="head", data=("train", "valid")),
            Step(lambda b: mse(body, head, b), body_opt, name="body", batch="same")]
    trainer = Trainer({"body": body, "head": head}, flow)
    if state is not None:
        trainer.load_state_dict(state)
    trainer.fit({"train": train, "valid": valid}, epochs=epochs, max_updates=stop_after)
    return trainer, body, head


def test_a_step_on_two_streams_then_a_reused_batch_equals_the_hand_loop():
    body, head = hand_loop(epochs=3)  # 5 train batches per epoch; valid (3 batches) cycles
    trainer, tbody, thead = trainflow_run(epochs=3)
    assert trainer.updates == 30
    assert_same_weights(nn.ModuleList([body, head]), nn.ModuleList([tbody, thead]))


@pytest.mark.parametrize("stop_after", [3, 7, 10])  # after a two-stream step, after a reuse, at an epoch end
def test_a_two_stream_flow_resumes_exactly(stop_after):
    trainer, _, _ = trainflow_run(epochs=3, stop_after=stop_after)
    state = trainer.state_dict()
    assert state["data"]["last_batches"] == {"train": 1, "valid": 1}
    _, body, head = trainflow_run(epochs=3, state=state)
    _, ref_body, ref_head = trainflow_run(epochs=3)
    assert_same_weights(nn.ModuleList([ref_body, ref_head]), nn.ModuleList([body, head]))


def test_a_custom_step_gets_the_dict_of_batches():
    seen = []
    model = nn.Linear(1, 1, bias=False)
    w = model.weight
    opt = torch.optim.SGD([w], lr=0.1)

    def update(batch, ctx):
        seen.append((batch["valid"], batch["train"]))
        ctx.minimize((w - batch["train"]).pow(2).sum() + (w - batch["valid"]).pow(2).sum(), opt)

    trainer = Trainer(model, [Step.custom(update, opt, data=("valid", "train"))])
    trainer.fit({"train": [torch.ones(1), 2 * torch.ones(1)], "valid": [5 * torch.ones(1)]}, epochs=1)
    # valid is listed first: it is drawn before train runs out, so that last valid batch is taken
    # and the update does not happen, as in a loop that draws valid first
    assert [(v.item(), t.item()) for v, t in seen] == [(5.0, 1.0), (5.0, 2.0)] and trainer.updates == 2


def test_a_state_from_before_the_data_part_resumes_exactly():
    """A file written when the data position lived under "loop" (same keys, one last stream)."""
    trainer, _, _ = trainflow_run(epochs=3, stop_after=6)
    state = trainer.state_dict()
    data = state.pop("data")
    state["loop"].update(data)
    state["loop"]["last_stream"], state["loop"]["last_batches"] = "train", 1  # the old form: one stream
    _, body, head = trainflow_run(epochs=3, state=state)
    _, ref_body, ref_head = trainflow_run(epochs=3)
    assert_same_weights(nn.ModuleList([ref_body, ref_head]), nn.ModuleList([body, head]))


def test_describe_shows_both_streams():
    trainer, _, _ = trainflow_run(epochs=1, stop_after=1)
    assert "data=train+valid" in trainer.describe()


@pytest.fixture
def opt():
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


def test_several_streams_errors_name_the_argument(opt):
    with pytest.raises(TypeError, match=r"^Step: `data` must be the name of a data stream, or a tuple of names\. "
                                        r"Received: data=\('train', 3\)\."):
        Step(lambda b: b, opt, data=("train", 3))
    with pytest.raises(TypeError, match=r"Received: data=\(\)\."):
        Step(lambda b: b, opt, data=())
    with pytest.raises(ValueError, match=r"^Step: `data` names a stream twice\. Received: data=\('train', 'train'\)"):
        Step(lambda b: b, opt, data=("train", "train"))
    with pytest.raises(ValueError, match=r"^Step: a step that reads several streams takes one batch of each per "
                                         r"update, so it cannot accumulate or split them\. Received: "
                                         r"data=\('train', 'valid'\), accumulate=2, microbatch_size=None\."):
        Step(lambda b: b, opt, data=("train", "valid"), accumulate=2)
    with pytest.raises(ValueError, match=r"accumulate=1, microbatch_size=4\. Use accumulate=1"):
        Step(lambda b: b, opt, data=["train", "valid"], microbatch_size=4)
    assert Step(lambda b: b, opt, data=["train", "valid"]).data == ("train", "valid")
    assert Step(lambda b: b, opt, data=("valid",)).data == "valid"


def test_a_reused_batch_must_come_from_the_previous_steps_streams(opt):
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    model = nn.Linear(1, 1)
    flow = [Step(lambda b: b, opt, name="a", data=("train", "valid")),
            Step(lambda b: b, other, name="b", batch="same", data=("train", "extra"))]
    with pytest.raises(ValueError, match=r"step 'b' has batch='same' and data=\('train', 'extra'\), but the step "
                                         r"before it draws from data=\('train', 'valid'\)"):
        Trainer(model, flow)


def test_fit_names_a_missing_second_stream(opt):
    model = nn.Linear(1, 1)
    own = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, [Step(lambda b: model.weight.sum(), own, name="a", data=("train", "valid"))])
    with pytest.raises(ValueError, match=r"step 'a' draws from data stream 'valid', which `data` does not have"):
        trainer.fit([torch.ones(1)], epochs=1)


def test_the_training_metrics_namespace_is_reserved(opt):
    with pytest.raises(ValueError, match=r"^Step: the name 'train' is reserved: 'train/\.\.\.' are the log keys of "
                                         r"the epoch's training metrics, which the step's 'train/<loss>' epoch means "
                                         r"would overwrite or be overwritten by\. Received: name='train'\. Pass "
                                         r"another name=, e\.g\. name='fit'\.$"):
        Step(lambda b: b, opt, name="train")

    def train(batch):
        return batch

    with pytest.raises(ValueError, match=r"the name 'train' is reserved.*Received: name=None, so the function's "
                                         r"name 'train'\."):
        Step(train, opt)
    with pytest.raises(ValueError, match=r"the name 'train' is reserved.*Received: name='train'\."):
        Step.custom(lambda b, ctx: None, opt, name="train")
