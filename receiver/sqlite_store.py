"""SQLite as the receiver keeps its durable state (job queue, sequence ledger).

WAL mode with ``synchronous=FULL``: a committed change survives a crash or power
cut, an uncommitted one is rolled back. Writers take the write lock first
(``BEGIN IMMEDIATE``), so a read-check-write inside one transaction cannot race.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from protocol.errors import StorageError


def open_database(path: Path, schema: str, timeout: float = 60.0) -> sqlite3.Connection:
    """Connect in autocommit mode (transactions are explicit), switch to WAL + FULL
    sync and create ``schema``; sqlite3 errors propagate for the caller to name."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


@contextmanager
def write_transaction(db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction, committed on success and rolled back on any
    exception; a locked, unwritable or full database is a ``StorageError`` naming ``what``."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        raise StorageError(f"{what} is locked or unwritable: {exc}") from exc
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    try:
        db.execute("COMMIT")
    except sqlite3.OperationalError as exc:  # e.g. disk full: nothing was changed
        db.execute("ROLLBACK")
        raise StorageError(f"{what}: cannot commit ({exc}); free space") from exc
