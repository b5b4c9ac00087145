"""A reference set stored as WebDataset tar shards (timm's imagenet-22k-wds layout).

Each sample is a group of tar members sharing a ``__key__`` (the member path up to
the first dot of its file name); the image member is the one with an image
extension. The canonical key is ``<wnid>/<__key__>`` where the wnid is the key's
directory when it has one, else its prefix before the first ``_``
(``n01440764_10026`` -> ``n01440764/n01440764_10026``), matching the ImageFolder
layout of the same images.

Shards are scanned once (tar headers only; data is seeked over) and the member
offsets cached per shard, keyed by the shard's path, size and mtime. A truncated
shard keeps the samples whose data lies wholly inside the file and is reported.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_atomic
from protocol.errors import ReferenceSetError
from protocol.manifest import ReferenceManifest
from protocol.names import printable_name, unusable_name
from protocol.reference.encoded import EncodedReference, UnreadableImage
from protocol.task_data import IMAGE_SUFFIXES

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(spec: str) -> list[Path]:
    """Shard paths from a directory (its ``*.tar``) or a pattern like ``dir/x-{0000..2047}.tar``."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        match = _BRACE.search(spec)
        if match is None:
            shards = [path]
        else:
            low, high = match.group(1), match.group(2)
            width = len(low)
            shards = [
                Path(spec[: match.start()] + str(i).zfill(width) + spec[match.end() :])
                for i in range(int(low), int(high) + 1)
            ]
    if not shards:
        raise ReferenceSetError(f"{spec}: no .tar shards found")
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise ReferenceSetError(f"{len(missing)} shards missing, e.g. {missing[0]}")
    return shards


def canonical_key(sample_key: str) -> str:
    """``<wnid>/<stem>`` for a WebDataset ``__key__``."""
    if "/" in sample_key:
        folder, stem = sample_key.rsplit("/", 1)
        return f"{folder.rsplit('/', 1)[-1]}/{stem}"
    block = sample_key.split("_", 1)[0]
    if block == sample_key:
        raise ReferenceSetError(
            f"sample key {sample_key!r} names no class folder (expected <wnid>_<n> or <wnid>/<n>)"
        )
    return f"{block}/{sample_key}"


def scan_shard(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, str | None]:
    """(canonical keys, data offsets, sizes, problem) of the image members of one shard."""
    keys: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    problem = None
    skipped: list[str] = []
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > file_size:
                    problem = f"{path}: truncated inside {member.name}"
                    break
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot or "." + ext.lower() not in IMAGE_SUFFIXES:
                    continue
                if unusable_name(member.name):
                    skipped.append(printable_name(member.name))
                    continue
                keys.append(canonical_key(f"{folder}/{stem}" if folder else stem))
                offsets.append(member.offset_data)
                sizes.append(member.size)
            end = tar.offset
        if problem is None and not _has_end_marker(path, end):
            problem = f"{path}: truncated (no end-of-archive marker after {len(keys)} images)"
    except (tarfile.TarError, EOFError, OSError) as exc:
        problem = f"{path}: unreadable after {len(keys)} images ({exc})"
    if skipped:
        names = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        note = f"{path}: skipped {len(skipped)} member(s) whose names are not UTF-8 ({names})"
        problem = note if problem is None else f"{problem}; {note}"
    return keys, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), problem


def _has_end_marker(path: Path, offset: int) -> bool:
    """A complete tar ends with two zero blocks where the member list stops."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        tail = handle.read(2 * tarfile.BLOCKSIZE)
    return len(tail) == 2 * tarfile.BLOCKSIZE and not any(tail)


def _cached_scan(path: Path, cache_dir: Path | None):
    if cache_dir is None:
        return scan_shard(path)
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cached = cache_dir / f"{tag.hexdigest()[:32]}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as data:
                problem = str(data["problem"]) or None
                return list(data["keys"].tolist()), data["offsets"], data["sizes"], problem
        except (OSError, ValueError, KeyError):
            pass  # rescan below
    keys, offsets, sizes, problem = scan_shard(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {
        "keys": np.asarray(keys, dtype=str),
        "offsets": offsets,
        "sizes": sizes,
        "problem": np.asarray(problem or ""),
    }
    write_atomic(cached, lambda handle: np.savez(handle, **arrays))
    return keys, offsets, sizes, problem


class WebDatasetReference(EncodedReference):
    """Images inside tar shards, addressed by manifest index via cached member offsets."""

    def __init__(
        self,
        spec: str,
        image_size: int = 64,
        cache_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.shards = expand_shards(spec)
        self.image_size = image_size
        self.problems: list[str] = []
        index_cache = None if cache_dir is None else Path(cache_dir) / "wds-index"
        keys: list[str] = []
        shard_of: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        sizes: list[np.ndarray] = []
        for number, shard in enumerate(self.shards):
            shard_keys, shard_offsets, shard_sizes, problem = _cached_scan(shard, index_cache)
            if problem:
                self.problems.append(problem)
            keys.extend(shard_keys)
            shard_of.append(np.full(len(shard_keys), number, dtype=np.int32))
            offsets.append(shard_offsets)
            sizes.append(shard_sizes)
        if not keys:
            raise ReferenceSetError(f"{spec}: the shards hold no images")
        order = sorted(range(len(keys)), key=keys.__getitem__)
        sorted_keys = [keys[i] for i in order]
        for a, b in itertools.pairwise(sorted_keys):
            if a == b:
                raise ReferenceSetError(f"{spec}: image key {a!r} appears twice in the shards")
        perm = np.asarray(order, dtype=np.int64)
        self._shard = np.concatenate(shard_of)[perm]
        self._offset = np.concatenate(offsets)[perm]
        self._size = np.concatenate(sizes)[perm]
        self.manifest = ReferenceManifest(name or Path(spec).name, tuple(sorted_keys))
        self._handles: dict[int, int] = {}

    def __getstate__(self) -> dict[str, object]:  # open files do not cross process boundaries
        return self.__dict__ | {"_handles": {}}

    def describe(self, index: int) -> str:
        return f"{self.shards[self._shard[index]]}:{self.manifest.keys[index]}"

    def read_bytes(self, index: int) -> bytes:
        number = int(self._shard[index])
        try:
            fd = self._handles.get(number)
            if fd is None:  # threads may race here: keep the first descriptor, close ours
                opened = os.open(self.shards[number], os.O_RDONLY)
                fd = self._handles.setdefault(number, opened)
                if fd != opened:
                    os.close(opened)
            # positional read: safe when worker processes share inherited descriptors
            data = os.pread(fd, int(self._size[index]), int(self._offset[index]))
        except OSError as exc:
            raise UnreadableImage(f"{self.describe(index)}: cannot read shard ({exc})") from exc
        if len(data) != int(self._size[index]):
            raise UnreadableImage(f"{self.describe(index)}: shard is shorter than its index says")
        return data

    def close(self) -> None:
        """Close the shard files opened so far."""
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
