"""What the two command lines (``plada-send``, ``plada-receive``) share: running a
subcommand with typed errors, and the options that name the local reference set.

It belongs to the command lines, not to the protocol: :mod:`protocol` is the
contract both sides implement and knows nothing of argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

from protocol.errors import PladaError
from protocol.reference.base import ReferenceSource
from protocol.reference.factory import ReferenceLocation
from protocol.task_data import LabeledImages, load_labeled_images

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, like other Unix tools


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (unless it has none) and keeps descriptions' line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or not action.help:
            return action.help
        return super()._get_help_string(action)


def description(docstring: str | None) -> str:
    """A module docstring as a command's ``--help`` text, without reStructuredText markup."""
    return (docstring or "").replace("``", "").strip()


def command_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from command_parsers(child)


def _prepare(parser: argparse.ArgumentParser) -> None:
    """Help with defaults everywhere; every subcommand remembers its own parser so that
    its usage, not the top-level one, answers a mistyped option."""
    for command in command_parsers(parser):
        command.formatter_class = HelpFormatter
        command.set_defaults(_command_parser=command)
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, child in action.choices.items():
                    if not child.description and helps.get(name):
                        text = helps[name]
                        child.description = text[0].upper() + text[1:] + "."


def build_command_line(
    prog: str,
    docstring: str | None,
    subcommands: Iterable[Callable[[argparse._SubParsersAction], None]],
) -> argparse.ArgumentParser:
    """A command line of subcommands, each added by its own function, in order."""
    parser = argparse.ArgumentParser(prog=prog, description=description(docstring))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in subcommands:
        add(sub)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's ``func``.

    A ``PladaError`` becomes one line on stderr (``prog: error: Type: message``)
    and exit status 2; a reader that closes the pipe early (``| head``) ends the
    output quietly; anything else is a bug and keeps its traceback.
    """
    _prepare(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args._command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        status = int(args.func(args))
        sys.stdout.flush()
        return status
    except PladaError as exc:
        print(f"{parser.prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # the rest of the output has nowhere to go: point stdout at /dev/null so that
        # the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def add_reference_options(parser: argparse.ArgumentParser) -> None:
    """--reference, --cache-dir and --image-size."""
    parser.add_argument(
        "--reference",
        default="glyphs",
        help="'glyphs[:seed=S,per=P]', an ImageFolder directory, or 'wds:<dir|shard-{0..N}.tar>'",
    )
    parser.add_argument("--cache-dir", default=None, help="reference cache (default $PLADA_CACHE)")
    parser.add_argument("--image-size", type=int, default=64, help="image side for ImageFolders")


def reference_location(args: argparse.Namespace) -> ReferenceLocation:
    """Where the reference set the options name is."""
    return ReferenceLocation(args.reference, args.cache_dir, args.image_size)


def reference_from_args(args: argparse.Namespace) -> ReferenceSource:
    """The reference set the options name."""
    return reference_location(args).open()


def task_images_for(
    path: str, reference: ReferenceSource, what: str, name: str | None = None
) -> LabeledImages:
    """Labeled images (a task's, a holdout) in the reference set's channels and size: an
    ImageFolder is converted, with a line saying so; a ``.npz`` must already match."""
    channels, size = reference.in_channels, reference.image_size
    images = load_labeled_images(path, size, channels)
    if Path(path).is_dir():
        kind = "grayscale" if channels == 1 else "RGB"
        print(
            f"{what}: converted {len(images)} images of {path} to {kind} {size}x{size}, "
            "as the reference set's"
        )
    return images if name is None else replace(images, name=name)


def print_reference(args: argparse.Namespace) -> int:
    """The ``reference`` subcommand: build or verify the set and print its fingerprint."""
    reference = reference_from_args(args)
    manifest = reference.manifest
    print(f"reference {manifest.name}: n={len(manifest)} blocks={len(manifest.block_names())}")
    for problem in getattr(reference, "problems", []):
        print(f"warning: {problem}")
    print(f"fingerprint {manifest.fingerprint_hex}")
    return 0
