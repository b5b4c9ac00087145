"""What both command lines share: running a subcommand and reporting typed errors."""

from __future__ import annotations

import argparse
import sys

from protocol.errors import PladaError

EXIT_USER_ERROR = 2


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's ``func``.

    A ``PladaError`` becomes one line on stderr (``prog: error: Type: message``)
    and exit status 2; anything else is a bug and keeps its traceback.
    """
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PladaError as exc:
        print(f"{parser.prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
