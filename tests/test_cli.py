"""The ``trainflow`` command line: list, run, and exit code 2 for bad input."""

from __future__ import annotations

import doctest
import re

import pytest

import trainflow.cli
from trainflow.cli import main
from trainflow.examples import EXAMPLES


def test_doctests():
    result = doctest.testmod(trainflow.cli)
    assert result.attempted > 0 and result.failed == 0


def test_list(capsys):
    assert main(["run", "--list"]) == 0
    out = capsys.readouterr().out
    for name, (description, _) in EXAMPLES.items():
        assert any(line.split(None, 1) == [name, description] for line in out.splitlines()), name


def test_run_writes_artifacts_and_reports_them(tmp_path, capsys):
    out_dir = tmp_path / "mlp"
    assert main(["run", "mlp", "--epochs", "1", "--out", str(out_dir), "--no-progress", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("metrics.csv", "curves.png", "weights.pt"):
        assert (out_dir / name).stat().st_size > 0
        assert str(out_dir / name) in out
    assert not re.search(r"^epoch 1\b.* updates 23\b", out, re.M)  # --no-progress: no ProgressBar line
    assert "val/acc" in out and "Final values:" in out


def test_default_out_dir_and_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # rich: not a terminal, even where FORCE_COLOR is set
    assert main(["run", "alternating", "--epochs", "1"]) == 0
    assert (tmp_path / "runs" / "alternating" / "metrics.csv").is_file()
    assert re.search(r"^epoch 1\b.* updates 79\b", capsys.readouterr().out, re.M)  # ProgressBar's plain line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nope"], "invalid choice: 'nope' (choose from 'mlp', 'two-losses', 'alternating', 'gan', 'dcgan', 'wgan-gp', 'nas-digits')"),
        (["run"], "name an example to run (one of: mlp, two-losses, alternating, gan, dcgan, wgan-gp, nas-digits), or pass --list."),
        (["run", "mlp", "--epochs", "0"], "argument --epochs: must be >= 1. Received: 0."),
        (["run", "mlp", "--epochs", "two"], "argument --epochs: must be a whole number. Received: 'two'."),
        (["run", "mlp", "--seed", "-3"], "argument --seed: must be >= 0. Received: -3."),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_exits_with_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
