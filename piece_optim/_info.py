"""``piece-optim info``: versions and backends."""

from __future__ import annotations

import argparse
import platform

import torch

from ._backends import BACKENDS, _load, _load_errors
from ._version import __version__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device to check backends for")


def run(args: argparse.Namespace) -> int:
    print(
        f"piece-optim {__version__}, torch {torch.__version__}, python {platform.python_version()}"
    )
    dev = torch.device(args.device)
    for name in BACKENDS:
        be = _load(name)
        if be is None:
            print(f"  {name:7s} unavailable: {_load_errors.get(name, '?')}")
            continue
        ok, why = be.supports(dev)
        print(f"  {name:7s} {'ok' if ok else 'cannot run on ' + dev.type + ': ' + why}")
    return 0
