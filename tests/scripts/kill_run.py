"""A training run that tests/test_kill.py kills and resumes in real processes (not a test module).

    python tests/scripts/kill_run.py FLOW OUT [--epochs N] [--pause WHERE] [--throttle SECONDS]
    python tests/scripts/kill_run.py --serve

Every run is ``fit(..., resume="latest")`` into ``OUT``: the first one starts fresh, a restart
continues from the newest checkpoint in ``OUT/checkpoints``. When it resumes, the process
first reseeds every global RNG from the OS, so nothing can depend on a fresh process's state.

FLOW:
- ``gan``: D x3 / G x1 (D has dropout, its labels uniform noise), then a W step on a second
  data stream ("extra", cycling on its own); Adam, a StepLR on G, a MeanMetric; both loaders
  shuffle from the global RNG. A checkpoint after every update (and epoch). 3 epochs, 30 updates.
- ``accum``: a classifier with dropout, ``accumulate=3`` over 13 batches (an uneven last window),
  SGD with momentum and a per-update StepLR, train and val accuracy, validation after each
  epoch; checkpoints every 2 updates and every epoch, keeping the best by ``val/acc``.
  4 epochs, 20 updates.
- every set-up of ``setups.py`` (shuffled, workers, weighted, ..., freeze_order), one concern each.
- the one-shot searches of ``nas_setups.py`` (``darts``: second order with Gumbel; ``spos``).

It prints ``update N`` (flushed) after each update, then ``done ...`` and ``digest HEX``: a
SHA-256 over every tensor and number of the trainer's final state (models, optimizers,
schedulers, metrics, loop counters, stream positions and RNG states), and its last logs.

``--pause WHERE`` prints ``paused WHERE`` and sleeps at one moment, for the test to kill it there:
  ``forward:U:M``  inside the M-th loss call of update U (M > 1: mid-accumulation window)
  ``val:E``        inside the validation after epoch E
  ``write:U``      halfway through writing checkpoint U's temporary file (the first save at U)
  ``replace:U``    after checkpoint U's temporary file is complete and fsynced, before its rename
  ``index:U``      after checkpoint U is complete, before ``index.json`` is replaced
  ``end``          after ``fit`` has returned, before the run prints its result
While paused, it prints ``signal taken`` once Preemption has taken a first signal.
``--throttle S`` sleeps S seconds after each update (so a kill can land at a random moment).

``--serve`` is a fork server: it imports torch once, then for each stdin line
``run {"argv": [...], "log": PATH}`` forks a child that runs ``main(argv)`` with stdout and
stderr in PATH and answers ``pid N``; ``wait N`` answers ``exit CODE`` (``-SIG`` when killed
by a signal). Each child is a real process (own pid, real signals), started in milliseconds
instead of the seconds that importing torch takes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainflow import Step, Trainer, checkpoint
from trainflow.callbacks import Checkpoint, CSVLogger, Preemption

from nas_setups import EPOCHS as NAS_EPOCHS, SETUPS as NAS_SETUPS
from setups import EPOCHS as SETUP_EPOCHS, SETUPS

torch.set_num_threads(1)

EPOCHS = {"gan": 3, "accum": 4}
#: updates per epoch, for the test's kill plans
UPDATES_PER_EPOCH = {"gan": 10, "accum": 5}


def loader(n: int, features: int, batch_size: int, seed: int, classes: int = 0, shuffle: bool = True) -> DataLoader:
    g = torch.Generator().manual_seed(seed)  # the data is fixed; only the shuffle draws from the global RNG
    x = torch.randn(n, features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g) if classes else torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class Pauser:
    """Counts loss calls per update; pauses where ``--pause`` says."""

    def __init__(self, where: str | None) -> None:
        self.where = where or ""
        self.trainer: Trainer | None = None
        self._update = -1
        self._calls = 0

    def pause(self, what: str) -> None:
        print(f"paused {what}", flush=True)
        # the test kills the process long before this ends; a first signal that Preemption has
        # taken is announced, so that a test sends a second one only then (two signals that
        # arrive before the process runs again merge into one)
        preemption = [cb for cb in (self.trainer.events.callbacks if self.trainer else ()) if isinstance(cb, Preemption)]
        announced = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.01)
            if not announced and any(cb.signal is not None for cb in preemption):
                print("signal taken", flush=True)
                announced = True
        print("pause ended without a kill", flush=True)
        os._exit(3)

    def loss_call(self) -> None:
        update = self.trainer.updates + 1  # the update being computed
        if update != self._update:
            self._update, self._calls = update, 0
        self._calls += 1
        if self.where == f"forward:{update}:{self._calls}":
            self.pause(self.where)

    def val_call(self) -> None:
        if self.where == f"val:{self.trainer.epoch}":
            self.pause(self.where)

    def patch_saving(self) -> None:
        """Pause inside trainflow.checkpoint.save or index.json's replace, as --pause says."""
        kind, _, at = self.where.partition(":")
        if kind not in ("write", "replace", "index"):
            return
        update = int(at)
        name = checkpoint.path_for(".", update).name[: len("ckpt-u000000000")]
        real_save, real_replace = torch.save, os.replace

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if (kind == "write" and isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT
                    and obj["state"]["loop"]["updates"] == update):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                self.pause(self.where)
            real_save(obj, f, *args, **kwargs)

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            target = Path(dst).name
            if kind == "replace" and target.startswith(name):
                self.pause(self.where)
            if kind == "index" and target == "index.json":
                with open(src, encoding="utf-8") as f:
                    if (json.load(f)["latest"] or "").startswith(name):
                        self.pause(self.where)
            real_replace(src, dst, *args, **kwargs)

        torch.save, os.replace = save, replace


class Printer:
    """``update N`` after each update, flushed; then an optional sleep."""

    def __init__(self, throttle: float) -> None:
        self.throttle = throttle

    def on_update_end(self, trainer: Trainer, step: Step, losses: dict) -> None:
        print(f"update {trainer.updates}", flush=True)
        if self.throttle:
            time.sleep(self.throttle)


def seed_everything() -> None:
    """Python's and NumPy's generators are seeded from the OS at start: seed them too (they are in the state)."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def gan(out: Path, pauser: Pauser, printer: Printer) -> tuple[Trainer, dict, dict]:
    seed_everything()
    gen = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
    disc = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.2), nn.Dropout(0.2), nn.Linear(16, 1))
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    g_opt = torch.optim.Adam(gen.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.StepLR(g_opt, step_size=2, gamma=0.9)
    d_mean = torchmetrics.MeanMetric()

    def d_loss(batch):
        pauser.loss_call()
        real = batch[0]
        fake = gen(torch.randn(len(real), 3)).detach()
        logits = torch.cat([disc(real), disc(fake)])
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(real), 1)]) + 0.05 * torch.rand(2 * len(real), 1)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        d_mean.update(loss.detach())
        return loss

    def g_loss(batch):
        pauser.loss_call()
        n = len(batch[0])
        return F.binary_cross_entropy_with_logits(disc(gen(torch.randn(n, 3))), torch.ones(n, 1))

    def w_loss(batch):
        pauser.loss_call()
        return F.mse_loss(disc(batch[0]), batch[1])

    steps = [
        Step(d_loss, d_opt, name="D", repeat=3),
        Step(g_loss, g_opt, name="G", scheduler=sched),
        Step(w_loss, d_opt, name="W", data="extra"),
    ]
    callbacks = [CSVLogger(), printer, Checkpoint(every_updates=1, every_epochs=1, keep_last=3), Preemption()]
    trainer = Trainer({"G": gen, "D": disc}, steps, metrics={"train/d": d_mean}, callbacks=callbacks,
                      device="cpu", out_dir=out)
    data = {"train": loader(64, 4, 8, seed=1), "extra": loader(24, 4, 8, seed=2)}
    return trainer, data, {}


def accum(out: Path, pauser: Pauser, printer: Printer) -> tuple[Trainer, dict, dict]:
    seed_everything()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.8)
    train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")
    val_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3, average="micro")

    def loss(batch):
        pauser.loss_call()
        x, y = batch
        logits = model(x)
        train_acc.update(logits.detach(), y)
        return F.cross_entropy(logits, y)

    def val_step(batch):
        pauser.val_call()
        x, y = batch
        logits = model(x)
        val_acc.update(logits, y)
        return F.cross_entropy(logits, y)

    checkpoints = Checkpoint(every_updates=2, every_epochs=1, keep_last=2, monitor="val/acc", mode="max", keep_best=1)
    trainer = Trainer(
        model, [Step(loss, opt, name="fit", accumulate=3, scheduler=sched)],
        metrics={"train/acc": train_acc, "val/acc": val_acc},
        callbacks=[CSVLogger(), printer, checkpoints, Preemption()], device="cpu", out_dir=out,
    )
    fit_kwargs = {"val_data": loader(30, 6, 10, seed=4, classes=3, shuffle=False), "val_step": val_step}
    return trainer, loader(100, 6, 8, seed=3, classes=3), fit_kwargs


FLOWS = {"gan": gan, "accum": accum, **SETUPS, **NAS_SETUPS}
EPOCHS.update(SETUP_EPOCHS)
EPOCHS.update(NAS_EPOCHS)
#: callback states that are part of the run's numbers (others, such as CSVLogger's rows, hold wall times)
HASHED_CALLBACKS = ("path_sampler",)


def digest(obj: Any) -> str:
    """SHA-256 of every tensor (dtype, shape, bytes), number and string in ``obj``."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(str((obj.dtype, tuple(obj.shape))).encode())
            h.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            h.update(f"[{len(obj)}".encode())
            for v in obj:
                feed(v)
        else:
            h.update(repr(obj).encode())

    feed(obj)
    return h.hexdigest()


def final_state(trainer: Trainer) -> dict[str, Any]:
    """The whole state (callbacks aside, but for HASHED_CALLBACKS: CSVLogger's rows hold wall times),
    flattened one level, and logs."""
    state = {k: v for k, v in trainer.state_dict().items() if k != "callbacks"}
    callbacks = trainer.state_dict()["callbacks"]
    state.update({f"callbacks.{k}": callbacks[k] for k in HASHED_CALLBACKS if k in callbacks})
    loop = state.pop("loop")
    return {**state, **{f"loop.{k}": v for k, v in loop.items()}, "logs": trainer.logs}


def reseed_from_os() -> None:
    """A restarted process starts from other RNG states: resuming must not depend on them."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kill_run.py")
    parser.add_argument("flow", choices=sorted(FLOWS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--pause", default=None)
    parser.add_argument("--throttle", type=float, default=0.0)
    args = parser.parse_args(argv)
    pauser = Pauser(args.pause)
    seed_everything()  # the set-ups build their models from the seeded global RNG
    trainer, data, fit_kwargs = FLOWS[args.flow](args.out, pauser, Printer(args.throttle))
    pauser.trainer = trainer
    pauser.patch_saving()
    if checkpoint.latest(args.out / "checkpoints") is not None:
        reseed_from_os()
    trainer.fit(data, epochs=args.epochs or EPOCHS[args.flow], resume="latest", **fit_kwargs)
    if args.pause == "end":  # fit has returned (its last checkpoint written); the process has not
        pauser.pause("end")
    print(f"done updates={trainer.updates} epoch={trainer.epoch} stop_reason={trainer.stop_reason}", flush=True)
    parts = final_state(trainer)
    print("parts " + " ".join(f"{name}={digest(part)[:12]}" for name, part in parts.items()), flush=True)
    print(f"digest {digest(parts)}", flush=True)
    return 0


def serve() -> None:
    torch.optim.SGD([nn.Parameter(torch.zeros(1))])  # the first optimizer imports torch._dynamo (seconds): once, here
    # Ctrl-C raises KeyboardInterrupt, as in a script started from a terminal, even when the tests
    # run in the background of a non-interactive shell (which starts them with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "run":
            spec = json.loads(arg)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    log = os.open(spec["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(log, 1)
                    os.dup2(log, 2)
                    os.close(log)
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    os.close(null)
                    code = main(spec["argv"])
                except SystemExit as error:
                    code = error.code if isinstance(error.code, int) else 1
                except BaseException:  # KeyboardInterrupt included: print it, exit 1
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            print(f"pid {pid}", flush=True)
        elif command == "wait":
            _, status = os.waitpid(int(arg), 0)
            print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(main(sys.argv[1:]))
