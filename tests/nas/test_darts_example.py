"""``trainflow run darts-digits``: DARTS picks a known-best architecture, plots its probabilities, retrains it."""

from __future__ import annotations

import doctest
import json
import re

import matplotlib.image
import torch
from torch import nn

from trainflow.cli import main
from trainflow.examples import EXAMPLES, darts_digits
from trainflow.examples.darts_digits import KNOWN_BEST, space
from trainflow.nas import fixed_arch, search_space


def test_registered_and_doctests():
    assert EXAMPLES["darts-digits"] == (darts_digits.DESCRIPTION, darts_digits.run)
    result = doctest.testmod(darts_digits)
    assert result.attempted > 0 and result.failed == 0
    assert search_space(space) == {"input": ["clean", "noisy"], "block": ["mlp", "identity", "zero"]}


def test_search_picks_a_known_best_and_retrains_it(tmp_path, capsys):
    logs = darts_digits.run(tmp_path, progress=False)
    out = capsys.readouterr().out
    arch = json.loads((tmp_path / "best_arch.json").read_text())
    assert arch in KNOWN_BEST
    # one line per epoch: the choice so far and every option's probability
    lines = re.findall(r"^epoch (\d+): (\{.*?\})  input: clean ([\d.]+), noisy ([\d.]+)  block: mlp ([\d.]+), "
                       r"identity ([\d.]+), zero ([\d.]+)$", out, re.M)
    assert [int(line[0]) for line in lines] == list(range(1, darts_digits.EPOCHS + 1))
    assert json.loads(lines[-1][1]) == arch
    first, last = [float(v) for v in lines[0][2:]], [float(v) for v in lines[-1][2:]]
    assert last[0] > first[0] and last[0] > 0.6  # clean input: ever more likely
    assert max(last[2:]) == last[2 + ["mlp", "identity", "zero"].index(arch["block"])]
    # the chosen architecture retrained from scratch: far above chance on the held-out split
    assert logs["retrained val/acc"] > 0.85 and set(logs) == {"arch/loss", "weights/loss", "retrained val/acc"}
    assert f"held-out accuracy {logs['retrained val/acc']:.4f}" in out
    for name in ("alphas.png", "curves.png", "metrics.csv", "weights.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    image = matplotlib.image.imread(tmp_path / "alphas.png")
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    with fixed_arch(tmp_path / "best_arch.json"):  # the JSON builds the plain model
        model = space()
    assert not any(type(m).__name__.startswith(("Darts", "LayerChoice")) for m in model.modules())
    assert isinstance(model[0], nn.Identity)


def test_cli_run_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "darts-digits", "--out", str(out), "--epochs", "2", "--no-progress"]
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 2  # the search runs on one thread, then restores the caller's setting
    finally:
        torch.set_num_threads(1)
    first = capsys.readouterr().out
    for name in ("alphas.png", "best_arch.json", "metrics.csv"):
        assert str(out / name) in first
    assert "retrained val/acc" in first
    # the finished search resumed: nothing left to train
    assert main([*argv, "--resume"]) == 0
    assert "already finished at epoch 2" in capsys.readouterr().out
