"""The payload's data model: which reference images to keep and their hard labels, who
sent it, and the rules its content obeys whatever its bytes were
(:mod:`protocol.payload.codec` is the byte format)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from protocol.errors import InvalidSelectionError, MalformedHeaderError, ReferenceMismatchError
from protocol.manifest import BlockLayout, ReferenceManifest
from protocol.signing import is_valid_sender_id

MAX_CLASSES = 100_000
MAX_REFERENCE_SIZE = 1 << 40
MAX_SEQUENCE = (1 << 63) - 1
SelectionRecord = dict[str, str | int | float | None]  # how the sender chose (header.selection)


@dataclass(frozen=True)
class SenderStamp:
    """Who sent a payload, its place in the sender's sequence, and when it expires."""

    sender: str
    sequence: int
    expires: int  # Unix seconds
    audience: str | None = None  # the device id or group it is for (None: any receiver)

    def __post_init__(self) -> None:
        if not is_valid_sender_id(self.sender):
            raise MalformedHeaderError(f"invalid sender id {self.sender!r}")
        if self.audience is not None and not is_valid_sender_id(self.audience):
            raise MalformedHeaderError(f"invalid audience {self.audience!r}")
        if not 1 <= self.sequence <= MAX_SEQUENCE:
            raise MalformedHeaderError(f"sequence number {self.sequence} outside [1, 2^63)")
        if not 0 < self.expires <= MAX_SEQUENCE:
            raise MalformedHeaderError(f"expiry {self.expires} outside (0, 2^63)")


@dataclass(frozen=True)
class Payload:
    """The decoded content of a payload."""

    task: str
    reference_name: str
    reference_fingerprint: bytes
    reference_size: int
    class_names: tuple[str, ...]
    indices: np.ndarray  # int64, strictly increasing, < reference_size
    labels: np.ndarray  # int64, < len(class_names)
    selection: SelectionRecord = field(default_factory=dict)
    created: int = 0
    sender: SenderStamp | None = None  # signed payloads only
    key_id: bytes | None = None  # the key that signed it (set by the decoder)

    def __post_init__(self) -> None:
        object.__setattr__(self, "indices", np.asarray(self.indices, dtype=np.int64))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))
        check_content(self.indices, self.labels, self.reference_size, len(self.class_names))

    @property
    def count(self) -> int:
        return int(self.indices.size)

    def class_histogram(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def check_reference(self, manifest: ReferenceManifest) -> None:
        """Raise ``ReferenceMismatchError`` unless the payload was made for ``manifest``."""
        if self.reference_fingerprint != manifest.fingerprint or self.reference_size != len(
            manifest
        ):
            raise ReferenceMismatchError(
                mismatch_message(
                    self.reference_name,
                    self.reference_fingerprint,
                    self.reference_size,
                    manifest.layout(),
                )
            )


def check_content(indices: np.ndarray, labels: np.ndarray, n: int, k: int) -> None:
    if indices.ndim != 1 or labels.shape != indices.shape:
        raise InvalidSelectionError("indices and labels must be 1-D and of equal length")
    if indices.size == 0:
        raise InvalidSelectionError("a payload must keep at least one image")
    if not 2 <= k <= MAX_CLASSES:
        raise InvalidSelectionError(f"class count {k} outside [2, {MAX_CLASSES}]")
    if not 1 <= n <= MAX_REFERENCE_SIZE:
        raise InvalidSelectionError(f"reference size {n} outside [1, {MAX_REFERENCE_SIZE}]")
    if indices.size > n:
        raise InvalidSelectionError(f"{indices.size} kept images but the reference has {n}")
    if int(indices[0]) < 0 or int(indices[-1]) >= n:
        raise InvalidSelectionError(f"an index lies outside the reference set [0, {n})")
    if indices.size > 1 and not bool(np.all(np.diff(indices) > 0)):
        raise InvalidSelectionError("indices must be strictly increasing")
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise InvalidSelectionError(f"a label lies outside [0, {k})")


def mismatch_message(name: str, fingerprint: bytes, n: int, layout: BlockLayout) -> str:
    """Why a payload made for one reference set is refused by a device holding another."""
    return (
        f"payload was made for reference set {name!r} (fingerprint {fingerprint.hex()[:16]}..., "
        f"n={n}) but this device holds {layout.name!r} "
        f"(fingerprint {layout.fingerprint.hex()[:16]}..., n={layout.size}): "
        "sync the reference set, give its canonical manifest (--canonical) where this copy "
        "lacks files or is another release, or ask the sender to target this one"
    )
