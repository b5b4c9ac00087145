"""The sequence ledger: the last sequence number accepted from each sender.

It is a SQLite database of its own (``HOME/ledger.sqlite`` for the daemon,
``<trust dir>/ledger.sqlite`` for ``plada-receive train``), apart from the job
queue, so that a damaged queue can be moved aside without losing replay
protection. After every change it also writes a durable JSON backup beside it
(``ledger.backup.json``); a daemon that finds its ledger missing rebuilds it from
that backup and from the signed jobs of its queue, and refuses to start with an
empty ledger over a home that has a history, unless told to.

Recording refuses a sequence number that is not newer than the last one
(``ReplayError`` / ``RollbackError``), inside the writing transaction, so two
processes can never both accept one. It also remembers the digest of every
payload it accepted (and the intake file it came from): a payload accepted on
this device may be trained again without counting as a replay, and a daemon that
died between recording a payload and queueing it finishes the job on restart.
The ledger guards the freshness of *acceptance*, not how often the device trains.

``sqlite3.DatabaseError`` (a damaged file, a full disk) becomes ``StorageError``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from protocol.atomic_files import write_json_atomic
from protocol.errors import StorageError
from protocol.timestamps import utc_text
from protocol.trust import check_sequence
from receiver.errors import TrustStoreError
from receiver.sqlite_store import (
    add_missing_columns,
    check_integrity,
    database_errors,
    open_database,
    write_transaction,
)

log = logging.getLogger("plada.receiver")
LEDGER_FILE = "ledger.sqlite"
BACKUP_FORMAT = "plada-ledger-backup-v1"
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
    accepted TEXT NOT NULL,
    intake_name TEXT
);
"""
_ADDED_COLUMNS = {"intake_name": "TEXT"}
T = TypeVar("T")


@dataclass(frozen=True)
class SenderSequence:
    """A sender's last accepted sequence number, the payload that carried it and when."""

    sender: str
    sequence: int
    sha256: str = ""
    accepted: str = ""


def last_sequence(db: sqlite3.Connection, sender: str) -> int | None:
    """The last sequence number accepted from ``sender`` (None: none yet)."""
    row = db.execute("SELECT sequence FROM sender_sequences WHERE sender = ?", (sender,)).fetchone()
    return None if row is None else int(row[0])


def sender_sequences(db: sqlite3.Connection) -> list[SenderSequence]:
    """Every sender's last accepted sequence number, for status reports."""
    rows = db.execute("SELECT sender, sequence, sha256, accepted FROM sender_sequences ORDER BY 1")
    return [SenderSequence(*row) for row in rows.fetchall()]


def backup_path(path: Path) -> Path:
    """Where the JSON backup of the ledger at ``path`` lives."""
    return path.with_name(path.stem + ".backup.json")


def read_backup(path: Path) -> list[SenderSequence]:
    """The senders' sequences in the backup of the ledger at ``path`` (none if absent)."""
    backup = backup_path(path)
    if not backup.is_file():
        return []
    try:
        data = json.loads(backup.read_text())
        if data.get("format") != BACKUP_FORMAT:
            raise ValueError(f"not a {BACKUP_FORMAT} file")
        return [SenderSequence(**row) for row in data["senders"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(
            f"ledger backup {backup} is unreadable ({exc}): restore it, or remove it if the "
            "ledger itself is intact"
        ) from exc


class SequenceLedger:
    """A ledger file; each method is one transaction.

    ``read_only`` (``verify``) never creates or changes anything: a missing file is
    an empty history."""

    def __init__(self, path: str | Path, read_only: bool = False, check: bool = False) -> None:
        self.path = Path(path)
        self.db: sqlite3.Connection | None = None
        self.created = not self.path.exists()
        try:
            if not read_only:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = open_database(self.path, LEDGER_SCHEMA, timeout=30.0)
                # ledgers of earlier releases
                add_missing_columns(self.db, "accepted_payloads", _ADDED_COLUMNS)
                if check:
                    check_integrity(self.db)
            elif self.path.is_file():
                # with no write-ahead log beside it (no writer, none crashed) the file is
                # read as immutable: SQLite then creates no -wal/-shm files either
                quiet = not self.path.with_name(self.path.name + "-wal").exists()
                uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("&immutable=1" if quiet else "")
                self.db = sqlite3.connect(uri, uri=True, timeout=30.0)
                self.db.execute("SELECT 1 FROM sender_sequences LIMIT 1").fetchall()
        except (OSError, sqlite3.Error) as exc:
            raise TrustStoreError(
                f"sequence ledger {self.path} cannot be used ({exc}): check the disk; a damaged "
                f"file can be moved aside, and a daemon rebuilds it from "
                f"{backup_path(self.path).name} and its job queue"
            ) from exc

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with database_errors(f"sequence ledger {self.path}"):
            yield

    def _read(self, query: Callable[[sqlite3.Connection], T], empty: T) -> T:
        if self.db is None:
            return empty
        with self._reading():
            return query(self.db)

    def last(self, sender: str) -> int | None:
        """The last sequence number accepted from ``sender``."""
        return self._read(lambda db: last_sequence(db, sender), None)

    def senders(self) -> list[SenderSequence]:
        """Every sender's last accepted sequence number."""
        return self._read(sender_sequences, [])

    def was_accepted(self, sha256: str) -> bool:
        """Whether this device accepted the payload with this SHA-256 before."""
        return self.intake_name_of(sha256) is not False

    def intake_name_of(self, sha256: str) -> str | bool | None:
        """The intake file the payload with this SHA-256 was accepted from (None: not
        through intake), or False if it was never accepted."""

        def query(db: sqlite3.Connection) -> str | bool | None:
            try:
                row = db.execute(
                    "SELECT intake_name FROM accepted_payloads WHERE sha256 = ?", (sha256,)
                ).fetchone()
            except sqlite3.OperationalError:  # a read-only ledger of an earlier release
                row = db.execute(
                    "SELECT NULL FROM sender_sequences WHERE sha256 = ?", (sha256,)
                ).fetchone()
            return False if row is None else row[0]

        return self._read(query, False)

    def record(
        self, sender: str, sequence: int, sha256: str, intake_name: str | None = None
    ) -> None:
        """Accept ``sequence`` durably, or raise ``ReplayError`` / ``RollbackError``."""
        db = self._writable()
        with write_transaction(db, f"sequence ledger {self.path}"):
            check_sequence(sender, sequence, last_sequence(db, sender))
            self._set(db, sender, sequence, sha256)
            db.execute(
                "INSERT OR IGNORE INTO accepted_payloads (sha256, sender, sequence, accepted,"
                " intake_name) VALUES (?, ?, ?, ?, ?)",
                (sha256, sender, sequence, utc_text(), intake_name),
            )
        self.write_backup()

    def restore(self, rows: list[SenderSequence]) -> int:
        """Raise senders' last sequences to those of ``rows`` (a backup, a queue's jobs);
        returns how many senders changed. Never lowers one."""
        db = self._writable()
        changed = 0
        with write_transaction(db, f"sequence ledger {self.path}"):
            for row in rows:
                last = last_sequence(db, row.sender)
                if last is None or int(row.sequence) > last:
                    self._set(db, row.sender, int(row.sequence), str(row.sha256))
                    changed += 1
        if changed:
            self.write_backup()
        return changed

    def reset(self, sender: str) -> int | None:
        """Forget ``sender``'s last sequence number (the operator's way out of a lockout);
        returns the number forgotten (None: there was none)."""
        db = self._writable()
        with write_transaction(db, f"sequence ledger {self.path}"):
            last = last_sequence(db, sender)
            db.execute("DELETE FROM sender_sequences WHERE sender = ?", (sender,))
        self.write_backup()
        return last

    def write_backup(self) -> None:
        """Write the JSON backup of every sender's last sequence, durably."""
        senders = [asdict(row) for row in self.senders()]
        document = {"format": BACKUP_FORMAT, "written": utc_text(), "senders": senders}
        write_json_atomic(backup_path(self.path), document, durable=True)

    def _writable(self) -> sqlite3.Connection:
        if self.db is None:
            raise TrustStoreError(f"sequence ledger {self.path} was opened read-only")
        return self.db

    @staticmethod
    def _set(db: sqlite3.Connection, sender: str, sequence: int, sha256: str) -> None:
        db.execute(
            "INSERT INTO sender_sequences (sender, sequence, sha256, accepted) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(sender) DO UPDATE SET sequence = excluded.sequence, "
            "sha256 = excluded.sha256, accepted = excluded.accepted",
            (sender, sequence, sha256, utc_text()),
        )

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def open_home_ledger(
    home: Path, history: list[SenderSequence], has_history: bool, accept_empty: bool = False
) -> SequenceLedger:
    """The daemon's ledger ``HOME/ledger.sqlite``, integrity-checked.

    A ledger that is missing is rebuilt from its backup and ``history`` (each
    sender's highest sequence among the queue's signed jobs). If neither holds
    anything but the home ``has_history`` (spooled payloads, results), starting
    would forget which payloads were accepted: refused (``StorageError``), unless
    ``accept_empty``.
    """
    path = Path(home) / LEDGER_FILE
    ledger = SequenceLedger(path, check=True)
    if not ledger.created:
        if not backup_path(path).is_file():
            ledger.write_backup()
        return ledger
    rows = read_backup(path) + history
    if rows:
        restored = ledger.restore(rows)
        log.warning(
            f"sequence ledger {path} was missing: rebuilt for {restored} sender(s) from its "
            "backup and the job queue",
            extra={"event": "ledger-rebuilt", "senders": restored},
        )
        return ledger
    if has_history and not accept_empty:
        ledger.close()
        for leftover in (
            path,
            path.with_name(path.name + "-wal"),
            path.with_name(path.name + "-shm"),
        ):
            leftover.unlink(missing_ok=True)
        raise StorageError(
            f"sequence ledger {path} is missing, and neither {backup_path(path).name} nor the "
            f"job queue can rebuild it, but {home} has received payloads before: starting "
            "would accept old payloads again; restore the ledger or its backup, or start once "
            "with --accept-empty-ledger if that is what you want"
        )
    ledger.write_backup()
    return ledger
