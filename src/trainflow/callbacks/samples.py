"""``SampleGrid``: a generator's images for a fixed noise, as a PNG grid, during and after training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainflow.callbacks._args import optional_path, output_path, positive_int
from trainflow.events import Every

__all__ = ["SampleGrid", "save_grid"]

#: the smallest drawn size of one image, in pixels: 8x8 digits are enlarged to stay visible
_MIN_CELL = 60
#: the height of the title band above a grid, in pixels
_TITLE_BAND = 24


def _figure_class() -> Any:
    """matplotlib's ``Figure``, imported when a grid is drawn: matplotlib is part of the `examples` extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            f"SampleGrid and save_grid draw with matplotlib, which could not be imported ({error}). Install it with "
            '`pip install "trainflow[examples]"` (or `pip install matplotlib`), or drop this callback.'
        ) from error
    return Figure


def _as_images(images: torch.Tensor, owner: str) -> torch.Tensor:
    """``(n, C, H, W)`` with C 1 or 3, ``(n, H, W)``, or ``(n, H*W)`` with a square H*W -> ``(n, C, H, W)``."""
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    if images.ndim == 3:
        return images.unsqueeze(1)
    if images.ndim == 2 and math.isqrt(images.shape[1]) ** 2 == images.shape[1] and images.shape[1] > 0:
        side = math.isqrt(images.shape[1])
        return images.reshape(len(images), 1, side, side)
    raise ValueError(
        f"{owner}: the generator's output must be images: (n, C, H, W) with C 1 or 3, (n, H, W), or "
        f"flattened square images (n, H*W). Received: a tensor of shape {tuple(images.shape)}. "
        "Reshape the output, e.g. wrap the generator: nn.Sequential(generator, nn.Unflatten(1, (1, 28, 28)))."
    )


def save_grid(
    images: torch.Tensor,
    png_path: str | Path,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    columns: int | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``images`` as one grid in a PNG: grey images dark on white, colour images as they are.

    ``images`` is ``(n, C, H, W)`` (C 1 or 3), ``(n, H, W)`` or ``(n, H*W)`` (square); pixel values
    in ``value_range`` span the colour scale. Each image gets a one-pixel blank border, and
    small images are enlarged (nearest neighbour) so that 8x8 digits stay legible. A ``title``
    is written in a band above the grid (``SampleGrid`` writes the update and epoch there).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> path = save_grid(torch.rand(16, 64), Path(tempfile.mkdtemp()) / "grid.png")
        >>> path.name, path.stat().st_size > 0
        ('grid.png', True)
    """
    images = _as_images(images.detach().float().cpu(), "save_grid")
    n, channels, height, width = images.shape
    cols = columns if columns is not None else max(math.ceil(math.sqrt(n)), 1)
    rows = max(math.ceil(n / cols), 1)
    low, high = value_range
    images = ((images - low) / (high - low)).clamp(0, 1)
    if channels == 1:
        images = 1 - images  # dark strokes on a white page, like ink
    grid = torch.ones(rows * cols, channels, height + 2, width + 2)  # blank cells and borders
    grid[:n, :, 1:-1, 1:-1] = images
    grid = grid.reshape(rows, cols, channels, height + 2, width + 2).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * (height + 2), cols * (width + 2), channels)
    scale = max(1, math.ceil(_MIN_CELL / (height + 2)))
    dpi = 100
    width, height = grid.shape[1] * scale, grid.shape[0] * scale  # pixels
    band = _TITLE_BAND if title else 0
    fig = _figure_class()(figsize=(width / dpi, (height + band) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + band)))
    if title:
        # 10 points, smaller when a narrow grid needs it (a character is about 0.6 em wide)
        size = min(10.0, 0.92 * width / (0.6 * len(title)) * 72 / dpi)
        fig.text(0.5, 1 - 0.5 * band / (height + band), title, ha="center", va="center", fontsize=size)
    pixels = grid.squeeze(2).numpy() if channels == 1 else grid.numpy()
    ax.imshow(pixels, cmap="gray" if channels == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    return png_path


def _device(module: nn.Module, default: torch.device) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return default


class SampleGrid:
    """Save ``generator(noise)`` as a PNG grid every N updates or epochs, and when ``fit`` ends.

    The noise is fixed (pass it in: draw it once, e.g. from its own ``torch.Generator``), so
    the grids of one run show the same latent points as training goes on. The generator is
    run in eval mode without gradients; every module's train/eval mode is restored afterwards.
    The files are ``samples_<update>.png`` (``trainer.updates`` at the save) and ``samples.png``
    at the end, in the folder of ``path``; each is titled with the update and its epoch,
    ``samples at update 1,080 (epoch 12)``. The periodic saves are event filters
    (:mod:`trainflow.events`): ``Every(every)`` on ``on_update_end``, ``Every(every_epochs)``
    on ``on_epoch_end``.

    Args:
        generator: the module that maps ``noise`` to images in ``value_range``: ``(n, C, H, W)``
            (C 1 or 3), ``(n, H, W)`` or flattened square images ``(n, H*W)``.
        noise: the fixed input, ``(n, ...)``; moved to the generator's device when used.
        every: save a grid every this many updates (all steps counted), or None.
        every_epochs: save a grid after every this many epochs, or None (with ``every=None``
            too: only at the end). A GAN flow's updates per epoch depend on its steps; this
            does not.
        path: the final PNG (default ``<trainer.out_dir>/samples.png``); periodic grids go
            beside it as ``<stem>_<update>.png``.
        value_range: the pixel values drawn as the ends of the colour scale.
        columns: images per row (default: a square grid).

    Attributes:
        saved: the paths written, in order.

    Example:
        >>> import tempfile, torch
        >>> from trainflow import Step, Trainer
        >>> from trainflow.callbacks import SampleGrid
        >>> g = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Sigmoid())
        >>> opt = torch.optim.SGD(g.parameters(), lr=0.1)
        >>> noise = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
        >>> grid = SampleGrid(g, noise, every=2)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> trainer = Trainer(g, Step(lambda z: g(z).mean(), opt), callbacks=[grid], out_dir=tmp.name)
        >>> trainer.fit([torch.randn(3, 4)] * 5, epochs=1)
        >>> [p.name for p in grid.saved]
        ['samples_2.png', 'samples_4.png', 'samples.png']
        >>> tmp.cleanup()
    """

    #: under torchrun only rank 0 calls it: it writes (see trainflow.distributed)
    rank_zero_only = True

    def __init__(
        self,
        generator: nn.Module,
        noise: torch.Tensor,
        *,
        every: int | None = None,
        every_epochs: int | None = None,
        path: str | Path | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        columns: int | None = None,
    ) -> None:
        _figure_class()  # matplotlib missing: say so now, not at the first save
        if not isinstance(generator, nn.Module):
            raise TypeError(
                f"SampleGrid: `generator` must be an nn.Module. Received: generator of type "
                f"{type(generator).__name__}. Pass the generator network itself, e.g. SampleGrid(G, noise)."
            )
        if not isinstance(noise, torch.Tensor):
            raise TypeError(
                f"SampleGrid: `noise` must be a tensor of generator inputs. Received: noise of type "
                f"{type(noise).__name__}. Draw it once, e.g. torch.randn(64, latent_dim, "
                "generator=torch.Generator().manual_seed(0))."
            )
        if noise.ndim == 0 or len(noise) == 0:
            raise ValueError(
                f"SampleGrid: `noise` must hold at least one input, shaped (n, ...). Received: a tensor of shape "
                f"{tuple(noise.shape)}. Pass e.g. torch.randn(64, latent_dim)."
            )
        self.every = None if every is None else positive_int(
            "SampleGrid", "every", every, "save a grid every N updates, or None for the end only", "every=500"
        )
        self.every_epochs = None if every_epochs is None else positive_int(
            "SampleGrid", "every_epochs", every_epochs, "save a grid every N epochs, or None", "every_epochs=10"
        )
        self.event_filters = {
            "on_update_end": None if self.every is None else Every(self.every),
            "on_epoch_end": None if self.every_epochs is None else Every(self.every_epochs),
        }
        self.path = optional_path("SampleGrid", "path", path, "samples.png")
        numbers = isinstance(value_range, (tuple, list)) and len(value_range) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value_range
        )
        if not numbers or not value_range[0] < value_range[1]:
            raise ValueError(
                "SampleGrid: `value_range` must be two finite numbers (low, high) with low < high: the pixel "
                f"values drawn as black and white. Received: value_range={value_range!r}. "
                "Pass (0, 1) for a sigmoid output or (-1, 1) for tanh."
            )
        self.columns = None if columns is None else positive_int(
            "SampleGrid", "columns", columns, "images per row", "columns=8"
        )
        self.generator, self.noise = generator, noise
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.saved: list[Path] = []
        self._final: Path | None = None
        self._started = 0  # the number of the latest epoch that started (counted from 1)

    def images(self) -> torch.Tensor:
        """``generator(noise)`` in eval mode without gradients, as ``(n, C, H, W)`` on the CPU."""
        modes = [(m, m.training) for m in self.generator.modules()]
        self.generator.eval()
        try:
            with torch.no_grad():
                out = self.generator(self.noise.to(_device(self.generator, self.noise.device)))
        finally:
            for module, training in modes:
                module.training = training
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"SampleGrid: the generator must return a tensor of images. Received: an output of type "
                f"{type(out).__name__}. Return the images as one tensor, e.g. (n, 1, 28, 28)."
            )
        return _as_images(out.float().cpu(), "SampleGrid")

    def save(self, png_path: str | Path, title: str | None = None) -> Path:
        """Draw the current samples to ``png_path`` now, under ``title`` if given."""
        path = save_grid(self.images(), png_path, value_range=self.value_range, columns=self.columns, title=title)
        self.saved.append(path)
        return path

    def on_fit_start(self, trainer: Any) -> None:
        self._final = output_path("SampleGrid", "path", self.path, trainer, "samples.png")
        self._started = trainer.epoch + (trainer.epoch_progress[0] > 0)  # resumed inside an epoch: that one
        self.images()  # a generator whose output is no image fails here, not at the first save

    def on_epoch_start(self, trainer: Any) -> None:
        self._started = trainer.epoch + 1  # the coming updates belong to this epoch

    def on_update_end(self, trainer: Any, step: Any, losses: dict[str, Any]) -> None:
        self._save_periodic(trainer, trainer.epoch + 1)  # the update's epoch has not ended yet

    def on_epoch_end(self, trainer: Any, logs: dict[str, float]) -> None:
        self._save_periodic(trainer, trainer.epoch)

    def _save_periodic(self, trainer: Any, epoch: int) -> None:
        if self._final is None:
            return
        path = self._final.with_name(f"{self._final.stem}_{trainer.updates}{self._final.suffix}")
        if not self.saved or self.saved[-1] != path:  # an epoch that ends on an every-N-updates save
            self.save(path, _title(trainer.updates, epoch))

    def on_fit_end(self, trainer: Any) -> None:
        if self._final is not None:
            self.save(self._final, _title(trainer.updates, max(trainer.epoch, self._started)))


def _title(updates: int, epoch: int) -> str:
    """``samples at update 1,080 (epoch 12)``: the epoch is the one the update belongs to."""
    return f"samples at update {updates:,} (epoch {epoch})"
