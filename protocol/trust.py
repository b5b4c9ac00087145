"""A receiver's trust: which senders' keys it accepts, and how fresh a payload must be.

A :class:`TrustStore` holds the trusted sender keys; a :class:`TrustPolicy`
combines it with the freshness rules the payload decoder applies right after the
signature: expiry against the receiver's clock, and the last sequence number
accepted from each sender (replay and rollback). This module is pure policy, as
python-tuf keeps I/O out of its trusted set: reading keys from a directory is the
receiver's job (:mod:`receiver.trust_store`).

Clock: expiry is compared with ``time.time()``, the system's real-time clock
(UTC seconds). On a device that keeps it with NTP, GNSS or a battery-backed RTC
that is the right source; a device with no trusted clock disables the check
(``check_expiry=False``, ``--no-expiry-check``) and relies on sequence numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from protocol.errors import (
    BadSignatureError,
    ExpiredPayloadError,
    ReplayError,
    RollbackError,
    UnknownSenderError,
    UnsignedPayloadError,
    WrongKeyError,
)
from protocol.signing import SenderKey
from protocol.timestamps import utc_text


class TrustStore:
    """Trusted sender keys, by sender id and key id."""

    def __init__(self, keys: Iterable[SenderKey] = ()) -> None:
        self._keys: dict[str, dict[bytes, SenderKey]] = {}
        for key in keys:
            self._keys.setdefault(key.sender, {})[key.key_id] = key

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._keys.values())

    def senders(self) -> list[str]:
        return sorted(self._keys)

    def __iter__(self) -> Iterator[SenderKey]:
        return (key for sender in self.senders() for key in self._keys[sender].values())

    def keys_of(self, sender: str) -> list[SenderKey]:
        return list(self._keys.get(sender, {}).values())

    def find(self, sender: str, key_id: bytes) -> SenderKey:
        """The trusted key ``key_id`` of ``sender``; ``UnknownSenderError`` or
        ``WrongKeyError`` naming the fix otherwise."""
        keys = self._keys.get(sender)
        if not keys:
            known = ", ".join(self.senders()) or "none"
            raise UnknownSenderError(
                f"payload is from sender {sender!r}, which this receiver does not trust "
                f"(trusted senders: {known}): install its public key with "
                "`plada-receive trust add SENDER.pub --trust DIR` (a daemon: --home HOME) "
                "if it is genuine"
            )
        key = keys.get(key_id)
        if key is None:
            trusted = ", ".join(k.hex() for k in keys)
            raise WrongKeyError(
                f"payload from {sender!r} is signed by key {key_id.hex()}, which is not one "
                f"of its trusted keys ({trusted}): refused; if the sender rotated its key, "
                "install the new public key"
            )
        return key


@dataclass(frozen=True)
class TrustPolicy:
    """What a receiver requires of a payload before it decompresses anything.

    ``last_sequence(sender)`` gives the last sequence number accepted from a sender
    (``None``: none yet); without it replays are not checked here (the caller
    records and checks acceptance itself, e.g. in the daemon's queue).
    """

    store: TrustStore = field(default_factory=TrustStore)
    allow_unsigned: bool = False
    check_expiry: bool = True
    clock: Callable[[], float] = time.time
    last_sequence: Callable[[str], int | None] | None = None

    def without_freshness(self) -> TrustPolicy:
        """The same keys and unsigned rule, without expiry and sequence checks: for a
        payload accepted earlier (spooled, or a job being resumed)."""
        return replace(self, check_expiry=False, last_sequence=None)

    def check_unsigned(self, version: int) -> None:
        """Refuse a payload of an unsigned format version unless development mode allows it."""
        if not self.allow_unsigned:
            raise UnsignedPayloadError(
                f"payload is unsigned (format version {version}) and this receiver requires "
                "signed payloads: ask the sender to sign it (plada-send select --signing-key), "
                "or allow unsigned payloads for development only (--allow-unsigned)"
            )

    def check_signature(
        self, sender: str, key_id: bytes, signature: bytes, signed: bytes
    ) -> SenderKey:
        """The sender's trusted key, after checking its signature over ``signed``."""
        key = self.store.find(sender, key_id)
        if not key.verifies(signature, signed):
            raise BadSignatureError(
                f"signature of sender {sender!r} (key {key_id.hex()}) does not verify: the "
                "payload was altered in transit or forged; refused (ask for a fresh copy)"
            )
        return key

    def check_freshness(self, sender: str, sequence: int, expires: int) -> None:
        """Refuse an expired payload, a replayed one and a rolled-back one."""
        if self.check_expiry:
            now = self.clock()
            if now >= expires:
                raise ExpiredPayloadError(
                    f"payload expired at {utc_text(expires)} (receiver clock: {utc_text(now)}): "
                    "ask the sender for a fresh one; if this device's clock is wrong, fix it, "
                    "or run without a trusted clock using --no-expiry-check"
                )
        if self.last_sequence is None:
            return
        check_sequence(sender, sequence, self.last_sequence(sender))


def check_sequence(sender: str, sequence: int, last: int | None) -> None:
    """``ReplayError`` / ``RollbackError`` unless ``sequence`` is newer than ``last``."""
    if last is None or sequence > last:
        return
    if sequence == last:
        raise ReplayError(
            f"payload {sequence} from sender {sender!r} was already accepted: a replay; refused"
        )
    raise RollbackError(
        f"payload {sequence} from sender {sender!r} is older than payload {last}, already "
        "accepted: a rollback; refused (payloads from one sender are accepted in sequence "
        "order; the sender re-signs an old task to send it again)"
    )
