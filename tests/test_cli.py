"""The ``trainflow`` command line: list, run, and exit code 2 for bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainflow.cli import main
from trainflow.examples import EXAMPLES


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
    assert re.search(r"^epoch 1/1\b.* updates 23\b", out, re.M)  # --no-progress: no bar, still the epoch line
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
        (["run", "nope"], "invalid choice: 'nope' (choose from 'mlp', 'two-losses', 'alternating', 'gan', 'dcgan', 'wgan-gp', 'nas-digits', 'darts-digits')"),
        (["run"], "name an example to run (one of: mlp, two-losses, alternating, gan, dcgan, wgan-gp, nas-digits, darts-digits), or pass --list."),
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


def _cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    """``trainflow ...`` in a fresh process, as a person types it (output captured: not a terminal)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "trainflow.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_the_same_command_twice_writes_a_new_version_and_resume_continues_the_newest(tmp_path):
    first = _cli(["run", "alternating", "--epochs", "1"], tmp_path)
    assert "'alternating' finished in" in first.stdout
    second = _cli(["run", "alternating", "--epochs", "1"], tmp_path)
    assert (f"runs{os.sep}alternating holds an earlier run; this run writes runs{os.sep}alternating-2 "
            "(`trainflow run alternating --resume` continues the newest run instead).") in second.stdout
    for folder in ("alternating", "alternating-2"):
        assert (tmp_path / "runs" / folder / "weights.pt").is_file()
    first_weights, second_weights = (torch.load(tmp_path / "runs" / f / "weights.pt", weights_only=True)
                                     for f in ("alternating", "alternating-2"))
    assert all(torch.equal(first_weights["model"][k], v) for k, v in second_weights["model"].items())

    done = _cli(["run", "alternating", "--epochs", "1", "--resume"], tmp_path)
    newest = Path("runs") / "alternating-2"
    assert f"Resuming {newest} from {newest / 'checkpoints' / 'ckpt-u000000079-e1.pt'} (update 79, 1 epoch(s) done)." \
        in done.stdout
    assert (f"{newest} already finished at epoch 1: nothing to train. Train further with "
            f"`trainflow run alternating --out {newest} --resume --epochs N` (N > 1).") in done.stdout
    assert "nothing to do" not in done.stderr  # the library's warning is said in the command's words

    further = _cli(["run", "alternating", "--epochs", "2", "--resume"], tmp_path)
    assert f"Resuming {newest} from" in further.stdout and "'alternating' finished in" in further.stdout
    assert sum(1 for _ in open(tmp_path / newest / "metrics.csv")) == 3  # a header and two epochs


def test_a_fresh_run_takes_the_first_free_version_and_resume_the_newest_run(tmp_path):
    """The numbering the CLI runs above rely on, past -2 and -9, without training."""
    from trainflow.cli import _run_folder

    base = tmp_path / "runs" / "mlp"
    assert _run_folder(base, resume=False, explicit=False) == base  # nothing there yet
    for name in ("mlp", "mlp-2", "mlp-3", "mlp-4", "mlp-5", "mlp-6", "mlp-7", "mlp-8", "mlp-9"):
        (base.parent / name).mkdir(parents=True)
        (base.parent / name / "journal.log").write_text("")  # a folder that holds a run
    assert _run_folder(base, resume=False, explicit=False) == base.with_name("mlp-10")
    (base.parent / "mlp-10").mkdir()  # an empty folder holds no run: a fresh run may take it
    assert _run_folder(base, resume=False, explicit=False) == base.with_name("mlp-10")
    assert _run_folder(base, resume=True, explicit=False) == base.with_name("mlp-9")  # -10 holds nothing
    (base.parent / "mlp-10" / "journal.log").write_text("")
    assert _run_folder(base, resume=True, explicit=False) == base.with_name("mlp-10")  # 10 after 9, not after 1
    assert _run_folder(base, resume=True, explicit=True) == base  # --out names the folder itself
