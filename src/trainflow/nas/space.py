"""Search spaces: a function that builds a model with choices in it.

A *space* is a plain function ``space() -> nn.Module`` whose body uses :class:`LayerChoice`,
:class:`InputChoice` and :func:`ValueChoice`. What those calls return depends on where the
function is built:

- inside :func:`search_space`, every choice is recorded (label and options) and the model is
  built once, with choice modules in it;
- inside :func:`fixed_arch`, every choice is resolved: ``LayerChoice`` returns the chosen
  candidate itself, ``InputChoice`` a fixed selector, ``ValueChoice`` the chosen value, so the
  result is a plain model without choice modules;
- anywhere else, ``LayerChoice`` and ``InputChoice`` are modules that a one-shot trainer
  replaces (:func:`replace_layer_choice`, :func:`replace_input_choice`); ``ValueChoice`` is an error.
  (A one-shot trainer given the space function builds it with ``space._build_space`` so that
  automatic labels are counted as in the other two builds.)

**Labels.** Choices with the same label are one decision: they take the same option and must
offer the same options. An unlabelled choice is labelled from its creation order in the build
(``"layer_choice_1"``, ``"input_choice_1"``, ...); every build made by :func:`search_space` or
:func:`fixed_arch` counts from 1, so the same space function gets the same labels every time.
Outside such a build automatic labels only stay distinct (they keep counting): label the
choices of a model built by hand.

**Seeds.** An experiment seeds Python, NumPy and torch for each trial *before* it builds the
space, so a trial's initial weights depend only on (experiment seed, trial number). Candidates
given as modules are constructed by the caller before ``LayerChoice`` sees them, so the unchosen
ones draw from the generator too: the model built under ``fixed_arch`` then has the weights of a
hand-written model that constructs the same candidates. Give candidates as zero-argument
callables (a class, a ``lambda``, ``functools.partial``) to draw only for the chosen one: under
``fixed_arch`` the unchosen ones are built with the generators' state saved and restored (so
their own choices are still checked and counted), and the model is bit-identical to the plain
hand-written model.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "ChosenInputs",
    "InputChoice",
    "LayerChoice",
    "ValueChoice",
    "fixed_arch",
    "replace_input_choice",
    "replace_layer_choice",
    "search_space",
]

_REDUCTIONS = ("sum", "mean", "concat", "none")
_HOW_TO_CHOOSE = (
    "Choose an architecture first: build the space under `with fixed_arch(arch):`, search it with "
    "an `Experiment`, or train it with a one-shot trainer (which replaces the choices)."
)


class _Build:
    """One build of a space: counts automatic labels and records or resolves every choice."""

    def __init__(self, arch: dict[str, Any] | None = None, *, record: bool = False) -> None:
        self.arch = arch  # None: choices stay modules; a dict: choices are resolved from it
        self.record = record
        self.options: dict[str, tuple[str, list]] = {}  # label -> (kind, options), creation order
        self.counters: dict[str, int] = {}

    def label(self, label: str | None, kind: str) -> str:
        if label is None:
            self.counters[kind] = self.counters.get(kind, 0) + 1
            return f"{kind}_{self.counters[kind]}"
        if not isinstance(label, str) or not label:
            raise TypeError(
                f"{_KIND_NAMES[kind]}: label must be a non-empty str (or None for an automatic label). "
                f"Received: label={label!r}."
            )
        return label

    def declare(self, label: str, kind: str, options: list) -> None:
        """Note that ``label`` offers ``options``; a label reused with other options is an error."""
        seen = self.options.setdefault(label, (kind, options))
        if seen != (kind, options):
            raise ValueError(
                f"Choices sharing label {label!r} must offer the same options: the first is a "
                f"{_KIND_NAMES[seen[0]]} with {seen[1]!r}, this one a {_KIND_NAMES[kind]} with {options!r}. "
                f"Received: label={label!r}. Give different decisions different labels."
            )

    def chosen(self, label: str, kind: str, options: list) -> Any:
        """The option ``arch`` picks for ``label``, checked against ``options``."""
        assert self.arch is not None
        if label not in self.arch:
            raise ValueError(
                f"fixed_arch: the architecture has no entry for the {_KIND_NAMES[kind]} labelled {label!r}. "
                f"Received: arch labels={sorted(self.arch)!r}. Add {label!r}: one of {options!r} "
                "(search_space(space) lists every label and its options)."
            )
        value = self.arch[label]
        if kind == "input_choice" and isinstance(value, (list, tuple)):
            value = list(value)
        if not any(type(value) is type(option) and value == option for option in options):
            raise ValueError(
                f"fixed_arch: {value!r} is not an option of the {_KIND_NAMES[kind]} labelled {label!r}. "
                f"Received: arch[{label!r}]={value!r}. Expected one of {options!r}."
            )
        return value


_KIND_NAMES = {"layer_choice": "LayerChoice", "input_choice": "InputChoice", "value_choice": "ValueChoice"}

# The build in progress, if any (a context variable: builds in other threads do not interfere).
_current: contextvars.ContextVar[_Build | None] = contextvars.ContextVar("trainflow_nas_build", default=None)
# Outside any build, automatic labels still never repeat (but they are only stable inside one).
_loose = _Build()


@contextlib.contextmanager
def _building(build: _Build) -> Iterator[_Build]:
    token = _current.set(build)
    try:
        yield build
    finally:
        _current.reset(token)


@contextlib.contextmanager
def _rng_restored() -> Iterator[None]:
    """Run a block without consuming Python's, NumPy's or torch's (CPU) random generators."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _candidates(candidates: Any) -> dict[str, Any]:
    """The candidates as {option name: module or zero-argument callable}, validated."""
    if isinstance(candidates, Mapping):
        named = dict(candidates)
        for name in named:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    "LayerChoice: the keys of a dict of candidates are option names and must be non-empty "
                    f"str without '.'. Received: key={name!r}. Rename the option."
                )
    elif isinstance(candidates, (list, tuple)):
        named = {str(i): candidate for i, candidate in enumerate(candidates)}
    else:
        raise TypeError(
            "LayerChoice: candidates must be a list or a dict of modules. "
            f"Received: candidates={candidates!r} of type {type(candidates).__name__}. "
            "Pass e.g. [nn.ReLU(), nn.Tanh()] or {'relu': nn.ReLU(), 'tanh': nn.Tanh()}."
        )
    if not named:
        raise ValueError(
            f"LayerChoice: candidates must not be empty. Received: candidates={candidates!r}. "
            "Give at least one module."
        )
    for name, candidate in named.items():
        if not (isinstance(candidate, nn.Module) or callable(candidate)):
            raise TypeError(
                f"LayerChoice: candidate {name!r} must be an nn.Module (or a zero-argument callable that "
                f"builds one). Received: {candidate!r} of type {type(candidate).__name__}."
            )
    return named


def _built(name: str, candidate: Any) -> nn.Module:
    module = candidate if isinstance(candidate, nn.Module) else candidate()
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"LayerChoice: the callable for candidate {name!r} must return an nn.Module. "
            f"Received: it returned {module!r} of type {type(module).__name__}."
        )
    return module


class LayerChoice(nn.Module):
    """A choice of one module among candidates.

    Args:
        candidates: a list of modules (options named ``"0"``, ``"1"``, ...) or a dict
            {option name: module}. A candidate may also be a zero-argument callable that builds
            the module (a class, a ``lambda``): under :func:`fixed_arch` only the chosen one
            then draws from the random generators (see the module's notes on seeds).
        label: the decision's name; choices with the same label take the same option.
            ``None`` labels it from its creation order (``"layer_choice_1"``, ...).

    Under :func:`fixed_arch`, ``LayerChoice(...)`` returns the chosen candidate itself. Elsewhere
    it is a module holding the candidates as its children (``named_children()`` yields
    ``(option name, module)``), for a one-shot trainer to replace; calling it raises an error.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import LayerChoice, fixed_arch, search_space
        >>> def space():
        ...     return nn.Sequential(nn.Linear(4, 8), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"))
        >>> search_space(space)
        {'act': ['relu', 'tanh']}
        >>> with fixed_arch({"act": "tanh"}):
        ...     model = space()
        >>> model[1]
        Tanh()
        >>> choice = LayerChoice([nn.ReLU(), nn.Tanh()], label="act")
        >>> choice.names, len(choice), choice["1"]
        (['0', '1'], 2, Tanh())
    """

    def __new__(cls, candidates: Any = None, *, label: str | None = None) -> Any:
        build = _current.get()
        if candidates is None or build is None or build.arch is None:
            return super().__new__(cls)  # a choice module (also how copy/pickle recreate one)
        named = _candidates(candidates)
        label = build.label(label, "layer_choice")
        build.declare(label, "layer_choice", list(named))
        choice = build.chosen(label, "layer_choice", list(named))
        module = None
        for name, candidate in named.items():
            if name == choice:
                module = _built(name, candidate)
            elif not isinstance(candidate, nn.Module):
                with _rng_restored():  # built for its own choices' labels, then dropped
                    _built(name, candidate)
        return module

    def __init__(self, candidates: Any, *, label: str | None = None) -> None:
        if "_modules" in self.__dict__:
            return  # __new__ returned an existing LayerChoice as the chosen candidate: already built
        super().__init__()
        named = _candidates(candidates)
        build = _current.get()
        self.label = (build or _loose).label(label, "layer_choice")
        if build is not None:  # labels are one decision within a build, not across unrelated models
            build.declare(self.label, "layer_choice", list(named))
        for name, candidate in named.items():
            self.add_module(name, _built(name, candidate))

    @property
    def key(self) -> str:
        """The label (the name NNI's code reads)."""
        return self.label

    @property
    def names(self) -> list[str]:
        """The option names, in order."""
        return list(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, name: str | int) -> nn.Module:
        if isinstance(name, int) and not isinstance(name, bool):
            return list(self._modules.values())[name]
        if name not in self._modules:
            raise KeyError(f"LayerChoice {self.label!r} has no option {name!r}; its options are {self.names!r}.")
        return self._modules[name]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"LayerChoice {self.label!r} has no chosen candidate. {_HOW_TO_CHOOSE}")

    def extra_repr(self) -> str:
        return f"label={self.label!r}"


def _reduce(tensors: list[torch.Tensor], reduction: str) -> Any:
    """Combine the chosen tensors: a single one is returned as is (except for "none": a list)."""
    if reduction == "none":
        return list(tensors)
    if len(tensors) == 1:
        return tensors[0]
    if reduction == "concat":
        return torch.cat(tensors, dim=1)
    stacked = torch.stack(tensors)
    return stacked.sum(0) if reduction == "sum" else stacked.mean(0)


class ChosenInputs(nn.Module):
    """The fixed selector that :class:`InputChoice` becomes under :func:`fixed_arch`.

    Example:
        >>> import torch
        >>> from trainflow.nas.space import ChosenInputs
        >>> ChosenInputs([0, 2], "sum")([torch.ones(1), torch.zeros(1), torch.ones(1)])
        tensor([2.])
    """

    def __init__(self, chosen: Sequence[int], reduction: str) -> None:
        super().__init__()
        self.chosen = list(chosen)
        self.reduction = reduction

    def forward(self, inputs: Sequence[torch.Tensor]) -> Any:
        return _reduce([inputs[i] for i in self.chosen], self.reduction)

    def extra_repr(self) -> str:
        return f"chosen={self.chosen!r}, reduction={self.reduction!r}"


def _input_options(n_candidates: Any, n_chosen: Any, reduction: Any) -> list[list[int]]:
    for arg, value, low in (("n_candidates", n_candidates, 1), ("n_chosen", n_chosen, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"InputChoice: {arg} must be an int >= {low}. Received: {arg}={value!r}.")
    if n_chosen > n_candidates:
        raise ValueError(
            f"InputChoice: n_chosen must be at most n_candidates. Received: n_chosen={n_chosen}, "
            f"n_candidates={n_candidates}. Choose fewer inputs or offer more."
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"InputChoice: reduction must be one of {_REDUCTIONS}. Received: reduction={reduction!r}.")
    return [list(c) for c in itertools.combinations(range(n_candidates), n_chosen)]


class InputChoice(nn.Module):
    """A choice of ``n_chosen`` of the ``n_candidates`` tensors passed to ``forward(list)``.

    Its options are the sorted index lists of size ``n_chosen``: ``[0]``, ``[1]``, ... or, with
    ``n_chosen=2``, ``[0, 1]``, ``[0, 2]``, ... The chosen tensors are combined by ``reduction``:
    ``"sum"``, ``"mean"``, ``"concat"`` (along dimension 1) or ``"none"`` (a list). A single
    chosen tensor is returned as is, except with ``"none"``.

    Under :func:`fixed_arch`, ``InputChoice(...)`` returns a fixed selector
    (:class:`~trainflow.nas.space.ChosenInputs`); elsewhere calling it raises an error until a
    one-shot trainer replaces it.

    Example:
        >>> import torch
        >>> from trainflow.nas import InputChoice, fixed_arch, search_space
        >>> search_space(lambda: InputChoice(3, 2, label="skip"))
        {'skip': [[0, 1], [0, 2], [1, 2]]}
        >>> with fixed_arch({"skip": [0, 2]}):
        ...     pick = InputChoice(3, 2, reduction="mean", label="skip")
        >>> pick([torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([3.0])])
        tensor([2.])
    """

    def __new__(
        cls, n_candidates: Any = None, n_chosen: Any = 1, *, reduction: str = "sum", label: str | None = None
    ) -> Any:
        build = _current.get()
        if n_candidates is None or build is None or build.arch is None:
            return super().__new__(cls)
        options = _input_options(n_candidates, n_chosen, reduction)
        label = build.label(label, "input_choice")
        build.declare(label, "input_choice", options)
        return ChosenInputs(build.chosen(label, "input_choice", options), reduction)

    def __init__(
        self, n_candidates: int, n_chosen: int = 1, *, reduction: str = "sum", label: str | None = None
    ) -> None:
        super().__init__()
        self.options = _input_options(n_candidates, n_chosen, reduction)
        self.n_candidates, self.n_chosen, self.reduction = n_candidates, n_chosen, reduction
        build = _current.get()
        self.label = (build or _loose).label(label, "input_choice")
        if build is not None:
            build.declare(self.label, "input_choice", self.options)

    @property
    def key(self) -> str:
        """The label (the name NNI's code reads)."""
        return self.label

    def forward(self, inputs: Sequence[torch.Tensor]) -> Any:
        raise RuntimeError(f"InputChoice {self.label!r} has no chosen inputs. {_HOW_TO_CHOOSE}")

    def extra_repr(self) -> str:
        return (
            f"n_candidates={self.n_candidates}, n_chosen={self.n_chosen}, "
            f"reduction={self.reduction!r}, label={self.label!r}"
        )


def ValueChoice(values: Sequence[Any], *, label: str | None = None) -> Any:  # noqa: N802 (named like the other choices)
    """A hyperparameter of the architecture, used where the space is built.

    Under :func:`fixed_arch` it returns the chosen value itself, so it can stand wherever the
    value would: ``nn.Linear(64, ValueChoice([32, 64], label="hidden"))``. While
    :func:`search_space` builds the space it records the choice and returns the first value.
    It is for multi-trial search only: one-shot trainers cannot use it, and anywhere else it
    raises an error.

    Args:
        values: the options: a non-empty list of distinct int, float, str or bool values.
        label: the decision's name (required; choices with the same label share the value).

    Example:
        >>> from torch import nn
        >>> from trainflow.nas import ValueChoice, fixed_arch, search_space
        >>> def space():
        ...     return nn.Linear(4, ValueChoice([8, 16], label="width"))
        >>> search_space(space)
        {'width': [8, 16]}
        >>> with fixed_arch({"width": 16}):
        ...     space().out_features
        16
    """
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(
            f"ValueChoice: values must be a non-empty list. Received: values={values!r}. Pass e.g. [32, 64, 128]."
        )
    for value in values:
        if not isinstance(value, (int, float, str, bool)):
            raise TypeError(
                "ValueChoice: each value must be an int, float, str or bool (so an architecture is JSON). "
                f"Received: {value!r} of type {type(value).__name__}. Use a LayerChoice to choose among objects."
            )
    options = list(values)
    if any(type(a) is type(b) and a == b for a, b in itertools.combinations(options, 2)):
        raise ValueError(f"ValueChoice: values must be distinct. Received: values={values!r}.")
    if label is None:
        raise ValueError(
            'ValueChoice: label is required. Received: label=None. Name the decision, e.g. label="hidden".'
        )
    build = _current.get()
    if build is None or (build.arch is None and not build.record):
        raise RuntimeError(
            f"ValueChoice {label!r} can only be used while a multi-trial search builds the space: build it "
            "under `with fixed_arch(arch):` (as an `Experiment` does for each trial) or list it with "
            "`search_space(space)`. One-shot trainers cannot use ValueChoice; use a LayerChoice instead."
        )
    label = build.label(label, "value_choice")
    build.declare(label, "value_choice", options)
    return options[0] if build.arch is None else build.chosen(label, "value_choice", options)


def _check_space(space: Any) -> None:
    if isinstance(space, nn.Module) or not callable(space):
        raise TypeError(
            f"space must be a function that builds a model. Received: space={space!r} of type "
            f"{type(space).__name__}. Pass the function itself, e.g. search_space(build_model), not build_model()."
        )


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The space must return an nn.Module. Received: it returned {model!r} of type {type(model).__name__}."
        )


def search_space(space: Callable[[], nn.Module]) -> dict[str, list]:
    """Build ``space()`` once and list its choices: {label: options}, in creation order.

    A LayerChoice's options are its option names, a ValueChoice's its values, an InputChoice's
    the sorted index lists it may pick. Any element of each list may be put in the
    architecture given to :func:`fixed_arch`.

    Example:
        >>> from torch import nn
        >>> from trainflow.nas import InputChoice, LayerChoice, ValueChoice, search_space
        >>> def space():
        ...     width = ValueChoice([8, 16], label="width")
        ...     return nn.Sequential(nn.Linear(4, width), LayerChoice([nn.ReLU(), nn.Tanh()]), InputChoice(2))
        >>> search_space(space)
        {'width': [8, 16], 'layer_choice_1': ['0', '1'], 'input_choice_1': [[0], [1]]}
    """
    _, options = _build_space(space, record=True)
    return options


def _build_space(space: Callable[[], nn.Module], *, record: bool = False) -> tuple[nn.Module, dict[str, list]]:
    """Build ``space()`` with its choices as modules, labelled as :func:`search_space` labels them.

    For one-shot trainers, which replace the choice modules: automatic labels count from 1 in
    this build, so they match the labels of ``search_space`` and ``fixed_arch``. ValueChoice is
    an error unless ``record``.
    """
    _check_space(space)
    with _building(_Build(record=record)) as build:
        model = space()
    _check_model(model)
    if not build.options:
        raise ValueError(
            f"The space builds no choice. Received: space={space!r}. Use LayerChoice, InputChoice or "
            "ValueChoice inside the function (called inside it, not outside it)."
        )
    return model, {label: options for label, (_, options) in build.options.items()}


def _read_arch(arch: Any) -> dict[str, Any]:
    if isinstance(arch, (str, Path)):
        path = Path(arch)
        if not path.is_file():
            raise ValueError(
                f"fixed_arch: no architecture file at {str(path)!r}. Received: arch={arch!r}. Pass a dict, or "
                "the path of a JSON file such as the best_arch.json an Experiment writes."
            )
        try:
            arch = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"fixed_arch: {str(path)!r} is not valid JSON ({error}). Received: arch={arch!r}."
            ) from None
    if not isinstance(arch, Mapping):
        raise TypeError(
            "fixed_arch: arch must be a dict {label: option} or the path of a JSON file of one. "
            f"Received: arch={arch!r} of type {type(arch).__name__}."
        )
    for label in arch:
        if not isinstance(label, str):
            raise TypeError(f"fixed_arch: the labels of arch must be str. Received: label={label!r}.")
    return dict(arch)


@contextlib.contextmanager
def _fixed(arch: dict[str, Any]) -> Iterator[None]:
    with _building(_Build(arch)) as build:
        yield
    unknown = [label for label in arch if label not in build.options]
    if build.options and unknown:  # nothing built at all: the block did not build a space
        raise ValueError(
            f"fixed_arch: the architecture has labels the space never built: {unknown!r}. "
            f"Received: arch={arch!r}. The space's labels are {list(build.options)!r}."
        )


def fixed_arch(arch: Mapping[str, Any] | str | Path) -> contextlib.AbstractContextManager[None]:
    """A context manager under which a space builds the plain model of one architecture.

    Inside it, ``LayerChoice(...)`` returns the chosen candidate, ``InputChoice(...)`` a fixed
    selector and ``ValueChoice(...)`` the chosen value. A choice whose label is missing from
    ``arch``, or whose option is not in the space, raises ValueError listing the valid ones; so
    does leaving the block when ``arch`` holds labels the space never built.

    Args:
        arch: {label: option} (an option from :func:`search_space`'s lists), or the path (str or
            Path) of a JSON file of that dict, such as the ``best_arch.json`` an experiment writes.

    Example:
        >>> from torch import nn
        >>> from trainflow.nas import LayerChoice, fixed_arch
        >>> def space():
        ...     return nn.Sequential(nn.Linear(4, 8), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"))
        >>> with fixed_arch({"act": "relu"}):
        ...     model = space()
        >>> model
        Sequential(
          (0): Linear(in_features=4, out_features=8, bias=True)
          (1): ReLU()
        )
    """
    return _fixed(_read_arch(arch))


def _replace(model: nn.Module, kind: type, factory: Callable[[Any], nn.Module], modules: list | None, fn: str) -> list:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module. Received: model={model!r} of type {type(model).__name__}.")
    if not callable(factory):
        raise TypeError(
            f"{fn}: factory must be callable (choice -> nn.Module). Received: factory={factory!r}. "
            "Pass a class such as DartsLayerChoice."
        )
    if modules is not None and not isinstance(modules, list):
        raise TypeError(f"{fn}: modules must be a list (or None). Received: modules={modules!r}.")
    replaced: list[tuple[str, nn.Module]] = []
    done: dict[int, nn.Module] = {}  # a choice module used twice is replaced by one new module

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent._modules.items()):  # named_children() would skip a repeated child
            if child is None:
                continue
            visit(child)  # inner choices first: an outer factory then sees replaced inner ones
            if isinstance(child, kind):
                if id(child) not in done:
                    new = factory(child)
                    if not isinstance(new, nn.Module):
                        raise TypeError(
                            f"{fn}: factory must return an nn.Module. Received: factory({child.label!r}) "
                            f"returned {new!r} of type {type(new).__name__}."
                        )
                    done[id(child)] = new
                    replaced.append((child.label, new))
                setattr(parent, name, done[id(child)])

    visit(model)
    if modules is not None:
        modules.extend(replaced)
    return replaced


def replace_layer_choice(
    model: nn.Module, factory: Callable[[LayerChoice], nn.Module], modules: list | None = None
) -> list[tuple[str, nn.Module]]:
    """Replace, in place, every :class:`LayerChoice` in ``model`` by ``factory(choice)``.

    Returns the list of ``(label, new module)`` in the model's order, and extends ``modules``
    with it when given (as seed 002's one-shot trainer does). Choices nested in candidates are
    replaced first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import LayerChoice, replace_layer_choice
        >>> model = nn.Sequential(nn.Linear(2, 2), LayerChoice([nn.ReLU(), nn.Tanh()], label="act"))
        >>> class First(nn.Module):
        ...     def __init__(self, choice):
        ...         super().__init__()
        ...         self.op = choice[0]
        ...     def forward(self, x):
        ...         return self.op(x)
        >>> nas_modules = []
        >>> replace_layer_choice(model, First, nas_modules)
        [('act', First(
          (op): ReLU()
        ))]
        >>> model(torch.ones(1, 2)).shape
        torch.Size([1, 2])
    """
    return _replace(model, LayerChoice, factory, modules, "replace_layer_choice")


def replace_input_choice(
    model: nn.Module, factory: Callable[[InputChoice], nn.Module], modules: list | None = None
) -> list[tuple[str, nn.Module]]:
    """Replace, in place, every :class:`InputChoice` in ``model`` by ``factory(choice)``.

    Returns the list of ``(label, new module)``, and extends ``modules`` with it when given.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import InputChoice, replace_input_choice
        >>> from trainflow.nas.space import ChosenInputs
        >>> model = nn.ModuleList([InputChoice(2, label="skip")])
        >>> replace_input_choice(model, lambda choice: ChosenInputs(choice.options[-1], choice.reduction))
        [('skip', ChosenInputs(chosen=[1], reduction='sum'))]
        >>> model[0]([torch.zeros(1), torch.ones(1)])
        tensor([1.])
    """
    return _replace(model, InputChoice, factory, modules, "replace_input_choice")
