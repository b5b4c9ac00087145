"""The receiver's trust store on disk: a directory of sender public key files.

Key files (``*.pub``) are written by ``plada-send keygen`` and installed with
``plada-receive trust add``. This module does the directory I/O and builds the
:class:`~protocol.trust.TrustPolicy` that the payload decoder applies; the
policy itself is pure logic in :mod:`protocol.trust`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import SigningKeyError, TrustStoreError
from protocol.signing import SenderKey
from protocol.trust import (
    DEFAULT_MAX_CLOCK_AHEAD,
    DEFAULT_MAX_LIFETIME,
    TrustPolicy,
    TrustStore,
)

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
    """A receiver's freshness and audience rules, as its command line sets them."""

    allow_unsigned: bool = False
    check_expiry: bool = True
    audiences: frozenset[str] = frozenset()  # this device's id and groups
    require_audience: bool = False
    max_lifetime: float = DEFAULT_MAX_LIFETIME
    max_clock_ahead: float = DEFAULT_MAX_CLOCK_AHEAD


def build_trust_policy(
    trust_dir: str | os.PathLike[str] | None,
    options: TrustOptions,
    last_sequence: Callable[[str], int | None] | None,
) -> TrustPolicy:
    """The policy of a receiver whose trusted keys are in ``trust_dir`` (None: nobody).

    ``last_sequence`` gives the last sequence number accepted from each sender (the
    ledger's); None leaves replay checks to the caller.
    """
    store = load_trust_store(trust_dir) if trust_dir is not None else TrustStore()
    return TrustPolicy(
        store,
        options.allow_unsigned,
        options.check_expiry,
        last_sequence=last_sequence,
        audiences=options.audiences,
        require_audience=options.require_audience,
        max_lifetime=options.max_lifetime,
        max_clock_ahead=options.max_clock_ahead,
    )
