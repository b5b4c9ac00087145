"""On-disk reference embeddings: resumable parts while embedding, one flat file after merging.

Layout of an embeddings directory::

    meta.json                  what was embedded (model, reference fingerprint, n, dim)
    manifest.txt               the reference set's manifest (folder layout for block coding)
    parts/part-000042.npz      rows [42 * part_rows, ...): fp16 ``embeddings`` + bool ``valid``
    embeddings.f16             after merge: n x dim little-endian float16, row-major
    embeddings.i8, scales.f32  optional int8 copy with one float32 scale per row
    valid.npy                  after merge: bool [n], False where the image could not be read
    skipped.json               keys that could not be read, with the reason
    parts/thumbs-000042.npy,   optional uint8 thumbnails of every row, for the plan's
    thumbnails.*               proxy (see :mod:`.thumbnails`)

Every file is written to a temporary name and renamed, so an interrupted run
leaves only whole parts; ``embed`` skips the parts already there. Rows are in
manifest order, so row i is manifest key i.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from protocol.atomic_files import atomic_outputs, write_atomic, write_json_atomic
from protocol.errors import ConfigError, ReferenceSetError
from sender.embedding.row_reads import read_rows_at
from sender.embedding.thumbnails import (
    MergedThumbnails,
    ThumbnailStore,
    merge_thumbnails,
    thumbnail_part_path,
    thumbnail_part_size,
)

STORE_FORMAT = "plada-embeddings-v1"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.txt"
PARTS_DIR = "parts"
F16_FILE = "embeddings.f16"
I8_FILE = "embeddings.i8"
SCALES_FILE = "scales.f32"
VALID_FILE = "valid.npy"
SKIPPED_FILE = "skipped.json"


@dataclass(frozen=True)
class StoreMeta:
    """What an embeddings directory holds."""

    model: str
    pretrained: str
    dim: int
    n: int
    part_rows: int
    reference_name: str
    reference_fingerprint: str  # hex
    format: str = STORE_FORMAT

    @property
    def num_parts(self) -> int:
        return -(-self.n // self.part_rows)

    def part_range(self, part: int) -> tuple[int, int]:
        start = part * self.part_rows
        return start, min(start + self.part_rows, self.n)

    @classmethod
    def load(cls, root: Path) -> StoreMeta:
        path = root / META_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{root} is not an embeddings directory ({META_FILE} missing): "
                "run 'plada-send embed' first"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        if data.get("format") != STORE_FORMAT:
            raise ConfigError(f"{path} is not a {STORE_FORMAT} file")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def part_path(root: Path, part: int) -> Path:
    return root / PARTS_DIR / f"part-{part:06d}.npz"


def write_part(
    root: Path,
    part: int,
    embeddings: np.ndarray,
    valid: np.ndarray,
    skipped: dict[int, str] | None = None,
) -> None:
    """Write one part atomically (fp16 embeddings, valid mask, reasons for skipped rows)."""
    skipped = skipped or {}
    arrays = {
        "embeddings": embeddings.astype(np.float16),
        "valid": valid.astype(bool),
        "skipped_rows": np.asarray(sorted(skipped), dtype=np.int64),
        "skipped_reasons": np.asarray([skipped[r] for r in sorted(skipped)], dtype=str),
    }
    write_atomic(part_path(root, part), lambda handle: np.savez(handle, **arrays))


class Part(NamedTuple):
    """One finished part: fp16 embeddings, valid mask, and why skipped rows were skipped."""

    embeddings: np.ndarray
    valid: np.ndarray
    skipped: dict[int, str]


def read_part(root: Path, part: int, meta: StoreMeta) -> Part | None:
    """A finished part, or None when it is absent or unreadable (it will be redone)."""
    path = part_path(root, part)
    if not path.is_file():
        return None
    start, stop = meta.part_range(part)
    try:
        with np.load(path, allow_pickle=False) as data:
            embeddings, valid = data["embeddings"], data["valid"]
            rows, reasons = data["skipped_rows"].tolist(), data["skipped_reasons"].tolist()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    if embeddings.shape != (stop - start, meta.dim) or valid.shape != (stop - start,):
        return None
    return Part(embeddings, valid, dict(zip(rows, reasons, strict=True)))


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    try:
        index, count = (int(p) for p in spec.split("/"))
    except ValueError as exc:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), not {spec!r}") from exc
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {spec}: need 0 <= i < N")
    return index, count


def parts_of_shard(meta: StoreMeta, shard: tuple[int, int]) -> list[int]:
    """The parts machine ``i`` of ``N`` embeds: a contiguous slice of the part list."""
    index, count = shard
    total = meta.num_parts
    return list(range(total * index // count, total * (index + 1) // count))


@dataclass(frozen=True)
class MergedParts:
    """The merged rows: how many are readable, and why each unreadable one is not."""

    valid: int
    skipped: dict[int, str]  # row -> reason


def merge_parts(root: Path, int8: bool = False) -> MergedParts:
    """Check that every part is present and concatenate them into the flat files.

    One pass reads each part once; if any part is missing or unreadable, the
    temporary outputs are removed and the error lists them all.
    """
    meta = StoreMeta.load(root)
    valid = np.zeros(meta.n, dtype=bool)
    skipped: dict[int, str] = {}
    missing: list[int] = []
    names = [F16_FILE, I8_FILE, SCALES_FILE] if int8 else [F16_FILE]
    with atomic_outputs(*(root / name for name in names)) as outputs:
        handles = dict(zip(names, outputs, strict=True))
        for part in range(meta.num_parts):
            found = read_part(root, part, meta)
            if found is None or missing:  # after the first gap, only look for more gaps
                if found is None:
                    missing.append(part)
                continue
            start, stop = meta.part_range(part)
            valid[start:stop] = found.valid
            skipped.update(found.skipped)
            handles[F16_FILE].write(np.ascontiguousarray(found.embeddings, "<f2").tobytes())
            if int8:
                codes, scales = quantize_int8(found.embeddings)
                handles[I8_FILE].write(codes.tobytes())
                handles[SCALES_FILE].write(scales.astype("<f4").tobytes())
        if missing:
            shown = ", ".join(str(p) for p in missing[:10])
            raise ReferenceSetError(
                f"{len(missing)} of {meta.num_parts} parts are missing or unreadable ({shown}"
                f"{', ...' if len(missing) > 10 else ''}): rerun 'plada-send embed' (with the "
                "same --shard) for them, then merge again"
            )
    write_atomic(root / VALID_FILE, lambda handle: np.save(handle, valid))
    return MergedParts(int(valid.sum()), dict(sorted(skipped.items())))


def quantize_int8(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes and per-row scales: x ~= codes * scale."""
    x = embeddings.astype(np.float32)
    peak = np.abs(x).max(axis=1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(x / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


class EmbeddingStore:
    """Read access to a merged embeddings directory, in fixed-size chunks."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.meta = StoreMeta.load(self.root)
        f16 = self.root / F16_FILE
        expected = self.meta.n * self.meta.dim * 2
        if not f16.is_file():
            raise ConfigError(f"{f16} missing: run 'plada-send merge {self.root}' first")
        if f16.stat().st_size != expected:
            raise ConfigError(
                f"{f16} holds {f16.stat().st_size} bytes, expected {expected} "
                f"({self.meta.n} x {self.meta.dim} fp16): merge again"
            )
        valid_path = self.root / VALID_FILE
        self.valid = (
            np.load(valid_path) if valid_path.is_file() else np.ones(self.meta.n, dtype=bool)
        )

    @property
    def n(self) -> int:
        return self.meta.n

    @property
    def dim(self) -> int:
        return self.meta.dim

    def thumbnails(self) -> ThumbnailStore:
        """The merged thumbnails (a typed error naming the fix when absent or damaged)."""
        return ThumbnailStore(self.root, self.n, self.meta.reference_fingerprint)

    def has_int8(self) -> bool:
        return (self.root / I8_FILE).is_file() and (self.root / SCALES_FILE).is_file()

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of the given rows (random access, one read per run of
        adjacent rows; for row sets far smaller than the store)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"rows outside the {self.n} embeddings of {self.root}")
        try:
            raw = read_rows_at(self.root / F16_FILE, rows, 2 * self.dim)
        except (OSError, EOFError) as exc:
            raise ReferenceSetError(
                f"{self.root / F16_FILE} is unreadable ({exc}): merge the store again"
            ) from exc
        return raw.view("<f2").astype(np.float32)

    def iter_chunks(self, chunk_rows: int, source: str = "f16") -> Iterator[tuple[int, Any]]:
        """(start, float32 torch tensor [rows, dim]) over all rows, in order.

        A reader thread fills two preallocated raw buffers with ``readinto`` (resident
        memory stays at a few chunks, unlike a memory map, and reading overlaps the
        caller's compute); each chunk is widened with ``Tensor.copy_`` into one reused
        float32 tensor, so consume it before the next step.
        """
        import torch

        if source not in ("f16", "i8"):
            raise ConfigError(f"embedding source must be f16 or i8, not {source!r}")
        if source == "i8" and not self.has_int8():
            raise ConfigError(f"{self.root} has no int8 copy: merge with --int8")
        raw_dtype = np.float16 if source == "f16" else np.int8
        buffers = [
            (np.empty((chunk_rows, self.dim), raw_dtype), np.empty(chunk_rows, np.float32))
            for _ in range(2)
        ]
        wide = torch.empty((chunk_rows, self.dim), dtype=torch.float32)
        path = self.root / (F16_FILE if source == "f16" else I8_FILE)
        scale_path = self.root / SCALES_FILE if source == "i8" else None
        free: queue.Queue[int] = queue.Queue()
        full: queue.Queue[tuple[int, int, int] | BaseException | None] = queue.Queue()
        for slot in range(len(buffers)):
            free.put(slot)
        stop = threading.Event()

        def read_all() -> None:
            try:
                with contextlib.ExitStack() as stack:
                    handle = stack.enter_context(open(path, "rb", buffering=0))
                    scales = (
                        None if scale_path is None else stack.enter_context(open(scale_path, "rb"))
                    )
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    for start in range(0, self.n, chunk_rows):
                        slot = free.get()
                        if stop.is_set():
                            return
                        rows = min(chunk_rows, self.n - start)
                        raw, scale = buffers[slot]
                        _read_exact(handle, memoryview(raw[:rows]).cast("B"), path)
                        if scales is not None:
                            _read_exact(scales, memoryview(scale[:rows]).cast("B"), path)
                        full.put((start, rows, slot))
                full.put(None)
            except BaseException as exc:  # handed to the consumer
                full.put(exc)

        reader = threading.Thread(target=read_all, name="plada-embedding-reader", daemon=True)
        reader.start()
        try:
            while (item := full.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                start, rows, slot = item
                raw, scale = buffers[slot]
                out = wide[:rows]
                out.copy_(torch.from_numpy(raw[:rows]))
                if scale_path is not None:
                    out.mul_(torch.from_numpy(scale[:rows]).unsqueeze(1))
                free.put(slot)
                yield start, out
        finally:
            stop.set()
            free.put(0)  # wake the reader if it waits for a slot
            reader.join()


def _read_exact(handle: Any, view: memoryview, path: Path) -> None:
    filled = 0
    while filled < len(view):
        got = handle.readinto(view[filled:])
        if not got:
            raise ConfigError(f"{path} ended early: merge the embeddings again")
        filled += got


def create_store_meta(root: Path, meta: StoreMeta) -> None:
    """Start (or check, when resuming) an embeddings directory for ``meta``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / PARTS_DIR).mkdir(exist_ok=True)
    path = root / META_FILE
    if path.is_file():
        existing = StoreMeta.load(root)
        if existing != meta:
            diff = {
                k: (getattr(existing, k), getattr(meta, k))
                for k in asdict(meta)
                if getattr(existing, k) != getattr(meta, k)
            }
            raise ConfigError(
                f"{root} already holds embeddings of something else {diff}: "
                "use another --out directory"
            )
        return
    write_json_atomic(path, asdict(meta))


@dataclass(frozen=True)
class MergeSummary:
    """What ``merge`` wrote."""

    n: int
    dim: int
    valid: int  # readable rows
    skipped: int  # unreadable rows (listed in skipped.json)
    int8: bool
    thumbnails: MergedThumbnails


def merge_embeddings(
    out_dir: str | os.PathLike[str], sources: list[str] | None = None, int8: bool = False
) -> MergeSummary:
    """Gather parts from ``sources`` (other machines' directories), check coverage, merge,
    and list the unreadable rows by manifest key (``skipped.json``)."""
    from protocol.manifest import ReferenceManifest

    root = Path(out_dir)
    meta = StoreMeta.load(root)
    manifest = ReferenceManifest.load(root / MANIFEST_FILE)
    if manifest.fingerprint_hex != meta.reference_fingerprint or len(manifest) != meta.n:
        raise ReferenceSetError(
            f"{root / MANIFEST_FILE} does not match {root / META_FILE}: the directory mixes "
            "two reference sets; embed again into an empty directory"
        )
    for source in sources or []:
        _copy_parts(Path(source), root, meta)
    merged = merge_parts(root, int8=int8)
    ranges = [meta.part_range(part) for part in range(meta.num_parts)]
    thumbnails = merge_thumbnails(root, ranges, meta.reference_fingerprint)
    skipped = [
        {"index": row, "key": manifest.keys[row], "reason": reason}
        for row, reason in merged.skipped.items()
    ]
    write_json_atomic(root / SKIPPED_FILE, skipped)
    return MergeSummary(meta.n, meta.dim, merged.valid, len(skipped), int8, thumbnails)


def _copy_parts(source: Path, root: Path, meta: StoreMeta) -> None:
    """Copy into ``root`` the parts (and their thumbnails) that only ``source`` has."""
    import shutil

    other = StoreMeta.load(source)
    if other != meta:
        raise ConfigError(f"{source} holds embeddings of something else; cannot merge it")
    for part in range(meta.num_parts):
        if read_part(root, part, meta) is not None or read_part(source, part, meta) is None:
            continue
        start, stop = meta.part_range(part)
        copies = [part_path(source, part)]
        if thumbnail_part_size(source, part, stop - start) is not None:
            copies.insert(0, thumbnail_part_path(source, part))  # before the part it goes with
        for found in copies:
            with open(found, "rb") as copied:
                write_atomic(
                    root / PARTS_DIR / found.name,
                    lambda handle, copied=copied: shutil.copyfileobj(copied, handle),
                )
