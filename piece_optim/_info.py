"""``piece-optim info``: versions, the backends, and what ``"auto"`` picks."""

from __future__ import annotations

import argparse
import platform

import torch

from . import backends
from ._version import __version__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device to check backends for")


def run(args: argparse.Namespace) -> int:
    print(
        f"piece-optim {__version__}, torch {torch.__version__}, python {platform.python_version()}"
    )
    dev = torch.device(args.device)
    f32 = torch.float32
    for name, why in backends.explain("adamw", dev, (f32, f32)).items():
        state = "ok" if not why else f"cannot run on {dev.type}: {'; '.join(why)}"
        print(f"  {name:7s} {state}")
    try:
        print(f"  auto picks {backends.get_backend('auto', dev).name!r} for fp32 on {dev.type}")
    except backends.BackendUnavailableError as exc:  # PIECE_OPTIM_BACKEND names one that can't
        print(f"  {exc}")
    return 0
