"""Single-path one-shot search: supernet training against a hand-written loop bit for bit, the search
with part 1's strategies on the shared weights, exact resume of the path sampler, every error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from trainflow.nas import GridSearch, InputChoice, LayerChoice, Random, RegularizedEvolution, SinglePathTrainer
from trainflow.nas.spos import SampledInputChoice, SampledLayerChoice

OPTIONS = ["lin", "tanh", "abs"]


class Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def space(hidden: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, hidden),
        LayerChoice({"lin": nn.Linear(hidden, hidden), "tanh": nn.Tanh(), "abs": Abs()}, label="act"),
        nn.Linear(hidden, 1),
    )


def data(seed: int = 0, n: int = 96, batch_size: int = 16) -> list:
    g = torch.Generator().manual_seed(200 + seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0].abs() + x[:, 1].abs()).unsqueeze(1)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def mse_of(model):
    def mse(batch):
        x, y = batch
        return F.mse_loss(model(x), y)
    return mse


class Pick(nn.Module):
    """The hand-written supernet layer: runs the option ``chosen``."""

    def __init__(self, choice):
        super().__init__()
        self.op_choices = nn.ModuleDict(choice.named_children())
        self.chosen = None

    def forward(self, x):
        return self.op_choices[self.chosen](x)


def spos(seed=0, **options):
    torch.manual_seed(seed)
    model = space()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, SinglePathTrainer(model, mse_of(model), opt, seed=seed, **options)


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_supernet_training_matches_a_hand_written_loop():
    model, trainer = spos(clip_grad_norm=0.5)
    assert isinstance(model[1], SampledLayerChoice)
    trainer.fit(data(), epochs=2)
    torch.manual_seed(0)
    hand = space()
    hand[1] = Pick(hand[1])
    opt = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    paths = []
    loss = mse_of(hand)
    for _ in range(2):
        for batch in data():
            hand[1].chosen = OPTIONS[int(torch.randint(3, (1,), generator=g))]
            paths.append(hand[1].chosen)
            opt.zero_grad()
            loss(batch).backward()
            torch.nn.utils.clip_grad_norm_(hand.parameters(), 0.5)
            opt.step()
    torch.randint(3, (1,), generator=g)  # the sampler has drawn the path of the next update already
    same_state(model, hand)
    assert torch.equal(trainer.sampler.generator.get_state(), g.get_state())
    assert set(paths) == set(OPTIONS)  # every option was trained, one path per update
    # the optimizer's state too: "lin" got no gradient, nor momentum, in the updates that did not sample it
    mine, theirs = trainer.trainer.optimizers["supernet"].state_dict()["state"], opt.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k]["momentum_buffer"], theirs[k]["momentum_buffer"]) for k in mine)


def test_search_scores_architectures_with_the_shared_weights():
    model, trainer = spos()
    trainer.fit(data(), epochs=2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    valid = data(seed=1)
    seen = []

    def evaluate(m):
        assert m is model
        seen.append(m[1].chosen)
        with torch.no_grad():
            return -sum(mse_of(m)(b).item() for b in valid)

    best = trainer.search(evaluate, strategy=GridSearch())
    assert sorted(seen) == sorted(OPTIONS) and [a["act"] for a, _ in trainer.trials] == seen
    scores = {}
    for option in OPTIONS:  # each score by hand, on the same trained weights
        model[1].chosen = option
        with torch.no_grad():
            scores[option] = -sum(mse_of(model)(b).item() for b in valid)
    assert dict((a["act"], v) for a, v in trainer.trials) == scores
    assert best == trainer.export() == {"act": max(scores, key=scores.get)}
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # no retraining


def test_a_search_between_two_fits_changes_nothing_in_the_training():
    model, trainer = spos()
    trainer.fit(data(), epochs=1)
    trainer.search(lambda m: 0.0, strategy=GridSearch())  # sets every path in turn
    other = next(o for o in OPTIONS if o != trainer.sampler.path["act"])
    trainer.set_path({"act": other})  # wherever the search ended: not the next update's path
    trainer.fit(data(), epochs=2)
    plain_model, plain = spos()
    plain.fit(data(), epochs=2)
    same_state(model, plain_model)


def test_evolution_search_is_reproducible_and_respects_max_trials():
    torch.manual_seed(0)

    def build():
        m = nn.Sequential(nn.Linear(2, 2), LayerChoice([nn.Identity(), nn.Tanh(), Abs()], label="a"),
                          LayerChoice([nn.Identity(), nn.Tanh()], label="b"), InputChoice(2, label="c"))
        return m

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = build()

        def forward(self, x):
            h = self.body[2](self.body[1](self.body[0](x)))
            return self.body[3]([h, x])

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        net = Net()
        trainer = SinglePathTrainer(net, lambda b: net(b).sum(), torch.optim.SGD(net.parameters(), lr=0.1))
        assert isinstance(net.body[3], SampledInputChoice)
        x = torch.randn(4, 2)
        trainer.search(lambda m: m(x).sum().item(), strategy=RegularizedEvolution(4, 2, 0.5), max_trials=9, seed=3)
        runs.append(trainer.trials)
    assert len(runs[0]) == 9 and runs[0] == runs[1]
    assert all(a["c"] in ([0], [1]) for a, _ in runs[0])


def test_the_toy_search_finds_the_needed_option():
    for seed in range(3):
        torch.manual_seed(seed)
        model = space(8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        trainer = SinglePathTrainer(model, mse_of(model), opt, seed=seed)
        trainer.fit(data(seed, n=192), epochs=10)
        valid = data(seed + 10)

        def evaluate(m):
            with torch.no_grad():
                return sum(mse_of(m)(b).item() for b in valid)

        assert trainer.search(evaluate, strategy=GridSearch(), objective="minimize") == {"act": "abs"}, seed


def test_state_dict_resume_is_exact_with_the_sampler():
    _, full = spos()
    full.fit(data(), epochs=2)
    model, first = spos()
    first.fit(data(), epochs=2, max_updates=7)  # stopped mid-epoch
    state = first.state_dict()
    assert "path_sampler" in state["callbacks"]
    resumed_model, resumed = spos()
    resumed.load_state_dict(state)
    resumed.fit(data(), epochs=2)
    same_state(resumed_model, full.space)
    assert torch.equal(resumed.sampler.generator.get_state(), full.sampler.generator.get_state())
    for key, value in full.trainer.optimizers["supernet"].state_dict()["state"].items():
        other = resumed.trainer.optimizers["supernet"].state_dict()["state"][key]
        assert torch.equal(value["momentum_buffer"], other["momentum_buffer"])


def test_errors():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"space has no LayerChoice or InputChoice.*Received: space of type Linear"):
        SinglePathTrainer(model, lambda b: b, opt)
    with pytest.raises(TypeError, match=r"space must be the model.*Received: space=<function"):
        SinglePathTrainer(space, lambda b: b, opt)
    with pytest.raises(TypeError, match=r"loss must be a function of the batch. Received: loss=3"):
        SinglePathTrainer(space(), 3, opt)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer.*Received: optimizer=None"):
        SinglePathTrainer(space(), lambda b: b, None)
    with pytest.raises(ValueError, match=r"seed must be an int >= 0. Received: seed=-1"):
        SinglePathTrainer(space(), lambda b: b, opt, seed=-1)
    unequal = nn.Sequential(LayerChoice([nn.ReLU(), nn.Tanh()], label="a"),
                            LayerChoice([nn.ReLU(), nn.Tanh(), nn.Identity()], label="a"))
    with pytest.raises(ValueError, match=r"sharing label 'a' must offer the same options: \['0', '1'\] and"):
        SinglePathTrainer(unequal, lambda b: b, opt)
    model, trainer = spos()
    with pytest.raises(RuntimeError, match="no search has run yet"):
        trainer.export()
    with pytest.raises(ValueError, match=r"give max_trials.*Received: max_trials=None"):
        trainer.search(lambda m: 0.0, strategy=Random())
    with pytest.raises(TypeError, match=r"strategy must be.*Received: strategy='grid'"):
        trainer.search(lambda m: 0.0, strategy="grid")
    with pytest.raises(TypeError, match=r"evaluate must be a function of the model. Received: evaluate=1"):
        trainer.search(1, strategy=GridSearch())
    with pytest.raises(ValueError, match=r"objective must be 'maximize' or 'minimize'. Received: objective='max'"):
        trainer.search(lambda m: 0.0, strategy=GridSearch(), objective="max")
    with pytest.raises(ValueError, match=r"max_trials must be None or an int >= 1. Received: max_trials=0"):
        trainer.search(lambda m: 0.0, strategy=GridSearch(), max_trials=0)
    with pytest.raises(ValueError, match=r"evaluate must return a finite number. Received: nan"):
        trainer.search(lambda m: float("nan"), strategy=GridSearch())
    with pytest.raises(ValueError, match=r"must give an option for every label \['act'\]. Received: arch=\{\}"):
        trainer.set_path({})
    with pytest.raises(ValueError, match=r"'relu' is not an option of 'act'. Received: arch\['act'\]='relu'"):
        trainer.set_path({"act": "relu"})
