"""DARTS as a flow: the supernet's mixing, the second-order hypergradient against exact autograd,
first and second order against hand-written loops bit for bit, Gumbel, warm-up, clipping,
``darts_flow`` in a two-optimizer flow, seed 002's sketch, and every error."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from trainflow import Step, Trainer
from trainflow.nas import DartsTrainer, InputChoice, LayerChoice, ValueChoice, darts_flow, fixed_arch
from trainflow.nas import replace_layer_choice
from trainflow.nas.darts import DartsInputChoice, DartsLayerChoice, _virtual_step, hypergradient


class Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def toy_space(hidden: int = 8) -> nn.Module:
    """One LayerChoice between two linear layers; ``y = |x0| + |x1|`` needs the ``abs`` option."""
    return nn.Sequential(
        nn.Linear(2, hidden),
        LayerChoice({"identity": nn.Identity(), "tanh": nn.Tanh(), "abs": Abs()}, label="act"),
        nn.Linear(hidden, 1),
    )


def toy_data(seed: int, n: int = 256, batch_size: int = 32) -> list:
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0].abs() + x[:, 1].abs()).unsqueeze(1)
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def mse_of(model):
    def mse(batch):
        x, y = batch
        return F.mse_loss(model(x), y)
    return mse


def hand_darts(model, alphas, opt, train, valid, epochs, *, arch_lr, unrolled=False, clip=None, warmup=0):
    """Seed 002's loop: for each training batch, an architecture update on the next validation batch
    (the validation loader cycles), then a weight update on the training batch."""
    arch_opt = torch.optim.Adam(alphas, lr=arch_lr, betas=(0.5, 0.999), weight_decay=1e-3)
    ids = {id(a) for a in alphas}
    weights = [(n, p) for n, p in model.named_parameters() if id(p) not in ids]
    loss = mse_of(model)
    valid_iter = iter(valid)
    for epoch in range(epochs):
        for x in train:
            try:
                v = next(valid_iter)
            except StopIteration:
                valid_iter = iter(valid)
                v = next(valid_iter)
            if epoch >= warmup:
                arch_opt.zero_grad()
                if unrolled:
                    hyper, _ = hypergradient(lambda: loss(x), lambda: loss(v), model, weights, alphas, opt)
                    for a, g in zip(alphas, hyper):
                        a.grad = g
                else:
                    loss(v).backward()
                arch_opt.step()
            opt.zero_grad()
            loss(x).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in weights], clip)
            opt.step()
    return arch_opt


def replaced(model):
    """The model with every LayerChoice replaced as DartsTrainer replaces it (one alpha per label)."""
    alphas = {}

    def factory(choice):
        module = DartsLayerChoice(choice, alphas.get(choice.label))
        alphas.setdefault(choice.label, module.alpha)
        return module

    replace_layer_choice(model, factory)
    return list(alphas.values())


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ---------------------------------------------------------------------------- the supernet


def test_mixing_is_seed_002s_and_labels_share_one_alpha():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 3), LayerChoice([nn.ReLU(), nn.Tanh()], label="act"),
        nn.Linear(3, 3), LayerChoice([nn.ReLU(), nn.Tanh()], label="act"),
        LayerChoice([nn.Identity(), Abs(), nn.Sigmoid()], label="out"),
    )
    search = DartsTrainer(model, lambda b: model(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1))
    alphas = search.arch_parameters()
    assert list(alphas) == ["act", "out"] and model[1].alpha is model[3].alpha is alphas["act"]
    assert [tuple(a.shape) for a in alphas.values()] == [(2,), (3,)]
    assert all(a.abs().max() < 0.01 for a in alphas.values())  # 1e-3 * randn
    with torch.no_grad():
        alphas["out"].copy_(torch.tensor([0.3, -1.0, 2.0]))
    x = torch.randn(5, 3)
    ops = torch.stack([x, x.abs(), torch.sigmoid(x)])
    expected = torch.sum(ops * F.softmax(alphas["out"], -1).view(-1, 1, 1), 0)
    assert torch.equal(model[4](x), expected)
    assert search.export() == {"act": max(["0", "1"], key=lambda o: float(alphas["act"][int(o)])), "out": "2"}
    probs = search.export_probs()["out"]
    assert list(probs) == ["0", "1", "2"] and probs["2"] == pytest.approx(F.softmax(alphas["out"], -1)[2].item())
    # the alphas are parameters of the space, held by the architecture optimizer only
    assert {id(p) for p in search.flow.arch_optimizer.param_groups[0]["params"]} == {id(a) for a in alphas.values()}


def test_input_choice_mixes_inputs_and_exports_its_top_n_in_input_order(tmp_path):
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.pick = InputChoice(3, 2, reduction="sum", label="skip")

        def forward(self, x):
            return self.pick([x, self.fc(x), -x])

    def space():
        return nn.Sequential(Cell(), LayerChoice({"a": nn.Identity(), "b": Abs()}, label="op"))

    model = space()
    search = DartsTrainer(model, lambda b: model(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1))
    mixed = model[0].pick
    assert isinstance(mixed, DartsInputChoice)
    with torch.no_grad():
        mixed.alpha.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.randn(4, 2)
    w = F.softmax(mixed.alpha, -1)
    inputs = [x, model[0].fc(x), -x]
    assert torch.allclose(mixed(inputs), 2 * (w[0] * inputs[0] + w[1] * inputs[1] + w[2] * inputs[2]))
    arch = search.export()
    assert arch["skip"] == [0, 2] and list(search.export_probs()["skip"]) == [0, 1, 2]
    (tmp_path / "best_arch.json").write_text(json.dumps(arch))
    with fixed_arch(tmp_path / "best_arch.json"):  # retraining: the plain model of the export
        plain = space()
    assert plain[0].pick.chosen == [0, 2] and isinstance(plain[1], (nn.Identity, Abs))


def test_virtual_step_is_the_sgd_step_the_optimizer_would_take():
    for options in ({"momentum": 0.9, "weight_decay": 0.01}, {"momentum": 0.9, "nesterov": True},
                    {"momentum": 0.5, "dampening": 0.3}, {}):
        torch.manual_seed(1)
        w = nn.Parameter(torch.randn(4, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=0.1, **options)
        for _ in range(2):  # the second step has a momentum buffer
            w.grad = torch.randn(4, dtype=torch.float64)
            virtual, _ = _virtual_step(opt, [w], [w.grad])
            before = w.detach().clone()
            opt.step()
            assert torch.allclose(virtual[0], w.detach(), rtol=1e-12, atol=0), options
            assert not torch.equal(before, w.detach())


# ---------------------------------------------------------------------------- second order


def _exact_hypergradient(model, alpha, weights, opt, x, v, virtual):
    """grad_alpha L_val(w'(alpha), alpha) by double backward, w' the virtual step written out by hand."""
    loss = mse_of(model)
    params = [p for _, p in weights]
    g = torch.autograd.grad(loss(x), params, create_graph=True)
    new = [virtual(p, gi) for p, gi in zip(params, g)]
    value = functional_call(model, {n: t for (n, _), t in zip(weights, new)}, (v[0],))
    return torch.autograd.grad(F.mse_loss(value, v[1]), [alpha])[0]


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_second_order_matches_the_exact_hypergradient(optimizer):
    torch.manual_seed(0)
    model = toy_space(4).double()
    alpha = replaced(model)[0]
    with torch.no_grad():
        alpha.copy_(torch.tensor([0.2, -0.1, 0.4]))
    weights = [(n, p) for n, p in model.named_parameters() if p is not alpha]
    params = [p for _, p in weights]
    lr, m, wd = 0.1, 0.9, 0.01
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)

        def virtual(p, g):
            return p - lr * g  # other optimizers: plain SGD with their learning rate
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=m if optimizer == "momentum" else 0.0, weight_decay=wd)
    (x, y), (vx, vy) = [(a.double(), b.double()) for a, b in toy_data(0, n=32, batch_size=16)]
    if optimizer != "adam":
        if optimizer == "momentum":  # one real step first: the virtual step then uses the momentum buffer
            opt.zero_grad()
            mse_of(model)((x, y)).backward()
            opt.step()
            bufs = {id(p): opt.state[p]["momentum_buffer"].clone() for p in params}

            def virtual(p, g):
                return p - lr * (m * bufs[id(p)] + (g + wd * p))
        else:
            def virtual(p, g):
                return p - lr * (g + wd * p)
    loss = mse_of(model)
    grads_before = [p.grad for p in params]
    before = [p.detach().clone() for p in params]
    hyper, value = hypergradient(lambda: loss((x, y)), lambda: loss((vx, vy)), model, weights, [alpha], opt)
    exact = _exact_hypergradient(model, alpha, weights, opt, (x, y), (vx, vy), virtual)
    first_order = torch.autograd.grad(loss((vx, vy)), [alpha])[0]
    error = (hyper[0] - exact).norm() / exact.norm()
    assert error < 1e-4, error
    assert (first_order - exact).norm() / exact.norm() > 1e-2  # the second-order term matters here
    # the weights, and their gradients, are untouched
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(g is p.grad for g, p in zip(grads_before, params))
    assert value.ndim == 0
