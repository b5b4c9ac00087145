"""Payload intake: claim files from the inbox, judge them, queue or quarantine them.

One pass: settled inbox files are claimed (:mod:`receiver.claims`); each is read and
judged in the acceptance order (:mod:`receiver.acceptance`: replay, signature,
audience, freshness, format, reference fingerprint, digest, this device's caps);
refused ones go to the quarantine (:mod:`receiver.quarantine`). Accepted payloads are
committed in order of (sender, sequence number), not of arrival: each waits
``reorder_seconds`` after it was claimed, and the payloads of a sender that arrive
within that window are committed oldest first. Only a payload older than one already
*committed* is a rollback. Committed means:

- stored durably as ``<home>/spool/<sha256>.plada``, its sequence number recorded
  in the ledger (:mod:`receiver.ledger`, with the claimed name), queued, and only
  then removed from the intake folder; or
- refused: a copy of a payload already accepted is a replay and is quarantined too.

Every step can be interrupted: a daemon that finds the intake folder of a dead
daemon adopts its files and processes them again; a claimed file whose payload the
ledger recorded under that same claimed name but which has no job yet is queued
now; one whose job is already queued (under that name) is just removed. So nothing
is lost and nothing is queued twice. A local fault (disk full, a damaged database)
keeps the file where it is and retries it later; it never quarantines a payload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol.atomic_files import write_bytes_atomic
from protocol.availability import Availability
from protocol.errors import (
    PayloadError,
    ReferenceMismatchError,
    ReplayError,
    RollbackError,
    StorageError,
)
from protocol.manifest import ReferenceManifest
from protocol.payload import RECEIVER_DEFAULT_MAX_BYTES
from receiver.acceptance import (
    DEFAULT_MAX_CLASSES,
    DEFAULT_MAX_IMAGES,
    Acceptance,
    AcceptanceRules,
    AcceptedPayload,
    CoverageRule,
    Received,
    open_acceptance,
    record_acceptance,
)
from receiver.claims import ORIGIN_SUFFIX, Claims, read_entry
from receiver.errors import TrustStoreError
from receiver.job_queue import Job, JobQueue, QueuedPayload
from receiver.ledger import SequenceLedger
from receiver.quarantine import Quarantine
from receiver.trust_store import TrustOptions
from receiver.workers import WorkerLock
from trainer.faults import crash_point

log = logging.getLogger("plada.receiver")


@dataclass(frozen=True)
class IntakeSettings:
    """How an inbox is read, and what this device takes in."""

    settle_seconds: float = 2.0
    reorder_seconds: float = 5.0  # how long a verified payload waits for older ones
    max_bytes: int = RECEIVER_DEFAULT_MAX_BYTES
    max_images: int = DEFAULT_MAX_IMAGES  # per job
    max_classes: int = DEFAULT_MAX_CLASSES
    quarantine_max_files: int = 1000
    quarantine_max_bytes: int = 256 << 20
    retry_seconds: float = 30.0  # after a local fault
    trust_dir: Path | None = None  # the trusted keys (default HOME/trust)
    trust: TrustOptions = field(default_factory=TrustOptions)
    coverage: CoverageRule = field(default_factory=CoverageRule)

    def rules(self) -> AcceptanceRules:
        """The acceptance rules of the daemon's intake: a payload is taken once."""
        return AcceptanceRules(
            self.trust,
            self.max_bytes,
            self.max_images,
            self.max_classes,
            retrain=False,
            coverage=self.coverage,
        )


@dataclass
class _Verified:
    """A claimed payload that passed acceptance and waits to be committed."""

    claimed: str
    accepted: AcceptedPayload
    claimed_at: float

    @property
    def order(self) -> tuple[str, int, str]:
        stamp = self.accepted.payload.sender
        return ("", 0, self.claimed) if stamp is None else (stamp.sender, stamp.sequence, "")


@dataclass
class IntakeStats:
    """What the intake has done since the daemon started."""

    accepted: int = 0
    quarantined: int = 0


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
        availability: Availability | None = None,
    ) -> None:
        self.home, self.inbox = Path(home), Path(inbox)
        self.settings = settings or IntakeSettings()
        self.trust_dir = self.settings.trust_dir or self.home / "trust"
        self.manifest, self.queue, self.ledger = manifest, queue, ledger
        self.availability = availability  # a partial copy's rows (None: the whole set)
        self.acceptance = self._acceptance()
        self.spool = self.home / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.claims = Claims(self.home, self.inbox, worker, self.settings.settle_seconds)
        self.quarantine = Quarantine(
            self.home / "quarantine",
            self.settings.quarantine_max_files,
            self.settings.quarantine_max_bytes,
        )
        self.stats = IntakeStats()
        self._retry_after: dict[str, float] = {}
        # told of each file's outcome: (the name it came in under, queued or not)
        self.on_outcome: Callable[[str, bool], None] | None = None

    def _acceptance(self) -> Acceptance:
        return open_acceptance(
            self.trust_dir, self.settings.rules(), self.ledger, self.manifest, self.availability
        )

    def _tell(self, origin: str, queued: bool) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(origin, queued)
        except Exception:  # a reply that cannot be written must not stop the intake
            log.exception("outcome hook failed", extra={"event": "outcome-hook-error"})

    @property
    def claimed(self) -> Path:
        """This daemon's intake folder of claimed files."""
        return self.claims.folder

    def waiting(self) -> int:
        """Inbox entries and claimed files not processed yet (see :meth:`Claims.waiting`)."""
        return self.claims.waiting()

    def report(self) -> dict[str, int | dict[str, int]]:
        """What the intake has done, and the quarantine's use, for the health file."""
        return {
            "accepted": self.stats.accepted,
            "quarantined": self.stats.quarantined,
            "skipped": self.claims.skipped,
            "quarantine": self.quarantine.report(),
        }

    # --- one pass ---------------------------------------------------------------------
    def poll(self) -> int:
        """One pass over the inbox; returns how many files were processed."""
        try:  # keys installed or removed since the last pass count at once
            self.acceptance = self._acceptance()
        except TrustStoreError as exc:  # a local fault: keep every file until it is fixed
            log.error(
                f"trust store unusable, not taking payloads in: {exc}",
                extra={"event": "trust-store-error", "error": str(exc)},
            )
            return 0
        self.claims.adopt_orphans()
        self.claims.claim_ready()
        now = time.time()
        processed = 0
        verified: list[_Verified] = []
        names = self.claims.files()
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
        self.claims.remove_stray_origins()
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
        """The verified payloads to commit now, in (sender, sequence) order: those past
        the reorder window, and every older one of the same sender held with them."""
        window = self.settings.reorder_seconds
        newest_ripe: dict[str, int] = {}
        for item in verified:
            if item.accepted.again or now - item.claimed_at >= window:
                sender, sequence, _ = item.order
                newest_ripe[sender] = max(sequence, newest_ripe.get(sender, -1))
        ready = [
            item
            for item in verified
            if item.order[0] in newest_ripe and item.order[1] <= newest_ripe[item.order[0]]
        ]
        return sorted(ready, key=lambda item: item.order)

    # --- one file --------------------------------------------------------------------
    def _examine(self, claimed: str) -> _Verified | bool:
        """Read and judge one claimed file: quarantined or removed (True), or accepted
        and waiting to be committed."""
        path = self.claimed / claimed
        origin, claimed_at = self.claims.origin_of(claimed)
        try:
            data = read_entry(path, self.settings.max_bytes)
        except PayloadError as exc:
            self._quarantine(path, "", exc)
            return True
        received = Received.of(data, origin)
        known = self.queue.find(received.sha256)
        if known is not None:
            self._known(path, origin, received.sha256, known)
            return True
        try:
            accepted = self.acceptance.examine(received, claim=claimed)
        except (PayloadError, ReferenceMismatchError) as exc:
            self._quarantine(path, received.sha256, exc)
            return True
        crash_point("intake-verified")
        return _Verified(claimed, accepted, claimed_at)

    def _commit(self, item: _Verified) -> bool:
        """Spool, record and queue one accepted payload, then remove its claimed file."""
        path = self.claimed / item.claimed
        accepted = item.accepted
        spooled = self.spool / f"{accepted.sha256}.plada"
        if not spooled.is_file():
            write_bytes_atomic(spooled, accepted.received.data, durable=True)
        crash_point("intake-spooled")
        try:
            record_acceptance(self.ledger, accepted, item.claimed)
        except (ReplayError, RollbackError) as exc:  # an older one, or another daemon won
            self._quarantine(path, accepted.sha256, exc)
            return True
        crash_point("intake-recorded")
        payload, origin = accepted.payload, accepted.received.source
        job, created = self.queue.add(
            QueuedPayload(
                accepted.sha256,
                str(spooled.relative_to(self.home)),
                origin,
                payload.task,
                payload.count,
                len(payload.class_names),
                len(accepted.received.data),
                item.claimed,
                payload.sender,
            )
        )
        if not created:
            self._known(path, origin, accepted.sha256, job)
            return True
        crash_point("intake-queued")
        self.claims.remove(path)
        self.stats.accepted += 1
        self._tell(origin, queued=True)
        _log_queued(job, accepted)
        return True

    def _known(self, path: Path, origin: str, sha256: str, job: Job) -> None:
        """A file whose bytes are already a job: the remnant of an interrupted intake
        (same claimed name; removed) or a replay (quarantined)."""
        if job.intake_name == path.name:
            self.claims.remove(path)
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

    def _quarantine(self, path: Path, sha256: str, error: Exception) -> None:
        origin, _ = self.claims.origin_of(path.name)
        stored = self.quarantine.put(path, origin, sha256, error)
        path.with_name(path.name + ORIGIN_SUFFIX).unlink(missing_ok=True)
        self.stats.quarantined += 1
        self._tell(origin, queued=False)
        log.warning(
            f"quarantined {origin}: {type(error).__name__}: {error}",
            extra={
                "event": "payload-quarantined",
                "file": origin,
                "sha256": sha256 or None,
                "stored": stored,
                "error": type(error).__name__,
                "reason": str(error),
            },
        )


def _log_queued(job: Job, accepted: AcceptedPayload) -> None:
    payload, signed = accepted.payload, accepted.payload.sender
    origin = accepted.received.source
    by = "unsigned" if signed is None else f"{signed.sender} #{signed.sequence}"
    log.info(
        f"queued job {job.id}: {origin} ({payload.task}, {payload.count} images, {by})",
        extra={
            "event": "payload-queued",
            "job": job.id,
            "file": origin,
            "sha256": accepted.sha256,
            "task": payload.task,
            "images": payload.count,
            "bytes": len(accepted.received.data),
            "sender": None if signed is None else signed.sender,
            "sequence": None if signed is None else signed.sequence,
        },
    )
