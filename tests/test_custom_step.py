"""``Step.custom``: a function that performs its own updates, under the trainer's rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_changed, assert_same_weights
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from trainflow import Step, Trainer, add_loss

LATENT = 3


def gan(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    generator = nn.Sequential(nn.Linear(LATENT, 8), nn.LeakyReLU(0.2), nn.Linear(8, 6), nn.Sigmoid())
    discriminator = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=0.0003)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=0.0004)
    return generator, discriminator, d_optimizer, g_optimizer


def real_images(n: int = 30, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    return DataLoader(TensorDataset(torch.rand(n, 6, generator=g)), batch_size=batch_size, shuffle=True)


loss_fn = F.binary_cross_entropy_with_logits


def keras_train_step(generator, discriminator, d_optimizer, g_optimizer):
    """Seed 004's ``train_step``, line by line: ``tape.gradient`` + ``apply_gradients`` -> ``ctx.minimize``."""

    def train_step(batch, ctx):
        real_images = batch[0]
        batch_size = len(real_images)
        # Sample random points in the latent space
        random_latent_vectors = torch.randn(batch_size, LATENT)
        # Decode them to fake images
        generated_images = generator(random_latent_vectors)
        # Combine them with real images
        combined_images = torch.cat([generated_images, real_images])
        # Assemble labels discriminating real from fake images
        labels = torch.cat([torch.ones(batch_size, 1), torch.zeros(len(real_images), 1)])
        # Add random noise to the labels - important trick!
        labels += 0.05 * torch.rand(labels.shape)
        # Train the discriminator
        predictions = discriminator(combined_images)
        d_loss = loss_fn(predictions, labels)
        ctx.minimize(d_loss, d_optimizer)
        # Sample random points in the latent space
        random_latent_vectors = torch.randn(batch_size, LATENT)
        # Assemble labels that say "all real images"
        misleading_labels = torch.zeros(batch_size, 1)
        # Train the generator (note that we should *not* update the weights of the discriminator)!
        predictions = discriminator(generator(random_latent_vectors))
        g_loss = loss_fn(predictions, misleading_labels)
        ctx.minimize(g_loss, g_optimizer)
        return {"d_loss": d_loss, "g_loss": g_loss}

    return train_step


def declarative_steps(generator, discriminator, d_optimizer, g_optimizer) -> list[Step]:
    def d_loss(batch):
        real_images = batch[0]
        n = len(real_images)
        combined_images = torch.cat([generator(torch.randn(n, LATENT)), real_images])
        labels = torch.cat([torch.ones(n, 1), torch.zeros(n, 1)])
        labels += 0.05 * torch.rand(labels.shape)
        return loss_fn(discriminator(combined_images), labels)

    def g_loss(batch):
        n = len(batch[0])
        return loss_fn(discriminator(generator(torch.randn(n, LATENT))), torch.zeros(n, 1))

    return [Step(d_loss, d_optimizer, name="D"), Step(g_loss, g_optimizer, name="G", batch="same")]


class Record:
    def __init__(self):
        self.calls: list[tuple[str, dict[str, torch.Tensor]]] = []

    def on_update_end(self, trainer, step, losses):
        self.calls.append((step.name, dict(losses)))


def test_keras_train_step_equals_the_declarative_flow_bit_for_bit():
    G1, D1, d1, g1 = gan()
    start = {k: v.clone() for k, v in G1.state_dict().items()}
    record_custom = Record()
    torch.manual_seed(1)
    custom = Trainer({"G": G1, "D": D1}, [Step.custom(keras_train_step(G1, D1, d1, g1), [d1, g1], name="gan")],
                     callbacks=[record_custom], device="cpu")
    custom.fit(real_images(), epochs=3)

    G2, D2, d2, g2 = gan()
    record_flow = Record()
    torch.manual_seed(1)
    flow = Trainer({"G": G2, "D": D2}, declarative_steps(G2, D2, d2, g2), callbacks=[record_flow], device="cpu")
    flow.fit(real_images(), epochs=3)

    assert_changed(start, G1)
    assert_same_weights(G1, G2)
    assert_same_weights(D1, D2)
    assert custom.updates == 12 and flow.updates == 24  # 4 batches a epoch: one custom update each
    d_flow = [v["D/loss"] for name, v in record_flow.calls if name == "D"]
    g_flow = [v["G/loss"] for name, v in record_flow.calls if name == "G"]
    assert torch.equal(torch.stack([v["gan/d_loss"] for _, v in record_custom.calls]), torch.stack(d_flow))
    assert torch.equal(torch.stack([v["gan/g_loss"] for _, v in record_custom.calls]), torch.stack(g_flow))
    # the optimizers' states too: each saw only its own network's gradients
    for a, b in ((d1, d2), (g1, g2)):
        for sa, sb in zip(a.state_dict()["state"].values(), b.state_dict()["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_custom_steps_get_callbacks_metrics_and_epoch_logs():
    G, D, d_opt, g_opt = gan()
    d_mean = MeanMetric()
    train_step = keras_train_step(G, D, d_opt, g_opt)

    def with_metric(batch, ctx):
        out = train_step(batch, ctx)
        d_mean.update(out["d_loss"].detach())
        return out

    record = Record()
    trainer = Trainer({"G": G, "D": D}, Step.custom(with_metric, [d_opt, g_opt], name="gan"),
                      metrics={"train/d_mean": d_mean}, callbacks=[record], device="cpu")
    trainer.fit(real_images(), epochs=1)

    assert [name for name, _ in record.calls] == ["gan"] * 4
    assert all(sorted(v) == ["gan/d_loss", "gan/g_loss"] for _, v in record.calls)
    assert all(not v.requires_grad and v.ndim == 0 for _, vs in record.calls for v in vs.values())
    d_losses = torch.stack([v["gan/d_loss"] for _, v in record.calls])
    assert set(trainer.logs) == {"gan/d_loss", "gan/g_loss", "train/d_mean"}
    assert trainer.logs["gan/d_loss"] == pytest.approx(d_losses.mean().item())
    assert trainer.logs["train/d_mean"] == pytest.approx(d_losses.mean().item())


def test_custom_step_returning_a_tensor_or_none():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def as_tensor(batch, ctx):
        loss = model(batch).pow(2).mean()
        ctx.minimize(loss, opt)
        return loss

    def as_none(batch, ctx):
        ctx.minimize(model(batch).pow(2).mean())
        return None

    record = Record()
    trainer = Trainer(model, [Step.custom(as_tensor, opt, name="t"), Step.custom(as_none, opt, name="n")],
                      callbacks=[record], device="cpu")
    trainer.fit([torch.ones(3, 2)] * 4, epochs=1)
    assert [(name, sorted(v)) for name, v in record.calls] == [("t", ["t/loss"]), ("n", [])] * 2
    assert trainer.updates == 4


def test_ctx_backward_writes_only_into_the_named_optimizer():
    G, D, d_opt, g_opt = gan()
    C = nn.Linear(6, 1)  # another model in the trainer, updated by another step
    c_opt = torch.optim.SGD(C.parameters(), lr=0.1)
    seen = {}

    def update(batch, ctx):
        n = len(batch[0])
        d_loss = loss_fn(D(torch.cat([G(torch.randn(n, LATENT)), batch[0]])), torch.ones(2 * n, 1))
        ctx.minimize(d_loss, d_opt)
        seen["D"] = [p.grad.clone() for p in D.parameters()]
        seen["G_after_D"] = [p.grad for p in G.parameters()]
        g_loss = loss_fn(D(G(torch.randn(len(batch[0]), LATENT))), torch.zeros(len(batch[0]), 1))
        ctx.zero_grad(g_opt)
        ctx.backward(g_loss, g_opt)
        ctx.step(g_opt)
        return {"d": d_loss, "g": g_loss}

    trainer = Trainer({"G": G, "D": D, "C": C},
                      [Step.custom(update, [d_opt, g_opt], name="gan"),
                       Step(lambda b: C(b[0]).mean(), c_opt, name="c")],
                      device="cpu")
    trainer.fit(real_images(), max_updates=1)
    assert seen["G_after_D"] == [None] * 4  # D's update left G's gradients alone
    assert all(torch.equal(p.grad, g) for p, g in zip(D.parameters(), seen["D"]))  # and G's update D's
    assert all(p.grad is None for p in C.parameters())


# ---------------------------------------------------------------- add_loss in a custom step


class Regularized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        h = self.fc(x)
        add_loss(1e-2 * h.sum())
        return h


def test_ctx_aux_loss_matches_the_declarative_step():
    data = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def run(custom: bool) -> nn.Module:
        torch.manual_seed(0)
        model = Regularized()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def update(batch, ctx):
            loss = model(batch).pow(2).mean()
            ctx.minimize(loss + ctx.aux_loss(), opt)
            return loss

        step = Step.custom(update, opt, name="s") if custom else Step(lambda b: model(b).pow(2).mean(), opt, name="s")
        Trainer(model, step, device="cpu").fit(data, epochs=2)
        return model

    assert_same_weights(run(custom=True), run(custom=False))


def test_add_loss_in_a_custom_step_without_aux_loss_is_an_error():
    torch.manual_seed(0)
    model = Regularized()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def update(batch, ctx):
        ctx.minimize(model(batch).pow(2).mean(), opt)

    trainer = Trainer(model, Step.custom(update, opt, name="s"), device="cpu")
    with pytest.raises(ValueError, match=r"Step 's': modules called add_loss.*Add ctx\.aux_loss\(\) to the loss"):
        trainer.fit([torch.randn(5, 4)], epochs=1)


# ---------------------------------------------------------------- errors


def test_a_custom_step_that_never_steps():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def update(batch, ctx):
        ctx.zero_grad(opt)
        ctx.backward(model(batch).sum(), opt)  # ... and forgot ctx.step(opt)

    trainer = Trainer(model, Step.custom(update, opt, name="lazy"), device="cpu")
    with pytest.raises(ValueError, match=r"Step 'lazy': the custom update returned without stepping.*ctx\.minimize"):
        trainer.fit([torch.ones(3, 2)], epochs=1)
    assert trainer.updates == 0


def test_loss_backward_touching_another_models_gradients_is_reported_by_name():
    G, D, d_opt, g_opt = gan()

    def g_update(batch, ctx):
        g_loss = loss_fn(D(G(torch.randn(len(batch[0]), LATENT))), torch.zeros(len(batch[0]), 1))
        g_opt.zero_grad()
        g_loss.backward()  # writes into D's gradients too
        ctx.step(g_opt)

    trainer = Trainer({"G": G, "D": D}, Step.custom(g_update, g_opt, name="G"), device="cpu")
    message = (r"Step 'G': the custom update changed parameters outside its optimizers: D\.0\.weight \(gradient\), "
               r"D\.0\.bias \(gradient\), D\.2\.weight \(gradient\), D\.2\.bias \(gradient\)\. "
               r"Use ctx\.backward/ctx\.minimize")
    with pytest.raises(ValueError, match=message):
        trainer.fit(real_images(), epochs=1)


def test_stepping_an_optimizer_not_given_is_reported_by_name():
    G, D, d_opt, g_opt = gan()
    d_step, g_step = declarative_steps(G, D, d_opt, g_opt)

    def g_update(batch, ctx):
        ctx.minimize(g_step.loss(batch), g_opt)
        d_opt.step()  # D's gradients from its own step are still there: this moves D's weights

    flow = [d_step, Step.custom(g_update, g_opt, name="G", batch="same")]
    trainer = Trainer({"G": G, "D": D}, flow, device="cpu")
    with pytest.raises(ValueError, match=r"outside its optimizers: D\.0\.weight \(weights\), D\.0\.bias \(weights\).*"
                                         r"pass every optimizer the function steps to Step\.custom"):
        trainer.fit(real_images(), epochs=1)
    assert trainer.updates == 1


@pytest.mark.parametrize("method", ["minimize", "zero_grad", "backward", "step"])
def test_ctx_rejects_a_foreign_optimizer(method):
    G, D, d_opt, g_opt = gan()

    def update(batch, ctx):
        loss = D(batch[0]).mean()
        args = {"minimize": (loss, d_opt), "zero_grad": (d_opt,), "backward": (loss, d_opt), "step": (d_opt,)}
        getattr(ctx, method)(*args[method])

    trainer = Trainer({"G": G, "D": D}, Step.custom(update, g_opt, name="G"), device="cpu")
    message = (r"Step 'G': the optimizer passed to ctx is not one of this step's optimizers\. "
               r"Received: an optimizer of type Adam; the step has \['Adam'\]\. Give it to Step\.custom")
    with pytest.raises(ValueError, match=message):
        trainer.fit(real_images(), epochs=1)


def test_step_custom_argument_errors():
    opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"`update` must accept two arguments \(batch, ctx\)\. Received: a function "
                                        r"with signature \(batch\)"):
        Step.custom(lambda batch: None, opt)
    with pytest.raises(TypeError, match=r"`update` must be a function update\(batch, ctx\)\. Received: update=3"):
        Step.custom(3, opt)
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer"):
        Step.custom(lambda batch, ctx: None, "adam")


@pytest.mark.parametrize(
    "returned, error, message",
    [
        ([1.0, 2.0], TypeError, r"must return None, a scalar tensor or a dict of them to log\. Received: a return value of type list\. "),
        ((torch.tensor(1.0), torch.tensor(2.0)), TypeError, r"Received: a return value of type tuple\. Return e\.g\."),
        ({"d_loss": torch.ones(3)}, ValueError, r"loss 'd_loss' must be a scalar \(0-dim or one-element\) tensor"),
        ({"d_loss": 0.5}, TypeError, r"loss 'd_loss' must be a scalar tensor"),
    ],
    ids=["list", "tuple", "non-scalar", "float"],
)
def test_bad_return_types(returned, error, message):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def update(batch, ctx):
        ctx.minimize(model(batch).pow(2).mean(), opt)
        return returned

    trainer = Trainer(model, Step.custom(update, opt, name="u"), device="cpu")
    with pytest.raises(error, match=message):
        trainer.fit([torch.ones(3, 2)], epochs=1)
