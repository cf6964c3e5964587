"""The ``distributed="fsdp"`` scenarios that tests/scripts/dist_run.py runs under torchrun (not a test module).

Each is a real ``Trainer(..., distributed="fsdp")`` on gloo, float64; it writes
``OUT/<scenario>.rank<r>.pt`` per rank (as dist_run.py's ``record``, with every sharded
parameter and gradient gathered whole), which tests/test_distributed.py compares with a
one-process hand-written loop on the combined batches.

``resume_run`` is the SIGKILL scenario: a shuffled, accumulating run with a DCP checkpoint after
every update, whose rank 1 can kill itself mid-window; each rank writes the SHA-256 of its own
part of the final state (its slices of the sharded tensors, and everything else).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from dist_setups import dataset, float32_data, float32_mlp, gan, gan_data, gan_losses, mlp  # noqa: E402
from kill_run import digest, final_state  # noqa: E402

from trainflow import Average, Step, Trainer, checkpoint, param_groups  # noqa: E402
from trainflow.callbacks import Checkpoint  # noqa: E402

F = torch.nn.functional


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded tensor gathered whole (a collective), a plain one as it is."""
    if isinstance(t, DTensor):
        return t.full_tensor().detach().clone()
    return None if t is None else t.detach().clone()


def record(out: Path, name: str, trainer: Trainer, models: dict, **extra) -> None:
    """Each rank's final (whole) parameters, gradients, counters and logs, to OUT/<name>.rank<r>.pt."""
    params, grads = {}, {}
    for m, model in models.items():
        for k, p in model.named_parameters():
            params[f"{m}.{k}"] = full(p)
            has = torch.tensor([float(p.grad is not None)])
            dist.all_reduce(has, op=dist.ReduceOp.MIN)  # the same on every rank (a test checks it)
            if has.item():
                grads[f"{m}.{k}"] = full(p.grad)
    torch.save({"params": params, "grads": grads, "updates": trainer.updates, "epoch": trainer.epoch,
                "skipped": trainer.skipped, "stop_reason": trainer.stop_reason, "logs": dict(trainer.logs),
                "world_size": trainer.world_size, **extra},
               out / f"{name}.rank{dist.get_rank()}.pt")


def mse(model):
    def loss(batch):
        x, y = batch
        return F.mse_loss(model(x), y)
    return loss


def fsdp_gan(out: Path) -> None:
    """D x3 / G x1 (the G step on the same batch), two sharded models, two Adam optimizers built
    before the Trainer; each loss reaches both models: isolation by requires_grad."""
    G, D = gan(40)
    d_opt = torch.optim.Adam(D.parameters(), lr=0.01)
    g_opt = torch.optim.Adam(G.parameters(), lr=0.02)

    d_loss, g_loss = gan_losses(G, D)
    steps = [Step(d_loss, d_opt, name="D", repeat=3), Step(g_loss, g_opt, name="G", batch="same")]
    trainer = Trainer({"G": G, "D": D}, steps, progress=False, distributed="fsdp")
    trainer.fit(DataLoader(gan_data(24, seed=41), batch_size=4), max_updates=9)
    record(out, "fsdp_gan", trainer, {"G": G, "D": D})


def fsdp_accum(out: Path) -> None:
    """accumulate=2 over 21 samples (global batches 8, 8, 5: an uneven last window) in micro-batches
    of 2 (the last batch: 2 chunks on rank 0, 1 on rank 1), SGD with momentum on parameter groups
    chosen by name (another lr for the last layer); validation after each epoch."""
    model = mlp(42)
    opt = torch.optim.SGD(param_groups(model, {"0.*": {}, "2.*": {"lr": 0.05}}), lr=0.1, momentum=0.9)
    step = Step(mse(model), opt, name="fit", accumulate=2, microbatch_size=2)
    trainer = Trainer(model, [step], progress=False, distributed="fsdp")
    val = DataLoader(dataset(9, seed=3), batch_size=4)  # global batches of 8 and 1: rank 1's second is empty
    trainer.fit(DataLoader(dataset(21, seed=43), batch_size=4), epochs=2, val_data=val,
                val_step=lambda b: F.mse_loss(model(b[0]), b[1]))
    record(out, "fsdp_accum", trainer, {"m": model})


def fsdp_partial(out: Path) -> None:
    """Two steps that each own part of one model (its first layer, accumulate=2 and clipped to a
    global norm of 0.05; then its last); 17 samples in global batches of 4: rank 1's share of the
    last one is empty."""
    model = mlp(44)
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.2)
    steps = [Step(mse(model), body, name="body", accumulate=2, clip_grad_norm=0.05),
             Step(mse(model), head, name="head")]
    trainer = Trainer(model, steps, progress=False, distributed="fsdp")
    trainer.fit(DataLoader(dataset(17, seed=45), batch_size=2), epochs=2)
    record(out, "fsdp_partial", trainer, {"m": model})


def fsdp_nonfinite(out: Path) -> None:
    """A NaN in sample 9 (global batch 1, a row of rank 1's), on_nonfinite="skip": every rank skips it."""
    model = mlp(46)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], progress=False, on_nonfinite="skip",
                      distributed="fsdp")
    trainer.fit(DataLoader(dataset(17, seed=47, nan_at=9), batch_size=4), epochs=2)
    record(out, "fsdp_nonfinite", trainer, {"m": model})


def fsdp_float32(out: Path) -> None:
    """float32 parameters: FSDP2 would reduce them with a pre-multiplied sum, which gloo lacks."""
    model = float32_mlp()
    trainer = Trainer(model, [Step(mse(model), torch.optim.SGD(model.parameters(), lr=0.1), name="fit")],
                      progress=False, distributed="fsdp")
    trainer.fit(DataLoader(float32_data(), batch_size=2), epochs=1)
    record(out, "fsdp_float32", trainer, {"m": model})


def fsdp_refused(out: Path) -> None:
    """The errors raised under torchrun: an optimizer that has stepped; two normalisers in one window."""
    model = mlp(48)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.zeros(1, 3)).sum().backward()
    opt.step()
    errors = {}
    try:
        Trainer(model, [Step(mse(model), opt)], progress=False, distributed="fsdp")
    except ValueError as error:
        errors["stepped"] = str(error)
    model = mlp(48)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def two(batch):
        x, y = batch
        return {"mean": F.mse_loss(model(x), y), "sum": Average((model(x) - y).pow(2).sum(), 2 * len(x))}

    trainer = Trainer(model, [Step(two, opt, name="two")], progress=False, distributed="fsdp")
    try:
        trainer.fit(DataLoader(dataset(8, seed=49), batch_size=2), epochs=1)
    except ValueError as error:
        errors["normalisers"] = str(error)
    torch.save(errors, out / f"fsdp_refused.rank{dist.get_rank()}.pt")


SCENARIOS = [fsdp_gan, fsdp_accum, fsdp_partial, fsdp_nonfinite, fsdp_float32, fsdp_refused]


def local(obj):
    """``obj`` with every sharded tensor replaced by this rank's slice of it."""
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: local(v) for k, v in obj.items()}
    return obj


def tensors(obj, at: str = "") -> dict:
    """Every tensor in the dicts of ``obj`` by its path: ``(True, this rank's slice)`` for a sharded
    one, ``(False, tensor)`` for a plain one."""
    if isinstance(obj, DTensor):
        return {at: (True, obj.to_local().clone())}
    if isinstance(obj, torch.Tensor):
        return {at: (False, obj.clone())}
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in tensors(value, f"{at}/{key}").items()}
    return {}


def resume_run(out: Path, kill_call: int | None) -> None:
    """Shuffled, accumulate=2 over 27 samples (global batches of 8, 8, 8, 3), two Adam-trained
    layers, a DCP checkpoint after every update; rank 1 dies by SIGKILL in its ``kill_call``-th loss call."""
    random.seed(50)
    np.random.seed(50)
    torch.manual_seed(50)
    model = mlp(51)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    calls = [0]

    def loss(batch):
        x, y = batch
        calls[0] += 1
        if kill_call is not None and dist.get_rank() == 1 and calls[0] == kill_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return F.mse_loss(model(x), y)

    trainer = Trainer(model, [Step(loss, opt, name="fit", accumulate=2)], callbacks=[Checkpoint(every_updates=1)],
                      out_dir=out / "run", progress=False, distributed="fsdp")
    read = []  # what the trainer's resume read: which checkpoint, on which mesh, and this rank's slices of it
    whole_load = checkpoint.load

    def load(path, mesh=None):
        state = whole_load(path, mesh=mesh)
        if Path(path).suffix == ".dcp":  # not the folder's trainflow.pt, which load reads too
            read.append({"file": Path(path).name, "mesh": None if mesh is None else tuple(mesh.mesh.tolist()),
                         "tensors": tensors({"models": state["models"], "optimizers": state["optimizers"]})})
        return state

    checkpoint.load = load
    try:
        trainer.fit(DataLoader(dataset(27, seed=52), batch_size=4, shuffle=True), epochs=4, resume="latest")
    finally:
        checkpoint.load = whole_load
    torch.save(read, out / f"resume.read.rank{dist.get_rank()}.pt")
    state = local(final_state(trainer))
    (out / f"resume.digest.rank{dist.get_rank()}").write_text(f"{digest(state)} {trainer.updates}\n")
    record(out, "fsdp_resume", trainer, {"m": model})
