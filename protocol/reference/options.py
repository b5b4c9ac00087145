"""Command-line options both CLIs use to name the local reference set."""

from __future__ import annotations

import argparse

from protocol.reference.base import ReferenceSource, open_reference


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
