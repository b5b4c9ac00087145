"""File and member names from outside: shown as text, refused as keys when odd."""

from __future__ import annotations

import os


def printable_name(name: str) -> str:
    """A file name as valid text: bytes that are not UTF-8 (which Python keeps as lone
    surrogates) become ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def unusable_name(name: str) -> bool:
    """Whether a file or member name cannot be a manifest key: not valid UTF-8, or
    holding a newline."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return "\n" in name
