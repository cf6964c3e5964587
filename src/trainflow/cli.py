"""The ``trainflow`` command: run a built-in example and say where its artifacts are.

``trainflow run mlp`` trains seed 004's MLP on the 8x8 digits and writes ``runs/mlp/``;
``trainflow run nas-digits`` searches architectures for them (seed 002);
``trainflow run --list`` lists the examples. Each example saves a checkpoint after every epoch
in ``<out>/checkpoints``; ``trainflow run mlp --resume`` continues from the newest one. On
SIGTERM or Ctrl-C the run stops at the next update boundary with a checkpoint, the command
says how to resume it, and exits with code 0. ``nas-digits`` keeps its trials in its
experiment's storage instead: after Ctrl-C, ``--resume`` runs the rest (the trial that was cut
short again).

Run folders are versioned, as Lightning's log folders are: a run never writes over an earlier
one. When ``runs/mlp`` already holds a run, the same command writes ``runs/mlp-2`` (then
``runs/mlp-3``...) and says so; ``--resume`` continues the newest of them (or the ``--out``
folder given), and on a finished run says at which epoch it finished and how to train further
(``--resume --epochs N``).

``trainflow run mlp --nproc 2`` trains with 2 processes: the command launches ``torchrun
--standalone --nproc-per-node 2`` on itself (the run folder chosen first, and passed to every
rank), and the example's ``Trainer`` trains data-parallel (see :mod:`trainflow.distributed`);
rank 0 prints and writes the artifacts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from trainflow import checkpoint

__all__ = ["main"]

#: what the examples write, in the order they are listed after a run (trials.csv to history.png: nas-digits;
#: best_arch.json and alphas.png: darts-digits too)
ARTIFACTS = ("metrics.csv", "curves.png", "weights.pt", "samples.png", "trials.csv", "best_arch.json", "history.png",
             "alphas.png")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` that accepts whole numbers >= ``minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number. Received: {text!r}. Use e.g. 5.") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}. Received: {value}. Use e.g. 5.")
        return value

    return convert


def _parsers(names: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``trainflow`` parser and its ``run`` sub-parser."""
    parser = argparse.ArgumentParser(prog="trainflow", description="Complex PyTorch training flows.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a built-in example",
        description="Run a built-in example; it writes metrics.csv, curves.png and weights.pt.",
    )
    run.add_argument("example", nargs="?", choices=names, help=f"one of: {', '.join(names)}")
    run.add_argument("--list", action="store_true", help="list the examples and exit")
    run.add_argument("--epochs", type=_int_at_least(1), default=None, help="epochs (default: the example's)")
    run.add_argument(
        "--out", type=Path, default=None,
        help="output folder (default: runs/<example>; when it holds a run, the next free <out>-2, <out>-3...)",
    )
    run.add_argument("--seed", type=_int_at_least(0), default=0, help="global torch seed (default: 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (still one line per epoch)")
    run.add_argument(
        "--nproc", type=_int_at_least(1), default=None,
        help="train with N processes on this machine (launches torchrun --nproc-per-node N)",
    )
    run.add_argument(
        "--resume", action="store_true",
        help="continue a run from its newest checkpoint: the --out folder, else the newest run of the example "
        "(a fresh start when there is none)",
    )
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainflow`` command line; return the exit code.

    Usage: ``trainflow run <example> [--epochs N] [--out DIR] [--seed S] [--no-progress] [--resume]
    [--nproc N]``
    and ``trainflow run --list``. An unknown example exits with code 2 and the valid names. A
    run into a folder that holds an earlier run writes the next version (``<out>-2``...).

    Example:
        >>> from trainflow.cli import main
        >>> main(["run", "--list"])  # doctest: +ELLIPSIS
        Examples (trainflow run <name>):
          mlp  ...
        0
    """
    try:
        from trainflow.examples import EXAMPLES
    except ImportError as error:  # matplotlib or scikit-learn: the `examples` extra
        print(f"trainflow run: the examples need the `examples` extra ({error}). Install it with "
              '`pip install "trainflow[examples]"`.', file=sys.stderr)
        return 2

    names = list(EXAMPLES)
    parser, run_parser = _parsers(names)
    args = parser.parse_args(argv)
    if args.list:
        width = max(map(len, names))
        print("Examples (trainflow run <name>):")
        for name, (description, _) in EXAMPLES.items():
            print(f"  {name:<{width}}  {description}")
        return 0
    if args.example is None:
        run_parser.error(f"name an example to run (one of: {', '.join(names)}), or pass --list.")
    if args.nproc is not None and args.example == "nas-digits":
        run_parser.error("--nproc trains one model with several processes; nas-digits runs a search of many "
                         "trials, which run side by side through its experiment's storage instead. Drop --nproc.")
    base = args.out if args.out is not None else Path("runs") / args.example
    out_dir = _run_folder(base, args.resume, explicit=args.out is not None)
    if args.nproc is not None and "LOCAL_RANK" not in os.environ:
        if out_dir != base and not args.resume:
            print(f"{base} holds an earlier run; this run writes {out_dir}.")
        return _launch(args, out_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 speaks for the run
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _run(args, out_dir, base)
    return _run(args, out_dir, base)


def _launch(args: argparse.Namespace, out_dir: Path) -> int:
    """``trainflow run ... --nproc N``: the same command under ``torchrun --nproc-per-node N``, into ``out_dir``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "trainflow.cli", "run", args.example, "--out", str(out_dir), "--seed", str(args.seed)]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    command += ["--no-progress"] * args.no_progress + ["--resume"] * args.resume
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def _run(args: argparse.Namespace, out_dir: Path, base: Path) -> int:
    """Run the example into ``out_dir`` and say what it wrote."""
    from trainflow.examples import EXAMPLES

    resume_command = f"trainflow run {args.example} --out {out_dir} --resume"
    before = _newest_entry(out_dir / "checkpoints")
    if args.resume and before is not None:
        print(f"Resuming {out_dir} from {out_dir / 'checkpoints' / before['file']} "
              f"(update {before['update']}, {before['epoch']} epoch(s) done).")
    elif out_dir != base:
        print(f"{base} holds an earlier run; this run writes {out_dir} "
              f"(`trainflow run {args.example} --resume` continues the newest run instead).")
    _, run = EXAMPLES[args.example]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # said below, in the command's own words
            warnings.filterwarnings("ignore", message="fit: nothing to do", category=UserWarning)
            logs = run(out_dir, epochs=args.epochs, progress=not args.no_progress, seed=args.seed,
                       resume=args.resume)
    except KeyboardInterrupt:  # nas-digits: its experiment keeps the finished trials, and retries the one cut short
        print(
            f"\n{args.example!r} was interrupted after {time.perf_counter() - start:.1f} s.\n"
            f"Continue with: {resume_command}"
        )
        return 0
    stopped = _newest_entry(out_dir / "checkpoints")
    if args.resume and before is not None and stopped == before:  # the run had already reached its epochs
        print(f"{out_dir} already finished at epoch {before['epoch']}: nothing to train. Train further with "
              f"`trainflow run {args.example} --out {out_dir} --resume --epochs N` (N > {before['epoch']}).")
        return 0
    if stopped is not None and stopped != before and stopped.get("reason") == "signal":  # saved by this run
        print(
            f"\n{args.example!r} was interrupted by a signal after {time.perf_counter() - start:.1f} s, at update "
            f"{stopped['update']} ({stopped['epoch']} epoch(s) done); it saved "
            f"{out_dir / 'checkpoints' / stopped['file']}.\nContinue with: {resume_command}"
        )
        return 0
    print(f"\n{args.example!r} finished in {time.perf_counter() - start:.1f} s. Artifacts:")
    for name in ARTIFACTS:
        if (out_dir / name).is_file():
            print(f"  {out_dir / name}")
    print("Final values:")
    for key, value in logs.items():
        print(f"  {key:<12} {value:.4f}")
    return 0


def _versions(base: Path) -> list[Path]:
    """``base`` and its existing versions ``base-2``, ``base-3``..., oldest first."""
    pattern = re.compile(re.escape(base.name) + r"-([2-9]|[1-9]\d+)")
    found = [(int(m.group(1)), d) for d in (base.parent.iterdir() if base.parent.is_dir() else ())
             if (m := pattern.fullmatch(d.name)) and d.is_dir()]
    return [base] + [d for _, d in sorted(found)]


def _holds_run(folder: Path) -> bool:
    """A checkpoint of a training run, or the trial storage of an experiment (``nas-digits``)."""
    return checkpoint.latest(folder / "checkpoints") is not None or (folder / "journal.log").is_file()


def _run_folder(base: Path, resume: bool, explicit: bool) -> Path:
    """The folder a run writes.

    ``--resume`` continues ``--out`` itself when it is given, else the newest version of
    ``runs/<example>`` that holds a run; a fresh run takes ``base`` or its first free version.
    """
    if resume:
        return base if explicit else next((d for d in reversed(_versions(base)) if _holds_run(d)), base)
    if not _holds_run(base):
        return base
    n = 2
    while _holds_run(base.with_name(f"{base.name}-{n}")):
        n += 1
    return base.with_name(f"{base.name}-{n}")


def _newest_entry(folder: Path) -> dict | None:
    """The newest checkpoint's entry in the folder's index (when, why it was saved), or None."""
    try:
        entries = checkpoint.read_index(folder)
    except (OSError, ValueError):
        return None
    return entries[-1] if entries else None


if __name__ == "__main__":
    sys.exit(main())
