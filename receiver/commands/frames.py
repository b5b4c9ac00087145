"""``plada-receive frames DIR --out PAYLOAD``: frames that reached this device as files
turned into the payload they carry, without a daemon."""

from __future__ import annotations

import argparse
from pathlib import Path

from protocol.atomic_files import writable_file_path, write_bytes_atomic
from protocol.errors import ConfigError, TransferError
from protocol.shared_keys import read_link_key_file
from receiver.commands.options import Subparsers
from receiver.frames_offline import OfflineTransfers, decode_folder


def add_frames(sub: Subparsers) -> None:
    frames = sub.add_parser(
        "frames", help="decode a folder of received frames into a payload file (no daemon)"
    )
    frames.add_argument("folder", help="the folder of .frame and .frames files")
    frames.add_argument("--out", required=True, help="the payload file to write (.plada)")
    frames.add_argument("--link-key", help="the link's frame key file, if its frames are tagged")
    frames.add_argument(
        "--transfer", help="the transfer id (hex, or its start) when the folder holds several"
    )
    frames.set_defaults(func=_run_frames)


def _run_frames(args: argparse.Namespace) -> int:
    out = writable_file_path(args.out, "--out")
    key = read_link_key_file(args.link_key) if args.link_key else None
    found = decode_folder(Path(args.folder), key)
    counts = ", ".join(f"{n} {what}" for what, n in sorted(found.counts.items()))
    print(f"frames of {args.folder}: {counts or 'none usable'}")
    transfer, payload = _chosen(found, args.transfer)
    write_bytes_atomic(out, payload, durable=True)
    print(f"transfer {transfer.hex()}: {len(payload)} B payload written to {out}")
    print(f"next: plada-receive verify {out} (the frames prove nothing; its signature does)")
    return 0


def _chosen(found: OfflineTransfers, wanted: str | None) -> tuple[bytes, bytes]:
    """The one decoded transfer (``wanted``: the one whose id starts so)."""
    decoded = {t: p for t, p in found.payloads.items() if not wanted or t.hex().startswith(wanted)}
    if len(decoded) == 1:
        return next(iter(decoded.items()))
    if len(decoded) > 1:
        ids = ", ".join(t.hex() for t in decoded)
        raise ConfigError(
            f"the frames decode to several transfers ({ids}): pick one with --transfer"
        )
    partial = {t: h for t, h in found.partial.items() if not wanted or t.hex().startswith(wanted)}
    if partial:
        shown = "; ".join(
            f"{t.hex()}: {held} of at least {k} frames" for t, (held, k) in partial.items()
        )
        raise TransferError(f"no transfer is complete ({shown}): wait for more frames")
    raise TransferError(
        "no frame in the folder belongs to a transfer" + (f" {wanted}" if wanted else "")
    )
