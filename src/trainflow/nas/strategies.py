"""Search strategies: optuna samplers that a restarted experiment replays exactly.

Each strategy is an ``optuna.samplers.BaseSampler``. Its decisions for a trial depend only on
the finished trials in the storage and on a generator seeded from (experiment seed, trial index):
no state lives in the sampler object, so a second process, or the same experiment started
again after a crash, makes the same choices. Any other optuna sampler is accepted by
:class:`~trainflow.nas.Experiment` as well (its own state is then its own affair).

The trial *index* is the position of a trial in the experiment's sequence: its optuna number,
less the retries of crashed trials before it; a retry keeps the index of the trial it repeats.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = ["Random", "GridSearch", "TPE", "RegularizedEvolution"]

# The system attribute by which optuna's RetryFailedTrialCallback marks a retry: the number of the
# first trial of the chain (a retry of a retry still names the original).
RETRY_OF = "failed_trial"

# Independent streams drawn from one (seed, index) pair.
_SAMPLER_STREAM = 0
TRIAL_STREAM = 1


def derive_seed(seed: int, index: int, stream: int) -> int:
    """A 32-bit seed for one purpose (``stream``) of trial ``index`` of an experiment seeded ``seed``.

    Example:
        >>> derive_seed(0, 3, TRIAL_STREAM) == derive_seed(0, 3, TRIAL_STREAM) != derive_seed(0, 4, TRIAL_STREAM)
        True
    """
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1)[0])


def trial_index(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int:
    """``trial``'s position in the sequence: a retry repeats its original's index (see module doc).

    Example:
        >>> from optuna.trial import TrialState, create_trial
        >>> trials = [create_trial(state=TrialState.FAIL), create_trial(state=TrialState.COMPLETE, value=1.0,
        ...           system_attrs={RETRY_OF: 0}), create_trial(state=TrialState.COMPLETE, value=1.0)]
        >>> for number, t in enumerate(trials): t.number = number
        >>> [trial_index(trials, t) for t in trials]
        [0, 0, 1]
    """
    number = trial.system_attrs.get(RETRY_OF, trial.number)
    return number - sum(1 for t in trials if t.number < number and RETRY_OF in t.system_attrs)


class _Strategy(BaseSampler):
    """Shared part: the experiment seed and the search space, bound by the experiment."""

    def __init__(self) -> None:
        self._seed = 0
        self._space: dict[str, CategoricalDistribution] = {}

    def _bind(self, seed: int, space: dict[str, CategoricalDistribution], n_objectives: int) -> _Strategy:
        """A copy of this strategy for one experiment (the strategy object itself stays reusable)."""
        bound = copy.copy(self)
        bound._seed = seed
        bound._space = dict(space)
        return bound

    def _rng(self, study: Study, trial: FrozenTrial) -> np.random.Generator:
        index = trial_index(study.get_trials(deepcopy=False), trial)
        return np.random.default_rng(derive_seed(self._seed, index, _SAMPLER_STREAM))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _FreshOptunaSampler(_Strategy):
    """Delegates each trial to a new optuna sampler seeded from (seed, trial index)."""

    def __init__(self) -> None:
        super().__init__()
        self._per_trial: dict[int, BaseSampler] = {}

    def _bind(self, seed, space, n_objectives):
        bound = super()._bind(seed, space, n_objectives)
        bound._per_trial = {}
        return bound

    def _make(self, seed: int) -> BaseSampler:
        raise NotImplementedError

    def _for(self, study: Study, trial: FrozenTrial) -> BaseSampler:
        inner = self._per_trial.get(trial._trial_id)
        if inner is None:
            index = trial_index(study.get_trials(deepcopy=False), trial)
            inner = self._per_trial[trial._trial_id] = self._make(derive_seed(self._seed, index, _SAMPLER_STREAM))
        return inner

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        inner = self._per_trial.pop(trial._trial_id, None)
        if inner is not None:
            inner.after_trial(study, trial, state, values)


class Random(_FreshOptunaSampler):
    """Every architecture drawn uniformly at random (optuna's ``RandomSampler``, re-seeded per trial).

    Example:
        >>> import optuna
        >>> from trainflow.nas import Random
        >>> study = optuna.create_study(sampler=Random())
        >>> study.optimize(lambda t: t.suggest_categorical("op", ["a", "b"]) == "a", n_trials=3)
        >>> [t.params["op"] for t in study.trials] == [t.params["op"] for t in _replay(Random(), 3)]
        True
    """

    def _make(self, seed: int) -> BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)


class TPE(_FreshOptunaSampler):
    """Tree-structured Parzen estimator: optuna's ``TPESampler(**options)``, re-seeded per trial.

    Its model is rebuilt each trial from the finished trials in the storage, so it carries no state.

    Args:
        **options: passed to ``optuna.samplers.TPESampler`` (``n_startup_trials``,
            ``multivariate``, ...); ``seed`` is not one of them (the experiment's seed is used).

    Example:
        >>> from trainflow.nas import TPE
        >>> TPE(n_startup_trials=4)
        TPE(n_startup_trials=4)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        if "seed" in options:
            raise TypeError(
                "TPE: seed is not an option here; the experiment seeds every trial from its own seed. "
                f"Received: seed={options['seed']!r}. Pass Experiment(..., seed=...) instead."
            )
        optuna.samplers.TPESampler(**options)  # unknown or bad options fail here, not in a trial
        self.options = options

    def _make(self, seed: int) -> BaseSampler:
        with warnings.catch_warnings():  # optuna's ExperimentalWarning for an option was shown at construction
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, **self.options)

    def __repr__(self) -> str:
        return f"TPE({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


class GridSearch(_Strategy):
    """Every architecture of the space exactly once, then the experiment stops.

    Trial ``i`` takes grid point ``i`` of the labels' product (in a seeded random order when
    ``shuffle``), so workers sharing a storage never take the same point.

    Args:
        shuffle: visit the grid in an order drawn from the experiment seed (default) rather than
            in the product order of the search space.

    Example:
        >>> from trainflow.nas import GridSearch
        >>> GridSearch(shuffle=False)
        GridSearch(shuffle=False)
    """

    def __init__(self, shuffle: bool = True) -> None:
        super().__init__()
        if not isinstance(shuffle, bool):
            raise TypeError(f"GridSearch: shuffle must be a bool. Received: shuffle={shuffle!r}.")
        self.shuffle = shuffle

    def size(self) -> int:
        """The number of architectures in the bound space.

        Example:
            >>> from optuna.distributions import CategoricalDistribution as C
            >>> GridSearch()._bind(0, {"op": C(["a", "b"]), "w": C([1, 2, 3])}, 1).size()
            6
        """
        return math.prod(len(d.choices) for d in self._space.values())

    def point(self, index: int) -> dict[str, Any]:
        """The grid point of trial ``index`` (its optuna parameters).

        Example:
            >>> from optuna.distributions import CategoricalDistribution as C
            >>> GridSearch(shuffle=False)._bind(0, {"op": C(["a", "b"]), "w": C([1, 2, 3])}, 1).point(4)
            {'op': 'b', 'w': 2}
        """
        if not self._space:
            raise RuntimeError("GridSearch needs an Experiment's search space: pass it to Experiment(...).")
        size = self.size()
        if not 0 <= index < size:
            raise RuntimeError(f"GridSearch: the grid has {size} points; trial index {index} is beyond it.")
        if self.shuffle:
            index = int(np.random.default_rng(derive_seed(self._seed, 0, 2)).permutation(size)[index])
        names = list(self._space)
        grid = itertools.product(*(self._space[n].choices for n in names))
        return dict(zip(names, next(itertools.islice(grid, index, None))))

    def infer_relative_search_space(self, study, trial):
        return dict(self._space)

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        return self.point(trial_index(study.get_trials(deepcopy=False), trial))

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise RuntimeError(
            f"GridSearch: parameter {param_name!r} is not in the experiment's search space "
            f"{list(self._space)}; a grid covers only the space it was bound to."
        )

    def __repr__(self) -> str:
        return f"GridSearch(shuffle={self.shuffle})"


class RegularizedEvolution(_Strategy):
    """Aging evolution (Real et al., 2019): mutate the best of a random sample of the population.

    The first ``population_size`` trials are random. After that, each trial takes the
    ``population_size`` most recent finished trials (by trial number) as the population,
    draws ``sample_size`` of them, and mutates the best one: each label is re-drawn
    uniformly with probability ``mutation_prob``. Only completed trials count; single objective.

    Args:
        population_size: the number of most recent trials that form the population.
        sample_size: how many of the population compete for parenthood (``<= population_size``).
        mutation_prob: the probability that each label of the parent is re-drawn.

    Example:
        >>> from trainflow.nas import RegularizedEvolution
        >>> RegularizedEvolution(population_size=8, sample_size=4, mutation_prob=0.5)
        RegularizedEvolution(population_size=8, sample_size=4, mutation_prob=0.5)
    """

    def __init__(self, population_size: int = 20, sample_size: int = 5, mutation_prob: float = 0.05) -> None:
        super().__init__()
        for arg, value in (("population_size", population_size), ("sample_size", sample_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"RegularizedEvolution: {arg} must be a positive int. Received: {arg}={value!r}."
                )
        if sample_size > population_size:
            raise ValueError(
                "RegularizedEvolution: sample_size must be at most population_size (the sample is drawn "
                f"from the population). Received: sample_size={sample_size}, population_size={population_size}."
            )
        if isinstance(mutation_prob, bool) or not isinstance(mutation_prob, (int, float)) or not 0 <= mutation_prob <= 1:
            raise ValueError(
                f"RegularizedEvolution: mutation_prob must be a probability in [0, 1]. "
                f"Received: mutation_prob={mutation_prob!r}."
            )
        self.population_size = population_size
        self.sample_size = sample_size
        self.mutation_prob = float(mutation_prob)

    def _bind(self, seed, space, n_objectives):
        if n_objectives != 1:
            raise ValueError(
                "RegularizedEvolution ranks architectures by one objective. Received: "
                f"{n_objectives} objectives. Use TPE() or Random() for a multi-objective search."
            )
        return super()._bind(seed, space, n_objectives)

    def infer_relative_search_space(self, study, trial):
        return dict(self._space)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space) -> dict[str, Any]:
        if not search_space:
            return {}
        rng = self._rng(study, trial)
        names = list(search_space)
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number < trial.number]
        done = [t for t in done if all(n in t.params for n in names)]
        if len(done) < self.population_size:
            return {n: search_space[n].choices[rng.integers(len(search_space[n].choices))] for n in names}
        population = sorted(done, key=lambda t: t.number)[-self.population_size :]
        picked = [population[i] for i in sorted(rng.choice(len(population), self.sample_size, replace=False))]
        sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
        parent = max(picked, key=lambda t: (sign * t.value, -t.number))  # ties: the older trial
        child = {}
        for n in names:
            choices = search_space[n].choices
            mutate = rng.random() < self.mutation_prob
            child[n] = choices[rng.integers(len(choices))] if mutate else parent.params[n]
        return child

    def sample_independent(self, study, trial, param_name, param_distribution):
        raise RuntimeError(
            f"RegularizedEvolution: parameter {param_name!r} is not in the experiment's search space "
            f"{list(self._space)}."
        )

    def __repr__(self) -> str:
        return (
            f"RegularizedEvolution(population_size={self.population_size}, sample_size={self.sample_size}, "
            f"mutation_prob={self.mutation_prob})"
        )


def _replay(strategy: BaseSampler, n: int) -> list[FrozenTrial]:
    """A fresh study sampled ``n`` times by ``strategy`` (doctest helper: the same choices again)."""
    study = optuna.create_study(sampler=strategy)
    study.optimize(lambda t: t.suggest_categorical("op", ["a", "b"]) == "a", n_trials=n)
    return study.trials
