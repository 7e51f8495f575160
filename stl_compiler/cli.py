"""``stl-compiler`` command line: one subcommand per feature module.

Each feature module exposes ``add_parser(subparsers)`` that registers its subcommand and sets
``func`` on the parser; this file only assembles them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

_SUBCOMMAND_MODULES = ("stl_compiler.fit.cli", "stl_compiler.exporters.cli")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="stl-compiler", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
            ImportError) as err:
        print(f"stl-compiler {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
