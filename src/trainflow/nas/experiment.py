"""A multi-trial experiment: sample architectures, train each one, keep the results in a storage.

The storage is optuna's: trials, their parameters and values live there, so an experiment
started again with the same storage and name continues where it stopped, several worker
processes (or machines, with a database URL) share one experiment, and optuna's own tools
(``optuna-dashboard``, ``optuna.visualization``) read it.

Per trial, a worker: asks the strategy for an architecture, seeds Python, NumPy and torch from
(experiment seed, trial index), builds the model under ``fixed_arch``, and calls
``trainer.evaluate(model)`` with the trial's reports routed to the study.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import random
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from trainflow.nas.space import fixed_arch, search_space
from trainflow.nas.strategies import RETRY_OF, TRIAL_STREAM, GridSearch, _Strategy, derive_seed, trial_index
from trainflow.nas.trial import _reporting

__all__ = ["Experiment", "TrialRecord"]

logger = logging.getLogger("trainflow.nas")

# User attributes kept on each optuna trial (optuna-dashboard shows them).
_INTERMEDIATE = "trainflow.intermediate"
_ERROR = "trainflow.error"
_HOST = "trainflow.host"
_PID = "trainflow.pid"
_SKIPPED = "trainflow.skipped"
# Study attributes: what the experiment was created with, checked when it is opened again.
_STUDY_SPACE = "trainflow.space"
_STUDY_OBJECTIVES = "trainflow.objectives"
_STUDY_SEED = "trainflow.seed"

# A database worker that stops beating for GRACE seconds (a machine lost) has its trial retried.
_HEARTBEAT_S = 10
_GRACE_S = 30

# optuna's retry of a failed trial: a new WAITING trial with the same parameters, marked with the
# original's number (optuna >= 4.9 names it for heartbeats; older releases RetryFailedTrialCallback).
_Retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
_RETRY_KWARG = (
    "heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback") else "failed_trial_callback"
)

_STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


class _ReportError(ValueError):
    """A trial's reports do not fit the experiment's objectives: a setup error, not a trial failure."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial of an experiment, as :meth:`Experiment.trials` lists it.

    Attributes:
        number: optuna's trial number (its order of creation in the storage).
        architecture: ``{label: option}``, the form ``fixed_arch`` accepts.
        intermediate: the values given to ``report_intermediate_result``, in order.
        value: the final value (a dict by objective name when there are several); None unless complete.
        state: ``"complete"``, ``"pruned"``, ``"failed"``, ``"running"`` or ``"waiting"``.
        seconds: wall time of the trial, None while it runs.
        error: for a failed trial, what went wrong.

    Example:
        >>> TrialRecord(0, {"op": "tanh"}, [0.5], 0.75, "complete", 1.5, None).value
        0.75
    """

    number: int
    architecture: dict[str, Any]
    intermediate: list[Any]
    value: float | dict[str, float] | None
    state: str
    seconds: float | None
    error: str | None


def _encode(option: Any) -> Any:
    """An optuna categorical choice for an option: InputChoice's index lists become JSON strings."""
    return json.dumps(option) if isinstance(option, list) else option


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b  # 1 and True are different options


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _database_url(url: str) -> str:
    """``postgresql://`` means psycopg2 when only psycopg2 is installed (the ``postgresql`` extra).

    SQLAlchemy 2.1 made psycopg 3 the default driver of a bare ``postgresql://`` URL; an explicit
    driver (``postgresql+psycopg://``) is left as it is.

    Example:
        >>> _database_url("sqlite:///nas.db")
        'sqlite:///nas.db'
    """
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """optuna's per-trial INFO lines off while the experiment runs (its own progress display speaks)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(verbosity, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


class _Reporter:
    """Routes one trial's reports to its optuna trial (and to pruning, single objective)."""

    def __init__(self, experiment: Experiment, trial: optuna.Trial) -> None:
        self.experiment = experiment
        self.trial = trial
        self.intermediate_values: list[Any] = []
        self.final_value: Any = None

    def intermediate(self, value: Any) -> None:
        step = len(self.intermediate_values)
        self.intermediate_values.append(value)  # stored with the trial once it ends (one write, not one per report)
        if len(self.experiment.directions) == 1:
            self.trial.report(self.experiment._values(value, "report_intermediate_result")[0], step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} by {type(self.experiment.pruner).__name__}")

    def final(self, value: Any) -> None:
        self.final_value = value


class Experiment:
    """Search a space with a strategy: train each sampled architecture, keep every result.

    Args:
        space: a function that builds the model, with choices (``LayerChoice``, ``InputChoice``,
            ``ValueChoice``) inside.
        trainer: an evaluator: any object with ``.evaluate(model)`` that trains ``model`` and calls
            ``report_final_result`` (``FunctionalTrainer``, ``ModuleTrainer``).
        strategy: ``Random()``, ``GridSearch()``, ``TPE(...)``, ``RegularizedEvolution(...)``, or
            any ``optuna.samplers.BaseSampler``.
        objectives: ``"maximize"``, ``"minimize"``, or ``{name: "maximize"|"minimize"}`` (several
            entries: a multi-objective search; trials then report a dict with every name).
        max_trials: the number of trials in the experiment, counting those already in the storage
            (a resumed experiment runs the rest). A ``GridSearch`` stops at the size of its grid.
        timeout: seconds after which no new trial starts.
        concurrency: worker processes on this machine sharing the storage.
        storage: None (a journal file ``out_dir/journal.log``, or memory without ``out_dir``),
            a path to a journal file, or a database URL optuna supports (``"postgresql://..."``)
            for workers on several machines.
        name: the study name in the storage (default ``"trainflow-nas"``); the same storage and
            name continue the same experiment.
        seed: seeds every trial (with its index) and the strategy.
        pruner: an ``optuna.pruners.BasePruner`` (single objective), fed by
            ``report_intermediate_result``.
        out_dir: where ``trials.csv``, ``best_arch.json`` and ``history.png`` are written.
        max_failures: stop the experiment (``run`` raises) once this many trials have failed;
            None lets it go on.

    Example:
        >>> from torch import nn
        >>> from trainflow.nas import Experiment, GridSearch, LayerChoice
        >>> from trainflow.nas import report_final_result
        >>> from trainflow.nas import FunctionalTrainer
        >>> def space():
        ...     return nn.Sequential(nn.Linear(2, 2), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"))
        >>> def fit(model):
        ...     report_final_result(float(isinstance(model[1], nn.Tanh)))
        >>> exp = Experiment(space, FunctionalTrainer(fit), GridSearch())
        >>> exp.run()
        >>> exp.best().architecture, exp.best().value
        ({'act': 'tanh'}, 1.0)
        >>> [t.state for t in exp.trials()]
        ['complete', 'complete']
    """

    def __init__(
        self,
        space: Callable[[], nn.Module],
        trainer: Any,
        strategy: Any,
        *,
        objectives: str | dict[str, str] = "maximize",
        max_trials: int | None = None,
        timeout: float | None = None,
        concurrency: int = 1,
        storage: str | os.PathLike | None = None,
        name: str | None = None,
        seed: int = 0,
        pruner: optuna.pruners.BasePruner | None = None,
        out_dir: str | os.PathLike | None = None,
        max_failures: int | None = None,
    ) -> None:
        if not callable(space) or isinstance(space, nn.Module):
            raise TypeError(
                "Experiment: space must be a function that builds the model (def space() -> nn.Module), "
                f"called once per trial. Received: space={space!r}. Wrap the model's construction in a function."
            )
        self.space = space
        self.search_space = search_space(space)  # builds it once: no choice -> a clear error here
        self._choices = {label: tuple(_encode(o) for o in options) for label, options in self.search_space.items()}
        if not callable(getattr(trainer, "evaluate", None)):
            raise TypeError(
                "Experiment: trainer must have an evaluate(model) method. Received: "
                f"trainer={trainer!r}. Use FunctionalTrainer(fn) or ModuleTrainer(module, ...)."
            )
        self.trainer = trainer
        self.objective_names, self.directions = self._check_objectives(objectives)
        self.objectives = objectives
        for arg, value, low in (("max_trials", max_trials, 1), ("max_failures", max_failures, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"Experiment: {arg} must be None or an int >= {low}. Received: {arg}={value!r}.")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(
                "Experiment: concurrency is the number of worker processes, an int >= 1. "
                f"Received: concurrency={concurrency!r}."
            )
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"Experiment: timeout must be None or a number of seconds > 0. Received: timeout={timeout!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Experiment: seed must be an int >= 0. Received: seed={seed!r}.")
        if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
            raise TypeError(
                f"Experiment: pruner must be an optuna pruner such as optuna.pruners.MedianPruner(). "
                f"Received: pruner={pruner!r}."
            )
        if pruner is not None and len(self.directions) > 1:
            raise ValueError(
                f"Experiment: optuna prunes single-objective studies only. Received: pruner={pruner!r} with "
                f"objectives={objectives!r}. Drop the pruner or search one objective."
            )
        self.sampler = self._check_strategy(strategy, seed)
        self.max_trials, self.timeout, self.concurrency, self.seed = max_trials, timeout, concurrency, seed
        self.pruner, self.max_failures = pruner, max_failures
        self.budget = max_trials
        if isinstance(self.sampler, GridSearch):
            size = self.sampler.size()
            self.budget = size if max_trials is None else min(max_trials, size)
        if self.budget is None and timeout is None:
            raise ValueError(
                "Experiment: give max_trials or timeout, or the experiment never ends (only GridSearch stops "
                f"by itself). Received: max_trials=None, timeout=None, strategy={strategy!r}."
            )
        self.out_dir = None if out_dir is None else Path(out_dir)
        if storage is not None and not isinstance(storage, (str, os.PathLike)):
            raise TypeError(
                "Experiment: storage must be a database URL (e.g. 'postgresql://user:pass@host/db') or the path "
                f"of a journal file. Received: storage={storage!r}."
            )
        if storage is None and self.out_dir is None and concurrency > 1:
            raise ValueError(
                f"Experiment: concurrency={concurrency} needs a storage that several processes share. "
                "Received: storage=None, out_dir=None. Pass out_dir=... (a journal file is kept there) or storage=..."
            )
        if storage is None and self.out_dir is not None:
            storage = self.out_dir / "journal.log"
        self.storage = storage
        self.name = "trainflow-nas" if name is None else name
        self._memory: optuna.storages.BaseStorage | None = None
        self._study: optuna.Study | None = None

    # -- validation -------------------------------------------------------------------------

    @staticmethod
    def _check_objectives(objectives: Any) -> tuple[list[str] | None, list[str]]:
        directions = ("maximize", "minimize")
        if isinstance(objectives, str):
            if objectives not in directions:
                raise ValueError(
                    f"Experiment: objectives must be 'maximize', 'minimize' or a dict {{name: 'maximize'|'minimize'}}. "
                    f"Received: objectives={objectives!r}."
                )
            return None, [objectives]
        if isinstance(objectives, dict) and objectives:
            for key, direction in objectives.items():
                if not isinstance(key, str) or direction not in directions:
                    raise ValueError(
                        "Experiment: objectives maps metric names (str) to 'maximize' or 'minimize'. "
                        f"Received: objectives={objectives!r}."
                    )
            return list(objectives), list(objectives.values())
        raise TypeError(
            "Experiment: objectives must be 'maximize', 'minimize' or a non-empty dict "
            f"{{name: 'maximize'|'minimize'}}. Received: objectives={objectives!r}."
        )

    def _check_strategy(self, strategy: Any, seed: int) -> optuna.samplers.BaseSampler:
        if isinstance(strategy, type) and issubclass(strategy, optuna.samplers.BaseSampler):
            raise TypeError(
                f"Experiment: strategy must be an instance. Received: strategy={strategy.__name__} (the class). "
                f"Write {strategy.__name__}()."
            )
        if isinstance(strategy, _Strategy):
            distributions = {label: CategoricalDistribution(c) for label, c in self._choices.items()}
            return strategy._bind(seed, distributions, len(self.directions))
        if isinstance(strategy, optuna.samplers.BaseSampler):
            return strategy
        raise TypeError(
            "Experiment: strategy must be Random(), GridSearch(), TPE(), RegularizedEvolution() or an "
            f"optuna.samplers.BaseSampler. Received: strategy={strategy!r}."
        )

    def _values(self, value: Any, where: str) -> list[float]:
        """The objective values in a report, in the order of ``objectives``."""
        names = self.objective_names
        if names is None or len(names) == 1:
            if not isinstance(value, dict):
                return [value]
            key = None if names is None else names[0]
            if key is None and len(value) == 1:
                return list(value.values())
            if key is None:
                raise _ReportError(
                    f"{where} reported several metrics {sorted(value)} but objectives={self.objectives!r} does not "
                    "say which to optimise. Pass objectives={name: 'maximize'|'minimize'} naming it."
                )
            names = [key]
        if not isinstance(value, dict):
            raise _ReportError(
                f"{where} reported {value!r}, but objectives={self.objectives!r} needs a dict with every "
                f"objective {names}. Report e.g. {{{', '.join(f'{n!r}: ...' for n in names)}}}."
            )
        missing = [n for n in names if n not in value]
        if missing:
            raise _ReportError(
                f"{where}: objective {missing[0]!r} of objectives={self.objectives!r} was never reported. "
                f"Received: {value!r}. Report every objective by its name, or change objectives."
            )
        return [value[n] for n in names]

    # -- the study --------------------------------------------------------------------------

    def _open_storage(self) -> optuna.storages.BaseStorage:
        if self.storage is None:
            if self._memory is None:
                self._memory = optuna.storages.InMemoryStorage()
            return self._memory
        if isinstance(self.storage, str) and "://" in self.storage:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback = {_RETRY_KWARG: _Retry(max_retry=None)}
                for attempt in range(10):
                    try:
                        return optuna.storages.RDBStorage(
                            _database_url(self.storage), heartbeat_interval=_HEARTBEAT_S, grace_period=_GRACE_S,
                            **callback,
                        )
                    except Exception as e:  # workers starting together race to create the tables
                        if attempt == 9 or "already exists" not in str(e):
                            raise
                        time.sleep(0.2 + 0.1 * attempt)
        path = Path(self.storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))

    def _open_study(self) -> optuna.Study:
        with _quiet_optuna():
            return self._open_checked_study()

    def _open_checked_study(self) -> optuna.Study:
        study = optuna.create_study(
            storage=self._open_storage(),
            study_name=self.name,
            directions=self.directions,
            sampler=self.sampler,
            pruner=optuna.pruners.NopPruner() if self.pruner is None else self.pruner,
            load_if_exists=True,
        )
        stamp = {
            _STUDY_SPACE: {label: list(c) for label, c in self._choices.items()},
            _STUDY_OBJECTIVES: self.objectives,
            _STUDY_SEED: self.seed,
        }
        found = study.user_attrs
        for key, value in stamp.items():
            if key not in found:
                study.set_user_attr(key, value)
            elif json.loads(json.dumps(found[key])) != json.loads(json.dumps(value)):
                what = key.removeprefix("trainflow.")
                raise ValueError(
                    f"Experiment: the study {self.name!r} in storage {str(self.storage)!r} was created with another "
                    f"{what}: {found[key]!r}. Received: {what}={value!r}. Continue it with the same arguments, or "
                    "pass another name (or out_dir) for a new experiment."
                )
        return study

    @property
    def study(self) -> optuna.Study:
        """The optuna study holding the trials (for optuna's visualisation, or ``optuna-dashboard``).

        Example:
            >>> from torch import nn
            >>> from trainflow.nas import Experiment, Random, ValueChoice, report_final_result
            >>> from trainflow.nas import FunctionalTrainer
            >>> exp = Experiment(lambda: nn.Linear(2, ValueChoice([1, 2], label="w")),
            ...                  FunctionalTrainer(lambda m: report_final_result(1.0)), Random(), max_trials=2)
            >>> exp.run()
            >>> [t.params for t in exp.study.trials] == [{"w": r.architecture["w"]} for r in exp.trials()]
            True
        """
        if self._study is None:
            self._study = self._open_study()
        return self._study

    def _architecture(self, trial: FrozenTrial) -> dict[str, Any]:
        arch = {}
        for label, choices in self._choices.items():
            if label in trial.params:
                value = trial.params[label]
                arch[label] = next(o for c, o in zip(choices, self.search_space[label]) if _same(c, value))
        return arch

    # -- running ----------------------------------------------------------------------------

    def run(self, *, progress: bool = True) -> None:
        """Run trials until ``max_trials`` (counting those already stored), ``timeout`` or the grid's end.

        A trial that raises is recorded as failed and the experiment goes on (up to
        ``max_failures``); a report that does not fit ``objectives`` stops it with the error.
        Artifacts are written to ``out_dir`` at the end, also when it stops with an error.

        Args:
            progress: show trials done / running / pruned / failed and the best so far (only
                when standard output is a terminal).

        Example:
            See :class:`Experiment`.
        """
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            with _quiet_optuna(), _Progress(self, progress) as progress:
                if self.concurrency == 1:
                    self._work(self.study, deadline, progress.update)
                else:
                    self._run_workers(deadline, progress)
        finally:
            self._study = None  # read the storage afresh: other workers wrote to it
            if self.out_dir is not None:
                self._write_artifacts()

    def _run_workers(self, deadline: float | None, progress: _Progress) -> None:
        study = self.study  # created (and checked) once, before the workers open it
        dispose = getattr(getattr(study._storage, "engine", None), "dispose", None)
        if dispose is not None:
            dispose()  # no pooled database connection is shared with the children
        self._study = None
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        errors = ctx.SimpleQueue()
        workers = [ctx.Process(target=self._worker_main, args=(deadline, errors)) for _ in range(self.concurrency)]
        for w in workers:
            w.start()
        try:
            while any(w.is_alive() for w in workers):
                progress.update()
                time.sleep(0.5)
        finally:
            for w in workers:
                w.join()
        progress.update()
        if not errors.empty():
            kind, message = errors.get()
            raise (ValueError if kind == "ValueError" else RuntimeError)(message)
        codes = [w.exitcode for w in workers if w.exitcode != 0]
        if codes:
            raise RuntimeError(f"Experiment: {len(codes)} worker process(es) ended abnormally (exit codes {codes}).")

    def _worker_main(self, deadline: float | None, errors: Any) -> None:
        try:
            self._work(self._open_study(), deadline, lambda: None)
        except BaseException as e:  # reported to the parent, which raises it
            errors.put((type(e).__name__ if isinstance(e, ValueError) else "RuntimeError", str(e)))
            sys.exit(1)

    def _work(self, study: optuna.Study, deadline: float | None, update: Callable[[], None]) -> None:
        """One worker's loop: trials until the budget, the deadline or too many failures."""
        while True:
            with self._claiming():
                trial = self._claim(study, deadline)
            if trial is None:
                return
            frozen = study._storage.get_trial(trial._trial_id)
            index = trial_index(study.get_trials(deepcopy=False), frozen)
            if self.budget is not None and index >= self.budget and RETRY_OF not in frozen.system_attrs:
                # Another machine took the last place between our count and our ask (database storages).
                trial.set_user_attr(_SKIPPED, f"beyond max_trials={self.budget}")
                study.tell(trial, state=TrialState.FAIL)
                return
            self._run_trial(study, trial, index)
            update()

    @contextlib.contextmanager
    def _claiming(self) -> Iterator[None]:
        """Workers of one journal file count and ask one at a time (a file lock beside the journal),
        so they never start more than max_trials; a database has no such lock (see _work)."""
        if self.storage is None or (isinstance(self.storage, str) and "://" in self.storage):
            yield
            return
        import fcntl

        with open(f"{self.storage}.claim", "a") as lock:  # not .lock: optuna's own lock file
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _claim(self, study: optuna.Study, deadline: float | None) -> optuna.Trial | None:
        """The next trial to run, or None when the budget, the deadline or max_failures says stop."""
        self._retry_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        failed = [
            t for t in trials
            if t.state == TrialState.FAIL and t.number not in retried and not t.user_attrs.get(_SKIPPED)
        ]
        if self.max_failures is not None and len(failed) >= self.max_failures:
            last = max(failed, key=lambda t: t.number)
            raise RuntimeError(
                f"Experiment: {len(failed)} trials failed (max_failures={self.max_failures}); the last, trial "
                f"{last.number}, with {last.user_attrs.get(_ERROR)}"
            )
        waiting = any(t.state == TrialState.WAITING for t in trials)
        next_index = len(trials) - sum(1 for t in trials if RETRY_OF in t.system_attrs)
        if not waiting and self.budget is not None and next_index >= self.budget:
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None
        with warnings.catch_warnings():
            # optuna's heartbeat runs around each trial here too (see _run_trial), not only in optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            return study.ask()

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial, index: int) -> None:
        trial.set_user_attr(_HOST, socket.gethostname())
        trial.set_user_attr(_PID, os.getpid())
        arch = {}
        for label, choices in self._choices.items():
            value = trial.suggest_categorical(label, choices)
            arch[label] = next(o for c, o in zip(choices, self.search_space[label]) if _same(c, value))
        _seed_everything(derive_seed(self.seed, index, TRIAL_STREAM))
        reporter = _Reporter(self, trial)
        heartbeat = optuna.storages._heartbeat.get_heartbeat_thread(trial._trial_id, study._storage)
        try:
            with heartbeat, _reporting(reporter):
                try:
                    with fixed_arch(arch):
                        model = self.space()
                    self.trainer.evaluate(model)
                finally:
                    trial.set_user_attr(_INTERMEDIATE, reporter.intermediate_values)
            if reporter.final_value is None:
                raise _ReportError(
                    f"Experiment: trial {trial.number} ended without report_final_result(...). The trainer "
                    f"{self.trainer!r} must report the final value it is judged by."
                )
            values = self._values(reporter.final_value, "report_final_result")
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return
        except _ReportError as e:
            trial.set_user_attr(_ERROR, f"ValueError: {e}")
            study.tell(trial, state=TrialState.FAIL)
            raise ValueError(str(e)) from None
        except Exception as e:
            logger.warning("trial %d (%s) failed", trial.number, arch, exc_info=True)
            trial.set_user_attr(_ERROR, f"{type(e).__name__}: {e}")
            study.tell(trial, state=TrialState.FAIL)
            return
        except BaseException:  # interrupted: the trial is retried when the experiment runs again
            trial.set_user_attr(_ERROR, "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            self._retry(study, study._storage.get_trial(trial._trial_id))
            raise
        study.tell(trial, values if len(values) > 1 else values[0])

    def _retry(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _Retry(max_retry=None)(study, trial)

    def _retry_dead_trials(self, study: optuna.Study) -> None:
        """Fail and retry the running trials whose worker process is gone (this machine: by process id;
        others, with a database storage: by optuna's heartbeat)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # calls the storage's retry callback
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get(_PID)
            if t.user_attrs.get(_HOST) != host or pid == os.getpid() or _alive(pid):
                continue
            try:
                study._storage.set_trial_user_attr(t._trial_id, _ERROR, f"its worker process {pid} on {host} died")
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first, and retries it
            logger.warning("trial %d: worker process %s died; the trial runs again", t.number, pid)
            self._retry(study, study._storage.get_trial(t._trial_id))

    # -- results ----------------------------------------------------------------------------

    def trials(self) -> list[TrialRecord]:
        """Every trial in the storage, in order of creation.

        Example:
            See :class:`Experiment`.
        """
        records = []
        for t in self.study.get_trials(deepcopy=False):
            if t.user_attrs.get(_SKIPPED):
                continue
            value = None
            if t.state == TrialState.COMPLETE:
                value = t.values[0] if self.objective_names is None or len(t.values) == 1 else dict(zip(self.objective_names, t.values))
            seconds = None
            if t.datetime_start is not None and t.datetime_complete is not None:
                seconds = (t.datetime_complete - t.datetime_start).total_seconds()
            records.append(
                TrialRecord(
                    number=t.number,
                    architecture=self._architecture(t),
                    intermediate=list(t.user_attrs.get(_INTERMEDIATE, [])),
                    value=value,
                    state=_STATES[t.state],
                    seconds=seconds,
                    error=t.user_attrs.get(_ERROR) if t.state == TrialState.FAIL else None,
                )
            )
        return records

    def _ranked(self) -> list[TrialRecord]:
        done = [r for r in self.trials() if r.state == "complete"]
        sign = -1.0 if self.directions[0] == "maximize" else 1.0
        return sorted(done, key=lambda r: (sign * r.value, r.number))  # ties: the earlier trial

    def _pareto(self) -> list[TrialRecord]:
        front = {t.number for t in self.study.best_trials}
        return [r for r in self.trials() if r.number in front]

    def best(self) -> TrialRecord:
        """The completed trial with the best value (ties: the earlier trial).

        Example:
            See :class:`Experiment`.
        """
        if len(self.directions) > 1:
            raise ValueError(
                f"Experiment.best: objectives={self.objectives!r} has several objectives, so no single best. "
                "Use export_top_models(top_k=None) for the Pareto front."
            )
        ranked = self._ranked()
        if not ranked:
            raise ValueError("Experiment.best: no trial has completed yet. Call run() first (or check the failures in trials()).")
        return ranked[0]

    def export_top_models(self, top_k: int | None = 1, formatter: str = "dict") -> list[Any]:
        """The best architectures: the ``top_k`` best values, or with several objectives the Pareto front.

        Args:
            top_k: how many (the best first); None for all. With several objectives, the
                non-dominated trials in trial order, cut to ``top_k`` unless None.
            formatter: ``"dict"`` (``{label: option}``), ``"instance"`` (a fresh model built under
                ``fixed_arch``) or ``"json"`` (the dict as a JSON string, what ``fixed_arch`` reads).

        Example:
            >>> from torch import nn
            >>> from trainflow.nas import Experiment, GridSearch, ValueChoice, report_final_result
            >>> from trainflow.nas import FunctionalTrainer
            >>> exp = Experiment(lambda: nn.Linear(2, ValueChoice([1, 2, 3], label="width")),
            ...                  FunctionalTrainer(lambda m: report_final_result(m.out_features)), GridSearch())
            >>> exp.run()
            >>> exp.export_top_models(top_k=2)
            [{'width': 3}, {'width': 2}]
            >>> exp.export_top_models(formatter="json")
            ['{"width": 3}']
        """
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"Experiment.export_top_models: top_k must be None or an int >= 1. Received: top_k={top_k!r}.")
        if formatter not in ("dict", "instance", "json"):
            raise ValueError(
                "Experiment.export_top_models: formatter must be 'dict', 'instance' or 'json'. "
                f"Received: formatter={formatter!r}."
            )
        records = self._ranked() if len(self.directions) == 1 else self._pareto()
        archs = [r.architecture for r in records[:top_k]]
        if formatter == "json":
            return [json.dumps(a) for a in archs]
        if formatter == "instance":
            models = []
            for a in archs:
                with fixed_arch(a):
                    models.append(self.space())
            return models
        return archs

    # -- artifacts --------------------------------------------------------------------------

    def _write_artifacts(self) -> None:
        from trainflow.nas._artifacts import write_csv, write_history

        self.out_dir.mkdir(parents=True, exist_ok=True)
        records = self.trials()
        write_csv(self.out_dir / "trials.csv", records, list(self.search_space), self.objective_names)
        try:
            write_history(self.out_dir / "history.png", records, self.objective_names, self.directions)
        except ImportError as error:  # matplotlib is part of the `examples` extra
            warnings.warn(
                f"Experiment: history.png needs matplotlib, which could not be imported ({error}); trials.csv "
                'holds the same values. Install it with `pip install "trainflow[examples]"` (or `pip install matplotlib`).',
                UserWarning,
                stacklevel=2,
            )
        if len(self.directions) == 1 and self._ranked():
            (self.out_dir / "best_arch.json").write_text(json.dumps(self.best().architecture, indent=2) + "\n")
        elif len(self.directions) > 1:
            front = [r.architecture for r in self._pareto()]
            (self.out_dir / "pareto_archs.json").write_text(json.dumps(front, indent=2) + "\n")


class _Progress:
    """A rich line: trials done / running / pruned / failed and the best so far (terminals only)."""

    def __init__(self, experiment: Experiment, enabled: bool) -> None:
        from rich.console import Console

        self.experiment = experiment
        self.console = Console(file=sys.stdout)
        self.enabled = enabled
        self.progress = None

    def __enter__(self) -> _Progress:
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                TimeElapsedColumn(), console=self.console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=self.experiment.budget)
            self.update()
        return self

    def update(self) -> None:
        if self.progress is None:
            return
        exp = self.experiment
        trials = exp.study.get_trials(deepcopy=False)
        count = {s: sum(1 for t in trials if t.state == s and not t.user_attrs.get(_SKIPPED)) for s in _STATES}
        best = ""
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done and len(exp.directions) == 1:
            pick = max if exp.directions[0] == "maximize" else min
            best = f" · best {pick(t.value for t in done):.4g}"
        finished = count[TrialState.COMPLETE] + count[TrialState.PRUNED] + count[TrialState.FAIL]
        self.progress.update(
            self.task,
            completed=finished,
            description=f"done {count[TrialState.COMPLETE]} · running {count[TrialState.RUNNING]} · "
            f"pruned {count[TrialState.PRUNED]} · failed {count[TrialState.FAIL]}{best}",
        )

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()
