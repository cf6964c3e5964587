"""``wgan-gp``: seed 000's GAN (NeMo's ``examples/images/gan.py``) as a WGAN-GP on the 8x8 digits.

NeMo's flow has three critic losses and one optimizer per network, the critic updated several
times per generator update, each on a fresh batch:
``training_loop = [(optimizer_D, losses_D)] * 3 + [(optimizer_G, losses_G)]``. Here:

- the critic's losses are its mean score on generated images, minus its mean score on real
  images, and the WGAN gradient penalty ``10 * (|grad_x D(x_hat)| - 1)^2`` on images
  ``x_hat`` interpolated between real and generated ones. NeMo's Loss 2 (real images) and
  Loss 3 (the penalty) as they are; its Loss 1 scores the critic on the interpolated images,
  this one on the generated images, as Gulrajani et al.'s WGAN-GP does. The penalty differentiates through
  the critic twice (``torch.autograd.grad(..., create_graph=True)``); the D step still writes
  gradients into the critic's parameters only. The three are logged as ``D/fake``,
  ``D/real``, ``D/penalty``;
- the generator's loss is minus the critic's mean score on fresh generated images;
- the flow is ``[Step(critic_losses, d_opt, name="D", repeat=5), Step(generator_loss, g_opt,
  name="G", batch="same")]``: five critic updates on fresh batches (Gulrajani et al.'s
  ``n_critic = 5``; NeMo used 3), then a generator update, which needs only a batch size and
  so reuses the last batch instead of drawing one.

The networks are the ``dcgan`` example's (no spectral normalisation: the gradient penalty
constrains the critic), Adam with ``betas=(0.5, 0.9)``. Each epoch the samples are scored by
the digits classifier (``samples/confidence``, ``samples/entropy``); grids are written every
40 epochs and ``samples.png`` at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from trainflow import Step
from trainflow.callbacks import SampleGrid
from trainflow.data import digits
from trainflow.examples.artifacts import start, train_and_finish
from trainflow.examples.dcgan import LATENT, build_discriminator, build_generator
from trainflow.examples.quality import SampleQuality, digits_classifier

__all__ = ["DESCRIPTION", "EPOCHS", "build_critic", "critic_losses", "gradient_penalty", "run"]

DESCRIPTION = "WGAN-GP on 8x8 digits: critic x5 (real, fake, gradient penalty) / generator x1 (seed 000)"
EPOCHS = 150
BATCH = 32
N_CRITIC = 5
PENALTY = 10.0
SAMPLE_EVERY_EPOCHS = 40
QUALITY_SAMPLES = 1000


def build_critic(width: int = 32) -> nn.Module:
    """The ``dcgan`` discriminator without spectral normalisation: ``(n, 1, 8, 8)`` -> a score."""
    return build_discriminator(width, spectral=False)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``mean((|grad_x critic(x_hat)| - 1)^2)`` at random interpolations ``x_hat`` of real and fake.

    Differentiable in the critic's parameters (``create_graph=True``): the critic's update
    differentiates through this gradient. Draws one uniform number per sample.

    Example:
        >>> import torch
        >>> critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = critic[1].weight.fill_(0.5)  # |grad| = |w| = 1 everywhere
        >>> gradient_penalty(critic, torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2)).item()
        0.0
    """
    eps = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device)
    interpolated = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(interpolated).sum(), interpolated, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def critic_losses(critic: nn.Module, generator: nn.Module, real: torch.Tensor, latent: int = LATENT) -> dict:
    """Seed 000's three critic losses for one batch of ``real`` images: fake, real, penalty.

    Example:
        >>> import torch
        >>> from trainflow.examples.dcgan import build_generator
        >>> losses = critic_losses(build_critic(8), build_generator(4, 8), torch.rand(5, 1, 8, 8), latent=4)
        >>> list(losses)
        ['fake', 'real', 'penalty']
    """
    fake = generator(torch.randn(len(real), latent, device=real.device)).detach()  # D's step: D only
    return {
        "fake": critic(fake).mean(),                                       # Loss 1: generated images
        "real": -critic(real).mean(),                                      # Loss 2: real images
        "penalty": PENALTY * gradient_penalty(critic, real, fake),         # Loss 3: gradient penalty
    }


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Train the WGAN-GP; write metrics.csv, curves.png, weights.pt, samples*.png, classifier.pt.

    A checkpoint is saved after every epoch in ``out_dir/checkpoints``; ``resume=True``
    continues from the newest one there (a fresh start when there is none).
    """
    out_dir, epochs = start(out_dir, epochs, EPOCHS, seed)
    classifier = digits_classifier(out_dir, progress=progress)  # the fixed yardstick, seed 0, own (forked) RNG
    train, _ = digits(batch_size=BATCH, flatten=False, seed=seed)
    generator, critic = build_generator(), build_critic()
    optimizer_d = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.5, 0.9))
    optimizer_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.9))

    def losses_d(batch):
        return critic_losses(critic, generator, batch[0])

    def losses_g(batch):
        n = len(batch[0])  # the batch only gives the size: G learns from the critic's scores
        return -critic(generator(torch.randn(n, LATENT, device=batch[0].device))).mean()

    fixed = torch.Generator().manual_seed(seed)  # fixed noise from its own generator: comparable epochs
    grid_noise = torch.randn(64, LATENT, generator=fixed)
    quality_noise = torch.randn(QUALITY_SAMPLES, LATENT, generator=fixed)
    return train_and_finish(
        out_dir, {"G": generator, "D": critic},
        [Step(losses_d, optimizer_d, name="D", repeat=N_CRITIC), Step(losses_g, optimizer_g, name="G", batch="same")],
        train, epochs=epochs, progress=progress, resume=resume,
        callbacks=(SampleGrid(generator, grid_noise, every_epochs=SAMPLE_EVERY_EPOCHS),),
        first=(SampleQuality(generator, classifier, quality_noise),),  # before the loggers: they see its values
    )
