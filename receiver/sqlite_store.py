"""SQLite as the receiver keeps its durable state (job queue, sequence ledger).

WAL mode with ``synchronous=FULL``: a committed change survives a crash or power
cut, an uncommitted one is rolled back. Writers take the write lock first
(``BEGIN IMMEDIATE``), so a read-check-write inside one transaction cannot race.
"""

from __future__ import annotations

import contextlib
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
def database_errors(what: str) -> Iterator[None]:
    """Turn any ``sqlite3.DatabaseError`` (a damaged page, a full disk, a locked file)
    into a ``StorageError`` naming ``what``: a local fault, never the input's."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{what}: {exc}; check the disk (the file may be damaged)") from exc


def add_missing_columns(db: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Add the ``columns`` (name: SQL type) that ``table`` lacks (files of earlier
    releases). They are looked for again under the write lock, so two processes opening
    one old file at once add each column once."""

    def missing() -> list[str]:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        return [name for name in columns if name not in present]

    if not missing():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for name in missing():
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {columns[name]}")
    except BaseException:
        with contextlib.suppress(sqlite3.DatabaseError):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def check_integrity(db: sqlite3.Connection) -> None:
    """``PRAGMA quick_check``; raises ``sqlite3.DatabaseError`` unless the file is sound."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    if problems != ["ok"]:
        raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(problems[:3]))


@contextmanager
def write_transaction(db: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction, committed on success and rolled back on any
    exception; a locked, unwritable, full or damaged database is a ``StorageError``
    naming ``what``."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{what} is locked or unwritable: {exc}") from exc
    try:
        with database_errors(what):
            yield db
    except BaseException:
        with contextlib.suppress(sqlite3.DatabaseError):
            db.execute("ROLLBACK")
        raise
    try:
        db.execute("COMMIT")
    except sqlite3.DatabaseError as exc:  # e.g. disk full: nothing was changed
        with contextlib.suppress(sqlite3.DatabaseError):
            db.execute("ROLLBACK")
        raise StorageError(f"{what}: cannot commit ({exc}); free space") from exc
