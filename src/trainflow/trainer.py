"""``Trainer``: runs a flow of steps over data, firing events; everything else attaches to them."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainflow import checkpoint, rng
from trainflow.accumulation import accumulate_window
from trainflow.callbacks.progress_bar import ProgressBar, is_terminal
from trainflow.data.batch import move, split
from trainflow.data.streams import Stream, open_streams
from trainflow.events import Events
from trainflow.flow import Flow
from trainflow.custom import Guard, UpdateContext, check_result
from trainflow.losses import (
    Term, check_finite, collect_added, no_grad_message, parse_loss, sum_forms, total_of, unreached_message,
)
from trainflow.metrics import Metrics
from trainflow.params import KEEP_EVAL, named_parameters
from trainflow.precision import Precision
from trainflow.step import Step

__all__ = ["Trainer"]

NONFINITE_POLICIES = ("raise", "skip", "stop")

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
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"Trainer: `device` must be 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device. "
            f"Received: device={device!r}. Use device='auto' to pick CUDA when it is available."
        ) from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (chosen.index is not None and chosen.index >= count):
            have = "no CUDA device is available" if count == 0 else f"only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            raise ValueError(
                f"Trainer: `device` names a CUDA device this machine does not have: {have}. "
                f"Received: device={device!r}. Use device='auto' (CUDA when available, else the CPU), 'cpu', "
                "or an index below torch.cuda.device_count()."
            )
    return chosen


class _Plan:
    """What the trainer precomputes for one step: the parameters it owns and its log keys."""

    __slots__ = (
        "step", "params", "owns_all", "keys", "loss_key", "update_schedules", "epoch_schedules", "by_optimizer",
        "guard", "zero_grad_params", "zero_grad_opts", "reached",
    )

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
        # Optimizer.zero_grad(set_to_none=True) sets each .grad to None inside a profiler range
        # that costs more than the loop itself (6 us of a 350 us update on a small MLP): for
        # optimizers that keep the base method, the plan clears their gradients directly.
        plain = [opt for opt in step.optimizers if type(opt).zero_grad is torch.optim.Optimizer.zero_grad]
        self.zero_grad_params = tuple({id(p): p for opt in plain for p in self.by_optimizer[id(opt)]}.values())
        self.zero_grad_opts = tuple(opt for opt in step.optimizers if opt not in plain)
        self.owns_all = owned <= set(params)
        self.keys: dict[str, str] = {}
        self.loss_key = self.key("loss")
        # a custom update runs user code that could touch anything: watch the other parameters
        self.guard = Guard([(n, p) for n, p in named if id(p) not in params]) if step.update else None
        self.reached = False  # set once an update's loss has given one of the step's parameters a gradient
        self.update_schedules = tuple(s for s in step.schedulers if s.interval == "update")
        self.epoch_schedules = tuple(s for s in step.schedulers if s.interval == "epoch")

    def zero_grad(self) -> None:
        """``opt.zero_grad(set_to_none=True)`` for each of the step's optimizers."""
        for p in self.zero_grad_params:
            p.grad = None
        for opt in self.zero_grad_opts:
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Differentiate into the step's parameters only (isolation).

        When the step owns every parameter of the models there is nothing to isolate from, and
        a plain ``backward()`` gives the same gradients without autograd's per-call input map.
        """
        if not loss.requires_grad:
            self.trainable()  # all frozen: that error says more
            raise ValueError(no_grad_message(self.step.name))
        if self.owns_all:
            loss.backward()
        else:
            loss.backward(inputs=self.trainable())

    def check_reached(self) -> None:
        """After the first update's backward: the loss must give some of the step's parameters a gradient."""
        if all(p.grad is None for p in self.trainable()):
            raise ValueError(unreached_message(self.step.name))
        self.reached = True

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
        steps: a :class:`Step`, a list of them run as a cycle, or a :class:`~trainflow.Flow`
            (``Flow(steps, restart="epoch")`` starts the cycle afresh every epoch).
        metrics: a dict ``{"train/<name>": metric, "val/<name>": metric}`` of objects with
            ``update/compute/reset`` (torchmetrics). Call ``update`` yourself in the loss or
            validation function; the trainer computes, logs and resets them at epoch end
            (``train/``) and after validation (``val/``).
        callbacks: objects with event methods (see :mod:`trainflow.events`).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, or a ``torch.device``.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA, with loss scaling).
        compile: compile each model with ``torch.compile``.
        out_dir: where callbacks write artifacts (logs, plots, checkpoints).
        on_nonfinite: what a NaN or infinite loss (or gradient) does: ``"raise"`` an error
            naming the step, loss and update; ``"skip"`` the update (weights and optimizer
            state untouched, counted in ``trainer.skipped``); or ``"stop"`` ``fit`` cleanly
            (a ``Checkpoint`` callback then saves). A skipped update's losses are not averaged
            into the epoch's means. A custom step decides before each ``ctx.step`` (see
            :mod:`trainflow.custom`). On CUDA, "raise" reads the loss every 50 updates only (no
            per-update host sync); "skip" and "stop" read one flag per update.
        progress: when standard output is a terminal, show a progress bar and one summary line
            per epoch (a :class:`~trainflow.callbacks.ProgressBar`, unless ``callbacks`` holds
            one already). Never in a pipe, a log file or a test. ``progress=False`` turns it off.

    Counters: ``trainer.epoch`` (completed epochs) and ``trainer.updates`` (optimizer updates
    of all steps); ``trainer.max_epochs`` / ``trainer.max_updates`` are the current ``fit``'s
    limits. ``trainer.losses`` holds the last update's losses (tensors), ``trainer.latest_losses``
    the latest value of every loss key over all steps (what a logger filtered to every N updates
    reads), ``trainer.logs`` the last epoch's values. ``trainer.stop()`` ends ``fit`` after the current update.

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
        steps: Step | Iterable[Step] | Flow,
        *,
        metrics: Mapping[str, Any] | None = None,
        callbacks: Iterable[Any] = (),
        device: str | torch.device = "auto",
        precision: str = "32",
        compile: bool = False,
        out_dir: str | Path | None = None,
        on_nonfinite: str = "raise",
        progress: bool = True,
    ) -> None:
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Trainer: `on_nonfinite` must be one of {NONFINITE_POLICIES}. Received: on_nonfinite={on_nonfinite!r}. "
                "Use 'raise' to fail at once, 'skip' to drop the update, 'stop' to end fit (and checkpoint)."
            )
        self.on_nonfinite = on_nonfinite
        self.models = _models(models)
        #: the models as given: the module itself, or the dict (for naming parameters)
        self.model_tree: nn.Module | dict[str, nn.Module] = models if isinstance(models, nn.Module) else self.models
        self.flow = steps if isinstance(steps, Flow) else Flow(list(steps) if not isinstance(steps, Step) else steps)
        self.device = _device(device)
        self.precision = Precision(precision, self.device)
        self._host_reads = self.device.type == "cpu"  # reading a value costs no device sync
        self.metrics = Metrics(metrics)
        self.events = Events(callbacks)
        if not isinstance(progress, bool):
            raise TypeError(
                f"Trainer: `progress` must be True or False. Received: progress={progress!r}. "
                "Pass progress=False to show no progress bar in a terminal."
            )
        if progress and is_terminal() and not any(isinstance(cb, ProgressBar) for cb in self.events.callbacks):
            self.events.add(ProgressBar())
        if not isinstance(compile, bool):
            raise TypeError(f"Trainer: `compile` must be True or False. Received: compile={compile!r}.")
        if out_dir is not None and not isinstance(out_dir, (str, Path)):
            raise TypeError(
                f"Trainer: `out_dir` must be a path or None. Received: out_dir={out_dir!r}. Pass e.g. 'runs/gan'."
            )
        self.out_dir = None if out_dir is None else Path(out_dir)
        named = self.named_parameters()
        self._plans = {step: _Plan(step, named) for step in self.flow.steps}
        self._step_order = {step.name: i for i, step in enumerate(self.flow.steps)}
        self.optimizers = self._name_optimizers()
        self._free_params = self._name_free_params(named)
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
        self.latest_losses: dict[str, torch.Tensor] = {}  # each loss key's latest value, over all steps
        self.logs: dict[str, float] = {}  # the last epoch's values (loss means, metrics)
        self._streams: dict[str, Stream] = {}
        self._in_epoch = False
        self._last_batches: list[Any] = []
        self._last_stream: str | None = None
        self._epoch_losses: dict[str, list[torch.Tensor]] = {}
        self._resume_loop: dict[str, Any] | None = None  # set by load_state_dict, applied by fit
        self.skipped = 0  # updates dropped for non-finite values (on_nonfinite="skip")
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        data: Any,
        *,
        epochs: int | None = None,
        max_updates: int | None = None,
        val_data: Iterable | None = None,
        val_step: Callable[[Any], Any] | None = None,
        resume: str | Path | None = None,
    ) -> None:
        """Train until ``epochs`` epochs or ``max_updates`` updates have been completed.

        ``data`` is an iterable of batches (the "train" stream) or a dict of named streams.
        Both limits are totals for the trainer, so calling ``fit`` again continues a run.
        With ``val_data``, ``val_step(batch)`` runs after every epoch under ``evaluate``.
        ``resume="latest"`` continues from the newest checkpoint in ``<out_dir>/checkpoints``
        (and starts fresh when there is none); a path continues from that file. A resumed run
        ends bit-identical (CPU) to one that was never interrupted; one whose state was saved
        after it stopped itself (``EarlyStopping``, ``on_nonfinite="stop"``; not a signal) stays
        stopped: no update, the saved ``stop_reason``. The checkpoint is checked against the
        trainer and ``data`` (optimizer types, each stream's batches and batch size) before
        anything is loaded.
        """
        self._check_limits(epochs, max_updates)
        if (val_data is None) != (val_step is None):
            raise ValueError(
                "fit: `val_data` and `val_step` go together. Received: "
                f"{'val_data=None' if val_data is None else f'val_data of type {type(val_data).__name__}'}, "
                f"val_step={val_step!r}. "
                "Pass both (val_step(batch) updates the 'val/' metrics and may return a loss) or neither."
            )
        if val_step is not None and not callable(val_step):
            raise TypeError(f"fit: `val_step` must be a function of the batch. Received: {val_step!r}.")
        needed = {}
        for step in self.flow.steps:
            needed.setdefault(step.data, step.name)
        streams = open_streams(data, needed, self.device)
        if resume is not None:
            self._load_for_resume(resume, streams)
        # a run that stopped itself (EarlyStopping, on_nonfinite="stop") and is resumed stays stopped
        stopped = None if self._resume_loop is None else self._resume_loop.get("stop_reason")
        if self._resume_loop is not None:
            self._replay(streams, self._resume_loop)
        elif self._in_epoch and self._same_data(streams):
            streams = self._streams  # continue the epoch an earlier fit stopped in
        else:
            self._in_epoch = False
        self._streams = streams
        self.max_epochs, self.max_updates = epochs, max_updates
        self._warn_batchnorm()
        self.should_stop = stopped is not None
        self.stop_reason = stopped
        if stopped is not None:
            warnings.warn(
                f"fit: nothing to do: the run being resumed stopped itself (stop_reason={stopped!r}), so it "
                "stays stopped, as the uninterrupted run did. To train further on purpose, set "
                "state['loop']['stop_reason'] = None before trainer.load_state_dict(state).",
                UserWarning,
                stacklevel=2,
            )
        elif self._done(epochs, max_updates):
            warnings.warn(self._nothing_to_do_message(epochs, max_updates), UserWarning, stacklevel=2)
        modes = _modes(self.models)
        try:
            for model in self.models.values():
                _train_mode(model)
            self.events.fire("on_fit_start", self)
            while not self._done(epochs, max_updates):
                fresh = not self._in_epoch
                if fresh:
                    self._start_epoch()
                before = self.updates
                if not self._run_updates(max_updates):
                    break  # stopped inside the epoch
                if fresh and self.updates == before:  # a whole epoch without an update: so will be the next
                    raise ValueError(self._no_update_message())
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

    def _no_update_message(self) -> str:
        taken, step = self._streams["train"].consumed, self.flow.current
        if taken == 0:
            return (
                "fit: the 'train' stream yielded no batch, so no epoch can have an update and fit would never "
                "reach its limit. Received: an empty 'train' stream. Pass a non-empty DataLoader or iterable."
            )
        return (
            f"Step {step.name!r}: the 'train' stream yields {taken} batch(es) per epoch, fewer than "
            f"accumulate={step.accumulate} with partial_window='drop', so every epoch drops its only window and "
            f"no update ever happens. Received: accumulate={step.accumulate}, {taken} batch(es) per epoch. "
            "Lower accumulate, pass more data, or use partial_window='apply'."
        )

    def _nothing_to_do_message(self, epochs: int | None, max_updates: int | None) -> str:
        if epochs is not None and self.epoch >= epochs:
            done, limit, more = f"trainer.epoch == {self.epoch}", f"epochs={epochs}", f"epochs={self.epoch + epochs}"
        else:
            done, limit, more = (f"trainer.updates == {self.updates}", f"max_updates={max_updates}",
                                 f"max_updates={self.updates + (max_updates or 1)}")
        return (
            f"fit: nothing to do: this trainer has already reached {limit} ({done}). Limits are totals for the "
            f"trainer, so that fit continues an interrupted run; to train further, raise the limit, e.g. "
            f"fit(data, {more})."
        )

    def _start_epoch(self) -> None:
        self._streams["train"].restart()
        self.flow.start_epoch()  # Flow(restart="epoch"): back to the first step
        self._in_epoch = True
        self._epoch_losses = {}
        self.events.fire("on_epoch_start", self)

    def _run_updates(self, max_updates: int | None) -> bool:
        """Run updates until the train stream is exhausted (True) or the run must stop (False)."""
        flow, plans, record, latest = self.flow, self._plans, self._epoch_losses, self.latest_losses
        handlers = self.events.handlers["on_update_end"]
        limit = math.inf if max_updates is None else max_updates
        while True:
            if self.should_stop or self.updates >= limit:
                return False
            step = flow.current
            skipped = self.skipped
            losses = self._update(step, plans[step])
            if losses is None:
                return True
            self.updates += 1
            flow.advance()
            self.losses = losses
            latest.update(losses)  # what filtered loggers read (LossLogger every N updates)
            if self.skipped == skipped:  # a dropped update is counted in trainer.skipped, not averaged
                for key, value in losses.items():
                    record.setdefault(key, []).append(value)
            for handler in handlers:
                handler(self, step, losses)

    def _update(self, step: Step, plan: _Plan) -> dict[str, torch.Tensor] | None:
        """One optimizer update of ``step``: None when the train stream has run out.

        On small models this method's Python is what separates the trainer from a hand-written
        loop (docs/performance.md): the common update (one batch, a plain scalar loss, float32)
        takes the shortest way through it.
        """
        if step.batch == "same":
            batches = self._last_batches
        else:
            batches = self._streams[step.data].take(step.accumulate)
            if not batches or (len(batches) < step.accumulate and step.partial_window == "drop"):
                return None
            self._last_batches, self._last_stream = batches, step.data
        if step.update is not None:
            return self._custom_update(step, plan, batches[0])
        plan.zero_grad()
        if step.microbatch_size is not None:
            batches = [c for b in batches for c in split(b, step.microbatch_size, step.name)]
        if len(batches) == 1:
            out, added = self._call_loss(step, batches[0])
            if not added and type(out) is torch.Tensor and not out.ndim:  # a plain scalar: nothing to parse
                loss, values = out, {plan.loss_key: out.detach()}
            else:
                terms = self._terms(step, out, added)
                loss, values = total_of(terms), {plan.key(t.name): t.value.detach() for t in terms}
            plan.backward(self.precision.scale(loss))
        else:
            window = accumulate_window(
                batches, lambda b: self._forward(step, b), self.precision.scale, plan.trainable(), step.name
            )
            values = {plan.key(name): value for name, value in window.items()}
            loss = total_of([Term(k, v) for k, v in values.items()])
        if not plan.reached:
            plan.check_reached()
        if not self._finite(loss, values, step, plan):
            return self._drop_update(step, values)
        if step.clip_grad_norm is not None:
            for opt in step.optimizers:
                self.precision.unscale(opt)
            torch.nn.utils.clip_grad_norm_(plan.trainable(), step.clip_grad_norm)
        if self.precision.scaler is None:
            for opt in step.optimizers:
                opt.step()
        else:
            for opt in step.optimizers:
                self.precision.step(opt)
            self.precision.update()
        for schedule in plan.update_schedules:
            schedule.step()
        return values

    def _call_loss(self, step: Step, batch: Any) -> tuple[Any, list[torch.Tensor]]:
        """``step.loss(batch)`` under the precision's autocast: what it returned, and add_loss values."""
        if self.precision.dtype is None:  # float32: no autocast context to enter
            return collect_added(step.loss, batch)
        with self.precision.autocast():
            return collect_added(step.loss, batch)

    def _forward(self, step: Step, batch: Any) -> list[Term]:
        terms = self._terms(step, *self._call_loss(step, batch))
        if not any((t.value if t.total is None else t.total).requires_grad for t in terms):
            raise ValueError(no_grad_message(step.name))
        return terms

    @staticmethod
    def _terms(step: Step, out: Any, added: list[torch.Tensor]) -> list[Term]:
        """What the loss function returned, plus the add_loss total, as checked terms."""
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
        check = None if self.on_nonfinite == "raise" else self._all_finite
        ctx = UpdateContext(step, self.precision, plan.by_optimizer, check)
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
        if ctx.applied:
            self.precision.update()
        terms = parse_loss(check_result(out, step.name), step.name) if out is not None else []
        values = {plan.key(t.name): t.value.detach() for t in terms}
        if ctx.dropped:  # a ctx.step met a non-finite value and stepped nothing from there on
            return self._drop_update(step, values)
        for schedule in plan.update_schedules:
            schedule.step()
        if values and self.on_nonfinite == "raise":  # it has stepped already: report only
            self._finite(total_of([Term(k, v) for k, v in values.items()]), values, step, None)
        return values

    def _finite(self, loss: torch.Tensor, values: dict[str, torch.Tensor], step: Step, plan: _Plan | None) -> bool:
        """False when the update must be dropped (skip/stop); raises under on_nonfinite="raise".

        ``loss`` is the update's total: NaN or inf in any term shows in it, so one read suffices.
        """
        if self.on_nonfinite == "raise":
            # Reading a CUDA value stalls the host: there, check every _FINITE_CHECK_EVERY updates
            # (a NaN in the weights shows in every later loss, so it is still caught).
            if (self._host_reads or self.updates % _FINITE_CHECK_EVERY == 0) and not math.isfinite(loss.item()):
                check_finite([Term(k.split("/", 1)[1], v) for k, v in values.items()], step.name, self.updates + 1)
                check_finite([Term("loss", loss)], step.name, self.updates + 1)  # e.g. inf - inf
            return True
        return self._all_finite([loss], plan.params if plan is not None else ())

    def _all_finite(self, losses: list[torch.Tensor], params: Iterable[torch.Tensor]) -> bool:
        """Whether the losses and the gradients of ``params`` are all finite (one read of one flag)."""
        flags = [torch.isfinite(loss).all() for loss in losses]
        grads = [p.grad for p in params if p.grad is not None]
        if grads and self.precision.scaler is None:  # under float16 the loss scaler handles overflow
            flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        return bool(torch.stack(flags).all()) if flags else True

    def _drop_update(self, step: Step, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Leave weights and optimizer state as they were; count the skip or stop the run."""
        self._plans[step].zero_grad()
        self.skipped += 1
        if self.on_nonfinite == "stop":
            self.stop("nonfinite")
        return values

    def _end_epoch(self, val_data: Iterable | None, val_step: Callable | None) -> None:
        self._in_epoch = False
        order = self._step_order  # loss means in flow order, not in the order steps ran this epoch
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

    def stop(self, reason: str = "requested") -> None:
        """Ask ``fit`` to return after the current update (e.g. from a callback).

        ``trainer.stop_reason`` keeps the first reason given ("requested", "nonfinite", "signal"...).
        The stop is part of :meth:`state_dict` (except a "signal" one): a run resumed from a state
        saved after it does no update.
        """
        self.should_stop = True
        if self.stop_reason is None:
            self.stop_reason = reason

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

    def _name_free_params(self, named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tensors an optimizer trains that are in none of the models (e.g. a learnt ``log_scale``).

        They are saved and restored with the state, named by their place in the optimizer:
        ``"<optimizer>.<group>.<index>"``.
        """
        in_models = {id(p) for _, p in named}
        free: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for opt_name, opt in self.optimizers.items():
            for g, group in enumerate(opt.param_groups):
                for i, p in enumerate(group["params"]):
                    if id(p) not in in_models and id(p) not in seen:
                        seen.add(id(p))
                        free[f"{opt_name}.{g}.{i}"] = p
        return free

    def _schedulers(self) -> dict[str, Any]:
        return {
            f"{step.name}.{i}": s for step in self.flow.steps for i, s in enumerate(step.schedulers)
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the run's numbers depend on, as a dict of named stateful parts.

        Models, optimizers, schedules, the loss scaler, the flow's position in its cycle, the
        counters, each data stream's position in its pass (with the RNG states its iterator was
        made under), the random generators, metric states, the epoch's loss records, the stop
        the run asked for, tensors its optimizers train outside the models (``params``) and the
        state of every callback that has one, keyed by ``state_key`` or class name. Taken
        between two updates, so no accumulation window is ever half-done: a window is inside
        one update.
        """
        return {
            "models": {name: m.state_dict() for name, m in self.models.items()},
            "params": {name: p.detach().clone() for name, p in self._free_params.items()},
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "optimizer_types": {name: type(o).__name__ for name, o in self.optimizers.items()},
            "schedulers": {name: s.state_dict() for name, s in self._schedulers().items()},
            "precision": self.precision.state_dict(),
            "flow": self.flow.state_dict(),
            "metrics": self.metrics.state_dict(),
            "callbacks": {
                key: cb.state_dict() for key, cb in self._stateful_callbacks().items()
            },
            "loop": {
                "epoch": self.epoch,
                "updates": self.updates,
                "skipped": self.skipped,
                "in_epoch": self._in_epoch,
                "streams": {name: stream.state_dict() for name, stream in self._streams.items()},
                "dataset_rng": {  # generators a dataset keeps for itself (augmentation in __getitem__)
                    name: [g.get_state() for g in rng.dataset_generators(stream.iterable)]
                    for name, stream in self._streams.items()
                },
                "last_stream": self._last_stream,
                "last_batches": len(self._last_batches),
                "epoch_losses": {k: torch.stack(v) for k, v in self._epoch_losses.items() if v},
                "logs": dict(self.logs),
                "stop_reason": self._saved_stop(),
                "rng": rng.capture(),
            },
        }

    def _saved_stop(self) -> str | None:
        """The stop the run asked for itself (it stays stopped on resume); a signal's is to be continued."""
        if not self.should_stop or self.stop_reason == "signal":
            return None
        return self.stop_reason or "requested"

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next ``fit`` continues exactly there.

        Raises a ValueError naming every mismatch when the state belongs to other models
        (missing or unexpected keys, other shapes) or another flow.
        """
        _check_parts(state, ("models", "optimizers", "schedulers", "precision", "flow", "loop"))
        problems = []
        for name, model in self.models.items():
            if name not in state["models"]:
                problems.append(f"model {name!r} is not in the state (it has {sorted(state['models'])})")
            else:
                problems += _model_mismatch(name, model, state["models"][name])
        problems += [f"the state has a model {n!r} this trainer lacks" for n in state["models"] if n not in self.models]
        for part, mine in (("optimizers", self.optimizers), ("schedulers", self._schedulers())):
            if sorted(state[part]) != sorted(mine):
                problems.append(f"{part}: the state has {sorted(state[part])}, this trainer has {sorted(mine)}")
        saved_params = state.get("params", {})
        if sorted(saved_params) != sorted(self._free_params):
            problems.append(
                f"parameters outside the models: the state has {sorted(saved_params)}, this trainer has "
                f"{sorted(self._free_params)}"
            )
        else:
            problems += [
                f"parameter {n!r} has shape {tuple(p.shape)}, the state {tuple(saved_params[n].shape)}"
                for n, p in self._free_params.items() if tuple(saved_params[n].shape) != tuple(p.shape)
            ]
        if not problems:
            problems += self._optimizer_mismatch(state)
        if not problems:
            for name, opt in self.optimizers.items():
                mine = [len(g["params"]) for g in opt.param_groups]
                saved = [len(g["params"]) for g in state["optimizers"][name]["param_groups"]]
                if mine != saved:
                    problems.append(
                        f"optimizer {name!r} has parameter groups of {mine} parameter(s), the state {saved}"
                    )
        if problems:
            raise ValueError(
                "The state does not fit this trainer: " + "; ".join(problems) + ". Load a state saved by a "
                "trainer with the same models, steps and optimizers."
            )
        self.flow.load_state_dict(state["flow"])
        for name, model in self.models.items():
            model.load_state_dict(state["models"][name])
        with torch.no_grad():
            for name, p in self._free_params.items():
                p.copy_(saved_params[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, s in self._schedulers().items():
            s.load_state_dict(state["schedulers"][name])
        self.precision.load_state_dict(state["precision"])
        self.metrics.load_state_dict(state.get("metrics", {}))
        self._load_callbacks(state.get("callbacks", {}))
        loop = state["loop"]
        self.epoch = int(loop["epoch"])
        self.updates = int(loop["updates"])
        self.skipped = int(loop.get("skipped", 0))
        self._epoch_losses = {k: list(v.unbind()) for k, v in loop.get("epoch_losses", {}).items()}
        self.logs = dict(loop.get("logs", {}))
        self._in_epoch = False
        self._resume_loop = dict(loop)

    def _optimizer_mismatch(self, state: Mapping[str, Any]) -> list[str]:
        """Optimizers of another type than the state's (SGD then, Adam now), named."""
        types = state.get("optimizer_types")
        problems = []
        for name, opt in self.optimizers.items():
            saved_groups = state["optimizers"][name].get("param_groups", [])
            if types is not None and types.get(name) != type(opt).__name__:
                problems.append(f"optimizer {name!r} is {type(opt).__name__} here, {types.get(name)} in the state")
            elif types is None and saved_groups and opt.param_groups and (
                set(saved_groups[0]) - {"params"} != set(opt.param_groups[0]) - {"params"}
            ):  # a file from before the types were saved: other hyperparameters, another optimizer
                problems.append(
                    f"optimizer {name!r} ({type(opt).__name__}) has hyperparameters "
                    f"{sorted(set(opt.param_groups[0]) - {'params'})}, the state's "
                    f"{sorted(set(saved_groups[0]) - {'params'})}"
                )
        return problems

    @staticmethod
    def _check_streams(loop: Mapping[str, Any], streams: dict[str, Stream]) -> None:
        """The data matches the streams the state was taken with: same names, batch size, batches."""
        missing = sorted(set(loop["streams"]) - set(streams))
        if missing:
            raise ValueError(
                f"fit: the state being resumed was taken with data streams {sorted(loop['streams'])}; "
                f"`data` lacks {missing}. Pass the same streams as the interrupted run."
            )
        differ = [m for name, s in loop["streams"].items() if (m := streams[name].mismatch(s)) is not None]
        if differ:
            raise ValueError(
                "fit: the data differs from the data of the state being resumed: " + "; ".join(differ) + ". "
                "Received: other data (or another batch_size) than the interrupted run's. A checkpoint says "
                "where the run was in its data, so resume with the same loaders, or start a fresh run."
            )

    def _replay(self, streams: dict[str, Stream], loop: dict[str, Any]) -> None:
        """Put every stream where the saved run was, then the random generators."""
        self._check_streams(loop, streams)
        for name, stream_state in loop["streams"].items():
            keep = loop["last_batches"] if name == loop["last_stream"] else 0
            kept = streams[name].replay(stream_state, keep)
            if keep:
                self._last_batches, self._last_stream = kept, name
        for name, states in loop.get("dataset_rng", {}).items():  # after the replay, which may have drawn
            for generator, saved in zip(rng.dataset_generators(streams[name].iterable), states):
                generator.set_state(saved)
        self._in_epoch = bool(loop["in_epoch"])
        rng.restore(loop["rng"])
        self._resume_loop = None

    def _load_for_resume(self, resume: str | Path, streams: dict[str, Stream]) -> None:
        if resume == "latest":
            if self.out_dir is None:
                raise ValueError(
                    "fit: resume='latest' looks in <out_dir>/checkpoints, but the trainer has no out_dir. "
                    "Received: out_dir=None. Pass Trainer(..., out_dir='runs/my-run')."
                )
            path = checkpoint.latest(self.out_dir / "checkpoints")
            if path is None:
                return  # first run: nothing to resume yet
        elif isinstance(resume, (str, Path)):
            path = Path(resume)
        else:
            raise TypeError(
                f"fit: `resume` must be 'latest', a checkpoint path or None. Received: resume={resume!r}."
            )
        state = checkpoint.load(path)
        if isinstance(state, Mapping) and isinstance(state.get("loop"), Mapping) and "streams" in state["loop"]:
            self._check_streams(state["loop"], streams)  # before anything is loaded
        self.load_state_dict(state)

    def _stateful_callbacks(self) -> dict[str, Any]:
        """Callbacks with state, keyed by a stable name: ``state_key`` if they have one, else the
        class name, with ``.1``, ``.2``... for the second, third of the same key (in list order).
        Inserting or moving another callback changes no key."""
        stateful = [
            cb for cb in self.events.callbacks
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))
        ]
        keyed: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for cb in stateful:
            base = getattr(cb, "state_key", None)
            if not isinstance(base, str) or not base:
                base = type(cb).__name__
            n = counts[base] = counts.get(base, -1) + 1
            keyed[base if n == 0 else f"{base}.{n}"] = cb
        return keyed

    def _load_callbacks(self, saved: Mapping[str, Any]) -> None:
        """Give each callback its saved state; say which saved states fit no callback, and the reverse."""
        mine = self._stateful_callbacks()
        if saved and all(re.fullmatch(r"\d+:\w+", k) for k in saved):
            # a file keyed by position among stateful callbacks (older trainflow): map the positions
            by_position = {f"{i}:{type(cb).__name__}": key for i, (key, cb) in enumerate(mine.items())}
            saved = {by_position.get(k, k): v for k, v in saved.items()}
        unknown = sorted(k for k in saved if k not in mine)
        fresh = sorted(k for k in mine if k not in saved)
        for key, cb in mine.items():
            if key in saved:
                cb.load_state_dict(saved[key])
        if unknown:
            warnings.warn(
                f"The state holds callback state for {unknown}, which no callback of this trainer has (its "
                f"stateful callbacks: {sorted(mine)}): that state is not loaded. Pass the same callbacks as "
                "the interrupted run, or give a renamed one `state_key` = the old name.",
                UserWarning,
                stacklevel=3,
            )
        if fresh:
            warnings.warn(
                f"The state holds no callback state for {fresh}: they start fresh (the state has "
                f"{sorted(saved)}). Expected when a callback was added since the checkpoint was taken.",
                UserWarning,
                stacklevel=3,
            )

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of the models, named as in ``describe()`` (``"<model>.<name>"`` for a dict)."""
        return named_parameters(self.model_tree)

    def describe(self, *, all_hyperparameters: bool = False) -> str:
        """The plan as a table: steps, optimizers, parameter groups, counts, frozen and idle parameters."""
        from trainflow.describe import describe

        return describe(self, all_hyperparameters=all_hyperparameters)


def _add_val_losses(sums: dict[str, list], terms: list[Term], batch: Any) -> None:
    for term, total, count in sum_forms(terms, batch, "validation"):
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


def _check_parts(state: Any, parts: tuple[str, ...]) -> None:
    if not isinstance(state, Mapping) or any(p not in state for p in parts):
        have = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"The state is not a trainflow Trainer state: expected the parts {list(parts)}. Received: {have}. "
            "Pass what Trainer.state_dict() returned (or a file written by trainflow.checkpoint.save)."
        )


def _model_mismatch(name: str, model: nn.Module, saved: Mapping[str, Any]) -> list[str]:
    mine = model.state_dict()
    missing = [k for k in mine if k not in saved]
    unexpected = [k for k in saved if k not in mine]
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in mine.items()
        if k in saved and isinstance(v, torch.Tensor) and tuple(saved[k].shape) != tuple(v.shape)
    ]
    out = []
    if missing:
        out.append(f"model {name!r} missing keys {missing[:8]}")
    if unexpected:
        out.append(f"model {name!r} unexpected keys {unexpected[:8]}")
    if shapes:
        out.append(f"model {name!r} shape mismatches (saved vs model) {shapes[:8]}")
    return out
