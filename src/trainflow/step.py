"""``Step``: one kind of optimizer update, checked when it is built."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainflow.schedules import Schedule

__all__ = ["Step"]

BATCH_MODES = ("next", "same")
#: the log namespaces of the epoch's metrics (``train/``) and of validation (``val/``): no step may log under them
RESERVED_NAMES = ("train", "val")
PARTIAL_WINDOWS = ("apply", "drop")


def _positive_int(value: Any, arg: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Step: `{arg}` must be an int. Received: {arg}={value!r}. {fix}")
    if value < 1:
        raise ValueError(f"Step: `{arg}` must be >= 1. Received: {arg}={value!r}. {fix}")
    return value


def _optimizers(optimizer: Any) -> tuple[torch.optim.Optimizer, ...]:
    optimizers = tuple(optimizer) if isinstance(optimizer, (list, tuple)) else (optimizer,)
    if not optimizers:
        raise ValueError(
            "Step: `optimizer` must be a torch.optim.Optimizer or a non-empty list of them. "
            "Received: optimizer=[]. Pass the optimizer(s) this step updates."
        )
    for i, opt in enumerate(optimizers):
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                "Step: `optimizer` must be a torch.optim.Optimizer or a list of them. "
                f"Received: optimizer[{i}] of type {type(opt).__name__}. "
                "Build one first, e.g. torch.optim.SGD(model.parameters(), lr=0.01)."
            )
    seen: set[int] = set()
    for i, opt in enumerate(optimizers):
        if id(opt) in seen:
            raise ValueError(
                f"Step: the same optimizer is passed twice (optimizer[{i}], a {type(opt).__name__}). "
                "It would be stepped twice per update. Pass each optimizer once."
            )
        seen.add(id(opt))
    return optimizers


def _schedulers(scheduler: Any) -> tuple[Schedule, ...]:
    if scheduler is None:
        return ()
    schedulers = tuple(scheduler) if isinstance(scheduler, (list, tuple)) else (scheduler,)
    out = []
    for i, s in enumerate(schedulers):
        if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) or (
            isinstance(s, Schedule) and isinstance(s.schedule, torch.optim.lr_scheduler.ReduceLROnPlateau)
        ):
            raise TypeError(
                "Step: `scheduler` cannot be a ReduceLROnPlateau: a step's schedulers are stepped after each update "
                "(or epoch) with no argument, and ReduceLROnPlateau.step needs the monitored value. "
                f"Received: scheduler[{i}] of type ReduceLROnPlateau. Step it from a callback that sees the value, e.g. "
                "`def on_epoch_end(self, trainer, logs): plateau.step(logs['val/loss'])` (give that callback "
                "state_dict/load_state_dict returning plateau's, so a resume restores it), or pass a schedule of the "
                "update count."
            )
        if isinstance(s, Schedule):
            out.append(s)
        elif callable(getattr(s, "step", None)) or callable(s):
            out.append(Schedule(s))  # a torch scheduler or a function of the update count
        else:
            raise TypeError(
                "Step: `scheduler` must be a torch.optim.lr_scheduler object, a function of the update "
                f"count, or a trainflow.Schedule (or a list of them). Received: scheduler[{i}] of type "
                f"{type(s).__name__}. Build one on this step's optimizer, e.g. torch.optim.lr_scheduler.StepLR(opt, 10)."
            )
    return tuple(out)


def _check_arity(fn: Callable, what: str, args: tuple[str, ...], fix: str) -> None:
    """Raise when ``fn`` cannot be called with ``len(args)`` positional arguments (checked now, not at update 1)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature (a builtin): trust it
        return
    try:
        signature.bind(*([None] * len(args)))
    except TypeError:
        count = {1: "one argument", 2: "two arguments"}[len(args)]
        raise TypeError(
            f"{what} must accept {count} ({', '.join(args)}). Received: a function with signature {signature}. {fix}"
        ) from None


def _check_reserved(chosen: str | None, name: str | None) -> None:
    """A step's logs are keyed ``"<step>/<loss>"``: ``train/`` and ``val/`` belong to the metrics."""
    if chosen in RESERVED_NAMES:
        given = f"name={name!r}" if name is not None else f"name=None, so the function's name {chosen!r}"
        owner = "the epoch's training metrics" if chosen == "train" else "validation"
        raise ValueError(
            f"Step: the name {chosen!r} is reserved: '{chosen}/...' are the log keys of {owner}, which the "
            f"step's '{chosen}/<loss>' epoch means would overwrite or be overwritten by. Received: {given}. "
            "Pass another name=, e.g. name='fit'."
        )


def _streams(data: Any, accumulate: int, microbatch_size: int | None) -> tuple[str, ...]:
    """``data`` as the tuple of stream names the step reads (a name, or several)."""
    names = (data,) if isinstance(data, str) else tuple(data) if isinstance(data, (tuple, list)) else None
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise TypeError(
            f"Step: `data` must be the name of a data stream, or a tuple of names. Received: data={data!r}. "
            "Use 'train' (the default), the key of a stream passed to fit(data={...}), or e.g. ('train', 'valid')."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"Step: `data` names a stream twice. Received: data={data!r}. Name each stream once.")
    if len(names) > 1 and (accumulate != 1 or microbatch_size is not None):
        raise ValueError(
            f"Step: a step that reads several streams takes one batch of each per update, so it cannot "
            f"accumulate or split them. Received: data={data!r}, accumulate={accumulate}, "
            f"microbatch_size={microbatch_size}. Use accumulate=1 and microbatch_size=None, or read one stream."
        )
    return names


def _no_loss(batch: Any) -> None:
    """The loss slot of a custom step, which has none (its update function differentiates)."""


def _default_name(loss: Callable) -> str | None:
    name = getattr(loss, "__name__", None)
    return name if isinstance(name, str) and name.isidentifier() else None


class Step:
    """One kind of optimizer update: a loss, the optimizer(s) it updates, and how often.

    Args:
        loss: ``loss(batch)`` returning a scalar tensor (a mean over the batch), a
            :class:`trainflow.Average`, or a dict of named such values that are summed.
        optimizer: a ``torch.optim.Optimizer`` or a list of them, stepped together.
        name: the step's name in logs, ``describe()`` and checkpoints (default: the loss
            function's name, else ``step<i>``, its place in the flow). Not ``"val"``: that
            is validation's log namespace.
        repeat: consecutive updates of this step in each cycle of the flow (GAN: ``repeat=3``).
        batch: ``"next"`` takes a fresh batch for each update; ``"same"`` reuses the batch the
            previous update used, of the stream(s) this step names (a step on "train" after one
            that read ``("train", "valid")`` gets its "train" batch).
        data: the name of the data stream this step draws from, or a tuple of names: the step
            then gets one batch of each per update, drawn in the order given, as a dict
            ``{name: batch}`` (a DARTS architecture step reading ``("train", "valid")``). When
            "train" runs out, the epoch ends before the update. Such a step has
            ``accumulate=1`` and no ``microbatch_size``.
        accumulate: batches per update; gradients are accumulated exactly.
        microbatch_size: split each batch into chunks of at most this many samples.
        partial_window: when the "train" stream runs out inside an accumulation window,
            ``"apply"`` makes the batches taken so far one exactly-weighted update; ``"drop"``
            discards them.
        clip_grad_norm: clip the gradient norm of the step's parameters once per update.
        scheduler: a ``torch.optim.lr_scheduler``, a function of the update count giving the
            learning rate, or a :class:`trainflow.Schedule` (any hyperparameter, per update or
            per epoch, per group); or a list of them. Never stepped per micro-batch.

    Only the parameters owned by the step's optimizers get gradients during the step; every
    other parameter's ``.grad`` is left exactly as it was.

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def mse(batch):
        ...     x, y = batch
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> step = Step(mse, opt, repeat=2)
        >>> step.name, step.repeat, step.batch
        ('mse', 2, 'next')
    """

    __slots__ = (
        "loss",
        "optimizers",
        "name",
        "repeat",
        "batch",
        "data",
        "streams",
        "accumulate",
        "microbatch_size",
        "partial_window",
        "clip_grad_norm",
        "schedulers",
        "update",
    )

    def __init__(
        self,
        loss: Callable[[Any], Any],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        name: str | None = None,
        repeat: int = 1,
        batch: str = "next",
        data: str | Sequence[str] = "train",
        accumulate: int = 1,
        microbatch_size: int | None = None,
        partial_window: str = "apply",
        clip_grad_norm: float | None = None,
        scheduler: Any = None,
    ) -> None:
        if not callable(loss):
            raise TypeError(
                f"Step: `loss` must be a function of the batch. Received: loss={loss!r} "
                f"of type {type(loss).__name__}. Pass e.g. `lambda batch: F.mse_loss(model(batch[0]), batch[1])`."
            )
        if name is not None and (not isinstance(name, str) or not name or "/" in name):
            raise ValueError(
                f"Step: `name` must be a non-empty string without '/'. Received: name={name!r}. "
                "Use a short word such as 'D' or 'generator'."
            )
        if batch not in BATCH_MODES:
            raise ValueError(
                f"Step: `batch` must be one of {BATCH_MODES}. Received: batch={batch!r}. "
                "Use 'next' for a fresh batch per update or 'same' to reuse the previous update's batch."
            )
        if partial_window not in PARTIAL_WINDOWS:
            raise ValueError(
                f"Step: `partial_window` must be one of {PARTIAL_WINDOWS}. Received: partial_window={partial_window!r}. "
                "Use 'apply' to update on an incomplete last window, 'drop' to discard it."
            )
        if clip_grad_norm is not None and (
            isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
            or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0  # `nan <= 0` is False: test finiteness
        ):
            raise ValueError(
                "Step: `clip_grad_norm` must be a positive, finite number or None. "
                f"Received: clip_grad_norm={clip_grad_norm!r}. Use e.g. clip_grad_norm=1.0, or None not to clip."
            )
        _check_arity(loss, "Step: `loss`", ("batch",), "Define it as `def loss(batch): ...`; a function "
                     "of (batch, ctx) that steps its optimizers itself is a Step.custom(update, optimizer).")
        self.loss = loss
        self.optimizers = _optimizers(optimizer)
        self.name = name if name is not None else _default_name(loss)
        _check_reserved(self.name, name)
        self.repeat = _positive_int(repeat, "repeat", "Use repeat=1 for one update per cycle.")
        self.batch = batch
        self.accumulate = _positive_int(accumulate, "accumulate", "Use accumulate=1 for no accumulation.")
        self.microbatch_size = (
            None
            if microbatch_size is None
            else _positive_int(microbatch_size, "microbatch_size", "Use None to keep batches whole.")
        )
        self.streams = _streams(data, self.accumulate, self.microbatch_size)
        self.data: str | tuple[str, ...] = self.streams[0] if len(self.streams) == 1 else self.streams
        self.partial_window = partial_window
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.update: Callable[[Any, Any], Any] | None = None  # set by Step.custom
        self.schedulers = _schedulers(scheduler)
        for schedule in self.schedulers:
            schedule.bind(self.optimizers, self.name or "step")

    @classmethod
    def custom(
        cls,
        update: Callable[[Any, Any], Any],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        *,
        name: str | None = None,
        repeat: int = 1,
        batch: str = "next",
        data: str | Sequence[str] = "train",
        clip_grad_norm: float | None = None,
        scheduler: Any = None,
    ) -> Step:
        """A step whose function performs its own updates: ``update(batch, ctx)``.

        The escape hatch for flows that do not fit a loss per step (Keras's ``train_step``).
        ``ctx`` (a :class:`trainflow.custom.UpdateContext`) offers ``minimize(loss, opt)``,
        ``zero_grad``, ``backward`` (into the given optimizer's parameters only), ``step``,
        ``aux_loss()`` and ``optimizers``. The function returns None, a loss or a dict of
        named values to log. It must step at least once and may change no parameter outside
        ``optimizer``; both are checked after every call. With ``data=("train", "valid")``
        ``batch`` is the dict ``{"train": ..., "valid": ...}`` (see :class:`Step`).

        Example:
            >>> import torch
            >>> from trainflow import Step
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> def update(batch, ctx):
            ...     loss = model(batch).pow(2).mean()
            ...     ctx.minimize(loss, opt)
            ...     return loss
            >>> Step.custom(update, opt).name
            'update'
        """
        if not callable(update):
            raise TypeError(
                f"Step.custom: `update` must be a function update(batch, ctx). Received: update={update!r} "
                f"of type {type(update).__name__}."
            )
        _check_arity(update, "Step.custom: `update`", ("batch", "ctx"), "Define it as `def update(batch, ctx): ...`.")
        _check_reserved(_default_name(update) if name is None else name, name)
        step = cls(_no_loss, optimizer, name=_default_name(update) if name is None else name, repeat=repeat,
                   batch=batch, data=data, clip_grad_norm=clip_grad_norm, scheduler=scheduler)
        step.update, step.loss = update, None
        return step

    def __repr__(self) -> str:
        opts = ", ".join(type(o).__name__ for o in self.optimizers)
        extras = [f"repeat={self.repeat}"] if self.repeat != 1 else []
        extras += [f"batch={self.batch!r}"] if self.batch != "next" else []
        extras += [f"data={self.data!r}"] if self.data != "train" else []
        extras += [f"accumulate={self.accumulate}"] if self.accumulate != 1 else []
        extras += [f"microbatch_size={self.microbatch_size}"] if self.microbatch_size else []
        return f"Step({self.name!r}, [{opts}]" + "".join(", " + e for e in extras) + ")"
