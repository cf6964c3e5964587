"""Every ```python block of the README and the guides runs, in order, one namespace per file.

In the guides listed in ``PRINTED``, a ```text block that directly follows a code block is what
that code prints: the test compares the two, character for character.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: a code block and, when one follows it with only blank lines between, the text block of its output
WITH_OUTPUT = re.compile(r"^```python\n(.*?)^```\n(?:\s*^```text\n(.*?)^```$)?", re.S | re.M)
#: guides whose shown output is checked
PRINTED = {"nas.md"}


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def blocks_with_output(path: Path) -> list[tuple[str, str | None]]:
    """(code, the output shown after it or None) for every code block of ``path``."""
    return [(code, shown if shown or "```text" in whole else None)
            for whole, code, shown in ((m.group(0), m.group(1), m.group(2)) for m in WITH_OUTPUT.finditer(path.read_text()))]


def test_every_guide_has_code():
    for path in DOCS:
        assert blocks(path), f"{path.name} has no python block"


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_guide_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"guide_{path.stem}"}
    for i, (code, shown) in enumerate(blocks_with_output(path)):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{path.name}, block {i} failed: {error!r}\n{code}") from error
        if path.name in PRINTED and shown is not None:
            assert printed.getvalue() == shown, f"{path.name}, block {i} printed something else than shown"
        else:
            print(printed.getvalue(), end="")  # unchecked guides: as before, pytest captures it


def test_printed_output_is_compared(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("```python\nprint(1)\n```\n\n```text\n1\n```\n\nprose\n\n```python\nx = 2\n```\n\n"
                     "```python\npass\n```\n```text\n```\n")
    assert blocks_with_output(guide) == [("print(1)\n", "1\n"), ("x = 2\n", None), ("pass\n", "")]
    assert len(blocks_with_output(guide)) == len(blocks(guide))
    for path in DOCS:
        if path.name in PRINTED:
            assert any(shown for _, shown in blocks_with_output(path)), f"{path.name} shows no output"
