"""One-shot search by gradient: DARTS (first and second order) and Gumbel-softmax, as flows.

A one-shot search trains the weights of a *supernet* and its architecture at once. Each
``LayerChoice`` of the space becomes a :class:`DartsLayerChoice`, which runs every candidate
and sums their outputs weighted by ``softmax(alpha)``; each ``InputChoice`` becomes a
:class:`DartsInputChoice`, which sums its inputs weighted the same way. ``alpha`` (one vector
per label: choices sharing a label share it) is the architecture; after the search the
strongest option of each label is the architecture found (:meth:`DartsFlow.export`).

In trainflow that is not a trainer of its own but a flow of two steps (Liu et al., 2019):

- the **architecture step** (``"arch"``): one update of the alphas on a batch of the
  ``"valid"`` stream, by Adam (``arch_lr``, ``arch_betas``, ``arch_weight_decay``, as in
  DARTS); it reads the ``"train"`` stream too, first, so that an epoch ends when "train" runs
  out, before an extra architecture update;
- the **weight step** (``"weights"`` in ``DartsTrainer``): the user's ``Step(loss, optimizer)`` on that same
  training batch (``batch="same"``).

So one update cycle is what a hand-written loop ``for x in train: v = next(valid_iter);
arch(v, x); weights(x)`` does, and callbacks, clipping, precision, checkpoints and exact resume
apply to a search as to any run. The alphas are parameters of the space (each replaced module
holds its label's ``alpha``), never in the weight optimizer, its isolation or its clipping.

**Second order** (``unrolled=True``, DARTS eq. 7-8): the architecture gradient is taken at
the weights after one *virtual* step of the weight optimizer on the training batch,
``w' = w - xi * grad_w L_train(w, alpha)``, as
``grad_alpha L_val(w', alpha) - xi * (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps)``
with ``w+- = w +- eps * grad_w' L_val(w', alpha)`` and ``eps = 0.01 / ||grad_w' L_val(w', alpha)||``.
The virtual step follows the weight optimizer when it is SGD (its learning rate, momentum
buffer, dampening, Nesterov and weight decay: ``xi`` is the learning rate, times the factor by
which this step's gradient enters the update); any other optimizer is followed as plain SGD with
its current learning rate. The virtual weights are passed to the loss with
``torch.func.functional_call``: the space's own weights (and their gradients) are never
changed by an architecture update. Parameter groups with different learning rates perturb each
weight in proportion to its own ``xi``.

**Gumbel** (``gumbel=(tau_start, tau_end)``, GDAS): in training, the mixing weights are
``gumbel_softmax(alpha, tau)``, drawn afresh at every forward from torch's global generator
(each module draws its own, shared labels included); ``tau`` goes linearly from
``tau_start`` in the first epoch to ``tau_end`` in the last. In evaluation mode the weights
are ``softmax(alpha)``.

**Warm-up** (``warmup_epochs=n``): in the first ``n`` epochs the architecture step updates
nothing (its Adam state stays empty); the "valid" stream still advances. Warm-up and the
temperature are per-epoch schedules of the architecture optimizer (group entries ``"frozen"``
and ``"tau"``), so they are in every checkpoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from trainflow.flow import Flow
from trainflow.losses import parse_loss, total_of
from trainflow.nas.space import InputChoice, LayerChoice, replace_input_choice, replace_layer_choice
from trainflow.schedules import Schedule
from trainflow.step import Step
from trainflow.trainer import Trainer

__all__ = ["DartsFlow", "DartsInputChoice", "DartsLayerChoice", "DartsTrainer", "darts_flow", "hypergradient"]

#: the architecture step's name (its optimizer, its logs "arch/loss", its checkpoint keys)
ARCH = "arch"
#: the name of each replaced module's architecture weights
ALPHA = "alpha"
_UNROLLED_FP16 = (
    "unrolled=True computes the architecture gradient itself (torch.autograd.grad, outside the float16 loss "
    "scaler), so it cannot run under precision='16-mixed'. Received: unrolled=True, precision='16-mixed'. Use "
    "precision='bf16-mixed' or '32', or search first order."
)


def _softmax_or_gumbel(module: nn.Module) -> torch.Tensor:
    tau = None if module._architecture is None else module._architecture.tau
    if tau is not None and module.training:
        return F.gumbel_softmax(module.alpha, tau=tau, dim=-1)
    return F.softmax(module.alpha, -1)


class DartsLayerChoice(nn.Module):
    """A ``LayerChoice`` as DARTS trains it: every candidate, summed with weights ``softmax(alpha)``.

    Seed 002's ``DartsLayerChoice``: the candidates are ``op_choices`` (a ``ModuleDict`` by
    option name), ``alpha`` holds one architecture weight per option (``1e-3 * randn`` unless
    given: choices sharing a label are given the same one).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import LayerChoice
        >>> from trainflow.nas.darts import DartsLayerChoice
        >>> mixed = DartsLayerChoice(LayerChoice({"id": nn.Identity(), "neg": nn.Identity()}, label="op"))
        >>> mixed.label, mixed.options, tuple(mixed.alpha.shape)
        ('op', ['id', 'neg'], (2,))
        >>> torch.allclose(mixed(torch.ones(3)), torch.ones(3))  # weights summing to 1 over two identities
        True
    """

    def __init__(self, choice: LayerChoice, alpha: nn.Parameter | None = None, architecture: Any = None) -> None:
        super().__init__()
        self.label = choice.label
        self.op_choices = nn.ModuleDict(choice.named_children())
        self.alpha = nn.Parameter(torch.randn(len(self.op_choices)) * 1e-3) if alpha is None else alpha
        self._architecture = architecture  # a plain object: not a submodule

    @property
    def options(self) -> list[str]:
        """The option names, in order (one per entry of ``alpha``)."""
        return list(self.op_choices)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        op_results = torch.stack([op(*args, **kwargs) for op in self.op_choices.values()])
        alpha_shape = [-1] + [1] * (len(op_results.size()) - 1)
        return torch.sum(op_results * _softmax_or_gumbel(self).view(*alpha_shape), 0)

    def extra_repr(self) -> str:
        return f"label={self.label!r}"


class DartsInputChoice(nn.Module):
    """An ``InputChoice`` as DARTS trains it: every input, summed with weights ``softmax(alpha)``.

    ``alpha`` holds one weight per candidate input. With ``reduction="sum"`` the weighted sum is
    scaled by ``n_chosen`` (the chosen inputs are summed, not averaged); with ``"mean"`` it is
    not. The export keeps the ``n_chosen`` inputs of largest weight, in input order.
    ``"concat"`` and ``"none"`` cannot be mixed by weights: a one-shot search refuses them.

    Example:
        >>> import torch
        >>> from trainflow.nas import InputChoice
        >>> from trainflow.nas.darts import DartsInputChoice
        >>> mixed = DartsInputChoice(InputChoice(2, label="skip"), torch.nn.Parameter(torch.zeros(2)))
        >>> mixed([torch.zeros(1), torch.ones(1)])  # equal weights
        tensor([0.5000], grad_fn=<SumBackward1>)
    """

    def __init__(self, choice: InputChoice, alpha: nn.Parameter | None = None, architecture: Any = None) -> None:
        super().__init__()
        if choice.reduction not in ("sum", "mean"):
            raise ValueError(
                f"A one-shot search mixes the inputs of InputChoice {choice.label!r} by a weighted sum, which "
                f"reduction={choice.reduction!r} cannot express. Received: reduction={choice.reduction!r}. "
                "Use reduction='sum' or 'mean', or search this space with an Experiment."
            )
        self.label = choice.label
        self.n_candidates, self.n_chosen, self.reduction = choice.n_candidates, choice.n_chosen, choice.reduction
        self.alpha = nn.Parameter(torch.randn(self.n_candidates) * 1e-3) if alpha is None else alpha
        self._architecture = architecture

    @property
    def options(self) -> list[int]:
        """The candidate inputs' indices (one per entry of ``alpha``)."""
        return list(range(self.n_candidates))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(inputs))
        alpha_shape = [-1] + [1] * (stacked.dim() - 1)
        mixed = torch.sum(stacked * _softmax_or_gumbel(self).view(*alpha_shape), 0)
        return mixed * self.n_chosen if self.reduction == "sum" and self.n_chosen > 1 else mixed

    def extra_repr(self) -> str:
        return f"label={self.label!r}, n_chosen={self.n_chosen}, reduction={self.reduction!r}"


_MIXED = (DartsLayerChoice, DartsInputChoice)


class _Architecture:
    """The alphas of a space, per label, and what they mean (the options of each label)."""

    def __init__(self, space: nn.Module, where: str) -> None:
        if not isinstance(space, nn.Module):
            fix = (
                " Build the model first (model = space()) and pass it, with a loss and optimizer made on it."
                if callable(space) else ""
            )
            raise TypeError(
                f"{where}: space must be the model (an nn.Module) holding the LayerChoice/InputChoice modules. "
                f"Received: space={space!r} of type {type(space).__name__}.{fix}"
            )
        self.space = space
        self.alphas: dict[str, nn.Parameter] = {}
        self.modules: dict[str, list[nn.Module]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        for module in space.modules():  # a space searched before keeps its alphas
            if isinstance(module, _MIXED):
                self._add(module.label, module, module.alpha)
        replace_layer_choice(space, lambda choice: self._mixed(DartsLayerChoice, choice, len(choice)))
        replace_input_choice(space, lambda choice: self._mixed(DartsInputChoice, choice, choice.n_candidates))
        if not self.alphas:
            raise ValueError(
                f"{where}: the space has no LayerChoice or InputChoice, so there is no architecture to search. "
                f"Received: space of type {type(space).__name__}. Build it with LayerChoice(...) / InputChoice(...)."
            )
        ids = {id(p) for p in self.alphas.values()}
        self.weights = [(n, p) for n, p in space.named_parameters() if id(p) not in ids]

    def _add(self, label: str, module: nn.Module, alpha: nn.Parameter) -> None:
        if label in self.alphas and self.alphas[label] is not alpha:
            raise ValueError(
                f"The space has two architectures for label {label!r} (searched by two one-shot trainers?). "
                f"Received: label={label!r} twice. Give different decisions different labels."
            )
        self.alphas[label] = alpha
        self.modules.setdefault(label, []).append(module)
        module._architecture = self

    def _mixed(self, cls: type, choice: Any, size: int) -> nn.Module:
        alpha = self.alphas.get(choice.label)
        if alpha is not None and len(alpha) != size:
            raise ValueError(
                f"Choices sharing label {choice.label!r} must offer the same options: one has {len(alpha)}, "
                f"another {size}. Received: label={choice.label!r}. Give different decisions different labels."
            )
        module = cls(choice, alpha, self)
        self._add(choice.label, module, module.alpha)
        return module

    @property
    def tau(self) -> float | None:
        """The Gumbel temperature of the current epoch (None: plain softmax)."""
        return None if self.optimizer is None else self.optimizer.param_groups[0].get("tau")

    def probs(self) -> dict[str, dict[Any, float]]:
        with torch.no_grad():
            return {
                label: dict(zip(self.modules[label][0].options, F.softmax(alpha.detach(), -1).tolist()))
                for label, alpha in self.alphas.items()
            }

    def export(self) -> dict[str, Any]:
        arch: dict[str, Any] = {}
        for label, alpha in self.alphas.items():
            module = self.modules[label][0]
            if isinstance(module, DartsInputChoice):
                top = torch.topk(alpha.detach(), module.n_chosen).indices.tolist()
                arch[label] = sorted(top)
            else:
                arch[label] = module.options[int(torch.argmax(alpha.detach()))]
        return arch


def _scalar(out: Any, step: str) -> torch.Tensor:
    """What a loss function returned (a tensor, an Average, a dict of them) as one scalar."""
    return total_of(parse_loss(out, step))


def _with_aux(loss: torch.Tensor, ctx: Any) -> torch.Tensor:
    aux = ctx.aux_loss()
    return loss if isinstance(aux, float) and aux == 0.0 else loss + aux


class _Caller(nn.Module):
    """Calls ``fn(batch)`` with the space as a submodule, so functional_call can swap its weights."""

    def __init__(self, space: nn.Module, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.space = space
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(batch)


def _virtual_step(
    optimizer: torch.optim.Optimizer, weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[float]]:
    """The weights after one step of ``optimizer`` on ``grads``, without stepping it; and each
    weight's ``xi``: how much its gradient moves it (d w' / d g = -xi).

    SGD is followed exactly (learning rate, weight decay, momentum buffer, dampening, Nesterov,
    maximize); any other optimizer as plain SGD with its learning rate.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = torch.optim.SGD([w], lr=0.1, weight_decay=0.5)
        >>> new, xi = _virtual_step(opt, [w], [torch.tensor([2.0])])
        >>> new[0].item(), xi, w.item()  # 1 - 0.1 * (2 + 0.5 * 1); w itself unchanged
        (0.75, [0.1], 1.0)
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    sgd = isinstance(optimizer, torch.optim.SGD)
    new, xis = [], []
    with torch.no_grad():
        for p, grad in zip(weights, grads):
            group = groups[id(p)]
            lr = float(group["lr"])
            if not sgd:
                new.append(p - lr * grad)
                xis.append(lr)
                continue
            factor = -1.0 if group.get("maximize", False) else 1.0
            d = -grad if group.get("maximize", False) else grad
            if group["weight_decay"]:
                d = d + group["weight_decay"] * p
            momentum = group["momentum"]
            if momentum:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is None:
                    buf, grows = d, 1.0
                else:
                    buf, grows = buf * momentum + (1 - group["dampening"]) * d, 1 - group["dampening"]
                if group["nesterov"]:
                    d, factor = d + momentum * buf, factor * (1 + momentum * grows)
                else:
                    d, factor = buf, factor * grows
            new.append(p - lr * d)
            xis.append(lr * factor)
    return new, xis


def hypergradient(
    train_loss: Callable[[], torch.Tensor],
    valid_loss: Callable[[], torch.Tensor],
    space: nn.Module,
    weights: Sequence[tuple[str, torch.Tensor]],
    alphas: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DARTS' second-order architecture gradient (eq. 7-8) and the validation loss at ``w'``.

    ``train_loss()`` / ``valid_loss()`` compute the losses with the parameters of ``space`` as
    they are when called; ``weights`` are the (name, parameter) pairs of ``space`` that
    ``optimizer`` trains. The weights at ``w'`` and ``w+-`` are substituted by
    ``torch.func.functional_call``: ``space``'s parameters, and their ``.grad``, are untouched.

    Example:
        >>> import torch
        >>> space = torch.nn.Linear(1, 1, bias=False)
        >>> alpha = torch.nn.Parameter(torch.tensor([0.5]))
        >>> opt = torch.optim.SGD(space.parameters(), lr=0.1)
        >>> loss = lambda: (space(torch.ones(1, 1)) * alpha - 1).pow(2).mean()
        >>> grads, value = hypergradient(loss, loss, space, list(space.named_parameters()), [alpha], opt)
        >>> len(grads), value.ndim
        (1, 0)
    """
    params = [p for _, p in weights]
    names = [n for n, _ in weights]

    def at(values: Sequence[torch.Tensor], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return functional_call(_Caller(space, lambda _: fn()), {f"space.{n}": v for n, v in zip(names, values)}, (None,))

    def grad(loss: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        found = torch.autograd.grad(loss, list(inputs), allow_unused=True)
        return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, found)]

    g_train = grad(train_loss(), params)
    virtual, xis = _virtual_step(optimizer, params, g_train)
    virtual = [v.detach().requires_grad_(True) for v in virtual]
    loss_valid = at(virtual, valid_loss)
    found = grad(loss_valid, [*alphas, *virtual])
    d_alpha, d_weights = found[: len(alphas)], found[len(alphas):]
    xi_max = max((abs(x) for x in xis), default=0.0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in d_weights]))
    if xi_max == 0.0 or not norm > 0:  # nothing moves w: the second-order term vanishes
        return [d.detach() for d in d_alpha], loss_valid.detach()
    eps = 0.01 / norm
    with torch.no_grad():
        shifts = [eps * (x / xi_max) * d for x, d in zip(xis, d_weights)]
        plus = [p + s for p, s in zip(params, shifts)]
        minus = [p - s for p, s in zip(params, shifts)]
    g_plus = grad(at(plus, train_loss), alphas)
    g_minus = grad(at(minus, train_loss), alphas)
    with torch.no_grad():
        hyper = [da - xi_max * (gp - gm) / (2 * eps) for da, gp, gm in zip(d_alpha, g_plus, g_minus)]
    return hyper, loss_valid.detach()


class _Anneal:
    """The Gumbel temperature of epoch ``e``: linear from ``start`` (first epoch) to ``end`` (last)."""

    __name__ = "gumbel_anneal"  # how describe() names the schedule

    def __init__(self, start: float, end: float, epochs: int | None) -> None:
        self.start, self.end, self.epochs = start, end, epochs

    def __call__(self, epoch: int) -> float:
        if not self.epochs or self.epochs <= 1:
            return self.start
        return self.start + (self.end - self.start) * min(epoch, self.epochs - 1) / (self.epochs - 1)


def _check_gumbel(gumbel: Any, where: str) -> tuple[float, float] | None:
    if gumbel is None:
        return None
    ok = (
        isinstance(gumbel, (tuple, list)) and len(gumbel) == 2
        and all(not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in gumbel)
    )
    if not ok:
        raise ValueError(
            f"{where}: gumbel must be None or a pair (tau_start, tau_end) of positive temperatures. "
            f"Received: gumbel={gumbel!r}. Pass e.g. gumbel=(10.0, 0.1)."
        )
    return float(gumbel[0]), float(gumbel[1])


def _check_hyper(where: str, arch_lr: Any, arch_betas: Any, arch_weight_decay: Any, warmup_epochs: Any) -> None:
    if isinstance(arch_lr, bool) or not isinstance(arch_lr, (int, float)) or not arch_lr > 0:
        raise ValueError(f"{where}: arch_lr must be a positive number. Received: arch_lr={arch_lr!r}.")
    if not (isinstance(arch_betas, (tuple, list)) and len(arch_betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in arch_betas)):
        raise ValueError(
            f"{where}: arch_betas must be a pair of numbers in [0, 1) (Adam's betas). "
            f"Received: arch_betas={arch_betas!r}. DARTS uses (0.5, 0.999)."
        )
    if isinstance(arch_weight_decay, bool) or not isinstance(arch_weight_decay, (int, float)) or arch_weight_decay < 0:
        raise ValueError(
            f"{where}: arch_weight_decay must be a number >= 0. Received: arch_weight_decay={arch_weight_decay!r}."
        )
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(
            f"{where}: warmup_epochs must be an int >= 0 (epochs without architecture updates). "
            f"Received: warmup_epochs={warmup_epochs!r}."
        )


class DartsFlow(Flow):
    """The flow :func:`darts_flow` returns: the user's steps after an architecture step.

    A :class:`~trainflow.Flow` (``Trainer`` takes it as its steps) that also reads the
    architecture: :meth:`export`, :meth:`export_probs`, :meth:`arch_parameters`;
    ``arch_optimizer`` is the architecture step's Adam and ``arch_step`` that step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow import Step
        >>> from trainflow.nas import InputChoice, darts_flow
        >>> class Skip(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc, self.pick = nn.Linear(2, 2), InputChoice(2, label="skip")
        ...     def forward(self, x):
        ...         return self.pick([x, self.fc(x)])
        >>> model = Skip()
        >>> flow = darts_flow(Step(lambda b: model(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1)), model)
        >>> with torch.no_grad():
        ...     _ = flow.arch_parameters()["skip"].copy_(torch.tensor([0.0, 1.0]))
        >>> flow.export(), {i: round(p, 3) for i, p in flow.export_probs()["skip"].items()}
        ({'skip': [1]}, {0: 0.269, 1: 0.731})
        >>> type(flow.arch_optimizer).__name__, flow.arch_step.name
        ('Adam', 'arch')
    """

    def __init__(
        self, steps: Sequence[Step], architecture: _Architecture, anneal: _Anneal | None, restart: str = "never"
    ) -> None:
        super().__init__(list(steps), restart=restart)
        self.architecture = architecture
        self.arch_step = self.steps[0]
        self.arch_optimizer = self.arch_step.optimizers[0]
        self._anneal = anneal

    def export(self) -> dict[str, Any]:
        """The architecture found: {label: option} (a LayerChoice's option of largest weight; an
        InputChoice's ``n_chosen`` inputs of largest weight, in input order), for ``fixed_arch``."""
        return self.architecture.export()

    def export_probs(self) -> dict[str, dict[Any, float]]:
        """{label: {option: softmax(alpha) probability}} (an InputChoice's options are its input indices)."""
        return self.architecture.probs()

    def arch_parameters(self) -> dict[str, nn.Parameter]:
        """{label: alpha}: the architecture weights, one per label."""
        return dict(self.architecture.alphas)


def darts_flow(
    steps: Step | Sequence[Step],
    space: nn.Module,
    *,
    loss: Callable[[Any], Any] | None = None,
    arch_lr: float = 3e-4,
    arch_betas: tuple[float, float] = (0.5, 0.999),
    arch_weight_decay: float = 1e-3,
    unrolled: bool = False,
    gumbel: tuple[float, float] | None = None,
    epochs: int | None = None,
    warmup_epochs: int = 0,
    valid: str = "valid",
) -> DartsFlow:
    """The flow ``steps`` with an architecture step before it: a one-shot search of ``space`` in any flow.

    Replaces the choices of ``space`` in place (:class:`DartsLayerChoice`,
    :class:`DartsInputChoice`, one ``alpha`` per label) and returns a :class:`DartsFlow`:
    ``[arch step, *steps]``. The architecture step reads the "train" stream and the ``valid``
    stream; the first of ``steps`` then reuses its training batch (``batch="same"``), so it
    must draw one batch of "train" per update (no ``accumulate``, ``microbatch_size`` or
    ``repeat``). The other steps are kept as they are: a GAN whose generator is the space is
    searched by ``darts_flow([d_step, g_step], generator)``.

    Args:
        steps: the user's flow (a Step, a list of Steps, or a Flow: its ``restart`` is kept).
        space: the model holding the LayerChoice / InputChoice modules (one model of the flow).
        loss: the architecture's loss on a ``valid`` batch (default: the loss of the first step
            that trains weights of ``space``); with ``unrolled``, also its training loss.
        arch_lr, arch_betas, arch_weight_decay: the architecture optimizer (Adam).
        unrolled: second order (see the module's notes): the virtual step follows the optimizer
            of the first step that trains weights of ``space``, which must train only them.
        gumbel: ``(tau_start, tau_end)``: Gumbel-softmax mixing, annealed linearly over ``epochs``.
        epochs: the epochs over which ``gumbel`` anneals (required with it).
        warmup_epochs: epochs at the start without architecture updates.
        valid: the name of the validation stream.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow import Step, Trainer
        >>> from trainflow.nas import LayerChoice, darts_flow
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 4), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def mse(batch):
        ...     return model(batch).pow(2).mean()
        >>> flow = darts_flow(Step(mse, opt), model, arch_lr=0.1)
        >>> [step.name for step in flow.steps], flow.arch_step.streams
        (['arch', 'mse'], ('train', 'valid'))
        >>> trainer = Trainer(model, flow)
        >>> trainer.fit({"train": [torch.randn(8, 2)] * 4, "valid": [torch.randn(8, 2)] * 2}, epochs=1)
        >>> trainer.updates, sorted(flow.export_probs()["act"])
        (8, ['relu', 'tanh'])
    """
    where = "darts_flow"
    restart = steps.restart if isinstance(steps, Flow) else "never"
    if isinstance(steps, Flow):
        steps = list(steps.steps)
    steps = [steps] if isinstance(steps, Step) else list(steps) if isinstance(steps, (list, tuple)) else steps
    if not isinstance(steps, list) or not steps or not all(isinstance(s, Step) for s in steps):
        raise TypeError(
            f"{where}: steps must be a Step, a non-empty list of Steps or a Flow. Received: steps={steps!r}. "
            "Pass the flow that trains the weights, e.g. [Step(loss, optimizer)]."
        )
    _check_hyper(where, arch_lr, arch_betas, arch_weight_decay, warmup_epochs)
    taus = _check_gumbel(gumbel, where)
    if taus is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(
            f"{where}: gumbel anneals the temperature over the search's epochs, so it needs epochs=. "
            f"Received: gumbel={gumbel!r}, epochs={epochs!r}. Pass the number of epochs of the fit, e.g. epochs=20."
        )
    if not isinstance(unrolled, bool):
        raise TypeError(f"{where}: unrolled must be True or False. Received: unrolled={unrolled!r}.")
    if not isinstance(valid, str) or not valid or valid == "train":
        raise ValueError(
            f"{where}: valid must be the name of the validation stream, not 'train'. Received: valid={valid!r}."
        )
    if loss is not None and not callable(loss):
        raise TypeError(f"{where}: loss must be a function of the batch or None. Received: loss={loss!r}.")
    first = steps[0]
    if first.streams != ("train",) or first.batch != "next" or first.accumulate != 1 or \
            first.microbatch_size is not None or first.repeat != 1:
        raise ValueError(
            f"{where}: the first step reuses the architecture step's training batch, so it must take one batch of "
            f"'train' per update. Received: step {first.name!r} with data={first.data!r}, batch={first.batch!r}, "
            f"accumulate={first.accumulate}, microbatch_size={first.microbatch_size}, repeat={first.repeat}. "
            "Put a plain Step(loss, optimizer) first."
        )
    architecture = _Architecture(space, where)
    alphas = list(architecture.alphas.values())
    for step in steps:
        for opt in step.optimizers:
            held = [label for label, a in architecture.alphas.items()
                    if any(p is a for g in opt.param_groups for p in g["params"])]
            if held:
                raise ValueError(
                    f"{where}: the optimizer of step {step.name!r} holds the architecture weights of {held!r}; "
                    f"they are trained by the architecture step only. Received: an optimizer with {ALPHA!r} "
                    "parameters. Build it over the other parameters, e.g. "
                    "[p for n, p in space.named_parameters() if not n.endswith('alpha')]."
                )
    weight_ids = {id(p) for _, p in architecture.weights}
    owner = next((s for s in steps if any(id(p) in weight_ids for o in s.optimizers for g in o.param_groups
                                          for p in g["params"])), None)
    if owner is None:
        raise ValueError(
            f"{where}: no step trains the weights of the space, so its architecture cannot be searched. "
            f"Received: steps {[s.name for s in steps]}. Build a step's optimizer over the space's parameters."
        )
    arch_loss = owner.loss if loss is None else loss
    if arch_loss is None:
        raise ValueError(
            f"{where}: the step that trains the space, {owner.name!r}, is a custom step with no loss to search "
            "the architecture by. Received: loss=None. Pass loss=(a function of a batch)."
        )
    weights = [(n, p) for n, p in architecture.weights if p.requires_grad]
    if unrolled:
        if len(owner.optimizers) != 1:
            raise ValueError(
                f"{where}: unrolled=True takes its virtual step with the optimizer of step {owner.name!r}, which "
                f"has {len(owner.optimizers)}. Received: unrolled=True. Give that step one optimizer."
            )
        w_opt = owner.optimizers[0]
        trained = [p for g in w_opt.param_groups for p in g["params"]]
        outside = [i for i, p in enumerate(trained) if id(p) not in weight_ids]
        if outside:
            raise ValueError(
                f"{where}: unrolled=True evaluates the virtual weights inside the space, but the optimizer of step "
                f"{owner.name!r} also trains {len(outside)} parameter(s) outside it. Received: unrolled=True. "
                "Put those parameters in the space, or search first order."
            )
        trained_ids = {id(p) for p in trained}
        weights = [(n, p) for n, p in weights if id(p) in trained_ids]
    group: dict[str, Any] = {"params": alphas, "frozen": warmup_epochs > 0, "tau": None}
    arch_opt = torch.optim.Adam([group], lr=arch_lr, betas=tuple(arch_betas), weight_decay=arch_weight_decay)
    architecture.optimizer = arch_opt
    anneal = None if taus is None else _Anneal(*taus, epochs)

    def warmup(epoch: int) -> bool:
        return epoch < warmup_epochs

    schedules = [Schedule(warmup, interval="epoch", key="frozen")]
    if anneal is not None:
        schedules.append(Schedule(anneal, interval="epoch", key="tau"))
    name = ARCH

    def arch(batch: dict[str, Any], ctx: Any) -> torch.Tensor | None:
        if arch_opt.param_groups[0]["frozen"]:  # warm-up: nothing to update, nothing to log
            ctx.zero_grad(arch_opt)
            ctx.step(arch_opt)
            return None
        if unrolled and ctx._runner.precision.scaler is not None:
            raise ValueError(_UNROLLED_FP16)
        if not unrolled:
            value = _with_aux(_scalar(arch_loss(batch[valid]), name), ctx)
            ctx.minimize(value, arch_opt)
            return value
        hyper, value = hypergradient(
            lambda: _with_aux(_scalar(arch_loss(batch["train"]), name), ctx),
            lambda: _with_aux(_scalar(arch_loss(batch[valid]), name), ctx),
            space, weights, alphas, w_opt,
        )
        ctx.zero_grad(arch_opt)
        for alpha, g in zip(alphas, hyper):
            alpha.grad = g
        ctx.step(arch_opt)
        return value

    arch_step = Step.custom(arch, arch_opt, name=name, data=("train", valid), scheduler=schedules)
    same = copy.copy(first)
    same.batch = "same"
    flow = DartsFlow([arch_step, same, *steps[1:]], architecture, anneal, restart)
    return flow


class DartsTrainer:
    """DARTS (Liu et al., 2019) on trainflow's ``Trainer``: a search that is a flow of two steps.

    ``DartsTrainer(space, loss, optimizer)`` is :func:`darts_flow` with one weight step,
    ``Step(loss, optimizer, name="weights")``, run by a :class:`~trainflow.Trainer`
    (``trainer``): callbacks, logs, checkpoints and exact resume are the trainer's.

    Args:
        space: the model holding the LayerChoice / InputChoice modules (replaced in place);
            ``loss`` and ``optimizer`` are made on it.
        loss: ``loss(batch)`` of a training or validation batch (as a ``Step``'s loss).
        optimizer: the weights' optimizer (it must not hold the alphas: they are made here).
        arch_lr, arch_betas, arch_weight_decay: Adam for the alphas (DARTS' values by default).
        unrolled: second order (DARTS eq. 7-8), see :mod:`trainflow.nas.darts`.
        gumbel: ``(tau_start, tau_end)``: Gumbel-softmax mixing annealed linearly over ``fit``'s epochs.
        clip_grad_norm: clip the weights' gradient norm (never the alphas').
        warmup_epochs: epochs at the start in which only the weights are trained.
        callbacks, out_dir, **trainer_options: passed to ``Trainer`` (``device``, ``precision``, ...).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from trainflow.nas import DartsTrainer, LayerChoice
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(2, 4), LayerChoice({"relu": nn.ReLU(), "tanh": nn.Tanh()}, label="act"))
        >>> def mse(batch):
        ...     x, y = batch
        ...     return (model(x).sum(1) - y).pow(2).mean()
        >>> search = DartsTrainer(model, mse, torch.optim.SGD(model.parameters(), lr=0.1), arch_lr=0.1)
        >>> data = [(torch.randn(8, 2), torch.randn(8))] * 3
        >>> search.fit(data, data, epochs=2)
        >>> search.trainer.updates, list(search.export()), list(search.arch_parameters())
        (12, ['act'], ['act'])
    """

    def __init__(
        self,
        space: nn.Module,
        loss: Callable[[Any], Any],
        optimizer: torch.optim.Optimizer,
        *,
        arch_lr: float = 3e-4,
        arch_betas: tuple[float, float] = (0.5, 0.999),
        arch_weight_decay: float = 1e-3,
        unrolled: bool = False,
        gumbel: tuple[float, float] | None = None,
        clip_grad_norm: float | None = None,
        warmup_epochs: int = 0,
        callbacks: Iterable[Any] = (),
        out_dir: Any = None,
        **trainer_options: Any,
    ) -> None:
        if not callable(loss):
            raise TypeError(
                f"DartsTrainer: loss must be a function of the batch. Received: loss={loss!r}. "
                "Pass e.g. `def loss(batch): x, y = batch; return F.cross_entropy(model(x), y)`."
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "DartsTrainer: optimizer must be a torch.optim.Optimizer over the space's weights. "
                f"Received: optimizer={optimizer!r}. Pass e.g. torch.optim.SGD(model.parameters(), lr=0.025)."
            )
        if unrolled is True and trainer_options.get("precision") == "16-mixed":
            raise ValueError(_UNROLLED_FP16)
        step = Step(loss, optimizer, name="weights", clip_grad_norm=clip_grad_norm)
        taus = _check_gumbel(gumbel, "DartsTrainer")
        self.flow = darts_flow(
            step, space, arch_lr=arch_lr, arch_betas=arch_betas, arch_weight_decay=arch_weight_decay,
            unrolled=unrolled, gumbel=taus, epochs=1 if taus else None, warmup_epochs=warmup_epochs,
        )
        self.space = space
        self.trainer = Trainer(space, self.flow, callbacks=callbacks, out_dir=out_dir, **trainer_options)

    def fit(self, train_data: Any, valid_data: Any = None, *, epochs: int, resume: Any = None, **fit_options: Any) -> None:
        """Search for ``epochs`` epochs: one epoch is one pass over ``train_data``; ``valid_data`` cycles.

        ``epochs`` is a total for the search (as ``Trainer.fit``'s); ``resume="latest"`` continues
        from the newest checkpoint in ``out_dir``. Other keywords go to ``Trainer.fit``
        (``val_data``, ``val_step``, ``max_updates``).
        """
        if valid_data is None:
            raise ValueError(
                "DartsTrainer.fit: valid_data is required: the architecture is trained on it, the weights on "
                "train_data. Received: valid_data=None. Split off part of the training data, e.g. "
                "fit(train_loader, valid_loader, epochs=...)."
            )
        if self.flow._anneal is not None:
            self.flow._anneal.epochs = epochs
            self.flow.arch_optimizer.param_groups[0]["tau"] = self.flow._anneal(self.trainer.epoch)
        self.trainer.fit({"train": train_data, "valid": valid_data}, epochs=epochs, resume=resume, **fit_options)

    def export(self) -> dict[str, Any]:
        """The architecture found, {label: option}, for ``fixed_arch`` (see :meth:`DartsFlow.export`)."""
        return self.flow.export()

    def export_probs(self) -> dict[str, dict[Any, float]]:
        """{label: {option: probability}} (see :meth:`DartsFlow.export_probs`)."""
        return self.flow.export_probs()

    def arch_parameters(self) -> dict[str, nn.Parameter]:
        """{label: alpha}: the architecture weights, one per label."""
        return self.flow.arch_parameters()

    def state_dict(self) -> dict[str, Any]:
        """The search's state: the trainer's (weights and alphas, both optimizers, streams, RNG, schedules)."""
        return self.trainer.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`; the next ``fit`` continues exactly there."""
        self.trainer.load_state_dict(state)
