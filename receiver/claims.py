"""Claiming inbox files: exactly one daemon takes each settled file, under a name of its own.

An inbox entry is read only once it has stopped changing (``settle_seconds``); names
that start with ``.`` or end in ``.part``/``.tmp`` are never read, so a link that
writes ``x.part`` and renames it to ``x.plada`` when complete is handled without
waiting. Every entry is handled on its own: one that cannot be claimed (a name the
filesystem refuses, a vanished file) is logged and skipped, never a stop.

Claiming is one ``rename`` into ``<home>/intake/<daemon>/`` under a name the daemon
chooses (arrival time and a counter), so of several daemons watching one inbox
exactly one gets each file, and no incoming name, however long or odd, is ever used
for a file of the daemon's own. The original name is kept beside it
(``<claimed>.origin``) and ends up in the job or in the quarantine's
``reason.json``; names that are not UTF-8 are kept with ``\\xNN`` escapes. A daemon
that finds the intake folder of a dead daemon adopts its files.

A claimed entry is opened without following links (``O_NOFOLLOW``, ``O_NONBLOCK``),
must be a regular file, and is read up to the byte cap plus one byte
(:func:`read_entry`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import time
from pathlib import Path

from protocol.atomic_files import fsync_directory, write_bytes_atomic
from protocol.errors import ConfigError, PayloadLimitError, StorageError
from protocol.names import printable_name
from receiver.errors import InboxEntryError
from receiver.workers import WorkerLock

log = logging.getLogger("plada.receiver")
IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
ORIGIN_SUFFIX = ".origin"


def is_candidate(name: str) -> bool:
    """Whether an inbox entry name may be a finished payload file."""
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def open_entry(path: str | os.PathLike[str]) -> int:
    """A descriptor of an inbox entry that is a regular file, opened without following a
    link and without blocking (a FIFO or device put in its place between the scan and the
    open is refused, never waited on); ``InboxEntryError`` otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InboxEntryError("a symbolic link: links in the inbox are never followed") from exc
        raise InboxEntryError(f"unreadable ({exc.strerror or exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InboxEntryError("not a regular file (a directory, FIFO, socket or device)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_entry(path: Path, max_bytes: int) -> bytes:
    """The bytes of a claimed entry: never through a link, only a regular file, at most
    ``max_bytes`` (``InboxEntryError`` / ``PayloadLimitError`` otherwise)."""
    fd = open_entry(path)
    try:
        info = os.fstat(fd)
        if info.st_size > max_bytes:
            raise PayloadLimitError(f"{info.st_size} bytes, over the cap of {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise InboxEntryError(f"unreadable ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if total > max_bytes:
        raise PayloadLimitError(f"more than the cap of {max_bytes} bytes")
    return b"".join(chunks)


class Claims:
    """The files this daemon claimed from its inbox, in ``<home>/intake/<daemon>/``."""

    def __init__(self, home: Path, inbox: Path, worker: WorkerLock, settle_seconds: float) -> None:
        self.inbox, self.worker, self.settle_seconds = inbox, worker, settle_seconds
        self.root = home / "intake"
        self.folder = self.root / worker.owner
        for folder in (self.inbox, self.folder):
            folder.mkdir(parents=True, exist_ok=True)
        if os.stat(self.inbox).st_dev != os.stat(self.folder).st_dev:
            raise ConfigError(
                f"inbox {self.inbox} and daemon home {home} are on different filesystems: "
                "put them on one, so that claiming a file is a single atomic rename"
            )
        self.sizes: dict[str, tuple[int, int, float]] = {}  # entry -> size, mtime, first seen
        self.unclaimable: set[str] = set()
        self.skipped = 0
        self._counter = 0

    def files(self, folder: Path | None = None) -> list[str]:
        """The claimed files (not their origin records) of ``folder`` (default: this
        daemon's), sorted."""
        with os.scandir(folder or self.folder) as entries:
            return sorted(e.name for e in entries if not e.name.endswith(ORIGIN_SUFFIX))

    def waiting(self) -> int:
        """Entries in the inbox (settled or not) plus claimed files not yet processed, by
        this daemon, by others, or left by a dead one (adopted on the next pass)."""
        with os.scandir(self.inbox) as entries:
            inbox = sum(
                1
                for e in entries
                if is_candidate(e.name)
                and e.name not in self.unclaimable
                and not e.is_dir(follow_symlinks=False)
            )
        claimed = 0
        for folder in self.root.iterdir():
            with contextlib.suppress(OSError):
                claimed += len(self.files(folder))
        return inbox + claimed

    def adopt_orphans(self) -> int:
        """Take over the claimed files of daemons that died mid-intake."""
        adopted = 0
        for folder in self.root.iterdir():
            if folder == self.folder or not folder.is_dir() or self.worker.alive(folder.name):
                continue
            for path in folder.iterdir():
                try:
                    os.rename(path, self.folder / path.name)
                    adopted += 1
                except OSError:
                    continue  # another daemon adopted it first
            with contextlib.suppress(OSError):  # not empty yet, or already gone
                folder.rmdir()
        if adopted:
            log.info(
                "adopted files of a stopped daemon",
                extra={"event": "intake-adopted", "files": adopted},
            )
        return adopted

    def _settled(self, name: str, info: os.stat_result, now: float) -> bool:
        if now - info.st_mtime >= self.settle_seconds:
            return True
        seen = self.sizes.get(name)
        if seen is None or seen[:2] != (info.st_size, info.st_mtime_ns):
            self.sizes[name] = (info.st_size, info.st_mtime_ns, now)
            return False
        return now - seen[2] >= self.settle_seconds

    def _claim_id(self) -> str:
        self._counter += 1  # the owner's tail keeps ids unique across daemons of one home
        return f"{time.time_ns():020d}-{self._counter % 1000000:06d}-{self.worker.owner[-6:]}"

    def claim_ready(self) -> int:
        """Move every settled inbox entry into this daemon's intake folder, each under a
        name of the daemon's own; an entry that cannot be claimed is skipped."""
        claimed = 0
        now = time.time()
        with os.scandir(self.inbox) as scan:
            entries = [e for e in scan if is_candidate(e.name)]
        present = set()
        for entry in sorted(entries, key=lambda e: e.name):
            present.add(entry.name)
            if self._claim(entry, now):
                claimed += 1
        for name in set(self.sizes) - present:  # entries gone since they were seen
            del self.sizes[name]
        self.unclaimable &= present
        if claimed:
            fsync_directory(self.folder)
        return claimed

    def _claim(self, entry: os.DirEntry, now: float) -> bool:
        """Claim one settled entry (its origin record first); False if it is not settled,
        is a folder, or cannot be claimed."""
        origin = None
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode) or not self._settled(entry.name, info, now):
                return False
            target = self.folder / self._claim_id()
            origin = target.with_name(target.name + ORIGIN_SUFFIX)
            record = {"name": printable_name(entry.name), "claimed": now}
            write_bytes_atomic(origin, json.dumps(record).encode())
            os.rename(entry.path, target)
        except OSError as exc:
            if origin is not None:
                origin.unlink(missing_ok=True)
            if not isinstance(exc, FileNotFoundError):  # else another daemon claimed it
                self._skip(entry.name, exc)
            return False
        except StorageError as exc:  # the origin record could not be written
            self._skip(entry.name, exc)
            return False
        self.sizes.pop(entry.name, None)
        return True

    def _skip(self, name: str, exc: Exception) -> None:
        if name in self.unclaimable:
            return
        self.unclaimable.add(name)
        self.skipped += 1
        shown = printable_name(name)
        log.error(
            f"cannot claim inbox entry {shown[:80]!r}: {exc}; left in the inbox",
            extra={"event": "intake-unclaimable", "file": shown, "error": str(exc)},
        )

    def origin_of(self, claimed: str) -> tuple[str, float]:
        """(the entry's original name, when it was claimed) of a claimed file."""
        try:
            record = json.loads((self.folder / (claimed + ORIGIN_SUFFIX)).read_text())
            return str(record["name"]), float(record["claimed"])
        except (OSError, ValueError, KeyError, TypeError):
            stamp = claimed.split("-", 1)[0]
            return claimed, int(stamp) / 1e9 if stamp.isdigit() else 0.0

    def remove(self, path: Path) -> None:
        """A claimed file (and its origin record) that has been handled."""
        path.unlink()
        path.with_name(path.name + ORIGIN_SUFFIX).unlink(missing_ok=True)
        fsync_directory(self.folder)

    def remove_stray_origins(self) -> None:
        """Origin records whose claimed file is gone (a claim interrupted before its
        rename) are removed."""
        with os.scandir(self.folder) as entries:
            for entry in entries:
                stem = entry.name[: -len(ORIGIN_SUFFIX)]
                if entry.name.endswith(ORIGIN_SUFFIX) and not (self.folder / stem).exists():
                    Path(entry.path).unlink(missing_ok=True)
