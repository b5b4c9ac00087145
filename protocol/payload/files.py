"""Payload files, and a payload's selection as people read it."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.atomic_files import write_bytes_atomic
from protocol.errors import PayloadError, PayloadLimitError
from protocol.payload.codec import MAX_PAYLOAD_BYTES
from protocol.payload.model import SelectionRecord


def read_payload_bytes(path: str | os.PathLike[str], max_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The raw bytes of a payload file (not verified), refusing an oversized file before
    reading it; a missing or unreadable file is a ``PayloadError``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise PayloadLimitError(f"{path} is {size} bytes, over the cap of {max_bytes}")
        return path.read_bytes()
    except OSError as exc:
        raise PayloadError(f"cannot read payload {path}: {exc.strerror}") from exc


def write_payload(path: str | os.PathLike[str], data: bytes) -> None:
    """Write payload bytes atomically and durably (temp file, fsync, rename)."""
    write_bytes_atomic(Path(path), data, durable=True)


def selection_text(selection: SelectionRecord) -> str:
    """A payload's selection header in a few words, e.g. ``safety-net knn 1%``."""
    keep = selection.get("keep")
    shown = f" {100 * keep:g}%" if isinstance(keep, (int, float)) else ""
    return f"{selection.get('strategy', '?')} {selection.get('score', '')}".strip() + shown
