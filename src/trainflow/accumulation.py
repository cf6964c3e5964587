"""Exact gradient accumulation over an update window of several chunks.

A window is every chunk one update sees: ``accumulate`` batches, each split into chunks of at
most ``microbatch_size`` samples. The gradient of the window must equal the gradient of the
one big batch made of all its chunks, also when the chunks differ in size.

How: each chunk contributes the *sum* form of each loss term (a mean times the chunk's sample
count, or an :class:`~trainflow.Average`'s total), and the accumulated gradient is divided
once by the window's total count. Terms normalised by different counts (samples for a mean,
tokens for an ``Average``) are accumulated in separate buffers, each divided by its own total.
A window of one chunk never comes here: it is differentiated as is, so that it matches a
plain loop bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainflow.data.sharding import empty
from trainflow.losses import Term, sum_forms

__all__ = ["accumulate_window"]

_SAMPLES = "samples"  # the normaliser shared by every mean-valued term


def _sums(terms: list[Term], chunk: Any, step: str) -> tuple[dict[str, tuple[torch.Tensor, Any]], dict[str, str]]:
    """Per normaliser group, the chunk's summed loss and its count; and each term's group."""
    groups: dict[str, tuple[torch.Tensor, Any]] = {}
    group_of: dict[str, str] = {}
    for term, total, count in sum_forms(terms, chunk, step):
        group = _SAMPLES if term.total is None else f"Average {term.name!r}"
        group_of[term.name] = group
        if group in groups:
            groups[group] = (groups[group][0] + total, count)
        else:
            groups[group] = (total, count)
    return groups, group_of


def accumulate_window(
    chunks: Sequence[Any],
    forward: Callable[[Any], list[Term]],
    scale: Callable[[torch.Tensor], torch.Tensor],
    params: list[torch.Tensor],
    step: str,
    reduce: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Accumulate the exact gradient of the window ``chunks`` into ``params[i].grad``.

    ``forward(chunk)`` returns the chunk's loss terms; ``scale`` is applied to what is
    differentiated (the mixed-precision loss scale, or identity). The parameters' gradients
    must be cleared before the call. Returns each term's window value, detached.

    ``reduce(params, counts, buffers, sums)`` (distributed training,
    :meth:`trainflow.distributed.Replicate.window`) sums the window's sum-form gradients,
    counts and loss sums over the ranks before the one division, and returns the global
    counts. A chunk without samples (a rank's share of a short last batch) then adds nothing
    (under fsdp it is still run, its forward and backward being collectives).

    Example:
        >>> import torch
        >>> from trainflow.losses import Term
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> def forward(chunk):
        ...     return [Term("loss", (chunk @ w).mean())]
        >>> values = accumulate_window([x[:2], x[2:]], forward, lambda t: t, [w], step="fit")
        >>> big = torch.nn.Parameter(torch.ones(2))
        >>> (x @ big).mean().backward()
        >>> torch.allclose(w.grad, big.grad), round(values["loss"].item(), 4)
        (True, 7.0)
    """
    term_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, Any] = {}
    layout: dict[str, str] | None = None
    buffers: dict[str, list[torch.Tensor | None]] = {}
    ranks = getattr(reduce, "__self__", None)  # the ranks' collectives (distributed training)
    runs_empty = ranks is not None and ranks.shards  # fsdp: every rank runs every chunk (collective forwards)
    last = max((i for i, c in enumerate(chunks) if runs_empty or reduce is None or not empty(c)), default=-1)
    for i, chunk in enumerate(chunks):
        vacant = reduce is not None and empty(chunk)
        if vacant and not runs_empty:
            continue
        terms = forward(chunk)
        groups, group_of = _sums(terms, chunk, step)
        if layout is None:
            layout = group_of
        elif group_of != layout:
            raise ValueError(
                f"Step {step!r}: the loss returned different terms for two batches of one update "
                f"({sorted(layout)} then {sorted(group_of)}). Return the same names, each always a "
                "mean or always an Average."
            )
        if not vacant:
            for term in terms:
                n = groups[group_of[term.name]][1]
                total = term.value.detach() * n if term.total is None else term.total.detach()
                term_sums[term.name] = total if term.name not in term_sums else term_sums[term.name] + total
        for group, (_, count) in groups.items():
            if vacant:
                counts.setdefault(group, 0)
            else:
                counts[group] = count if group not in counts else counts[group] + count
        if len(groups) == 1:
            ((total, _),) = groups.values()
            if ranks is None:
                scale(total).backward(inputs=params)
            else:  # the window's last backward: under torchrun its gradients are sent as they are made
                ranks.backward(scale(total), params, i == last)
        elif runs_empty:
            from trainflow.fsdp import several_normalisers

            raise several_normalisers(step, groups)
        else:
            _into_buffers(groups, params, buffers, scale)
    if runs_empty:  # the terms of a rank whose every chunk was empty: zero sums
        for term in terms:
            term_sums.setdefault(term.name, torch.zeros((), dtype=term.value.dtype, device=term.value.device))
    if layout is None:  # no sample on this rank: its terms, so that it adds zeros to the same sums
        layout = _empty_window(forward(chunks[0]), chunks[0], step, term_sums, counts, buffers, len(params))
    if reduce is not None:
        counts = reduce(params, counts, buffers, term_sums)
    _normalise(params, counts, buffers)
    return {name: total / counts[layout[name]] for name, total in term_sums.items()}


def _empty_window(terms, chunk, step, term_sums, counts, buffers, n_params) -> dict[str, str]:
    """The layout of a window whose every chunk is empty: each term's sum and each count zero."""
    groups, group_of = _sums(terms, chunk, step)
    for term in terms:
        term_sums[term.name] = torch.zeros((), dtype=term.value.dtype, device=term.value.device)
    for group in groups:
        counts[group] = 0
        if len(groups) > 1:
            buffers[group] = [None] * n_params
    return group_of


def _into_buffers(groups, params, buffers, scale) -> None:
    """Differentiate each normaliser group into its own gradient buffer."""
    names = list(groups)
    for i, group in enumerate(names):
        grads = torch.autograd.grad(
            scale(groups[group][0]), params, retain_graph=i < len(names) - 1, allow_unused=True
        )
        buf = buffers.setdefault(group, [None] * len(params))
        for j, g in enumerate(grads):
            if g is not None:
                buf[j] = g if buf[j] is None else buf[j] + g


def _normalise(params: list[torch.Tensor], counts: dict[str, Any], buffers) -> None:
    if not buffers:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            (count,) = counts.values()
            torch._foreach_div_(grads, float(count))
        return
    for j, p in enumerate(params):
        grad = None
        for group, buf in buffers.items():
            if buf[j] is not None:
                part = buf[j] / float(counts[group])
                grad = part if grad is None else grad + part
        if grad is not None:
            p.grad = grad
