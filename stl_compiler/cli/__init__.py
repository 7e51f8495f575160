"""``stl-compiler`` command line: one subcommand per feature module.

Each feature module exposes ``add_parser(subparsers)`` that registers its subcommand and sets
``func`` on the parser; this file only assembles them. Every user error (bad option, bad
input, a model or file that cannot be used) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

_SUBCOMMAND_MODULES = ("stl_compiler.fit.cli", "stl_compiler.cli.export")

#: Errors that mean "the user asked for something that cannot be done": reported in one line.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError,
               ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .. import __version__

    parser = _Parser(prog="stl-compiler", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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


def one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line messages joined with "; ")."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"stl-compiler {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
