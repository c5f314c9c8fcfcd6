"""Environment variables: one prefix, ``PIECE_OPTIM_``.

The build and test knobs once had the shorter prefix ``PIECE_`` (``PIECE_SKIP_BUILD``,
``PIECE_FORCE_BUILD``, ``PIECE_NO_CUDA``, ``PIECE_CUDA_ARCH_LIST``, ``PIECE_NO_JIT``,
``PIECE_BENCH_TINY``, ``PIECE_SKIP_INSTALL``); those old names still work, with a
:class:`DeprecationWarning` (once per name), and the new name wins when both are set.

Standard library only: ``setup.py`` loads this file by path before the package exists.
"""

from __future__ import annotations

import os
import warnings

PREFIX = "PIECE_OPTIM_"
_OLD_PREFIX = "PIECE_"
_RENAMED = frozenset(
    {
        "SKIP_BUILD",
        "FORCE_BUILD",
        "NO_CUDA",
        "CUDA_ARCH_LIST",
        "NO_JIT",
        "BENCH_TINY",
        "SKIP_INSTALL",
    }
)
_warned: set[str] = set()


def name(key: str) -> str:
    """The variable's name: ``PIECE_OPTIM_<key>``."""
    return PREFIX + key


def get(key: str, default: str = "") -> str:
    """``PIECE_OPTIM_<key>``, else the deprecated ``PIECE_<key>`` (warned once), else
    ``default``."""
    value = os.environ.get(PREFIX + key)
    if value is not None:
        return value
    if key in _RENAMED:
        old = os.environ.get(_OLD_PREFIX + key)
        if old is not None:
            if key not in _warned:
                _warned.add(key)
                warnings.warn(
                    f"the environment variable {_OLD_PREFIX + key} is deprecated; use "
                    f"{PREFIX + key} (the same meaning)",
                    DeprecationWarning,
                    stacklevel=2,
                )
            return old
    return default


def flag(key: str) -> bool:
    """Whether ``PIECE_OPTIM_<key>`` (or its old name) is ``"1"``."""
    return get(key, "0").strip() == "1"
