"""Thumbnails: a small uint8 RGB copy of every reference row, written while embedding.

The plan's proxy student learns from the pixels of the rows a candidate selects; on a
14.2M-image JPEG tree, decoding them again per plan is out of reach, so the embedding
pass, which decodes every image anyway, keeps a ``SIZE`` x ``SIZE`` thumbnail of each.
A thumbnail is made from the batch the embedder sees (CLIP's resize and center crop,
normalised): the normalisation is undone and the image area-averaged down to ``SIZE``.
The task's validation images go through the same two steps
(:func:`sender.scoring.embeddings.embed_folder`), so reference and task pixels reach the
proxy alike.

Layout in an embeddings directory::

    parts/thumbs-000042.npy    uint8 [rows, 3, S, S] of part 42 (beside part-000042.npz)
    thumbnails.u8              after merge: uint8 [n, 3, S, S], row-major, memory-mapped
    thumbnails.crc32           after merge: one little-endian CRC-32 per row
    thumbnails.json            format, size, n and the reference fingerprint

Cost: 3 S^2 bytes a row: 3,072 B at S = 32, i.e. 43.6 GB for 14.2M rows.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.atomic_files import write_atomic, write_json_atomic
from protocol.errors import ConfigError
from sender.embedding.row_reads import read_rows_at
from sender.embedding.tensor_decode import PreprocessSpec

DEFAULT_THUMBNAIL_SIZE = 32
THUMBNAILS_FORMAT = "plada-thumbnails-v1"
THUMBNAILS_FILE = "thumbnails.u8"
THUMBNAILS_CRC_FILE = "thumbnails.crc32"
THUMBNAILS_META_FILE = "thumbnails.json"
MIN_THUMBNAIL_SIZE = 8


class ThumbnailError(ConfigError):
    """A store's thumbnails are missing, damaged or of another size than needed."""


def check_thumbnail_size(size: int) -> int:
    """``--thumbnails SIZE``: 0 (none) or a side of at least 8 pixels."""
    if size != 0 and not MIN_THUMBNAIL_SIZE <= size <= 256:
        raise ConfigError(f"--thumbnails must be 0 (none) or 8..256 pixels, not {size}")
    return size


class Thumbnailer:
    """Preprocessed CLIP batches -> uint8 thumbnails [B, 3, S, S]."""

    def __init__(self, spec: PreprocessSpec, size: int) -> None:
        self.size = size
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        pixels = batch.float() * self.std.to(batch.device) + self.mean.to(batch.device)
        small = torch.nn.functional.interpolate(pixels, size=(self.size, self.size), mode="area")
        return small.clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu().numpy()


def thumbnail_part_path(root: Path, part: int) -> Path:
    return root / "parts" / f"thumbs-{part:06d}.npy"


def write_thumbnail_part(root: Path, part: int, thumbnails: np.ndarray) -> None:
    """One part's thumbnails, atomically (written before the part's embeddings, so a part
    whose embeddings are on disk has its thumbnails too when they were asked for)."""
    write_atomic(thumbnail_part_path(root, part), lambda handle: np.save(handle, thumbnails))


def thumbnail_part_size(root: Path, part: int, rows: int) -> int | None:
    """The side of a part's stored thumbnails, or None when absent or unreadable."""
    path = thumbnail_part_path(root, part)
    if not path.is_file():
        return None
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    shape = stored.shape
    if (
        stored.dtype != np.uint8
        or len(shape) != 4
        or shape[:2] != (rows, 3)
        or shape[2] != shape[3]
    ):
        return None
    return int(shape[2])


def read_thumbnail_part(root: Path, part: int) -> np.ndarray:
    return np.load(thumbnail_part_path(root, part), mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class ThumbnailsMeta:
    """What ``thumbnails.json`` records."""

    size: int
    n: int
    reference_fingerprint: str
    format: str = THUMBNAILS_FORMAT

    @property
    def row_bytes(self) -> int:
        return 3 * self.size * self.size

    def write(self, root: Path) -> None:
        write_json_atomic(root / THUMBNAILS_META_FILE, asdict(self))


def row_checksums(thumbnails: np.ndarray) -> np.ndarray:
    """CRC-32 of each row's bytes (little-endian uint32)."""
    flat = np.ascontiguousarray(thumbnails).reshape(len(thumbnails), -1)
    return np.fromiter((zlib.crc32(row) for row in flat), dtype="<u4", count=len(flat))


def _refill_hint(size: int) -> str:
    return (
        f"run 'plada-send embed ... --thumbnails {size}' with the same --out (it redoes only "
        "the parts without them), then 'plada-send merge'"
    )


class ThumbnailStore:
    """Read access to a merged store's thumbnails; every row read is checked against its
    CRC-32, so a damaged file ends in a typed error, never in a proxy trained on noise."""

    def __init__(self, root: Path, n: int, reference_fingerprint: str) -> None:
        self.root = root
        meta_path = root / THUMBNAILS_META_FILE
        if not meta_path.is_file():
            raise ThumbnailError(
                f"{root} has no thumbnails, which the plan's proxy learns from: "
                + _refill_hint(DEFAULT_THUMBNAIL_SIZE)
            )
        self.meta = self._read_meta(meta_path)
        meta = self.meta
        if meta.n != n or meta.reference_fingerprint != reference_fingerprint:
            raise ThumbnailError(
                f"{meta_path} describes another reference set than the embeddings beside it: "
                + _refill_hint(meta.size)
            )
        pixels, crcs = root / THUMBNAILS_FILE, root / THUMBNAILS_CRC_FILE
        for path, expected in ((pixels, n * meta.row_bytes), (crcs, 4 * n)):
            found = path.stat().st_size if path.is_file() else None
            if found != expected:
                raise ThumbnailError(
                    f"{path} is damaged ({found} bytes, expected {expected}): "
                    + _refill_hint(meta.size)
                )
        self.checksums = np.memmap(crcs, dtype="<u4", mode="r", shape=(n,))

    @staticmethod
    def _read_meta(path: Path) -> ThumbnailsMeta:
        try:
            data = json.loads(path.read_text())
            meta = ThumbnailsMeta(**{k: data[k] for k in ThumbnailsMeta.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ThumbnailError(
                f"{path} is unreadable ({exc}): " + _refill_hint(DEFAULT_THUMBNAIL_SIZE)
            ) from exc
        if meta.format != THUMBNAILS_FORMAT or not isinstance(meta.size, int) or meta.size < 1:
            raise ThumbnailError(f"{path} is not a {THUMBNAILS_FORMAT} file: " + _refill_hint(32))
        return meta

    @property
    def size(self) -> int:
        return self.meta.size

    def require_size(self, size: int) -> None:
        """Refuse thumbnails of another side than ``size``, naming the fix."""
        if size != self.size:
            raise ThumbnailError(
                f"{self.root} holds {self.size}x{self.size} thumbnails, the plan asks for "
                f"{size}x{size}: plan with --proxy-size {self.size}, or "
                + _refill_hint(size).replace("with the same --out", "into a new --out")
            )

    def check_sample(self, rows: int = 256, seed: int = 0) -> None:
        """Read and check a seeded sample of rows: a damaged file is found before a plan
        spends minutes on scoring (every row read later is checked too)."""
        count = min(rows, self.meta.n)
        self.read_rows(np.random.default_rng(seed).choice(self.meta.n, count, replace=False))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), 3, S, S], each row's checksum verified."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.meta.n):
            raise IndexError(f"rows outside the {self.meta.n} thumbnails of {self.root}")
        try:
            raw = read_rows_at(self.root / THUMBNAILS_FILE, rows, self.meta.row_bytes)
        except (OSError, EOFError) as exc:
            raise ThumbnailError(
                f"{self.root / THUMBNAILS_FILE} is unreadable ({exc}): " + _refill_hint(self.size)
            ) from exc
        out = raw.reshape(rows.size, 3, self.size, self.size)
        bad = np.flatnonzero(row_checksums(out) != self.checksums[rows])
        if bad.size:
            raise ThumbnailError(
                f"{self.root / THUMBNAILS_FILE} is damaged ({bad.size} of {rows.size} rows read "
                f"fail their checksum, first row {int(rows[bad[0]])}): " + _refill_hint(self.size)
            )
        return out


@dataclass(frozen=True)
class MergedThumbnails:
    """What ``merge`` did with the parts' thumbnails: their side, or why none were merged."""

    size: int | None
    parts_without: list[int]  # parts with no (or other-sized) thumbnails

    def describe(self) -> str:
        if self.size is not None:
            return f"{self.size}x{self.size} thumbnails"
        if not self.parts_without:
            return "no thumbnails"
        shown = ", ".join(map(str, self.parts_without[:5]))
        return (
            f"no thumbnails merged: {len(self.parts_without)} part(s) lack them or differ in "
            f"size ({shown}{', ...' if len(self.parts_without) > 5 else ''}); "
            + _refill_hint(DEFAULT_THUMBNAIL_SIZE)
        )


def merge_thumbnails(
    root: Path, ranges: list[tuple[int, int]], fingerprint: str
) -> MergedThumbnails:
    """Concatenate the parts' thumbnails into ``thumbnails.u8`` with a CRC-32 per row,
    when every part has them at one size; otherwise write nothing and say which lack them.
    ``ranges``: each part's [start, stop) rows."""
    from protocol.atomic_files import atomic_outputs

    sizes = [
        thumbnail_part_size(root, part, stop - start) for part, (start, stop) in enumerate(ranges)
    ]
    present = [size for size in sizes if size is not None]
    if not present:
        return MergedThumbnails(None, [])
    size = max(set(present), key=present.count)
    without = [part for part, found in enumerate(sizes) if found != size]
    if without:
        return MergedThumbnails(None, without)
    names = (THUMBNAILS_FILE, THUMBNAILS_CRC_FILE, THUMBNAILS_META_FILE)
    with atomic_outputs(*(root / name for name in names)) as (pixels, crcs, meta):
        for part in range(len(ranges)):
            stored = np.asarray(read_thumbnail_part(root, part))
            pixels.write(stored.tobytes())
            crcs.write(row_checksums(stored).tobytes())
        recorded = ThumbnailsMeta(size, ranges[-1][1] if ranges else 0, fingerprint)
        meta.write(json.dumps(asdict(recorded), indent=2).encode())
    return MergedThumbnails(size, [])
