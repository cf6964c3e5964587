"""GANs end to end: the WGAN-GP flow against its hand-written loop, the DCGAN and WGAN-GP
examples' artifacts, the sample quality measure, and ``SampleGrid``."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import assert_changed, assert_same_weights
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer
from trainflow.callbacks import CSVLogger, SampleGrid, samples
from trainflow.examples import EXAMPLES, dcgan, quality, wgan_gp
from trainflow.examples.quality import CLASSIFIER_FILE, SampleQuality, digits_classifier, sample_quality

LATENT = 4


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> Path:
    """The digits classifier, trained once for the module (about 3 s) and copied where needed."""
    folder = tmp_path_factory.mktemp("classifier")
    digits_classifier(folder)
    return folder / CLASSIFIER_FILE


def images_loader(n: int = 40, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(5)
    return DataLoader(TensorDataset(torch.rand(n, 1, 8, 8, generator=g)), batch_size=batch_size, shuffle=True)


# ---------------------------------------------------------------- WGAN-GP: flow == hand loop


def _small_gan(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return dcgan.build_generator(latent=LATENT, width=4), wgan_gp.build_critic(width=4)


def _adam(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))


def test_wgan_gp_flow_equals_hand_loop_bit_for_bit():
    cycles, n_critic = 20, 5
    loader = images_loader()  # 5 batches per epoch: the 100 critic batches span 20 epochs

    # by hand: NeMo's training_loop [(optimizer_D, losses_D)] * 5 + [(optimizer_G, losses_G)]
    G, D = _small_gan()
    start = {k: v.clone() for k, v in D.state_dict().items()}
    d_opt, g_opt = _adam(D), _adam(G)
    torch.manual_seed(1)
    G.train(), D.train()

    def batches():
        while True:
            yield from loader

    stream, hand_penalties = batches(), []
    for _ in range(cycles):
        for _ in range(n_critic):
            (real,) = next(stream)
            fake = G(torch.randn(len(real), LATENT)).detach()
            loss_fake, loss_real = D(fake).mean(), -D(real).mean()
            eps = torch.rand(len(real), 1, 1, 1)
            x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
            penalty = 10.0 * ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss = loss_fake + loss_real + penalty
            d_opt.zero_grad()
            loss.backward()
            d_opt.step()
            hand_penalties.append(penalty.detach())
        g_loss = -D(G(torch.randn(len(real), LATENT))).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
    hand_G, hand_D, hand_rng = G, D, torch.get_rng_state()

    # trainflow: the example's losses in a two-step flow
    G, D = _small_gan()
    d_opt, g_opt = _adam(D), _adam(G)
    penalties = []

    class Record:
        def on_update_end(self, trainer, step, losses):
            if step.name == "D":
                penalties.append(losses["D/penalty"])

    flow = [
        Step(lambda b: wgan_gp.critic_losses(D, G, b[0], latent=LATENT), d_opt, name="D", repeat=n_critic),
        Step(lambda b: -D(G(torch.randn(len(b[0]), LATENT))).mean(), g_opt, name="G", batch="same"),
    ]
    torch.manual_seed(1)
    trainer = Trainer({"G": G, "D": D}, flow, callbacks=[Record()], device="cpu")
    trainer.fit(loader, max_updates=cycles * (n_critic + 1))

    assert_changed(start, D)
    assert_same_weights(hand_D, D)
    assert_same_weights(hand_G, G)
    assert torch.equal(torch.stack(penalties), torch.stack(hand_penalties))
    assert float(torch.stack(penalties).abs().sum()) > 0  # the penalty was really in play
    assert torch.equal(hand_rng, torch.get_rng_state())
    assert trainer.updates == 120 and trainer.epoch == 19  # the 20th epoch's batches are all used, not ended


def test_gradient_penalty_is_differentiable_in_the_critic():
    torch.manual_seed(0)
    critic = wgan_gp.build_critic(width=4)
    penalty = wgan_gp.gradient_penalty(critic, torch.rand(6, 1, 8, 8), torch.rand(6, 1, 8, 8))
    grads = torch.autograd.grad(penalty, list(critic.parameters()), allow_unused=True)
    assert penalty.ndim == 0 and any(g is not None and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- the examples


def test_registered():
    assert EXAMPLES["dcgan"][1] is dcgan.run and EXAMPLES["wgan-gp"][1] is wgan_gp.run


@pytest.mark.parametrize("module", [dcgan, wgan_gp], ids=["dcgan", "wgan-gp"])
def test_example_tiny_run_writes_grid_and_quality(module, tmp_path, classifier_file, monkeypatch):
    shutil.copy(classifier_file, tmp_path / CLASSIFIER_FILE)
    monkeypatch.setattr(quality, "_train", lambda *a: pytest.fail("the cached classifier was not reused"))
    logs = module.run(tmp_path, epochs=1, progress=False)

    assert {"samples/confidence", "samples/entropy", "G/loss"} <= set(logs)
    assert all(math.isfinite(v) for v in logs.values())
    assert 0.1 <= logs["samples/confidence"] <= 1 and 0 <= logs["samples/entropy"] <= math.log(10) + 1e-9
    rows = read_rows(tmp_path / "metrics.csv")
    assert len(rows) == 1 and {"samples/confidence", "samples/entropy"} <= set(rows[0])
    assert all(math.isfinite(float(rows[0][k])) for k in logs)
    for name in ("metrics.csv", "curves.png", "weights.pt", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    grid = matplotlib.image.imread(tmp_path / "samples.png")
    assert grid.ndim == 3 and min(grid.shape[:2]) > 100 and grid.std() > 0.01  # not a blank page
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(weights) == ({"G", "D", "G_ema"} if module is dcgan else {"G", "D"})


def test_wgan_gp_logs_the_three_critic_losses(tmp_path, classifier_file):
    shutil.copy(classifier_file, tmp_path / CLASSIFIER_FILE)
    logs = wgan_gp.run(tmp_path, epochs=1, progress=False)
    assert list(logs)[:4] == ["D/fake", "D/real", "D/penalty", "G/loss"]


def test_dcgan_bad_epochs_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"`epochs` must be an int >= 1.*Received: epochs=0"):
        dcgan.run(tmp_path, epochs=0, progress=False)
    assert not any(tmp_path.iterdir())


def test_weight_average_moves_only_after_its_step():
    model, average = nn.Linear(2, 1), nn.Linear(2, 1)
    average.load_state_dict(model.state_dict())
    ema = dcgan.WeightAverage(model, average, step="G", decay=0.9)
    with torch.no_grad():
        model.bias.add_(1.0)
    before = average.bias.clone()
    ema.on_update_end(None, Step(lambda b: b, torch.optim.SGD(model.parameters(), 0.1), name="D"), {})
    assert torch.equal(average.bias, before)
    ema.on_update_end(None, Step(lambda b: b, torch.optim.SGD(model.parameters(), 0.1), name="G"), {})
    assert torch.allclose(average.bias, before + 0.1) and not average.bias.requires_grad


# ---------------------------------------------------------------- the quality measure


class ClassFromFirstPixel(nn.Module):
    """A stand-in classifier: the class is ``round(10 * first pixel)``, predicted confidently."""

    def forward(self, x):
        first = x.flatten(1)[:, :1] * 10
        return -100 * (first - torch.arange(10.0)) ** 2


def _images(classes: list[int]) -> torch.Tensor:
    x = torch.zeros(len(classes), 1, 8, 8)
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.float) / 10
    return x


def test_sample_quality_confidence_and_entropy():
    confidence, entropy = sample_quality(ClassFromFirstPixel(), _images(list(range(10)) * 10))
    assert confidence == pytest.approx(1.0) and entropy == pytest.approx(math.log(10))
    confidence, entropy = sample_quality(ClassFromFirstPixel(), _images([3] * 50 + [7] * 50).flatten(1))
    assert entropy == pytest.approx(math.log(2))
    assert sample_quality(ClassFromFirstPixel(), _images([4] * 20)) == (pytest.approx(1.0), 0.0)
    with pytest.raises(ValueError, match=r"must be 8x8 digits.*Received: a tensor of shape \(5, 1, 16, 16\)"):
        sample_quality(ClassFromFirstPixel(), torch.zeros(5, 1, 16, 16))


def test_classifier_is_accurate_cached_and_rebuilt_when_invalid(tmp_path, classifier_file, monkeypatch):
    saved = torch.load(classifier_file, weights_only=True)
    assert saved["format"] == quality.FORMAT and saved["val_acc"] >= 0.97
    shutil.copy(classifier_file, tmp_path / CLASSIFIER_FILE)
    trained = []

    def fake_train(seed, progress):
        trained.append(seed)
        return quality.build_classifier().eval(), 0.99

    monkeypatch.setattr(quality, "_train", fake_train)
    model = digits_classifier(tmp_path)
    assert not trained and not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved["state_dict"].values()))
    for bad in (b"not a checkpoint", None, "weak", "format"):
        path = tmp_path / CLASSIFIER_FILE
        if bad is None:
            path.unlink()
        elif isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            torch.save({**saved, "val_acc": 0.5} if bad == "weak" else {**saved, "format": "other/9"}, path)
        digits_classifier(tmp_path)
        assert torch.load(path, weights_only=True)["val_acc"] == 0.99  # rebuilt and saved
    assert len(trained) == 4
    monkeypatch.setattr(quality, "_train", lambda seed, progress: (quality.build_classifier(), 0.5))
    (tmp_path / CLASSIFIER_FILE).unlink()
    with pytest.raises(RuntimeError, match=r"reached val/acc 0.5000 < 0.97"):
        digits_classifier(tmp_path)


def test_sample_quality_goes_into_the_csv_when_registered_first(tmp_path):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(LATENT, 64), nn.Sigmoid())
    opt = torch.optim.SGD(G.parameters(), lr=0.1)
    noise = torch.randn(30, LATENT, generator=torch.Generator().manual_seed(0))
    first = SampleQuality(G, ClassFromFirstPixel(), noise)
    late_csv = CSVLogger(tmp_path / "late.csv")
    callbacks = [late_csv, first, CSVLogger(tmp_path / "metrics.csv")]
    Trainer(G, Step(lambda z: G(z).mean(), opt, name="g"), callbacks=callbacks, device="cpu").fit(
        [torch.randn(4, LATENT)] * 3, epochs=2
    )
    rows = read_rows(tmp_path / "metrics.csv")
    assert [list(r)[-2:] for r in rows] == [["samples/confidence", "samples/entropy"]] * 2
    assert [float(r["samples/confidence"]) for r in rows] == [h["samples/confidence"] for h in first.history]
    # a CSVLogger registered before it writes its row before the values exist: the order matters
    assert "samples/confidence" not in read_rows(tmp_path / "late.csv")[0]


def test_sample_quality_restores_modes_and_leaves_the_rng_alone():
    G = nn.Sequential(nn.Linear(LATENT, 64), nn.Dropout(0.5), nn.Sigmoid())
    G[1].eval()  # one submodule in eval mode already: each module's mode comes back as it was
    measure = SampleQuality(G, ClassFromFirstPixel(), torch.randn(20, LATENT))
    rng = torch.get_rng_state()
    a, b = measure.measure(), measure.measure()
    assert a == b  # eval mode: dropout off, the same noise
    assert torch.equal(rng, torch.get_rng_state())
    assert G.training and G[0].training and not G[1].training


def test_sample_quality_argument_errors():
    with pytest.raises(TypeError, match=r"`generator` must be an nn.Module. Received: generator of type function"):
        SampleQuality(lambda z: z, ClassFromFirstPixel(), torch.randn(3, 2))
    with pytest.raises(TypeError, match=r"`classifier` must be an nn.Module"):
        SampleQuality(nn.Linear(2, 64), "cnn", torch.randn(3, 2))
    with pytest.raises(TypeError, match=r"`noise` must be a non-empty tensor"):
        SampleQuality(nn.Linear(2, 64), ClassFromFirstPixel(), [[0.0, 1.0]])


# ---------------------------------------------------------------- SampleGrid


class Recorder(nn.Module):
    """A generator that records, at each call, whether it was in train mode and building a graph."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(LATENT, 64), nn.Dropout(0.1), nn.Sigmoid())
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, z):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.net(z)


def _fit_with_grid(tmp_path, **kwargs) -> tuple[SampleGrid, Recorder, Trainer]:
    torch.manual_seed(0)
    G = Recorder()
    opt = torch.optim.SGD(G.parameters(), lr=0.1)
    grid = SampleGrid(G, torch.randn(9, LATENT, generator=torch.Generator().manual_seed(0)), **kwargs)
    trainer = Trainer(G, Step(lambda z: G(z).mean(), opt, name="g"), callbacks=[grid], out_dir=tmp_path, device="cpu")
    trainer.fit([torch.randn(4, LATENT)] * 5, epochs=2)  # 10 updates
    return grid, G, trainer


def test_sample_grid_writes_at_the_right_updates(tmp_path):
    grid, G, _ = _fit_with_grid(tmp_path, every=3)
    names = ["samples_3.png", "samples_6.png", "samples_9.png", "samples.png"]
    assert [p.name for p in grid.saved] == names
    assert sorted(p.name for p in tmp_path.glob("samples*.png")) == sorted(names)
    for name in names:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and min(image.shape[:2]) >= 180  # 3x3 digits of 10 px, enlarged 6x
    # the generator ran in eval mode without a graph for the grids, in train mode with one for the updates
    assert G.calls.count((False, False)) == 1 + 4 and G.calls.count((True, True)) == 10
    assert len(G.calls) == 15 and G.training and G.net[1].training


def test_sample_grid_titles_each_grid_with_its_update_and_epoch(tmp_path, monkeypatch):
    titles = []
    draw = samples.save_grid

    def save_grid(images, png_path, **kwargs):  # the real drawing; the title it got is recorded
        titles.append((Path(png_path).name, kwargs["title"]))
        return draw(images, png_path, **kwargs)

    monkeypatch.setattr(samples, "save_grid", save_grid)
    _fit_with_grid(tmp_path, every=5)  # 2 epochs of 5 updates
    assert titles == [
        ("samples_5.png", "samples at update 5 (epoch 1)"),   # the last update of epoch 1
        ("samples_10.png", "samples at update 10 (epoch 2)"),
        ("samples.png", "samples at update 10 (epoch 2)"),    # after epoch 2 ended
    ]
    for name, _ in titles:
        image = matplotlib.image.imread(tmp_path / name)[..., :3]
        assert image.shape[:2] == (3 * 60 + 24, 3 * 60)  # 3x3 cells of 60 px under a 24 px title band
        assert image[:24].min() < 0.5 and image[:24, :5].min() == image[:24, -5:].min() == 1.0  # text, inside
    untitled = draw(torch.rand(9, 64), tmp_path / "plain.png")  # no title: no band
    assert matplotlib.image.imread(untitled).shape[:2] == (180, 180)


def test_sample_grid_title_after_a_stop_inside_an_epoch(tmp_path, monkeypatch):
    titles = []
    draw = samples.save_grid

    def save_grid(images, png_path, **kwargs):
        titles.append(kwargs["title"])
        return draw(images, png_path, **kwargs)

    monkeypatch.setattr(samples, "save_grid", save_grid)
    torch.manual_seed(0)
    G = Recorder()
    opt = torch.optim.SGD(G.parameters(), lr=0.1)
    grid = SampleGrid(G, torch.randn(9, LATENT, generator=torch.Generator().manual_seed(0)))
    trainer = Trainer(G, Step(lambda z: G(z).mean(), opt, name="g"), callbacks=[grid], out_dir=tmp_path, device="cpu")
    trainer.fit([torch.randn(4, LATENT)] * 5, max_updates=7)  # stops at the 2nd update of epoch 2
    assert titles == ["samples at update 7 (epoch 2)"]


def test_sample_grid_end_only_custom_path_and_fixed_noise(tmp_path):
    grid, G, _ = _fit_with_grid(tmp_path, path=tmp_path / "out" / "grid.png")
    assert [p.name for p in grid.saved] == ["grid.png"] and (tmp_path / "out" / "grid.png").is_file()
    G.net[1].eval()
    rng = torch.get_rng_state()
    a, b = grid.save(tmp_path / "a.png"), grid.save(tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()  # the same noise: the same picture
    assert torch.equal(rng, torch.get_rng_state())
    assert G.training and not G.net[1].training  # each module's own mode is restored


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (6, 8, 8), (6, 64), (6, 3, 5, 7)])
def test_sample_grid_image_shapes(tmp_path, shape):
    G = nn.Sequential(nn.Linear(2, math.prod(shape[1:])), nn.Unflatten(1, shape[1:]), nn.Sigmoid())
    path = SampleGrid(G, torch.randn(6, 2), columns=4).save(tmp_path / "g.png")
    assert matplotlib.image.imread(path).ndim == 3


def test_sample_grid_argument_errors(tmp_path):
    G, noise = nn.Linear(2, 64), torch.randn(4, 2)
    cases = [
        (TypeError, r"`generator` must be an nn.Module. Received: generator of type function",
         dict(generator=lambda z: z)),
        (TypeError, r"`noise` must be a tensor of generator inputs. Received: noise of type list", dict(noise=[1.0])),
        (ValueError, r"`noise` must hold at least one input.*Received: a tensor of shape \(0, 2\)",
         dict(noise=torch.zeros(0, 2))),
        (ValueError, r"`every` must be an int >= 1.*Received: every=0", dict(every=0)),
        (TypeError, r"`every` must be an int >= 1.*Received: every=1.5 of type float", dict(every=1.5)),
        (TypeError, r"`path` must be a path.*Received: path=3", dict(path=3)),
        (ValueError, r"`value_range` must be two finite numbers.*Received: value_range=\(1, 0\)",
         dict(value_range=(1, 0))),
        (ValueError, r"`value_range`.*Received: value_range=0.5", dict(value_range=0.5)),
        (ValueError, r"`columns` must be an int >= 1.*Received: columns=0", dict(columns=0)),
    ]
    for error, message, change in cases:
        kwargs = {"generator": G, "noise": noise, **change}
        with pytest.raises(error, match=message):
            SampleGrid(kwargs.pop("generator"), kwargs.pop("noise"), **kwargs)


def test_sample_grid_checks_the_output_and_the_folder_when_fit_starts(tmp_path):
    not_images = nn.Linear(2, 10)  # 10 values per sample: not a square image
    opt = torch.optim.SGD(not_images.parameters(), lr=0.1)
    step = Step(lambda z: not_images(z).mean(), opt)
    trainer = Trainer(not_images, step, callbacks=[SampleGrid(not_images, torch.randn(4, 2))], out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"output must be images.*Received: a tensor of shape \(4, 10\)"):
        trainer.fit([torch.randn(3, 2)], epochs=1)
    assert trainer.updates == 0  # before the first update
    G = nn.Linear(2, 64)
    trainer = Trainer(G, Step(lambda z: G(z).mean(), torch.optim.SGD(G.parameters(), 0.1)),
                      callbacks=[SampleGrid(G, torch.randn(4, 2))])
    with pytest.raises(ValueError, match=r"no place to write.*Trainer\(\.\.\., out_dir='runs/exp'\)"):
        trainer.fit([torch.randn(3, 2)], epochs=1)


def test_sample_grid_names_the_type_of_a_generator_output_that_is_no_tensor(tmp_path):
    class Pair(nn.Linear):
        def forward(self, z):
            return super().forward(z), z

    G = Pair(2, 64)
    grid = SampleGrid(G, torch.randn(4, 2), path=tmp_path / "s.png")
    with pytest.raises(TypeError, match=r"must return a tensor of images\. Received: an output of type tuple\. Return"):
        grid.images()


def test_dcgan_resumed_run_equals_the_uninterrupted_one(tmp_path, classifier_file):
    for folder in ("whole", "resumed"):
        (tmp_path / folder).mkdir()
        shutil.copy(classifier_file, tmp_path / folder / CLASSIFIER_FILE)
    whole = dcgan.run(tmp_path / "whole", epochs=2, progress=False)
    dcgan.run(tmp_path / "resumed", epochs=1, progress=False)
    resumed = dcgan.run(tmp_path / "resumed", epochs=2, progress=False, resume=True)
    assert resumed == whole  # the losses and the quality figures (G_ema is in the checkpoint)
    a, b = (torch.load(tmp_path / f / "weights.pt", weights_only=True) for f in ("whole", "resumed"))
    assert all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(read_rows(tmp_path / "whole" / "metrics.csv")) == drop(read_rows(tmp_path / "resumed" / "metrics.csv"))
