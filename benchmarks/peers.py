"""trainflow side by side with a hand-written loop, Lightning, Ignite and Keras 3, on two flows.

- ``mlp``: seed 004's MLP (784-64-64-10 ReLU), ``SGD(lr=1e-3)``, cross-entropy, batch 64, with
  validation (the mean cross-entropy over a held-out loader) after every epoch;
- ``gan``: an MLP generator (latent 64 -> 128 -> 784, tanh) and discriminator (784 -> 128 -> 1),
  Adam for both, BCE-with-logits, the cycle D, D, D, G: one update per batch.

Every framework is fed the same ``DataLoader(TensorDataset(...), batch_size=64, shuffle=True)``
(validation: an unshuffled one), does the same updates from the same seed, and is written the
way its documentation shows: trainflow ``Trainer.fit``; Lightning a ``LightningModule`` (manual
optimization for the GAN) under ``lightning.Trainer``; Ignite ``create_supervised_trainer`` /
an ``Engine`` whose process function runs the cycle; Keras 3 on its torch backend, ``fit``
and a custom ``train_step`` (MLP), a custom ``train_step`` (GAN). Only ``fit`` (or the hand
loop) is timed, validation included; rounds are interleaved, each framework once per round in
a rotating order, after one untimed warm-up run each. The table shows the median µs per
optimizer update and the ratio to the hand loop's median. The warm-up runs also check that
each framework that trains the same torch modules ends with the hand loop's weights
(``torch.equal``); trainflow must (the script exits 1 otherwise).

A framework that is not installed is reported as such and the others are still measured:
``pip install "trainflow[bench]"`` installs Lightning, Ignite and Keras.

Run:
    OMP_NUM_THREADS=1 python benchmarks/peers.py --threads 1          # 5 rounds, as in docs/performance.md
    OMP_NUM_THREADS=1 python benchmarks/peers.py --threads 1 --clock cpu   # CPU time: steadier on a busy machine
    python benchmarks/peers.py --quick                                 # smoke run
    python benchmarks/peers.py --flow gan --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is imported anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import trainflow  # noqa: E402
from trainflow import Step, Trainer  # noqa: E402

BATCH = 64
LATENT = 64
SEED = 4
#: the clock every runner reads: wall time by default; ``--clock cpu``: this process's CPU time, which
#: other jobs on a shared machine do not inflate (every contender runs in this one thread)
clock = time.perf_counter

#: a runner: (train loader, validation loader, epochs) -> (seconds in fit, updates, trained torch modules or None)
Runner = Callable[[DataLoader, DataLoader, int], tuple[float, int, list[nn.Module] | None]]


# ---------------------------------------------------------------------------- data and models


def loaders(flow: str, n_batches: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1234)
    n = n_batches * BATCH
    if flow == "mlp":
        x, y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
        vx, vy = torch.randn(n // 4, 784, generator=g), torch.randint(0, 10, (n // 4,), generator=g)
        train, val = TensorDataset(x, y), TensorDataset(vx, vy)
    else:
        train = TensorDataset(torch.rand(n, 784, generator=g) * 2 - 1)
        val = TensorDataset(torch.zeros(0, 784))  # the GAN flow has no validation
    return DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(val, batch_size=BATCH)


def build_mlp() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, torch.optim.SGD(model.parameters(), lr=1e-3)


def build_gan() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(SEED)
    gen = nn.Sequential(nn.Linear(LATENT, 128), nn.ReLU(), nn.Linear(128, 784), nn.Tanh())
    disc = nn.Sequential(nn.Linear(784, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))
    d_opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    return gen, disc, d_opt, g_opt


def d_loss(gen: nn.Module, disc: nn.Module, real: torch.Tensor) -> torch.Tensor:
    fake = gen(torch.randn(real.shape[0], LATENT)).detach()
    real_logits, fake_logits = disc(real), disc(fake)
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def g_loss(gen: nn.Module, disc: nn.Module, real: torch.Tensor) -> torch.Tensor:
    logits = disc(gen(torch.randn(real.shape[0], LATENT)))
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


# ---------------------------------------------------------------------------- hand-written loops


def hand_mlp(train: DataLoader, val: DataLoader, epochs: int):
    model, opt = build_mlp()
    start, n = clock(), 0
    for _ in range(epochs):
        model.train()
        for x, y in train:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            n += 1
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in val:
                total += F.cross_entropy(model(x), y, reduction="sum").item()
                count += len(y)
        val_loss = total / count  # noqa: F841  (what the loop would print or log)
    return clock() - start, n, [model]


def hand_gan(train: DataLoader, val: DataLoader, epochs: int):
    gen, disc, d_opt, g_opt = build_gan()
    gen.train(), disc.train()
    start, n = clock(), 0
    for _ in range(epochs):
        for (real,) in train:
            if n % 4 < 3:
                d_opt.zero_grad()
                d_loss(gen, disc, real).backward()
                d_opt.step()
            else:
                g_opt.zero_grad()
                g_loss(gen, disc, real).backward()
                g_opt.step()
            n += 1
    return clock() - start, n, [gen, disc]


# ---------------------------------------------------------------------------- trainflow


def trainflow_mlp(train: DataLoader, val: DataLoader, epochs: int):
    model, opt = build_mlp()

    def ce(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    trainer = Trainer(model, Step(ce, opt), device="cpu", progress=False)
    start = clock()
    trainer.fit(train, epochs=epochs, val_data=val, val_step=ce)
    return clock() - start, trainer.updates, [model]


def trainflow_gan(train: DataLoader, val: DataLoader, epochs: int):
    gen, disc, d_opt, g_opt = build_gan()
    steps = [Step(lambda b: d_loss(gen, disc, b[0]), d_opt, name="D", repeat=3),
             Step(lambda b: g_loss(gen, disc, b[0]), g_opt, name="G")]
    trainer = Trainer({"G": gen, "D": disc}, steps, device="cpu", progress=False)
    start = clock()
    trainer.fit(train, epochs=epochs)
    return clock() - start, trainer.updates, [gen, disc]


# ---------------------------------------------------------------------------- Lightning


def lightning_runners() -> dict[str, Runner]:
    import lightning as L

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    def trainer(epochs: int) -> Any:
        return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.opt = build_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.model(x), y))

        def configure_optimizers(self):
            return self.opt

    class GAN(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.gen, self.disc, self.d_opt, self.g_opt = build_gan()
            self.n = 0

        def training_step(self, batch, batch_idx):
            d_opt, g_opt = self.optimizers()
            real = batch[0]
            opt, loss = (d_opt, d_loss) if self.n % 4 < 3 else (g_opt, g_loss)
            opt.zero_grad()
            self.manual_backward(loss(self.gen, self.disc, real))
            opt.step()
            self.n += 1

        def configure_optimizers(self):
            return [self.d_opt, self.g_opt]

    def run(module_cls, with_val):
        def runner(train, val, epochs):
            module = module_cls()
            fit = trainer(epochs)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # "the dataloader does not have many workers" and the like
                start = clock()
                fit.fit(module, train, val if with_val else None)
                elapsed = clock() - start
            models = [module.model] if with_val else [module.gen, module.disc]
            return elapsed, fit.global_step if with_val else module.n, models
        return runner

    return {"mlp": run(MLP, True), "gan": run(GAN, False)}


# ---------------------------------------------------------------------------- Ignite


def ignite_runners() -> dict[str, Runner]:
    from ignite.engine import Engine, Events, create_supervised_evaluator, create_supervised_trainer
    from ignite.metrics import Loss

    def mlp(train, val, epochs):
        model, opt = build_mlp()
        trainer = create_supervised_trainer(model, opt, F.cross_entropy)
        evaluator = create_supervised_evaluator(model, metrics={"loss": Loss(F.cross_entropy)})
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run(val))
        start = clock()
        trainer.run(train, max_epochs=epochs)
        return clock() - start, trainer.state.iteration, [model]

    def gan(train, val, epochs):
        gen, disc, d_opt, g_opt = build_gan()

        def update(engine, batch):
            real = batch[0]
            opt, loss = (d_opt, d_loss) if (engine.state.iteration - 1) % 4 < 3 else (g_opt, g_loss)
            gen.train(), disc.train()
            opt.zero_grad()
            value = loss(gen, disc, real)
            value.backward()
            opt.step()
            return value.item()

        trainer = Engine(update)
        start = clock()
        trainer.run(train, max_epochs=epochs)
        return clock() - start, trainer.state.iteration, [gen, disc]

    return {"mlp": mlp, "gan": gan}


# ---------------------------------------------------------------------------- Keras 3 (torch backend)


def keras_runners() -> dict[str, Runner]:
    import keras

    if keras.backend.backend() != "torch":
        raise ImportError(f"Keras runs on the {keras.backend.backend()!r} backend here, not torch")

    def mlp_model(cls=keras.Sequential):
        keras.utils.set_random_seed(SEED)
        layers = [keras.Input(shape=(784,)), keras.layers.Dense(64, activation="relu"),
                  keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
        return cls(layers)

    class CustomStep(keras.Sequential):
        """The custom ``train_step`` of Keras's guide for the torch backend."""

        def train_step(self, data):
            x, y = data
            self.zero_grad()
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            loss.backward()
            weights = self.trainable_weights
            with torch.no_grad():
                self.optimizer.apply([v.value.grad for v in weights], weights)
            return self.compute_metrics(x, y, None, None) | {"loss": loss}

    def run_mlp(cls):
        def runner(train, val, epochs):
            model = mlp_model(cls)
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-3),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
            start = clock()
            history = model.fit(train, validation_data=val, epochs=epochs, verbose=0, shuffle=False)
            elapsed = clock() - start
            assert len(history.history["val_loss"]) == epochs
            return elapsed, epochs * len(train), None
        return runner

    class KerasGAN(keras.Model):
        def __init__(self):
            super().__init__()
            keras.utils.set_random_seed(SEED)
            self.gen = keras.Sequential([keras.Input(shape=(LATENT,)), keras.layers.Dense(128, activation="relu"),
                                         keras.layers.Dense(784, activation="tanh")])
            self.disc = keras.Sequential([keras.Input(shape=(784,)), keras.layers.Dense(128),
                                          keras.layers.LeakyReLU(0.2), keras.layers.Dense(1)])
            self.n = 0
            self.built = True  # its parts are built; the model itself is never called

        def compile(self, d_opt, g_opt):
            super().compile(jit_compile=False)
            self.d_opt, self.g_opt = d_opt, g_opt

        def train_step(self, data):
            real = data[0] if isinstance(data, (list, tuple)) else data
            d_turn = self.n % 4 < 3
            model, opt = (self.disc, self.d_opt) if d_turn else (self.gen, self.g_opt)
            model.zero_grad()
            fake = self.gen(torch.randn(real.shape[0], LATENT), training=True)
            if d_turn:
                real_logits, fake_logits = self.disc(real, training=True), self.disc(fake.detach(), training=True)
                loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
            else:
                logits = self.disc(fake, training=True)
                loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            loss.backward()
            weights = model.trainable_weights
            with torch.no_grad():
                opt.apply([v.value.grad for v in weights], weights)
            self.n += 1
            return {"loss": loss}

    def gan(train, val, epochs):
        model = KerasGAN()
        model.compile(keras.optimizers.Adam(2e-4, beta_1=0.5), keras.optimizers.Adam(2e-4, beta_1=0.5))
        start = clock()
        model.fit(train, epochs=epochs, verbose=0, shuffle=False)
        return clock() - start, model.n, None

    return {"mlp": run_mlp(keras.Sequential), "mlp/train_step": run_mlp(CustomStep), "gan": gan}


# ---------------------------------------------------------------------------- measuring

PEERS: dict[str, Callable[[], dict[str, Runner]]] = {
    "lightning": lightning_runners, "ignite": ignite_runners, "keras": keras_runners,
}


def contenders(flow: str, skip: set[str]) -> tuple[dict[str, Runner], dict[str, str]]:
    """The runners of ``flow`` by name (hand loop first), and why each missing peer is missing."""
    runners: dict[str, Runner] = {"hand": {"mlp": hand_mlp, "gan": hand_gan}[flow],
                                  "trainflow": {"mlp": trainflow_mlp, "gan": trainflow_gan}[flow]}
    missing = {}
    for peer, load in PEERS.items():
        if peer in skip:
            missing[peer] = "skipped (--skip)"
            continue
        try:
            found = load()
        except ImportError as error:
            missing[peer] = f"not installed ({error}); pip install \"trainflow[bench]\""
            continue
        for key, runner in found.items():
            if key.split("/")[0] == flow:
                runners[peer + key[len(flow):].replace("/", " ")] = runner
    return runners, missing


def same_weights(a: list[nn.Module] | None, b: list[nn.Module]) -> bool | None:
    if a is None:
        return None
    pa, pb = [p for m in a for p in m.parameters()], [p for m in b for p in m.parameters()]
    return len(pa) == len(pb) and all(torch.equal(x, y) for x, y in zip(pa, pb))


def measure(flow: str, rounds: int, epochs: int, n_batches: int, skip: set[str],
            warmup: bool = True) -> tuple[dict, dict, dict]:
    """Per framework: µs per update of each round, whether its weights are the hand loop's, why one is missing.

    The weights are compared after the warm-up runs (2 epochs), or without warm-up after the first round.
    """
    runners, missing = contenders(flow, skip)
    train, val = loaders(flow, n_batches)
    same: dict[str, bool | None] = {}
    if warmup:
        _, _, hand_models = runners["hand"](train, val, 2)  # the weights every torch peer must reach
        for name, runner in runners.items():
            same[name] = same_weights(runner(train, val, 2)[2], hand_models)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # a rotating order (the hand loop first in round 0)
            gc.collect()
            elapsed, updates, models = runners[name](train, val, epochs)
            assert updates == epochs * len(train), (name, updates)
            times[name].append(elapsed / updates * 1e6)
            if not warmup and r == 0:
                hand_models = models if name == "hand" else hand_models
                same[name] = same_weights(models, hand_models)
    return times, same, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed runs per framework (default 5)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per timed run (default 10)")
    parser.add_argument("--batches", type=int, default=32, help="train batches of 64 per epoch (default 32)")
    parser.add_argument("--flow", choices=["all", "mlp", "gan"], default="all")
    parser.add_argument("--skip", default="", help="comma-separated peers not to run, e.g. keras,lightning")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time (default) or this process's CPU time (steadier on a shared machine)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 1 epoch of 8 batches, no warm-up (weights checked on that round)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.batches = 1, 1, 8
    if min(args.rounds, args.epochs, args.batches) < 1:
        parser.error("--rounds, --epochs and --batches must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(PEERS)
    if unknown:
        parser.error(f"--skip: unknown peer(s) {sorted(unknown)}; choose from {sorted(PEERS)}")
    print(f"trainflow {trainflow.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, CPU, torch.get_num_threads()={torch.get_num_threads()}")
    versions = []
    for module in ("lightning", "ignite", "keras"):
        with contextlib.suppress(ImportError):
            versions.append(f"{module} {__import__(module).__version__}")
    print(", ".join(versions) or "no peer installed")
    print(f"rounds={args.rounds} epochs/run={args.epochs} batches/epoch={args.batches} batch={BATCH} clock={args.clock}")
    ok = True
    for flow in (["mlp", "gan"] if args.flow == "all" else [args.flow]):
        times, same, missing = measure(flow, args.rounds, args.epochs, args.batches, skip, warmup=not args.quick)
        hand = statistics.median(times["hand"])
        print(f"\n{flow}: {'validation after every epoch' if flow == 'mlp' else 'D, D, D, G'}")
        print(f"{'framework':<22} {'us/update':>10} {'x hand':>7}  weights = hand loop's")
        for name, values in times.items():
            med = statistics.median(values)
            verdict = {True: "yes", False: "NO", None: "-"}[same[name]]
            print(f"{name:<22} {med:>10.1f} {med / hand:>7.3f}  {verdict}")
        for peer, why in missing.items():
            print(f"{peer:<22} {why}")
        for name, values in times.items():
            print(f"  {name} per round: " + " ".join(f"{t:.1f}" for t in values))
        ok = ok and bool(same["trainflow"])
    print("\nmedian over rounds; x hand = median / the hand loop's median; '-': other weights (Keras builds its own)")
    if not ok:
        print("FAIL: trainflow and the hand-written loop ended with different weights", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
