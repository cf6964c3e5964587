"""Sharded training under ``torchrun``: ``Trainer(..., distributed="fsdp")``.

Each model in the trainer's ``models`` is sharded in place with FSDP2's
``torch.distributed.fsdp.fully_shard``: every rank holds a slice of each parameter (a
``DTensor``), gathers the whole parameter for a forward or backward and frees it afterwards, so
a loss function that calls the user's module keeps working. Before sharding, every rank takes
rank 0's parameters and buffers (one broadcast), so every rank starts from rank 0's weights.

**Optimizers** built before the ``Trainer`` (the usual order) hold the unsharded parameters:
the trainer rebinds them, replacing each parameter in every optimizer's ``param_groups`` by its
sharded one, which keeps groups chosen by name (:func:`trainflow.param_groups`) and their
hyperparameters. The optimizers must not have stepped yet (their state would belong to the
old parameters): that is refused with an error saying to build the Trainer first.

**Gradients** are computed as in replicate mode, in *sum form* (a mean loss times the rank's
sample count, an ``Average``'s total), but the ranks' sum travels in FSDP2's own reduce-scatter
(set to a plain sum, not an average: ``set_gradient_divide_factor(1.0)`` with
``set_force_sum_reduction_for_comms(True)``), each rank receiving the sum of
its slice; gradient sync is off for every chunk of a window but the last
(``set_requires_gradient_sync``), so a window costs one reduce-scatter per model. Each
normaliser's count and the logged loss sums travel in one small all-reduce, and the gradients
are divided by the *global* counts: the gradient of one process on the combined batch, for
uneven windows and ranks left without a sample in the last window too. Every rank runs every
chunk (FSDP2's all-gathers are collectives): a rank's empty share of a batch is run as a batch
of zero rows, which adds nothing, and micro-batches are padded so that every rank runs the
same number of chunks.

**Isolation**: FSDP2's ``backward(inputs=...)`` leaves the sharded parameters' gradients None,
so a step differentiates with a plain ``backward`` while the models' parameters it does not own
have ``requires_grad`` switched off (restored after the window): ``D x3 / G x1`` and a step that
owns part of a model leave every other gradient untouched, as in one process.

**Clipping** is on the global norm (``clip_grad_norm_`` over the ``DTensor`` gradients: the
norm of every rank's slices), and the non-finite decision is taken by every rank together.

**Checkpoints** go through ``torch.distributed.checkpoint`` (DCP): see
:func:`trainflow.checkpoint.save_sharded`.

**Refused** (a ``ValueError`` when the trainer is built, or at the first window for a loss):
custom steps (``Step.custom``: its ``ctx.backward`` differentiates into chosen parameters),
callbacks that call a model on rank 0 only (``SampleGrid``: a sharded forward is a collective),
tensors trained outside the models, a parameter held by two models (each model is sharded on its own), ``compile=True``, ``precision="16-mixed"`` (its loss scaler
would unscale sharded gradients rank by rank), and a window with several normalisers (a mean
and an ``Average``), whose separate gradient buffers FSDP2 does not reduce.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainflow.distributed import Replicate, put_sums, stack_sums
from trainflow.state import Optimizers

__all__ = ["Sharded", "ShardedModels", "ShardedOptimizers", "is_sharded_state"]


def _refuse(what: str, received: str, fix: str) -> ValueError:
    return ValueError(
        f"Trainer: distributed='fsdp' cannot train {what}. Received: {received}. {fix}"
    )


class Sharded(Replicate):
    """The collectives of fsdp mode: the models sharded with ``fully_shard``, gradients summed by
    FSDP2's reduce-scatter, counts and loss sums all-reduced, decisions taken together.

    Example (in one process, a group of one):
        >>> import torch, torch.distributed as dist
        >>> from trainflow import Step
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ranks = Sharded(torch.device("cpu"))
        >>> ranks.shard_models({"model": model}, [Step(lambda b: model(b).sum(), opt)])
        >>> type(model).__name__, type(opt.param_groups[0]["params"][0]).__name__
        ('FSDPLinear', 'DTensor')
        >>> dist.destroy_process_group()
    """

    shards = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.models: list[Any] = []  # the sharded models (FSDPModule)
        self.named: list[tuple[str, torch.Tensor]] = []  # their sharded parameters
        #: the device mesh the parameters are sharded over (None before sharding, or with no parameters):
        #: a sharded checkpoint is read on it, each rank reading its slices only
        self.mesh: Any = None

    # ------------------------------------------------------------------ sharding

    def check(self, steps: Sequence[Any], precision: str, compile: bool) -> None:
        """What fsdp mode refuses, named, before anything is sharded."""
        for step in steps:
            if step.update is not None:
                raise _refuse(
                    f"the custom step {step.name!r}",
                    f"Step.custom(...) named {step.name!r}",
                    "Its ctx.backward differentiates into chosen parameters, which FSDP2 leaves without "
                    "gradients. Write it as Step(loss, optimizer) steps, or use distributed='replicate'.",
                )
        if compile:
            raise _refuse("compiled models", "compile=True",
                          "Pass compile=False, or use distributed='replicate'.")
        if precision == "16-mixed":
            raise _refuse(
                "under float16 loss scaling", "precision='16-mixed'",
                "Its loss scaler would unscale and check sharded gradients rank by rank; use "
                "precision='bf16-mixed' (no loss scaling) or '32', or distributed='replicate'.",
            )

    def check_callbacks(self, callbacks: Sequence[Any], models: Mapping[str, nn.Module]) -> None:
        """A callback that runs on rank 0 only (``rank_zero_only``) must not call a sharded model:
        its forward gathers the parameters from every rank, which would wait for the others forever."""
        for cb in callbacks:
            if not getattr(cb, "rank_zero_only", False):
                continue
            for attr, value in vars(cb).items():
                if not isinstance(value, nn.Module):
                    continue
                for name, model in models.items():
                    if any(value is sub for sub in model.modules()):
                        raise ValueError(
                            f"Trainer: distributed='fsdp' cannot run the callback {type(cb).__name__}, which calls "
                            f"model {name!r} (its `{attr}`) on rank 0 only (rank_zero_only), while a sharded "
                            "model's forward is a collective of every rank. Received: "
                            f"callbacks=[{type(cb).__name__}(...)]. Use distributed='replicate', or call the model "
                            "in a callback of your own that runs on every rank and writes under "
                            "`if trainer.is_global_zero:`."
                        )

    def shard_models(self, models: Mapping[str, nn.Module], steps: Sequence[Any]) -> None:
        """Give every rank rank 0's weights, ``fully_shard`` each model in place (summing, not
        averaging, its reduce-scatter) and rebind the steps' optimizers to the sharded parameters."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        optimizers = list({id(o): o for step in steps for o in step.optimizers}.values())
        for i, opt in enumerate(optimizers):
            if opt.state:
                raise ValueError(
                    f"Trainer: distributed='fsdp' shards the models, so the optimizers are rebound to the "
                    f"sharded parameters; {type(opt).__name__} optimizer #{i} has stepped already (it holds "
                    f"state for {len(opt.state)} parameter(s) that no longer exist once sharded). Received: an "
                    "optimizer with state. Build the Trainer before stepping the optimizers (build them, then "
                    "the Trainer, then fit), or load their state with trainer.load_state_dict after."
                )
        # everything refused is refused before anything is sharded: a refused Trainer leaves the models as they were
        owner: dict[int, str] = {}  # id(parameter) -> the model that holds it
        for name, model in models.items():
            for param in model.parameters():
                other = owner.setdefault(id(param), name)
                if other != name:
                    raise _refuse(
                        "a parameter held by two models",
                        f"models {other!r} and {name!r} share a parameter of shape {tuple(param.shape)}",
                        "Each model is sharded on its own, so a module may be in one of them only: pass the "
                        "module they share as a model of its own (or one model holding both), or use "
                        "distributed='replicate'.",
                    )
        for opt in optimizers:
            for group in opt.param_groups:
                outside = [p for p in group["params"] if id(p) not in owner]
                if outside:
                    raise _refuse(
                        "tensors outside the models",
                        f"an optimizer ({type(opt).__name__}) that trains {len(outside)} tensor(s) of shape(s) "
                        f"{[tuple(p.shape) for p in outside[:3]]} in none of `models`",
                        "Put them in a module passed in `models` (they are then sharded), or use "
                        "distributed='replicate'.",
                    )
        shared = [t for m in models.values() for t in (*m.parameters(), *m.buffers()) if t.numel()]
        if shared:
            self.broadcast_(shared)  # every rank shards rank 0's weights
        by_id: dict[int, torch.Tensor] = {}
        for model in models.values():
            before = dict(model.named_parameters())
            fully_shard(model)
            # the ranks' plain sum (ReduceOp.SUM, which gloo has too), divided later by the global counts
            model.set_gradient_divide_factor(1.0)
            model.set_force_sum_reduction_for_comms(True)
            for name, param in model.named_parameters():
                by_id[id(before[name])] = param
                if self.mesh is None and isinstance(param, DTensor):
                    self.mesh = param.device_mesh
            self.models.append(model)
        for opt in optimizers:
            for group in opt.param_groups:
                group["params"] = [by_id[id(p)] for p in group["params"]]

    # ------------------------------------------------------------------ gradients

    def start(self, tensors: Sequence[torch.Tensor]) -> None:
        """At the start of ``fit``: every rank takes rank 0's buffers (the parameters' slices are
        each rank's own)."""
        from torch.distributed.tensor import DTensor

        super().start([t for t in tensors if not isinstance(t, DTensor)])

    @contextmanager
    def isolated(self, owned: Sequence[torch.Tensor]) -> Iterator[None]:
        """Around a step's window: the models' parameters it does not own do not require gradients."""
        mine = {id(p) for p in owned}
        off = [p for m in self.models for p in m.parameters() if p.requires_grad and id(p) not in mine]
        for p in off:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in off:
                p.requires_grad_(True)
            self.release()

    def release(self) -> None:
        """Free every model's gathered parameters. A model whose forward ran without a backward
        (the other model of a GAN step, validation) is left gathered, its gathered parameters not
        requiring gradients: the next forward then gathers them afresh, with requires_grad as it is then."""
        for model in self.models:
            model.reshard()

    def pad_chunks(self, chunks: list[Any]) -> list[Any]:
        """Micro-batches of every rank, padded with empty chunks to the same count on every rank."""
        count = torch.tensor([float(len(chunks))], dtype=torch.float64, device=self.wire)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return chunks + [_empty_like(chunks[0])] * (int(count.item()) - len(chunks))

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor], last: bool) -> None:
        """One chunk's backward; the ranks' reduce-scatter runs in the window's last one only."""
        for model in self.models:
            model.set_requires_gradient_sync(last)
        loss.backward()

    def window(
        self,
        params: Sequence[torch.Tensor],
        counts: dict[str, Any],
        buffers: dict[str, list[torch.Tensor | None]],
        sums: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """After a window: the global counts and loss sums (the gradients were summed by FSDP2)."""
        meta = torch.tensor([float(c) for c in counts.values()], dtype=torch.float64)
        stacked = stack_sums(sums)
        self.sum_([meta] + stacked)
        put_sums(sums, stacked)
        return dict(zip(counts, meta.tolist()))


def _empty_like(chunk: Any) -> Any:
    """``chunk`` with zero samples: every per-sample tensor (and list) sliced to none."""
    from trainflow.data.batch import _map, sample_count

    return _map(chunk, lambda t: t[:0], sample_count(chunk))


def several_normalisers(step: str, groups: Mapping[str, Any]) -> ValueError:
    """The error for a window with several normalisers under fsdp."""
    return ValueError(
        f"Step {step!r}: under distributed='fsdp' a loss must have one normaliser, but its terms are normalised by "
        f"{len(groups)}: {sorted(groups)}. Received: terms normalised by {sorted(groups)}. Their separate gradient "
        "buffers (torch.autograd.grad) bypass FSDP2's reduce-scatter. Give every term the same normaliser (e.g. "
        "each as an Average over the same count), split them into two steps, or use distributed='replicate'."
    )


def is_sharded_state(state: Any) -> bool:
    """Whether ``state`` (a ``Trainer.state_dict()``) holds sharded tensors (``DTensor``).

    Example:
        >>> import torch
        >>> is_sharded_state({"models": {"m": {"w": torch.ones(1)}}})
        False
    """
    from torch.distributed.tensor import DTensor

    return _holds(state, DTensor)


def _holds(state: Any, kind: type) -> bool:
    if isinstance(state, kind):
        return True
    if isinstance(state, Mapping):
        return any(_holds(v, kind) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_holds(v, kind) for v in state)
    return False


class ShardedModels:
    """The trainer's "models" part under fsdp: the sharded state of each model, restored from a
    sharded state (``DTensor``) or a full one (a checkpoint read whole), each rank keeping its slice.
    Its shapes are checked as the models' own (:meth:`trainflow.models.Models.mismatch`)."""

    def __init__(self, models: Any) -> None:
        self.models = models  # trainflow.models.Models

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {name: get_model_state_dict(m) for name, m in self.models.by_name.items()}

    def mismatch(self, state: Mapping[str, Any]) -> list[str]:
        return self.models.mismatch(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        for name, model in self.models.by_name.items():  # checked already (RunState asks mismatch first)
            full = not is_sharded_state(state[name])
            set_model_state_dict(model, dict(state[name]), options=StateDictOptions(full_state_dict=full))


class ShardedOptimizers(Optimizers):
    """The trainer's "optimizers" part under fsdp, in torch's own layout (state keyed by each
    parameter's place in ``param_groups``) with sharded tensors; restored through
    ``set_optimizer_state_dict`` from a sharded or a full state (a checkpoint read whole)."""

    def __init__(self, optimizers: Optimizers, models: Mapping[str, nn.Module]) -> None:
        self.by_name = optimizers.by_name
        self.root = nn.ModuleDict(dict(models))  # parameter names across the models: "<model>.<name>"
        fqn = {id(p): n for n, p in self.root.named_parameters()}
        #: each optimizer's parameter names, in the order of its state_dict's indices
        self.fqns = {name: [fqn[id(p)] for g in opt.param_groups for p in g["params"]]
                     for name, opt in self.by_name.items()}

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        out = {}
        for name, opt in self.by_name.items():
            index = {f: i for i, f in enumerate(self.fqns[name])}
            osd = get_optimizer_state_dict(self.root, opt)
            out[name] = {
                "state": {index[f]: s for f, s in osd["state"].items()},
                "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in osd["param_groups"]],
            }
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for name, opt in self.by_name.items():
            fqns, saved = self.fqns[name], state[name]
            osd = {
                "state": {fqns[int(i)]: s for i, s in saved["state"].items()},
                "param_groups": [{**g, "params": [fqns[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
            }
            full = not is_sharded_state(saved)
            set_optimizer_state_dict(self.root, opt, osd, options=StateDictOptions(full_state_dict=full))
