"""Checkpoint cost: saving the trainer's state, and resuming from it mid-epoch.

Save, for an MLP trained with Adam (the checkpoint holds the weights and Adam's two moments,
about 3x the model), in the same folder, interleaved round by round (in a rotating order, after
an ``os.sync()`` that is not timed, so that no variant pays for another's writeback):

- ``torch.save``: a bare ``torch.save(state, path)`` of the already-built trainer state (no fsync);
- ``+ fsync``: the same, then ``os.fsync`` of the file: what durability costs by itself;
- ``checkpoint.save``: ``trainflow.checkpoint.save(state, path)`` of the built state: temporary
  file, fsync, atomic rename, fsync of the folder;
- ``state_dict + save``: ``checkpoint.save(trainer.state_dict(), path)``, building the state
  included (what ``Checkpoint`` does);
- ``Checkpoint``: the callback's whole save (``on_update_end`` with ``every_updates=1``):
  the above plus ``index.json`` and pruning ``keep_last``.

The table gives the median and the minimum of the rounds; the ratios compare minima (on a
shared disk, noise only adds time): each variant over the bare ``torch.save`` (target for
``state_dict + save``: <= 1.10x), and over ``+ fsync``, the fair baseline for a durable save.

Resume, for a run stopped mid-epoch (at ``--resume-batch`` of an epoch over a map-style
``DataLoader`` of 50,000 samples in batches of 64, shuffled): the time of
``fit(..., resume=path)`` up to the first update (``checkpoint.load``, ``load_state_dict``, and
the replay of the data stream to where it was), against a bare ``torch.load`` of the same file,
and against a replay that loads every skipped batch (the same data as an iterable, which must
be iterated).

Run:
    python benchmarks/checkpoint.py                 # 4 MB and 50 MB models, 9 rounds
    python benchmarks/checkpoint.py --quick         # smoke run
    python benchmarks/checkpoint.py --dir /scratch  # measure another disk
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import trainflow
from trainflow import Step, Trainer, checkpoint
from trainflow.callbacks import Checkpoint

#: model name -> (width, depth) of a square MLP: parameters ~ depth * width^2
MODELS = {"4 MB": (1024, 1), "50 MB": (1808, 4)}
SAMPLES, BATCH, FEATURES = 50_000, 64, 32


def build(width: int, depth: int, out_dir: Path, callbacks: list | None = None) -> Trainer:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(FEATURES, width)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    layers += [nn.ReLU(), nn.Linear(width, 1)]
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def mse(batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(model(x), y)

    return Trainer(model, [Step(mse, opt, name="fit")], callbacks=callbacks or [], device="cpu", out_dir=out_dir)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(SAMPLES, FEATURES, generator=g), torch.randn(SAMPLES, 1, generator=g))


def small_batches(n: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return DataLoader(TensorDataset(torch.randn(n * 8, FEATURES, generator=g), torch.randn(n * 8, 1, generator=g)),
                      batch_size=8)


def _timed(fn: Callable[[], Any]) -> float:
    gc.collect()
    os.sync()  # no dirty pages from the variant before: each starts with the disk idle
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bare_save(state: dict, path: Path, fsync: bool) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def measure_save(name: str, width: int, depth: int, rounds: int, folder: Path) -> dict[str, Any]:
    callback = Checkpoint(every_updates=1, every_epochs=None, keep_last=2)
    trainer = build(width, depth, folder / "run", [callback])
    trainer.fit(small_batches(), max_updates=2)  # Adam's moments exist; the callback's folder is set up
    callback.on_fit_start(trainer)  # (fit ended: arm it again, as during a run)
    state = trainer.state_dict()
    bytes_ = checkpoint.save(state, folder / "size.pt").stat().st_size
    variants: dict[str, Callable[[int], Any]] = {
        "torch.save": lambda i: _bare_save(state, folder / "bare.pt", fsync=False),
        "+ fsync": lambda i: _bare_save(state, folder / "bare.pt", fsync=True),
        "checkpoint.save": lambda i: checkpoint.save(state, checkpoint.path_for(folder / "plain", i)),
        "state_dict + save": lambda i: checkpoint.save(trainer.state_dict(), checkpoint.path_for(folder / "built", i)),
        "Checkpoint": lambda i: _callback_save(callback, trainer, i),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds + 1):  # round 0 warms the page cache and allocator up; not counted
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # each variant first in some round
            t = _timed(lambda: variants[key](r))
            if r:
                times[key].append(t)
        for sub in ("plain", "built"):  # keep the folders small, like keep_last would
            shutil.rmtree(folder / sub, ignore_errors=True)
    callback.on_fit_end(trainer)
    return {"model": name, "bytes": bytes_, "times": times}


def _callback_save(callback: Checkpoint, trainer: Trainer, i: int) -> None:
    trainer.updates += 1  # a new update each time: the callback saves a new file and prunes
    callback.on_update_end(trainer, None, {})


class Iterated(IterableDataset):
    """The same batches as the DataLoader, as a generator: a replay must iterate it (no sampler to skip)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator:
        yield from self.loader


def measure_resume(name: str, width: int, depth: int, rounds: int, folder: Path, at_batch: int) -> dict[str, Any]:
    data = dataset()
    loaders = {
        "map-style DataLoader": DataLoader(data, batch_size=BATCH, shuffle=True),
        "iterated (loads each skipped batch)": Iterated(DataLoader(data, batch_size=BATCH, shuffle=True)),
    }
    # Two real updates (Adam's moments exist), then the position moved to batch `at_batch` of the
    # epoch: the replay skips that many batches; training 400 updates of the big model first
    # would only make the benchmark slow.
    trainer = build(width, depth, folder)
    trainer.fit(loaders["map-style DataLoader"], max_updates=2)
    state = trainer.state_dict()
    state["loop"]["updates"] = state["data"]["streams"]["train"]["consumed"] = at_batch
    path = checkpoint.save(state, checkpoint.path_for(folder, at_batch))
    times: dict[str, list[float]] = {"torch.load": [], **{key: [] for key in loaders}}
    for r in range(rounds + 1):  # round 0 warms up; not counted
        t = _timed(lambda: torch.load(path, map_location="cpu", weights_only=True))
        if r:
            times["torch.load"].append(t)
        for key, loader in loaders.items():
            trainer = build(width, depth, folder)
            t = _timed(lambda: trainer.fit(loader, max_updates=at_batch, resume=path))  # stops before an update
            assert trainer.updates == at_batch and trainer.epoch_progress[0] == at_batch
            if r:
                times[key].append(t)
    return {"model": name, "times": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="2 rounds, the small model only")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--resume-batch", type=int, default=400, help="the batch of the epoch to resume at")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    models = {"4 MB": MODELS["4 MB"]} if args.quick else MODELS
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    root = Path(tempfile.mkdtemp(prefix="trainflow-ckpt-bench-", dir=args.dir))
    print(f"trainflow {trainflow.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, threads {torch.get_num_threads()}, folder {root}")
    try:
        saves = [measure_save(name, w, d, rounds, root / f"save-{i}") for i, (name, (w, d)) in enumerate(models.items())]
        resumes = [measure_resume(name, w, d, rounds, root / f"resume-{i}", args.resume_batch)
                   for i, (name, (w, d)) in enumerate(models.items())]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nSave ({rounds} rounds; ms; ratios of the minima: noise from a shared disk only adds time)")
    print(f"{'model':<7} {'file':>8}  {'variant':<18} {'median':>8} {'min':>8} {'x torch.save':>13} {'x +fsync':>9}")
    for res in saves:
        best = {k: min(v) * 1e3 for k, v in res["times"].items()}
        for i, (key, values) in enumerate(res["times"].items()):
            head = f"{res['model']:<7} {res['bytes'] / 2**20:>6.1f}MB" if i == 0 else " " * 16
            print(f"{head}  {key:<18} {statistics.median(values) * 1e3:>8.1f} {best[key]:>8.1f} "
                  f"{best[key] / best['torch.save']:>12.2f}x {best[key] / best['+ fsync']:>8.2f}x")
    print(f"\nResume at batch {args.resume_batch} of {SAMPLES // BATCH + 1} (median of {rounds} rounds; ms)")
    print(f"{'model':<7} {'what':<54} {'ms':>8}")
    for res in resumes:
        for i, (key, values) in enumerate(res["times"].items()):
            label = "torch.load of the file" if key == "torch.load" else f"fit(resume=...), {key}"
            print(f"{res['model'] if i == 0 else '':<7} {label:<54} {statistics.median(values) * 1e3:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
