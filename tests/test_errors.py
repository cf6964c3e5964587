"""Every error for bad input: raised when the object is built, naming the argument and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, regression_loader
from torch import nn

from trainflow import Average, Schedule, Step, Trainer
from trainflow.callbacks import CSVLogger


@pytest.fixture
def model():
    return mlp()


@pytest.fixture
def opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def mse(model):
    return lambda b: F.mse_loss(model(b[0]), b[1])


# ---------------------------------------------------------------- Step


def test_repeat_zero(opt):
    with pytest.raises(ValueError, match=r"`repeat` must be >= 1\. Received: repeat=0\. Use repeat=1"):
        Step(lambda b: b, opt, repeat=0)


def test_repeat_not_int(opt):
    with pytest.raises(TypeError, match=r"`repeat` must be an int\. Received: repeat=1\.5"):
        Step(lambda b: b, opt, repeat=1.5)


def test_unknown_batch_mode(opt):
    with pytest.raises(ValueError, match=r"`batch` must be one of \('next', 'same'\)\. Received: batch='fresh'"):
        Step(lambda b: b, opt, batch="fresh")


def test_same_optimizer_twice(opt):
    with pytest.raises(ValueError, match=r"same optimizer is passed twice \(optimizer\[1\], a SGD\).*Pass each optimizer once"):
        Step(lambda b: b, [opt, opt])


def test_optimizer_not_an_optimizer(model):
    with pytest.raises(TypeError, match=r"Received: optimizer\[0\] of type Linear\. Build one first"):
        Step(lambda b: b, nn.Linear(2, 2))


def test_empty_optimizer_list():
    with pytest.raises(ValueError, match=r"Received: optimizer=\[\]"):
        Step(lambda b: b, [])


def test_loss_not_callable(opt):
    with pytest.raises(TypeError, match=r"`loss` must be a function of the batch\. Received: loss=3"):
        Step(3, opt)


def test_accumulate_and_microbatch_zero(opt):
    with pytest.raises(ValueError, match=r"Received: accumulate=0"):
        Step(lambda b: b, opt, accumulate=0)
    with pytest.raises(ValueError, match=r"Received: microbatch_size=0\. Use None to keep batches whole"):
        Step(lambda b: b, opt, microbatch_size=0)


def test_bad_name_and_clip(opt):
    with pytest.raises(ValueError, match=r"`name` must be a non-empty string without '/'\. Received: name='a/b'"):
        Step(lambda b: b, opt, name="a/b")
    with pytest.raises(ValueError, match=r"Received: clip_grad_norm=-1"):
        Step(lambda b: b, opt, clip_grad_norm=-1)


def test_scheduler_without_step(opt):
    with pytest.raises(TypeError, match=r"Received: scheduler\[0\] of type int\. Build one on this step's optimizer"):
        Step(lambda b: b, opt, scheduler=5)


# ---------------------------------------------------------------- Trainer


def test_optimizer_owning_no_model_parameter(model):
    stranger = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"step 'fit': optimizer\[0\] \(SGD\) owns no parameter of the given models.*Pass the model it optimizes"):
        Trainer(model, [Step(lambda b: b, stranger, name="fit")])


def test_batch_same_on_first_step(model, opt):
    with pytest.raises(ValueError, match=r"first step 'G' has batch='same'.*Use batch='next' on the first step"):
        Trainer(model, [Step(lambda b: b, opt, name="G", batch="same")])


def test_batch_same_from_another_stream(model, opt):
    steps = [Step(lambda b: b, opt, name="a"), Step(lambda b: b, opt, name="b", batch="same", data="valid")]
    with pytest.raises(ValueError, match=r"step 'b' has batch='same' and data='valid'.*draw from \(some of\) the same streams"):
        Trainer(model, steps)


def test_duplicate_step_names(model, opt):
    with pytest.raises(ValueError, match=r"steps 0 and 1 are both named 'x'"):
        Trainer(model, [Step(lambda b: b, opt, name="x"), Step(lambda b: b, opt, name="x")])


def test_models_wrong_type(opt):
    with pytest.raises(TypeError, match=r"`models` must be an nn.Module or a non-empty dict.*Received: models of type list"):
        Trainer([nn.Linear(2, 2)], [Step(lambda b: b, opt)])


def test_steps_wrong_type(model):
    with pytest.raises(TypeError, match=r"`steps\[0\]` must be a trainflow.Step\. "
                                        r"Received: steps\[0\] of type function\. Wrap"):
        Trainer(model, [lambda b: b])


def test_bad_device_precision_metrics(model, opt):
    with pytest.raises(ValueError, match=r"Received: device='gpu0'"):
        Trainer(model, [Step(lambda b: b, opt)], device="gpu0")
    with pytest.raises(ValueError, match=r"`precision` must be one of .*Received: precision='fp8'"):
        Trainer(model, [Step(lambda b: b, opt)], precision="fp8")
    with pytest.raises(ValueError, match=r"precision='16-mixed' needs a CUDA device.*Use precision='bf16-mixed' on CPU"):
        Trainer(model, [Step(lambda b: b, opt)], precision="16-mixed", device="cpu")
    with pytest.raises(ValueError, match=r"must start with 'train/' or 'val/'\. Received: 'acc'\. Use e\.g\. 'train/acc'"):
        Trainer(model, [Step(lambda b: b, opt)], metrics={"acc": object()})
    with pytest.raises(TypeError, match=r"metric 'val/acc' must have update/compute/reset.*"
                                        r"Received: metrics\['val/acc'\] of type object, which lacks update, compute, reset\."):
        Trainer(model, [Step(lambda b: b, opt)], metrics={"val/acc": object()})


def test_callback_typo_and_signature(model, opt):
    class Typo:
        def on_epoch_ends(self, trainer, logs):
            pass

    class WrongArgs:
        def on_update_end(self, trainer):
            pass

    with pytest.raises(ValueError, match=r"method 'on_epoch_ends', which is not an event"):
        Trainer(model, [Step(lambda b: b, opt)], callbacks=[Typo()])
    with pytest.raises(TypeError, match=r"WrongArgs.on_update_end must accept 3 positional.*def on_update_end\(self, trainer, step, losses\)"):
        Trainer(model, [Step(lambda b: b, opt)], callbacks=[WrongArgs()])
    with pytest.raises(TypeError, match=r"Wrap a single callback in a list"):
        Trainer(model, [Step(lambda b: b, opt)], callbacks=Typo())


# ---------------------------------------------------------------- inputs that once got no clear error


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_clip_grad_norm_must_be_positive_and_finite(opt, bad):
    # `nan <= 0` is False: a NaN bound was accepted, and clipping by it turned every gradient into NaN
    with pytest.raises(ValueError) as info:
        Step(lambda b: b, opt, clip_grad_norm=bad)
    assert str(info.value) == (
        f"Step: `clip_grad_norm` must be a positive, finite number or None. Received: clip_grad_norm={bad!r}. "
        "Use e.g. clip_grad_norm=1.0, or None not to clip."
    )
    with pytest.raises(ValueError, match=rf"Received: clip_grad_norm={bad!r}\."):
        Step.custom(lambda b, ctx: None, opt, clip_grad_norm=bad)


def test_a_loss_of_two_arguments_is_refused_when_the_step_is_built(opt):
    def loss(x, y):
        return F.mse_loss(x, y)

    with pytest.raises(TypeError) as info:
        Step(loss, opt)
    assert str(info.value) == (
        "Step: `loss` must accept one argument (batch). Received: a function with signature (x, y). Define it as "
        "`def loss(batch): ...`; a function of (batch, ctx) that steps its optimizers itself is a "
        "Step.custom(update, optimizer)."
    )
    Step(lambda batch, weight=1.0: batch, opt)  # extra arguments with defaults are fine


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_loss_that_does_not_require_grad_names_the_step(model, opt, accumulate):
    def detached(batch):
        return F.mse_loss(model(batch[0]), batch[1]).detach()

    trainer = Trainer(model, [Step(detached, opt, name="fit", accumulate=accumulate)], device="cpu")
    with pytest.raises(ValueError) as info:
        trainer.fit(regression_loader(), epochs=1)
    assert str(info.value) == (
        "Step 'fit': the loss does not require grad, so it has nothing to differentiate. Received: a loss tensor "
        "with requires_grad=False (computed under torch.no_grad() or inference_mode, from .detach()ed or .item() "
        "values, or from frozen parameters only). Return a loss computed from the models' outputs, outside "
        "torch.no_grad()."
    )


def _gan():
    torch.manual_seed(0)
    gen, disc = nn.Linear(2, 4), nn.Linear(4, 1)
    return gen, disc, torch.optim.SGD(gen.parameters(), lr=0.1), torch.optim.SGD(disc.parameters(), lr=0.1)


UNREACHED = (
    "Step 'G': its loss reaches none of the parameters of its optimizers: after backward every one of them still "
    "has grad None, so the update would change nothing. Received: a loss that depends only on other parameters "
    "(e.g. a generator step on fake.detach(), or the wrong model's output). Compute it from this step's "
    "parameters (no .detach() on their path), or give the step the optimizer of the parameters its loss depends on."
)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_step_whose_loss_reaches_none_of_its_parameters(accumulate):
    gen, disc, g_opt, d_opt = _gan()

    def d_loss(batch):
        return F.softplus(disc(gen(batch[0]).detach())).mean()

    def g_loss(batch):  # the mistake: the fake is detached, so G gets no gradient
        return F.softplus(-disc(gen(batch[0]).detach())).mean()

    g_before = [p.detach().clone() for p in gen.parameters()]
    steps = [Step(d_loss, d_opt, name="D"), Step(g_loss, g_opt, name="G", accumulate=accumulate)]
    trainer = Trainer({"G": gen, "D": disc}, steps, device="cpu")
    with pytest.raises(ValueError) as info:
        trainer.fit([(torch.randn(3, 2),)] * 4, epochs=1)
    assert str(info.value) == UNREACHED
    assert trainer.updates == 1 and all(torch.equal(a, b) for a, b in zip(g_before, gen.parameters()))


def test_a_custom_step_whose_loss_reaches_none_of_the_optimizer_it_names():
    gen, disc, g_opt, d_opt = _gan()

    def update(batch, ctx):
        ctx.minimize(F.softplus(-disc(gen(batch[0]).detach())).mean(), g_opt)

    trainer = Trainer({"G": gen, "D": disc}, [Step.custom(update, [g_opt, d_opt], name="G")], device="cpu")
    with pytest.raises(ValueError) as info:
        trainer.fit([(torch.randn(3, 2),)], epochs=1)
    assert str(info.value) == UNREACHED

    def no_grad(batch, ctx):
        with torch.no_grad():
            ctx.minimize(F.softplus(-disc(gen(batch[0]))).mean(), g_opt)

    trainer = Trainer({"G": gen, "D": disc}, [Step.custom(no_grad, [g_opt, d_opt], name="G")], device="cpu")
    with pytest.raises(ValueError, match=r"^Step 'G': the loss does not require grad, so it has nothing to "
                                         r"differentiate\. Received: a loss tensor with requires_grad=False"):
        trainer.fit([(torch.randn(3, 2),)], epochs=1)


def test_reduce_lr_on_plateau_is_refused_as_a_step_scheduler(opt):
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    message = (
        "Step: `scheduler` cannot be a ReduceLROnPlateau: a step's schedulers are stepped after each update (or "
        "epoch) with no argument, and ReduceLROnPlateau.step needs the monitored value. Received: scheduler[0] of "
        "type ReduceLROnPlateau. Step it from a callback that sees the value, e.g. `def on_epoch_end(self, trainer, "
        "logs): plateau.step(logs['val/loss'])` (give that callback state_dict/load_state_dict returning "
        "plateau's, so a resume restores it), or pass a schedule of the update count."
    )
    for given in (plateau, [plateau], Schedule(plateau, interval="epoch")):
        with pytest.raises(TypeError) as info:
            Step(lambda b: b, opt, scheduler=given)
        assert str(info.value) == message


def test_a_raw_tensor_as_data(model, opt):
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], device="cpu")
    with pytest.raises(TypeError) as info:
        trainer.fit(torch.randn(10, 4), epochs=1)
    assert str(info.value) == (
        "fit: data stream 'train' is a tensor, which iterates row by row: each row would be one batch. Received: "
        "a Tensor of shape (10, 4). Wrap it in a DataLoader, e.g. DataLoader(TensorDataset(x, y), batch_size=32), "
        "or pass a list of batches."
    )
    with pytest.raises(TypeError, match=r"^fit: data stream 'valid' is a tensor"):
        trainer.fit({"train": regression_loader(), "valid": torch.ones(3)}, epochs=1)


def test_a_cuda_device_the_machine_lacks(model, opt):
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"cuda:{count}"  # one past the last device: none on a CPU machine
    have = "no CUDA device is available" if count == 0 else f"only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
    with pytest.raises(ValueError) as info:
        Trainer(model, [Step(mse(model), opt)], device=device)
    assert str(info.value) == (
        f"Trainer: `device` names a CUDA device this machine does not have: {have}. Received: device={device!r}. "
        "Use device='auto' (CUDA when available, else the CPU), 'cpu', or an index below torch.cuda.device_count()."
    )
    if count == 0:
        with pytest.raises(ValueError, match=r"no CUDA device is available\. Received: device='cuda'\."):
            Trainer(model, [Step(mse(model), opt)], device="cuda")


def test_a_callback_class_instead_of_an_instance(model, opt):
    with pytest.raises(TypeError) as info:
        Trainer(model, [Step(mse(model), opt)], callbacks=[CSVLogger])
    assert str(info.value) == (
        "Trainer: a callback must be an object, not a class. Received: the class CSVLogger. "
        "Pass an instance: CSVLogger(...)."
    )


# ---------------------------------------------------------------- fit


def test_fit_without_limits(model, opt):
    trainer = Trainer(model, [Step(mse(model), opt)], device="cpu")
    with pytest.raises(ValueError, match=r"give `epochs` or `max_updates`.*Received: epochs=None, max_updates=None"):
        trainer.fit(regression_loader())


def test_fit_unknown_stream(model, opt):
    steps = [Step(mse(model), opt, name="w"), Step(mse(model), opt, name="a", data="valdi")]
    trainer = Trainer(model, steps, device="cpu")
    with pytest.raises(ValueError, match=r"step 'a' draws from data stream 'valdi', which `data` does not have\. Received: streams \['train', 'valid'\]"):
        trainer.fit({"train": regression_loader(), "valid": regression_loader()}, epochs=1)
    assert trainer.updates == 0  # raised before any update


def test_fit_data_that_is_no_iterable_names_the_stream_and_type(model, opt):
    trainer = Trainer(model, [Step(mse(model), opt)], device="cpu")
    with pytest.raises(TypeError, match=r"data stream 'train' must be an iterable of batches.*"
                                        r"Received: stream 'train' of type int\. Wrap tensors"):
        trainer.fit(5, epochs=1)
    with pytest.raises(TypeError, match=r"Received: stream 'valid' of type str\."):
        trainer.fit({"train": regression_loader(), "valid": "valid.csv"}, epochs=1)


def test_fit_iterator_and_missing_train_stream(model, opt):
    trainer = Trainer(model, [Step(mse(model), opt)], device="cpu")
    with pytest.raises(TypeError, match=r"is an iterator, which can be read only once"):
        trainer.fit(iter(regression_loader()), epochs=1)
    with pytest.raises(ValueError, match=r"must have a 'train' stream"):
        trainer.fit({"main": regression_loader()}, epochs=1)


def test_fit_val_data_without_val_step(model, opt):
    trainer = Trainer(model, [Step(mse(model), opt)], device="cpu")
    with pytest.raises(ValueError, match=r"`val_data` and `val_step` go together. "
                                         r"Received: val_data of type DataLoader, val_step=None\. Pass both"):
        trainer.fit(regression_loader(), epochs=1, val_data=regression_loader())
    with pytest.raises(ValueError, match=r"Received: val_data=None, val_step=<function"):
        trainer.fit(regression_loader(), epochs=1, val_step=lambda batch: None)


# ---------------------------------------------------------------- loss values (known only when the loss runs)


@pytest.mark.parametrize(
    ("value", "error", "pattern"),
    [
        (torch.ones(3), ValueError, r"Step 'fit': loss 'loss' must be a scalar \(0-dim or one-element\) tensor.*shape \(3,\).*loss.mean\(\)"),
        ("0.5", TypeError, r"Step 'fit': loss 'loss' must be a scalar tensor.*Received: loss='0.5' of type str"),
        ({"mse": 1.0}, TypeError, r"Step 'fit': loss 'mse' must be a scalar tensor.*Received: mse=1.0 of type float"),
        ({}, ValueError, r"Step 'fit': the loss function returned an empty dict"),
        (Average(torch.ones(2), 2), ValueError, r"loss 'loss.total' must be a scalar"),
    ],
)
def test_bad_loss_values(model, opt, value, error, pattern):
    trainer = Trainer(model, [Step(lambda b: value, opt, name="fit")], device="cpu")
    with pytest.raises(error, match=pattern):
        trainer.fit(regression_loader(), epochs=1)


def test_nonfinite_loss_raises_with_step_and_update(model, opt):
    calls = []

    def loss(batch):
        calls.append(1)
        value = F.mse_loss(model(batch[0]), batch[1])
        return value * float("nan") if len(calls) == 3 else value

    trainer = Trainer(model, [Step(loss, opt, name="fit")], device="cpu")
    with pytest.raises(FloatingPointError, match=r"Step 'fit': loss 'loss' is nan at update 3"):
        trainer.fit(regression_loader(), epochs=1)


def test_all_parameters_frozen(model, opt):
    for p in model.parameters():
        p.requires_grad_(False)
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], device="cpu")
    with pytest.raises(ValueError, match=r"Step 'fit': every parameter of its optimizers is frozen"):
        trainer.fit(regression_loader(), epochs=1)


def test_microbatch_without_tensors(model, opt):
    data = [[{"text": "a"}, {"text": "b"}]]
    trainer = Trainer(model, [Step(lambda b: torch.zeros((), requires_grad=True), opt, name="fit", microbatch_size=1)],
                      device="cpu")
    with pytest.raises(ValueError, match=r"Step 'fit': cannot infer how many samples the batch holds.*trainflow.Average"):
        trainer.fit(data, epochs=1)


def test_a_step_may_not_log_under_the_validation_namespace(opt):
    with pytest.raises(ValueError, match=r"^Step: the name 'val' is reserved: 'val/\.\.\.' are the log keys of "
                                         r"validation, which the step's 'val/<loss>' epoch means would overwrite or "
                                         r"be overwritten by\. Received: name='val'\. Pass another name=, e\.g\. "
                                         r"name='fit'\.$"):
        Step(lambda b: b, opt, name="val")
    with pytest.raises(ValueError, match=r"reserved.*Received: name='val'\."):
        Step.custom(lambda b, ctx: None, opt, name="val")


def test_a_loss_function_named_val_needs_a_step_name(opt):
    def val(batch):
        return batch

    with pytest.raises(ValueError, match=r"the name 'val' is reserved.*Received: name=None, so the function's name "
                                         r"'val'\. Pass another name="):
        Step(val, opt)
    with pytest.raises(ValueError, match=r"the name 'val' is reserved.*Received: name=None, so the function's name"):
        Step.custom(_custom_named_val(), opt)
    assert Step(val, opt, name="check").name == "check"


def _custom_named_val():
    def val(batch, ctx):
        ctx.step()

    return val


def test_the_same_step_twice_in_a_flow(model, opt):
    step = Step(lambda b: b, opt)
    with pytest.raises(ValueError, match=r"^Trainer: steps 0 and 1 are the same Step object\. Received: "
                                         r"Step\(None, \[SGD\]\) twice\. For more updates of it per cycle use "
                                         r"Step\(\.\.\., repeat=n\)"):
        Trainer(model, [step, step])
