"""Times as people and logs read them: ISO 8601 in UTC, durations as H:MM:SS."""

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


def duration_text(seconds: float | None) -> str:
    """``H:MM:SS`` of a duration in seconds (``?`` when unknown)."""
    if seconds is None or seconds != seconds:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
