"""The sequence ledger: the last sequence number accepted from each sender.

It lives in a SQLite database: the daemon keeps it in its queue database, so a
payload's acceptance and its job are one transaction; ``plada-receive train``
keeps it in ``<trust dir>/ledger.sqlite``. Recording refuses a sequence number
that is not newer than the last one (``ReplayError`` / ``RollbackError``), inside
the writing transaction, so two processes can never both accept one.

It also remembers the digest of every payload it accepted: a payload accepted on
this device may be trained again (other seeds, another model, a failed run
retried) without counting as a replay. The ledger guards the freshness of
*acceptance*, not how often the device trains.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from protocol.errors import TrustStoreError
from protocol.timestamps import utc_text
from protocol.trust import check_sequence
from receiver.sqlite_store import open_database, write_transaction

LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS sender_sequences (
    sender TEXT PRIMARY KEY,
    sequence INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    accepted TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accepted_payloads (
    sha256 TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    accepted TEXT NOT NULL
);
"""


def last_sequence(db: sqlite3.Connection, sender: str) -> int | None:
    """The last sequence number accepted from ``sender`` (None: none yet)."""
    row = db.execute("SELECT sequence FROM sender_sequences WHERE sender = ?", (sender,)).fetchone()
    return None if row is None else int(row[0])


def record_sequence(db: sqlite3.Connection, sender: str, sequence: int, sha256: str) -> None:
    """Accept ``sequence`` from ``sender``; call inside a write transaction."""
    check_sequence(sender, sequence, last_sequence(db, sender))
    db.execute(
        "INSERT INTO sender_sequences (sender, sequence, sha256, accepted) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(sender) DO UPDATE SET sequence = excluded.sequence, "
        "sha256 = excluded.sha256, accepted = excluded.accepted",
        (sender, sequence, sha256, utc_text()),
    )
    db.execute(
        "INSERT OR IGNORE INTO accepted_payloads (sha256, sender, sequence, accepted) "
        "VALUES (?, ?, ?, ?)",
        (sha256, sender, sequence, utc_text()),
    )


def was_accepted(db: sqlite3.Connection, sha256: str) -> bool:
    """Whether the payload with this SHA-256 was accepted here before."""
    try:
        row = db.execute("SELECT 1 FROM accepted_payloads WHERE sha256 = ?", (sha256,)).fetchone()
    except sqlite3.OperationalError:  # a ledger from before digests were kept
        row = db.execute("SELECT 1 FROM sender_sequences WHERE sha256 = ?", (sha256,)).fetchone()
    return row is not None


def sender_sequences(db: sqlite3.Connection) -> list[dict[str, object]]:
    """Every sender's last accepted sequence number, for status reports."""
    rows = db.execute("SELECT sender, sequence, sha256, accepted FROM sender_sequences ORDER BY 1")
    return [
        {"sender": s, "sequence": q, "sha256": h, "accepted": a} for s, q, h, a in rows.fetchall()
    ]


class SequenceLedger:
    """A standalone ledger file (for ``plada-receive train`` and ``verify``).

    ``read_only`` (``verify``) never creates or changes anything: a missing file is
    an empty history."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.db: sqlite3.Connection | None = None
        try:
            if not read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = open_database(self.path, LEDGER_SCHEMA, timeout=30.0)
            elif self.path.is_file():
                # with no write-ahead log beside it (no writer, none crashed) the file is
                # read as immutable: SQLite then creates no -wal/-shm files either
                quiet = not self.path.with_name(self.path.name + "-wal").exists()
                uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if quiet else "")
                self.db = sqlite3.connect(uri, uri=True, timeout=30.0)
                self.db.execute("SELECT 1 FROM sender_sequences LIMIT 1").fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise TrustStoreError(f"cannot open sequence ledger {self.path}: {exc}") from exc

    def last(self, sender: str) -> int | None:
        return None if self.db is None else last_sequence(self.db, sender)

    def was_accepted(self, sha256: str) -> bool:
        """Whether this device accepted the payload with this SHA-256 before."""
        return self.db is not None and was_accepted(self.db, sha256)

    def record(self, sender: str, sequence: int, sha256: str) -> None:
        """Accept ``sequence`` durably, or raise ``ReplayError`` / ``RollbackError``."""
        if self.db is None:
            raise TrustStoreError(f"sequence ledger {self.path} was opened read-only")
        with write_transaction(self.db, f"sequence ledger {self.path}"):
            record_sequence(self.db, sender, sequence, sha256)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
