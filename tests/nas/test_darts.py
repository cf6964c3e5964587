"""DARTS as a flow: the supernet's mixing, the second-order hypergradient against exact autograd,
first and second order against hand-written loops bit for bit, Gumbel, warm-up, clipping,
``darts_flow`` in a two-optimizer flow, seed 002's sketch, and every error."""

from __future__ import annotations

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
    """One LayerChoice between two linear layers; ``y = |x0| + |x1|`` needs the ``abs`` option.

    (With ``y = |x0| - x1`` the mixture itself fits best: ``abs`` for ``|x0|`` and ``identity`` for
    the linear ``-x1``, so no single option is needed and seeds disagree.)
    """
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
            v, valid_iter = cycled(valid, valid_iter)
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


def cycled(loader, it):
    """The next batch of ``it``, starting ``loader`` over when it runs out: (batch, iterator)."""
    try:
        return next(it), it
    except StopIteration:
        it = iter(loader)
        return next(it), it


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
    assert search.export() == {"act": max(["0", "1"], key=lambda o: alphas["act"][int(o)].item()), "out": "2"}
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


# ---------------------------------------------------------------------------- flows against hand loops


def assert_optimizers_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        for name, value in sa[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[key][name])), (key, name)


@pytest.mark.parametrize("unrolled,optimizer", [(False, "momentum"), (True, "momentum"), (True, "adam")])
def test_search_matches_the_hand_loop_bit_for_bit(unrolled, optimizer):
    """An epoch is one pass over "train"; "valid" (5 batches against 8) cycles. The second-order hand loop
    calls the same hypergradient function (its maths is checked against exact autograd above): what is
    compared here is the flow: which batches, in which order, the virtual step's optimizer, the weights
    left untouched by the architecture update."""
    torch.manual_seed(0)
    model = toy_space()
    opt = (torch.optim.Adam(model.parameters(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    torch.manual_seed(1)
    search = DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, unrolled=unrolled, clip_grad_norm=0.5)
    train, valid = toy_data(0), toy_data(1, n=160)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    search.fit(train, valid, epochs=2)
    torch.manual_seed(0)
    hand = toy_space()
    hand_opt = (torch.optim.Adam(hand.parameters(), lr=0.01) if optimizer == "adam"
                else torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9))
    torch.manual_seed(1)
    alphas = replaced(hand)
    arch_opt = hand_darts(hand, alphas, hand_opt, train, valid, 2, arch_lr=0.1, unrolled=unrolled, clip=0.5)
    same_state(model, hand)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert search.trainer.updates == 2 * 2 * len(train)
    assert_optimizers_equal(search.trainer.optimizers["weights"], hand_opt)
    assert_optimizers_equal(search.trainer.optimizers["arch"], arch_opt)
    assert sorted(search.trainer.logs) == ["arch/loss", "weights/loss"]


def test_alphas_are_outside_the_weight_optimizer_and_its_clipping():
    """With clipping, a hand loop that clips the weights only is matched bit for bit (above); here: the
    weight optimizer never holds an alpha, and the weight step leaves the alphas' gradients alone."""
    torch.manual_seed(0)
    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    search = DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, clip_grad_norm=0.1)
    alpha = search.arch_parameters()["act"]
    assert all(p is not alpha for g in opt.param_groups for p in g["params"])
    seen = []

    class Watch:
        def on_update_end(self, trainer, step, losses):
            seen.append((step.name, alpha.detach().clone(), None if alpha.grad is None else alpha.grad.clone()))

    search.trainer.events.add(Watch())
    search.fit(toy_data(0, n=64), toy_data(1, n=64), epochs=1)
    assert [name for name, _, _ in seen] == ["arch", "weights"] * 2
    for (_, a_arch, g_arch), (_, a_train, g_train) in zip(seen[::2], seen[1::2]):
        assert torch.equal(a_arch, a_train) and torch.equal(g_arch, g_train)  # the weight step: alpha untouched


def test_an_architecture_update_leaves_the_weights_bit_identical():
    torch.manual_seed(0)
    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    search = DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, unrolled=True)
    alpha = search.arch_parameters()["act"]
    snapshots = []

    class Watch:
        def on_update_end(self, trainer, step, losses):
            weights = {n: p.detach().clone() for n, p in model.named_parameters() if p is not alpha}
            grads = {n: p.grad for n, p in model.named_parameters() if p is not alpha}
            snapshots.append((step.name, weights, grads, alpha.detach().clone()))

    search.trainer.events.add(Watch())
    search.fit(toy_data(0, n=96), toy_data(1, n=64), epochs=1)
    pairs = list(zip(snapshots[1::2], snapshots[2::2]))  # (after a weight update, after the next arch update)
    assert len(pairs) == 2
    for (_, w_before, g_before, a_before), (name, w_after, g_after, a_after) in pairs:
        assert name == "arch" and not torch.equal(a_before, a_after)
        assert all(torch.equal(w_before[n], w_after[n]) for n in w_before)
        assert all(g_before[n] is g_after[n] for n in g_before)  # the gradients too: not even replaced


def test_gumbel_anneals_per_epoch_and_matches_a_hand_loop():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    search = DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, gumbel=(4.0, 1.0))
    taus = []

    class Watch:
        def on_epoch_start(self, trainer):
            taus.append(search.flow.architecture.tau)

    search.trainer.events.add(Watch())
    train, valid = toy_data(0, n=64), toy_data(1, n=64)
    search.fit(train, valid, epochs=3)
    assert taus == [4.0, 2.5, 1.0]
    torch.manual_seed(0)
    hand = toy_space()
    hand_opt = torch.optim.SGD(hand.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    alphas = replaced(hand)
    arch_opt = torch.optim.Adam(alphas, lr=0.1, betas=(0.5, 0.999), weight_decay=1e-3)
    loss = mse_of(hand)
    valid_iter = iter(valid)
    for epoch in range(3):
        hand[1]._architecture = SimpleNamespace(tau=4.0 - 1.5 * epoch)  # F.gumbel_softmax(alpha, tau) in training
        for x in train:
            v, valid_iter = cycled(valid, valid_iter)
            arch_opt.zero_grad()
            loss(v).backward()
            arch_opt.step()
            hand_opt.zero_grad()
            loss(x).backward()
            hand_opt.step()
    same_state(model, hand)
    model.eval()  # evaluation: plain softmax, no noise
    x = torch.randn(4, 2)
    assert torch.equal(model(x), model(x))


def test_warmup_epochs_train_only_the_weights():
    torch.manual_seed(0)
    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch.manual_seed(1)
    search = DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, warmup_epochs=2)
    alpha = search.arch_parameters()["act"]
    start = alpha.detach().clone()
    train, valid = toy_data(0, n=64), toy_data(1, n=64)
    search.fit(train, valid, epochs=2)
    assert torch.equal(alpha, start) and search.trainer.optimizers["arch"].state_dict()["state"] == {}
    assert "arch/loss" not in search.trainer.logs
    search.fit(train, valid, epochs=3)  # the third epoch searches
    assert not torch.equal(alpha, start)
    torch.manual_seed(0)
    hand = toy_space()
    hand_opt = torch.optim.SGD(hand.parameters(), lr=0.05)
    torch.manual_seed(1)
    hand_darts(hand, replaced(hand), hand_opt, train, valid, 3, arch_lr=0.1, warmup=2)
    same_state(model, hand)


def test_state_dict_round_trip_resumes_exactly():
    def build():
        torch.manual_seed(0)
        model = toy_space()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, unrolled=True, gumbel=(2.0, 0.5))

    full_model, full = build()
    full.fit(toy_data(0, n=96), toy_data(1, n=64), epochs=2)
    _, stopped = build()
    stopped.fit(toy_data(0, n=96), toy_data(1, n=64), epochs=2, max_updates=7)  # mid-epoch, after an arch update
    state = stopped.state_dict()  # now: it holds the global RNG as it is (the Gumbel noise comes from it)
    resumed_model, resumed = build()
    resumed.load_state_dict(state)
    resumed.fit(toy_data(0, n=96), toy_data(1, n=64), epochs=2)
    same_state(resumed_model, full_model)
    assert_optimizers_equal(resumed.trainer.optimizers["arch"], full.trainer.optimizers["arch"])
    assert_optimizers_equal(resumed.trainer.optimizers["weights"], full.trainer.optimizers["weights"])


@pytest.mark.parametrize("unrolled", [False, True])
def test_the_toy_search_picks_the_needed_option_on_three_seeds(unrolled):
    for seed in range(3):
        torch.manual_seed(seed)
        model = toy_space()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        search = DartsTrainer(model, mse_of(model), opt, arch_lr=0.1, unrolled=unrolled)
        search.fit(toy_data(seed), toy_data(seed + 50), epochs=10)
        probs = search.export_probs()["act"]
        assert search.export() == {"act": "abs"} and probs["abs"] > 0.6, (seed, probs)


# ---------------------------------------------------------------------------- any flow


def test_darts_flow_searches_a_generator_inside_a_two_optimizer_flow():
    def build():
        torch.manual_seed(0)
        gen = nn.Sequential(nn.Linear(2, 4), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"),
                            nn.Linear(4, 2))
        disc = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        return gen, disc, torch.optim.SGD(gen.parameters(), lr=0.05), torch.optim.SGD(disc.parameters(), lr=0.05)

    def losses(gen, disc):
        def d_loss(batch):
            fake = gen(batch).detach()
            return F.softplus(-disc(batch)).mean() + F.softplus(disc(fake)).mean()

        def g_loss(batch):
            return F.softplus(-disc(gen(batch))).mean()

        return d_loss, g_loss

    gen, disc, g_opt, d_opt = build()
    d_loss, g_loss = losses(gen, disc)
    torch.manual_seed(1)
    flow = darts_flow([Step(d_loss, d_opt, name="D"), Step(g_loss, g_opt, name="G")], gen, arch_lr=0.1)
    assert [s.name for s in flow.steps] == ["arch", "D", "G"] and flow.steps[1].batch == "same"
    events = []

    class Watch:
        def on_update_end(self, trainer, step, logs):
            events.append((step.name, [p.detach().clone() for p in disc.parameters()],
                           [p.grad for p in disc.parameters()]))

    trainer = Trainer({"G": gen, "D": disc}, flow, callbacks=[Watch()])
    g = torch.Generator().manual_seed(5)
    train, valid = [torch.randn(8, 2, generator=g) for _ in range(6)], [torch.randn(8, 2, generator=g) for _ in range(4)]
    trainer.fit({"train": train, "valid": valid}, epochs=2)
    assert [e[0] for e in events] == ["arch", "D", "G"] * 6
    for (name, weights, grads), (_, before, before_grads) in zip(events[3::3], events[2::3]):
        assert name == "arch"  # isolation: the architecture step leaves D's weights and gradients alone
        assert all(torch.equal(a, b) for a, b in zip(weights, before))
        assert all(a is b for a, b in zip(grads, before_grads))
    # the same flow by hand
    hand_gen, hand_disc, hand_g_opt, hand_d_opt = build()
    hand_d, hand_g = losses(hand_gen, hand_disc)
    torch.manual_seed(1)
    alphas = replaced(hand_gen)
    arch_opt = torch.optim.Adam(alphas, lr=0.1, betas=(0.5, 0.999), weight_decay=1e-3)
    valid_iter = iter(valid)
    for _ in range(2):
        it = iter(train)
        for x in it:
            v, valid_iter = cycled(valid, valid_iter)
            arch_opt.zero_grad()
            hand_g(v).backward()
            arch_opt.step()
            hand_d_opt.zero_grad()
            hand_d(x).backward()
            hand_d_opt.step()
            hand_g_opt.zero_grad()
            hand_g(next(it)).backward()
            hand_g_opt.step()
    same_state(gen, hand_gen)
    same_state(disc, hand_disc)
    assert flow.export() == {"act": max(flow.export_probs()["act"], key=flow.export_probs()["act"].get)}


# ---------------------------------------------------------------------------- seed 002


def test_seed_002_sketch_runs_as_written_and_equals_the_flow():
    # seed 002's DartsLayerChoice and DartsTrainer, as written (after imports; the "..." filled in)
    class DartsLayerChoice(nn.Module):
        def __init__(self, layer_choice):
            super(DartsLayerChoice, self).__init__()
            self.name = layer_choice.key
            self.op_choices = nn.ModuleDict(layer_choice.named_children())
            self.alpha = nn.Parameter(torch.randn(len(self.op_choices)) * 1e-3)

        def forward(self, *args, **kwargs):
            op_results = torch.stack([op(*args, **kwargs) for op in self.op_choices.values()])
            alpha_shape = [-1] + [1] * (len(op_results.size()) - 1)
            return torch.sum(op_results * F.softmax(self.alpha, -1).view(*alpha_shape), 0)

    def select_best_of_module(module):
        return list(module.op_choices)[int(torch.argmax(module.alpha))]

    class BaseOneShotTrainer:
        pass

    class SketchTrainer(BaseOneShotTrainer):

        def __init__(self, model, loss, metrics, optimizer):
            self.model = model
            self.loss = loss
            self.metrics = metrics
            self.num_epochs = 10

            self.nas_modules = []
            replace_layer_choice(self.model, DartsLayerChoice, self.nas_modules)

            self.train_loader, self.valid_loader = toy_data(0, n=128), toy_data(1, n=128)  # "..."
            self.model_optim = optimizer
            self.ctrl_optim = torch.optim.Adam([m.alpha for _, m in self.nas_modules], 0.1, betas=(0.5, 0.999),
                                               weight_decay=1e-3)

        def train_architecture(self, x, y):
            self.ctrl_optim.zero_grad()
            self.loss(self.model(x), y).backward()
            self.ctrl_optim.step()

        def train_model_weight(self, x, y):
            self.model_optim.zero_grad()
            self.loss(self.model(x), y).backward()
            self.model_optim.step()

        def fit(self):
            for i in range(self.num_epochs):
                for (trn_X, trn_y), (val_X, val_y) in zip(self.train_loader, self.valid_loader):
                    self.train_architecture(val_X, val_y)
                    self.train_model_weight(trn_X, trn_y)

        @torch.no_grad()
        def export(self):
            result = dict()
            for name, module in self.nas_modules:
                if name not in result:
                    result[name] = select_best_of_module(module)
            return result

    torch.manual_seed(0)
    sketch_model = toy_space()
    sketch = SketchTrainer(sketch_model, F.mse_loss, None, torch.optim.SGD(sketch_model.parameters(), lr=0.05))
    sketch.fit()
    torch.manual_seed(0)
    model = toy_space()
    search = DartsTrainer(model, mse_of(model), torch.optim.SGD(model.parameters(), lr=0.05), arch_lr=0.1)
    search.fit(toy_data(0, n=128), toy_data(1, n=128), epochs=10)
    same_state(model, sketch_model)  # the same keys too: op_choices.<option>, alpha
    assert search.export() == sketch.export()


# ---------------------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(RuntimeError, match=r"LayerChoice 'act' has no chosen candidate"):
        toy_space()(torch.ones(1, 2))
    with pytest.raises(RuntimeError, match=r"One-shot trainers cannot use ValueChoice; use a LayerChoice"):
        nn.Linear(2, ValueChoice([2, 4], label="width"))
    plain = nn.Linear(2, 2)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"space has no LayerChoice or InputChoice.*Received: space of type Linear"):
        DartsTrainer(plain, lambda b: b, plain_opt)
    with pytest.raises(TypeError, match=r"space must be the model.*Received: space=<function toy_space.*Build the model"):
        DartsTrainer(toy_space, lambda b: b, plain_opt)
    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    search = DartsTrainer(model, mse_of(model), opt)
    with pytest.raises(ValueError, match=r"valid_data is required.*Received: valid_data=None"):
        search.fit(toy_data(0), epochs=1)
    # a space searched before keeps its alphas: an optimizer made on it afterwards holds them
    again = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer of step 'weights' holds the architecture weights of \['act'\]"):
        DartsTrainer(model, mse_of(model), again)
    weights_only = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith("alpha")], lr=0.1)
    assert DartsTrainer(model, mse_of(model), weights_only).arch_parameters()["act"] is search.arch_parameters()["act"]
    unequal = nn.Sequential(LayerChoice([nn.ReLU(), nn.Tanh()], label="a"),
                            LayerChoice([nn.ReLU(), nn.Tanh(), nn.Identity()], label="a"))
    with pytest.raises(ValueError, match=r"sharing label 'a' must offer the same options: one has 2, another 3"):
        DartsTrainer(unequal, lambda b: b, plain_opt)
    twice = nn.Sequential(*(DartsLayerChoice(LayerChoice([nn.ReLU(), nn.Tanh()], label="b")) for _ in range(2)))
    with pytest.raises(ValueError, match=r"two architectures for label 'b'.*Received: label='b' twice"):
        DartsTrainer(twice, lambda b: b, plain_opt)
    with pytest.raises(ValueError, match=r"reduction='concat' cannot express. Received: reduction='concat'"):
        DartsTrainer(nn.ModuleList([InputChoice(2, reduction="concat", label="c")]), lambda b: b, plain_opt)
    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, message in [
        ({"gumbel": (1.0,)}, r"gumbel must be None or a pair \(tau_start, tau_end\).*Received: gumbel=\(1.0,\)"),
        ({"arch_lr": 0}, r"arch_lr must be a positive number. Received: arch_lr=0"),
        ({"arch_betas": (0.5, 1.0)}, r"arch_betas must be a pair of numbers in \[0, 1\).*Received: arch_betas="),
        ({"arch_weight_decay": -1}, r"arch_weight_decay must be a number >= 0. Received: arch_weight_decay=-1"),
        ({"warmup_epochs": 1.5}, r"warmup_epochs must be an int >= 0.*Received: warmup_epochs=1.5"),
        ({"unrolled": "yes"}, r"unrolled must be True or False. Received: unrolled='yes'"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            DartsTrainer(model, mse_of(model), opt, **kwargs)
    with pytest.raises(TypeError, match=r"DartsTrainer: loss must be a function of the batch. Received: loss=1"):
        DartsTrainer(model, 1, opt)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer.*Received: optimizer=\[\]"):
        DartsTrainer(model, mse_of(model), [])
    step = Step(mse_of(model), opt)
    with pytest.raises(ValueError, match=r"cannot run under precision='16-mixed'. Received: unrolled=True"):
        DartsTrainer(model, mse_of(model), opt, unrolled=True, precision="16-mixed")
    with pytest.raises(TypeError, match=r"darts_flow: steps must be a Step, a non-empty list.*Received: steps=\[\]"):
        darts_flow([], model)
    with pytest.raises(ValueError, match=r"gumbel anneals the temperature.*Received: gumbel=\(2.0, 1.0\), epochs=None"):
        darts_flow(step, model, gumbel=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"valid must be the name of the validation stream.*Received: valid='train'"):
        darts_flow(step, model, valid="train")
    with pytest.raises(TypeError, match=r"loss must be a function of the batch or None. Received: loss=2"):
        darts_flow(step, model, loss=2)
    with pytest.raises(ValueError, match=r"first step reuses the architecture step's training batch.*accumulate=2"):
        darts_flow(Step(mse_of(model), opt, accumulate=2), model)
    custom_model = toy_space()
    custom_opt = torch.optim.SGD(custom_model.parameters(), lr=0.1)

    def update(batch, ctx):
        ctx.minimize(mse_of(custom_model)(batch), custom_opt)

    with pytest.raises(ValueError, match=r"'update', is a custom step with no loss.*Received: loss=None"):
        darts_flow(Step.custom(update, custom_opt), custom_model)
    other = nn.Linear(2, 1)
    fresh = toy_space()
    both = torch.optim.SGD([*fresh.parameters(), *other.parameters()], lr=0.1)
    two = [torch.optim.SGD(fresh.parameters(), lr=0.1), torch.optim.SGD(other.parameters(), lr=0.1)]
    with pytest.raises(ValueError, match=r"no step trains the weights of the space.*Received: steps \['l2'\]"):
        darts_flow(Step(lambda b: other(b).pow(2).mean(), torch.optim.SGD(other.parameters(), lr=0.1), name="l2"),
                   model)
    with pytest.raises(ValueError, match=r"unrolled=True evaluates the virtual weights inside the space.*2 parameter"):
        darts_flow(Step(mse_of(fresh), both), fresh, unrolled=True)
    with pytest.raises(ValueError, match=r"unrolled=True takes its virtual step with the optimizer of step 'mse'.*has 2"):
        darts_flow(Step(mse_of(fresh), two, name="mse"), fresh, unrolled=True)


def test_describe_shows_both_steps():
    model = toy_space()
    search = DartsTrainer(model, mse_of(model), torch.optim.SGD(model.parameters(), lr=0.1))
    table = search.trainer.describe()
    assert "arch" in table and "weights" in table and "Adam" in table and "SGD" in table


def test_darts_flow_keeps_a_flows_restart():
    from trainflow import Flow

    model = toy_space()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    flow = darts_flow(Flow([Step(mse_of(model), opt, name="fit")], restart="epoch"), model)
    assert flow.restart == "epoch" and [(s.name, s.batch) for s in flow.steps] == [("arch", "next"), ("fit", "same")]
