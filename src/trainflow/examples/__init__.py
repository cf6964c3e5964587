"""Built-in examples, one per seed scenario: ``trainflow run <name>`` or ``EXAMPLES[name][1](out_dir)``.

Each example is a module with a one-line ``DESCRIPTION`` and
``run(out_dir, epochs=None, progress=True, seed=0) -> dict[str, float]`` that seeds the
global torch RNG, trains, writes ``metrics.csv``, ``curves.png`` and ``weights.pt`` (the GANs
also ``samples.png``) under ``out_dir``, and returns the last epoch's logs. ``nas-digits``
searches architectures instead: it writes ``trials.csv``, ``best_arch.json`` and ``history.png``
and returns the best trial's value; ``darts-digits`` searches them one-shot (DARTS), writes
``alphas.png`` and ``best_arch.json`` beside the supernet's artifacts, and retrains the choice.

Example:
    >>> from trainflow.examples import EXAMPLES
    >>> sorted(EXAMPLES)
    ['alternating', 'darts-digits', 'dcgan', 'gan', 'mlp', 'nas-digits', 'two-losses', 'wgan-gp']
    >>> description, run = EXAMPLES["mlp"]
"""

from __future__ import annotations

from collections.abc import Callable

from trainflow.examples import alternating, darts_digits, dcgan, gan, mlp, nas_digits, two_losses, wgan_gp

__all__ = ["EXAMPLES"]

#: name -> (one-line description, run function)
EXAMPLES: dict[str, tuple[str, Callable[..., dict[str, float]]]] = {
    module.__name__.rpartition(".")[2].replace("_", "-"): (module.DESCRIPTION, module.run)
    for module in (mlp, two_losses, alternating, gan, dcgan, wgan_gp, nas_digits, darts_digits)
}
