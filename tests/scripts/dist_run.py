"""Distributed training runs that tests/test_distributed.py launches under torchrun (not a test module).

    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/dist_run.py scenarios OUT
    python -m torch.distributed.run --nproc-per-node 2 tests/scripts/dist_run.py resume OUT [--kill-call C]

``scenarios`` runs every scenario below in one launch, then the uninterrupted ``resume`` run (into
``OUT/uninterrupted``), writes ``OUT/scenarios.done``, and last the ``resume`` run into
``OUT/killed`` with ``--kill-call 12``, which ends the launch with rank 1 killed (a launch
costs seconds: the test resumes that run in one more) (a launch costs seconds; a scenario a
fraction of one), each a real ``Trainer`` under torchrun on gloo, and writes
``OUT/<scenario>.rank<r>.pt`` per rank: the final parameters and gradients, the counters, the
logs. The test compares rank 0's with a one-process hand-written loop on the combined batches
and checks that every rank holds the same.

The ``distributed="fsdp"`` scenarios of tests/scripts/fsdp_run.py run in the same launch, with
the uninterrupted fsdp ``resume`` run (into ``OUT/fsdp_uninterrupted``). ``resume ...
--then-fsdp-killed DIR`` ends with the fsdp run into DIR whose rank 1 is killed the same way;
``fsdp-resume DIR`` resumes it.

``resume`` trains a shuffled, accumulating run with a checkpoint after every update into
``OUT/run`` (``resume="latest"``), and writes ``OUT/resume.digest`` (rank 0): the SHA-256 of the
final state. With ``--kill-call C``, rank 1 kills itself with SIGKILL inside its C-th loss call
(C = 12: the second chunk of update 6, mid-window and mid-epoch), which ends the launch; a second
launch without it resumes.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np

import torch
import torch.distributed as dist
import torchmetrics
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_setups import dataset, gan, gan_data, gan_losses, mlp, tokens  # noqa: E402
from kill_run import digest, final_state  # noqa: E402

import fsdp_run  # noqa: E402

import trainflow.distributed  # noqa: E402
from trainflow import Average, Step, Trainer  # noqa: E402
from trainflow.callbacks import Checkpoint, CSVLogger, LossLogger  # noqa: E402

F = torch.nn.functional


def mse(model):
    def loss(batch):
        x, y = batch
        return F.mse_loss(model(x), y)
    return loss


def record(out: Path, name: str, trainer: Trainer, models: dict, **extra) -> None:
    """Each rank's final parameters, gradients, counters and logs, to OUT/<name>.rank<r>.pt."""
    params = {f"{m}.{k}": p.detach().clone() for m, model in models.items() for k, p in model.named_parameters()}
    grads = {f"{m}.{k}": p.grad.clone() for m, model in models.items() for k, p in model.named_parameters()
             if p.grad is not None}
    torch.save({"params": params, "grads": grads, "updates": trainer.updates, "epoch": trainer.epoch,
                "skipped": trainer.skipped, "stop_reason": trainer.stop_reason, "logs": dict(trainer.logs),
                "world_size": trainer.world_size, **extra},
               out / f"{name}.rank{dist.get_rank()}.pt")


def accum(out: Path) -> None:
    """accumulate=2 over a plain loader of 22 samples (3 global batches of 8, 8, 6: uneven windows),
    SGD with momentum, a torchmetrics metric, validation, the writing callbacks."""
    model = mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    metric = torchmetrics.MeanSquaredError().double()

    def loss(batch):
        x, y = batch
        pred = model(x)
        metric.update(pred.detach(), y)
        return F.mse_loss(pred, y)

    rank_dir = out / f"writers.r{os.environ['RANK']}"
    lines = []
    trainer = Trainer(model, [Step(loss, opt, name="fit", accumulate=2)], metrics={"train/mse": metric},
                      callbacks=[CSVLogger(), LossLogger(every=1, print_func=lines.append),
                                 Checkpoint(every_updates=2)], out_dir=rank_dir, progress=False)
    val = DataLoader(dataset(11, seed=3), batch_size=2)
    trainer.fit(DataLoader(dataset(22, seed=2), batch_size=4), epochs=2, val_data=val,
                val_step=lambda b: F.mse_loss(model(b[0]), b[1]))
    record(out, "accum", trainer, {"m": model}, printed=len(lines))


def shuffled(out: Path) -> None:
    """A shuffled loader (the sampler's seed from the global generator), 21 samples, Adam."""
    model = mlp(4)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(5)
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], progress=False)
    trainer.fit(DataLoader(dataset(21, seed=6), batch_size=4, shuffle=True), epochs=3)
    record(out, "shuffled", trainer, {"m": model})


def token_average(out: Path) -> None:
    """An Average over tokens (uneven counts per rank), accumulate=2, 14 sequences of batch 3."""
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64))
        model.bias.fill_(0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss(batch):
        x, y, mask = batch
        return Average(((model(x).squeeze(-1) - y).pow(2) * mask).sum(), mask.sum())

    trainer = Trainer(model, [Step(loss, opt, name="tok", accumulate=2)], progress=False)
    trainer.fit(DataLoader(tokens(14, seed=7), batch_size=3), epochs=2)
    record(out, "tokens", trainer, {"m": model})


def empty_rank(out: Path, nonfinite: bool = False) -> None:
    """17 samples in global batches of 8: the last holds one sample, so rank 1's share is empty;
    micro-batches of 3. With ``nonfinite``, a NaN in sample 9 (global batch 2, rank 1's rows)
    and on_nonfinite="skip": every rank must skip that update."""
    model = mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(mse(model), opt, name="fit", microbatch_size=3)
    trainer = Trainer(model, [step], progress=False, on_nonfinite="skip" if nonfinite else "raise")
    trainer.fit(DataLoader(dataset(17, seed=9, nan_at=9 if nonfinite else None), batch_size=4), epochs=2)
    record(out, "nonfinite" if nonfinite else "empty", trainer, {"m": model})


def gan_flow(out: Path) -> None:
    """D x3 / G x1 (the G step on the same batch): each loss reaches both models; isolation."""
    G, D = gan(10)
    d_opt = torch.optim.Adam(D.parameters(), lr=0.01)
    g_opt = torch.optim.SGD(G.parameters(), lr=0.05)

    d_loss, g_loss = gan_losses(G, D)
    steps = [Step(d_loss, d_opt, name="D", repeat=3), Step(g_loss, g_opt, name="G", batch="same")]
    trainer = Trainer({"G": G, "D": D}, steps, progress=False)
    trainer.fit(DataLoader(gan_data(24, seed=11), batch_size=4), max_updates=9)
    record(out, "gan", trainer, {"G": G, "D": D})


def partial(out: Path) -> None:
    """Two steps that each own part of one model (its first layer, then its last)."""
    model = mlp(12)
    body = torch.optim.SGD(model[0].parameters(), lr=0.1)
    head = torch.optim.SGD(model[2].parameters(), lr=0.2)
    steps = [Step(mse(model), body, name="body", accumulate=2), Step(mse(model), head, name="head")]
    trainer = Trainer(model, steps, progress=False)
    trainer.fit(DataLoader(dataset(26, seed=13), batch_size=2), epochs=2)
    record(out, "partial", trainer, {"m": model})


def custom(out: Path) -> None:
    """Seed 004's GAN train_step as one custom step, 20 samples in global batches of 6 (6, 6, 6, 2)."""
    G, D = gan(14)
    d_opt = torch.optim.Adam(D.parameters(), lr=0.01)
    g_opt = torch.optim.Adam(G.parameters(), lr=0.02)

    def train_step(batch, ctx):
        real, z1, z2 = batch
        logits = D(torch.cat([G(z1), real]))
        labels = torch.cat([torch.zeros(len(real), 1), torch.ones(len(real), 1)])
        d_loss = F.binary_cross_entropy_with_logits(logits, labels)
        ctx.minimize(d_loss, d_opt)
        g_loss = F.binary_cross_entropy_with_logits(D(G(z2)), torch.ones(len(real), 1))
        ctx.minimize(g_loss, g_opt)
        return {"d_loss": d_loss, "g_loss": g_loss}

    trainer = Trainer({"G": G, "D": D}, [Step.custom(train_step, [d_opt, g_opt], name="gan")], progress=False)
    trainer.fit(DataLoader(gan_data(20, seed=15), batch_size=3), epochs=2)
    record(out, "custom", trainer, {"G": G, "D": D}, losses={k: v.item() for k, v in trainer.losses.items()})


class StopOnRank1:
    """Asks for a stop on rank 1 only, after update 3: every rank must stop there."""

    def on_update_end(self, trainer, step, losses):
        if dist.get_rank() == 1 and trainer.updates == 3:
            trainer.stop("requested")


def stop_one(out: Path) -> None:
    model = mlp(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], callbacks=[StopOnRank1()], progress=False)
    trainer.fit(DataLoader(dataset(40, seed=17), batch_size=2), epochs=2)
    record(out, "stop", trainer, {"m": model})


def two_streams(out: Path) -> None:
    """A step on ("train", "valid"): a mean on train plus an Average on valid (its own normaliser,
    uneven shares: valid's global batches are 4, 4, 2 and cycle on their own)."""
    model = mlp(23)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(batch):
        (x, y), (vx, vy) = batch["train"], batch["valid"]
        return {"fit": F.mse_loss(model(x), y), "valid": Average(0.5 * (model(vx) - vy).pow(2).sum(), len(vx))}

    trainer = Trainer(model, [Step(loss, opt, name="w", data=("train", "valid"))], progress=False)
    data = {"train": DataLoader(dataset(18, seed=24), batch_size=2),
            "valid": DataLoader(dataset(10, seed=25), batch_size=2)}
    trainer.fit(data, epochs=2)
    record(out, "streams", trainer, {"m": model})


def batch_list(out: Path) -> None:
    """A list of batches (not a DataLoader): every rank reads all of it; the epoch ends together."""
    model = mlp(26)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = dataset(12, seed=27).tensors
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], progress=False)
    trainer.fit([(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)], epochs=2)
    record(out, "list", trainer, {"m": model})


def raise_on_every_rank(out: Path) -> None:
    """on_nonfinite="raise" with the NaN in rank 1's rows of global batch 1: every rank raises there."""
    model = mlp(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, [Step(mse(model), opt, name="fit")], progress=False)
    try:
        trainer.fit(DataLoader(dataset(17, seed=9, nan_at=9), batch_size=4), epochs=1)
        raised = None
    except FloatingPointError as error:
        raised = str(error)
    record(out, "raise", trainer, {"m": model}, raised=raised)


SCENARIOS = [accum, shuffled, token_average, empty_rank, lambda out: empty_rank(out, nonfinite=True), gan_flow,
             partial, custom, stop_one, two_streams, batch_list, raise_on_every_rank]


def resume_run(out: Path, kill_call: int | None) -> None:
    """Shuffled, accumulate=2 over 27 samples (global batches of 8, 8, 8, 3: two windows of two per
    epoch), a checkpoint after every update; rank 1 dies by SIGKILL in its ``kill_call``-th loss call."""
    random.seed(20)  # every generator a checkpoint holds, seeded: a fresh process's are the OS's
    np.random.seed(20)
    torch.manual_seed(20)
    model = mlp(21)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    calls = [0]

    def loss(batch):
        x, y = batch
        calls[0] += 1
        if kill_call is not None and dist.get_rank() == 1 and calls[0] == kill_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return F.mse_loss(model(x), y)

    trainer = Trainer(model, [Step(loss, opt, name="fit", accumulate=2)], callbacks=[Checkpoint(every_updates=1)],
                      out_dir=out / "run", progress=False)
    trainer.fit(DataLoader(dataset(27, seed=22), batch_size=4, shuffle=True), epochs=4, resume="latest")
    state = final_state(trainer)
    torch.save(state, out / f"resume.state.rank{dist.get_rank()}.pt")  # to say what differs, if anything
    if trainer.is_global_zero:
        (out / "resume.digest").write_text(f"{digest(state)} {trainer.updates}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["scenarios", "resume", "fsdp-resume"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-call", type=int, default=None)
    parser.add_argument("--then-fsdp-killed", type=Path, default=None)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)  # here, not at import: the suite imports this file for doctests
    trainflow.distributed.BUCKET_BYTES = 64  # tiny models, many buckets: their order across ranks is tested
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "scenarios":
        for scenario in SCENARIOS + fsdp_run.SCENARIOS:
            scenario(args.out)
        resume_run(args.out / "uninterrupted", None)  # what the SIGKILL test's resumed run must end as
        fsdp_run.resume_run(args.out / "fsdp_uninterrupted", None)  # and the fsdp one's
        if dist.get_rank() == 0:
            (args.out / "scenarios.done").write_text("ok\n")
        dist.barrier()
        resume_run(args.out / "killed", 12)  # rank 1 dies by SIGKILL in update 6's second chunk
    elif args.mode == "resume":
        resume_run(args.out, args.kill_call)
        if args.then_fsdp_killed is not None:  # the fsdp run whose rank 1 dies mid-window ends this launch
            dist.barrier()
            fsdp_run.resume_run(args.then_fsdp_killed, 12)
    else:
        fsdp_run.resume_run(args.out, args.kill_call)
    # Every result is written. Leave together (a barrier, so that no rank tears the group down
    # while another still talks to it), then skip the interpreter's finalization: gloo's worker
    # threads can still hold tensors then, and freeing them at that point has aborted a rank
    # ("terminate called without an active exception") after a run that had passed.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
