"""The ``piece-optim`` command line.

Subcommands are listed in ``SUBCOMMANDS`` as ``name -> (module, help)``; each module
provides ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when
its subcommand runs, so ``piece-optim --help`` stays fast and never needs the optional
dependencies of a subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ._version import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("piece_optim._info", "print versions and the backends available here"),
    "demo": ("piece_optim.demo.cli", "continual-learning demo: PIECE vs SeqFT, LoRA, random"),
}
# Subcommands that moved: their old name answers with where they went.
MOVED: dict[str, str] = {
    "bench": "the benchmarks live in the repository: run `python -m benchmarks` from a source "
    "checkout (see benchmarks/__main__.py)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piece-optim",
        description="PIECE importance-selected sparse fine-tuning: tools and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"piece-optim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ImportError as exc:  # optional dependency missing: say so when it runs
            p.set_defaults(_import_error=str(exc))
    for name, where in MOVED.items():
        p = sub.add_parser(name, help=argparse.SUPPRESS, add_help=False)
        p.set_defaults(_moved=where)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_moved", None):
        print(f"piece-optim {args.command}: moved: {args._moved}", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_import_error", None):
        print(f"piece-optim {args.command}: {args._import_error}", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
