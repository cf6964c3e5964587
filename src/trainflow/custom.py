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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainflow.losses import no_grad_message, unreached_message

if TYPE_CHECKING:
    from trainflow.precision import Precision
    from trainflow.step import Step

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

    def __init__(
        self,
        step: Step,
        precision: Precision,
        params: dict[int, list[torch.Tensor]],
        finite: Callable[[list[torch.Tensor], Iterable[torch.Tensor]], bool] | None = None,
    ) -> None:
        self._step = step
        self.name = step.name
        self.optimizers: tuple[torch.optim.Optimizer, ...] = step.optimizers
        self._precision = precision
        self._params = params  # id(optimizer) -> its parameters
        self.stepped = 0
        self.applied = 0  # steps that changed something (not dropped for a non-finite value)
        self.dropped = False
        self._finite = finite  # set under on_nonfinite="skip"/"stop": checked before each step
        self._losses: list[torch.Tensor] = []  # differentiated since the last step
        self._aux: list[torch.Tensor] = []
        self.aux_taken = True

    def _chosen(self, optimizer: torch.optim.Optimizer | None) -> Sequence[torch.optim.Optimizer]:
        if optimizer is None:
            return self.optimizers
        if all(optimizer is not opt for opt in self.optimizers):
            raise ValueError(
                f"Step {self._step.name!r}: the optimizer passed to ctx is not one of this step's optimizers. "
                f"Received: an optimizer of type {type(optimizer).__name__}; the step has "
                f"{[type(o).__name__ for o in self.optimizers]}. Give it to Step.custom(..., [opts]) too."
            )
        return (optimizer,)

    def zero_grad(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Clear the gradients of ``optimizer``'s parameters (default: all the step's)."""
        for opt in self._chosen(optimizer):
            opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Differentiate ``loss`` into ``optimizer``'s parameters only (default: all the step's)."""
        params = [
            p for opt in self._chosen(optimizer) for p in self._params[id(opt)] if p.requires_grad
        ]
        if not loss.requires_grad:
            raise ValueError(no_grad_message(self.name))
        self._precision.scale(loss).backward(inputs=params)
        if params and all(p.grad is None for p in params):
            raise ValueError(unreached_message(self.name))
        if self._finite is not None:
            self._losses.append(loss.detach())

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Step ``optimizer`` (default: all the step's), clipping first if the step clips."""
        chosen = self._chosen(optimizer)
        self.stepped += 1
        if self._finite is not None:
            params = [p for opt in chosen for p in self._params[id(opt)]]
            losses, self._losses = self._losses, []
            if self.dropped or not self._finite(losses, params):
                self.dropped = True  # this step and the call's later ones step nothing
                for p in params:
                    p.grad = None
                return
        if self._step.clip_grad_norm is not None:
            for opt in chosen:
                self._precision.unscale(opt)
            params = [p for opt in chosen for p in self._params[id(opt)]]
            torch.nn.utils.clip_grad_norm_(params, self._step.clip_grad_norm)
        for opt in chosen:
            self._precision.step(opt)
        self.applied += 1

    def minimize(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """``zero_grad``, ``backward`` and ``step`` for one optimizer: one plain update."""
        self.zero_grad(optimizer)
        self.backward(loss, optimizer)
        self.step(optimizer)

    def aux_loss(self) -> torch.Tensor | float:
        """The sum of the ``add_loss`` values collected since the last call (0.0 if none)."""
        values, self._aux[:] = list(self._aux), []
        self.aux_taken = True
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
