"""``Trainer``: runs a flow of steps over data, firing events; everything else attaches to them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainflow import checkpoint
from trainflow.callbacks.progress_bar import ProgressBar, is_terminal
from trainflow.data.batch import move
from trainflow.data.fetch import input_path
from trainflow.data.position import DataPosition, split_loop_state
from trainflow.data.sharding import empty, is_sharded
from trainflow.data.streams import open_streams
from trainflow.describe import describe
from trainflow.distributed import (
    RankState,
    check_world_size,
    check_world_size_change,
    fit_ended,
    local_device,
    resolve,
)
from trainflow.events import Events
from trainflow.flow import Flow
from trainflow.losses import Term, parse_loss, sum_forms
from trainflow.metrics import Metrics
from trainflow.models import Models, pick_device
from trainflow.params import named_parameters
from trainflow.precision import Precision
from trainflow.state import Callbacks, FreeParameters, Optimizers, RunState, Schedules, Stateful
from trainflow.step import Step
from trainflow.update import NONFINITE_POLICIES, StepRunner

__all__ = ["Trainer"]

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
        compile: compile each model with ``torch.compile``, and the whole update of each
            ``Step(loss, optimizer)``: forward, loss, backward and optimizer step, under CUDA
            graphs on CUDA (:mod:`trainflow.compiled`; a step that cannot be captured runs
            eagerly, with a warning saying why).
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
        distributed: ``"auto"`` (``"replicate"`` under ``torchrun``, one process otherwise),
            ``"replicate"``, ``"fsdp"`` or ``"off"`` (see :mod:`trainflow.distributed`). Under
            ``torchrun`` the trainer joins the process group, every rank starts from rank 0's
            weights, each step's gradients are summed over the ranks, plain DataLoaders are
            sharded (:mod:`trainflow.data.sharding`), and the writing callbacks run on rank 0
            only (``trainer.is_global_zero``). ``state_dict()`` is then a collective: call it on
            every rank. ``"fsdp"`` shards each model in place with ``fully_shard`` and rebinds
            the optimizers (built before the Trainer, not stepped yet) to the sharded
            parameters; its checkpoints are DCP folders; custom steps, several normalisers in
            one window, tensors trained outside the models, ``compile=True`` and
            ``"16-mixed"`` are refused (see :mod:`trainflow.fsdp`).

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
        distributed: str = "auto",
    ) -> None:
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Trainer: `on_nonfinite` must be one of {NONFINITE_POLICIES}. Received: on_nonfinite={on_nonfinite!r}. "
                "Use 'raise' to fail at once, 'skip' to drop the update, 'stop' to end fit (and checkpoint)."
            )
        self.on_nonfinite = on_nonfinite
        self.flow = steps if isinstance(steps, Flow) else Flow(list(steps) if not isinstance(steps, Step) else steps)
        self.device = pick_device(local_device(device))
        self._ranks = resolve(distributed, self.device)  # None: one process
        if self._ranks is not None and self._ranks.shards:  # fsdp: refused features first
            self._ranks.check(self.flow.steps, precision, compile)
        self._models = Models(models, self.device, compile)
        self.models = self._models.by_name
        self.model_tree = self._models.tree  # the models as given (for naming parameters)
        self.precision = Precision(precision, self.device)
        self.metrics = Metrics(metrics)
        self.events = Events(callbacks, rank_zero=self.is_global_zero)
        if self._ranks is not None and self._ranks.shards:  # fsdp: no sharded model called on rank 0 alone,
            self._ranks.check_callbacks(self.events.callbacks, self.models)
            self._ranks.shard_models(self.models, self.flow.steps)  # then fully_shard in place, optimizers rebound
        if not isinstance(progress, bool):
            raise TypeError(
                f"Trainer: `progress` must be True or False. Received: progress={progress!r}. "
                "Pass progress=False to show no progress bar in a terminal."
            )
        if progress and is_terminal() and not any(isinstance(cb, ProgressBar) for cb in self.events.callbacks):
            self.events.add(ProgressBar())
        if out_dir is not None and not isinstance(out_dir, (str, Path)):
            raise TypeError(
                f"Trainer: `out_dir` must be a path or None. Received: out_dir={out_dir!r}. Pass e.g. 'runs/gan'."
            )
        self.out_dir = None if out_dir is None else Path(out_dir)
        named = self.named_parameters()
        host_reads = self.device.type == "cpu"  # reading a value costs no device sync
        self._runners = {
            step: StepRunner(step, named, self.precision, on_nonfinite, host_reads, self._models.compiled)
            for step in self.flow.steps
        }
        for runner in self._runners.values():
            runner.ranks = self._ranks
        self._step_order = {step.name: i for i, step in enumerate(self.flow.steps)}
        self._optimizers = Optimizers(self.flow.steps)
        self.optimizers = self._optimizers.by_name
        self._free_params = FreeParameters(named, self._optimizers)
        self._schedules = Schedules(self.flow.steps)
        self._callback_states = Callbacks(lambda: self.events.callbacks)
        self.metrics.to(self.device)
        self.epoch = 0
        self.updates = 0
        self.max_epochs: int | None = None  # the limits of the current (or last) fit
        self.max_updates: int | None = None
        self.should_stop = False
        self.losses: dict[str, torch.Tensor] = {}  # the last update's losses
        self.latest_losses: dict[str, torch.Tensor] = {}  # each loss key's latest value, over all steps
        self.logs: dict[str, float] = {}  # the last epoch's values (loss means, metrics)
        self._data = DataPosition()  # the streams, where each is, the latest window
        self._epoch_losses: dict[str, list[torch.Tensor]] = {}
        self.skipped = 0  # updates dropped for non-finite values (on_nonfinite="skip")
        self.stop_reason: str | None = None
        self._stop_loaded = False  # the stop came with a loaded state: the next fit keeps it
        self._rank_state = None if self._ranks is None else RankState(self._ranks)
        self._state_parts = {"models": self._models, "optimizers": self._optimizers}
        if self._ranks is not None and self._ranks.shards:  # fsdp: the sharded state of both
            from trainflow.fsdp import ShardedModels, ShardedOptimizers

            self._state_parts = {"models": ShardedModels(self._models),
                                 "optimizers": ShardedOptimizers(self._optimizers, self.models)}

    @property
    def is_global_zero(self) -> bool:
        """Whether this process is rank 0 (the one that logs and writes files); True in one process."""
        return self._ranks is None or self._ranks.is_global_zero

    @property
    def world_size(self) -> int:
        """The number of processes training together (1 without torchrun)."""
        return 1 if self._ranks is None else self._ranks.world_size

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
        world_size_change: str = "refuse",
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
        anything is loaded. Under ``torchrun`` a state saved under another world size is refused
        unless ``world_size_change="allow"`` (then the run continues exact up to rounding).
        """
        self._check_fit(epochs, max_updates, val_data, val_step)
        change = check_world_size_change(world_size_change)
        if self._ranks is not None:
            data = self._ranks.shard(data)  # this rank's share of each plain DataLoader
        streams = open_streams(data, self._stream_users(), self.device)
        if resume is not None:
            self._resume(resume, streams, change)
        self._data.place(streams)
        if self._ranks is not None:
            self._rank_state.place(change)  # this rank's own generators, once the data has drawn
            self._ranks.start(self._shared_tensors())  # every rank from rank 0's weights
        self._keep_stop_if_loaded()
        self.max_epochs, self.max_updates = epochs, max_updates
        self._warn_before_fit(epochs, max_updates)
        with self._models.mode(training=True):
            try:
                self.events.fire("on_fit_start", self)
                while not self._done(epochs, max_updates):
                    fresh = not self._data.in_epoch
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
                fit_ended(raised=True)
                self.events.fire("on_exception", self, error)
                raise
            fit_ended(raised=False)

    def _check_fit(self, epochs: Any, max_updates: Any, val_data: Any, val_step: Any) -> None:
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

    def _stream_users(self) -> dict[str, str]:
        """Each data stream the flow draws from, with the first step that does (for error messages)."""
        needed: dict[str, str] = {}
        for step in self.flow.steps:
            for name in step.streams:
                needed.setdefault(name, step.name)
        return needed

    def _resume(self, resume: str | Path, streams: dict, world_size_change: str) -> None:
        """Load the checkpoint ``resume`` names, once it is known to fit the trainer and ``streams``
        (and the world size)."""
        path = checkpoint.resume_path(resume, self.out_dir)
        if path is None:
            return  # resume="latest" on a first run: nothing to resume yet
        # under fsdp every rank reads its own slices of a sharded checkpoint, on the models' mesh
        mesh = self._ranks.mesh if self._ranks is not None and self._ranks.shards else None
        state = split_loop_state(checkpoint.load(path, mesh=mesh))
        if isinstance(state, Mapping):
            check_world_size(state.get("ranks") or {}, self.world_size, world_size_change)
        if isinstance(state, Mapping) and isinstance(state.get("data"), Mapping) and "streams" in state["data"]:
            DataPosition.check(state["data"], streams)  # before anything is loaded
        self.load_state_dict(state)

    def _keep_stop_if_loaded(self) -> None:
        """A run that stopped itself (EarlyStopping, on_nonfinite="stop") and is resumed stays
        stopped; any other fit starts unstopped."""
        if not self._stop_loaded:
            self.should_stop, self.stop_reason = False, None
        self._stop_loaded = False

    def _warn_before_fit(self, epochs: int | None, max_updates: int | None) -> None:
        self._warn_batchnorm()
        if self.should_stop:
            warnings.warn(
                f"fit: nothing to do: the run being resumed stopped itself (stop_reason={self.stop_reason!r}), so "
                "it stays stopped, as the uninterrupted run did. To train further on purpose, set "
                "state['loop']['stop_reason'] = None before trainer.load_state_dict(state).",
                UserWarning,
                stacklevel=3,
            )
        elif self._done(epochs, max_updates):
            warnings.warn(self._nothing_to_do_message(epochs, max_updates), UserWarning, stacklevel=3)

    def _warn_batchnorm(self) -> None:
        """Accumulation is not exact with batch norm in train mode: each chunk has its own statistics."""
        for step, runner in self._runners.items():
            if step.accumulate == 1 and step.microbatch_size is None:
                continue
            for name, norms in self._models.batchnorms_in_train(runner.params).items():
                warnings.warn(
                    f"Step {step.name!r} accumulates gradients over several chunks, but model {name!r} has "
                    f"batch-norm layers in train mode ({', '.join(norms[:3])}{', ...' if len(norms) > 3 else ''}): "
                    "each chunk is normalised with its own statistics, so the update is not the big-batch "
                    "update. Use GroupNorm/LayerNorm, or freeze(..., batchnorm='eval') to fix their statistics.",
                    UserWarning,
                    stacklevel=4,
                )

    def _no_update_message(self) -> str:
        taken, step = self._data.streams["train"].consumed, self.flow.current
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
        self._data.start_epoch()
        self.flow.start_epoch()  # Flow(restart="epoch"): back to the first step
        self._epoch_losses = {}
        self.events.fire("on_epoch_start", self)

    def _run_updates(self, max_updates: int | None) -> bool:
        """Run updates until the train stream is exhausted (True) or the run must stop (False)."""
        flow, runners, record, latest, window = (
            self.flow, self._runners, self._epoch_losses, self.latest_losses, self._data.window
        )
        handlers = self.events.handlers["on_update_end"]
        limit = math.inf if max_updates is None else max_updates
        ranks = self._ranks
        agree = ranks is not None and not is_sharded(self._data.streams["train"].iterable)
        while True:
            if ranks is not None:
                self._agree_on_stop()
            if self.should_stop or self.updates >= limit:
                return False
            step = flow.current
            batches = window(step)
            # data of unknown length under torchrun: any rank's end is every rank's (a collective: asked first)
            if (agree and ranks.any(batches is None)[0]) or batches is None:
                return True
            losses, applied = runners[step].run(batches, self.updates)
            self.updates += 1
            flow.advance()
            self.losses = losses
            latest.update(losses)  # what filtered loggers read (LossLogger every N updates)
            if applied:  # a dropped update is counted in trainer.skipped, not averaged
                for key, value in losses.items():
                    record.setdefault(key, []).append(value)
            else:
                self.skipped += 1
                if self.on_nonfinite == "stop":
                    self.stop("nonfinite")
            for handler in handlers:
                handler(self, step, losses)

    def _agree_on_stop(self) -> None:
        """Under torchrun: a stop asked on any rank (a signal, a callback) stops every rank, for the same reason."""
        if self._ranks.any(self.should_stop)[0]:
            reasons = [r for r in self._ranks.gather(self.stop_reason if self.should_stop else None) if r]
            self.should_stop = True
            self.stop_reason = self.stop_reason or (reasons[0] if reasons else "requested")

    def _shared_tensors(self) -> list[torch.Tensor]:
        """What every rank must hold alike at the start: the models' parameters and buffers, free parameters."""
        tensors = [t for model in self.models.values() for t in (*model.parameters(), *model.buffers())]
        return tensors + list(self._free_params.by_name.values())

    def _end_epoch(self, val_data: Iterable | None, val_step: Callable | None) -> None:
        self._data.end_epoch()
        order = self._step_order  # loss means in flow order, not in the order steps ran this epoch
        means = sorted(self._epoch_losses.items(), key=lambda kv: order[kv[0].split("/", 1)[0]])
        logs = {key: torch.stack(values).mean().item() for key, values in means}
        logs.update(self.metrics.collect("train"))
        self.epoch += 1
        for runner in self._runners.values():
            runner.end_epoch()
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
        train = self._data.streams.get("train")
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
        ranks = self._ranks
        if ranks is not None:
            data = ranks.shard(data)
        with self._models.mode(training=False), torch.inference_mode(), self.precision.autocast():
            for batch in data:
                vacant = ranks is not None and empty(batch)  # this rank's share of a short last batch
                if vacant and not ranks.shards:
                    continue  # nothing to add (fsdp runs it still: a sharded model's forward is a collective)
                batch = move(batch, self.device)
                out = step(batch)
                if out is not None and not vacant:
                    _add_val_losses(sums, parse_loss(out, "validation"), batch)
            if ranks is not None:
                ranks.sum_values(sums)
                ranks.release()  # fsdp: free the gathered parameters, so that training gathers them afresh
        logs = {f"val/{name}": (total / count).item() for name, (total, count) in sums.items()}
        logs.update(self.metrics.collect("val"))
        return logs

    # ------------------------------------------------------------------ state

    def _run_state(self) -> RunState:
        """The run's stateful parts, by the keys of its state (restored in this order); under
        torchrun also "ranks": the world size and every rank's generators."""
        return RunState({
            "flow": self.flow,
            **self._state_parts,  # "models", "optimizers"
            "schedulers": self._schedules,
            "params": self._free_params,
            "precision": self.precision,
            "metrics": self.metrics,
            "callbacks": self._callback_states,
            "data": self._data,
            "loop": Stateful(self._loop_state, self._load_loop),
            **({} if self._rank_state is None else {"ranks": self._rank_state}),
        })

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
        return self._run_state().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next ``fit`` continues exactly there.

        Raises a ValueError naming every mismatch when the state belongs to other models
        (missing or unexpected keys, other shapes) or another flow, before anything is loaded.
        The data streams' positions are applied when ``fit`` opens the data.
        """
        self._run_state().load_state_dict(split_loop_state(state))

    def _loop_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "updates": self.updates,
            "skipped": self.skipped,
            "epoch_losses": {k: torch.stack(v) for k, v in self._epoch_losses.items() if v},
            "logs": dict(self.logs),
            # the stop the run asked for itself (it stays stopped on resume); a signal's is to be continued
            "stop_reason": None if not self.should_stop or self.stop_reason == "signal"
            else self.stop_reason or "requested",
        }

    def _load_loop(self, loop: Mapping[str, Any]) -> None:
        self.epoch = int(loop["epoch"])
        self.updates = int(loop["updates"])
        self.skipped = int(loop.get("skipped", 0))
        self._epoch_losses = {k: list(v.unbind()) for k, v in loop.get("epoch_losses", {}).items()}
        self.logs = dict(loop.get("logs", {}))
        self.stop_reason = loop.get("stop_reason")
        self.should_stop = self._stop_loaded = self.stop_reason is not None

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter of the models, named as in ``describe()`` (``"<model>.<name>"`` for a dict)."""
        return named_parameters(self.model_tree)

    def describe(self, *, all_hyperparameters: bool = False) -> str:
        """The plan as a table: steps, optimizers, parameter groups, counts, frozen and idle parameters,
        and (after ``fit``) how each data stream reads its batches."""
        inputs = {name: input_path(stream.iterable) for name, stream in self._data.streams.items()}
        return describe(self.flow, self.named_parameters(), self._models.kept_in_eval(),
                        all_hyperparameters=all_hyperparameters, inputs=inputs)


def _add_val_losses(sums: dict[str, list], terms: list[Term], batch: Any) -> None:
    for term, total, count in sum_forms(terms, batch, "validation"):
        if term.name in sums:
            sums[term.name][0] = sums[term.name][0] + total
            sums[term.name][1] = sums[term.name][1] + count
        else:
            sums[term.name] = [total.float(), count]
