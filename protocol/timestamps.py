"""Times as people and logs read them: ISO 8601 in UTC."""

from __future__ import annotations

import time
from datetime import datetime, timezone


def utc_text(seconds: float | None = None, timespec: str = "seconds") -> str:
    """ISO 8601 UTC time of Unix ``seconds`` (default: now); the number itself when it
    lies past year 9999 (a forged expiry, say)."""
    if seconds is None:
        seconds = time.time()
    try:
        return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec=timespec)
    except (OverflowError, ValueError, OSError):
        return f"Unix time {int(seconds)}"
