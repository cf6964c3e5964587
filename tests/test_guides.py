"""Every ```python block of the README and the guides runs, in order, one namespace per file.

In the guides listed in ``PRINTED``, a ```text block that directly follows a code block is what
that code prints: the test compares the two, character for character.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import inspect
import io
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from trainflow import Step, Trainer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: a code block and, when one follows it with only blank lines between, the text block of its output
WITH_OUTPUT = re.compile(r"^```python\n(.*?)^```\n(?:\s*^```text\n(.*?)^```$)?", re.S | re.M)


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
def test_guide_runs_and_prints_what_it_shows(path, tmp_path, monkeypatch):
    """Each block runs; a block followed by a ```text block prints exactly that text."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"guide_{path.stem}"}
    pairs = blocks_with_output(path)
    assert [code for code, _ in pairs] == blocks(path)
    for i, (code, shown) in enumerate(pairs):
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as error:
            # a failed subprocess (a torchrun launch) says why on its stderr: show the end of it
            said = getattr(error, "stderr", None) or getattr(error, "output", None) or ""
            said = f"\nits output ends:\n{said[-4000:]}" if isinstance(said, str) and said else ""
            raise AssertionError(f"{path.name}, block {i} failed: {error!r}\n{code}{said}") from error
        if shown is not None:  # as doctest compares: "..." stands for any text (a value at rounding level)
            got, want = _lines(printed.getvalue()), _lines(shown)
            assert CHECKER.check_output(want, got, doctest.ELLIPSIS), (
                f"{path.name}, block {i} prints other values than the guide shows:\n{got}\nexpected:\n{want}")


CHECKER = doctest.OutputChecker()


def _lines(text: str) -> str:
    """The text without trailing spaces, and without the blank lines at the start and the end."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def test_printed_output_is_compared(tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("```python\nprint(1)\n```\n\n```text\n1\n```\n\nprose\n\n```python\nx = 2\n```\n\n"
                     "```python\npass\n```\n```text\n```\n")
    assert blocks_with_output(guide) == [("print(1)\n", "1\n"), ("x = 2\n", None), ("pass\n", "")]
    assert len(blocks_with_output(guide)) == len(blocks(guide))
    showing = [path.name for path in DOCS if any(shown for _, shown in blocks_with_output(path))]
    assert showing == ["accumulation.md", "checkpoints.md", "distributed.md", "multiple-losses.md", "nas.md",
                       "parameter-groups.md", "training-loop.md"]
    assert CHECKER.check_output(_lines("a ...e-1...\n"), _lines("a 2.8e-17\n"), doctest.ELLIPSIS)
    assert not CHECKER.check_output(_lines("a ...e-1...\n"), _lines("a 1.6e-01\n"), doctest.ELLIPSIS)


def test_training_loop_guide_keeps_the_noisy_gan_labels_in_0_1():
    code = "".join(blocks(ROOT / "docs" / "guides" / "training-loop.md"))
    assert code.count("labels = (labels + 0.05 * torch.rand(labels.shape)).clamp(0, 1)") == 2  # both GAN steps
    assert "labels +=" not in code
    # why: with Keras's targets (up to 1.05) the loss has no minimum; clamped, it is never below 0
    logits = torch.tensor([0.0, 10.0, 40.0])
    keras = F.binary_cross_entropy_with_logits(logits, torch.full((3,), 1.05), reduction="none")
    bounded = F.binary_cross_entropy_with_logits(logits, torch.full((3,), 1.05).clamp(0, 1), reduction="none")
    assert keras.tolist() == pytest.approx([0.6931, -0.49995, -2.0], abs=1e-4)  # about (1 - 1.05) * logit
    assert bounded.tolist() == pytest.approx([0.6931, 4.54e-5, 0.0], abs=1e-4)


def test_readme_concepts_name_every_argument_of_step_and_trainer():
    readme = (ROOT / "README.md").read_text()
    for cls in (Step, Trainer):
        listed = re.search(rf"\*\*`{cls.__name__}\((.*?)\)`\*\*", readme).group(1)
        names = [name.strip() for name in listed.split(",") if name.strip() != "*"]
        assert names == list(inspect.signature(cls.__init__).parameters)[1:], cls.__name__
    concepts = readme.split("## Concepts")[1].split("## ")[0]
    for text in ('partial_window="apply"', '"drop"', '`on_nonfinite`', '"raise"', '"skip"', '"stop"',
                 "`trainer.skipped`"):
        assert text in concepts, text


def test_multiple_losses_guide_describes_nemo_critic_losses_as_seed_000_does():
    text = " ".join((ROOT / "docs" / "guides" / "multiple-losses.md").read_text().split())
    # seed 000: Loss 1 interpolated_loss (interpolated images), Loss 2 real_loss, Loss 3 grad_penalty
    assert ("Loss 1 on the critic's decision on interpolated images (`interpolated_loss`), Loss 2 on its "
            "decision on real images (`real_loss`), Loss 3 the WGAN gradient penalty") in text
    assert "its Loss 1 scores the critic on generated images (`D/fake`) instead of NeMo's interpolated ones" in text
    assert "critic losses of NeMo's example on generated" not in text  # the contradicting description
    code = "".join(blocks(ROOT / "docs" / "guides" / "multiple-losses.md"))
    assert '"interpolated": decision.mean(),' in code and '"real": -discriminator(real).mean(),' in code


def test_the_ignored_jit_warnings_are_torch_s_own_and_only_those():
    # Trainer(compile=True) in the training-loop guide makes torch.compile import torch.utils.mkldnn,
    # whose module body calls torch.jit.script_method: pyproject ignores exactly these warnings
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch.utils.mkldnn\n"
        "print(len(caught), sorted({(w.category.__name__, str(w.message), w.filename) for w in caught}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    count, kinds = out.split(" ", 1)
    assert int(count) == 14
    message = "`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or `torch.export`."
    assert ast.literal_eval(kinds) == [("DeprecationWarning", message, torch.jit._script.__file__)]
    ignored = [f for f in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
               ["filterwarnings"] if f.startswith("ignore")]
    assert ignored == ["ignore:`torch.jit.script_method` is deprecated:DeprecationWarning:torch.jit._script"]
