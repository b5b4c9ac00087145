"""Structured logs: JSON lines to a rotating file, one readable line per event on stderr.

Every record carries ``event`` (a stable name such as ``payload-queued``) and its
fields; the file is what monitoring parses, stderr is what journald shows.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import datetime
from pathlib import Path

from protocol.timestamps import utc_text

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, event, message and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": utc_text(record.created, timespec="milliseconds"),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            **_fields(record),
        }
        entry.setdefault("event", "log")
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ReadableFormatter(logging.Formatter):
    """``time level message`` for terminals and journald."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname.lower():7s} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(log_file: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 3) -> None:
    """Send ``plada.*`` records to ``log_file`` (JSON lines, rotated) and to stderr."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("plada")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    to_file = logging.handlers.RotatingFileHandler(
        log_file, maxBytes=max_bytes, backupCount=backups
    )
    to_file.setFormatter(JsonLinesFormatter())
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(ReadableFormatter())
    logger.addHandler(to_file)
    logger.addHandler(to_stderr)
    logger.propagate = False
