"""``plada-receive reference``: build or check the local reference set; with
``--canonical``, what this device's copy holds of the canonical one (its availability)."""

from __future__ import annotations

import argparse

from plada_cli import (
    add_manifest_out,
    add_reference_options,
    machine_cores,
    print_reference,
    reference_location,
)
from protocol.atomic_files import writable_file_path, write_json_atomic
from protocol.availability import CHECKS, Availability
from protocol.reference.canonical import AvailabilityBuild, CanonicalView
from receiver.commands.options import Subparsers

LEAST_COMPLETE_SHOWN = 10


def add_reference(sub: Subparsers) -> None:
    ref = sub.add_parser(
        "reference",
        help="build or verify the local reference set; with --canonical, which of the "
        "canonical set's images this copy holds",
    )
    add_reference_options(ref, canonical=True)
    add_manifest_out(ref)
    copy = ref.add_argument_group("with --canonical")
    copy.add_argument(
        "--check",
        choices=CHECKS,
        default="decode",
        help="decode: decode every image, so damaged files count as missing (resumable); "
        "exists: list the copy only",
    )
    copy.add_argument("--rebuild", action="store_true", help="check again from the start")
    copy.add_argument("--threads", type=int, default=machine_cores(), help="decoding threads")
    copy.add_argument(
        "--availability-out",
        metavar="FILE",
        help="also write the availability here (for the sender: plada-send fleet add)",
    )
    copy.add_argument("--json", help="rows present per top-level folder, as JSON")
    copy.add_argument("--quiet", action="store_true", help="no progress bar")
    ref.set_defaults(func=_run_reference)


def _run_reference(args: argparse.Namespace) -> int:
    if not args.canonical:
        return print_reference(args)
    outputs = [args.availability_out, args.json, args.manifest_out]
    for path in filter(None, outputs):  # every output, before the long pass
        writable_file_path(path, "output file")
    build = AvailabilityBuild(args.check, args.threads, not args.quiet, args.rebuild)
    view = reference_location(args).open(build)
    if not isinstance(view, CanonicalView):  # open_canonical makes one or refuses
        raise TypeError("a canonical reference location opened without its manifest")
    available = view.availability
    _print_copy(view, available)
    if args.availability_out:
        available.save(args.availability_out)
        print(
            f"availability: {args.availability_out} (send it to the sender: plada-send fleet add)"
        )
    if args.json:
        folders = available.by_block(view.manifest)
        write_json_atomic(args.json, _copy_json(available, folders))
    if args.manifest_out:
        view.manifest.save(args.manifest_out)
    return 0


def _print_copy(view: CanonicalView, available: Availability) -> None:
    canonical = view.manifest
    share = available.count / available.size
    how = "decoded" if available.check == "decode" else "listed"
    print(
        f"copy {available.source}: {available.count} of {available.size} rows of "
        f"{canonical.name} ({canonical.fingerprint_hex[:16]}...) present, {100 * share:.2f}% "
        f"({how})"
    )
    folders = view.availability.by_block(canonical)
    complete = sum(p == n for _, p, n in folders)
    absent = sum(p == 0 for _, p, _ in folders)
    partial = len(folders) - complete - absent
    print(f"folders: {complete} complete, {partial} partial, {absent} absent (of {len(folders)})")
    short = sorted((p / n, name, p, n) for name, p, n in folders if p < n)
    for _, name, present, size in short[:LEAST_COMPLETE_SHOWN]:
        print(f"  {name}: {present} of {size}")
    if len(short) > LEAST_COMPLETE_SHOWN:
        print(f"  ... and {len(short) - LEAST_COMPLETE_SHOWN} more (--json lists every folder)")


def _copy_json(available: Availability, folders: list[tuple[str, int, int]]) -> dict:
    return {
        "canonical": {"name": available.name, "fingerprint": available.fingerprint.hex()},
        "source": available.source,
        "check": available.check,
        "rows": available.size,
        "present": available.count,
        "folders": {name: [present, size] for name, present, size in folders},
    }
