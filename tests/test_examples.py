"""The built-in examples: each trains, writes its artifacts, and the MLP reaches 95% accuracy."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch

from trainflow.examples import EXAMPLES, alternating, gan, mlp, two_losses
from trainflow.examples.artifacts import curves_figure, epochs_or_default, is_loss, plot_curves, save_weights

#: example -> (the log keys of an epoch, the models in weights.pt, the extra artifacts)
EXPECTED = {
    "mlp": ({"fit/loss", "train/acc", "val/loss", "val/acc"}, {"model"}, ()),
    "two-losses": ({"loss/mse", "loss/l1"}, {"model"}, ()),
    "alternating": ({"mse/loss", "l1/loss"}, {"model"}, ()),
    "gan": ({"D/loss", "G/loss"}, {"G", "D"}, ("samples.png",)),
    "dcgan": ({"D/loss", "G/loss", "samples/confidence", "samples/entropy"}, {"G", "D", "G_ema"}, ("samples.png",)),
    "wgan-gp": (
        {"D/fake", "D/real", "D/penalty", "G/loss", "samples/confidence", "samples/entropy"},
        {"G", "D"},
        ("samples.png",),
    ),
}
#: the epoch values that are metrics (panels of curves.png beside the losses'), not losses
METRICS = {"mlp": {"train/acc", "val/acc"}, "dcgan": {"samples/confidence", "samples/entropy"},
           "wgan-gp": {"samples/confidence", "samples/entropy"}}
COMMON = ("metrics.csv", "curves.png", "weights.pt")
#: the panels of curves.png where there are more than the losses
PANELS = {"mlp": ["losses", "metrics"], "dcgan": ["losses", "samples/confidence", "samples/entropy"],
          "wgan-gp": ["losses", "samples/confidence", "samples/entropy"]}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> dict[str, tuple[Path, dict[str, float]]]:
    """Each training example run once for one epoch: name -> (out_dir, returned logs)."""
    runs = {}
    for name in EXPECTED:  # nas-digits and darts-digits are searches: tests/nas/test_*_example.py
        _, run = EXAMPLES[name]
        out = tmp_path_factory.mktemp(name)
        runs[name] = (out, run(out, epochs=1, progress=False))
    return runs


def test_registry():
    assert list(EXAMPLES) == ["mlp", "two-losses", "alternating", "gan", "dcgan", "wgan-gp", "nas-digits",
                             "darts-digits"]
    for name, (description, run) in EXAMPLES.items():
        assert isinstance(description, str) and description and "\n" not in description, name
        assert callable(run)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_one_epoch_writes_artifacts(one_epoch, name):
    out, logs = one_epoch[name]
    keys, models, extra = EXPECTED[name]
    assert set(logs) == keys and all(math.isfinite(v) for v in logs.values())
    # curves.png: every loss in the losses panel, accuracies in the metrics panel
    assert {k for k in keys if not is_loss(k)} == METRICS.get(name, set())
    for file in (*COMMON, *extra):
        assert (out / file).is_file() and (out / file).stat().st_size > 0, file
    for png in ("curves.png", *extra):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
    titles = [title for title, _, _ in panels(curves_figure(out / "metrics.csv"))]
    assert titles == PANELS.get(name, ["losses"])
    rows = read_rows(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert {k: float(v) for k, v in rows[0].items() if k in keys} == logs
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert set(weights) == models
    assert all(isinstance(t, torch.Tensor) for sd in weights.values() for t in sd.values())


def test_updates_per_epoch(one_epoch):
    updates = {name: int(read_rows(out / "metrics.csv")[0]["updates"]) for name, (out, _) in one_epoch.items()}
    # 1438 digits in batches of 64 -> 23; 10000 points in batches of 128 -> 79 (all steps together)
    assert updates == {"mlp": 23, "two-losses": 79, "alternating": 79, "gan": 23, "dcgan": 90, "wgan-gp": 54}


def test_mlp_default_reaches_95_percent(tmp_path):
    # about 1 s on 2 idle CPU cores (no timing assert here: a busy machine can slow it 20x)
    logs = mlp.run(tmp_path, progress=False)
    assert logs["val/acc"] >= 0.95, logs
    assert len(read_rows(tmp_path / "metrics.csv")) == mlp.EPOCHS


def test_two_losses_learns_and_prints_like_the_seed(tmp_path, capsys):
    logs = two_losses.run(tmp_path, progress=False)
    rows = read_rows(tmp_path / "metrics.csv")
    assert len(rows) == two_losses.EPOCHS == 3
    assert float(rows[-1]["loss/mse"]) < float(rows[0]["loss/mse"]) / 5
    assert logs["loss/mse"] < 1.0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("Train Loss: ")]) == 237 // 25


def test_alternating_prints_both_losses(tmp_path, capsys):
    alternating.run(tmp_path, epochs=1, progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("L1 Loss: ")]
    assert len(lines) == 79 // 25 and "MSE Loss: " in lines[0]  # one update per batch, MSE and L1 in turn


def test_runs_are_reproducible(tmp_path):
    a = two_losses.run(tmp_path / "a", epochs=1, progress=False, seed=7)
    b = two_losses.run(tmp_path / "b", epochs=1, progress=False, seed=7)
    c = two_losses.run(tmp_path / "c", epochs=1, progress=False, seed=8)
    assert a == b and a != c
    wa, wb = (torch.load(tmp_path / d / "weights.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_gan_samples_use_a_fixed_noise(tmp_path):
    generator = torch.nn.Sequential(torch.nn.Linear(gan.LATENT, 64), torch.nn.Sigmoid())
    noise = torch.randn(64, gan.LATENT, generator=torch.Generator().manual_seed(0))
    gan.save_samples(generator, noise, tmp_path / "a.png")
    gan.save_samples(generator, noise, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert generator.training  # its mode is restored


def test_progress_bar_prints_one_line_per_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # rich: not a terminal, even where FORCE_COLOR is set
    alternating.run(tmp_path, epochs=2, progress=True)
    out = capsys.readouterr().out
    assert re.search(r"^epoch 1\b.* updates 79\b", out, re.M) and re.search(r"^epoch 2\b.* updates 158\b", out, re.M)


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True])
def test_bad_epochs(tmp_path, epochs):
    with pytest.raises(ValueError, match=rf"`epochs` must be an int >= 1.*Received: epochs={epochs!r}"):
        mlp.run(tmp_path, epochs=epochs, progress=False)
    assert not any(tmp_path.iterdir())  # checked before anything is written


def test_epochs_default():
    assert epochs_or_default(None, 7) == 7 and epochs_or_default(2, 7) == 2


def test_is_loss():
    keys = ("D/loss", "train/mse", "train/acc", "val/acc", "val/loss", "loss/l1", "samples/confidence")
    assert [is_loss(k) for k in keys] == [True, False, False, False, True, True, False]


def panels(fig) -> list[tuple[str, str, list[str]]]:
    """(title, y label, the curves' labels) of each panel of a figure."""
    return [(ax.get_title(), ax.get_ylabel(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes]


def test_curves_put_each_sample_quality_figure_on_its_own_scale(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,updates,seconds,D/loss,G/loss,samples/confidence,samples/entropy\n"
        "1,90,0.5,0.61,0.9,0.40,1.2\n2,180,0.5,0.58,0.8,0.72,2.29\n"
    )
    fig = curves_figure(csv_path)
    loss, confidence, entropy = fig.axes
    assert [(title, ylabel) for title, ylabel, _ in panels(fig)] == [
        ("losses", "loss"),
        ("samples/confidence", "mean max softmax probability"),
        ("samples/entropy", "predicted-class entropy (nats)"),
    ]
    assert [line.get_label() for line in loss.get_lines()] == ["D/loss", "G/loss"]
    assert list(confidence.get_lines()[0].get_ydata()) == [0.40, 0.72]
    assert confidence.get_ylim()[0] == 0 and 1 < confidence.get_ylim()[1] < 1.2  # the whole 0-1 range
    curve, reference = entropy.get_lines()
    assert list(curve.get_ydata()) == [1.2, 2.29]
    assert list(reference.get_ydata()) == [math.log(10)] * 2 and reference.get_linestyle() == "--"
    assert [t.get_text() for t in entropy.texts] == ["ln 10 = 2.303: all ten digits equally often"]
    assert entropy.get_ylim()[0] == 0 and math.log(10) < entropy.get_ylim()[1] < 2.7  # the line in view


def test_curves_label_the_y_axes_of_losses_and_metrics(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "epoch,updates,seconds,train/loss,val/loss,train/acc,val/acc\n"
        "1,23,0.1,2.0,1.5,0.3,0.6\n2,46,0.1,0.01,0.2,0.99,0.96\n"
    )
    assert panels(curves_figure(csv_path)) == [
        ("losses", "loss (log scale)", ["train/loss", "val/loss"]),  # from 2.0 to 0.01: a factor 200
        ("metrics", "accuracy", ["train/acc", "val/acc"]),
    ]
    csv_path.write_text("epoch,updates,seconds,mse/loss,train/mae\n1,4,0.1,0.5,0.4\n2,8,0.1,0.4,0.3\n")
    assert panels(curves_figure(csv_path)) == [("losses", "loss", ["mse/loss"]), ("metrics", "mae", ["train/mae"])]


def test_plot_curves_with_gaps_and_errors(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,updates,seconds,D/loss,val/acc\n1,4,0.1,0.7,\n2,8,0.1,0.6,0.5\n")
    assert plot_curves(csv_path, tmp_path / "sub" / "c.png") == tmp_path / "sub" / "c.png"
    assert matplotlib.image.imread(tmp_path / "sub" / "c.png").ndim == 3
    csv_path.write_text("epoch,updates,seconds\n")
    with pytest.raises(ValueError, match=r"`csv_path` holds no rows\. Received: csv_path="):
        plot_curves(csv_path, tmp_path / "c.png")
    csv_path.write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"no 'epoch' column\. Received: columns \['step', 'loss'\]"):
        plot_curves(csv_path, tmp_path / "c.png")


def test_save_weights_rejects_a_bare_module(tmp_path):
    with pytest.raises(TypeError, match=r"`models` must be a dict of named nn\.Modules\. Received: models of type Linear\. "):
        save_weights(torch.nn.Linear(2, 1), tmp_path / "w.pt")
