"""``gan``: a small MLP GAN on the 8x8 digits, discriminator 3 updates then generator 1.

Seed 000 (NeMo's GAN ``training_loop`` of three D updates and one G update, each on a fresh
batch) with seed 004's Keras GAN losses: binary cross-entropy on logits, fake images labelled
1 and real ones 0, a little uniform noise on the D labels ("a very important trick"), and the
generator trained to make D call its images real (label 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F

from trainflow import Step
from trainflow.data import digits
from trainflow.examples.artifacts import start, train_and_finish

__all__ = ["DESCRIPTION", "EPOCHS", "run", "save_samples"]

DESCRIPTION = "MLP GAN on 8x8 digits: D 3 updates / G 1 (Adam, BCE, label noise); writes samples.png"
EPOCHS = 100
LATENT = 32
LABEL_NOISE = 0.05


def save_samples(generator: nn.Module, noise: torch.Tensor, png_path: str | Path) -> Path:
    """Draw ``generator(noise)`` (flattened 8x8 images in [0, 1]) as a square grid in a PNG.

    The generator is run in eval mode without gradients; its train/eval mode is restored.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> g = torch.nn.Sequential(torch.nn.Linear(LATENT, 64), torch.nn.Sigmoid())
        >>> noise = torch.randn(16, LATENT, generator=torch.Generator().manual_seed(0))
        >>> save_samples(g, noise, Path(tempfile.mkdtemp()) / "samples.png").name
        'samples.png'
    """
    was_training = generator.training
    generator.eval()
    with torch.no_grad():
        images = generator(noise).reshape(-1, 8, 8).float().cpu()
    generator.train(was_training)
    side = max(int(len(images) ** 0.5), 1)
    # one mosaic with a 1-pixel blank border around each digit: one imshow, not side**2 axes
    grid = torch.zeros(side, side, 10, 10)
    grid[..., 1:9, 1:9] = images[: side * side].reshape(side, side, 8, 8)
    fig = Figure(figsize=(side * 0.6, side * 0.6))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.permute(0, 2, 1, 3).reshape(side * 10, side * 10).numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_axis_off()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path


def run(
    out_dir: Path, epochs: int | None = None, progress: bool = True, seed: int = 0, resume: bool = False
) -> dict[str, float]:
    """Train the GAN; write metrics.csv, curves.png, weights.pt and samples.png under ``out_dir``.

    A checkpoint is saved after every epoch in ``out_dir/checkpoints``; ``resume=True``
    continues from the newest one there (a fresh start when there is none).
    """
    out_dir, epochs = start(out_dir, epochs, EPOCHS, seed)
    train, _ = digits(batch_size=64, seed=seed)
    generator = nn.Sequential(nn.Linear(LATENT, 128), nn.LeakyReLU(0.2), nn.Linear(128, 64), nn.Sigmoid())
    discriminator = nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Linear(128, 1))
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=5e-4, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(generator.parameters(), lr=5e-4, betas=(0.5, 0.999))

    def d_loss(batch):
        real, _ = batch
        n = len(real)
        # the fakes are made here, from fresh noise; detached: this step only updates D
        fake = generator(torch.randn(n, LATENT, device=real.device)).detach()
        labels = torch.cat([torch.ones(n, 1, device=real.device), torch.zeros(n, 1, device=real.device)])
        labels = labels + LABEL_NOISE * torch.rand_like(labels)
        return F.binary_cross_entropy_with_logits(discriminator(torch.cat([fake, real])), labels)

    def g_loss(batch):
        real, _ = batch  # only its size: G learns from D's verdict on fresh fakes
        fake = generator(torch.randn(len(real), LATENT, device=real.device))
        return F.binary_cross_entropy_with_logits(discriminator(fake), torch.zeros(len(real), 1, device=real.device))

    def samples(trainer):
        # the same noise for every run of a seed, drawn from its own generator (not the global RNG)
        noise = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(seed)).to(trainer.device)
        save_samples(generator, noise, out_dir / "samples.png")

    return train_and_finish(
        out_dir, {"G": generator, "D": discriminator},
        [Step(d_loss, d_opt, name="D", repeat=3), Step(g_loss, g_opt, name="G")], train,
        epochs=epochs, progress=progress, resume=resume, after=samples,
    )
