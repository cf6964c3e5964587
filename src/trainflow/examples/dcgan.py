"""``dcgan``: seed 004's Keras DCGAN ``train_step`` on the 8x8 digits, with samples and a quality score.

The Keras networks scaled to 8x8 images: a discriminator of two stride-2 convolutions, global
max pooling and one logit; a generator from a 2x2 map through two stride-2 transposed
convolutions to a sigmoid image. Binary cross-entropy on logits, generated images labelled 1
and real ones 0 plus ``0.05 * uniform`` noise ("a very important trick"), the generator
trained to make D call its images real. As in Keras' ``train_step``, D and then G train on
the same real batch: ``[Step(d_loss, d_opt, name="D"), Step(g_loss, g_opt, name="G",
batch="same")]``.

What had to change to reach good digits in under three minutes on a 2-core CPU (measured
over seeds 0-4, see ``docs/performance.md``):

- batches of 32 instead of 64 (twice the updates per epoch); learning rates 6e-4 / 8e-4
  (Keras: 3e-4 / 4e-4) with ``beta1 = 0.5``;
- spectral normalisation on D's layers: without it, seeds 1 and 4 of 0-4 collapsed onto a few
  digits (entropy 1.2 and 0 after 200 epochs) and seed 2 fell short;
- samples are drawn from an exponential moving average of G's weights (``G_ema``,
  decay 0.998, updated after each G update), which smooths the last epochs' oscillation.

Each epoch, :class:`~trainflow.examples.quality.SampleQuality` scores 1,000 samples with a
digits classifier (``samples/confidence``, ``samples/entropy``); ``SampleGrid`` writes a grid every 10
epochs and ``samples.png`` at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from trainflow import Step
from trainflow.callbacks import SampleGrid
from trainflow.data import digits
from trainflow.examples.artifacts import start, train_and_finish
from trainflow.examples.quality import SampleQuality, digits_classifier

__all__ = ["DESCRIPTION", "EPOCHS", "WeightAverage", "build_discriminator", "build_generator", "run"]

DESCRIPTION = "Convolutional GAN on 8x8 digits, D then G on the same batch (seed 004); samples + quality"
# Measured over seeds 0-4: confidence 0.918-0.934 and entropy 2.282-2.295 after 120 epochs, in
# about 60 s with one thread on a 2-core CPU (targets 0.90 / 2.25 first met at epochs 73-110).
EPOCHS = 120
LATENT = 32
BATCH = 32
LABEL_NOISE = 0.05
EMA_DECAY = 0.998
SAMPLE_EVERY_EPOCHS = 10
QUALITY_SAMPLES = 1000


def build_discriminator(width: int = 32, spectral: bool = True) -> nn.Module:
    """Keras' discriminator for ``(n, 1, 8, 8)`` images: conv, conv, global max pool, one logit.

    ``spectral`` wraps each layer in spectral normalisation (what keeps this DCGAN from
    collapsing onto a few digits); the WGAN-GP critic goes without: its penalty does that job.
    """
    norm = spectral_norm if spectral else (lambda layer: layer)
    return nn.Sequential(
        norm(nn.Conv2d(1, width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),           # 4x4
        norm(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2),   # 2x2
        nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        norm(nn.Linear(2 * width, 1)),
    )


def build_generator(latent: int = LATENT, width: int = 32) -> nn.Module:
    """Keras' generator: ``(n, latent)`` noise -> ``(n, 1, 8, 8)`` images in [0, 1]."""
    return nn.Sequential(
        nn.Linear(latent, 2 * width * 2 * 2), nn.LeakyReLU(0.2), nn.Unflatten(1, (2 * width, 2, 2)),
        nn.ConvTranspose2d(2 * width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # 4x4
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),      # 8x8
        nn.Conv2d(width, 1, 3, padding=1), nn.Sigmoid(),
    )


class WeightAverage:
    """After each update of step ``step``, move ``average``'s weights towards ``model``'s (an EMA).

    ``average = decay * average + (1 - decay) * model`` for every parameter and floating
    buffer; ``average`` starts as a copy of ``model``, never gets gradients and is not stepped.

    Example:
        >>> import copy, torch
        >>> model = torch.nn.Linear(1, 1)
        >>> average = copy.deepcopy(model)
        >>> ema = WeightAverage(model, average, step="G", decay=0.5)
        >>> with torch.no_grad():
        ...     _ = model.bias.add_(2.0)
        >>> ema.on_update_end(None, type("S", (), {"name": "G"}), {})
        >>> round(float(average.bias - model.bias.detach()), 3)
        -1.0
    """

    def __init__(self, model: nn.Module, average: nn.Module, *, step: str, decay: float) -> None:
        self.model, self.average, self.step, self.decay = model, average.requires_grad_(False), step, decay

    @torch.no_grad()
    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        if step.name != self.step:
            return
        pairs = [*zip(self.average.parameters(), self.model.parameters()),
                 *zip(self.average.buffers(), self.model.buffers())]
        for avg, value in pairs:
            if avg.is_floating_point():
                avg.lerp_(value, 1 - self.decay)


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Train the DCGAN; write metrics.csv, curves.png, weights.pt, samples*.png, classifier.pt.

    A checkpoint is saved after every epoch in ``out_dir/checkpoints``; ``resume=True``
    continues from the newest one there (a fresh start when there is none).
    """
    out_dir, epochs = start(out_dir, epochs, EPOCHS, seed)
    classifier = digits_classifier(out_dir, progress=progress)  # the fixed yardstick, seed 0, own (forked) RNG
    train, _ = digits(batch_size=BATCH, flatten=False, seed=seed)
    generator, discriminator = build_generator(), build_discriminator()
    g_ema = build_generator().requires_grad_(False)
    g_ema.load_state_dict(generator.state_dict())
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=6e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(generator.parameters(), lr=8e-4, betas=(0.5, 0.999))

    def d_loss(batch):
        real, _ = batch
        n = len(real)
        # the fakes are made here; detached: this step updates D only (Keras' tape on D's weights)
        fake = generator(torch.randn(n, LATENT, device=real.device)).detach()
        labels = torch.cat([torch.ones(n, 1, device=real.device), torch.zeros(n, 1, device=real.device)])
        labels = labels + LABEL_NOISE * torch.rand_like(labels)  # "a very important trick"
        return F.binary_cross_entropy_with_logits(discriminator(torch.cat([fake, real])), labels)

    def g_loss(batch):
        n = len(batch[0])  # the same real batch as D's update: only its size is used here
        predictions = discriminator(generator(torch.randn(n, LATENT, device=batch[0].device)))
        return F.binary_cross_entropy_with_logits(predictions, torch.zeros(n, 1, device=predictions.device))

    # fixed noise, from its own generator: the same latent points in every grid and every epoch
    fixed = torch.Generator().manual_seed(seed)
    grid_noise = torch.randn(64, LATENT, generator=fixed)
    quality_noise = torch.randn(QUALITY_SAMPLES, LATENT, generator=fixed)
    return train_and_finish(
        out_dir, {"G": generator, "D": discriminator, "G_ema": g_ema},
        [Step(d_loss, d_opt, name="D"), Step(g_loss, g_opt, name="G", batch="same")], train,
        epochs=epochs, progress=progress, resume=resume,
        callbacks=(SampleGrid(g_ema, grid_noise, every_epochs=SAMPLE_EVERY_EPOCHS),),
        # before the loggers, so that they see the quality values
        first=(WeightAverage(generator, g_ema, step="G", decay=EMA_DECAY), SampleQuality(g_ema, classifier, quality_noise)),
    )
