"""trainflow: complex PyTorch training flows that match a hand-written loop bit for bit.

Several losses and optimizers, update schedules ("discriminator 3 updates, then generator 1"),
parameter groups chosen by name, exact gradient accumulation, streaming metrics and callbacks.
"""

from trainflow.flow import Flow
from trainflow.losses import Average, add_loss
from trainflow.params import freeze, group, param_groups, unfreeze
from trainflow.schedules import Schedule
from trainflow.step import Step
from trainflow.trainer import Trainer

__all__ = ["Average", "Flow", "Schedule", "Step", "Trainer", "add_loss", "freeze", "group", "param_groups", "unfreeze"]
__version__ = "0.1.0"
