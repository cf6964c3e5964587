"""What a loss function may return, and how it becomes one tensor to differentiate.

A step's ``loss(batch)`` returns one of:

- a scalar tensor: a mean over the batch's samples;
- :class:`Average` ``(total, count)``: a sum and what it is a sum over (tokens, pixels...);
- a dict of named such values, summed in order (each name is logged on its own).

:func:`parse_loss` turns any of these into a list of :class:`Term` so that the update code
handles one shape only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from trainflow.data.batch import sample_count

__all__ = ["Average", "Term", "add_loss", "parse_loss"]


@dataclass(frozen=True, slots=True)
class Average:
    """A loss given as a sum and the count it is a sum over: its value is ``total / count``.

    Return it from a loss function when the natural normaliser is not the number of samples,
    e.g. summed token losses and the number of tokens. Under accumulation the window is then
    normalised by the window's total count, exactly as one big batch would be.

    Example:
        >>> import torch
        >>> from trainflow import Average
        >>> token_losses = torch.tensor([0.5, 1.0, 1.5])
        >>> avg = Average(token_losses.sum(), 3)
        >>> float(avg.value())
        1.0
    """

    total: torch.Tensor
    count: torch.Tensor | int | float

    def value(self) -> torch.Tensor:
        """The mean, ``total / count``."""
        return self.total / self.count


@dataclass(slots=True)
class Term:
    """One named part of a step's loss.

    ``value`` is what is differentiated for a single-batch update (the mean);
    ``total`` and ``count`` are set for :class:`Average` terms only.

    Example:
        >>> import torch
        >>> [t.name for t in parse_loss({"mse": torch.tensor(0.5), "kl": Average(torch.tensor(3.0), 6)}, "vae")]
        ['mse', 'kl']
        >>> parse_loss({"kl": Average(torch.tensor(3.0), 6)}, "vae")[0].value
        tensor(0.5000)
    """

    name: str
    value: torch.Tensor
    total: torch.Tensor | None = None
    count: torch.Tensor | int | float | None = None


def _check_tensor(value: Any, step: str, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"Step {step!r}: loss {name!r} must be a scalar tensor or trainflow.Average(total, count). "
            f"Received: {name}={_short(value)} of type {type(value).__name__}. "
            "Return a tensor, e.g. `torch.nn.functional.mse_loss(pred, y)`."
        )
    if value.ndim != 0:
        if value.numel() != 1:
            raise ValueError(
                f"Step {step!r}: loss {name!r} must be a scalar (0-dim or one-element) tensor, a mean over the "
                f"batch. Received: a tensor of shape {tuple(value.shape)}. "
                "Reduce it first, e.g. `loss.mean()`, or return trainflow.Average(loss.sum(), count)."
            )
        value = value.reshape(())  # one element, as `backward()` accepts it (e.g. torch.mean(x, dim=0) of shape (1,))
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _term(value: Any, step: str, name: str) -> Term:
    if isinstance(value, Average):
        total = _check_tensor(value.total, step, f"{name}.total")
        return Term(name, total / value.count, total, value.count)
    return Term(name, _check_tensor(value, step, name))


def parse_loss(output: Any, step: str) -> list[Term]:
    """Turn what a loss function returned into named terms, checking every part.

    Example:
        >>> import torch
        >>> terms = parse_loss({"mse": torch.tensor(1.0), "l1": torch.tensor(2.0)}, step="fit")
        >>> [(t.name, float(t.value)) for t in terms]
        [('mse', 1.0), ('l1', 2.0)]
    """
    if isinstance(output, dict):
        if not output:
            raise ValueError(
                f"Step {step!r}: the loss function returned an empty dict. "
                "Return at least one named loss, e.g. {'mse': mse, 'l1': l1}."
            )
        return [_term(v, step, str(k)) for k, v in output.items()]
    return [_term(output, step, "loss")]


def sum_forms(terms: list[Term], batch: Any, step: str) -> list[tuple[Term, torch.Tensor, Any]]:
    """Each term as (term, total, count): a mean times the batch's sample count, or an Average's parts.

    Sums of these over several batches, divided by the summed counts, give the exact loss of
    the batches taken together (accumulation windows, validation). The sample count is read
    from the batch only when a mean term needs it.
    """
    n = None
    forms = []
    for term in terms:
        if term.total is None:
            n = sample_count(batch, step) if n is None else n
            forms.append((term, term.value * n, n))
        else:
            forms.append((term, term.total, term.count))
    return forms


def total_of(terms: list[Term]) -> torch.Tensor:
    """Sum the terms' values left to right, as ``a + b + c`` in a hand-written loop."""
    total = terms[0].value
    for term in terms[1:]:
        total = total + term.value
    return total


def check_finite(terms: list[Term], step: str, update: int) -> None:
    """Raise when a term is NaN or infinite (this reads the value: call it where a sync is cheap)."""
    for term in terms:
        value = term.value.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"Step {step!r}: loss {term.name!r} is {value} at update {update}. "
                "Lower the learning rate, clip gradients (Step(..., clip_grad_norm=1.0)), "
                "or check the data for NaN/inf."
            )


def no_grad_message(step: str) -> str:
    """The error for a loss that does not require grad (raised before autograd's own, which names no step).

    Example:
        >>> no_grad_message("G").split(", so")[0]
        "Step 'G': the loss does not require grad"
    """
    return (
        f"Step {step!r}: the loss does not require grad, so it has nothing to differentiate. Received: a loss "
        "tensor with requires_grad=False (computed under torch.no_grad() or inference_mode, from .detach()ed or "
        ".item() values, or from frozen parameters only). Return a loss computed from the models' outputs, "
        "outside torch.no_grad()."
    )


def unreached_message(step: str) -> str:
    """The error for a loss that gives none of its step's parameters a gradient.

    Example:
        >>> unreached_message("G").split(":")[0]
        "Step 'G'"
        >>> unreached_message("G").split(": ")[1]
        'its loss reaches none of the parameters of its optimizers'
    """
    return (
        f"Step {step!r}: its loss reaches none of the parameters of its optimizers: after backward every one of "
        "them still has grad None, so the update would change nothing. Received: a loss that depends only on "
        "other parameters (e.g. a generator step on fake.detach(), or the wrong model's output). Compute it from "
        "this step's parameters (no .detach() on their path), or give the step the optimizer of the parameters "
        "its loss depends on."
    )


# ---------------------------------------------------------------- model-tracked losses

_collected: list[torch.Tensor] | None = None  # set only while a training step's forward runs


def add_loss(value: torch.Tensor) -> None:
    """Add ``value`` to the loss of the training step whose forward pass is running.

    Keras's ``self.add_loss``: call it inside any module's ``forward`` (an activity
    regulariser, a KL term). During a training step the values are summed into that step's
    loss and logged as ``<step>/aux``; under accumulation they are weighted like the main
    loss. Outside a training step (validation, plain inference) the call does nothing.

    Example:
        >>> import torch
        >>> from trainflow import add_loss
        >>> class ActivityRegularization(torch.nn.Module):
        ...     def forward(self, x):
        ...         add_loss(1e-2 * x.sum())
        ...         return x
        >>> ActivityRegularization()(torch.ones(2, 3)).shape  # no step running: ignored
        torch.Size([2, 3])
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"add_loss: `value` must be a scalar tensor. Received: value={_short(value)} of type "
            f"{type(value).__name__}. Pass a tensor, e.g. add_loss(1e-2 * x.pow(2).mean())."
        )
    if value.numel() != 1:
        raise ValueError(
            f"add_loss: `value` must be a scalar (0-dim or one-element) tensor. Received: a tensor of shape "
            f"{tuple(value.shape)}. Reduce it first, e.g. add_loss(x.sum())."
        )
    value = value.reshape(()) if value.ndim else value
    if _collected is not None:
        _collected.append(value)


def collect_added(fn, *args, into: list[torch.Tensor] | None = None):
    """Run ``fn(*args)`` collecting ``add_loss`` values (into ``into``); return (result, values)."""
    global _collected
    outer, _collected = _collected, ([] if into is None else into)
    try:
        return fn(*args), _collected
    finally:
        _collected = outer
