"""piece_optim: PIECE importance-selected sparse fine-tuning as a drop-in AdamW.

Estimate per-parameter importance on a new task (PIECE-F: Fisher diagonal, PIECE-S:
second-order normalised), select the global top 0.1% of entries, and train only those
with :class:`SparseAdamW`, which keeps optimizer state for the selected entries alone.
"""

from . import protect
from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .delta import apply_delta, load_delta, revert_delta, save_delta
from .importance import ImportanceEstimator, SelectionInfo, SelectionWarning
from .mask import SparseMask
from .optim import SparseAdamW

__all__ = [
    "BackendUnavailableError",
    "ImportanceEstimator",
    "SelectionInfo",
    "SelectionWarning",
    "SparseAdamW",
    "SparseMask",
    "__version__",
    "apply_delta",
    "available_backends",
    "load_delta",
    "protect",
    "revert_delta",
    "save_delta",
]
