"""The receiver's trust store on disk: a directory of sender public key files.

Key files (``*.pub``) are written by ``plada-send keygen`` and installed with
``plada-receive trust add``. This module does the directory I/O and holds a receiver's
trust options; the policy itself is pure logic in :mod:`protocol.trust`, applied by
:mod:`receiver.acceptance`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import SigningKeyError
from protocol.signing import SenderKey
from protocol.trust import DEFAULT_MAX_CLOCK_AHEAD, DEFAULT_MAX_LIFETIME, TrustStore
from receiver.errors import TrustStoreError

KEY_SUFFIX = ".pub"


def load_trust_store(directory: str | os.PathLike[str]) -> TrustStore:
    """Every ``*.pub`` file of ``directory`` (an absent directory trusts nobody)."""
    directory = Path(directory)
    if not directory.exists():
        return TrustStore()
    if not directory.is_dir():
        raise TrustStoreError(f"trust store {directory} is not a directory")
    check_not_writable_by_others(directory, "trust store")
    keys = []
    for path in sorted(directory.glob(f"*{KEY_SUFFIX}")):
        check_not_writable_by_others(path, "trusted key")
        try:
            keys.append(SenderKey.load(path))
        except SigningKeyError as exc:
            raise TrustStoreError(
                f"trust store {directory}: {exc}; remove or replace {path.name}"
            ) from exc
    return TrustStore(keys)


def check_not_writable_by_others(path: Path, what: str) -> None:
    """``TrustStoreError`` if users other than the owner may change ``path``: whoever can
    write a trust store can make this device trust any key."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o022:
        raise TrustStoreError(
            f"{what} {path} is writable by group or others (mode {mode:o}): anyone among them "
            f"could install a key this device then trusts; run `chmod go-w {path}`"
        )


def add_key(directory: str | os.PathLike[str], key: SenderKey) -> Path:
    """Install ``key`` into the trust store ``directory``; returns the file written."""
    directory = Path(directory)
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    check_not_writable_by_others(directory, "trust store")
    path = directory / f"{key.sender}.{key.key_id.hex()}{KEY_SUFFIX}"
    key.save(path)
    return path


def remove_keys(directory: str | os.PathLike[str], selector: str) -> list[Path]:
    """Remove the keys whose sender id or key id (hex) is ``selector``."""
    removed = []
    for path in sorted(Path(directory).glob(f"*{KEY_SUFFIX}")):
        try:
            key = SenderKey.load(path)
        except SigningKeyError:
            continue
        if selector in (key.sender, key.key_id.hex()):
            path.unlink()
            removed.append(path)
    return removed


@dataclass(frozen=True)
class TrustOptions:
    """A receiver's freshness and audience rules, as its command line sets them, and the
    clock it judges expiry by (see :mod:`protocol.trust`)."""

    allow_unsigned: bool = False
    check_expiry: bool = True
    audiences: frozenset[str] = frozenset()  # this device's id and groups
    require_audience: bool = False
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    max_clock_ahead: float = DEFAULT_MAX_CLOCK_AHEAD
    clock: Callable[[], float] = time.time
