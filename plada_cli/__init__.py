"""What the two command lines (``plada-send``, ``plada-receive``) share: running a
subcommand with typed errors, and the options that name the local reference set.

It belongs to the command lines, not to the protocol: :mod:`protocol` is the
contract both sides implement and knows nothing of argparse.
"""

from __future__ import annotations

import argparse
import sys

from protocol.errors import PladaError
from protocol.reference.base import ReferenceSource
from protocol.reference.factory import open_reference

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


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    """--reference, --cache-dir and --image-size."""
    parser.add_argument(
        "--reference",
        default="glyphs",
        help="'glyphs[:seed=S,per=P]', an ImageFolder directory, or 'wds:<dir|shard-{0..N}.tar>'",
    )
    parser.add_argument("--cache-dir", default=None, help="reference cache (default $PLADA_CACHE)")
    parser.add_argument("--image-size", type=int, default=64, help="image side for ImageFolders")


def reference_from_args(args: argparse.Namespace) -> ReferenceSource:
    """The reference set the options name."""
    return open_reference(args.reference, args.cache_dir, args.image_size)


def print_reference(args: argparse.Namespace) -> int:
    """The ``reference`` subcommand: build or verify the set and print its fingerprint."""
    reference = reference_from_args(args)
    manifest = reference.manifest
    print(f"reference {manifest.name}: n={len(manifest)} blocks={len(manifest.block_names())}")
    for problem in getattr(reference, "problems", []):
        print(f"warning: {problem}")
    print(f"fingerprint {manifest.fingerprint_hex}")
    return 0
