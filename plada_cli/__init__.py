"""What the two command lines (``plada-send``, ``plada-receive``) share: running a
subcommand with typed errors, and the options that name the local reference set.

It belongs to the command lines, not to the protocol: :mod:`protocol` is the
contract both sides implement and knows nothing of argparse.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from protocol.atomic_files import path_error_text, writable_file_path
from protocol.errors import PladaError
from protocol.reference.base import ReferenceSource
from protocol.reference.factory import ReferenceLocation
from protocol.task_data import LabeledImages, load_labeled_images

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, like other Unix tools
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C (SIGINT), as a shell reports it
# what a subcommand leaves when Ctrl-C stops it, unless it says more (``interrupted=``)
INTERRUPTED_NOTE = "every output is written whole or not at all; run the command again"


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in subcommands:
        add(sub)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand's ``func``.

    A ``PladaError`` becomes one line on stderr (``prog: error: Type: message``) and exit
    status 2; so does an operating-system error on a path the user gave (a missing or
    read-only directory, a file where a directory belongs, a full disk). Ctrl-C is one
    line saying what was kept (the subcommand's ``interrupted`` default) and exit 130.
    A reader that closes the pipe early (``| head``) ends the output quietly; anything
    else is a bug and keeps its traceback.
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
        return _error_line(parser.prog, type(exc).__name__, str(exc))
    except BrokenPipeError:
        # the rest of the output has nowhere to go: point stdout at /dev/null so that
        # the interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is None and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise  # not about a path or the disk: a bug
        return _error_line(parser.prog, "StorageError", path_error_text(exc))
    except KeyboardInterrupt:
        note = getattr(args, "interrupted", None) or INTERRUPTED_NOTE
        print(f"{parser.prog}: interrupted (Ctrl-C): {note}", file=sys.stderr)
        return EXIT_INTERRUPTED


@dataclass
class StopRequest:
    """SIGINT or SIGTERM asked a long job to stop at its next safe point (a second
    Ctrl-C stops it at once)."""

    signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While inside, SIGINT and SIGTERM set the yielded request instead of killing."""
    request = StopRequest()

    def handle(signum: int, _frame: object) -> None:
        if request.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt  # asked twice: stop now
        request.signum = signum

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def machine_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _error_line(prog: str, kind: str, message: str) -> int:
    print(f"{prog}: error: {kind}: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def add_reference_options(parser: argparse.ArgumentParser, canonical: bool = False) -> None:
    """--reference, --cache-dir and --image-size (and with ``canonical``, --canonical: a
    device's copy that may be partial)."""
    parser.add_argument(
        "--reference",
        default="glyphs",
        help="'glyphs[:seed=S,per=P]', an ImageFolder directory, or 'wds:<dir|shard-{0..N}.tar>'",
    )
    parser.add_argument("--cache-dir", default=None, help="reference cache (default $PLADA_CACHE)")
    parser.add_argument("--image-size", type=int, default=64, help="image side for ImageFolders")
    if canonical:
        parser.add_argument(
            "--canonical",
            metavar="MANIFEST",
            help="the canonical manifest of the reference set (plada-send reference "
            "--manifest-out): payload indices are read through it, and images this copy "
            "lacks are skipped and counted (--min-coverage)",
        )


def reference_location(args: argparse.Namespace) -> ReferenceLocation:
    """Where the reference set the options name is."""
    canonical = getattr(args, "canonical", None)
    return ReferenceLocation(args.reference, args.cache_dir, args.image_size, canonical)


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
    if images.unreadable:
        file, reason = images.unreadable[0]
        print(
            f"warning: {what}: skipped {len(images.unreadable)} unreadable image(s) of {path} "
            f"(first: {file}: {reason})"
        )
    return images if name is None else replace(images, name=name)


def add_manifest_out(parser: argparse.ArgumentParser) -> None:
    """--manifest-out: where ``reference`` writes the set's manifest."""
    parser.add_argument(
        "--manifest-out",
        metavar="FILE",
        help="write the manifest (the canonical key order payload indices use) here: "
        "devices whose copies may differ hold it beside their images (--canonical)",
    )


def print_reference(args: argparse.Namespace) -> int:
    """The ``reference`` subcommand: build or verify the set and print its fingerprint
    (with --manifest-out, write its manifest)."""
    out = writable_file_path(args.manifest_out, "--manifest-out") if args.manifest_out else None
    reference = reference_from_args(args)
    manifest = reference.manifest
    print(f"reference {manifest.name}: n={len(manifest)} blocks={len(manifest.block_names())}")
    for problem in getattr(reference, "problems", []):
        print(f"warning: {problem}")
    print(f"fingerprint {manifest.fingerprint_hex}")
    if out is not None:
        manifest.save(out)
        print(f"manifest: {out}")
    return 0
