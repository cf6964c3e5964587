"""Packaging: the torch range pyproject declares, and a library that trains without the examples' extra."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

#: the torch APIs trainflow calls that are newer than torch 2.0, and the release that added each
TORCH_APIS = {
    "torch.amp.GradScaler(device)": ((2, 3), lambda: torch.amp.GradScaler("cpu", enabled=False)),
    "nn.Module.compile": ((2, 2), lambda: torch.nn.Module.compile),
    "Tensor.backward(inputs=)": ((1, 8), lambda: torch.ones(1, requires_grad=True).sum().backward(inputs=[])),
    "torch._foreach_norm": ((1, 13), lambda: torch._foreach_norm([torch.ones(2)])),
    "torch.load(weights_only=)": ((1, 13), lambda: torch.load.__code__.co_varnames.index("weights_only")),
}


def dependencies() -> dict[str, str]:
    return {re.match(r"[\w-]+", d).group(0): d for d in PYPROJECT["project"]["dependencies"]}


def test_torch_is_a_range_whose_lower_bound_has_every_api_used():
    spec = dependencies()["torch"]
    assert "==" not in spec, spec  # a library must not pin torch: CI and the README do
    lower = tuple(int(n) for n in re.search(r">=(\d+)\.(\d+)", spec).groups())
    assert re.search(r",<(\d+)", spec), spec
    assert lower == max(version for version, _ in TORCH_APIS.values())  # the oldest release that has them all
    for name, (_, call) in TORCH_APIS.items():
        try:
            call()
        except Exception as error:  # ValueError from backward(inputs=[]) means the keyword exists
            assert name == "Tensor.backward(inputs=)" and "inputs" in str(error), (name, error)


def test_torch_2_13_is_pinned_in_the_readme_commands_and_ci_only():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, re.M)
    assert len(commands) == 2 and all("pip install torch==2.13.0 " in c for c in commands)
    assert '-e ".[examples]" && trainflow run mlp' in commands[0]  # the main command runs an example
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs the test command verbatim
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert set(extras["examples"]) <= set(extras["test"])  # the tests run the examples
    assert not {"matplotlib", "scikit-learn"} & set(dependencies())


def test_the_library_trains_without_the_examples_extra(tmp_path):
    script = f"""
import sys
sys.modules["matplotlib"] = sys.modules["sklearn"] = None  # as if not installed
import torch
from trainflow import Step, Trainer
from trainflow.callbacks import Checkpoint, CSVLogger, LossLogger, Preemption, SampleGrid
from trainflow.cli import main
torch.manual_seed(0)  # the logged loss is printed as d.dddd whatever the start, unless it is below 1e-4
model = torch.nn.Linear(2, 1)
step = Step(lambda x: model(x).pow(2).mean(), torch.optim.SGD(model.parameters(), lr=0.1), name="l2")
callbacks = [CSVLogger(), Checkpoint(), Preemption(), LossLogger(every=3)]
Trainer(model, step, callbacks=callbacks, out_dir={str(tmp_path)!r}).fit([torch.ones(4, 2)] * 3, epochs=1)
for build in (lambda: SampleGrid(model, torch.zeros(1, 2)), lambda: __import__("trainflow.data").data.digits()):
    try:
        build()
    except ImportError as error:
        print(error)
print("exit", main(["run", "--list"]))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert re.fullmatch(r"update 3  l2/loss=\d\.\d{4}", lines[0]), lines
    assert lines[1].startswith("SampleGrid and save_grid draw with matplotlib, which could not be imported")
    assert lines[1].endswith('Install it with `pip install "trainflow[examples]"` (or `pip install matplotlib`), '
                             "or drop this callback.")
    assert lines[2].startswith("trainflow.data.digits needs scikit-learn")
    assert lines[2].endswith('Install it with `pip install "trainflow[examples]"` (or `pip install scikit-learn`).')
    assert lines[3] == "exit 2"
    assert run.stderr.startswith("trainflow run: the examples need the `examples` extra")
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "checkpoints" / "index.json").is_file()


def test_an_experiment_without_matplotlib_writes_its_csv_and_says_history_png_needs_it(tmp_path):
    script = f"""
import sys, warnings
sys.modules["matplotlib"] = None  # as if not installed
from torch import nn
from trainflow.nas import Experiment, FunctionalTrainer, GridSearch, LayerChoice, report_final_result
def space():
    return nn.Sequential(nn.Linear(2, 2), LayerChoice({{"relu": nn.ReLU(), "tanh": nn.Tanh()}}, label="act"))
def fit(model):
    report_final_result(float(isinstance(model[1], nn.Tanh)))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    Experiment(space, FunctionalTrainer(fit), GridSearch(), out_dir={str(tmp_path)!r}).run()
print([str(w.message) for w in caught if "history.png" in str(w.message)])
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    written = {p.name for p in tmp_path.iterdir()}
    assert {"best_arch.json", "trials.csv"} <= written and "history.png" not in written
    (message,) = eval(run.stdout.strip().splitlines()[-1])
    assert message.startswith("Experiment: history.png needs matplotlib, which could not be imported (")
    assert message.endswith('trials.csv holds the same values. Install it with `pip install "trainflow[examples]"` '
                            "(or `pip install matplotlib`).")
