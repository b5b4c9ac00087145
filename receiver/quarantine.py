"""The quarantine: refused inbox files, each beside its ``.reason.json``, under a quota.

A refused file is moved to ``<home>/quarantine/<sha256 prefix>-<time>`` beside the
reason it was refused for. The quarantine has a quota (files and bytes) and keeps a
free-space reserve on its filesystem (a quarter of it, at most 64 MiB): the oldest
entries are purged first, so junk can never fill the disk, however small.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol.atomic_files import fsync_directory, write_json_atomic
from protocol.timestamps import utc_text

log = logging.getLogger("plada.receiver")
REASON_SUFFIX = ".reason.json"
# free space the quarantine never holds on to: a quarter of the filesystem, at most 64 MiB
RESERVE_SHARE, RESERVE_CAP = 0.25, 64 << 20


@dataclass
class QuarantineUsage:
    """What the quarantine holds, oldest entry first, and how many were purged."""

    entries: list[tuple[float, str, int]] = field(default_factory=list)  # (mtime, stem, bytes)
    bytes: int = 0  # the sum of the entries' bytes, kept as they come and go
    purged: int = 0

    @property
    def files(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class QuarantineReason:
    """Why a file was refused (its ``.reason.json``)."""

    file: str  # the name it came in under
    stored: str
    quarantined: str
    sha256: str | None
    bytes: int
    error: str
    message: str
    action: str = "not queued; ask the sender for a fresh copy of this payload"


class Quarantine:
    """``<home>/quarantine`` with its quota."""

    def __init__(
        self,
        folder: Path,
        max_files: int,
        max_bytes: int,
        free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free,
    ) -> None:
        self.folder, self.max_files, self.max_bytes = folder, max_files, max_bytes
        self.free_bytes = free_bytes  # the filesystem's free space (a seam for tests)
        folder.mkdir(parents=True, exist_ok=True)
        self.reserve = min(RESERVE_CAP, int(RESERVE_SHARE * shutil.disk_usage(folder).total))
        self.usage = self._scan()
        self._counter = 0

    def _scan(self) -> QuarantineUsage:
        usage = QuarantineUsage()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.endswith(REASON_SUFFIX):
                    continue
                stem = entry.name[: -len(REASON_SUFFIX)]
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    with contextlib.suppress(FileNotFoundError):
                        size += os.lstat(self.folder / stem).st_size
                except OSError:
                    continue
                usage.entries.append((mtime, stem, size))
        usage.entries.sort()
        usage.bytes = sum(size for _, _, size in usage.entries)
        return usage

    def report(self) -> dict[str, int]:
        """Its use and quota, for the daemon's health file."""
        usage = self.usage
        return {
            "files": usage.files,
            "bytes": usage.bytes,
            "purged": usage.purged,
            "max_files": self.max_files,
            "max_bytes": self.max_bytes,
        }

    def _make_room(self, incoming: int) -> None:
        """Purge the oldest entries until one of ``incoming`` bytes fits the quota and
        the filesystem keeps its free-space reserve (for the payloads still to come)."""
        usage = self.usage
        short = self.reserve - self.free_bytes(self.folder)  # what the disk lacks
        while usage.entries and (
            usage.files + 1 > self.max_files or usage.bytes + incoming > self.max_bytes or short > 0
        ):
            short -= usage.entries[0][2]
            _, stem, size = usage.entries.pop(0)
            (self.folder / stem).unlink(missing_ok=True)
            (self.folder / (stem + REASON_SUFFIX)).unlink(missing_ok=True)
            usage.bytes -= size
            usage.purged += 1
            log.warning(
                f"quarantine over its quota: purged its oldest entry {stem}",
                extra={"event": "quarantine-purged", "entry": stem},
            )

    def put(self, path: Path, origin: str, sha256: str, error: Exception) -> str:
        """Move ``path`` (which came in as ``origin``) into the quarantine beside its
        reason; returns the name it is stored under."""
        try:
            size = os.lstat(path).st_size
        except FileNotFoundError:
            size = 0
        self._counter += 1
        stem = f"{(sha256 or 'unread')[:12]}-{time.time_ns():x}{self._counter % 1000:03d}"
        reason = QuarantineReason(
            origin, stem, utc_text(), sha256 or None, size, type(error).__name__, str(error)
        )
        record = asdict(reason)
        entry_bytes = size + len(json.dumps(record, indent=2)) + 1  # the file and its reason
        self._make_room(entry_bytes)
        write_json_atomic(self.folder / (stem + REASON_SUFFIX), record, durable=True)
        os.replace(path, self.folder / stem)
        fsync_directory(self.folder)
        self.usage.entries.append((time.time(), stem, entry_bytes))
        self.usage.bytes += entry_bytes
        return stem
