"""Trainer(compile=True): the whole update of a declarative step compiled, and where it runs eagerly.

Compiling with inductor takes 20-60 s on a small CPU the first time; every test here compiles the
same small model and Adam, so the later ones load inductor's cached kernels (about 2-5 s each).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_changed
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer
from trainflow.compiled import CompiledUpdate


def _run(compile: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)),
                      batch_size=8, shuffle=True)
    trainer = Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit"), compile=compile,
                      device="cpu")
    torch.manual_seed(2)
    trainer.fit(data, epochs=2)
    return model, trainer


def test_compiled_whole_update_matches_eager_to_float32_rounding():
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, _ = _run(compile=False)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning: the whole update compiled
        compiled, trainer = _run(compile=True)
    runner = trainer._runners[trainer.flow.steps[0]]
    assert runner.compiled.eager_reason is None and len(runner.compiled.opt_steps) == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the loss (forward+backward), Adam's step
    assert trainer.updates == 8 and torch.isfinite(trainer.losses["fit/loss"])
    assert_changed(before, compiled)
    for a, b in zip(eager.parameters(), compiled.parameters()):  # 8 Adam updates: fused kernels reassociate
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_custom_step_runs_eagerly_with_a_warning():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def update(batch, ctx):
        ctx.step(model(batch).mean())

    with pytest.warns(UserWarning, match=r"step 'mine' is a custom step \(Step.custom\), whose update is Python "
                                         r"that may branch on values, so its update runs eagerly; only the models"):
        trainer = Trainer(model, Step.custom(update, opt, name="mine"), compile=True, device="cpu")
    assert trainer._runners[trainer.flow.steps[0]].compiled is None


def test_a_step_whose_batches_change_shape_falls_back_to_eager_with_a_warning():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(lambda b: model(b).pow(2).mean(), opt, name="fit")
    compiled = CompiledUpdate(step, torch.device("cpu"), max_shapes=0)
    batch = torch.randn(5, 3)
    with pytest.warns(UserWarning, match=r"step 'fit': its update runs eagerly from here on: its batches come in "
                                         r"more than 0 shapes"):
        value = compiled.loss(batch)
    assert torch.equal(value, model(batch).pow(2).mean()) and compiled.eager_reason is not None


def test_a_scheduled_step_keeps_its_optimizer_step_eager_with_a_warning():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(lambda b: model(b).mean(), opt, name="fit", scheduler=torch.optim.lr_scheduler.StepLR(opt, 2))
    with pytest.warns(UserWarning, match=r"step 'fit': its optimizer step runs eagerly: it has a learning-rate "
                                         r"schedule \(a changing float learning rate recompiles the step\)"):
        compiled = CompiledUpdate(step, torch.device("cpu"))
    assert compiled.opt_steps == {}


def _graphs() -> int:
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_each_trainer_compiles_its_own_optimizer_step_past_dynamos_recompile_limit():
    # every Adam steps through the same code: without a region per step, each new optimizer is a
    # recompile of it, and past torch._dynamo.config.recompile_limit (8; 1 here, to need 3
    # trainers instead of 9) dynamo would run the later trainers' steps eagerly, saying nothing
    import torch._dynamo

    eager, _ = _run(compile=False)
    with torch._dynamo.config.patch(recompile_limit=1), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # neither a fallback nor a limit warning
        for _ in range(3):
            before = _graphs()
            compiled, trainer = _run(compile=True)
            assert _graphs() - before == 2  # this trainer's own loss graph and its own Adam step
            assert trainer._runners[trainer.flow.steps[0]].compiled.eager_reason is None
            for a, b in zip(eager.parameters(), compiled.parameters()):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def _run_uneven(compile: bool):
    """36 samples in batches of 8: each epoch ends with a batch of 4."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(36, 4, generator=g), torch.randn(36, 1, generator=g)),
                      batch_size=8, shuffle=True)
    trainer = Trainer(model, Step(lambda b: F.mse_loss(model(b[0]), b[1]), opt, name="fit"), compile=compile,
                      device="cpu")
    torch.manual_seed(2)
    trainer.fit(data, epochs=2)
    return model, trainer


def test_a_shorter_last_batch_compiles_one_dynamic_graph_and_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()  # dynamo keeps the sizes it has seen per code object: start from none
    eager, _ = _run_uneven(compile=False)
    before = _graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        compiled, trainer = _run_uneven(compile=True)
    runner = trainer._runners[trainer.flow.steps[0]]
    assert runner.compiled.shapes == {(8, 4), (4, 4)} and runner.compiled.eager_reason is None
    # the loss for batches of 8, one with a dynamic batch size made at the batch of 4, Adam's step
    assert _graphs() - before == 3 and trainer.updates == 10
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_dynamo_giving_up_on_a_recompile_is_a_warning_not_silence():
    import torch._dynamo

    torch._dynamo.reset()  # forget the batch sizes seen by the loss above (dynamo keeps them per code object)
    eager, _ = _run_uneven(compile=False)
    # a recompile limit of 1: the batch of 4 would need the loss's second graph, which dynamo refuses
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(
        UserWarning, match=r"step 'fit': torch.compile stopped recompiling its loss \(torch._dynamo hit "
                           r"config.recompile_limit \(1\) for '<lambda>' .*\): calls that its compiled graphs do "
                           r"not fit run eagerly from here on\. .*raise it \(e.g. "
                           r"torch._dynamo.config.recompile_limit = 64.* or call torch._dynamo.reset\(\)") as caught:
        compiled, trainer = _run_uneven(compile=True)
    assert sum("stopped recompiling" in str(w.message) for w in caught) == 1  # once, not at every batch of 4
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


class _Scaled(torch.nn.Module):
    """A model whose forward holds a constant of its own: each instance is a recompile of the same code."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.linear, self.k = torch.nn.Linear(2, 2), k

    def forward(self, x):
        return self.linear(x).relu() * self.k


def test_each_trainers_compiled_model_compiles_past_dynamos_recompile_limit():
    # a model called outside the steps' losses (a callback, validation) runs its own compiled
    # forward; without a region per model, the second and third instances here would be
    # recompiles past the limit (1 here, 8 by default) and run eagerly, saying nothing
    import torch._dynamo

    x = torch.randn(3, 2)
    with torch._dynamo.config.patch(recompile_limit=1):
        for k in (1.0, 2.0, 3.0):
            model = _Scaled(k)
            Trainer(model, Step(lambda b, model=model: model(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1)),
                    compile=True, device="cpu")
            before = _graphs()
            out = model(x)
            assert _graphs() - before == 1  # its own graph
            torch.testing.assert_close(out, model._call_impl(x))
