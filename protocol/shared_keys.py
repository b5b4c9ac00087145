"""Shared secret keys (a device's reply key, a link's frame key): 32 random bytes,
written as 64 hex digits in a file of their own."""

from __future__ import annotations

import secrets
from pathlib import Path

from protocol.errors import KeyFileError

KEY_BYTES = 32


def new_shared_key() -> bytes:
    """A fresh random key."""
    return secrets.token_bytes(KEY_BYTES)


def key_text(key: bytes) -> str:
    """A key as its file holds it."""
    return key.hex() + "\n"


def parse_shared_key(text: str) -> bytes | None:
    """The key written as ``text`` (a key file's content), or None when it is not one."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        return None
    return key if len(key) == KEY_BYTES else None


def read_key_file(path: str | Path, what: str, fix: str, private: bool = True) -> bytes:
    """The key in the file ``path``; ``KeyFileError`` naming ``what`` it should hold and
    ``fix``, when it cannot be read, is not a key or (``private``) is open to others."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not text"
        raise KeyFileError(f"cannot read the {what} {path}: {reason}; {fix}") from None
    if private and mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is readable or writable by others, who could forge with it: "
            f"run `chmod 600 {path}`"
        )
    key = parse_shared_key(text)
    if key is None:
        raise KeyFileError(
            f"{path} is not a {what} ({KEY_BYTES} bytes written as {2 * KEY_BYTES} hex "
            f"digits); {fix}"
        )
    return key


def read_link_key_file(path: str | Path) -> bytes:
    """A link's frame key (``plada-send link-key``), the same file on the ground station
    and on every device that listens to its frames."""
    fix = (
        "make one with `plada-send link-key --out FILE` and give the sender and each device a copy"
    )
    return read_key_file(path, "link key", fix)
