"""``trainflow run nas-digits``: the grid search finds the architecture known to be best, and writes its artifacts."""

from __future__ import annotations

import csv
import doctest
import itertools
import json

import matplotlib.image
import pytest
import torch
from torch import nn

from trainflow.cli import main
from trainflow.examples import EXAMPLES, nas_digits
from trainflow.examples.nas_digits import KNOWN_BEST, Noisy, Zero, space
from trainflow.nas import fixed_arch, search_space

SPACE = {"input": ["clean", "noisy"], "width": [4, 32], "block": ["mlp", "identity", "zero"]}


def read_trials(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def arch_of(row):
    return {"input": row["input"], "width": int(row["width"]), "block": row["block"]}


def test_registered_and_doctests():
    assert EXAMPLES["nas-digits"] == (nas_digits.DESCRIPTION, nas_digits.run)
    result = doctest.testmod(nas_digits)
    assert result.attempted > 0 and result.failed == 0


def test_space_and_its_blocks():
    assert search_space(space) == SPACE
    with fixed_arch({"input": "noisy", "width": 4, "block": "zero"}):
        model = space()
    assert isinstance(model[0], Noisy) and isinstance(model[3], Zero) and model[1].out_features == 4
    with fixed_arch(KNOWN_BEST[0]):
        model = space()
    assert isinstance(model[0], nn.Identity) and [m.out_features for m in model[3] if isinstance(m, nn.Linear)] == [32]
    x = torch.rand(4000, 64)
    torch.manual_seed(3)
    noisy = Noisy(nas_digits.NOISE)(x)
    torch.manual_seed(3)
    assert torch.equal(noisy, x + nas_digits.NOISE * torch.randn_like(x))  # the noise is the global RNG's
    assert torch.equal(Zero()(x), torch.zeros_like(x))


def test_grid_search_finds_the_known_best(tmp_path, capsys):
    logs = nas_digits.run(tmp_path, progress=False)
    out = capsys.readouterr().out
    rows = read_trials(tmp_path / "trials.csv")
    # every architecture exactly once, each trained to the end
    every = [dict(zip(SPACE, values)) for values in itertools.product(*SPACE.values())]
    assert sorted(map(json.dumps, map(arch_of, rows))) == sorted(map(json.dumps, every))
    assert [row["state"] for row in rows] == ["complete"] * 12
    value = {json.dumps(arch_of(row)): float(row["value"]) for row in rows}
    best = json.loads((tmp_path / "best_arch.json").read_text())
    assert best in KNOWN_BEST
    assert value[json.dumps(best)] == max(value.values()) == logs["best val/acc"] >= 0.9
    assert list(logs) == ["best val/acc"]
    assert "12 architectures trained" in out
    assert f"validation accuracy {logs['best val/acc']:.4f}" in out and json.dumps(best) in out
    # what is known about the space holds in this search
    known = [v for a, v in value.items() if json.loads(a) in KNOWN_BEST]
    others = [v for a, v in value.items() if json.loads(a) not in KNOWN_BEST]
    assert min(known) > max(others)
    for arch, v in value.items():
        arch = json.loads(arch)
        if arch["block"] == "zero":
            assert 0.05 < v < 0.15, arch  # chance: ten classes
        elif arch["input"] == "noisy":
            assert 0.2 < v < 0.6, arch
    # the exported architecture builds the model again
    with fixed_arch(tmp_path / "best_arch.json"):
        assert isinstance(space(), nn.Sequential)
    image = matplotlib.image.imread(tmp_path / "history.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_cli_twice_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "nas-digits", "--out", str(out), "--epochs", "1", "--no-progress"]
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 2  # the search runs on one thread, then restores the caller's setting
    finally:
        torch.set_num_threads(1)
    first = capsys.readouterr().out
    for name in ("trials.csv", "best_arch.json", "history.png"):
        assert str(out / name) in first
    assert "best val/acc" in first and "12 architectures trained" in first
    rows = read_trials(out / "trials.csv")
    # a second fresh run writes the next version of the folder, and repeats the first to the bit
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.splitlines()[0] == (f"{out} holds an earlier run; this run writes {out}-2 "
                                      "(`trainflow run nas-digits --resume` continues the newest run instead).")
    assert _same_but_seconds(read_trials(tmp_path / "run-2" / "trials.csv"), rows)
    assert second.splitlines()[1:3] == first.splitlines()[:2]  # the best and its value
    assert _same_but_seconds(read_trials(out / "trials.csv"), rows)  # the first run is untouched
    # --resume continues the stored experiment: its grid is complete, so nothing more runs
    assert main([*argv, "--resume"]) == 0
    assert _same_but_seconds(read_trials(out / "trials.csv"), rows)


def _same_but_seconds(a, b):
    drop = lambda rows: [{k: v for k, v in row.items() if k != "seconds"} for row in rows]  # noqa: E731
    return drop(a) == drop(b)


def test_ctrl_c_then_resume(tmp_path, capsys, monkeypatch):
    argv = ["run", "nas-digits", "--out", str(tmp_path), "--epochs", "1", "--no-progress"]
    train = nas_digits.evaluate
    calls = []

    def interrupted_in_the_fourth_trial(model, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what Ctrl-C raises
        return train(model, **kwargs)

    monkeypatch.setattr(nas_digits, "evaluate", interrupted_in_the_fourth_trial)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"Continue with: trainflow run nas-digits --out {tmp_path} --resume" in out
    # the cut trial is failed, and queued to run again
    assert [row["state"] for row in read_trials(tmp_path / "trials.csv")] == ["complete"] * 3 + ["failed", "waiting"]
    monkeypatch.setattr(nas_digits, "evaluate", train)
    assert main([*argv, "--resume"]) == 0
    assert "12 architectures trained" in capsys.readouterr().out
    rows = [row for row in read_trials(tmp_path / "trials.csv") if row["state"] == "complete"]
    assert len(rows) == 12 and len({json.dumps(arch_of(row)) for row in rows}) == 12  # the cut trial ran again


@pytest.mark.parametrize("epochs", [0, 1.5])
def test_bad_epochs(tmp_path, epochs):
    with pytest.raises(ValueError, match=rf"`epochs` must be an int >= 1.*Received: epochs={epochs!r}"):
        nas_digits.run(tmp_path, epochs=epochs, progress=False)
    assert not any(tmp_path.iterdir())
