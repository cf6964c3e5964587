"""Single-architecture trainers: what an experiment calls to train and score one sampled model.

An *evaluator* is any object with ``.evaluate(model)``; it trains the model and reports with
:func:`~trainflow.nas.report_intermediate_result` / :func:`~trainflow.nas.report_final_result`.

- :class:`FunctionalTrainer` wraps a function ``fn(model, **kwargs)`` that does everything.
- :class:`TrainModule` is a Lightning-style module (``training_step``, ``validation_step``,
  ``configure_optimizers``, hooks, ``self.log``), and :class:`ModuleTrainer` runs it on
  trainflow's own :class:`~trainflow.Trainer`: one :class:`~trainflow.Step` per update (a
  ``Step.custom`` under manual optimization), so metrics, callbacks and checkpoints work as in
  any trainflow run.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trainflow.custom import UpdateContext
from trainflow.losses import Average
from trainflow.schedules import Schedule
from trainflow.step import Step
from trainflow.trainer import Trainer

__all__ = ["FitState", "FunctionalTrainer", "ModuleTrainer", "TrainModule"]


class FunctionalTrainer:
    """An evaluator made of one function: ``evaluate(model)`` calls ``fn(model, **kwargs)``.

    ``fn`` trains the model however it likes and reports its results (seed 002's ``fit``
    function). The keyword arguments are checked against ``fn``'s signature when the trainer
    is built, not when the first trial runs.

    Example:
        >>> from torch import nn
        >>> from trainflow.nas import FunctionalTrainer, report_final_result
        >>> def fit(model, scale):
        ...     score = scale * sum(p.numel() for p in model.parameters())
        ...     report_final_result(score)
        ...     return score
        >>> FunctionalTrainer(fit, scale=0.5).evaluate(nn.Linear(3, 1))
        2.0
    """

    def __init__(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        if not callable(fn):
            raise TypeError(
                f"FunctionalTrainer: fn must be a function fn(model, **kwargs). Received: fn={fn!r} of type "
                f"{type(fn).__name__}. Pass the function itself, e.g. FunctionalTrainer(fit, dataloader=loader)."
            )
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: trust it
            signature = None
        if signature is not None:
            try:
                signature.bind(None, **kwargs)
            except TypeError as error:
                raise TypeError(
                    f"FunctionalTrainer: fn must accept the model as its first positional argument and the "
                    f"keyword arguments given ({error}). Received: fn{signature} with kwargs {sorted(kwargs)}. "
                    "Define it as `def fit(model, ...)` with a parameter for each keyword argument."
                ) from None
        self.fn, self.kwargs = fn, kwargs

    def evaluate(self, model: nn.Module) -> Any:
        """Train and score ``model``: ``fn(model, **kwargs)``; returns what ``fn`` returns."""
        return self.fn(model, **self.kwargs)

    def __repr__(self) -> str:
        return f"FunctionalTrainer({getattr(self.fn, '__name__', self.fn)!r}, kwargs={sorted(self.kwargs)})"


class FitState:
    """What a :class:`TrainModule` sees as ``self.trainer`` while (and after) it is fitted.

    Attributes:
        callback_metrics: the latest logged values by name, as tensors: for a value logged in
            ``training_step``, its value at the last update; for one logged in
            ``validation_step``, its mean over the last validation pass (weighted by each
            batch's sample count, as Lightning weights its epoch means); and after validation,
            each ``"val/<name>"`` metric given in ``metrics=`` under ``<name>``.
        trainer: trainflow's :class:`~trainflow.Trainer` that runs the module.
        max_epochs: the number of epochs of the fit.

    Example:
        >>> from trainflow.nas.module import FitState
        >>> FitState(trainer=None, max_epochs=3).callback_metrics
        {}
    """

    def __init__(self, trainer: Trainer | None, max_epochs: int) -> None:
        self.trainer = trainer
        self.max_epochs = max_epochs
        self.callback_metrics: dict[str, torch.Tensor] = {}
        self.stage: str | None = None  # "train" or "validate" while a step function runs
        self.val_logged: dict[str, Any] = {}  # what the current validation_step logged
        self.val_batch = 0  # the index of the next validation batch in this pass
        self.optimizers: list[torch.optim.Optimizer] = []
        self.update: UpdateContext | None = None  # the current update, under manual optimization

    @property
    def current_epoch(self) -> int:
        """Completed epochs (the epoch being trained, counted from 0)."""
        return self.trainer.epoch if self.trainer is not None else 0

    @property
    def global_step(self) -> int:
        """Optimizer updates so far."""
        return self.trainer.updates if self.trainer is not None else 0


class TrainModule(nn.Module):
    """A Lightning-style training module for one sampled model, run by :class:`ModuleTrainer`.

    Subclass it and define ``training_step(batch, batch_idx)`` (returning the loss) and
    ``configure_optimizers()`` (an optimizer, a list of optimizers stepped together, or a dict
    ``{"optimizer": ..., "lr_scheduler": ...}``); optionally ``validation_step(batch,
    batch_idx)``, ``on_validation_epoch_end()`` and ``teardown(stage)``. ``self.model`` is the
    sampled model, set by ``set_model`` after ``__init__`` (so ``self.parameters()`` includes
    it). ``self.log(name, value)`` feeds ``self.trainer.callback_metrics[name]``.

    Manual optimization, as in Lightning: set ``automatic_optimization = False`` and, in
    ``training_step``, take ``self.optimizers()`` and call ``opt.zero_grad()``,
    ``self.manual_backward(loss)`` and ``opt.step()`` as often as needed (a GAN's two
    updates). Schedulers from ``configure_optimizers`` are still stepped by the trainer.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from trainflow.nas import TrainModule
        >>> class Regression(TrainModule):
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         loss = F.mse_loss(self.model(x), y)
        ...         self.log("train_loss", loss)
        ...         return loss
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> module = Regression()
        >>> module.set_model(torch.nn.Linear(3, 1))
        >>> sum(p.numel() for p in module.parameters())
        4
    """

    #: False: training_step steps the optimizers itself (self.optimizers(), self.manual_backward)
    automatic_optimization: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.model: nn.Module | None = None
        self._fit: FitState | None = None

    def set_model(self, model: nn.Module) -> None:
        """Make ``model`` (the architecture being evaluated) this module's ``self.model``."""
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"TrainModule.set_model: model must be an nn.Module. Received: model={model!r} of type "
                f"{type(model).__name__}. Build it from the space, e.g. `with fixed_arch(arch): model = space()`."
            )
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The sampled model's forward (override for something else)."""
        return self.model(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the loss of one training batch (a scalar tensor, or a dict with ``"loss"``)."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """Compute and ``self.log`` the validation values of one batch."""
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        """Return an optimizer, a list of them, or ``{"optimizer": ..., "lr_scheduler": ...}``."""
        raise NotImplementedError

    def on_validation_epoch_end(self) -> None:
        """Called after each validation pass; ``self.trainer.callback_metrics`` holds its means."""

    def teardown(self, stage: str) -> None:
        """Called with ``stage="fit"`` when training has finished."""

    @property
    def trainer(self) -> FitState:
        """The fit this module runs in (``callback_metrics``, ``current_epoch``, ``global_step``)."""
        if self._fit is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a trainer: self.trainer exists while (and after) a "
                "ModuleTrainer fits it. Run it with ModuleTrainer(module, train_data=..., epochs=...).evaluate(model)."
            )
        return self._fit

    def optimizers(self) -> Any:
        """The optimizers of ``configure_optimizers``: one, or a list when there are several.

        Under manual optimization their ``step()`` goes through the trainer's update (which
        checks that the update stepped, and clips when asked).
        """
        opts = self.trainer.optimizers
        if not self.automatic_optimization:
            opts = [_ManualOptimizer(opt, self.trainer) for opt in opts]
        return opts[0] if len(opts) == 1 else opts

    def manual_backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` under manual optimization, into the optimizers' parameters only."""
        update = self.trainer.update
        if update is None:
            raise RuntimeError(
                f"{type(self).__name__}.manual_backward is for manual optimization, inside training_step: "
                "set `automatic_optimization = False` in the class (or return the loss and let the trainer "
                "differentiate it)."
            )
        update.backward(loss)

    @property
    def current_epoch(self) -> int:
        """Completed epochs of the current fit."""
        return self.trainer.current_epoch

    @property
    def global_step(self) -> int:
        """Optimizer updates of the current fit."""
        return self.trainer.global_step

    def log(self, name: str, value: Any, *, batch_size: int | None = None) -> None:
        """Log a scalar: per update in ``training_step``, as an epoch mean in ``validation_step``.

        The validation mean weights each batch by its sample count (the first tensor's first
        dimension), or by ``batch_size`` when given, as Lightning does.
        """
        fit = self.trainer
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"TrainModule.log: name must be a non-empty str without '/'. Received: name={name!r}.")
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        if tensor.numel() != 1:
            raise ValueError(
                f"TrainModule.log: {name!r} must be a scalar. Received: a tensor of shape {tuple(tensor.shape)}. "
                "Log its mean (value.mean()) or one element."
            )
        tensor = tensor.reshape(())
        if fit.stage == "validate":
            fit.val_logged[name] = tensor if batch_size is None else Average(tensor * batch_size, batch_size)
        elif fit.stage == "train":
            fit.callback_metrics[name] = tensor
        else:
            raise RuntimeError(
                f"TrainModule.log({name!r}) was called outside training_step and validation_step; log values "
                "from those two methods."
            )


def _overrides(cls: type, method: str) -> bool:
    return getattr(cls, method) is not getattr(TrainModule, method)


def _check_module_class(cls: type, val_data: Any) -> None:
    for method in ("training_step", "configure_optimizers"):
        if not _overrides(cls, method):
            raise TypeError(
                f"ModuleTrainer: {cls.__name__} does not define {method}(). Received: module of class "
                f"{cls.__name__}. Define `def {method}(self, ...)` in it (see TrainModule)."
            )
    if val_data is not None and not _overrides(cls, "validation_step"):
        raise ValueError(
            f"ModuleTrainer: val_data is given but {cls.__name__} defines no validation_step(batch, batch_idx). "
            "Received: val_data set. Define validation_step (and self.log its values), or drop val_data."
        )


def _trainer_options(options: dict[str, Any]) -> dict[str, Any]:
    allowed = [name for name, p in inspect.signature(Trainer).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"ModuleTrainer: unknown trainer option(s) {unknown}. Received: {sorted(options)}. "
            f"Trainer options are {allowed} (the module and its optimizers make the models and steps)."
        )
    return options


def _optimization(configured: Any, cls_name: str) -> tuple[list[torch.optim.Optimizer], list[Schedule]]:
    """What ``configure_optimizers`` returned, as optimizers and schedules (Lightning's forms)."""
    fix = (
        "Return an optimizer, a list of optimizers (stepped together), or "
        "{'optimizer': opt, 'lr_scheduler': scheduler}."
    )
    schedules: list[Schedule] = []
    if isinstance(configured, dict):
        if "optimizer" not in configured or set(configured) - {"optimizer", "lr_scheduler"}:
            raise ValueError(
                f"{cls_name}.configure_optimizers returned a dict with keys {sorted(configured)}; expected "
                f"'optimizer' and optionally 'lr_scheduler'. {fix}"
            )
        scheduler = configured.get("lr_scheduler")
        if isinstance(scheduler, dict):
            interval = scheduler.get("interval", "epoch")
            if interval not in ("epoch", "step") or "scheduler" not in scheduler:
                raise ValueError(
                    f"{cls_name}.configure_optimizers: lr_scheduler as a dict needs 'scheduler' and an "
                    f"'interval' of 'epoch' or 'step'. Received: {scheduler!r}."
                )
            schedules.append(Schedule(scheduler["scheduler"], interval="update" if interval == "step" else "epoch"))
        elif scheduler is not None:
            schedules.append(Schedule(scheduler, interval="epoch"))  # Lightning's default interval
        configured = configured["optimizer"]
    optimizers = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    if not optimizers or not all(isinstance(opt, torch.optim.Optimizer) for opt in optimizers):
        raise TypeError(
            f"{cls_name}.configure_optimizers must return what trains the module. Received: {configured!r}. {fix}"
        )
    return optimizers, schedules


class ModuleTrainer:
    """An evaluator that fits a :class:`TrainModule` on trainflow's :class:`~trainflow.Trainer`.

    ``evaluate(model)`` trains a fresh module with ``model`` set (``module.set_model(model)``):
    a module instance is deep-copied for each evaluation, a class or zero-argument factory is
    called for each one (after the experiment has seeded the trial), so trials never share
    trained weights. Each epoch runs ``training_step`` once per batch of ``train_data`` (one
    update: zero the gradients, the loss, backward, step every optimizer), then, with
    ``val_data``, ``validation_step`` over it in eval mode without gradients, then
    ``on_validation_epoch_end``; after the last epoch, ``teardown("fit")``. Returns the
    trained module (its ``trainer.callback_metrics`` hold the last values).

    Args:
        module: a TrainModule instance, a TrainModule subclass, or a function returning one.
        train_data: the training batches (a DataLoader or any re-iterable).
        val_data: the validation batches, or None for no validation.
        epochs: the number of epochs (>= 1).
        trainer_options: passed to :class:`~trainflow.Trainer` (``metrics``, ``callbacks``,
            ``device``, ``precision``, ``out_dir``, ...); the callbacks see every update.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from trainflow.nas import ModuleTrainer, TrainModule
        >>> class Regression(TrainModule):
        ...     def training_step(self, batch, batch_idx):
        ...         return F.mse_loss(self.model(batch[0]), batch[1])
        ...     def validation_step(self, batch, batch_idx):
        ...         self.log("val_loss", F.mse_loss(self.model(batch[0]), batch[1]))
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=4)
        >>> trainer = ModuleTrainer(Regression, train_data=data, val_data=data, epochs=2)
        >>> trained = trainer.evaluate(torch.nn.Linear(3, 1))
        >>> trained.trainer.trainer.updates, sorted(trained.trainer.callback_metrics)
        (8, ['val_loss'])
    """

    def __init__(
        self,
        module: TrainModule | type[TrainModule] | Callable[[], TrainModule],
        *,
        train_data: Iterable,
        val_data: Iterable | None = None,
        epochs: int,
        **trainer_options: Any,
    ) -> None:
        if isinstance(module, TrainModule):
            _check_module_class(type(module), val_data)
        elif isinstance(module, type) and issubclass(module, TrainModule):
            _check_module_class(module, val_data)
        elif isinstance(module, nn.Module) or isinstance(module, type) or not callable(module):
            raise TypeError(
                "ModuleTrainer: module must be a TrainModule (an instance, its class, or a function returning "
                f"one). Received: module={module!r} of type {type(module).__name__}. Subclass "
                "trainflow.nas.TrainModule and define training_step and configure_optimizers."
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"ModuleTrainer: epochs must be an int >= 1. Received: epochs={epochs!r}.")
        for arg, data in (("train_data", train_data), ("val_data", val_data)):
            if not isinstance(data, Iterable) and not (arg == "val_data" and data is None):
                raise TypeError(
                    f"ModuleTrainer: {arg} must be a DataLoader or an iterable of batches. "
                    f"Received: {arg}={data!r}."
                )
        self.module = module
        self.train_data, self.val_data, self.epochs = train_data, val_data, epochs
        self.trainer_options = _trainer_options(trainer_options)

    def _fresh(self) -> TrainModule:
        if isinstance(self.module, TrainModule):
            return copy.deepcopy(self.module)
        module = self.module()
        if not isinstance(module, TrainModule):
            raise TypeError(
                f"ModuleTrainer: the module factory must return a TrainModule. Received: it returned {module!r} "
                f"of type {type(module).__name__}."
            )
        _check_module_class(type(module), self.val_data)
        return module

    def evaluate(self, model: nn.Module) -> TrainModule:
        """Fit a fresh module around ``model``; return it, trained (see the class)."""
        module = self._fresh()
        module.set_model(model)
        optimizers, schedules = _optimization(module.configure_optimizers(), type(module).__name__)
        fit = module._fit = FitState(None, self.epochs)
        fit.optimizers = optimizers
        run = _Run(module, fit)
        if module.automatic_optimization:
            step = Step(run.train, optimizers, name="training_step", scheduler=schedules or None)
        else:
            step = Step.custom(run.manual, optimizers, name="training_step", scheduler=schedules or None)
        options = dict(self.trainer_options)
        options["callbacks"] = [run, *options.get("callbacks", ())]
        fit.trainer = Trainer(module, [step], **options)
        validation = {} if self.val_data is None else {"val_data": self.val_data, "val_step": run.validate}
        fit.trainer.fit(self.train_data, epochs=self.epochs, **validation)
        module.teardown("fit")
        return module

    def __repr__(self) -> str:
        module = self.module if isinstance(self.module, type) else type(self.module)
        return f"ModuleTrainer({getattr(module, '__name__', module)}, epochs={self.epochs})"


class _Run:
    """One fit of a module: its step functions, and its Lightning hook on trainflow's events."""

    def __init__(self, module: TrainModule, fit: FitState) -> None:
        self.module, self.fit = module, fit
        self.name = type(module).__name__

    def train(self, batch: Any) -> torch.Tensor:
        """The automatic step's loss: ``training_step``'s (the trainer differentiates and steps)."""
        with _stage(self.fit, "train"):
            out = self.module.training_step(batch, self.fit.trainer.epoch_progress[0] - 1)
        loss = out.get("loss") if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"{self.name}.training_step must return the loss: a scalar tensor, or a dict with a 'loss' tensor. "
                f"Received: {out!r}. End it with `return loss`."
            )
        return loss.reshape(())

    def manual(self, batch: Any, update: UpdateContext) -> torch.Tensor | None:
        """The custom step under manual optimization: ``training_step`` steps through ``update``."""
        self.fit.update = update
        try:
            with _stage(self.fit, "train"):
                out = self.module.training_step(batch, self.fit.trainer.epoch_progress[0] - 1)
        finally:
            self.fit.update = None
        return out.get("loss") if isinstance(out, dict) else out  # logged, not differentiated

    def validate(self, batch: Any) -> dict[str, Any] | None:
        """The values ``validation_step`` logged, for the trainer to average over the pass."""
        self.fit.val_logged = {}
        with _stage(self.fit, "validate"):
            self.module.validation_step(batch, self.fit.val_batch)
        self.fit.val_batch += 1
        return dict(self.fit.val_logged) or None

    def on_validation_end(self, trainer: Trainer, logs: dict[str, float]) -> None:
        for key, value in logs.items():
            if key.startswith("val/"):
                self.fit.callback_metrics[key[len("val/"):]] = torch.tensor(value)
        self.fit.val_batch = 0
        self.module.on_validation_epoch_end()


@contextmanager
def _stage(fit: FitState, stage: str) -> Iterator[None]:
    fit.stage = stage
    try:
        yield
    finally:
        fit.stage = None


class _ManualOptimizer:
    """An optimizer as ``self.optimizers()`` returns it under manual optimization.

    ``step`` goes through the trainer's update context; everything else (``zero_grad``,
    ``param_groups``, ``state``, ...) is the optimizer's own.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fit: FitState) -> None:
        self.optimizer, self._fit = optimizer, fit

    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError(
                "TrainModule.optimizers(): step(closure) is not supported under manual optimization. "
                f"Received: closure={closure!r}. Compute the loss, self.manual_backward(loss), then opt.step()."
            )
        if self._fit.update is None:
            raise RuntimeError("opt.step() under manual optimization must be called inside training_step.")
        self._fit.update.step(self.optimizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def __repr__(self) -> str:
        return f"manual({self.optimizer!r})"
