"""Typed errors of the protocol, shared by sender and receiver (each side keeps its own
in ``sender/errors.py`` and ``receiver/errors.py``).

Every error names the problem and, where one exists, the fix. Callers catch
``PladaError`` to handle any failure of the protocol layer without catching
programming errors.
"""

from __future__ import annotations


class PladaError(Exception):
    """Base class of every error plada raises on purpose."""


class PayloadError(PladaError):
    """A payload could not be accepted."""


class NotAPayloadError(PayloadError):
    """The bytes do not start with the plada magic."""


class UnsupportedVersionError(PayloadError):
    """The payload uses a format version this build cannot read."""


class TruncatedPayloadError(PayloadError):
    """The payload ends before its declared structure does."""


class PayloadLimitError(PayloadError):
    """A declared size or count exceeds a safety limit (e.g. a decompression bomb)."""


class CorruptPayloadError(PayloadError):
    """A section could not be decoded (bad compression frame, bad varint, trailing bytes)."""


class MalformedHeaderError(PayloadError):
    """The header is missing a field or a field has the wrong type or value."""


class InvalidSelectionError(PayloadError):
    """Kept indices or labels break a rule (range, order, count)."""


class DigestMismatchError(PayloadError):
    """The integrity digest does not match the decoded content."""


class ReferenceRequiredError(PayloadError):
    """The payload's body can only be decoded with the reference set's manifest."""


class FrameError(PayloadError):
    """A frame is damaged, foreign or inconsistent with its transfer; it is dropped."""


class FrameTagError(FrameError):
    """A frame's tag fails (forged, damaged or made with another link key), or it is
    tagged where the receiver has no link key, or untagged where it has one."""


class TransferError(FrameError):
    """A transfer's frames decoded to bytes that are not its payload: the transfer fails."""


class ReplyError(PladaError):
    """A reply from a device (or its key) is malformed, damaged or not MACed with the key
    given."""


class TrustError(PayloadError):
    """The payload's origin or freshness could not be established (signature, sender,
    sequence number, expiry)."""


class UnsignedPayloadError(TrustError):
    """The payload carries no signature and this receiver requires one."""


class UnknownSenderError(TrustError):
    """The payload names a sender that is not in the receiver's trust store."""


class WrongKeyError(TrustError):
    """The payload is signed by a key that is not one of its sender's trusted keys."""


class BadSignatureError(TrustError):
    """The signature does not verify: the signed bytes were altered or forged."""


class ExpiredPayloadError(TrustError):
    """The payload's expiry time has passed on the receiver's clock."""


class LifetimeError(TrustError):
    """The payload's lifetime or sequence number is beyond what the receiver's clock allows."""


class WrongAudienceError(TrustError):
    """The payload is addressed to another device or group."""


class ReplayError(TrustError):
    """The payload's sequence number was already accepted from its sender."""


class RollbackError(TrustError):
    """The payload's sequence number is older than one already accepted from its sender."""


class ReferenceMismatchError(PladaError):
    """The payload was made for a different reference set than the local one."""


class ReferenceSetError(PladaError):
    """The local reference set is missing, unreadable or inconsistent."""


class ManifestError(ReferenceSetError):
    """A reference manifest is malformed (unsorted, duplicate or bad keys)."""


class TaskDataError(PladaError):
    """A labeled task or holdout dataset is missing or malformed."""


class WeightsError(PladaError):
    """Model weights are missing or unreadable."""


class SigningKeyError(PladaError):
    """A signing key or sender public key file is missing, unreadable or malformed."""


class ConfigError(PladaError):
    """A command-line option or setting is invalid."""


class KeyFileError(ConfigError):
    """A shared key file (a link key, a reply key) cannot be read, is not a key, or is
    open to others."""


class StorageError(PladaError):
    """A file could not be written (disk full, permissions); nothing half-written is left."""


_UNSAFE_ADVICE = ("weights_only", "allow_pickle", "pickle", "trust the source")


def exception_summary(exc: BaseException, limit: int = 160) -> str:
    """A library's exception as a short clause for a one-line error: its type and the
    first sentence of its first line, never a sentence that advises an unsafe load
    (unpickling a file the library refused)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    safe = [line for line in lines if not any(word in line for word in _UNSAFE_ADVICE)]
    first = (safe or lines or [""])[0].split(". ")[0]
    if any(word in first for word in _UNSAFE_ADVICE):
        first = ""
    text = first if len(first) <= limit else first[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
