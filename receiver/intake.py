"""Payload intake: claim files from the inbox, verify them, queue or quarantine them.

An inbox entry is read only once it has stopped changing (``settle_seconds``);
names that start with ``.`` or end in ``.part``/``.tmp`` are never read, so a link
that writes ``x.part`` and renames it to ``x.plada`` when complete is handled
without waiting. Every entry is handled on its own: one that cannot be claimed (a
name the filesystem refuses, a vanished file) is logged and skipped, never a stop.

Claiming is one ``rename`` into ``<home>/intake/<daemon>/`` under a name the daemon
chooses (arrival time and a counter), so of several daemons watching one inbox
exactly one gets each file, and no incoming name, however long or odd, is ever
used for a file of the daemon's own. The original name is kept beside it
(``<claimed>.origin``) and ends up in the job or in the quarantine's
``reason.json``; names that are not UTF-8 are kept with ``\\xNN`` escapes.

A claimed entry is opened without following links (``O_NOFOLLOW``, ``O_NONBLOCK``),
must be a regular file, and is read up to the byte cap plus one byte; a link, a
FIFO, a device or a read error is quarantined. Then it is verified (signature
against the trust store, audience, expiry, sequence number, format, reference
fingerprint, digest, this device's caps on images and classes per job). Verified
payloads are queued in order of (sender, sequence number), not of arrival: each
waits ``reorder_seconds`` after it was claimed, and the payloads of a sender that
arrive within that window are accepted oldest first. Only a payload older than one
already *accepted* is a rollback. Accepted means:

- stored durably as ``<home>/spool/<sha256>.plada``, its sequence number recorded
  in the ledger (:mod:`receiver.ledger`, with the claimed name), queued, and only
  then removed from the intake folder; or
- rejected: moved to ``<home>/quarantine/<sha256 prefix>-<time>`` beside its
  ``.reason.json``. A copy of a payload already accepted is a replay and is
  rejected too. The quarantine has a quota (files and bytes): the oldest entries
  are purged first, so junk can never fill the disk.

Every step can be interrupted: a daemon that finds the intake folder of a dead
daemon adopts its files and processes them again; a claimed file whose payload the
ledger recorded under that same claimed name but which has no job yet is queued
now; one whose job is already queued (under that name) is just removed. So nothing
is lost and nothing is queued twice. A local fault (disk full, a damaged database)
keeps the file where it is and retries it later; it never quarantines a payload.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.atomic_files import fsync_directory, write_bytes_atomic, write_json_atomic
from protocol.errors import (
    ConfigError,
    InboxEntryError,
    PayloadError,
    PayloadLimitError,
    ReferenceMismatchError,
    ReplayError,
    RollbackError,
    StorageError,
    TrustStoreError,
)
from protocol.manifest import ReferenceManifest
from protocol.names import printable_name
from protocol.payload import Payload, decode_payload
from protocol.timestamps import utc_text
from protocol.trust import TrustPolicy
from receiver.job_queue import Job, JobQueue
from receiver.ledger import SequenceLedger
from receiver.trust_store import TrustOptions, build_trust_policy
from receiver.workers import WorkerLock
from trainer.faults import crash_point

log = logging.getLogger("plada.receiver")
IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
ORIGIN_SUFFIX = ".origin"
REASON_SUFFIX = ".reason.json"
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class IntakeSettings:
    """How an inbox is read, and what this device takes in."""

    settle_seconds: float = 2.0
    reorder_seconds: float = 5.0  # how long a verified payload waits for older ones
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_images: int = 2_000_000  # per job
    max_classes: int = 10_000
    quarantine_max_files: int = 1000
    quarantine_max_bytes: int = 256 << 20
    retry_seconds: float = 30.0  # after a local fault


def is_candidate(name: str) -> bool:
    """Whether an inbox entry name may be a finished payload file."""
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def check_job_size(payload: Payload, max_images: int, max_classes: int) -> None:
    """``PayloadLimitError`` if the payload asks for more images or classes per job than
    this device takes (checked before anything trains)."""
    if payload.count > max_images or len(payload.class_names) > max_classes:
        raise PayloadLimitError(
            f"the job asks for {payload.count} images in {len(payload.class_names)} classes; "
            f"this device takes at most {max_images} images and {max_classes} classes per "
            "job (--max-job-images, --max-job-classes)"
        )


def read_entry(path: Path, max_bytes: int) -> bytes:
    """The bytes of a claimed entry: never through a link, only a regular file, at most
    ``max_bytes`` (``InboxEntryError`` / ``PayloadLimitError`` otherwise)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InboxEntryError("a symbolic link: links in the inbox are never followed") from exc
        raise InboxEntryError(f"unreadable ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InboxEntryError("not a regular file (a directory, FIFO, socket or device)")
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


@dataclass
class _Verified:
    """A claimed payload that passed verification and waits to be queued."""

    claimed: str
    origin: str
    data: bytes
    sha256: str
    payload: Payload
    resumed: bool  # its sequence number is already in the ledger (an interrupted intake)
    claimed_at: float

    @property
    def order(self) -> tuple[str, int, str]:
        stamp = self.payload.sender
        return ("", 0, self.claimed) if stamp is None else (stamp.sender, stamp.sequence, "")


@dataclass
class _QuarantineUsage:
    entries: list[tuple[float, str, int]] = field(default_factory=list)  # (mtime, stem, bytes)
    bytes: int = 0  # the sum of the entries' bytes, kept as they come and go
    purged: int = 0

    @property
    def files(self) -> int:
        return len(self.entries)


class Intake:
    """The inbox of one daemon."""

    def __init__(
        self,
        home: Path,
        inbox: Path,
        manifest: ReferenceManifest,
        queue: JobQueue,
        ledger: SequenceLedger,
        worker: WorkerLock,
        settings: IntakeSettings | None = None,
        trust_dir: Path | None = None,
        trust_options: TrustOptions | None = None,
    ) -> None:
        self.home, self.inbox = Path(home), Path(inbox)
        self.trust_dir = Path(trust_dir) if trust_dir else self.home / "trust"
        self.trust_options = trust_options or TrustOptions()
        self.settings = settings or IntakeSettings()
        self.manifest = manifest
        self.queue = queue
        self.ledger = ledger
        self.worker = worker
        self.trust = self._policy()
        self.spool = self.home / "spool"
        self.quarantine = self.home / "quarantine"
        self.intake_root = self.home / "intake"
        self.claimed = self.intake_root / worker.owner
        for folder in (self.inbox, self.spool, self.quarantine, self.claimed):
            folder.mkdir(parents=True, exist_ok=True)
        if os.stat(self.inbox).st_dev != os.stat(self.claimed).st_dev:
            raise ConfigError(
                f"inbox {self.inbox} and daemon home {self.home} are on different filesystems: "
                "put them on one, so that claiming a file is a single atomic rename"
            )
        self.stats: dict[str, Any] = {"accepted": 0, "quarantined": 0, "skipped": 0}
        self._sizes: dict[str, tuple[int, int, float]] = {}
        self._retry_after: dict[str, float] = {}
        self._unclaimable: set[str] = set()
        self._counter = 0
        self.quarantine_usage = self._scan_quarantine()
        self._report_quarantine()
        # told of each file's outcome: (the name it came in under, queued or not)
        self.on_outcome: Callable[[str, bool], None] | None = None

    def _tell(self, origin: str, queued: bool) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(origin, queued)
        except Exception:  # a reply that cannot be written must not stop the intake
            log.exception("outcome hook failed", extra={"event": "outcome-hook-error"})

    # --- finding work ----------------------------------------------------------------
    def _claimed_files(self, folder: Path) -> list[str]:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.endswith(ORIGIN_SUFFIX))

    def waiting(self) -> int:
        """Entries in the inbox (settled or not) plus claimed files not yet processed, by
        this daemon, by others, or left by a dead one (adopted on the next pass)."""
        with os.scandir(self.inbox) as entries:
            inbox = sum(
                1
                for e in entries
                if is_candidate(e.name)
                and e.name not in self._unclaimable
                and not e.is_dir(follow_symlinks=False)
            )
        claimed = 0
        for folder in self.intake_root.iterdir():
            with contextlib.suppress(OSError):
                claimed += len(self._claimed_files(folder))
        return inbox + claimed

    def adopt_orphans(self) -> int:
        """Take over the claimed files of daemons that died mid-intake."""
        adopted = 0
        for folder in self.intake_root.iterdir():
            if folder == self.claimed or not folder.is_dir() or self.worker.alive(folder.name):
                continue
            for path in folder.iterdir():
                try:
                    os.rename(path, self.claimed / path.name)
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
        if now - info.st_mtime >= self.settings.settle_seconds:
            return True
        seen = self._sizes.get(name)
        if seen is None or seen[:2] != (info.st_size, info.st_mtime_ns):
            self._sizes[name] = (info.st_size, info.st_mtime_ns, now)
            return False
        return now - seen[2] >= self.settings.settle_seconds

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
            origin = None
            try:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode) or not self._settled(entry.name, info, now):
                    continue
                target = self.claimed / self._claim_id()
                origin = target.with_name(target.name + ORIGIN_SUFFIX)
                record = {"name": printable_name(entry.name), "claimed": now}
                write_bytes_atomic(origin, json.dumps(record).encode())
                os.rename(entry.path, target)
            except OSError as exc:
                if origin is not None:
                    origin.unlink(missing_ok=True)
                if isinstance(exc, FileNotFoundError):
                    continue  # another daemon claimed it
                self._skip(entry.name, exc)
                continue
            except StorageError as exc:  # the origin record could not be written
                self._skip(entry.name, exc)
                continue
            self._sizes.pop(entry.name, None)
            claimed += 1
        for name in set(self._sizes) - present:  # entries gone since they were seen
            del self._sizes[name]
        self._unclaimable &= present
        if claimed:
            fsync_directory(self.claimed)
        return claimed

    def _skip(self, name: str, exc: Exception) -> None:
        if name in self._unclaimable:
            return
        self._unclaimable.add(name)
        self.stats["skipped"] += 1
        shown = printable_name(name)
        log.error(
            f"cannot claim inbox entry {shown[:80]!r}: {exc}; left in the inbox",
            extra={"event": "intake-unclaimable", "file": shown, "error": str(exc)},
        )

    def _policy(self) -> TrustPolicy:
        return build_trust_policy(self.trust_dir, self.trust_options, self.ledger.last)

    def stored_payload_policy(self) -> TrustPolicy:
        """For re-reading a spooled payload at training time: its signature must still
        verify under a trusted key; expiry and sequence were checked at intake."""
        return self.trust.without_freshness()

    # --- one pass ---------------------------------------------------------------------
    def poll(self) -> int:
        """One pass over the inbox; returns how many files were processed."""
        try:  # keys installed or removed since the last pass count at once
            self.trust = self._policy()
        except TrustStoreError as exc:  # a local fault: keep every file until it is fixed
            log.error(
                f"trust store unusable, not taking payloads in: {exc}",
                extra={"event": "trust-store-error", "error": str(exc)},
            )
            return 0
        self.adopt_orphans()
        self.claim_ready()
        now = time.time()
        processed = 0
        verified: list[_Verified] = []
        names = self._claimed_files(self.claimed)
        self._retry_after = {k: v for k, v in self._retry_after.items() if k in names}
        for name in names:
            if self._retry_after.get(name, 0.0) > now:
                continue
            outcome = self._guarded(name, lambda name=name: self._examine(name))
            if isinstance(outcome, _Verified):
                verified.append(outcome)
            elif outcome is not None:
                processed += 1
        for item in self._ready(verified, now):
            if self._guarded(item.claimed, lambda item=item: self._commit(item)) is not None:
                processed += 1
        self._remove_stray_origins()
        return processed

    def _guarded(self, name: str, step):
        """Run one step on one claimed file: a local fault keeps the file for a retry, a
        bug quarantines it; returns the step's result, or None if it did not finish."""
        try:
            try:
                result = step()
            except (OSError, StorageError):
                raise
            except Exception as exc:  # a bug must not block the files behind this one
                log.exception(
                    "intake failed on a file; quarantined",
                    extra={"event": "intake-internal-error", "file": name},
                )
                self._quarantine(self.claimed / name, "", exc)
                result = True
            self._retry_after.pop(name, None)
            return result
        except (OSError, StorageError) as exc:  # disk full, damaged database: keep, retry
            self._retry_after[name] = time.time() + self.settings.retry_seconds
            log.error(
                "cannot store an incoming payload; will retry",
                extra={
                    "event": "intake-storage-error",
                    "file": name,
                    "error": str(exc),
                    "retry_seconds": self.settings.retry_seconds,
                },
            )
            return None

    def _ready(self, verified: list[_Verified], now: float) -> list[_Verified]:
        """The verified payloads to queue now, in (sender, sequence) order: those past the
        reorder window, and every older one of the same sender held with them."""
        window = self.settings.reorder_seconds
        newest_ripe: dict[str, int] = {}
        for item in verified:
            if item.resumed or now - item.claimed_at >= window:
                sender, sequence, _ = item.order
                newest_ripe[sender] = max(sequence, newest_ripe.get(sender, -1))
        ready = [
            item
            for item in verified
            if item.order[0] in newest_ripe and item.order[1] <= newest_ripe[item.order[0]]
        ]
        return sorted(ready, key=lambda item: item.order)

    def _remove_stray_origins(self) -> None:
        """Origin records whose claimed file is gone (a claim interrupted before its
        rename) are removed."""
        with os.scandir(self.claimed) as entries:
            for entry in entries:
                stem = entry.name[: -len(ORIGIN_SUFFIX)]
                if entry.name.endswith(ORIGIN_SUFFIX) and not (self.claimed / stem).exists():
                    Path(entry.path).unlink(missing_ok=True)

    # --- one file --------------------------------------------------------------------
    def origin_of(self, claimed: str) -> tuple[str, float]:
        """(the entry's original name, when it was claimed) of a claimed file."""
        try:
            record = json.loads((self.claimed / (claimed + ORIGIN_SUFFIX)).read_text())
            return str(record["name"]), float(record["claimed"])
        except (OSError, ValueError, KeyError, TypeError):
            stamp = claimed.split("-", 1)[0]
            return claimed, int(stamp) / 1e9 if stamp.isdigit() else 0.0

    def verify(self, data: bytes, policy: TrustPolicy | None = None) -> Payload:
        """Full verification of untrusted bytes (byte cap, signature, audience, freshness,
        format, reference set, digest) and this device's caps per job."""
        payload = decode_payload(
            data, self.settings.max_bytes, reference=self.manifest, trust=policy or self.trust
        )
        check_job_size(payload, self.settings.max_images, self.settings.max_classes)
        return payload

    def _examine(self, claimed: str) -> _Verified | bool:
        """Read and verify one claimed file: quarantined or removed (True), or verified
        and waiting to be queued."""
        path = self.claimed / claimed
        origin, claimed_at = self.origin_of(claimed)
        try:
            data = read_entry(path, self.settings.max_bytes)
        except PayloadError as exc:
            self._quarantine(path, "", exc)
            return True
        sha256 = hashlib.sha256(data).hexdigest()
        known = self.queue.find(sha256)
        if known is not None:
            self._known(path, origin, sha256, known)
            return True
        accepted_from = self.ledger.intake_name_of(sha256)
        resumed = accepted_from == claimed
        try:
            if accepted_from is not False and not resumed:
                raise ReplayError(
                    f"{origin} is a copy of a payload this device accepted before: a replay; "
                    "not trained again"
                )
            policy = self.trust.without_freshness() if resumed else self.trust
            payload = self.verify(data, policy)
        except (PayloadError, ReferenceMismatchError) as exc:
            self._quarantine(path, sha256, exc)
            return True
        crash_point("intake-verified")
        return _Verified(claimed, origin, data, sha256, payload, resumed, claimed_at)

    def _commit(self, item: _Verified) -> bool:
        """Spool, record and queue one verified payload, then remove its claimed file."""
        path = self.claimed / item.claimed
        payload, sha256 = item.payload, item.sha256
        spooled = self.spool / f"{sha256}.plada"
        if not spooled.is_file():
            write_bytes_atomic(spooled, item.data, durable=True)
        crash_point("intake-spooled")
        signed = payload.sender
        if signed is not None and not item.resumed:
            try:
                self.ledger.record(signed.sender, signed.sequence, sha256, item.claimed)
            except (ReplayError, RollbackError) as exc:  # an older one, or another daemon won
                self._quarantine(path, sha256, exc)
                return True
        crash_point("intake-recorded")
        job, created = self.queue.add(
            sha256,
            str(spooled.relative_to(self.home)),
            item.origin,
            payload.task,
            payload.count,
            len(payload.class_names),
            len(item.data),
            intake_name=item.claimed,
            stamp=signed,
        )
        if not created:
            self._known(path, item.origin, sha256, job)
            return True
        crash_point("intake-queued")
        self._remove_claimed(path)
        self.stats["accepted"] += 1
        self._tell(item.origin, queued=True)
        origin = "unsigned" if signed is None else f"{signed.sender} #{signed.sequence}"
        log.info(
            f"queued job {job.id}: {item.origin} ({payload.task}, {payload.count} images, "
            f"{origin})",
            extra={
                "event": "payload-queued",
                "job": job.id,
                "file": item.origin,
                "sha256": sha256,
                "task": payload.task,
                "images": payload.count,
                "bytes": len(item.data),
                "sender": None if signed is None else signed.sender,
                "sequence": None if signed is None else signed.sequence,
            },
        )
        return True

    def _remove_claimed(self, path: Path) -> None:
        path.unlink()
        path.with_name(path.name + ORIGIN_SUFFIX).unlink(missing_ok=True)
        fsync_directory(self.claimed)

    def _known(self, path: Path, origin: str, sha256: str, job: Job) -> None:
        """A file whose bytes are already a job: the remnant of an interrupted intake
        (same claimed name; removed) or a replay (quarantined)."""
        if job.intake_name == path.name:
            self._remove_claimed(path)
            self._tell(origin, queued=True)
            return
        self._quarantine(
            path,
            sha256,
            ReplayError(
                f"{origin} is a copy of job {job.id} ({job.state}), accepted before: a "
                "replay; not trained again"
            ),
        )

    # --- quarantine ------------------------------------------------------------------
    def _scan_quarantine(self) -> _QuarantineUsage:
        usage = _QuarantineUsage()
        with os.scandir(self.quarantine) as entries:
            for entry in entries:
                if not entry.name.endswith(REASON_SUFFIX):
                    continue
                stem = entry.name[: -len(REASON_SUFFIX)]
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    with contextlib.suppress(FileNotFoundError):
                        size += os.lstat(self.quarantine / stem).st_size
                except OSError:
                    continue
                usage.entries.append((mtime, stem, size))
        usage.entries.sort()
        usage.bytes = sum(size for _, _, size in usage.entries)
        return usage

    def _make_room(self, incoming: int) -> None:
        """Purge the oldest quarantined entries until one of ``incoming`` bytes fits the
        quota."""
        usage, limits = self.quarantine_usage, self.settings
        while usage.entries and (
            usage.files + 1 > limits.quarantine_max_files
            or usage.bytes + incoming > limits.quarantine_max_bytes
        ):
            _, stem, size = usage.entries.pop(0)
            (self.quarantine / stem).unlink(missing_ok=True)
            (self.quarantine / (stem + REASON_SUFFIX)).unlink(missing_ok=True)
            usage.bytes -= size
            usage.purged += 1
            log.warning(
                f"quarantine over its quota: purged its oldest entry {stem}",
                extra={"event": "quarantine-purged", "entry": stem},
            )

    def _report_quarantine(self) -> None:
        usage, limits = self.quarantine_usage, self.settings
        self.stats["quarantine"] = {
            "files": usage.files,
            "bytes": usage.bytes,
            "purged": usage.purged,
            "max_files": limits.quarantine_max_files,
            "max_bytes": limits.quarantine_max_bytes,
        }

    def _quarantine(self, path: Path, sha256: str, error: Exception) -> None:
        origin, _ = self.origin_of(path.name)
        try:
            size = os.lstat(path).st_size
        except FileNotFoundError:
            size = 0
        self._counter += 1
        stem = f"{(sha256 or 'unread')[:12]}-{time.time_ns():x}{self._counter % 1000:03d}"
        reason: dict[str, Any] = {
            "file": origin,
            "stored": stem,
            "quarantined": utc_text(),
            "sha256": sha256 or None,
            "bytes": size,
            "error": type(error).__name__,
            "message": str(error),
            "action": "not queued; ask the sender for a fresh copy of this payload",
        }
        entry_bytes = size + len(json.dumps(reason, indent=2)) + 1  # the file and its reason
        self._make_room(entry_bytes)
        write_json_atomic(self.quarantine / (stem + REASON_SUFFIX), reason, durable=True)
        os.replace(path, self.quarantine / stem)
        path.with_name(path.name + ORIGIN_SUFFIX).unlink(missing_ok=True)
        fsync_directory(self.quarantine)
        usage = self.quarantine_usage
        usage.entries.append((time.time(), stem, entry_bytes))
        usage.bytes += entry_bytes
        self.stats["quarantined"] += 1
        self._report_quarantine()
        self._tell(origin, queued=False)
        log.warning(
            f"quarantined {origin}: {type(error).__name__}: {error}",
            extra={
                "event": "payload-quarantined",
                "file": origin,
                "sha256": sha256 or None,
                "stored": stem,
                "error": type(error).__name__,
                "reason": str(error),
            },
        )
