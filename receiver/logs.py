"""Structured logs: JSON lines to a rotating file, one readable line per event on stderr.

Every record carries ``event`` (a stable name such as ``payload-queued``) and its
fields; the file is what monitoring parses, stderr is what journald shows.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from datetime import datetime
from pathlib import Path

from protocol.timestamps import utc_text

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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


def one_line(text: str) -> str:
    """``text`` with control characters (a newline or escape in a file name someone
    dropped into an inbox) written as escapes, so that it cannot forge another line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class ReadableFormatter(logging.Formatter):
    """``time level message`` for terminals and journald, one line per record (a
    traceback follows on its own lines)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        line = f"{stamp} {record.levelname.lower():7s} {one_line(record.getMessage())}"
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
