"""Every ```python block of the README and the guides runs, in order, one namespace per file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_every_guide_has_code():
    for path in DOCS:
        assert blocks(path), f"{path.name} has no python block"


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_guide_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"guide_{path.stem}"}
    for i, code in enumerate(blocks(path)):
        try:
            exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path.name}, block {i} failed: {error!r}\n{code}") from error
