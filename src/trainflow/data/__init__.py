"""Data helpers: batch structures and the embedded digits dataset."""

from trainflow.data.digits import digits

__all__ = ["digits"]
