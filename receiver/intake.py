"""Payload intake: claim files from the inbox, verify them, queue or quarantine them.

A file is read only once it has stopped changing (``settle_seconds``); names that
start with ``.`` or end in ``.part``/``.tmp`` are never read, so a link that writes
``x.part`` and renames it to ``x.plada`` when complete is handled without waiting.

Claiming is one ``rename`` into ``<home>/intake/<daemon>/``, so of several daemons
watching one inbox exactly one gets each file. A claimed file is verified (size,
signature against the trust store, expiry, sequence number, format, reference
fingerprint, digest), then either

- accepted: stored durably as ``<home>/spool/<sha256>.plada``, queued together with
  its sender's new sequence number (one transaction), and only then removed from
  the intake folder; or
- rejected: moved to ``<home>/quarantine/`` beside ``<name>.reason.json``. A copy
  of a payload already accepted is a replay and is rejected too.

Every step can be interrupted: a daemon that finds the intake folder of a dead
daemon adopts its files and processes them again; a claimed file whose job is
already queued (under the same claimed name) is the remnant of an interrupted
intake and is just removed, so nothing is lost and nothing is queued twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from protocol.atomic_files import fsync_directory, write_bytes_atomic, write_json_atomic
from protocol.errors import (
    ConfigError,
    PayloadError,
    PayloadLimitError,
    ReferenceMismatchError,
    ReplayError,
    RollbackError,
    StorageError,
    TrustStoreError,
)
from protocol.manifest import ReferenceManifest
from protocol.payload import MAX_PAYLOAD_BYTES, Payload, decode_payload
from protocol.timestamps import utc_text
from protocol.trust import TrustPolicy
from receiver.job_queue import Job, JobQueue
from receiver.trust_store import build_trust_policy
from receiver.workers import WorkerLock
from trainer.faults import crash_point

log = logging.getLogger("plada.receiver")
IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
RETRY_SECONDS = 30.0


def is_candidate(name: str) -> bool:
    """Whether an inbox entry name may be a finished payload file."""
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


class Intake:
    """The inbox of one daemon."""

    def __init__(
        self,
        home: Path,
        inbox: Path,
        manifest: ReferenceManifest,
        queue: JobQueue,
        worker: WorkerLock,
        settle_seconds: float = 2.0,
        max_bytes: int = MAX_PAYLOAD_BYTES,
        trust_dir: Path | None = None,
        allow_unsigned: bool = False,
        check_expiry: bool = True,
    ) -> None:
        self.home, self.inbox = Path(home), Path(inbox)
        self.trust_dir = Path(trust_dir) if trust_dir else self.home / "trust"
        self.allow_unsigned, self.check_expiry = allow_unsigned, check_expiry
        self.manifest = manifest
        self.queue = queue
        self.worker = worker
        self.settle_seconds = settle_seconds
        self.max_bytes = max_bytes
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
        self.stats = {"accepted": 0, "quarantined": 0}
        self._sizes: dict[str, tuple[int, int, float]] = {}
        self._retry_after: dict[str, float] = {}

    # --- finding work ----------------------------------------------------------------
    def waiting(self) -> int:
        """Files in the inbox (settled or not) plus claimed files not yet processed, by this
        daemon, by others, or left by a dead one (adopted on the next pass)."""
        with os.scandir(self.inbox) as entries:
            inbox = sum(1 for e in entries if is_candidate(e.name) and e.is_file())
        return inbox + sum(1 for path in self.intake_root.glob("*/*") if path.is_file())

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
                except FileNotFoundError:
                    continue  # another daemon adopted it first
            with contextlib.suppress(OSError):  # not empty yet, or already gone
                folder.rmdir()
        if adopted:
            log.info(
                "adopted files of a stopped daemon",
                extra={"event": "intake-adopted", "files": adopted},
            )
        return adopted

    def _settled(self, entry: os.DirEntry) -> bool:
        stat = entry.stat()
        now = time.time()
        if now - stat.st_mtime >= self.settle_seconds:
            return True
        seen = self._sizes.get(entry.name)
        if seen is None or seen[:2] != (stat.st_size, stat.st_mtime_ns):
            self._sizes[entry.name] = (stat.st_size, stat.st_mtime_ns, now)
            return False
        return now - seen[2] >= self.settle_seconds

    def claim_ready(self) -> int:
        """Move every settled inbox file into this daemon's intake folder."""
        claimed = 0
        with os.scandir(self.inbox) as entries:
            ready = [e for e in entries if is_candidate(e.name) and e.is_file()]
        ready = [e for e in ready if self._settled(e)]
        for entry in sorted(ready, key=lambda e: e.name):
            target = self.claimed / f"{time.time_ns()}-{entry.name}"
            try:
                os.rename(entry.path, target)
            except FileNotFoundError:
                continue  # another daemon claimed it
            self._sizes.pop(entry.name, None)
            claimed += 1
        if claimed:
            fsync_directory(self.claimed)
        return claimed

    def _policy(self) -> TrustPolicy:
        return build_trust_policy(
            self.trust_dir, self.allow_unsigned, self.check_expiry, self.queue.last_sequence
        )

    def stored_payload_policy(self) -> TrustPolicy:
        """For re-reading a spooled payload at training time: its signature must still
        verify under a trusted key; expiry and sequence were checked at intake."""
        return self.trust.without_freshness()

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
        processed = 0
        now = time.time()
        for path in sorted(self.claimed.iterdir()):
            if self._retry_after.get(path.name, 0.0) > now:
                continue
            try:
                try:
                    self.process(path)
                except (OSError, StorageError):
                    raise
                except Exception as exc:  # a bug must not block the files behind this one
                    log.exception(
                        "intake failed on a file; quarantined",
                        extra={"event": "intake-internal-error", "file": path.name},
                    )
                    self._quarantine(path, path.name.split("-", 1)[-1], "", exc)
                self._retry_after.pop(path.name, None)
            except (OSError, StorageError) as exc:  # disk full: keep the file, retry later
                self._retry_after[path.name] = now + RETRY_SECONDS
                log.error(
                    "cannot store an incoming payload; will retry",
                    extra={
                        "event": "intake-storage-error",
                        "file": path.name,
                        "error": str(exc),
                        "retry_seconds": RETRY_SECONDS,
                    },
                )
            processed += 1
        return processed

    # --- one file --------------------------------------------------------------------
    def verify(self, data: bytes) -> Payload:
        """Full verification of untrusted bytes (byte cap, signature, freshness, format,
        reference set, digest)."""
        return decode_payload(data, self.max_bytes, reference=self.manifest, trust=self.trust)

    def process(self, path: Path) -> None:
        """Verify one claimed file, then queue or quarantine it, then remove it."""
        source_name = path.name.split("-", 1)[1] if "-" in path.name else path.name
        size = path.stat().st_size
        if size > self.max_bytes:
            self._quarantine(
                path,
                source_name,
                "",
                PayloadLimitError(f"{size} bytes, over the cap of {self.max_bytes}"),
            )
            return
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        known = self.queue.find(sha256)
        if known is not None:
            self._known(path, source_name, sha256, known)
            return
        try:
            payload = self.verify(data)
        except (PayloadError, ReferenceMismatchError) as exc:
            self._quarantine(path, source_name, sha256, exc)
            return
        crash_point("intake-verified")
        spooled = self.spool / f"{sha256}.plada"
        if not spooled.is_file():
            write_bytes_atomic(spooled, data, durable=True)
        crash_point("intake-spooled")
        try:
            job, created = self.queue.add(
                sha256,
                str(spooled.relative_to(self.home)),
                source_name,
                payload.task,
                payload.count,
                len(payload.class_names),
                len(data),
                intake_name=path.name,
                stamp=payload.sender,
            )
        except (ReplayError, RollbackError) as exc:  # another daemon of this home won the race
            spooled.unlink(missing_ok=True)
            self._quarantine(path, source_name, sha256, exc)
            return
        if not created:
            self._known(path, source_name, sha256, job)
            return
        crash_point("intake-queued")
        path.unlink()
        fsync_directory(self.claimed)
        self.stats["accepted"] += 1
        signed = payload.sender
        origin = "unsigned" if signed is None else f"{signed.sender} #{signed.sequence}"
        log.info(
            f"queued job {job.id}: {source_name} ({payload.task}, {payload.count} images, "
            f"{origin})",
            extra={
                "event": "payload-queued",
                "job": job.id,
                "file": source_name,
                "sha256": sha256,
                "task": payload.task,
                "images": payload.count,
                "bytes": len(data),
                "sender": None if signed is None else signed.sender,
                "sequence": None if signed is None else signed.sequence,
            },
        )

    def _known(self, path: Path, source_name: str, sha256: str, job: Job) -> None:
        """A file whose bytes are already a job: the remnant of an interrupted intake
        (same claimed name; removed) or a replay (quarantined)."""
        if job.intake_name == path.name:
            path.unlink()
            fsync_directory(self.claimed)
            return
        self._quarantine(
            path,
            source_name,
            sha256,
            ReplayError(
                f"{source_name} is a copy of job {job.id} ({job.state}), accepted before: a "
                "replay; not trained again"
            ),
        )

    def _quarantine(self, path: Path, source_name: str, sha256: str, error: Exception) -> None:
        stem = f"{(sha256 or 'unread')[:12]}-{source_name}"
        reason: dict[str, Any] = {
            "file": source_name,
            "quarantined": utc_text(),
            "sha256": sha256 or None,
            "bytes": path.stat().st_size,
            "error": type(error).__name__,
            "message": str(error),
            "action": "not queued; ask the sender for a fresh copy of this payload",
        }
        write_json_atomic(self.quarantine / f"{stem}.reason.json", reason, durable=True)
        os.replace(path, self.quarantine / stem)
        fsync_directory(self.quarantine)
        self.stats["quarantined"] += 1
        log.warning(
            f"quarantined {source_name}: {type(error).__name__}: {error}",
            extra={
                "event": "payload-quarantined",
                "file": source_name,
                "error": type(error).__name__,
                "reason": str(error),
            },
        )
