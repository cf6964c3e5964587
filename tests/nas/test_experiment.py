"""Experiment: reproducible trials, exact resume, workers sharing a storage, pruning, grid, failures, artifacts."""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from trainflow.nas import (
    FunctionalTrainer,
    Experiment,
    GridSearch,
    LayerChoice,
    ModuleTrainer,
    Random,
    RegularizedEvolution,
    ValueChoice,
    fixed_arch,
    report_final_result,
    report_intermediate_result,
    search_space,
    TrainModule,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import nas_worker  # noqa: E402  (the tiny space and training function, shared with worker processes)
from nas_worker import STRATEGIES, fit, replay, space  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
}
TIMEOUT = 120  # seconds for any one worker process; a run takes a few seconds

ALL_ARCHS = [
    {"width": w, "input": i, "act": a} for w, i, a in itertools.product([4, 8], [[0], [1]], ["relu", "tanh"])
]


def archs(records):
    return [r.architecture for r in records]


def experiment(strategy, tmp_path=None, **kwargs) -> Experiment:
    return Experiment(space, FunctionalTrainer(fit), strategy, **kwargs)


# -- the space as optuna sees it ---------------------------------------------------------------


def test_search_space_lists_every_label_and_option():
    assert search_space(space) == {"width": [4, 8], "input": [[0], [1]], "act": ["relu", "tanh"]}


def test_grid_search_covers_every_architecture_once_and_stops(tmp_path):
    exp = experiment(GridSearch(), max_trials=100, out_dir=tmp_path)
    exp.run()
    records = exp.trials()
    assert [r.number for r in records] == list(range(8))
    assert sorted(map(json.dumps, archs(records))) == sorted(map(json.dumps, ALL_ARCHS))
    assert [r.state for r in records] == ["complete"] * 8
    exp.run()  # the grid is exhausted: nothing more runs
    assert len(exp.trials()) == 8


def test_grid_without_shuffle_follows_the_product_order_and_stops_at_max_trials():
    exp = experiment(GridSearch(shuffle=False), max_trials=5)
    exp.run()
    assert archs(exp.trials()) == ALL_ARCHS[:5]
    shuffled = experiment(GridSearch(), seed=3)
    shuffled.run()
    assert archs(shuffled.trials()) != ALL_ARCHS  # a seeded order, still all of them
    assert sorted(map(json.dumps, archs(shuffled.trials()))) == sorted(map(json.dumps, ALL_ARCHS))


# -- behaviour 1: reproducible trials ----------------------------------------------------------


def test_each_trial_replays_by_hand_to_the_bit():
    exp = experiment(Random(), max_trials=5, seed=7)
    exp.run()
    records = exp.trials()
    values = [r.value for r in records]
    assert len(set(values)) == 5  # the seed differs per trial: no two runs alike
    for r in records:
        intermediate, final = replay(r.architecture, r.number, seed=7)
        assert r.intermediate == intermediate and len(intermediate) == 2
        assert r.value == final  # exact: seeded before the model is built


def test_the_same_seed_gives_the_same_experiment_and_another_seed_another():
    runs = []
    for seed in (0, 0, 1):
        exp = experiment(Random(), max_trials=4, seed=seed)
        exp.run()
        runs.append([(r.architecture, r.value) for r in exp.trials()])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# -- behaviour 2: exact resume ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random", "tpe", "evolution", "grid"])
def test_four_then_four_more_equals_eight(tmp_path, name):
    whole = experiment(STRATEGIES[name](), max_trials=8, storage=tmp_path / "whole.log")
    whole.run()
    first = experiment(STRATEGIES[name](), max_trials=4, storage=tmp_path / "halves.log", name="halves")
    first.run()
    assert len(first.trials()) == 4
    second = experiment(STRATEGIES[name](), max_trials=8, storage=tmp_path / "halves.log", name="halves")
    second.run()
    expected = [(r.number, r.architecture, r.intermediate, r.value, r.state) for r in whole.trials()]
    got = [(r.number, r.architecture, r.intermediate, r.value, r.state) for r in second.trials()]
    assert got == expected
    assert len({json.dumps(a) for a in archs(whole.trials())}) > 2  # the strategy explored


def test_evolution_mutates_the_best_of_its_sample_after_the_random_population():
    exp = experiment(RegularizedEvolution(population_size=2, sample_size=2, mutation_prob=0.0), max_trials=4)
    exp.run()
    records = exp.trials()
    best_of_first_two = max(records[:2], key=lambda r: r.value)
    # no mutation: every child is a copy of the best of the (whole) population, the last two trials
    assert records[2].architecture == best_of_first_two.architecture
    best_of_1_2 = max(records[1:3], key=lambda r: (r.value, -r.number))
    assert records[3].architecture == best_of_1_2.architecture


def test_a_strategy_object_is_reusable_and_optuna_samplers_work_too(tmp_path):
    strategy = Random()
    a = experiment(strategy, max_trials=3)
    b = experiment(strategy, max_trials=3)
    a.run()
    b.run()
    assert [r.value for r in a.trials()] == [r.value for r in b.trials()]
    plain = experiment(optuna.samplers.RandomSampler(seed=0), max_trials=3)
    plain.run()
    assert [r.state for r in plain.trials()] == ["complete"] * 3
    for r in plain.trials():
        assert r.value == replay(r.architecture, r.number)[1]


def test_a_different_space_or_seed_in_the_same_study_is_refused(tmp_path):
    experiment(Random(), max_trials=1, out_dir=tmp_path).run()
    other = Experiment(lambda: nn.Linear(2, ValueChoice([1, 2], label="w")), FunctionalTrainer(fit), Random(),
                       max_trials=2, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"study 'trainflow-nas' in storage .*journal\.log' was created with another space"):
        other.run()
    with pytest.raises(ValueError, match=r"created with another seed: 0\. Received: seed=5\. Continue it with the same"):
        experiment(Random(), max_trials=2, out_dir=tmp_path, seed=5).run()


# -- behaviour 4: pruning -----------------------------------------------------------------------


def constant_fit(model, calls):
    """Reports the same value three times: 1 for tanh, 0.5 for relu with input [1], else 0."""
    v = 1.0 if isinstance(model.act, nn.Tanh) else (0.5 if model.pick.chosen == [1] else 0.0)
    for step in range(3):
        report_intermediate_result(v)
        calls.append(step)
    report_final_result(v)


def test_pruned_trials_are_recorded_as_pruned():
    calls = []
    exp = Experiment(space, FunctionalTrainer(constant_fit, calls=calls), GridSearch(shuffle=False),
                     pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    exp.run()
    records = exp.trials()
    # by hand: a trial is pruned at its first report when below the median of the completed ones
    done, expected = [], []
    for arch in ALL_ARCHS:
        v = 1.0 if arch["act"] == "tanh" else (0.5 if arch["input"] == [1] else 0.0)
        if done and v < statistics.median(done):
            expected.append(("pruned", [v], None))
        else:
            done.append(v)
            expected.append(("complete", [v, v, v], v))
    assert [(r.state, r.intermediate, r.value) for r in records] == expected
    assert "pruned" in [e[0] for e in expected] and "complete" in [e[0] for e in expected]
    n_pruned = sum(e[0] == "pruned" for e in expected)
    assert len(calls) == 3 * (8 - n_pruned)  # the prune signal stopped the trial at its report


# -- behaviour 6: failures and bad arguments ----------------------------------------------------


def failing_fit(model):
    if isinstance(model.act, nn.ReLU):
        raise RuntimeError("relu is broken")
    fit(model)


def test_a_failing_trial_is_recorded_and_the_experiment_goes_on(caplog):
    exp = Experiment(space, FunctionalTrainer(failing_fit), GridSearch(shuffle=False))
    exp.run()
    records = exp.trials()
    assert [r.state for r in records] == ["failed" if a["act"] == "relu" else "complete" for a in ALL_ARCHS]
    assert {r.error for r in records if r.state == "failed"} == {"RuntimeError: relu is broken"}
    assert all(r.error is None and r.value == replay(r.architecture, r.number)[1] for r in records if r.state == "complete")
    assert exp.best().architecture["act"] == "tanh"


def test_max_failures_stops_the_experiment_with_the_last_error():
    exp = Experiment(space, FunctionalTrainer(failing_fit), GridSearch(shuffle=False), max_failures=2)
    with pytest.raises(RuntimeError, match=r"2 trials failed \(max_failures=2\); the last, trial 2, with RuntimeError: relu is broken"):
        exp.run()
    assert [r.state for r in exp.trials()] == ["failed", "complete", "failed"]


def one_metric_fit(model):
    report_final_result({"accuracy": 0.5})


@pytest.mark.parametrize(
    "fn, objectives, match",
    [
        (one_metric_fit, {"accuracy": "maximize", "params": "minimize"},
         r"report_final_result: objective 'params' of objectives=\{'accuracy': 'maximize', 'params': 'minimize'\} "
         r"was never reported\. Received: \{'accuracy': 0\.5\}"),
        (lambda m: report_final_result({"a": 1, "b": 2}), "maximize",
         r"reported several metrics \['a', 'b'\] but objectives='maximize' does not say which"),
        (lambda m: report_final_result(1.0), {"a": "maximize", "b": "maximize"},
         r"reported 1\.0, but objectives=.* needs a dict with every objective \['a', 'b'\]"),
        (lambda m: None, "maximize", r"trial 0 ended without report_final_result\(\.\.\.\)"),
    ],
)
def test_reports_that_do_not_fit_the_objectives_stop_at_the_first_trial(fn, objectives, match):
    exp = Experiment(space, FunctionalTrainer(fn), Random(), objectives=objectives, max_trials=3)
    with pytest.raises(ValueError, match=match):
        exp.run()
    assert [r.state for r in exp.trials()] == ["failed"]


def test_a_named_single_objective_picks_its_metric():
    exp = Experiment(space, FunctionalTrainer(lambda m: report_final_result({"loss": 2.0, "acc": 0.25})), Random(),
                     objectives={"acc": "maximize"}, max_trials=2)
    exp.run()
    assert [r.value for r in exp.trials()] == [0.25, 0.25]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"space": nn.Linear(2, 2)}, TypeError, r"space must be a function that builds the model .* Received: space=Linear"),
        ({"space": lambda: nn.Linear(2, 2)}, ValueError, r"The space builds no choice"),
        ({"trainer": fit}, TypeError, r"trainer must have an evaluate\(model\) method\. Received: trainer=<function fit"),
        ({"strategy": Random}, TypeError, r"strategy must be an instance\. Received: strategy=Random \(the class\)\. Write Random\(\)"),
        ({"strategy": "tpe"}, TypeError, r"strategy must be Random\(\), GridSearch\(\).* Received: strategy='tpe'"),
        ({"objectives": "max"}, ValueError, r"objectives must be 'maximize', 'minimize' or a dict .* Received: objectives='max'"),
        ({"objectives": {"acc": "up"}}, ValueError, r"maps metric names \(str\) to 'maximize' or 'minimize'\. Received: objectives=\{'acc': 'up'\}"),
        ({"objectives": {}}, TypeError, r"Received: objectives=\{\}"),
        ({"concurrency": 0}, ValueError, r"concurrency is the number of worker processes, an int >= 1\. Received: concurrency=0"),
        ({"concurrency": 2}, ValueError, r"concurrency=2 needs a storage that several processes share\. Received: storage=None, out_dir=None"),
        ({"max_trials": 0}, ValueError, r"max_trials must be None or an int >= 1\. Received: max_trials=0"),
        ({"max_failures": 0}, ValueError, r"max_failures must be None or an int >= 1\. Received: max_failures=0"),
        ({"timeout": -1}, ValueError, r"timeout must be None or a number of seconds > 0\. Received: timeout=-1"),
        ({"seed": -1}, ValueError, r"seed must be an int >= 0\. Received: seed=-1"),
        ({"max_trials": None}, ValueError, r"give max_trials or timeout, or the experiment never ends .* Received: max_trials=None, timeout=None, strategy=Random\(\)"),
        ({"pruner": "median"}, TypeError, r"pruner must be an optuna pruner .* Received: pruner='median'"),
        ({"pruner": optuna.pruners.MedianPruner(), "objectives": {"a": "maximize", "b": "minimize"}}, ValueError,
         r"optuna prunes single-objective studies only"),
        ({"strategy": RegularizedEvolution(), "objectives": {"a": "maximize", "b": "minimize"}}, ValueError,
         r"RegularizedEvolution ranks architectures by one objective\. Received: 2 objectives"),
        ({"storage": 3}, TypeError, r"storage must be a database URL .* Received: storage=3"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    args = {"space": space, "trainer": FunctionalTrainer(fit), "strategy": Random(), "max_trials": 2, **kwargs}
    with pytest.raises(error, match=match):
        Experiment(args.pop("space"), args.pop("trainer"), args.pop("strategy"), **args)


def test_results_before_any_trial_and_bad_export_arguments():
    exp = experiment(Random(), max_trials=1)
    with pytest.raises(ValueError, match=r"no trial has completed yet\. Call run\(\) first"):
        exp.best()
    exp.run()
    with pytest.raises(ValueError, match=r"formatter must be 'dict', 'instance' or 'json'\. Received: formatter='yaml'"):
        exp.export_top_models(formatter="yaml")
    with pytest.raises(ValueError, match=r"top_k must be None or an int >= 1\. Received: top_k=0"):
        exp.export_top_models(top_k=0)


# -- results: records, top models, Pareto front, artifacts --------------------------------------


def test_export_top_models_in_each_format(tmp_path):
    exp = experiment(GridSearch(), out_dir=tmp_path)
    exp.run()
    ranked = sorted(exp.trials(), key=lambda r: -r.value)
    assert exp.export_top_models(top_k=3) == [r.architecture for r in ranked[:3]]
    assert exp.export_top_models(top_k=None) == [r.architecture for r in ranked]
    assert exp.export_top_models(top_k=2, formatter="json") == [json.dumps(r.architecture) for r in ranked[:2]]
    (model,) = exp.export_top_models(formatter="instance")
    best = ranked[0].architecture
    assert model.head.in_features == best["width"]
    assert isinstance(model.act, nn.Tanh if best["act"] == "tanh" else nn.ReLU)
    assert not any(isinstance(m, LayerChoice) for m in model.modules())
    assert exp.best() == ranked[0]


def test_multi_objective_exports_the_pareto_front(tmp_path):
    def two(model):
        fit(model)
        # the second objective: parameters, to minimise
        report_final_result({"score": nas_worker_score(model), "params": sum(p.numel() for p in model.parameters())})

    exp = Experiment(space, FunctionalTrainer(two), GridSearch(), objectives={"score": "maximize", "params": "minimize"},
                     out_dir=tmp_path)
    exp.run()
    records = exp.trials()
    assert all(set(r.value) == {"score", "params"} for r in records)

    def dominated(r):
        return any(
            o.value["score"] >= r.value["score"] and o.value["params"] <= r.value["params"] and o.value != r.value
            for o in records
        )

    front = [r.architecture for r in records if not dominated(r)]
    assert exp.export_top_models(top_k=None) == front
    assert exp.export_top_models(top_k=1) == front[:1]
    assert 1 <= len(front) < 8
    assert json.loads((tmp_path / "pareto_archs.json").read_text()) == front
    assert not (tmp_path / "best_arch.json").exists()
    with open(tmp_path / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(float(x["score"]), int(float(x["params"]))) for x in rows] == [(r.value["score"], r.value["params"]) for r in records]
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "history.png").shape[:2] == (640, 600)  # one panel per objective
    with pytest.raises(ValueError, match=r"has several objectives, so no single best\. Use export_top_models\(top_k=None\)"):
        exp.best()


def nas_worker_score(model):
    with torch.no_grad():
        return -torch.nn.functional.mse_loss(model(nas_worker.X), nas_worker.Y).item()


def test_trials_records_and_artifacts(tmp_path, capsys):
    exp = experiment(Random(), max_trials=4, out_dir=tmp_path, timeout=60)
    exp.run()
    assert capsys.readouterr().out == ""  # not a terminal: no progress display
    records = exp.trials()
    assert all(r.seconds is not None and 0 < r.seconds < 60 for r in records)
    with open(tmp_path / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [list(row) for row in rows[:1]] == [["number", "state", "value", "seconds", "error", "width", "input", "act"]]
    assert [(int(x["number"]), x["state"], float(x["value"]), int(x["width"]), json.loads(x["input"]), x["act"]) for x in rows] == [
        (r.number, r.state, r.value, r.architecture["width"], r.architecture["input"], r.architecture["act"]) for r in records
    ]
    best = json.loads((tmp_path / "best_arch.json").read_text())
    assert best == exp.best().architecture
    with fixed_arch(tmp_path / "best_arch.json"):
        model = space()
    assert model.head.in_features == best["width"]
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "history.png")
    assert image.shape[:2] == (320, 600)  # 6 x 3.2 inches at 100 dpi
    assert (tmp_path / "journal.log").stat().st_size > 0


def test_progress_display_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "160")
    exp = Experiment(space, FunctionalTrainer(failing_fit), GridSearch(shuffle=False), max_trials=3)
    exp.run()
    out = capsys.readouterr().out
    best = max(r.value for r in exp.trials() if r.state == "complete")
    assert f"done 1 · running 0 · pruned 0 · failed 2 · best {best:.4g}" in out
    assert "3/3" in out
    quiet = Experiment(space, FunctionalTrainer(failing_fit), GridSearch(shuffle=False), max_trials=3)
    quiet.run(progress=False)
    assert capsys.readouterr().out == ""


def test_without_a_pruner_no_trial_is_pruned():
    # optuna's create_study would fall back to a MedianPruner: these reports far below the median
    # would be pruned by it
    def narrow_is_better(model):
        for _ in range(3):
            report_intermediate_result(1.0 if model.head.in_features == 4 else 0.0)
        report_final_result(1.0 if model.head.in_features == 4 else 0.0)

    exp = Experiment(space, FunctionalTrainer(narrow_is_better), GridSearch(shuffle=False))
    exp.run()
    assert [r.state for r in exp.trials()] == ["complete"] * 8
    assert [len(r.intermediate) for r in exp.trials()] == [3] * 8


def test_timeout_stops_starting_trials():
    def slow(model):
        time.sleep(0.3)
        report_final_result(1.0)

    exp = Experiment(space, FunctionalTrainer(slow), Random(), timeout=0.5)
    start = datetime.datetime.now()
    exp.run()
    deadline = start + datetime.timedelta(seconds=0.5)
    trials = exp.study.trials
    assert all(t.datetime_start < deadline for t in trials)  # no trial starts after the timeout
    assert trials[-1].datetime_complete >= deadline  # and it did not stop before it
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials) and len(trials) >= 1


# -- behaviour 3 (one machine) and the retry of a killed worker's trial -------------------------


@pytest.mark.slow
def test_two_local_workers_share_one_journal_without_losing_or_repeating_a_trial(tmp_path):
    exp = experiment(Random(), max_trials=6, concurrency=2, out_dir=tmp_path)
    exp.run()
    records = exp.trials()
    assert [r.number for r in records] == list(range(6))
    assert [r.state for r in records] == ["complete"] * 6
    for r in records:  # each trial ran once, with its own seed: its value is the hand replay's
        assert r.value == replay(r.architecture, r.number)[1]
    pids = {t.user_attrs["trainflow.pid"] for t in exp.study.trials}
    assert len(pids) == 2 and os.getpid() not in pids
    one = experiment(Random(), max_trials=6)
    one.run()
    assert [(r.architecture, r.value) for r in one.trials()][:1] == [(records[0].architecture, records[0].value)]


@pytest.mark.slow
def test_a_workers_setup_error_is_raised_by_run(tmp_path):
    exp = Experiment(space, FunctionalTrainer(one_metric_fit), Random(), objectives={"accuracy": "maximize", "params": "minimize"},
                     max_trials=4, concurrency=2, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"objective 'params' of objectives=.* was never reported"):
        exp.run()
    assert [r.state for r in exp.trials()] == ["failed", "failed"]  # each worker stops at its first trial


@pytest.mark.slow
def test_two_workers_share_one_grid_each_architecture_once(tmp_path):
    exp = experiment(GridSearch(), concurrency=2, out_dir=tmp_path)
    exp.run()
    records = exp.trials()
    assert [r.number for r in records] == list(range(8))
    assert sorted(map(json.dumps, archs(records))) == sorted(map(json.dumps, ALL_ARCHS))
    alone = experiment(GridSearch())
    alone.run()
    assert [(r.architecture, r.value) for r in records] == [(r.architecture, r.value) for r in alone.trials()]
    assert len({t.user_attrs["trainflow.pid"] for t in exp.study.trials}) == 2


def worker(storage, name, max_trials, *extra):
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "nas_worker.py"), str(storage), name, str(max_trials), *extra],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.slow
def test_a_trial_of_a_killed_worker_is_failed_and_retried_with_the_same_result(tmp_path):
    storage, hang = tmp_path / "journal.log", tmp_path / "hanging"
    child = worker(storage, "killed", 4, "--hang-on-call", "3", "--hang-file", str(hang))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not hang.exists():
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the worker never reached its third trial"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=TIMEOUT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    resumed = experiment(Random(), max_trials=4, storage=storage, name="killed")
    assert [r.state for r in resumed.trials()] == ["complete", "complete", "running"]
    resumed.run()
    records = resumed.trials()
    assert [r.state for r in records] == ["complete", "complete", "failed", "complete", "complete"]
    assert records[2].error.startswith(f"its worker process {child.pid} on ") and records[2].error.endswith(" died")
    assert records[3].architecture == records[2].architecture  # the retry
    whole = experiment(Random(), max_trials=4)
    whole.run()
    assert [(r.architecture, r.value) for r in records if r.state == "complete"] == [
        (r.architecture, r.value) for r in whole.trials()
    ]


def test_an_interrupted_trial_is_retried_when_the_experiment_runs_again(tmp_path):
    calls = []

    def interrupted(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        fit(model)

    exp = Experiment(space, FunctionalTrainer(interrupted), Random(), max_trials=3, out_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    assert [(r.state, r.error) for r in exp.trials()] == [("complete", None), ("failed", "interrupted"), ("waiting", None)]
    exp.run()
    whole = experiment(Random(), max_trials=3)
    whole.run()
    assert [(r.architecture, r.value) for r in exp.trials() if r.state == "complete"] == [
        (r.architecture, r.value) for r in whole.trials()
    ]


def test_evolution_minimising_takes_the_lowest_value_as_parent():
    exp = experiment(RegularizedEvolution(population_size=2, sample_size=2, mutation_prob=0.0), objectives="minimize",
                     max_trials=3, seed=4)
    exp.run()
    records = exp.trials()
    assert records[0].architecture != records[1].architecture  # else the test proves nothing (seed 4)
    assert records[2].architecture == min(records[:2], key=lambda r: r.value).architecture


def test_a_trial_lost_on_another_machine_is_retried_after_its_heartbeat_stops(tmp_path, monkeypatch):
    # a database storage: optuna's heartbeat finds a running trial whose worker stopped beating
    import trainflow.nas.experiment as experiment_module

    monkeypatch.setattr(experiment_module, "_HEARTBEAT_S", 1)
    monkeypatch.setattr(experiment_module, "_GRACE_S", 1)
    url = f"sqlite:///{tmp_path / 'nas.db'}"
    exp = experiment(Random(), max_trials=2, storage=url, name="lost")
    with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
        lost = exp.study.ask()  # as another machine would, which then goes down
    lost.set_user_attr("trainflow.host", "another-machine")
    exp.study._storage.record_heartbeat(lost._trial_id)
    time.sleep(2.5)
    exp.run()
    records = exp.trials()
    assert [r.state for r in records] == ["failed", "complete", "complete"]
    assert exp.study.trials[1].system_attrs["failed_trial"] == 0
    whole = experiment(Random(), max_trials=2)
    whole.run()
    assert [(r.architecture, r.value) for r in records[1:]] == [(r.architecture, r.value) for r in whole.trials()]


class Regression(TrainModule):
    """Seed 002's shape: trains in training_step, reports per epoch and at teardown."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_validation_epoch_end(self):
        report_intermediate_result(-self.trainer.callback_metrics["val_loss"].item())

    def teardown(self, stage):
        report_final_result(-self.trainer.callback_metrics["val_loss"].item())


def module_trainer():
    data = torch.utils.data.TensorDataset(nas_worker.X, nas_worker.Y)
    return ModuleTrainer(Regression, train_data=torch.utils.data.DataLoader(data, batch_size=16, shuffle=True),
                         val_data=torch.utils.data.DataLoader(data, batch_size=16), epochs=2)


def test_a_module_trainer_trial_replays_by_hand_to_the_bit():
    exp = Experiment(space, module_trainer(), Random(), max_trials=3, seed=2)
    exp.run()
    records = exp.trials()
    assert [r.state for r in records] == ["complete"] * 3 and len({r.value for r in records}) == 3
    for r in records:
        intermediate, final = replay(r.architecture, r.number, seed=2, fn=module_trainer().evaluate)
        assert (r.intermediate, r.value) == (intermediate, final) and len(intermediate) == 2
