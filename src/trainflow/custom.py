"""Custom update steps: a function that performs its own updates, still under the trainer's rules.

``Step.custom(update, optimizers)`` hands each batch to ``update(batch, ctx)``; the function
calls ``ctx.minimize(loss, opt)`` (or ``ctx.zero_grad`` / ``ctx.backward`` / ``ctx.step``) as
often as it likes. The trainer still gives it isolation (``ctx.backward`` writes gradients only
into the named optimizer's parameters), callbacks, logging and checkpoints, and it checks
afterwards that the function stepped at least once and touched no parameter outside the
step's optimizers.

Under ``on_nonfinite="skip"`` or ``"stop"``, each ``ctx.step`` decides before it steps: when a
loss given to ``ctx.backward`` since the last step, or a gradient of the optimizers being
stepped, is NaN or infinite, that step and every later one of the same call step nothing
(their gradients are cleared); the steps the call took before it stand. The update then
counts in ``trainer.skipped`` and its values are not averaged into the epoch's means.

Under ``torchrun`` each ``ctx.step`` first averages the gradients of the optimizers it steps
over the ranks, weighted by each rank's number of samples (the losses given to
``ctx.backward`` are taken as means over the batch), and the values the function returns are
logged as such means over all ranks: the update one process makes on the combined batch. Every
rank must call ``ctx.step`` as often as the others (the same code does). A rank whose share of
a short last batch is empty differentiates nothing and adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainflow.data.batch import sample_count
from trainflow.losses import collect_added, parse_loss, unreached_message

if TYPE_CHECKING:
    from trainflow.update import StepRunner

__all__ = ["UpdateContext"]


class UpdateContext:
    """What a custom update function may do: differentiate, step, read its optimizers.

    Attributes:
        optimizers: the step's optimizers, in the order given to ``Step.custom``.
        name: the step's name.

    Example: seed 004's GAN ``train_step`` as one custom step.

        >>> import torch, torch.nn.functional as F
        >>> from trainflow import Step, Trainer
        >>> G, D = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
        >>> d_opt = torch.optim.Adam(D.parameters(), 3e-4)
        >>> g_opt = torch.optim.Adam(G.parameters(), 4e-4)
        >>> def train_step(batch, ctx):
        ...     real = batch[0]
        ...     fake = G(torch.randn(len(real), 2))
        ...     labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)])
        ...     d_loss = F.binary_cross_entropy_with_logits(D(torch.cat([fake, real])), labels)
        ...     ctx.minimize(d_loss, d_opt)
        ...     g_loss = F.binary_cross_entropy_with_logits(D(G(torch.randn(len(real), 2))), torch.zeros(len(real), 1))
        ...     ctx.minimize(g_loss, g_opt)
        ...     return {"d_loss": d_loss, "g_loss": g_loss}
        >>> trainer = Trainer({"G": G, "D": D}, [Step.custom(train_step, [d_opt, g_opt], name="gan")])
        >>> trainer.fit([(torch.randn(4, 3),)] * 3, epochs=1)
        >>> sorted(trainer.losses), trainer.updates
        (['gan/d_loss', 'gan/g_loss'], 3)
    """

    def __init__(self, runner: StepRunner, updates: int, count: int = 1) -> None:
        self._runner = runner
        self._count = count  # this rank's samples (weights its gradients under torchrun)
        self._updates = updates
        self.name = runner.step.name
        self.optimizers: tuple[torch.optim.Optimizer, ...] = runner.step.optimizers
        self.stepped = 0
        self.applied = 0  # steps that changed something (not dropped for a non-finite value)
        self.dropped = False
        self._losses: list[torch.Tensor] = []  # differentiated since the last step
        self._aux: list[torch.Tensor] = []

    def _chosen(self, optimizer: torch.optim.Optimizer | None) -> Sequence[torch.optim.Optimizer]:
        if optimizer is None:
            return self.optimizers
        if all(optimizer is not opt for opt in self.optimizers):
            raise ValueError(
                f"Step {self.name!r}: the optimizer passed to ctx is not one of this step's optimizers. "
                f"Received: an optimizer of type {type(optimizer).__name__}; the step has "
                f"{[type(o).__name__ for o in self.optimizers]}. Give it to Step.custom(..., [opts]) too."
            )
        return (optimizer,)

    def _params(self, chosen: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
        return [p for opt in chosen for p in self._runner.by_optimizer[id(opt)]]

    def zero_grad(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clear the gradients of ``optimizer``'s parameters (default: all the step's)."""
        self._runner.zero_grad(self._chosen(optimizer))

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Differentiate ``loss`` into ``optimizer``'s parameters only (default: all the step's)."""
        params = [p for p in self._params(self._chosen(optimizer)) if p.requires_grad]
        self._losses.append(loss.detach())
        if self._count == 0:  # no sample on this rank: it adds nothing to the ranks' sum
            return
        self._runner.backward(loss, params)
        if params and all(p.grad is None for p in params):
            raise ValueError(unreached_message(self.name))

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Step ``optimizer`` (default: all the step's), clipping first if the step clips.

        Under ``on_nonfinite="skip"``/``"stop"`` it first decides: a non-finite loss given to
        ``backward`` since the last step, or gradient, drops this step and the call's later ones.
        """
        chosen = self._chosen(optimizer)
        params = self._params(chosen)
        self.stepped += 1
        losses, self._losses = self._losses, []
        ranks = self._runner.ranks
        if ranks is not None:  # the gradients of the whole batch, on every rank
            losses = ranks.average(params, self._count, losses)
        if self.dropped or not self._runner.decide(losses, params, None, self._updates):
            self.dropped = True  # this step and the call's later ones step nothing
            self._runner.zero_grad(chosen)
            return
        self._runner.step_optimizers(chosen, params)
        self.applied += 1

    def minimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``zero_grad``, ``backward`` and ``step`` for one optimizer: one plain update."""
        self.zero_grad(optimizer)
        self.backward(loss, optimizer)
        self.step(optimizer)

    def aux_loss(self) -> torch.Tensor | float:
        """The sum of the ``add_loss`` values collected since the last call (0.0 if none)."""
        values, self._aux[:] = list(self._aux), []
        if not values:
            return 0.0
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total


class Guard:
    """Detects a custom update touching parameters (or gradients) outside its optimizers."""

    def __init__(self, outsiders: list[tuple[str, torch.Tensor]]) -> None:
        self.outsiders = outsiders
        self.before: list[tuple[int, int | None, int | None]] = []

    @staticmethod
    def _mark(p: torch.Tensor) -> tuple[int, int | None, int | None]:
        grad = p.grad
        return p._version, None if grad is None else id(grad), None if grad is None else grad._version

    def arm(self) -> None:
        self.before = [self._mark(p) for _, p in self.outsiders]

    def check(self, step: str) -> None:
        changed = []
        for (name, p), before in zip(self.outsiders, self.before):
            after = self._mark(p)
            if after[0] != before[0]:
                changed.append(f"{name} (weights)")
            elif after[1:] != before[1:]:
                changed.append(f"{name} (gradient)")
        if changed:
            shown = ", ".join(changed[:5]) + (f", and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise ValueError(
                f"Step {step!r}: the custom update changed parameters outside its optimizers: {shown}. "
                "Use ctx.backward/ctx.minimize (they write gradients only into the step's parameters) "
                "instead of loss.backward(), and pass every optimizer the function steps to Step.custom."
            )


def check_result(out: Any, step: str) -> dict[str, Any]:
    """What a custom update returned, as named values to log."""
    if out is None:
        return {}
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, dict):
        raise TypeError(
            f"Step {step!r}: a custom update must return None, a scalar tensor or a dict of them to log. "
            f"Received: a return value of type {type(out).__name__}. "
            "Return e.g. {'d_loss': d_loss, 'g_loss': g_loss}."
        )
    return out


def custom_update(
    update: Callable[[Any, UpdateContext], Any], outsiders: list[tuple[str, torch.Tensor]]
) -> Callable[[StepRunner, Sequence[Any], int], tuple[dict[str, torch.Tensor], bool]]:
    """The update function of ``Step.custom(update, ...)``, under the contract of
    :func:`trainflow.update.declarative_update`: ``update(batch, ctx)`` runs with an
    :class:`UpdateContext`, and the parameters ``outsiders`` (the models' others) are watched.
    """
    guard = Guard(outsiders)

    def run(runner: StepRunner, batches: Sequence[Any], updates: int) -> tuple[dict[str, torch.Tensor], bool]:
        name = runner.step.name
        count = 1 if runner.ranks is None else sample_count(batches[0], name)
        ctx = UpdateContext(runner, updates, count)
        guard.arm()
        with runner.precision.autocast():
            out, _ = collect_added(update, batches[0], ctx, into=ctx._aux)
        if ctx._aux:
            raise ValueError(
                f"Step {name!r}: modules called add_loss during this custom update, but the update never "
                "took those values. Add ctx.aux_loss() to the loss it differentiates."
            )
        if not ctx.stepped:
            raise ValueError(
                f"Step {name!r}: the custom update returned without stepping an optimizer, so the update "
                "changed nothing. Call ctx.minimize(loss, opt) or ctx.step(opt) in it."
            )
        guard.check(name)
        values = runner.values(parse_loss(check_result(out, name), name)) if out is not None else {}
        if runner.ranks is not None:
            values = runner.ranks.mean_values(values, count)
        if ctx.dropped:  # a ctx.step met a non-finite value and stepped nothing from there on
            runner.zero_grad()
        runner.finish(bool(ctx.applied), not ctx.dropped)
        if not ctx.dropped:  # under on_nonfinite="raise" it has stepped already: report only
            runner.decide([], (), values, updates)
        return values, not ctx.dropped

    return run
