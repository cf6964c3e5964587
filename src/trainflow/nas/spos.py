"""Single-path one-shot search (SPOS, Guo et al., 2020): train a supernet one path at a time, then search it.

:class:`SinglePathTrainer` replaces each ``LayerChoice`` of the space by a
:class:`SampledLayerChoice` and each ``InputChoice`` by a :class:`SampledInputChoice`, which
run only the option currently chosen. Training is the plain step ``Step(loss, optimizer,
name="supernet")``; before each update the callback :class:`PathSampler` sets one option per label,
drawn uniformly from its own ``torch.Generator`` (seeded by ``seed``; its state is part of
every checkpoint, so a resumed supernet training samples the same paths). Options not on the
path get no gradient in that update (``None``: SGD's momentum and Adam's moments skip them).

:meth:`SinglePathTrainer.search` then evaluates architectures with the trained shared weights
(no retraining): the strategy (part 1's ``RegularizedEvolution``, ``GridSearch``, ``Random``,
``TPE``, or any optuna sampler) proposes an architecture, the supernet is set to that path and
``evaluate(space)`` scores it; :meth:`SinglePathTrainer.export` returns the best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import optuna
import torch
from optuna.distributions import CategoricalDistribution
from torch import nn

from trainflow.nas.experiment import _encode, _quiet_optuna, _same
from trainflow.nas.space import InputChoice, LayerChoice, _reduce, replace_input_choice, replace_layer_choice
from trainflow.nas.strategies import GridSearch, _Strategy
from trainflow.step import Step
from trainflow.trainer import Trainer

__all__ = ["PathSampler", "SampledInputChoice", "SampledLayerChoice", "SinglePathTrainer"]


class SampledLayerChoice(nn.Module):
    """A ``LayerChoice`` that runs one candidate: the option ``chosen`` (set by the sampler or a search).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import LayerChoice
        >>> from trainflow.nas.spos import SampledLayerChoice
        >>> layer = SampledLayerChoice(LayerChoice({"relu": nn.ReLU(), "neg": nn.Identity()}, label="act"))
        >>> layer.options, layer.chosen
        (['relu', 'neg'], 'relu')
        >>> layer.chosen = "neg"; layer(torch.tensor([-1.0]))
        tensor([-1.])
    """

    def __init__(self, choice: LayerChoice) -> None:
        super().__init__()
        self.label = choice.label
        self.op_choices = nn.ModuleDict(choice.named_children())
        self.chosen: Any = self.options[0]

    @property
    def options(self) -> list[str]:
        """The option names, in order."""
        return list(self.op_choices)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.op_choices[self.chosen](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"label={self.label!r}, chosen={self.chosen!r}"


class SampledInputChoice(nn.Module):
    """An ``InputChoice`` that uses the inputs ``chosen`` (a sorted index list), reduced as the choice says.

    Example:
        >>> import torch
        >>> from trainflow.nas import InputChoice
        >>> from trainflow.nas.spos import SampledInputChoice
        >>> pick = SampledInputChoice(InputChoice(3, 2, label="skip"))
        >>> pick.options
        [[0, 1], [0, 2], [1, 2]]
        >>> pick.chosen = [0, 2]; pick([torch.ones(1), torch.zeros(1), torch.ones(1)])
        tensor([2.])
    """

    def __init__(self, choice: InputChoice) -> None:
        super().__init__()
        self.label = choice.label
        self.options = [list(o) for o in choice.options]
        self.reduction = choice.reduction
        self.chosen: Any = self.options[0]

    def forward(self, inputs: Any) -> Any:
        return _reduce([inputs[i] for i in self.chosen], self.reduction)

    def extra_repr(self) -> str:
        return f"label={self.label!r}, chosen={self.chosen!r}, reduction={self.reduction!r}"


_SAMPLED = (SampledLayerChoice, SampledInputChoice)


class PathSampler:
    """A callback that sets the supernet to a uniformly drawn path before each update.

    It draws one option per label from its own ``torch.Generator`` (seeded by ``seed``) and sets
    it with ``set_path``: at ``on_fit_start`` (the path drawn for the next update, or a first one),
    then after every update (``on_update_end``), for the next one. Its state, the generator's and the path drawn for the
    next update, is part of every checkpoint (key ``"path_sampler"``); it must come before the
    callbacks that save (``SinglePathTrainer`` puts it first).

    Example:
        >>> chosen = []
        >>> sampler = PathSampler({"act": ["relu", "tanh"], "skip": [[0], [1]]}, chosen.append, seed=0)
        >>> sampler.on_fit_start(None); sampler.on_update_end(None, None, {})
        >>> len(chosen), sorted(chosen[0]), sampler.path == chosen[1]
        (2, ['act', 'skip'], True)
    """

    state_key = "path_sampler"

    def __init__(self, options: dict[str, list], set_path: Callable[[dict[str, Any]], None], seed: int) -> None:
        self.options = options
        self.set_path = set_path
        self.generator = torch.Generator().manual_seed(seed)
        self.path: dict[str, Any] | None = None  # the path of the next update

    def sample(self) -> dict[str, Any]:
        """Draw the next path (for each label, an option drawn uniformly) and set it."""
        self.path = {
            label: options[int(torch.randint(len(options), (1,), generator=self.generator))]
            for label, options in self.options.items()
        }
        self.set_path(self.path)
        return self.path

    def on_fit_start(self, trainer: Any) -> None:
        if self.path is None:
            self.sample()
        else:  # a search may have set other paths since the last update: the next update's again
            self.set_path(self.path)

    def on_update_end(self, trainer: Any, step: Any, losses: Any) -> None:
        self.sample()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "path": self.path}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.path = state["path"]
        if self.path is not None:
            self.set_path(self.path)


class SinglePathTrainer:
    """SPOS: train the supernet one uniformly sampled path per update, then search it without retraining.

    Args:
        space: the model holding the LayerChoice / InputChoice modules (replaced in place);
            ``loss`` and ``optimizer`` are made on it.
        loss: ``loss(batch)``, as a ``Step``'s loss.
        optimizer: the supernet's optimizer.
        seed: seeds the path sampler (its generator is its own: the global RNG is not drawn from).
        clip_grad_norm: clip the gradient norm of each update.
        callbacks, out_dir, **trainer_options: passed to the ``Trainer`` (``trainer``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import GridSearch, LayerChoice, SinglePathTrainer
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 4), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"))
        >>> def mse(batch):
        ...     return model(batch).pow(2).mean()
        >>> spos = SinglePathTrainer(model, mse, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> spos.fit([torch.randn(8, 2)] * 4, epochs=1)
        >>> best = spos.search(lambda m: -mse(torch.ones(4, 2)).item(), strategy=GridSearch())
        >>> sorted(best), len(spos.trials)
        (['act'], 2)
    """

    def __init__(
        self,
        space: nn.Module,
        loss: Callable[[Any], Any],
        optimizer: torch.optim.Optimizer,
        *,
        seed: int = 0,
        clip_grad_norm: float | None = None,
        callbacks: Iterable[Any] = (),
        out_dir: Any = None,
        **trainer_options: Any,
    ) -> None:
        where = "SinglePathTrainer"
        if not isinstance(space, nn.Module):
            raise TypeError(
                f"{where}: space must be the model (an nn.Module) holding the LayerChoice/InputChoice modules. "
                f"Received: space={space!r} of type {type(space).__name__}."
            )
        if not callable(loss):
            raise TypeError(f"{where}: loss must be a function of the batch. Received: loss={loss!r}.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{where}: optimizer must be a torch.optim.Optimizer over the space's weights. "
                f"Received: optimizer={optimizer!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{where}: seed must be an int >= 0. Received: seed={seed!r}.")
        self.space = space
        replace_layer_choice(space, SampledLayerChoice)
        replace_input_choice(space, SampledInputChoice)
        self.modules: dict[str, list[nn.Module]] = {}
        for module in space.modules():
            if isinstance(module, _SAMPLED):
                same = self.modules.setdefault(module.label, [])
                if same and same[0].options != module.options:
                    raise ValueError(
                        f"Choices sharing label {module.label!r} must offer the same options: {same[0].options!r} "
                        f"and {module.options!r}. Received: label={module.label!r}. Give different decisions "
                        "different labels."
                    )
                same.append(module)
        if not self.modules:
            raise ValueError(
                f"{where}: the space has no LayerChoice or InputChoice, so there is no architecture to search. "
                f"Received: space of type {type(space).__name__}. Build it with LayerChoice(...) / InputChoice(...)."
            )
        self.search_space = {label: list(modules[0].options) for label, modules in self.modules.items()}
        self.sampler = PathSampler(self.search_space, self.set_path, seed)
        self.trials: list[tuple[dict[str, Any], float]] = []
        self._best: dict[str, Any] | None = None
        step = Step(loss, optimizer, name="supernet", clip_grad_norm=clip_grad_norm)
        self.trainer = Trainer(space, step, callbacks=[self.sampler, *callbacks], out_dir=out_dir, **trainer_options)

    def set_path(self, arch: dict[str, Any]) -> None:
        """Make the supernet run ``arch`` ({label: option}, every label given).

        Example:
            >>> from torch import nn
            >>> from trainflow.nas import LayerChoice, SinglePathTrainer
            >>> model = nn.Sequential(nn.Linear(2, 2), LayerChoice([nn.ReLU(), nn.Tanh()], label="act"))
            >>> spos = SinglePathTrainer(model, lambda b: model(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1))
            >>> spos.set_path({"act": "1"}); model[1].chosen
            '1'
        """
        if not isinstance(arch, dict) or sorted(arch) != sorted(self.modules):
            raise ValueError(
                f"SinglePathTrainer.set_path: arch must give an option for every label {list(self.modules)}. "
                f"Received: arch={arch!r}."
            )
        for label, option in arch.items():
            options = self.search_space[label]
            if not any(_same(option, o) for o in options):
                raise ValueError(
                    f"SinglePathTrainer.set_path: {option!r} is not an option of {label!r}. "
                    f"Received: arch[{label!r}]={option!r}. Expected one of {options!r}."
                )
            for module in self.modules[label]:
                module.chosen = option

    def fit(self, train_data: Any, *, epochs: int, resume: Any = None, **fit_options: Any) -> None:
        """Train the supernet for ``epochs`` epochs (a total; ``resume="latest"`` continues a run).

        Other keywords go to ``Trainer.fit`` (``max_updates``, ``val_data``, ``val_step``).
        """
        self.trainer.fit(train_data, epochs=epochs, resume=resume, **fit_options)

    def search(
        self,
        evaluate: Callable[[nn.Module], float],
        *,
        strategy: Any,
        max_trials: int | None = None,
        objective: str = "maximize",
        seed: int = 0,
    ) -> dict[str, Any]:
        """Score architectures with the trained shared weights; return the best (also :meth:`export`).

        For each trial the strategy proposes an architecture, the supernet is set to it and
        ``evaluate(space)`` returns its score (e.g. the validation accuracy; set eval mode and
        ``torch.no_grad()`` inside it as you need). ``self.trials`` lists (architecture, score)
        in order. A ``GridSearch`` stops at its grid's size; other strategies need ``max_trials``.

        Args:
            evaluate: a function of the model returning a number.
            strategy: ``RegularizedEvolution(...)``, ``GridSearch()``, ``Random()``, ``TPE()`` or
                any ``optuna.samplers.BaseSampler``.
            max_trials: the number of architectures to evaluate.
            objective: ``"maximize"`` or ``"minimize"`` the score.
            seed: seeds the strategy.
        """
        where = "SinglePathTrainer.search"
        if not callable(evaluate):
            raise TypeError(f"{where}: evaluate must be a function of the model. Received: evaluate={evaluate!r}.")
        if objective not in ("maximize", "minimize"):
            raise ValueError(f"{where}: objective must be 'maximize' or 'minimize'. Received: objective={objective!r}.")
        if max_trials is not None and (isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1):
            raise ValueError(f"{where}: max_trials must be None or an int >= 1. Received: max_trials={max_trials!r}.")
        choices = {label: [_encode(o) for o in options] for label, options in self.search_space.items()}
        distributions = {label: CategoricalDistribution(c) for label, c in choices.items()}
        if isinstance(strategy, _Strategy):
            sampler = strategy._bind(seed, distributions, 1)
        elif isinstance(strategy, optuna.samplers.BaseSampler):
            sampler = strategy
        else:
            raise TypeError(
                f"{where}: strategy must be RegularizedEvolution(), GridSearch(), Random(), TPE() or an optuna "
                f"sampler. Received: strategy={strategy!r}."
            )
        budget = max_trials
        if isinstance(sampler, GridSearch):
            budget = sampler.size() if max_trials is None else min(max_trials, sampler.size())
        if budget is None:
            raise ValueError(
                f"{where}: give max_trials (only GridSearch stops by itself). Received: max_trials=None, "
                f"strategy={strategy!r}."
            )
        with _quiet_optuna():
            study = optuna.create_study(direction=objective, sampler=sampler)
        for _ in range(budget):
            with _quiet_optuna():
                trial = study.ask(distributions)
            arch = {
                label: next(o for c, o in zip(choices[label], self.search_space[label]) if _same(c, trial.params[label]))
                for label in self.search_space
            }
            self.set_path(arch)
            value = evaluate(self.space)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"{where}: evaluate must return a finite number. Received: {value!r} for architecture {arch!r}."
                )
            with _quiet_optuna():
                study.tell(trial, float(value))
            self.trials.append((arch, float(value)))
        sign = 1.0 if objective == "maximize" else -1.0
        self._best = max(self.trials[-budget:], key=lambda t: sign * t[1])[0]  # ties: the first
        return dict(self._best)

    def export(self) -> dict[str, Any]:
        """The best architecture of the last :meth:`search`, {label: option}, for ``fixed_arch``."""
        if self._best is None:
            raise RuntimeError(
                "SinglePathTrainer.export: no search has run yet. Call search(evaluate, strategy=...) after fit."
            )
        return dict(self._best)

    def state_dict(self) -> dict[str, Any]:
        """The run's state: the trainer's, the path sampler's generator included."""
        return self.trainer.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`; the next ``fit`` continues exactly there."""
        self.trainer.load_state_dict(state)
