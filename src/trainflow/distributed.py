"""Training under ``torchrun``: join the process group, start every rank alike, sum the gradients (or shard).

The same script runs in one process or under ``torchrun --nproc-per-node N``; with
``Trainer(..., distributed="auto")`` (the default) it joins the process group that ``torchrun``
describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``): NCCL when the device is CUDA
(``cuda:LOCAL_RANK``), gloo otherwise. torch.distributed's collectives are the only thing that
travels between processes.

**replicate** keeps a full copy of every model on every rank. At the start of each ``fit``
rank 0's parameters and buffers are broadcast, so every rank starts alike. Each update window
runs locally in *sum form* (a mean loss times the rank's sample count, an ``Average``'s total),
then one all-reduce per dtype sums, in one flat buffer, the gradients of the step's own
parameters together with each normaliser's count, the loss sums that are logged and which
parameters received a gradient; the gradients are then divided by the *global* counts. That
is the gradient of one process on the combined batch, for uneven windows and uneven token
counts too (a rank with no sample in the last window adds zeros). A NaN or infinity on any
rank is in the sums every rank receives, so every rank takes the same non-finite decision.
With one normaliser the gradients travel in fixed buckets of about :data:`BUCKET_BYTES`, each
all-reduced asynchronously as soon as the window's last backward has finished it (gradient
hooks), in bucket order on every rank; the counts and loss sums follow in one small buffer.

Nothing is wrapped in ``DistributedDataParallel``: a trainflow loss calls the user's module, and
a step that owns part of a model differentiates into its own parameters only; summing exactly
those parameters' gradients keeps isolation (``D x3 / G x1``, partial ownership) as it is in
one process.

**fsdp** (``Trainer(..., distributed="fsdp")``) shards each model with FSDP2's ``fully_shard``
instead of keeping a copy on every rank: the same sum form and division by the global counts,
the gradients summed by FSDP2's reduce-scatter, isolation by ``requires_grad``, clipping on the
global norm, checkpoints through ``torch.distributed.checkpoint``. It is
:class:`trainflow.fsdp.Sharded`, a :class:`Replicate` whose gradient methods differ; what it
refuses, and why, is in :mod:`trainflow.fsdp`.

``Replicate.sum_`` and friends are the collectives the trainer, the update path and the
checkpoint callback call; :func:`resolve` picks the mode.
"""

from __future__ import annotations

import atexit
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trainflow import rng

__all__ = ["MODES", "WORLD_SIZE_CHANGES", "RankState", "Replicate", "launched", "local_device", "resolve"]

#: the values of ``Trainer(..., distributed=)``
MODES = ("auto", "replicate", "fsdp", "off")
#: the values of ``fit(..., world_size_change=)``
WORLD_SIZE_CHANGES = ("refuse", "allow")
#: a window's gradients travel in buckets of about this many bytes, each sent during the last
#: backward as soon as its gradients are final (False in OVERLAP: all at once, after it)
BUCKET_BYTES = 1 << 20
OVERLAP = True


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process in all.

    Example:
        >>> import os
        >>> launched() == (int(os.environ.get("WORLD_SIZE", "1")) > 1)
        True
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _torchrun() -> bool:
    """Whether torchrun started this process (at any world size, 1 included)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


#: whether the last ``fit`` in this process raised: the group the trainer joined is then not destroyed at exit
_failed = False


def fit_ended(raised: bool) -> None:
    """Note how a ``fit`` ended in this process: after one that raised, :func:`_leave` leaves the
    group alone at exit (until a later fit ends normally, with every rank in step again).

    Example:
        >>> fit_ended(raised=False)  # what Trainer.fit does when it returns
    """
    global _failed
    _failed = raised


def _leave() -> None:
    """At interpreter exit, destroy the process group that a trainer joined, unless the last fit raised.

    A process that exits with its gloo group alive can abort after its work is done ("terminate
    called without an active exception": gloo's worker threads free their last tensors while the
    interpreter is torn down), which turns a finished run into a failed launch. Destroying the
    group from an ``atexit`` handler, while the interpreter is whole, is what a script would do
    itself with ``dist.destroy_process_group()``. When the last fit raised, the group is left as it
    is: another rank may still be inside a collective, and destroying an NCCL group then can hang.
    """
    if _joined() and not _failed:
        dist.destroy_process_group()


def check_mode(mode: Any) -> str:
    """``mode`` if it is one of :data:`MODES` that is available; a clear error otherwise.

    Example:
        >>> check_mode("auto")
        'auto'
    """
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"Trainer: `distributed` must be one of {MODES}. Received: distributed={mode!r}. Use 'auto' "
            "(replicate under torchrun, one process otherwise), 'replicate', 'fsdp' (shard the models), or 'off'."
        )
    return mode


def local_device(device: Any) -> Any:
    """The device of this rank: under ``torchrun`` on a CUDA machine, "auto" and "cuda" mean
    ``cuda:LOCAL_RANK``; anything else is returned as it is.

    Example:
        >>> local_device("cpu")
        'cpu'
    """
    if not launched() or not torch.cuda.is_available():
        return device
    if device == "auto" or device == "cuda" or (isinstance(device, torch.device) and device == torch.device("cuda")):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def resolve(mode: Any, device: torch.device) -> Replicate | None:
    """The collectives of ``Trainer(..., distributed=mode)``: a :class:`Replicate` (for "fsdp"
    its subclass :class:`trainflow.fsdp.Sharded`), or None for one process.

    "auto" is "replicate" under ``torchrun`` (``WORLD_SIZE`` > 1, or a process group already
    initialised), one process otherwise; "replicate" and "fsdp" need ``torchrun`` (any world
    size: at ``--nproc-per-node 1`` they run the distributed path alone) or an initialised group.

    Example:
        >>> import torch
        >>> resolve("off", torch.device("cpu")) is None
        True
    """
    mode = check_mode(mode)
    if mode == "off":
        return None
    if mode == "auto" and not (launched() or (_joined() and dist.get_world_size() > 1)):
        return None
    if not (_torchrun() or _joined()):
        raise ValueError(
            f"Trainer: distributed={mode!r} needs several processes, but this one was not started by "
            "torchrun (LOCAL_RANK and WORLD_SIZE are unset) and no process group is initialised. Received: "
            f"distributed={mode!r}. Launch the script with `torchrun --nproc-per-node 2 script.py`, or "
            "pass distributed='auto' to run in one process when not launched."
        )
    if mode == "fsdp":
        from trainflow.fsdp import Sharded

        return Sharded(device)
    return Replicate(device)


class Replicate:
    """The collectives of replicate mode, for this rank of the process group (joined if needed).

    Every method is a collective: every rank calls it, in the same order.

    Attributes:
        rank: this process's rank (``RANK``); ``is_global_zero`` when it is 0.
        world_size: the number of processes (``WORLD_SIZE``).

    Example (in one process, a group of one):
        >>> import torch, torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> ranks = Replicate(torch.device("cpu"))
        >>> grad = [torch.ones(2)]
        >>> ranks.sum_(grad)
        >>> grad[0].tolist(), ranks.world_size, ranks.is_global_zero
        ([1.0, 1.0], 1, True)
        >>> dist.destroy_process_group()
    """

    #: whether the models are sharded (fsdp: :class:`trainflow.fsdp.Sharded`)
    shards = False

    def __init__(self, device: torch.device) -> None:
        if not _joined():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend)
            atexit.register(_leave)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_global_zero = self.rank == 0
        self.device = device
        # the collectives' tensors live where the backend works: CUDA for NCCL, the CPU for gloo
        self.wire = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self._sharded: dict[int, tuple[Any, Any]] = {}  # id(loader) -> (loader, this rank's share of it)
        self._buckets: dict[tuple[int, ...], _Buckets] = {}  # by the ids of a window's parameters
        self._in_flight: _Buckets | None = None

    # ------------------------------------------------------------------ the collectives

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over all ranks, in place: one all-reduce per dtype, of one flat buffer."""
        for group in _by_dtype(tensors):
            if len(group) == 1 and group[0].is_contiguous() and group[0].device == self.wire:
                dist.all_reduce(group[0])
                continue
            flat = _flatten_dense_tensors([t.to(self.wire) for t in group])
            dist.all_reduce(flat)
            for t, summed in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(summed)

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every rank rank 0's values of ``tensors``, in place (one broadcast per dtype)."""
        with torch.no_grad():
            for group in _by_dtype(tensors):
                flat = _flatten_dense_tensors([t.detach().to(self.wire) for t in group])
                dist.broadcast(flat, src=0)
                for t, value in zip(group, _unflatten_dense_tensors(flat, group)):
                    t.copy_(value)

    def any(self, *flags: bool) -> list[bool]:
        """For each flag, whether it is True on some rank (one small all-reduce)."""
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.wire)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``all_gather_object``)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def start(self, tensors: Sequence[torch.Tensor]) -> None:
        """At the start of ``fit``: every rank takes rank 0's parameters and buffers."""
        tensors = [t for t in tensors if t.numel()]
        if tensors:
            self.broadcast_(tensors)

    # ------------------------------------------------------------------ gradients

    def isolated(self, owned: Sequence[torch.Tensor]) -> Any:
        """Around a step's window (fsdp switches off the other parameters' gradients; here nothing:
        each backward differentiates into the step's own parameters)."""
        return nullcontext()

    def release(self) -> None:
        """After forwards without a backward (validation; fsdp frees the gathered parameters here)."""

    def pad_chunks(self, chunks: list[Any]) -> list[Any]:
        """A window's micro-batches (fsdp pads them to the same count on every rank)."""
        return chunks

    def backward(self, loss: torch.Tensor, params: Sequence[torch.Tensor], last: bool) -> None:
        """One chunk's backward into ``params``; the window's ``last`` sends its buckets as they are made."""
        with self.overlapping(params) if last else nullcontext():
            loss.backward(inputs=params)

    @contextmanager
    def overlapping(self, params: Sequence[torch.Tensor]) -> Iterator[None]:
        """Around a window's last backward: send each bucket of ``params``' gradients as soon as
        they are final (the sum is collected by :meth:`window`)."""
        if not OVERLAP:
            yield
            return
        buckets = self._buckets_of(params)
        removers = buckets.arm()
        try:
            yield
        finally:
            for remove in removers:
                remove.remove()
        self._in_flight = buckets

    def _buckets_of(self, params: Sequence[torch.Tensor]) -> _Buckets:
        key = tuple(id(p) for p in params)
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = self._buckets[key] = _Buckets(params, self.wire)
        return buckets

    def window(
        self,
        params: Sequence[torch.Tensor],
        counts: dict[str, Any],
        buffers: dict[str, list[torch.Tensor | None]],
        sums: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        """Sum an accumulation window's sum-form gradients, counts and loss sums over the ranks.

        The gradients are in ``params[i].grad`` (one normaliser) or in ``buffers`` (one list per
        normaliser); ``counts`` maps each normaliser to this rank's count, ``sums`` each term to
        its loss sum (replaced by the global sum). Returns the global counts. A parameter that
        got no gradient on any rank keeps ``.grad`` None.

        With one normaliser the gradients go in buckets (:class:`_Buckets`), in the same order on
        every rank: those sent during the last backward (:meth:`overlapping`), the rest now.
        """
        buckets, self._in_flight = self._in_flight, None
        if not buffers and OVERLAP:
            if buckets is None or [id(p) for p in buckets.params] != [id(p) for p in params]:  # no sample here
                buckets = self._buckets_of(params)
                buckets.reset()
            reached = buckets.send_rest()
            meta_t = torch.tensor([float(c) for c in counts.values()] + [float(r) for r in reached],
                                  dtype=torch.float64)
            stacked = stack_sums(sums)
            self.sum_([meta_t] + stacked)
            buckets.receive()
            for p, r in zip(params, meta_t[len(counts):].tolist()):
                if not r:
                    p.grad = None
            put_sums(sums, stacked)
            return dict(zip(counts, meta_t[: len(counts)].tolist()))
        grads = _grads_of(params, buffers)
        reached = [g is not None for g in grads]
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(_param_per_grad(params, buffers), grads)]
        meta = [float(c) for c in counts.values()] + [float(r) for r in reached]
        meta_t = torch.tensor(meta, dtype=torch.float64)
        stacked = stack_sums(sums)
        self.sum_(grads + [meta_t] + stacked)
        _put_grads(params, buffers, grads, meta_t[len(counts):].tolist())
        put_sums(sums, stacked)
        return dict(zip(counts, meta_t[: len(counts)].tolist()))

    def average(
        self, params: Sequence[torch.Tensor], count: int, losses: Sequence[torch.Tensor] = ()
    ) -> list[torch.Tensor]:
        """A custom step's gradients (of means over this rank's ``count`` samples) averaged over
        the ranks, weighted by each rank's count: the gradient of the mean over all samples.

        ``losses`` (means, detached) are averaged alike and returned; a rank with no sample
        adds nothing.
        """
        grads = [p.grad for p in params]
        reached = [g is not None for g in grads]
        grads = [torch.zeros_like(p) if g is None else g.mul_(count) for p, g in zip(params, grads)]
        for p, g in zip(params, grads):
            p.grad = g
        weighted = [torch.zeros((), dtype=torch.float64) if count == 0 else loss.detach().double().cpu() * count
                    for loss in losses]
        meta = torch.tensor([float(count)] + [float(r) for r in reached], dtype=torch.float64)
        self.sum_(grads + [meta] + weighted)
        total = meta[0].item()
        if grads:
            torch._foreach_div_(grads, total)
        for p, r in zip(params, meta[1:].tolist()):
            if not r:
                p.grad = None
        return [(w / total).to(device=loss.device, dtype=loss.dtype) for w, loss in zip(weighted, losses)]

    def mean_values(self, values: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
        """Logged values (means over this rank's ``count`` samples) as means over all ranks' samples."""
        if not values:
            return values
        names = list(values)
        weighted = torch.stack([
            torch.zeros((), dtype=torch.float64) if count == 0
            else values[n].detach().double().cpu().reshape(()) * count
            for n in names
        ] + [torch.tensor(float(count), dtype=torch.float64)])
        self.sum_([weighted])
        total = weighted[-1]
        return {n: (weighted[i] / total).to(device=values[n].device, dtype=values[n].dtype)
                for i, n in enumerate(names)}

    def sum_values(self, sums: Mapping[str, list]) -> None:
        """Validation's per-loss ``[total, count]`` summed over the ranks, in place."""
        names = list(sums)
        if not names:
            return
        flat = torch.tensor([v for n in names for v in (float(sums[n][0]), float(sums[n][1]))], dtype=torch.float64)
        self.sum_([flat])
        for i, n in enumerate(names):
            sums[n][0] = flat[2 * i].to(sums[n][0].dtype if isinstance(sums[n][0], torch.Tensor) else torch.float64)
            sums[n][1] = flat[2 * i + 1].item()

    # ------------------------------------------------------------------ data

    def shard(self, data: Any) -> Any:
        """``fit``'s data with every plain DataLoader replaced by this rank's share of it (the same
        share object for the same loader, so that a later ``fit`` continues its epoch)."""
        from trainflow.data.sharding import shard

        if isinstance(data, Mapping):
            return {name: self.shard(loader) for name, loader in data.items()}
        if not isinstance(data, torch.utils.data.DataLoader):
            return data
        kept = self._sharded.get(id(data))
        if kept is not None and kept[0] is data:
            return kept[1]
        share = shard(data, self.rank, self.world_size, self.rank_zero_rng)
        self._sharded[id(data)] = (data, share)
        return share

    @contextmanager
    def rank_zero_rng(self) -> Iterator[None]:
        """Draw with rank 0's global torch generator on every rank (a sampler's shuffle seed), so
        that every rank draws the same order; every rank goes on from rank 0's state after it."""
        state = torch.get_rng_state()
        self.broadcast_([state])
        torch.set_rng_state(state)
        yield



class RankState:
    """The ranks' part of a run's state: the world size and every rank's random generators.

    ``state_dict()`` is a collective (it gathers every rank's generators). A loaded state is
    held until :meth:`place`, called by ``fit`` once the data is in place (its replay restores
    rank 0's generators): then each rank takes its own, after the world size is checked.
    """

    def __init__(self, ranks: Replicate) -> None:
        self.ranks = ranks
        self.saved: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if self.saved is not None:  # loaded, not yet placed
            return dict(self.saved)
        return {"world_size": self.ranks.world_size, "rng_by_rank": self.ranks.gather(rng.capture())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saved = dict(state) if state else {"world_size": 1}  # a state without it: one process's

    def place(self, policy: str) -> None:
        """Check the loaded world size against this one (``policy``: "refuse" or "allow") and
        restore this rank's generators."""
        if self.saved is None:
            return
        saved, self.saved = self.saved, None
        check_world_size(saved, self.ranks.world_size, policy, quiet=True)
        states = saved.get("rng_by_rank") or []
        if len(states) == self.ranks.world_size:
            rng.restore(states[self.ranks.rank])


def check_world_size(saved: Mapping[str, Any], world_size: int, policy: str, quiet: bool = False) -> None:
    """A state saved under another world size is refused unless ``policy`` is "allow" (then a
    warning says the run continues exactly up to rounding; ``quiet`` for a second check).

    Example:
        >>> check_world_size({"world_size": 2}, 2, "refuse")  # the same: nothing to say
        >>> check_world_size({"world_size": 2}, 4, "refuse")
        Traceback (most recent call last):
        ValueError: fit: the state being resumed was saved by a run of world size 2, ...
    """
    saved = int(saved.get("world_size", 1))
    if saved == world_size or policy == "allow":
        if saved != world_size and not quiet:
            warnings.warn(
                f"fit: resuming a run saved with world size {saved} under world size {world_size}: the "
                "global batches are the same, so the run continues exactly up to rounding (sums over "
                "other groupings), not to the bit.",
                UserWarning,
                stacklevel=4,
            )
        return
    raise ValueError(
        f"fit: the state being resumed was saved by a run of world size {saved}, this run has world size "
        f"{world_size}. Received: world_size={world_size} (the state's: {saved}). A resume is bit-identical "
        "only under the same number of processes: launch with the same --nproc-per-node, or pass "
        "fit(..., world_size_change='allow') to continue exactly up to rounding."
    )


def check_world_size_change(policy: Any) -> str:
    """``fit``'s ``world_size_change`` argument, checked.

    Example:
        >>> check_world_size_change("allow")
        'allow'
    """
    if policy not in WORLD_SIZE_CHANGES:
        raise ValueError(
            f"fit: `world_size_change` must be one of {WORLD_SIZE_CHANGES}. Received: "
            f"world_size_change={policy!r}. Pass 'allow' to resume a state saved under another world size."
        )
    return policy


class _Buckets:
    """A window's parameters in fixed buckets of about :data:`BUCKET_BYTES` (in reverse order,
    the order in which backward finishes their gradients), each all-reduced asynchronously as one
    flat buffer. Buckets are sent strictly in order on every rank, so the collectives match."""

    def __init__(self, params: Sequence[torch.Tensor], wire: torch.device) -> None:
        self.params = tuple(params)
        self.wire = wire
        self.buckets: list[list[int]] = []
        size = BUCKET_BYTES
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            nbytes = p.numel() * p.element_size()
            if size + nbytes > BUCKET_BYTES or (self.buckets and p.dtype != self.params[self.buckets[-1][0]].dtype):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += nbytes
        self.bucket_of = {i: b for b, members in enumerate(self.buckets) for i in members}
        self.reset()

    def reset(self) -> None:
        self.ready = [0] * len(self.buckets)
        self.sent: list[tuple[torch.Tensor, Any]] = []
        self.reached = [False] * len(self.params)

    def arm(self) -> list[Any]:
        """Hooks that mark each parameter's gradient final during the backward."""
        self.reset()
        return [p.register_post_accumulate_grad_hook(lambda _, i=i: self._final(i))
                for i, p in enumerate(self.params) if p.requires_grad]

    def _final(self, i: int) -> None:
        b = self.bucket_of[i]
        self.ready[b] += 1
        while len(self.sent) < len(self.buckets) and self.ready[len(self.sent)] == len(self.buckets[len(self.sent)]):
            self._send(len(self.sent))

    def _send(self, b: int) -> None:
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            self.reached[i] = p.grad is not None
            grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
        flat = _flatten_dense_tensors([g.to(self.wire) for g in grads])
        self.sent.append((flat, dist.all_reduce(flat, async_op=True)))

    def send_rest(self) -> list[bool]:
        """Send the buckets not sent yet (gradients of earlier chunks, or none); which parameters
        have a gradient on this rank."""
        while len(self.sent) < len(self.buckets):
            self._send(len(self.sent))
        return list(self.reached)

    def receive(self) -> None:
        """Wait for every bucket and put the sums in the parameters' ``.grad``."""
        for b, (flat, work) in enumerate(self.sent):
            work.wait()
            members = [self.params[i] for i in self.buckets[b]]
            for p, summed in zip(members, _unflatten_dense_tensors(flat, members)):
                p.grad = summed.to(p.device)
        self.sent = []


def stack_sums(sums: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """A window's loss sums as one float64 CPU vector to all-reduce (``[]`` when there are none).

    Example:
        >>> import torch
        >>> stack_sums({"a": torch.tensor(1.5), "b": torch.tensor(2.0)})
        [tensor([1.5000, 2.0000], dtype=torch.float64)]
    """
    if not sums:
        return []
    return [torch.stack([t.detach().to(torch.float64).reshape(()).cpu() for t in sums.values()])]


def put_sums(sums: dict[str, torch.Tensor], stacked: list[torch.Tensor]) -> None:
    """Put the summed vector of :func:`stack_sums` back into ``sums``, each on its device and dtype.

    Example:
        >>> import torch
        >>> sums = {"a": torch.tensor(1.5, dtype=torch.float32)}
        >>> put_sums(sums, [torch.tensor([3.0], dtype=torch.float64)])
        >>> sums["a"]
        tensor(3.)
    """
    for t, name in zip(stacked[0] if stacked else (), list(sums)):
        sums[name] = t.to(device=sums[name].device, dtype=sums[name].dtype)


def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def _grads_of(params: Sequence[torch.Tensor], buffers: dict[str, list]) -> list[torch.Tensor | None]:
    if not buffers:
        return [p.grad for p in params]
    return [g for buf in buffers.values() for g in buf]


def _param_per_grad(params: Sequence[torch.Tensor], buffers: dict[str, list]) -> list[torch.Tensor]:
    return list(params) if not buffers else [p for _ in buffers for p in params]


def _put_grads(params, buffers, grads, reached) -> None:
    if not buffers:
        for p, g, r in zip(params, grads, reached):
            p.grad = g if r else None
        return
    i = 0
    for buf in buffers.values():
        for j in range(len(buf)):
            buf[j] = grads[i] if reached[i] else None
            i += 1

