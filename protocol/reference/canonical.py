"""A device's copy of a reference set seen through the canonical manifest.

The canonical manifest defines the indices payloads use. A copy that lost files, or a
release with fewer synsets, holds a subset (or an overlap) of its keys. :class:`CanonicalView`
presents the copy under the canonical manifest (so fingerprints match and indices mean
the same images) and knows which rows it can read (:class:`protocol.availability.Availability`).

The availability is built once per (canonical manifest, copy, check) and cached: listing
the copy maps keys (``exists``), and ``decode`` also decodes every mapped image, so that
damaged files count as missing. The decode pass checkpoints its progress atomically and
resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_atomic
from protocol.availability import (
    AVAILABILITY_SUFFIX,
    Availability,
    AvailabilityError,
    read_availability,
)
from protocol.manifest import ReferenceManifest
from protocol.reference.base import ReferenceSource
from protocol.reference.encoded import EncodedReference, UnreadableImage

CHECKPOINT_SECONDS = 10.0
_CHUNK = 4096


def local_rows(canonical: ReferenceManifest, local: ReferenceManifest) -> np.ndarray:
    """int64 [len(canonical)]: each canonical row's index in the local copy, -1 where
    the copy lacks its key (one merge over both sorted key lists)."""
    rows = np.full(len(canonical), -1, dtype=np.int64)
    mine = local.keys
    j, n_local = 0, len(mine)
    for i, key in enumerate(canonical.keys):
        while j < n_local and mine[j] < key:
            j += 1
        if j == n_local:
            break
        if mine[j] == key:
            rows[i] = j
            j += 1
    return rows


class CanonicalView(EncodedReference):
    """The copy ``local`` under the ``canonical`` manifest; reading a row it lacks is an
    :class:`UnreadableImage` naming the row."""

    def __init__(
        self, local: EncodedReference, canonical: ReferenceManifest, availability: Availability
    ) -> None:
        availability.check_for(canonical, "the availability")
        self.local, self.manifest, self.availability = local, canonical, availability
        self.image_size = local.image_size
        self.in_channels = local.in_channels
        self.rows = local_rows(canonical, local.manifest)
        self.rows[~availability.present] = -1  # damaged files count as missing

    def describe(self, index: int) -> str:
        row = int(self.rows[index])
        if row < 0:
            return f"{self.manifest.keys[index]} (not on this device)"
        return self.local.describe(row)

    def read_bytes(self, index: int) -> bytes:
        row = int(self.rows[index])
        if row < 0:
            raise UnreadableImage(
                f"reference image {self.manifest.keys[index]} is not on this device"
            )
        return self.local.read_bytes(row)


def reference_availability(reference: ReferenceSource) -> Availability | None:
    """What rows ``reference`` can read, where it is a :class:`CanonicalView`."""
    return reference.availability if isinstance(reference, CanonicalView) else None


@dataclass(frozen=True)
class AvailabilityBuild:
    """How to build an availability: the presence check, threads for decoding, a progress
    bar, and whether to start again from nothing."""

    check: str = "decode"
    threads: int = 8
    progress: bool = True
    rebuild: bool = False


def availability_path(
    cache: Path, canonical: ReferenceManifest, local: EncodedReference, check: str
) -> Path:
    """Where the availability of the copy ``local`` against ``canonical`` is cached: by
    the copy's keys and where it is (two copies with the same keys may differ in damage)."""
    place = hashlib.sha256(f"{copy_source(local)}\n{local.manifest.fingerprint_hex}".encode())
    name = f"{canonical.fingerprint_hex[:16]}-{place.hexdigest()[:16]}-{check}"
    return cache / "availability" / (name + AVAILABILITY_SUFFIX)


def copy_source(local: EncodedReference) -> str:
    """Where a copy is, for messages and cache keys: its root or shards, else its name."""
    root = getattr(local, "root", None)
    if root is not None:
        return os.path.abspath(root)
    shards = getattr(local, "shards", None)  # WebDataset shards: where the first one is
    return os.path.dirname(os.path.abspath(shards[0])) if shards else local.manifest.name


def cached_availability(
    local: EncodedReference, canonical: ReferenceManifest, cache: Path, build: AvailabilityBuild
) -> Availability:
    """The availability of ``local`` against ``canonical``: read from the cache, else
    built (resuming a build that stopped) and cached."""
    path = availability_path(cache, canonical, local, build.check)
    if path.is_file() and not build.rebuild:
        try:
            found = read_availability(path)
            if found.matches(canonical):
                return found
        except AvailabilityError:
            pass  # damaged: build it again
    available = _build(local, canonical, path, build)
    path.parent.mkdir(parents=True, exist_ok=True)
    available.save(path)
    _partial(path).unlink(missing_ok=True)
    return available


def _partial(path: Path) -> Path:
    return path.with_suffix(".partial.npz")


def _build(
    local: EncodedReference, canonical: ReferenceManifest, path: Path, build: AvailabilityBuild
) -> Availability:
    rows = local_rows(canonical, local.manifest)
    present = rows >= 0
    if build.check == "decode":
        _decode_pass(local, rows, present, path, build)
    return Availability(
        canonical.name, canonical.fingerprint, present, build.check, copy_source(local)
    )


def _decode_pass(
    local: EncodedReference,
    rows: np.ndarray,
    present: np.ndarray,
    path: Path,
    build: AvailabilityBuild,
) -> None:
    """Decode every mapped image, clearing ``present`` where one cannot be read; saves
    its progress every few seconds and resumes from it."""
    from tqdm import tqdm

    done = 0 if build.rebuild else _resume(path, present)
    mapped = np.flatnonzero(rows >= 0)
    start = int(np.searchsorted(mapped, done))
    bar = tqdm(
        total=mapped.size,
        initial=start,
        unit="img",
        desc="checking reference images",
        disable=not build.progress,
        file=sys.stderr,
        smoothing=0.05,
    )
    saved = time.monotonic()
    with ThreadPoolExecutor(max(1, build.threads)) as pool:
        for chunk in _chunks(mapped[start:]):
            readable = pool.map(
                lambda row: local.try_read_image(int(row))[0] is not None, rows[chunk]
            )
            present[chunk[~np.fromiter(readable, bool, chunk.size)]] = False
            bar.update(chunk.size)
            if time.monotonic() - saved > CHECKPOINT_SECONDS:
                _checkpoint(path, present, int(chunk[-1]) + 1)
                saved = time.monotonic()
    bar.close()


def _chunks(rows: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, rows.size, _CHUNK):
        yield rows[start : start + _CHUNK]


def _checkpoint(path: Path, present: np.ndarray, done: int) -> None:
    """Save the decode pass's progress: rows before ``done`` are checked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    packed = np.packbits(present, bitorder="little")
    write_atomic(
        _partial(path), lambda handle: np.savez(handle, done=np.int64(done), present=packed)
    )


def _resume(path: Path, present: np.ndarray) -> int:
    """The first unchecked row of an earlier, stopped pass (0: none), with what it
    found applied to ``present``."""
    partial = _partial(path)
    if not partial.is_file():
        return 0
    try:
        with np.load(partial) as saved:
            done, packed = int(saved["done"]), saved["present"]
        earlier = np.unpackbits(packed, bitorder="little")[: present.size].astype(bool)
    except (OSError, ValueError, KeyError):
        return 0  # damaged: start again
    if earlier.size != present.size or not 0 <= done <= present.size:
        return 0
    present[:done] &= earlier[:done]
    return done


def open_canonical(
    local: ReferenceSource,
    manifest_file: str | os.PathLike[str],
    cache: Path,
    build: AvailabilityBuild | None = None,
) -> CanonicalView:
    """``local`` seen through the canonical manifest in ``manifest_file``, with the
    availability ``build`` makes (None: a cached ``decode`` one, else a cached or new
    ``exists`` one; damaged files it misses are skipped when training reads them)."""
    canonical = ReferenceManifest.load(manifest_file)
    local = _encoded(local)
    if build is None:
        decoded = availability_path(cache, canonical, local, "decode")
        build = AvailabilityBuild("decode" if decoded.is_file() else "exists")
    return CanonicalView(local, canonical, cached_availability(local, canonical, cache, build))


def _encoded(local: ReferenceSource) -> EncodedReference:
    from protocol.errors import ReferenceSetError

    if not isinstance(local, EncodedReference):
        raise ReferenceSetError(
            f"--canonical applies to image files (an ImageFolder or WebDataset shards); "
            f"{local.manifest.name} is generated whole on every device: drop --canonical"
        )
    return local
