"""Reporting a trial's results: to the experiment inside a trial, to the log outside one.

The same training function runs in both places. Inside an :class:`~trainflow.nas.Experiment`'s
trial, the experiment routes reports to its strategy (and to its pruner: an intermediate report
may raise optuna's prune signal); anywhere else they are logged to ``logging.getLogger("trainflow.nas")``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

__all__ = ["report_intermediate_result", "report_final_result"]

logger = logging.getLogger("trainflow.nas")

Value = float | dict[str, float]


class _Reporter(Protocol):
    def intermediate(self, value: Value) -> None: ...

    def final(self, value: Value) -> None: ...


# The reporters in force, innermost last. A plain list (not a context variable): a trial runs in
# one thread of its worker process, and the experiment pushes and pops around each trial.
_reporters: list[_Reporter] = []


def _check_value(value: Any, fn: str) -> Value:
    """A number, or a non-empty dict of numbers keyed by str; tensors of one element are accepted."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(
                f"{fn}: value must be a number or a non-empty dict of numbers. Received: value={{}}. "
                "Report at least one metric, e.g. {'accuracy': 0.9}."
            )
        out: dict[str, float] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{fn}: the keys of a dict value must be metric names (str). Received: key={key!r} "
                    f"of type {type(key).__name__}. Name each metric with a string."
                )
            out[key] = _number(item, f"{fn}: value[{key!r}]")
        return out
    return _number(value, f"{fn}: value")


def _number(value: Any, where: str) -> float:
    if hasattr(value, "item") and callable(value.item) and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()  # a one-element tensor or a NumPy scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{where} must be a number or a dict of numbers. Received: {value!r} of type "
            f"{type(value).__name__}. Report a float (use tensor.item() for a tensor)."
        )
    value = float(value)
    if math.isnan(value):
        raise ValueError(
            f"{where} must not be NaN. Received: {value!r}. Check the training for a diverging loss "
            "before reporting."
        )
    return value


def report_intermediate_result(value: Value) -> None:
    """Report a result during a trial (one per epoch, say): for pruning and the trial's curve.

    Inside an experiment's trial the value goes to the experiment; with a pruner, this call
    raises ``optuna.TrialPruned`` when the pruner stops the trial (let it propagate). Outside
    an experiment the value is logged at INFO level to ``"trainflow.nas"``.

    Args:
        value: a number, or a dict of numbers for a multi-objective search.

    Example:
        >>> from trainflow.nas import report_intermediate_result
        >>> report_intermediate_result(0.75)  # standalone: logged, nothing else happens
        >>> report_intermediate_result({"accuracy": 0.75, "params": 120.0})
    """
    value = _check_value(value, "report_intermediate_result")
    if _reporters:
        _reporters[-1].intermediate(value)
    else:
        logger.info("intermediate result: %s", value)


def report_final_result(value: Value) -> None:
    """Report a trial's final result: the value the strategy optimises.

    Inside an experiment's trial it becomes the trial's objective value (with several
    objectives, a dict holding every objective by name). Outside an experiment it is logged
    at INFO level to ``"trainflow.nas"``.

    Args:
        value: a number, or a dict of numbers for a multi-objective search.

    Example:
        >>> from trainflow.nas import report_final_result
        >>> report_final_result(0.9)  # standalone: logged
    """
    value = _check_value(value, "report_final_result")
    if _reporters:
        _reporters[-1].final(value)
    else:
        logger.info("final result: %s", value)


@contextlib.contextmanager
def _reporting(reporter: _Reporter) -> Iterator[_Reporter]:
    """Route reports made inside the block to ``reporter.intermediate`` / ``reporter.final``.

    Blocks nest: the innermost reporter receives the reports; on exit the previous routing is
    restored, also when the block raises.

    Example:
        >>> from trainflow.nas.trial import _reporting
        >>> class Recorder:
        ...     def __init__(self): self.seen = []
        ...     def intermediate(self, value): self.seen.append(("intermediate", value))
        ...     def final(self, value): self.seen.append(("final", value))
        >>> rec = Recorder()
        >>> with _reporting(rec):
        ...     report_intermediate_result(0.5)
        ...     report_final_result(0.8)
        >>> rec.seen
        [('intermediate', 0.5), ('final', 0.8)]
    """
    if not (callable(getattr(reporter, "intermediate", None)) and callable(getattr(reporter, "final", None))):
        raise TypeError(
            "_reporting: reporter must have .intermediate(value) and .final(value) methods. "
            f"Received: reporter={reporter!r}."
        )
    _reporters.append(reporter)
    try:
        yield reporter
    finally:
        _reporters.pop()
