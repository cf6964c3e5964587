"""One optimizer update of a step: compute the gradients, decide on non-finite values, apply them.

A :class:`StepRunner` is built once per step. Every update goes through its update function,
``update(runner, batches, updates) -> (values, applied)``: for a declarative ``Step`` the
built-in :func:`declarative_update`, for ``Step.custom`` the user's function behind an
``UpdateContext`` (:mod:`trainflow.custom`). Both use the runner's one way to compute
gradients (:meth:`StepRunner.gradients`, :meth:`StepRunner.backward`), its one non-finite
decision (:meth:`StepRunner.decide`, taken before an optimizer steps) and its one way to apply
them: :meth:`StepRunner.step_optimizers` (unscale, clip, step), then
:meth:`StepRunner.finish` (loss-scaler update, per-update schedules).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainflow.accumulation import accumulate_window
from trainflow.data.batch import split
from trainflow.losses import (
    Term, check_finite, collect_added, no_grad_message, parse_loss, total_of, unreached_message,
)

if TYPE_CHECKING:
    from trainflow.distributed import Replicate
    from trainflow.precision import Precision
    from trainflow.step import Step

__all__ = ["NONFINITE_POLICIES", "StepRunner", "declarative_update"]

NONFINITE_POLICIES = ("raise", "skip", "stop")

#: the logged name of the add_loss total in each step
AUX = "aux"

#: on devices where reading a value stalls the host, losses are checked for NaN this often
_FINITE_CHECK_EVERY = 50

#: ``update(runner, batches, updates)``: the step's values to log and whether it was applied
UpdateFn = Callable[["StepRunner", Sequence[Any], int], tuple[dict[str, torch.Tensor], bool]]


class StepRunner:
    """Runs the updates of one step: the parameters it owns, its log keys, its update function.

    ``named`` are the models' named parameters (to check that each optimizer trains some of
    them, and to watch the others during a custom update). ``on_nonfinite`` is the trainer's
    policy; ``host_reads`` says that reading a value costs no device sync (the CPU).

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> from trainflow.precision import Precision
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> step = Step(lambda b: model(b).pow(2).mean(), opt, name="fit")
        >>> runner = StepRunner(step, list(model.named_parameters()), Precision("32", torch.device("cpu")))
        >>> values, applied = runner.run([torch.ones(4, 2)], updates=0)
        >>> list(values), applied
        (['fit/loss'], True)
    """

    __slots__ = (
        "step", "precision", "on_nonfinite", "host_reads", "params", "owns_all", "keys", "loss_key",
        "update_schedules", "epoch_schedules", "by_optimizer", "zero_grad_params", "zero_grad_opts", "reached",
        "update", "compiled", "late", "ranks",
    )

    def __init__(
        self,
        step: Step,
        named: list[tuple[str, torch.Tensor]],
        precision: Precision,
        on_nonfinite: str = "raise",
        host_reads: bool = True,
        compile: bool = False,
    ) -> None:
        self.step = step
        self.precision = precision
        self.on_nonfinite = on_nonfinite
        self.host_reads = host_reads
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
        # optimizers that keep the base method, the runner clears their gradients directly.
        plain = [opt for opt in step.optimizers if type(opt).zero_grad is torch.optim.Optimizer.zero_grad]
        self.zero_grad_params = {id(opt): tuple(self.by_optimizer[id(opt)]) for opt in plain}
        self.zero_grad_opts = tuple(opt for opt in step.optimizers if opt not in plain)
        self.owns_all = owned <= set(params)
        self.keys: dict[str, str] = {}
        self.loss_key = self.key("loss")
        self.reached = False  # set once an update's loss has given one of the step's parameters a gradient
        self.update_schedules = tuple(s for s in step.schedulers if s.interval == "update")
        self.epoch_schedules = tuple(s for s in step.schedulers if s.interval == "epoch")
        #: the ranks' collectives under torchrun (trainflow.distributed.Replicate), set by the trainer
        self.ranks: Replicate | None = None
        if step.update is None:
            self.update: UpdateFn = declarative_update
        else:
            from trainflow.custom import custom_update  # custom.py builds on this module

            self.update = custom_update(step.update, [(n, p) for n, p in named if id(p) not in params])
        self.late = None if host_reads else _LateCheck(step.name)  # CUDA: the NaN check that never waits
        self.compiled = None  # compile=True: the declarative update's loss and optimizer steps, compiled
        if compile:
            from trainflow.compiled import CompiledUpdate, custom_step_warning

            if step.update is None:
                self.compiled = CompiledUpdate(step, torch.device(precision.device_type),
                                               scaled=precision.scaler is not None)
            else:
                custom_step_warning(step)

    def run(self, batches: Sequence[Any], updates: int) -> tuple[dict[str, torch.Tensor], bool]:
        """One update on ``batches`` (the window), the ``updates + 1``-th of the run.

        Returns the step's loss values (detached, keyed ``"<step>/<term>"``) and whether the
        update was applied (False: dropped for a non-finite value, weights untouched).
        """
        return self.update(self, batches, updates)

    # ---------------------------------------------------------------- gradients

    def zero_grad(self, optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
        """``opt.zero_grad(set_to_none=True)`` for ``optimizers`` (default: all the step's)."""
        if optimizers is None:
            for params in self.zero_grad_params.values():
                for p in params:
                    p.grad = None
            for opt in self.zero_grad_opts:
                opt.zero_grad(set_to_none=True)
            return
        for opt in optimizers:
            params = self.zero_grad_params.get(id(opt))
            if params is None:
                opt.zero_grad(set_to_none=True)
            else:
                for p in params:
                    p.grad = None

    def backward(self, loss: torch.Tensor, params: list[torch.Tensor] | None = None) -> None:
        """Differentiate ``loss`` (scaled under float16) into ``params`` only (default: every
        trainable parameter of the step): isolation.

        When the step owns every parameter of the models there is nothing to isolate from, and
        a plain ``backward()`` gives the same gradients without autograd's per-call input map.
        """
        if not loss.requires_grad:
            if params is None:
                self.trainable()  # all frozen: that error says more
            raise ValueError(no_grad_message(self.step.name))
        if params is None and self.owns_all:
            self.precision.scale(loss).backward()
        else:
            self.precision.scale(loss).backward(inputs=self.trainable() if params is None else params)

    def gradients(self, batches: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The gradient of the window ``batches`` (each split into micro-batches when the step
        says so) in the parameters' ``.grad``, cleared first; returns the total loss and the values.

        A window of one chunk is differentiated as is, so that it matches a plain loop bit for
        bit; a plain scalar loss (no ``add_loss``, no dict) is not even parsed. Several chunks
        are accumulated exactly (:func:`trainflow.accumulation.accumulate_window`); so is every
        window under torchrun, its sums added over the ranks before the division.
        """
        step = self.step
        self.zero_grad()
        if step.microbatch_size is not None:
            batches = [c for b in batches for c in split(b, step.microbatch_size, step.name)]
        if len(batches) == 1 and self.ranks is None:
            out, added = self.call_loss(batches[0])
            if not added and type(out) is torch.Tensor and not out.ndim:  # a plain scalar: nothing to parse
                loss, values = out, {self.loss_key: out.detach()}
            else:
                terms = self.terms(out, added)
                loss, values = total_of(terms), self.values(terms)
            self.backward(loss)
        else:
            if self.ranks is None:
                window = accumulate_window(batches, self.forward, self.precision.scale, self.trainable(), step.name)
            else:  # under torchrun: the window's sums are added over the ranks (fsdp: isolation by requires_grad)
                ranks = self.ranks
                if step.microbatch_size is not None:
                    batches = ranks.pad_chunks(batches)
                with ranks.isolated(self.params):
                    window = accumulate_window(batches, self.forward, self.precision.scale, self.trainable(),
                                               step.name, ranks.window)
            values = {self.key(name): value for name, value in window.items()}
            loss = total_of([Term(k, v) for k, v in values.items()])
        if not self.reached:
            self.check_reached()
        return loss, values

    def call_loss(self, batch: Any) -> tuple[Any, list[torch.Tensor]]:
        """``step.loss(batch)`` under the precision's autocast: what it returned, and add_loss values."""
        loss = self.step.loss if self.compiled is None else self.compiled.loss
        if self.precision.dtype is None:  # float32: no autocast context to enter
            return collect_added(loss, batch)
        with self.precision.autocast():
            return collect_added(loss, batch)

    def forward(self, batch: Any) -> list[Term]:
        """One chunk's checked loss terms (for an accumulation window)."""
        terms = self.terms(*self.call_loss(batch))
        if not any((t.value if t.total is None else t.total).requires_grad for t in terms):
            raise ValueError(no_grad_message(self.step.name))
        return terms

    def terms(self, out: Any, added: list[torch.Tensor]) -> list[Term]:
        """What the loss function returned, plus the add_loss total, as checked terms."""
        terms = parse_loss(out, self.step.name)
        if added:  # add_loss values from the models' forward passes
            if any(t.name == AUX for t in terms):
                raise ValueError(
                    f"Step {self.step.name!r}: the loss function returns a term named {AUX!r}, the name of the "
                    "add_loss total. Rename that term."
                )
            terms.append(Term(AUX, total_of([Term(AUX, v) for v in added])))
        return terms

    def values(self, terms: list[Term]) -> dict[str, torch.Tensor]:
        """The terms as the values the trainer logs: ``{"<step>/<term>": detached value}``."""
        return {self.key(t.name): t.value.detach() for t in terms}

    def check_reached(self) -> None:
        """After the first update's backward: the loss must give some of the step's parameters a gradient."""
        if all(p.grad is None for p in self.trainable()):
            raise ValueError(unreached_message(self.step.name))
        self.reached = True

    def trainable(self) -> list[torch.Tensor]:
        """The step's parameters that require gradients (an error when there are none)."""
        params = [p for p in self.params if p.requires_grad]
        if not params:
            raise ValueError(
                f"Step {self.step.name!r}: every parameter of its optimizers is frozen (requires_grad=False), "
                "so the update would change nothing. Unfreeze some (trainflow.unfreeze) or drop the step."
            )
        return params

    def key(self, term: str) -> str:
        """The log key of ``term``: ``"<step>/<term>"``."""
        key = self.keys.get(term)
        if key is None:
            key = self.keys[term] = f"{self.step.name}/{term}"
        return key

    # ---------------------------------------------------------------- the non-finite decision

    def decide(
        self,
        losses: list[torch.Tensor],
        params: Iterable[torch.Tensor],
        values: dict[str, torch.Tensor] | None,
        updates: int,
    ) -> bool:
        """Before an optimizer steps: may it? False when the update must be dropped (skip/stop).

        Under ``on_nonfinite="raise"`` this raises for a non-finite loss, naming its term (one
        read of the total: NaN or inf in any term shows in it); ``values=None`` defers that
        check to the values the update returns (a custom step reports them after its call).
        Under "skip"/"stop": whether ``losses`` and the gradients of ``params`` are all finite.
        """
        if self.on_nonfinite != "raise":
            return self.all_finite(losses, params)
        late = self.late
        if late is None:  # the CPU: reading the loss costs nothing
            if values:
                loss = losses[0] if losses else total_of([Term(k, v) for k, v in values.items()])
                if not math.isfinite(loss.item()):
                    self.raise_nonfinite(loss, values, updates + 1)
            return True
        # Reading a CUDA value stalls the host: there, every _FINITE_CHECK_EVERY updates the
        # loss's finiteness is copied to the host asynchronously and read at a later update,
        # once the copy is done (a NaN in the weights shows in every later loss, so it is caught).
        if late.event is not None:
            late.poll(self)
        if values and updates % _FINITE_CHECK_EVERY == 0 and late.event is None:
            late.submit(losses[0] if losses else total_of([Term(k, v) for k, v in values.items()]), values, updates + 1)
        return True

    def raise_nonfinite(self, loss: torch.Tensor, values: dict[str, torch.Tensor], update: int) -> None:
        """Raise for the non-finite ``loss`` of ``update``, naming the term that is (this reads them)."""
        check_finite([Term(k.split("/", 1)[1], v) for k, v in values.items()], self.step.name, update)
        check_finite([Term("loss", loss)], self.step.name, update)  # e.g. inf - inf

    def all_finite(self, losses: list[torch.Tensor], params: Iterable[torch.Tensor]) -> bool:
        """Whether the losses and the gradients of ``params`` are all finite (one read of one flag)."""
        flags = [torch.isfinite(loss).all() for loss in losses]
        grads = [p.grad for p in params if p.grad is not None]
        sharded = self.ranks is not None and self.ranks.shards
        if sharded:  # fsdp: this rank's slices of the gradients (DTensor)
            grads = [g.to_local() for g in grads]
        if grads and self.precision.scaler is None:  # under float16 the loss scaler handles overflow
            flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        finite = bool(torch.stack(flags).all()) if flags else True
        if sharded:  # any rank's NaN is every rank's
            finite = not self.ranks.any(not finite)[0]
        return finite

    # ---------------------------------------------------------------- applying the gradients

    def step_optimizers(
        self, optimizers: Sequence[torch.optim.Optimizer], params: list[torch.Tensor] | None = None
    ) -> None:
        """Unscale (float16), clip the gradient norm of ``params`` (default: the step's trainable
        ones) when the step clips, step ``optimizers``."""
        if self.step.clip_grad_norm is not None:
            for opt in optimizers:
                self.precision.unscale(opt)
            torch.nn.utils.clip_grad_norm_(self.trainable() if params is None else params, self.step.clip_grad_norm)
        scaler = self.precision.scaler
        if self.compiled is not None and scaler is None:
            self.compiled.step_optimizers(optimizers)
        elif scaler is None:
            for opt in optimizers:
                opt.step()
        else:
            for opt in optimizers:
                scaler.step(opt)

    def finish(self, stepped: bool, complete: bool) -> None:
        """End of an update: adjust the loss scale when an optimizer ``stepped``; step the
        per-update schedules when the update is ``complete`` (not dropped)."""
        if stepped and self.precision.scaler is not None:
            self.precision.update()
        if complete:
            for schedule in self.update_schedules:
                schedule.step()

    def end_epoch(self) -> None:
        """Step the per-epoch schedules."""
        for schedule in self.epoch_schedules:
            schedule.step()


class _LateCheck:
    """A loss's finiteness, copied to pinned host memory without waiting, read once the copy is done.

    ``submit`` queues the copy and records an event; ``poll`` (at a later update) reads the
    flag only when the event has completed, so the host never waits for the device.
    """

    __slots__ = ("step", "event", "flag", "loss", "values", "update")

    def __init__(self, step: str) -> None:
        self.step = step
        self.event: Any = None
        self.flag = self.loss = self.values = self.update = None

    def submit(self, loss: torch.Tensor, values: dict[str, torch.Tensor], update: int) -> None:
        self.flag = torch.isfinite(loss.detach()).to("cpu", non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        self.loss, self.values, self.update = loss.detach(), values, update

    def poll(self, runner: StepRunner) -> None:
        if not self.event.query():  # the copy is still queued: look again at the next update
            return
        finite, loss, values, update = bool(self.flag), self.loss, self.values, self.update
        self.event = self.flag = self.loss = self.values = self.update = None
        if not finite:
            runner.raise_nonfinite(loss, values, update)


def declarative_update(
    runner: StepRunner, batches: Sequence[Any], updates: int
) -> tuple[dict[str, torch.Tensor], bool]:
    """The update of a ``Step(loss, optimizer)``: the window's gradients, one decision, apply.

    The built-in update function, under the same contract as a custom step's.

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> from trainflow.precision import Precision
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.5)
        >>> runner = StepRunner(Step(lambda b: (b @ w).mean(), opt, name="fit"), [("w", w)],
        ...                     Precision("32", torch.device("cpu")))
        >>> values, applied = declarative_update(runner, [torch.ones(1, 2)], 0)
        >>> w.tolist(), values["fit/loss"].item(), applied
        ([0.5, 0.5], 2.0, True)
    """
    loss, values = runner.gradients(batches)
    if not runner.decide([loss], runner.params, values, updates):
        runner.zero_grad()
        return values, False
    runner.step_optimizers(runner.step.optimizers)
    runner.finish(True, True)
    return values, True
