"""Strategies: stateless samplers (a restart replays them), their arguments, the trial index."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from optuna.distributions import CategoricalDistribution

from trainflow.nas import TPE, GridSearch, Random, RegularizedEvolution
from trainflow.nas.strategies import derive_seed, trial_index

CHOICES = {"op": ["a", "b", "c"], "width": [1, 2, 4, 8]}


def objective(trial):
    op = trial.suggest_categorical("op", CHOICES["op"])
    width = trial.suggest_categorical("width", CHOICES["width"])
    return {"a": 0.0, "b": 1.0, "c": 2.0}[op] - abs(width - 4)


def params(study):
    return [(t.params["op"], t.params["width"]) for t in study.trials]


@pytest.mark.parametrize("make", [Random, lambda: TPE(n_startup_trials=3)], ids=["random", "tpe"])
def test_a_new_sampler_object_on_the_same_storage_continues_the_same_sequence(make):
    whole = optuna.create_study(sampler=make(), direction="maximize")
    whole.optimize(objective, n_trials=10)
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=make(), direction="maximize")
    first.optimize(objective, n_trials=5)
    again = optuna.load_study(storage=storage, study_name="s", sampler=make())  # as after a restart
    again.optimize(objective, n_trials=5)
    assert params(again) == params(whole)
    assert [t.value for t in again.trials] == [t.value for t in whole.trials]
    assert len(set(params(whole))) > 3


def test_optunas_own_random_sampler_does_not_replay_after_a_restart():
    # why the strategies re-seed per trial: a sampler seeded once starts its sequence again
    whole = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    whole.optimize(objective, n_trials=10)
    storage = optuna.storages.InMemoryStorage()
    first = optuna.create_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    first.optimize(objective, n_trials=5)
    again = optuna.load_study(storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))
    again.optimize(objective, n_trials=5)
    assert params(again)[5:] == params(whole)[:5]  # the first five again, not trials 5-9
    assert params(again) != params(whole)


def test_the_trial_index_skips_retries_and_a_retry_keeps_its_originals_index():
    trials = [
        create_trial(state=TrialState.COMPLETE, value=0.0),
        create_trial(state=TrialState.FAIL),
        create_trial(state=TrialState.COMPLETE, value=0.0),
        create_trial(state=TrialState.COMPLETE, value=0.0, system_attrs={"failed_trial": 1}),
        create_trial(state=TrialState.FAIL, system_attrs={"failed_trial": 1}),
        create_trial(state=TrialState.COMPLETE, value=0.0, system_attrs={"failed_trial": 1}),
        create_trial(state=TrialState.COMPLETE, value=0.0),
    ]
    for number, t in enumerate(trials):
        t.number = number
    assert [trial_index(trials, t) for t in trials] == [0, 1, 2, 1, 1, 1, 3]


def test_derived_seeds_differ_by_seed_index_and_stream_and_never_change():
    seeds = {derive_seed(s, i, k) for s in range(3) for i in range(5) for k in range(2)}
    assert len(seeds) == 30
    assert derive_seed(0, 0, 1) == derive_seed(0, 0, 1)
    assert all(0 <= s < 2**32 for s in seeds)


def test_grid_search_needs_the_experiment_space():
    study = optuna.create_study(sampler=GridSearch())
    study.optimize(objective, n_trials=1, catch=(RuntimeError,))
    assert study.trials[0].state == TrialState.FAIL
    with pytest.raises(RuntimeError, match=r"GridSearch: parameter 'op' is not in the experiment's search space \[\]"):
        optuna.create_study(sampler=GridSearch()).optimize(objective, n_trials=1)


def test_grid_points_cover_the_product_once():
    space = {k: CategoricalDistribution(v) for k, v in CHOICES.items()}
    for shuffle in (False, True):
        grid = GridSearch(shuffle=shuffle)._bind(0, space, 1)
        points = [grid.point(i) for i in range(grid.size())]
        assert grid.size() == 12
        assert sorted((p["op"], p["width"]) for p in points) == sorted((o, w) for o in CHOICES["op"] for w in CHOICES["width"])
        if not shuffle:
            assert points[:5] == [{"op": "a", "width": 1}, {"op": "a", "width": 2}, {"op": "a", "width": 4},
                                  {"op": "a", "width": 8}, {"op": "b", "width": 1}]
    with pytest.raises(RuntimeError, match=r"the grid has 12 points; trial index 12 is beyond it"):
        grid.point(12)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: TPE(seed=1), TypeError, r"TPE: seed is not an option here.* Received: seed=1\. Pass Experiment\(\.\.\., seed=\.\.\.\)"),
        (lambda: TPE(n_startup=3), TypeError, r"unexpected keyword argument 'n_startup'"),
        (lambda: GridSearch(shuffle="yes"), TypeError, r"GridSearch: shuffle must be a bool\. Received: shuffle='yes'"),
        (lambda: RegularizedEvolution(population_size=0), ValueError,
         r"population_size must be a positive int\. Received: population_size=0"),
        (lambda: RegularizedEvolution(sample_size=2.5), ValueError, r"sample_size must be a positive int\. Received: sample_size=2\.5"),
        (lambda: RegularizedEvolution(population_size=3, sample_size=4), ValueError,
         r"sample_size must be at most population_size .* Received: sample_size=4, population_size=3"),
        (lambda: RegularizedEvolution(mutation_prob=1.5), ValueError,
         r"mutation_prob must be a probability in \[0, 1\]\. Received: mutation_prob=1\.5"),
    ],
)
def test_bad_strategy_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_reprs():
    assert repr(Random()) == "Random()"
    assert repr(TPE(n_startup_trials=4, multivariate=True)) == "TPE(n_startup_trials=4, multivariate=True)"
    assert repr(GridSearch()) == "GridSearch(shuffle=True)"
    assert repr(RegularizedEvolution(4, 2, 0.25)) == "RegularizedEvolution(population_size=4, sample_size=2, mutation_prob=0.25)"
