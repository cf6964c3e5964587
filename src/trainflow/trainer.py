"""``Trainer``: runs a flow of steps over data, firing events; everything else attaches to them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainflow.accumulation import accumulate_window
from trainflow.data.batch import move, sample_count, split
from trainflow.data.streams import Stream, open_streams
from trainflow.events import Events
from trainflow.flow import Flow
from trainflow.custom import Guard, UpdateContext, check_result
from trainflow.losses import Term, check_finite, collect_added, parse_loss, total_of
from trainflow.metrics import Metrics
from trainflow.params import KEEP_EVAL, named_parameters
from trainflow.precision import Precision
from trainflow.step import Step

__all__ = ["Trainer"]

#: the logged name of the add_loss total in each step
AUX = "aux"

#: on devices where reading a value stalls the host, losses are checked for NaN this often
_FINITE_CHECK_EVERY = 50



def _models(models: Any) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {"model": models}
    if isinstance(models, Mapping) and models:
        for name, m in models.items():
            if not isinstance(name, str) or not isinstance(m, nn.Module):
                raise TypeError(
                    "Trainer: `models` must map names to nn.Modules. "
                    f"Received: models[{name!r}] of type {type(m).__name__}. Pass e.g. {{'G': gen, 'D': disc}}."
                )
        return dict(models)
    raise TypeError(
        "Trainer: `models` must be an nn.Module or a non-empty dict of named nn.Modules. "
        f"Received: models of type {type(models).__name__}. Pass the model, or {{'G': gen, 'D': disc}}."
    )


def _device(device: Any) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Trainer: `device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device. "
            f"Received: device={device!r}. Use device='auto' to pick CUDA when it is available."
        ) from None


class _Plan:
    """What the trainer precomputes for one step: the parameters it owns and its log keys."""

    __slots__ = ("step", "params", "keys", "update_schedules", "epoch_schedules", "by_optimizer", "guard")

    def __init__(self, step: Step, named: list[tuple[str, torch.Tensor]]) -> None:
        self.step = step
        owned = {id(p) for _, p in named}
        params: dict[int, torch.Tensor] = {}
        self.by_optimizer: dict[int, list[torch.Tensor]] = {}
        for i, opt in enumerate(step.optimizers):
            opt_params = [p for g in opt.param_groups for p in g["params"]]
            self.by_optimizer[id(opt)] = opt_params
            if not any(id(p) in owned for p in opt_params):
                raise ValueError(
                    f"Trainer: step {step.name!r}: optimizer[{i}] ({type(opt).__name__}) owns no parameter "
                    f"of the given models (it has {len(opt_params)} parameter(s), none of them in `models`). "
                    "Pass the model it optimizes in `models=`, or build the optimizer on that model's parameters."
                )
            for p in opt_params:
                params.setdefault(id(p), p)
        self.params: tuple[torch.Tensor, ...] = tuple(params.values())
        self.keys: dict[str, str] = {}
        # a custom update runs user code that could touch anything: watch the other parameters
        self.guard = Guard([(n, p) for n, p in named if id(p) not in params]) if step.update else None
        self.update_schedules = tuple(s for s in step.schedulers if s.interval == "update")
        self.epoch_schedules = tuple(s for s in step.schedulers if s.interval == "epoch")

    def trainable(self) -> list[torch.Tensor]:
        params = [p for p in self.params if p.requires_grad]
        if not params:
            raise ValueError(
                f"Step {self.step.name!r}: every parameter of its optimizers is frozen (requires_grad=False), "
                "so the update would change nothing. Unfreeze some (trainflow.unfreeze) or drop the step."
            )
        return params

    def key(self, term: str) -> str:
        key = self.keys.get(term)
        if key is None:
            key = self.keys[term] = f"{self.step.name}/{term}"
        return key


class Trainer:
    """Runs a flow of optimizer steps over data, with metrics and callbacks.

    Args:
        models: an ``nn.Module`` or a dict of named modules. The trainer sets their train/eval
            mode, moves them to ``device``, and names their state in ``state_dict()``.
        steps: a :class:`Step` or a list of them, run as a cycle.
        metrics: a dict ``{"train/<name>": metric, "val/<name>": metric}`` of objects with
            ``update/compute/reset`` (torchmetrics). Call ``update`` yourself in the loss or
            validation function; the trainer computes, logs and resets them at epoch end
            (``train/``) and after validation (``val/``).
        callbacks: objects with event methods (see :mod:`trainflow.events`).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, or a ``torch.device``.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA, with loss scaling).
        compile: compile each model with ``torch.compile``.
        out_dir: where callbacks write artifacts (logs, plots, checkpoints).

    Counters: ``trainer.epoch`` (completed epochs) and ``trainer.updates`` (optimizer updates
    of all steps); ``trainer.max_epochs`` / ``trainer.max_updates`` are the current ``fit``'s
    limits. ``trainer.losses`` holds the last update's losses (tensors), ``trainer.logs`` the
    last epoch's values. ``trainer.stop()`` ends ``fit`` after the current update.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from trainflow import Step, Trainer
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> data = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=8)
        >>> def mse(batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> trainer = Trainer(model, [Step(mse, opt)])
        >>> trainer.fit(data, epochs=2)
        >>> trainer.epoch, trainer.updates
        (2, 8)
    """

    def __init__(
        self,
        models: nn.Module | Mapping[str, nn.Module],
        steps: Step | Iterable[Step],
        *,
        metrics: Mapping[str, Any] | None = None,
        callbacks: Iterable[Any] = (),
        device: str | torch.device = "auto",
        precision: str = "32",
        compile: bool = False,
        out_dir: str | Path | None = None,
    ) -> None:
        self.models = _models(models)
        #: the models as given: the module itself, or the dict (for naming parameters)
        self.model_tree: nn.Module | dict[str, nn.Module] = models if isinstance(models, nn.Module) else self.models
        self.flow = Flow(list(steps) if not isinstance(steps, Step) else steps)
        self.device = _device(device)
        self.precision = Precision(precision, self.device)
        self.metrics = Metrics(metrics)
        self.events = Events(callbacks)
        if not isinstance(compile, bool):
            raise TypeError(f"Trainer: `compile` must be True or False. Received: compile={compile!r}.")
        if out_dir is not None and not isinstance(out_dir, (str, Path)):
            raise TypeError(
                f"Trainer: `out_dir` must be a path or None. Received: out_dir={out_dir!r}. Pass e.g. 'runs/gan'."
            )
        self.out_dir = None if out_dir is None else Path(out_dir)
        named = self.named_parameters()
        self._plans = {step: _Plan(step, named) for step in self.flow.steps}
        self.optimizers = self._name_optimizers()
        for model in self.models.values():
            model.to(self.device)
            if compile:
                model.compile()
        self.metrics.to(self.device)
        self.epoch = 0
        self.updates = 0
        self.max_epochs: int | None = None  # the limits of the current (or last) fit
        self.max_updates: int | None = None
        self.should_stop = False
        self.losses: dict[str, torch.Tensor] = {}  # the last update's losses
        self.logs: dict[str, float] = {}  # the last epoch's values (loss means, metrics)
        self._streams: dict[str, Stream] = {}
        self._in_epoch = False
        self._last_batches: list[Any] = []
        self._epoch_losses: dict[str, list[torch.Tensor]] = {}

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        data: Any,
        *,
        epochs: int | None = None,
        max_updates: int | None = None,
        val_data: Iterable | None = None,
        val_step: Callable[[Any], Any] | None = None,
    ) -> None:
        """Train until ``epochs`` epochs or ``max_updates`` updates have been completed.

        ``data`` is an iterable of batches (the "train" stream) or a dict of named streams.
        Both limits are totals for the trainer, so calling ``fit`` again continues a run.
        With ``val_data``, ``val_step(batch)`` runs after every epoch under ``evaluate``.
        """
        self._check_limits(epochs, max_updates)
        if (val_data is None) != (val_step is None):
            raise ValueError(
                "fit: `val_data` and `val_step` go together. Received: "
                f"val_data={'set' if val_data is not None else None}, val_step={val_step!r}. "
                "Pass both (val_step(batch) updates the 'val/' metrics and may return a loss) or neither."
            )
        if val_step is not None and not callable(val_step):
            raise TypeError(f"fit: `val_step` must be a function of the batch. Received: {val_step!r}.")
        needed = {}
        for step in self.flow.steps:
            needed.setdefault(step.data, step.name)
        streams = open_streams(data, needed, self.device)
        if self._in_epoch and self._same_data(streams):
            streams = self._streams  # continue the epoch an earlier fit stopped in
        else:
            self._in_epoch = False
        self._streams = streams
        self.max_epochs, self.max_updates = epochs, max_updates
        self._warn_batchnorm()
        self.should_stop = False
        modes = _modes(self.models)
        try:
            for model in self.models.values():
                _train_mode(model)
            self.events.fire("on_fit_start", self)
            while not self._done(epochs, max_updates):
                if not self._in_epoch:
                    self._start_epoch()
                if not self._run_updates(max_updates):
                    break  # stopped inside the epoch
                self._end_epoch(val_data, val_step)
            self.events.fire("on_fit_end", self)
        except BaseException as error:
            self.events.fire("on_exception", self, error)
            raise
        finally:
            _restore(modes)

    def _warn_batchnorm(self) -> None:
        """Accumulation is not exact with batch norm in train mode: each chunk has its own statistics."""
        for step, plan in self._plans.items():
            if step.accumulate == 1 and step.microbatch_size is None:
                continue
            owned = {id(p) for p in plan.params}
            for name, model in self.models.items():
                if not any(id(p) in owned for p in model.parameters()):
                    continue
                norms = [n for n, m in model.named_modules()
                         if isinstance(m, nn.modules.batchnorm._BatchNorm) and not getattr(m, KEEP_EVAL, False)]
                if norms:
                    warnings.warn(
                        f"Step {step.name!r} accumulates gradients over several chunks, but model {name!r} has "
                        f"batch-norm layers in train mode ({', '.join(norms[:3])}{', ...' if len(norms) > 3 else ''}): "
                        "each chunk is normalised with its own statistics, so the update is not the big-batch "
                        "update. Use GroupNorm/LayerNorm, or freeze(..., batchnorm='eval') to fix their statistics.",
                        UserWarning,
                        stacklevel=3,
                    )

    def _start_epoch(self) -> None:
        self._streams["train"].restart()
        self._in_epoch = True
        self._epoch_losses = {}
        self.events.fire("on_epoch_start", self)

    def _run_updates(self, max_updates: int | None) -> bool:
        """Run updates until the train stream is exhausted (True) or the run must stop (False)."""
        flow, record, fire = self.flow, self._epoch_losses, self.events.fire
        while True:
            if self.should_stop or (max_updates is not None and self.updates >= max_updates):
                return False
            step = flow.current
            losses = self._update(step)
            if losses is None:
                return True
            self.updates += 1
            flow.advance()
            self.losses = losses
            for key, value in losses.items():
                record.setdefault(key, []).append(value)
            fire("on_update_end", self, step, losses)

    def _update(self, step: Step) -> dict[str, torch.Tensor] | None:
        """One optimizer update of ``step``: None when the train stream has run out."""
        plan = self._plans[step]
        if step.batch == "same":
            batches = self._last_batches
        else:
            batches = self._streams[step.data].take(step.accumulate)
            if not batches or (len(batches) < step.accumulate and step.partial_window == "drop"):
                return None
            self._last_batches = batches
        if step.update is not None:
            return self._custom_update(step, plan, batches[0])
        params = plan.trainable()
        for opt in step.optimizers:
            opt.zero_grad(set_to_none=True)
        if step.microbatch_size is not None:
            batches = [c for b in batches for c in split(b, step.microbatch_size, step.name)]
        if len(batches) == 1:
            terms = self._forward(step, batches[0])
            self.precision.scale(total_of(terms)).backward(inputs=params)
            values = {t.name: t.value.detach() for t in terms}
        else:
            values = accumulate_window(batches, lambda b: self._forward(step, b), self.precision.scale, params, step.name)
        self._check_finite(values, step)
        if step.clip_grad_norm is not None:
            for opt in step.optimizers:
                self.precision.unscale(opt)
            torch.nn.utils.clip_grad_norm_(params, step.clip_grad_norm)
        for opt in step.optimizers:
            self.precision.step(opt)
        self.precision.update()
        for schedule in plan.update_schedules:
            schedule.step()
        return {plan.key(name): value for name, value in values.items()}

    def _forward(self, step: Step, batch: Any) -> list[Term]:
        with self.precision.autocast():
            out, added = collect_added(step.loss, batch)
        terms = parse_loss(out, step.name)
        if added:  # add_loss values from the models' forward passes
            if any(t.name == AUX for t in terms):
                raise ValueError(
                    f"Step {step.name!r}: the loss function returns a term named {AUX!r}, the name of the "
                    "add_loss total. Rename that term."
                )
            terms.append(Term(AUX, total_of([Term(AUX, v) for v in added])))
        return terms

    def _custom_update(self, step: Step, plan: _Plan, batch: Any) -> dict[str, torch.Tensor]:
        ctx = UpdateContext(step, self.precision, plan.by_optimizer)
        plan.guard.arm()
        with self.precision.autocast():
            out, _ = collect_added(step.update, batch, ctx, into=ctx._aux)
        if ctx._aux:
            raise ValueError(
                f"Step {step.name!r}: modules called add_loss during this custom update, but the update never "
                "took those values. Add ctx.aux_loss() to the loss it differentiates."
            )
        if not ctx.stepped:
            raise ValueError(
                f"Step {step.name!r}: the custom update returned without stepping an optimizer, so the update "
                "changed nothing. Call ctx.minimize(loss, opt) or ctx.step(opt) in it."
            )
        plan.guard.check(step.name)
        self.precision.update()
        for schedule in plan.update_schedules:
            schedule.step()
        terms = parse_loss(check_result(out, step.name), step.name) if out is not None else []
        values = {t.name: t.value.detach() for t in terms}
        if values:
            self._check_finite(values, step)
        return {plan.key(name): value for name, value in values.items()}

    def _check_finite(self, values: dict[str, torch.Tensor], step: Step) -> None:
        # Reading a CUDA value stalls the host: there, check every _FINITE_CHECK_EVERY updates
        # (a NaN in the weights shows in every later loss, so it is still caught).
        if self.device.type != "cpu" and self.updates % _FINITE_CHECK_EVERY:
            return
        check_finite([Term(name, v) for name, v in values.items()], step.name, self.updates + 1)

    def _end_epoch(self, val_data: Iterable | None, val_step: Callable | None) -> None:
        self._in_epoch = False
        order = {step.name: i for i, step in enumerate(self.flow.steps)}  # stable: flow order, not arrival
        means = sorted(self._epoch_losses.items(), key=lambda kv: order[kv[0].split("/", 1)[0]])
        logs = {key: torch.stack(values).mean().item() for key, values in means}
        logs.update(self.metrics.collect("train"))
        self.epoch += 1
        for plan in self._plans.values():
            for schedule in plan.epoch_schedules:
                schedule.step()
        if val_data is not None:
            val_logs = self.evaluate(val_data, val_step)
            self.events.fire("on_validation_end", self, val_logs)
            logs.update(val_logs)
        self.logs = logs
        self.events.fire("on_epoch_end", self, logs)

    def _done(self, epochs: int | None, max_updates: int | None) -> bool:
        return (
            self.should_stop
            or (epochs is not None and self.epoch >= epochs)
            or (max_updates is not None and self.updates >= max_updates)
        )

    @property
    def epoch_progress(self) -> tuple[int, int | None]:
        """Train batches taken in the current epoch, and the epoch's length when the data has one."""
        train = self._streams.get("train")
        if train is None:
            return 0, None
        try:
            length = len(train.iterable)
        except TypeError:
            length = None
        return train.consumed, length

    def stop(self) -> None:
        """Ask ``fit`` to return after the current update (e.g. from a callback)."""
        self.should_stop = True

    @staticmethod
    def _check_limits(epochs: Any, max_updates: Any) -> None:
        if epochs is None and max_updates is None:
            raise ValueError(
                "fit: give `epochs` or `max_updates` (or both); without either it would never stop. "
                "Received: epochs=None, max_updates=None. Pass e.g. fit(data, epochs=10)."
            )
        for arg, value in (("epochs", epochs), ("max_updates", max_updates)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(
                    f"fit: `{arg}` must be a whole number >= 0 (a total for this trainer). "
                    f"Received: {arg}={value!r}."
                )

    def _same_data(self, streams: dict[str, Stream]) -> bool:
        return set(streams) == set(self._streams) and all(
            streams[n].iterable is self._streams[n].iterable for n in streams
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, data: Iterable, step: Callable[[Any], Any]) -> dict[str, float]:
        """Run ``step(batch)`` over ``data`` in eval mode without gradients; return the values.

        ``step`` updates the ``val/`` metrics and may return a loss (a scalar tensor, an
        ``Average`` or a dict of them); returned losses are averaged over all samples, exactly.
        The result holds ``val/<loss>`` and every ``val/`` metric, which are then reset.
        Each module's train/eval mode is restored afterwards.
        """
        if not callable(step):
            raise TypeError(f"evaluate: `step` must be a function of the batch. Received: step={step!r}.")
        sums: dict[str, list] = {}
        modes = _modes(self.models)
        try:
            for model in self.models.values():
                model.eval()
            with torch.inference_mode(), self.precision.autocast():
                for batch in data:
                    batch = move(batch, self.device)
                    out = step(batch)
                    if out is not None:
                        _add_val_losses(sums, parse_loss(out, "validation"), batch)
        finally:
            _restore(modes)
        logs = {f"val/{name}": (total / count).item() for name, (total, count) in sums.items()}
        logs.update(self.metrics.collect("val"))
        return logs

    # ------------------------------------------------------------------ state

    def _name_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named: dict[str, torch.optim.Optimizer] = {}
        seen: set[int] = set()
        for step in self.flow.steps:
            for i, opt in enumerate(step.optimizers):
                if id(opt) not in seen:
                    seen.add(id(opt))
                    named[step.name if len(step.optimizers) == 1 else f"{step.name}.{i}"] = opt
        return named

    def _schedulers(self) -> dict[str, Any]:
        return {
            f"{step.name}.{i}": s for step in self.flow.steps for i, s in enumerate(step.schedulers)
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the run's numbers depend on, as a dict of named stateful parts.

        Holds the models, optimizers, schedulers, loss scaler, the flow's position in its cycle,
        the counters, and how far each data stream is into its current pass.
        """
        return {
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in self._schedulers().items()},
            "precision": self.precision.state_dict(),
            "flow": self.flow.state_dict(),
            "loop": {
                "epoch": self.epoch,
                "updates": self.updates,
                "in_epoch": self._in_epoch,
                "streams": {name: stream.state_dict() for name, stream in self._streams.items()},
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the next ``fit`` starts a new epoch)."""
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, s in self._schedulers().items():
            s.load_state_dict(state["schedulers"][name])
        self.precision.load_state_dict(state["precision"])
        self.flow.load_state_dict(state["flow"])
        self.epoch = int(state["loop"]["epoch"])
        self.updates = int(state["loop"]["updates"])
        self._in_epoch = False

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of the models, named as in ``describe()`` (``"<model>.<name>"`` for a dict)."""
        return named_parameters(self.model_tree)

    def describe(self) -> str:
        """The plan as a table: steps, optimizers, parameter groups, counts, frozen and idle parameters."""
        from trainflow.describe import describe

        return describe(self)


def _add_val_losses(sums: dict[str, list], terms: list[Term], batch: Any) -> None:
    n = None
    for term in terms:
        if term.total is None:
            n = sample_count(batch, "validation") if n is None else n
            total, count = term.value * n, n
        else:
            total, count = term.total, term.count
        if term.name in sums:
            sums[term.name][0] = sums[term.name][0] + total
            sums[term.name][1] = sums[term.name][1] + count
        else:
            sums[term.name] = [total.float(), count]


def _train_mode(model: nn.Module) -> None:
    model.train()
    for module in model.modules():
        if getattr(module, KEEP_EVAL, False):
            module.eval()


def _modes(models: dict[str, nn.Module]) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for model in models.values() for m in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training
