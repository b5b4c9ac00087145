"""The receiver's persistent job queue: one SQLite database, safe across crashes and daemons.

SQLite in WAL mode with ``synchronous=FULL``: a committed change survives a crash
or power cut, an uncommitted one is rolled back. Every state change is one
transaction; claims take the write lock first (``BEGIN IMMEDIATE``), so two daemons
sharing a queue never take the same job.

A job's life: ``queued`` -> ``running`` (owned by one daemon) -> ``done`` or
``failed``. A running job whose owner died (its worker lock is free) goes back to
``queued``; one that crashed its daemon ``max_restarts`` times without training
further is ``failed`` instead, so one bad job cannot stop the queue.

The queue holds jobs only: replay protection lives in its own file
(:mod:`receiver.ledger`), so a damaged queue can be moved aside without losing it.
Any ``sqlite3.DatabaseError`` becomes ``StorageError``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import StorageError
from protocol.payload import SenderStamp
from receiver.ledger import SenderSequence
from receiver.sqlite_store import (
    add_missing_columns,
    check_integrity,
    database_errors,
    open_database,
    write_transaction,
)

STATES = ("queued", "running", "done", "failed")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    source_name TEXT NOT NULL,
    task TEXT NOT NULL,
    images INTEGER NOT NULL,
    classes INTEGER NOT NULL,
    payload_bytes INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    owner TEXT,
    claims INTEGER NOT NULL DEFAULT 0,
    restarts INTEGER NOT NULL DEFAULT 0,
    progress_step INTEGER NOT NULL DEFAULT 0,
    claimed_at_step INTEGER NOT NULL DEFAULT 0,
    received REAL NOT NULL,
    started REAL,
    finished REAL,
    result_dir TEXT,
    error TEXT,
    intake_name TEXT,
    sender TEXT,
    sequence INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
"""
_ADDED_COLUMNS = {"intake_name": "TEXT", "sender": "TEXT", "sequence": "INTEGER"}


@dataclass(frozen=True)
class Job:
    """One row of the queue."""

    id: int
    sha256: str
    payload: str
    source_name: str
    task: str
    images: int
    classes: int
    payload_bytes: int
    state: str
    owner: str | None
    claims: int
    restarts: int
    progress_step: int
    claimed_at_step: int
    received: float
    started: float | None
    finished: float | None
    result_dir: str | None
    error: str | None
    intake_name: str | None = None  # the claimed file it came from
    sender: str | None = None  # signed payloads: sender id and sequence number
    sequence: int | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class QueuedPayload:
    """A verified payload as the queue takes it."""

    sha256: str
    payload: str  # the spooled file, relative to the daemon's home
    source_name: str  # the name it came in under
    task: str
    images: int
    classes: int
    payload_bytes: int
    intake_name: str | None = None  # the claimed file it came from
    stamp: SenderStamp | None = None  # signed payloads: sender id and sequence number


class JobQueue:
    """Jobs in ``<home>/queue.sqlite``; each method is one transaction."""

    def __init__(self, path: str | Path, check: bool = False) -> None:
        """Open (or create) the queue; ``check`` runs SQLite's quick integrity check."""
        self.path = Path(path)
        try:
            self.db = open_database(self.path, _SCHEMA)
            self.db.row_factory = sqlite3.Row
            add_missing_columns(self.db, "jobs", _ADDED_COLUMNS)  # queues of earlier releases
            if check:
                check_integrity(self.db)
        except sqlite3.DatabaseError as exc:
            raise StorageError(
                f"job queue {self.path} cannot be used ({exc}): check the disk and "
                "permissions; a damaged file can be moved aside to start an empty queue (the "
                "replay ledger is kept apart, in ledger.sqlite)"
            ) from exc

    def _reading(self) -> AbstractContextManager[None]:
        return database_errors(f"job queue {self.path}")

    def close(self) -> None:
        self.db.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self.db, f"job queue {self.path}")

    def add(self, queued: QueuedPayload) -> tuple[Job, bool]:
        """Queue a verified payload (its sequence number already in the ledger); (job,
        True), or (the existing job, False) for a copy."""
        stamp = queued.stamp
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE sha256 = ?", (queued.sha256,)).fetchone()
            if row is not None:
                return self._job(row), False
            cursor = db.execute(
                "INSERT INTO jobs (sha256, payload, source_name, task, images, classes,"
                " payload_bytes, state, received, intake_name, sender, sequence)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (
                    queued.sha256,
                    queued.payload,
                    queued.source_name,
                    queued.task,
                    queued.images,
                    queued.classes,
                    queued.payload_bytes,
                    time.time(),
                    queued.intake_name,
                    stamp and stamp.sender,
                    stamp and stamp.sequence,
                ),
            )
            return self._get(db, int(cursor.lastrowid)), True

    def signed_history(self) -> list[SenderSequence]:
        """Each sender's highest sequence number among the jobs (and in the ledger table
        that queues of earlier releases kept): for rebuilding a lost ledger."""
        with self._reading():
            rows = self.db.execute(
                "SELECT sender, MAX(sequence) AS sequence, '' AS sha256 FROM jobs"
                " WHERE sender IS NOT NULL GROUP BY sender"
            ).fetchall()
            history = [SenderSequence(*row) for row in rows]
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
            if "sender_sequences" in tables:
                rows = self.db.execute("SELECT sender, sequence, sha256 FROM sender_sequences")
                history += [SenderSequence(*row) for row in rows.fetchall()]
        return history

    def recover(self, alive: Callable[[str], bool], max_restarts: int) -> list[Job]:
        """Requeue running jobs whose owner died; fail those that keep crashing. Returns them."""
        changed = []
        with self._write() as db:
            for row in db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                job = self._job(row)
                if job.owner is not None and alive(job.owner):
                    continue
                stalled = job.progress_step <= job.claimed_at_step
                restarts = job.restarts + 1 if stalled else 0
                if restarts >= max_restarts:
                    error = (
                        f"the daemon died {restarts} times while running this job without it "
                        "training further; see the log, then `plada-receive retry`"
                    )
                    db.execute(
                        "UPDATE jobs SET state = 'failed', owner = NULL, restarts = ?,"
                        " finished = ?, error = ? WHERE id = ?",
                        (restarts, time.time(), error, job.id),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state = 'queued', owner = NULL, restarts = ? WHERE id = ?",
                        (restarts, job.id),
                    )
                changed.append(self._get(db, job.id))
        return changed

    def claim(self, owner: str) -> Job | None:
        """Take the oldest queued job for ``owner``, or None."""
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', owner = ?, claims = claims + 1,"
                " started = COALESCE(started, ?), claimed_at_step = progress_step WHERE id = ?",
                (owner, time.time(), row["id"]),
            )
            return self._get(db, row["id"])

    def progress(self, job_id: int, owner: str, step: int) -> None:
        """Record how far a running job has trained (the highest step reached)."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET progress_step = MAX(progress_step, ?) WHERE id = ? AND owner = ?",
                (step, job_id, owner),
            )

    def finish(self, job_id: int, owner: str, result_dir: str) -> None:
        self._close(job_id, owner, "done", result_dir=result_dir)

    def fail(self, job_id: int, owner: str, error: str) -> None:
        self._close(job_id, owner, "failed", error=error)

    def release(self, job_id: int, owner: str) -> None:
        """Put a job this daemon stopped on purpose back in the queue (not a crash)."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL WHERE id = ? AND owner = ?",
                (job_id, owner),
            )

    def retry(self, job_id: int) -> Job:
        """Queue a failed job again."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', restarts = 0, error = NULL, finished = NULL"
                " WHERE id = ? AND state = 'failed'",
                (job_id,),
            )
            return self._get(db, job_id)

    def _close(self, job_id: int, owner: str, state: str, **fields: object) -> None:
        names = ", ".join(f"{key} = ?" for key in fields)
        with self._write() as db:
            db.execute(
                f"UPDATE jobs SET state = ?, owner = NULL, finished = ?, {names}"
                " WHERE id = ? AND owner = ?",
                (state, time.time(), *fields.values(), job_id, owner),
            )

    def _get(self, db: sqlite3.Connection, job_id: int) -> Job:
        return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def _job(self, row: sqlite3.Row | None) -> Job:
        """The job a row holds; ``StorageError`` when the queue was changed under this
        daemon (the row gone, its columns not a job's)."""
        try:
            return Job(**dict(row))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise StorageError(
                f"job queue {self.path} was damaged while in use (a job row does not read: "
                f"{exc}); stop the daemon and move the file aside to start an empty queue "
                "(the replay ledger is kept apart, in ledger.sqlite)"
            ) from None

    def get(self, job_id: int) -> Job | None:
        with self._reading():
            row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._job(row)

    def find(self, sha256: str) -> Job | None:
        with self._reading():
            row = self.db.execute("SELECT * FROM jobs WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else self._job(row)

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        with self._reading():
            rows = self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        found = dict(rows)
        return {state: int(found.get(state, 0)) for state in STATES}

    def jobs(self, limit: int = 20) -> list[Job]:
        """The newest jobs, newest first."""
        with self._reading():
            rows = self.db.execute(
                "SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [self._job(row) for row in rows]
