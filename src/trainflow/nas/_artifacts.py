"""What an experiment leaves in its out_dir: trials.csv and history.png."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_csv(path: Path, records: list[Any], labels: list[str], objective_names: list[str] | None) -> None:
    """One row per trial: number, state, value(s), seconds, error, then one column per label."""
    value_columns = ["value"] if objective_names is None or len(objective_names) == 1 else list(objective_names)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["number", "state", *value_columns, "seconds", "error", *labels])
        for r in records:
            if isinstance(r.value, dict):
                values = [r.value[n] for n in value_columns]
            else:
                values = ["" if r.value is None else repr(r.value)]
            arch = [json.dumps(r.architecture[k]) if isinstance(r.architecture.get(k), list) else r.architecture.get(k, "") for k in labels]
            seconds = "" if r.seconds is None else f"{r.seconds:.3f}"
            out.writerow([r.number, r.state, *values, seconds, r.error or "", *arch])


def write_history(path: Path, records: list[Any], objective_names: list[str] | None, directions: list[str]) -> None:
    """The objective of each completed trial by trial number, with the running best (one panel per objective)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = objective_names if objective_names is not None and len(objective_names) > 1 else [None]
    fig = Figure(figsize=(6, 3.2 * len(names)))
    FigureCanvasAgg(fig)
    done = [r for r in records if r.state == "complete"]
    for i, (name, direction) in enumerate(zip(names, directions)):
        ax = fig.add_subplot(len(names), 1, i + 1)
        xs = [r.number for r in done]
        ys = [r.value[name] if name is not None else r.value for r in done]
        ax.scatter(xs, ys, s=14, label="trial")
        best, running = None, []
        for y in ys:
            best = y if best is None else (max(best, y) if direction == "maximize" else min(best, y))
            running.append(best)
        if xs:
            ax.step(xs, running, where="post", color="C1", label=f"best so far ({direction})")
        ax.set_xlabel("trial")
        ax.set_ylabel(name or "objective")
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
