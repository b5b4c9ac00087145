"""Which rows of a canonical reference manifest a device copy holds, and the file that
says so.

A payload names reference images by their index in the canonical manifest (sorted keys,
named by its fingerprint). A device whose copy lost files, or that holds another release,
keeps an *availability* against that manifest: one bit per canonical row, set where it
can read the image. Devices send it to the ground station (``plada-send fleet add``), so
the file is read as hostile: bounded, checksummed, every field checked.

File layout: ``PLADA-AVAIL v1\\n``, one JSON line (canonical name, fingerprint, size,
present count, how presence was checked, where the copy is), the zstd-compressed packed
bits (``np.packbits``, little bit order), and the SHA-256 of everything before it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_bytes_atomic
from protocol.errors import PladaError
from protocol.manifest import ReferenceManifest

AVAILABILITY_MAGIC = b"PLADA-AVAIL v1\n"
AVAILABILITY_SUFFIX = ".avail"
MAX_AVAILABILITY_BYTES = 64 << 20  # 14.2M rows pack into 1.8 MB before compression
MAX_ROWS = 1 << 31
CHECKS = ("exists", "decode")  # listed in the copy; listed and decoded in full
_HEADER_LIMIT = 4096


class AvailabilityError(PladaError):
    """An availability file is unreadable, damaged, forged or for another reference set."""


@dataclass(frozen=True, eq=False)
class Availability:
    """One bit per canonical row: whether this copy of the reference set can read it."""

    name: str  # the canonical reference set's name
    fingerprint: bytes  # the canonical manifest's fingerprint
    present: np.ndarray  # bool [size]
    check: str = "exists"  # how presence was established (see CHECKS)
    source: str = ""  # the copy it describes (a path, a release name), for people

    def __post_init__(self) -> None:
        if self.present.dtype != np.bool_ or self.present.ndim != 1:
            raise AvailabilityError("availability must be a one-dimensional boolean mask")
        if len(self.fingerprint) != 32:
            raise AvailabilityError("availability names a fingerprint that is not 32 bytes")
        if self.check not in CHECKS:
            raise AvailabilityError(f"unknown presence check {self.check!r} ({', '.join(CHECKS)})")

    @classmethod
    def full(cls, manifest: ReferenceManifest, source: str = "") -> Availability:
        """Every row of ``manifest`` present."""
        present = np.ones(len(manifest), dtype=bool)
        return cls(manifest.name, manifest.fingerprint, present, "exists", source)

    @property
    def size(self) -> int:
        return int(self.present.size)

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.present))

    def matches(self, manifest: ReferenceManifest) -> bool:
        return self.fingerprint == manifest.fingerprint and self.size == len(manifest)

    def check_for(self, manifest: ReferenceManifest, what: str) -> None:
        """``AvailabilityError`` unless this availability is of ``manifest``'s rows."""
        if not self.matches(manifest):
            raise AvailabilityError(
                f"{what} describes reference {self.name} ({self.fingerprint.hex()[:16]}..., "
                f"{self.size} rows), not {manifest.name} ({manifest.fingerprint_hex[:16]}..., "
                f"{len(manifest)} rows): build it against this canonical manifest "
                "(plada-receive reference --canonical MANIFEST)"
            )

    def by_block(self, manifest: ReferenceManifest) -> list[tuple[str, int, int]]:
        """(top-level folder, rows present, rows in the canonical manifest) per block."""
        starts = manifest.block_starts()
        present = np.add.reduceat(self.present.astype(np.int64), starts[:-1])
        sizes = np.diff(starts)
        names = manifest.block_names()
        return [(n, int(p), int(s)) for n, p, s in zip(names, present, sizes, strict=True)]

    def encode(self) -> bytes:
        """The file's bytes (see the module docstring)."""
        import zstandard

        header = {
            "name": self.name,
            "fingerprint": self.fingerprint.hex(),
            "size": self.size,
            "present": self.count,
            "check": self.check,
            "source": self.source,
        }
        line = json.dumps(header, sort_keys=True, ensure_ascii=True).encode() + b"\n"
        packed = np.packbits(self.present, bitorder="little").tobytes()
        body = AVAILABILITY_MAGIC + line + zstandard.ZstdCompressor(level=10).compress(packed)
        return body + hashlib.sha256(body).digest()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename)."""
        write_bytes_atomic(Path(path), self.encode(), durable=True)


def decode_availability(data: bytes, where: str = "availability") -> Availability:
    """An :class:`Availability` from untrusted bytes, or ``AvailabilityError``."""
    if len(data) > MAX_AVAILABILITY_BYTES:
        raise AvailabilityError(f"{where} is {len(data)} bytes, over the 64 MiB limit")
    if not data.startswith(AVAILABILITY_MAGIC):
        raise AvailabilityError(f"{where} is not a plada availability file")
    body, digest = data[:-32], data[-32:]
    if len(data) < len(AVAILABILITY_MAGIC) + 32 or hashlib.sha256(body).digest() != digest:
        raise AvailabilityError(f"{where} is damaged or truncated (checksum): build it again")
    end = body.find(b"\n", len(AVAILABILITY_MAGIC), len(AVAILABILITY_MAGIC) + _HEADER_LIMIT)
    if end < 0:
        raise AvailabilityError(f"{where} has no header line")
    header = _header(body[len(AVAILABILITY_MAGIC) : end], where)
    present = _bits(body[end + 1 :], header["size"], where)
    if int(np.count_nonzero(present)) != header["present"]:
        raise AvailabilityError(f"{where}: its header's count does not match its rows")
    return Availability(
        header["name"],
        bytes.fromhex(header["fingerprint"]),
        present,
        header["check"],
        header["source"],
    )


def _header(line: bytes, where: str) -> dict:
    try:
        header = json.loads(line)
        ok = (
            isinstance(header, dict)
            and isinstance(header.get("name"), str)
            and isinstance(header.get("source"), str)
            and header.get("check") in CHECKS
            and isinstance(header.get("size"), int)
            and 0 < header["size"] <= MAX_ROWS
            and isinstance(header.get("present"), int)
            and len(bytes.fromhex(header.get("fingerprint", ""))) == 32
        )
    except (ValueError, TypeError) as exc:
        raise AvailabilityError(f"{where} has a malformed header") from exc
    if not ok:
        raise AvailabilityError(f"{where} has a malformed header")
    return header


def _bits(compressed: bytes, size: int, where: str) -> np.ndarray:
    import zstandard

    expected = (size + 7) // 8
    try:
        packed = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise AvailabilityError(f"{where}: its rows do not decompress ({exc})") from exc
    if len(packed) != expected:
        raise AvailabilityError(f"{where}: {len(packed)} bytes of rows, {expected} expected")
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")
    if bits[size:].any():
        raise AvailabilityError(f"{where}: bits set past its last row")
    return bits[:size].astype(bool)


def read_availability(path: str | os.PathLike[str]) -> Availability:
    """Read an availability file (bounded), or ``AvailabilityError`` naming it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_AVAILABILITY_BYTES + 1)
    except OSError as exc:
        raise AvailabilityError(f"cannot read availability file {path}: {exc.strerror}") from exc
    return decode_availability(data, str(path))


@dataclass(frozen=True)
class Coverage:
    """How much of a payload's kept images a copy holds, overall and per class."""

    kept: int
    present: int
    per_class: tuple[tuple[str, int, int], ...]  # (class, present, kept)

    @property
    def overall(self) -> float:
        return self.present / self.kept if self.kept else 1.0

    def worst_class(self) -> tuple[str, float]:
        """The class with the lowest share present (ties: the first)."""
        shares = [(p / k if k else 1.0, name) for name, p, k in self.per_class]
        share, name = min(shares, key=lambda pair: pair[0])
        return name, share

    def as_json(self) -> dict[str, object]:
        name, share = self.worst_class()
        return {
            "kept": self.kept,
            "present": self.present,
            "overall": round(self.overall, 6),
            "worst_class": name,
            "worst_class_share": round(share, 6),
            "per_class": {name: [p, k] for name, p, k in self.per_class},
        }


def coverage_of(
    present: np.ndarray, indices: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]
) -> Coverage:
    """The :class:`Coverage` of kept ``indices`` (with ``labels``) under a presence mask."""
    held = present[indices]
    kept = np.bincount(labels, minlength=len(class_names))
    got = np.bincount(labels[held], minlength=len(class_names))
    rows = tuple((n, int(g), int(k)) for n, g, k in zip(class_names, got, kept, strict=True))
    return Coverage(int(indices.size), int(np.count_nonzero(held)), rows)
