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

Sanity limits, so that one signed but careless (or stolen-key) payload cannot lock a
sender out for good: senders number payloads with at least the milliseconds since
1970 (``plada-send``'s counter), so with a trusted clock a sequence number more than
``max_clock_ahead`` past the receiver's clock is refused, and so is a lifetime
(expiry minus now) above ``max_lifetime``. ``plada-receive trust reset-sequence``
is the operator's way out of a lockout that happened anyway.

Audience: a payload may be addressed to one device id or device group (format v4);
a receiver accepts it only if that is its own id or one of its groups. Payloads
without an audience are for any receiver that trusts the sender, unless the policy
requires one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from protocol.errors import (
    BadSignatureError,
    ExpiredPayloadError,
    LifetimeError,
    ReplayError,
    RollbackError,
    UnknownSenderError,
    UnsignedPayloadError,
    WrongAudienceError,
    WrongKeyError,
)
from protocol.signing import SenderKey
from protocol.timestamps import utc_text

DEFAULT_MAX_LIFETIME = 400 * 86400.0
DEFAULT_MAX_CLOCK_AHEAD = 86400.0


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
    audiences: frozenset[str] = frozenset()  # this device's id and groups
    require_audience: bool = False
    max_lifetime: float = DEFAULT_MAX_LIFETIME  # seconds from now to expiry
    max_clock_ahead: float = DEFAULT_MAX_CLOCK_AHEAD  # seconds a sequence may lead the clock

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

    def check_audience(self, sender: str, audience: str | None) -> None:
        """Refuse a payload addressed to another device or group (or to none, when this
        receiver requires an audience)."""
        if audience is None:
            if self.require_audience:
                raise WrongAudienceError(
                    f"payload from {sender!r} names no audience and this receiver requires "
                    "one: ask the sender to address it (plada-send select --audience ID)"
                )
            return
        if audience not in self.audiences:
            mine = ", ".join(sorted(self.audiences)) or "none set"
            raise WrongAudienceError(
                f"payload from {sender!r} is addressed to {audience!r}, not to this device "
                f"(its id and groups: {mine}): refused; if this device should take it, start "
                "the receiver with --device-id or --group naming it"
            )

    def check_freshness(self, sender: str, sequence: int, expires: int) -> None:
        """Refuse an expired payload, a replayed one and a rolled-back one; with a trusted
        clock also a lifetime over ``max_lifetime`` and a sequence number too far ahead."""
        if self.check_expiry:
            now = self.clock()
            if now >= expires:
                raise ExpiredPayloadError(
                    f"payload expired at {utc_text(expires)} (receiver clock: {utc_text(now)}): "
                    "ask the sender for a fresh one; if this device's clock is wrong, fix it, "
                    "or run without a trusted clock using --no-expiry-check"
                )
            if expires - now > self.max_lifetime:
                raise LifetimeError(
                    f"payload from {sender!r} expires {(expires - now) / 86400:.3g} days from "
                    f"now, over this receiver's limit of {self.max_lifetime / 86400:.3g} days: "
                    "refused; ask the sender for one with a shorter --expires-in"
                )
            ahead = sequence / 1000 - now
            if ahead > self.max_clock_ahead:
                raise LifetimeError(
                    f"payload from {sender!r} has sequence number {sequence}, "
                    f"{ahead / 86400:.3g} days ahead of this device's clock (limit "
                    f"{self.max_clock_ahead / 86400:.3g}): refused, since accepting it would "
                    "lock the sender out; fix the sender's sequence counter or this clock"
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
        "order): to send this task again, the sender selects it again (`plada-send select` "
        "on its work directory signs it with a newer sequence number)"
    )
