"""The ``trainflow`` command: run a built-in example and say where its artifacts are.

``trainflow run mlp`` trains seed 004's MLP on the 8x8 digits and writes ``runs/mlp/``;
``trainflow run nas-digits`` searches architectures for them (seed 002);
``trainflow run --list`` lists the examples. Each example saves a checkpoint after every epoch
in ``<out>/checkpoints``; ``trainflow run mlp --resume`` continues from the newest one. On
SIGTERM or Ctrl-C the run stops at the next update boundary with a checkpoint, the command
says how to resume it, and exits with code 0. ``nas-digits`` keeps its trials in its
experiment's storage instead: after Ctrl-C, ``--resume`` runs the rest (the trial that was cut
short again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from trainflow import checkpoint

__all__ = ["main"]

#: what the examples write, in the order they are listed after a run (the last three: nas-digits)
ARTIFACTS = ("metrics.csv", "curves.png", "weights.pt", "samples.png", "trials.csv", "best_arch.json", "history.png")


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
    run.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<example>)")
    run.add_argument("--seed", type=_int_at_least(0), default=0, help="global torch seed (default: 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    run.add_argument(
        "--resume", action="store_true",
        help="continue from the newest checkpoint in <out>/checkpoints (a fresh start when there is none)",
    )
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainflow`` command line; return the exit code.

    Usage: ``trainflow run <example> [--epochs N] [--out DIR] [--seed S] [--no-progress] [--resume]``
    and ``trainflow run --list``. An unknown example exits with code 2 and the valid names, and
    so does a fresh run (no ``--resume``) into a folder that holds an earlier run's checkpoints.

    Example:
        >>> from trainflow.cli import main
        >>> main(["run", "--list"])  # doctest: +ELLIPSIS
        Examples (trainflow run <name>):
          mlp  ...
        0
    """
    from trainflow.examples import EXAMPLES

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
    out_dir = args.out if args.out is not None else Path("runs") / args.example
    resume_command = f"trainflow run {args.example} --out {out_dir} --resume"
    if not args.resume and checkpoint.latest(out_dir / "checkpoints") is not None:
        run_parser.error(
            f"{out_dir / 'checkpoints'} holds checkpoints of an earlier run. Continue it with "
            f"`{resume_command}`, or start afresh in another folder (--out) or after deleting that one."
        )
    _, run = EXAMPLES[args.example]
    before = _newest_entry(out_dir / "checkpoints")
    start = time.perf_counter()
    try:
        logs = run(out_dir, epochs=args.epochs, progress=not args.no_progress, seed=args.seed, resume=args.resume)
    except KeyboardInterrupt:  # nas-digits: its experiment keeps the finished trials, and retries the one cut short
        print(
            f"\n{args.example!r} was interrupted after {time.perf_counter() - start:.1f} s.\n"
            f"Continue with: {resume_command}"
        )
        return 0
    stopped = _newest_entry(out_dir / "checkpoints")
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


def _newest_entry(folder: Path) -> dict | None:
    """The newest checkpoint's entry in ``index.json`` (Checkpoint's list: when, why it was saved)."""
    try:
        entries = json.loads((folder / "index.json").read_text(encoding="utf-8"))["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entries[-1] if entries and isinstance(entries[-1], dict) else None


if __name__ == "__main__":
    sys.exit(main())
