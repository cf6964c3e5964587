"""Built-in callbacks: plain objects on the trainer's events (see :mod:`trainflow.events`).

- :class:`LossLogger`: the latest losses every N updates, to ``print`` or your function.
- :class:`ProgressBar`: a rich bar per epoch in a terminal, one line per epoch elsewhere.
- :class:`CSVLogger`, :class:`JSONLLogger`, :class:`TensorBoardLogger`: epoch values (and
  losses every N updates) to ``<out_dir>/metrics.csv``, ``metrics.jsonl``, ``tensorboard/``.
- :class:`EarlyStopping`: stop when a monitored epoch value stops improving.
- :class:`Freeze`, :class:`Unfreeze`: change which parameters train when a given epoch starts.
- :class:`SampleGrid`: a generator's images for a fixed noise as a PNG grid, every N updates.
- :class:`Checkpoint`: atomic checkpoints every N updates / epochs, the last K and the best K.
- :class:`Preemption`: SIGTERM / Ctrl-C stops ``fit`` at the next update boundary (and
  ``Checkpoint`` saves there).

Callbacks that act every N updates or epochs say so with an event filter
(:class:`trainflow.events.Every`) in ``event_filters``, checked when they are registered.

Loss values arrive as device tensors; every callback reads them only when it writes them, so
a CUDA run does not wait on the device at each update.
"""

from trainflow.callbacks.checkpoint import Checkpoint
from trainflow.callbacks.csv_logger import CSVLogger
from trainflow.callbacks.early_stopping import EarlyStopping
from trainflow.callbacks.freezing import Freeze, Unfreeze
from trainflow.callbacks.jsonl_logger import JSONLLogger
from trainflow.callbacks.loss_logger import LossLogger
from trainflow.callbacks.preemption import Preemption
from trainflow.callbacks.progress_bar import ProgressBar
from trainflow.callbacks.samples import SampleGrid
from trainflow.callbacks.tensorboard_logger import TensorBoardLogger

__all__ = [
    "CSVLogger",
    "Checkpoint",
    "EarlyStopping",
    "Freeze",
    "JSONLLogger",
    "LossLogger",
    "Preemption",
    "ProgressBar",
    "SampleGrid",
    "TensorBoardLogger",
    "Unfreeze",
]
