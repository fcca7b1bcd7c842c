"""The ``pycurv`` command: thin subcommands over the library.

``--json`` writes strict JSON to stdout; progress and logs go to stderr; bad
arguments exit with status 2 and one line on stderr, never a traceback.
Each subcommand lives in its own module with ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._common import CliError, Parser, run_command

# Subcommand modules, in the order they are listed by --help.
_COMMANDS = ("demo", "sharpness", "spectrum", "stability", "nqm", "info")


def build_parser() -> Parser:
    import importlib

    from .. import __version__

    parser = Parser(
        prog="pycurv",
        description="Sharpness of a loss and the training-stability bounds it implies.",
    )
    parser.add_argument("--version", action="version", version=f"pycurv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser, whose options the user was typing
        sub = next((a.choices.get(args.command) for a in parser._actions  # noqa: SLF001 - argparse has no API
                    if isinstance(a, argparse._SubParsersAction) and getattr(args, "command", None)), None)
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run_command(args.func, args, prog=f"pycurv {args.command}")


__all__ = ["main", "build_parser", "CliError"]
