"""Signing payloads on the ground station: key generation, sequence numbers, expiry.

Sequence numbers are per sender id and kept in ``<sender>.sequence`` beside the
key (shared by all of that sender's keys, so rotating a key never goes back).
The next number is ``max(last + 1, Unix time in milliseconds)``: strictly
increasing across runs, and still increasing if the counter file is lost and the
station is rebuilt. The file is replaced atomically under an exclusive lock
(``<sender>.sequence.lock``) and made durable before the number is used, so
concurrent runs never share one and a crash never loses the last value.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.atomic_files import write_text_atomic
from protocol.errors import ConfigError, SigningKeyError, StorageError
from protocol.payload import MAX_SEQUENCE, SenderStamp
from protocol.signing import PASSPHRASE_ENV, SigningKey, is_valid_sender_id

DEFAULT_LIFETIME = "7d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIFETIME_SECONDS = 10 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in ``30m``, ``12h``, ``7d`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 3600, 30m, 12h or 7d")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not 0 < seconds <= MAX_LIFETIME_SECONDS:
        raise ConfigError(f"duration {text!r} must be positive and at most 10 years")
    return seconds


def generate_key_files(sender: str, prefix: str | os.PathLike[str], encrypt: bool) -> SigningKey:
    """Create ``PREFIX.key`` (private, mode 0600) and ``PREFIX.pub`` (for receivers)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    passphrase = None
    if encrypt:
        passphrase = os.environ.get(PASSPHRASE_ENV, "").encode()
        if not passphrase:
            raise ConfigError(f"--encrypt reads the passphrase from {PASSPHRASE_ENV}: set it")
    key = SigningKey.generate(sender)
    private_path = prefix.with_name(prefix.name + ".key")
    key.save(private_path, passphrase)
    key.public.save(prefix.with_name(prefix.name + ".pub"))
    return key


def sequence_file_for(key_path: str | os.PathLike[str], sender: str) -> Path:
    """The default counter file: ``<sender>.sequence`` in the key's directory."""
    return Path(key_path).parent / f"{sender}.sequence"


def next_sequence(path: str | os.PathLike[str], clock: float | None = None) -> int:
    """Take the next sequence number from the counter file (created when absent)."""
    path = Path(path)
    now_ms = int((time.time() if clock is None else clock) * 1000)
    try:
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            text = path.read_text().strip() if path.exists() else ""
            try:
                last = int(text) if text else 0
            except ValueError as exc:
                raise SigningKeyError(
                    f"sequence counter {path} is damaged ({text[:40]!r}): restore it, or delete "
                    "it to continue from the current time"
                ) from exc
            value = max(last + 1, now_ms)
            if value > MAX_SEQUENCE:
                raise SigningKeyError(f"sequence counter {path} is exhausted")
            write_text_atomic(path, f"{value}\n", durable=True)
    except OSError as exc:
        raise StorageError(
            f"cannot update sequence counter {path}: {exc.strerror or exc}; free space or fix "
            "permissions (no payload was signed)"
        ) from exc
    return value


@dataclass(frozen=True)
class PayloadSigner:
    """A loaded signing key plus where its sequence numbers come from."""

    key: SigningKey
    sequence_file: Path
    lifetime_seconds: int
    audience: str | None = None  # the device id or group the payloads are for

    @classmethod
    def from_files(
        cls,
        key_path: str | os.PathLike[str],
        lifetime: str = DEFAULT_LIFETIME,
        sequence_file: str | os.PathLike[str] | None = None,
        audience: str | None = None,
    ) -> PayloadSigner:
        """The signer of a key file; ``audience`` (a device id or group) addresses every
        payload it signs (format v4) to those receivers only."""
        if audience is not None and not is_valid_sender_id(audience):
            raise ConfigError(
                f"invalid --audience {audience!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        key = SigningKey.load(key_path)
        counter = Path(sequence_file) if sequence_file else sequence_file_for(key_path, key.sender)
        return cls(key, counter, parse_duration(lifetime), audience)

    def stamp(self, created: int) -> SenderStamp:
        """The next stamp: a fresh sequence number, expiring ``lifetime`` after ``created``."""
        return SenderStamp(
            self.key.sender,
            next_sequence(self.sequence_file),
            created + self.lifetime_seconds,
            self.audience,
        )
