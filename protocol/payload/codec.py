"""The payload byte format: envelope, header schema, bodies, digest and signature.

Layout (all integers little-endian; see ``protocol/FORMAT.md``)::

    magic   8 bytes   89 50 4C 44 0D 0A 1A 0A   ("\\x89PLD\\r\\n\\x1a\\n")
    version 1 byte    4: signed, for one audience; 3: signed; 2: unsigned (1 is still read)
    [versions 3 and 4: the signed envelope]
    algorithm 1 byte  1 = Ed25519
    key id  8 bytes   which of the sender's keys signed
    slen    u8        length of the sender id, then the sender id (ASCII)
    [version 4 only]
    alen    u8        length of the audience, then the audience (ASCII, the rule of a
                      sender id): the device id or device group the payload is for
    sequence u64      the sender's sequence number (replay and rollback protection)
    expires  u64      Unix seconds after which the payload is refused
    hlen    u32       length of the header
    header  hlen      msgpack map (task, created, reference, classes, count, selection, body)
    blen    u32       length of the body
    body    blen      coded as header.body.coding says:
                      "delta-varint/zstd": one zstd frame of varints (index gaps, labels);
                      "blocks/rans": the block-aware rANS code of ``protocol/block_code.py``
    digest  32 bytes  SHA-256 over "plada-payload-v<version>", the bytes from magic to the
                      end of the header, and the decoded content (indices u64, labels u32)
    [versions 3 and 4]
    signature 64 bytes  Ed25519 over "plada-signed-payload-v3\\n" + every byte before it

The encoder tries every coding available for the selection and keeps the
smallest. ``blocks/rans`` with ``blocks = "reference"`` follows the reference
set's folder boundaries, so decoding it needs the receiver's manifest (whose
fingerprint must match the header's). Decoding trusts nothing: every length is
bounded before anything is allocated, msgpack runs with explicit limits, and
every rule of the content is checked.

A receiver decodes with a :class:`~protocol.trust.TrustPolicy`: the raw size cap,
then the framing lengths, then the signature over the raw bytes (and expiry,
replay, rollback), and only then the header, the decompression (capped), the
structural checks, the reference fingerprint and the content digest.
"""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgpack
import numpy as np
import zstandard

from protocol import block_code
from protocol.errors import (
    CorruptPayloadError,
    DigestMismatchError,
    InvalidSelectionError,
    MalformedHeaderError,
    NotAPayloadError,
    PayloadLimitError,
    ReferenceMismatchError,
    ReferenceRequiredError,
    TruncatedPayloadError,
    UnsupportedVersionError,
)
from protocol.manifest import BlockLayout, ReferenceManifest
from protocol.payload.model import (
    MAX_CLASSES,
    MAX_REFERENCE_SIZE,
    Payload,
    SelectionRecord,
    SenderStamp,
    mismatch_message,
)
from protocol.signing import (
    ALGORITHM_ED25519,
    ALGORITHM_NAMES,
    MAX_SENDER_ID,
    SIGNATURE_BYTES,
    SigningKey,
    is_valid_sender_id,
)
from protocol.trust import TrustPolicy
from protocol.varint import decode_uvarints, encode_uvarints

MAGIC = b"\x89PLD\r\n\x1a\n"
FORMAT_VERSION = 2  # unsigned payloads
SIGNED_VERSION = 3
AUDIENCE_VERSION = 4  # signed, with an audience
READABLE_VERSIONS = (1, 2, 3, 4)
BODY_CODING = "delta-varint/zstd"
BLOCK_CODING = "blocks/rans"
ZSTD_LEVEL = 19
ZSTD_LARGE_INPUT = 1 << 20  # varint streams above this use ZSTD_LARGE_LEVEL
ZSTD_LARGE_LEVEL = 9

MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
# the largest payload a receiver takes in unless its operator raises it (the format's
# "under 1 MB"); a sender's plan measures only candidates within it by default
RECEIVER_DEFAULT_MAX_BYTES = 1 << 20
MAX_HEADER_BYTES = 1024 * 1024
MAX_CLASS_NAME = 256
MAX_TEXT = 1024
MAX_UNCHECKED_REFERENCE = 1 << 27  # block-coded bodies decoded without the reference set
_MAX_VARINT_INDEX = 9  # bytes per index gap (63 bits)
_MAX_VARINT_LABEL = 3  # bytes per label (labels < 2**21 > MAX_CLASSES)
_PREFIX = struct.Struct("<8sBI")
_ENVELOPE_HEAD = struct.Struct("<8sBB8sB")  # magic, version, algorithm, key id, sender length
_ENVELOPE_TAIL = struct.Struct("<QQI")  # sequence, expires, header length
_U32 = struct.Struct("<I")
_DIGEST_BYTES = 32


def _content_bytes(indices: np.ndarray, labels: np.ndarray) -> bytes:
    return indices.astype("<u8").tobytes() + labels.astype("<u4").tobytes()


def _digest(
    version: int, prefix_and_header: bytes, indices: np.ndarray, labels: np.ndarray
) -> bytes:
    h = hashlib.sha256(b"plada-payload-v%d" % version)
    h.update(prefix_and_header)
    h.update(_content_bytes(indices, labels))
    return h.digest()


def _layout_of(reference: ReferenceManifest | BlockLayout | None) -> BlockLayout | None:
    if isinstance(reference, ReferenceManifest):
        return reference.layout()
    return reference


def _varint_zstd_body(payload: Payload, level: int) -> tuple[bytes, BodyInfo]:
    gaps = np.empty_like(payload.indices)
    gaps[0] = payload.indices[0]
    gaps[1:] = np.diff(payload.indices) - 1
    raw = encode_uvarints(gaps) + encode_uvarints(payload.labels)
    if len(raw) > ZSTD_LARGE_INPUT:  # level 19 takes seconds here and gains ~1%
        level = min(level, ZSTD_LARGE_LEVEL)
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return body, {"coding": BODY_CODING, "raw_size": len(raw)}


def _block_body(payload: Payload, layout: BlockLayout | None) -> tuple[bytes, BodyInfo]:
    """The smallest ``blocks/rans`` body over the reference layout and the fixed layouts."""
    n, k = payload.reference_size, len(payload.class_names)
    if k > block_code.MAX_LABEL_ALPHABET:
        raise block_code.UnplannableError(f"{k} classes exceed the block coding's label alphabet")
    candidates: list[tuple[np.ndarray, BodyInfo]] = []
    fixed_sizes = block_code.FIXED_BLOCK_SIZES
    if layout is not None:
        starts = block_code.coding_block_starts(layout.block_starts, n)
        candidates.append((starts, {"coding": BLOCK_CODING, "blocks": "reference"}))
        fixed_sizes = fixed_sizes[-1:]  # folders beat small fixed blocks; large ones can win
    for size in fixed_sizes:
        info = {"coding": BLOCK_CODING, "blocks": "fixed", "block_size": size}
        candidates.append((block_code.fixed_block_starts(n, size), info))
    best = None
    for starts, info in candidates:
        try:
            plan = block_code.plan_blocks(payload.indices, payload.labels, n, k, starts)
        except block_code.UnplannableError:
            continue
        estimate = plan.estimated_bytes()
        if best is None or estimate < best[0]:
            best = (estimate, plan, info)
    if best is None:
        raise block_code.UnplannableError("no block layout can code this selection")
    return best[1].encode(), best[2]


@dataclass(frozen=True)
class EncodedPayload:
    """A serialized payload and the body coding the encoder kept (the header's ``body``)."""

    data: bytes
    body: BodyInfo


def encode_payload(
    payload: Payload,
    level: int = ZSTD_LEVEL,
    reference: ReferenceManifest | BlockLayout | None = None,
    codings: tuple[str, ...] = (BLOCK_CODING, BODY_CODING),
    signer: SigningKey | None = None,
) -> bytes:
    """Serialize ``payload``, keeping the smallest of the body ``codings`` (see
    :func:`encode_payload_detailed`)."""
    return encode_payload_detailed(payload, level, reference, codings, signer).data


def encode_payload_detailed(
    payload: Payload,
    level: int = ZSTD_LEVEL,
    reference: ReferenceManifest | BlockLayout | None = None,
    codings: tuple[str, ...] = (BLOCK_CODING, BODY_CODING),
    signer: SigningKey | None = None,
) -> EncodedPayload:
    """Serialize ``payload``, keeping the smallest of the body ``codings``.

    With ``signer`` the payload is signed and stamped with ``payload.sender`` (whose
    sender id must be the key's): format v4 when the stamp names an audience, else
    v3; without it, unsigned v2.
    ``reference`` (the sender's manifest or its block layout) lets ``blocks/rans``
    follow the reference folders; without it only fixed-size blocks are tried.
    """
    created = int(payload.created or time.time())
    envelope = _envelope(payload, signer, created)
    layout = _layout_of(reference)
    if layout is not None and (
        layout.fingerprint != payload.reference_fingerprint or layout.size != payload.reference_size
    ):
        raise ReferenceMismatchError("the block layout given is not the payload's reference set")
    bodies = _candidate_bodies(payload, level, layout, codings)
    framed = [
        (msgpack.packb(Header.of(payload, created, info).to_map(), use_bin_type=True), body, info)
        for body, info in bodies
    ]
    header_bytes, body, info = min(framed, key=lambda item: len(item[0]) + len(item[1]))
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise PayloadLimitError(f"header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    if signer is None:
        version = FORMAT_VERSION
        head = _PREFIX.pack(MAGIC, version, len(header_bytes)) + header_bytes
    else:
        version = envelope[len(MAGIC)]
        head = envelope + _U32.pack(len(header_bytes)) + header_bytes
    digest = _digest(version, head, payload.indices, payload.labels)
    encoded = head + _U32.pack(len(body)) + body + digest
    if signer is not None:
        encoded += signer.sign(encoded)
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise PayloadLimitError(f"payload of {len(encoded)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return EncodedPayload(encoded, info)


def _candidate_bodies(
    payload: Payload, level: int, layout: BlockLayout | None, codings: tuple[str, ...]
) -> list[tuple[bytes, BodyInfo]]:
    """(body, body header) in each of ``codings`` that can code the selection."""
    unknown = set(codings) - {BLOCK_CODING, BODY_CODING}
    if unknown or not codings:
        raise ValueError(f"unknown body codings {sorted(unknown)}")
    bodies: list[tuple[bytes, BodyInfo]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:  # zstd releases the GIL
        varint = pool.submit(_varint_zstd_body, payload, level) if BODY_CODING in codings else None
        if BLOCK_CODING in codings:
            try:
                bodies.append(_block_body(payload, layout))
            except block_code.UnplannableError:
                if varint is None:
                    raise
        if varint is not None:
            bodies.append(varint.result())
    return bodies


def _envelope(payload: Payload, signer: SigningKey | None, created: int) -> bytes:
    """The signed envelope up to (not including) the header length."""
    if signer is None:
        return b""
    stamp = payload.sender
    if stamp is None:
        raise ValueError("a signed payload needs payload.sender (sender id, sequence, expiry)")
    if stamp.sender != signer.sender:
        raise ValueError(f"key of sender {signer.sender!r} cannot sign for {stamp.sender!r}")
    if stamp.expires <= created:
        raise ValueError("a payload must expire after it is created")
    sender = stamp.sender.encode("ascii")
    version = SIGNED_VERSION if stamp.audience is None else AUDIENCE_VERSION
    head = _ENVELOPE_HEAD.pack(MAGIC, version, ALGORITHM_ED25519, signer.key_id, len(sender))
    head += sender
    if stamp.audience is not None:
        audience = stamp.audience.encode("ascii")
        head += bytes([len(audience)]) + audience
    return head + struct.pack("<QQ", stamp.sequence, stamp.expires)


BodyInfo = dict[str, str | int]  # header.body: the body's coding and its parameters


@dataclass(frozen=True)
class Header:
    """The header map of a payload: one schema for writing it and for reading it back,
    every field type- and range-checked on the way in."""

    task: str
    created: int
    reference_name: str
    fingerprint: bytes
    reference_size: int
    classes: tuple[str, ...]
    count: int
    selection: SelectionRecord
    body: BodyInfo

    @property
    def coding(self) -> str:
        return str(self.body["coding"])

    @classmethod
    def of(cls, payload: Payload, created: int, body: BodyInfo) -> Header:
        return cls(
            payload.task,
            created,
            payload.reference_name,
            payload.reference_fingerprint,
            int(payload.reference_size),
            tuple(payload.class_names),
            payload.count,
            dict(payload.selection),
            body,
        )

    def to_map(self) -> dict[str, object]:
        """The msgpack map, its keys in the order of the format."""
        return {
            "task": self.task,
            "created": self.created,
            "reference": {
                "name": self.reference_name,
                "fingerprint": self.fingerprint,
                "size": self.reference_size,
            },
            "classes": list(self.classes),
            "count": self.count,
            "selection": self.selection,
            "body": self.body,
        }

    @classmethod
    def from_bytes(cls, raw: bytes, stamp: SenderStamp | None) -> Header:
        """Parse the msgpack header and check every field's type and range."""
        header = _parse_header(raw)
        task = _text(header, "task")
        created = _field(header, "created", int, "")
        ref_info = _field(header, "reference", dict, "")
        ref_name = _text(ref_info, "name", "reference.")
        fingerprint = _field(ref_info, "fingerprint", bytes, "reference.")
        if len(fingerprint) != 32:
            raise MalformedHeaderError("header field reference.fingerprint is not 32 bytes")
        n = _field(ref_info, "size", int, "reference.")
        classes = _checked_classes(_field(header, "classes", list, ""))
        count = _field(header, "count", int, "")
        if stamp is not None and not created < stamp.expires:
            raise MalformedHeaderError("the payload expires before it was created")
        if not 1 <= n <= MAX_REFERENCE_SIZE:
            raise MalformedHeaderError(f"reference size {n} outside [1, {MAX_REFERENCE_SIZE}]")
        if not 1 <= count <= n:
            raise PayloadLimitError(f"declared count {count} outside [1, reference size {n}]")
        selection = _parse_selection(header.get("selection", {}))
        body_info = _field(header, "body", dict, "")
        _text(body_info, "coding", "body.")
        return cls(task, created, ref_name, fingerprint, n, classes, count, selection, body_info)


def _checked_classes(classes: list[object]) -> tuple[str, ...]:
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise MalformedHeaderError(
            f"header lists {len(classes)} classes, outside [2, {MAX_CLASSES}]"
        )
    if not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in classes):
        raise MalformedHeaderError("every class name must be a non-empty string of <= 256 chars")
    return tuple(classes)  # type: ignore[arg-type]


# --- decoding ------------------------------------------------------------------------------


def _field(mapping: Mapping[str, object], name: str, kind: type, where: str):
    if name not in mapping:
        raise MalformedHeaderError(f"header field {where}{name} is missing")
    value = mapping[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MalformedHeaderError(f"header field {where}{name} has type {type(value).__name__}")
    return value


def _text(mapping: Mapping[str, object], name: str, where: str = "") -> str:
    value = _field(mapping, name, str, where)
    if len(value) > MAX_TEXT:
        raise MalformedHeaderError(f"header field {where}{name} is longer than {MAX_TEXT}")
    return value


def _parse_header(raw: bytes) -> dict[str, object]:
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_TEXT * 4,
            max_bin_len=64,
            max_array_len=MAX_CLASSES,
            max_map_len=64,
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise MalformedHeaderError("header has bytes after its msgpack map") from exc
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise MalformedHeaderError(f"header is not valid msgpack within limits: {exc}") from exc
    if not isinstance(header, dict):
        raise MalformedHeaderError("header is not a msgpack map")
    return header


def _parse_selection(value: object) -> SelectionRecord:
    if not isinstance(value, dict):
        raise MalformedHeaderError("header field selection is not a map")
    for key, item in value.items():
        if not isinstance(key, str) or not (item is None or isinstance(item, (str, int, float))):
            raise MalformedHeaderError("header field selection holds a non-scalar value")
        if isinstance(item, str) and len(item) > MAX_TEXT:
            raise MalformedHeaderError("header field selection holds an over-long string")
    return value


@dataclass(frozen=True)
class _Frame:
    """Where the parts of a payload lie, from its lengths alone (nothing is parsed)."""

    version: int
    header_start: int
    header_end: int
    body_start: int
    digest_start: int
    total: int  # the end of the digest, or of the signature (v3, v4)
    algorithm: int = 0
    key_id: bytes = b""
    sender: str = ""
    sequence: int = 0
    expires: int = 0
    audience: str | None = None

    @property
    def digest_end(self) -> int:
        return self.digest_start + _DIGEST_BYTES


def _frame(data: bytes, max_bytes: int) -> _Frame:
    """Check the raw size cap and the framing lengths; parse nothing variable."""
    if len(data) > max_bytes:
        raise PayloadLimitError(f"payload of {len(data)} bytes exceeds the cap of {max_bytes}")
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        if MAGIC.startswith(data):
            raise TruncatedPayloadError(
                "payload ends inside its magic bytes: the file is truncated"
            )
        raise NotAPayloadError("not a plada payload (magic bytes missing): wrong file?")
    if len(data) < len(MAGIC) + 1:
        raise TruncatedPayloadError("payload ends before its version: the file is truncated")
    version = data[len(MAGIC)]
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersionError(
            f"payload format version {version} is not supported (this build reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}): upgrade plada on this device"
        )
    envelope: dict[str, object] = {}
    if version >= SIGNED_VERSION:
        envelope, header_start = _parse_envelope(data)
        (header_len,) = _U32.unpack_from(data, header_start - _U32.size)
        trailer = _DIGEST_BYTES + SIGNATURE_BYTES
    else:
        if len(data) < _PREFIX.size:
            raise TruncatedPayloadError(
                "payload ends before its header length: the file is truncated"
            )
        _, _, header_len = _PREFIX.unpack_from(data)
        header_start, trailer = _PREFIX.size, _DIGEST_BYTES
    if header_len > MAX_HEADER_BYTES:
        raise PayloadLimitError(f"declared header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    header_end = header_start + header_len
    if len(data) < header_end + _U32.size + trailer:
        raise TruncatedPayloadError("payload ends before its body: the file is truncated")
    (body_len,) = _U32.unpack_from(data, header_end)
    body_start = header_end + _U32.size
    expected_total = body_start + body_len + trailer
    if len(data) < expected_total:
        raise TruncatedPayloadError(
            f"payload is {len(data)} bytes but declares {expected_total}: the file is truncated"
        )
    if len(data) > expected_total:
        raise CorruptPayloadError(f"{len(data) - expected_total} unexpected bytes after the end")
    return _Frame(
        version,
        header_start,
        header_end,
        body_start,
        body_start + body_len,
        expected_total,
        **envelope,
    )


def _parse_envelope(data: bytes) -> tuple[dict[str, object], int]:
    """The fixed fields of a v3 or v4 envelope and where its header starts."""
    if len(data) < _ENVELOPE_HEAD.size:
        raise TruncatedPayloadError("payload ends inside its envelope: the file is truncated")
    _, _, algorithm, key_id, sender_len = _ENVELOPE_HEAD.unpack_from(data)
    if algorithm not in ALGORITHM_NAMES:
        raise UnsupportedVersionError(
            f"signature algorithm {algorithm} is not supported (this build verifies "
            f"{', '.join(ALGORITHM_NAMES.values())}): upgrade plada on this device"
        )
    if not 1 <= sender_len <= MAX_SENDER_ID:
        raise MalformedHeaderError(f"sender id length {sender_len} outside [1, {MAX_SENDER_ID}]")
    tail = _ENVELOPE_HEAD.size + sender_len
    sender = _envelope_id(data, _ENVELOPE_HEAD.size, tail, "sender id")
    audience = None
    if data[len(MAGIC)] >= AUDIENCE_VERSION:
        if len(data) < tail + 1:
            raise TruncatedPayloadError("payload ends inside its envelope: the file is truncated")
        audience_len = data[tail]
        if not 1 <= audience_len <= MAX_SENDER_ID:
            raise MalformedHeaderError(
                f"audience length {audience_len} outside [1, {MAX_SENDER_ID}]"
            )
        audience = _envelope_id(data, tail + 1, tail + 1 + audience_len, "audience")
        tail += 1 + audience_len
    header_start = tail + _ENVELOPE_TAIL.size
    if len(data) < header_start:
        raise TruncatedPayloadError("payload ends inside its envelope: the file is truncated")
    sequence, expires, _ = _ENVELOPE_TAIL.unpack_from(data, tail)
    fields = {
        "algorithm": algorithm,
        "key_id": key_id,
        "sender": sender,
        "sequence": sequence,
        "expires": expires,
        "audience": audience,
    }
    return fields, header_start


def _envelope_id(data: bytes, start: int, end: int, what: str) -> str:
    """The sender id or audience at ``data[start:end]``, checked against the id rule."""
    if len(data) < end:
        raise TruncatedPayloadError("payload ends inside its envelope: the file is truncated")
    raw = data[start:end]
    text = raw.decode("ascii", errors="replace")
    if not is_valid_sender_id(text):
        raise MalformedHeaderError(f"{what} {raw!r} is not a valid {what}")
    return text


def _check_origin(data: bytes, frame: _Frame, trust: TrustPolicy | None) -> SenderStamp | None:
    """Signature, audience, expiry, replay and rollback: all before the header is read."""
    if frame.version < SIGNED_VERSION:
        if trust is not None:
            trust.check_unsigned(frame.version)
        return None
    if trust is not None:
        trust.check_signature(
            frame.sender,
            frame.key_id,
            data[frame.digest_end : frame.total],
            data[: frame.digest_end],
        )
    stamp = SenderStamp(frame.sender, frame.sequence, frame.expires, frame.audience)
    if trust is not None:
        trust.check_audience(stamp.sender, stamp.audience)
        trust.check_freshness(stamp.sender, stamp.sequence, stamp.expires)
    return stamp


def check_framing(data: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> None:
    """Check a payload's magic, version and framing lengths (nothing variable is parsed,
    nothing is trusted): the cheap first test of a file, before a reference set opens."""
    _frame(bytes(data), max_bytes)


def decode_header(data: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, object]:
    """The header map of a payload after checking its framing (the body is not decoded;
    a signature is not checked)."""
    data = bytes(data)
    frame = _frame(data, max_bytes)
    return _parse_header(data[frame.header_start : frame.header_end])


def decode_payload(
    data: bytes,
    max_bytes: int = MAX_PAYLOAD_BYTES,
    reference: ReferenceManifest | BlockLayout | None = None,
    max_reference_size: int = MAX_UNCHECKED_REFERENCE,
    *,
    trust: TrustPolicy | None,
) -> Payload:
    """Parse and fully verify untrusted payload bytes; raise a ``PayloadError`` subtype.

    ``trust`` is the receiver's :class:`TrustPolicy`: the signature (and expiry,
    replay, rollback) is checked over the raw bytes before anything else is
    parsed, and unsigned payloads are refused unless it allows them. ``None``
    skips those checks; only a sender inspecting its own output passes it.

    With ``reference`` (the receiver's manifest or block layout) the payload must
    have been made for it (``ReferenceMismatchError`` otherwise, before the body is
    touched); a ``blocks/rans`` body over reference folders cannot be decoded
    without it (``ReferenceRequiredError``). Without it, a ``blocks/rans`` body is
    decoded only for reference sizes up to ``max_reference_size``, which bounds
    the memory a forged header can demand.
    """
    data = bytes(data)
    frame = _frame(data, max_bytes)
    stamp = _check_origin(data, frame, trust)
    header = Header.from_bytes(data[frame.header_start : frame.header_end], stamp)
    layout = _layout_of(reference)
    if layout is not None and (
        layout.fingerprint != header.fingerprint or layout.size != header.reference_size
    ):
        raise ReferenceMismatchError(
            mismatch_message(
                header.reference_name, header.fingerprint, header.reference_size, layout
            )
        )
    body = data[frame.body_start : frame.digest_start]
    indices, labels = _decode_body(body, header, frame.version, layout, max_reference_size)
    payload = Payload(
        task=header.task,
        reference_name=header.reference_name,
        reference_fingerprint=header.fingerprint,
        reference_size=header.reference_size,
        class_names=header.classes,
        indices=indices,
        labels=labels.astype(np.int64),
        selection=header.selection,
        created=header.created,
        sender=stamp,
        key_id=frame.key_id or None,
    )
    digest = data[frame.digest_start : frame.digest_end]
    if _digest(frame.version, data[: frame.header_end], payload.indices, payload.labels) != digest:
        raise DigestMismatchError(
            "integrity digest does not match the decoded content: the payload was altered "
            "or damaged in transit; ask the sender to resend it"
        )
    return payload


def _decode_body(
    body: bytes,
    header: Header,
    version: int,
    layout: BlockLayout | None,
    max_reference_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) from the body in the coding its header names."""
    n, count, classes = header.reference_size, header.count, header.classes
    if header.coding == BODY_CODING:
        return _decode_varint_zstd(body, header.body, n, count)
    if header.coding == BLOCK_CODING and version >= 2:
        if len(classes) > block_code.MAX_LABEL_ALPHABET:
            raise MalformedHeaderError(
                f"{len(classes)} classes exceed the {BLOCK_CODING} label alphabet "
                f"({block_code.MAX_LABEL_ALPHABET})"
            )
        starts = _block_starts(header.body, n, layout, max_reference_size)
        return block_code.decode_blocks(body, n, len(classes), count, starts)
    raise UnsupportedVersionError(
        f"body coding {header.coding!r} is not supported by this build for format version {version}"
    )


def _block_starts(
    body_info: BodyInfo, n: int, layout: BlockLayout | None, max_reference_size: int
) -> np.ndarray:
    blocks = _text(body_info, "blocks", "body.")
    if blocks == "reference":
        if layout is None:
            raise ReferenceRequiredError(
                "this payload is coded against the reference set's folder layout: decode it "
                "with the local reference manifest (e.g. plada-receive verify PAYLOAD "
                "--reference SPEC)"
            )
        return block_code.coding_block_starts(layout.block_starts, n)
    if blocks != "fixed":
        raise MalformedHeaderError(f"header field body.blocks has unknown value {blocks!r}")
    size = _field(body_info, "block_size", int, "body.")
    if size not in block_code.FIXED_BLOCK_SIZES:
        raise MalformedHeaderError(f"header field body.block_size {size} is not a fixed size")
    if layout is None and n > max_reference_size:
        raise PayloadLimitError(
            f"reference size {n} exceeds {max_reference_size} for decoding without the "
            "reference set: pass the local manifest"
        )
    return block_code.fixed_block_starts(n, size)


def _decode_varint_zstd(
    body: bytes, body_info: BodyInfo, n: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    raw_size = _field(body_info, "raw_size", int, "body.")
    cap = count * (_MAX_VARINT_INDEX + _MAX_VARINT_LABEL)
    if not 2 * count <= raw_size <= cap:
        raise PayloadLimitError(
            f"declared body size {raw_size} is impossible for {count} images (cap {cap})"
        )
    try:
        frame_size = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"body is not a zstd frame: {exc}") from exc
    if frame_size != raw_size:
        raise PayloadLimitError(
            f"body frame declares {frame_size} bytes but the header {raw_size}: refusing to inflate"
        )
    try:
        raw = zstandard.ZstdDecompressor().decompress(
            body, max_output_size=raw_size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"body does not decompress: {exc}") from exc
    if len(raw) != raw_size:
        raise CorruptPayloadError("body decompressed to a different size than declared")
    gaps, used = decode_uvarints(raw, count)
    labels, used_labels = decode_uvarints(memoryview(raw)[used:], count, _MAX_VARINT_LABEL)
    if used + used_labels != raw_size:
        raise CorruptPayloadError("body holds bytes after the last label")
    if int(gaps.max()) >= n:
        raise InvalidSelectionError(f"an index lies outside the reference set [0, {n})")
    gaps = gaps.astype(np.int64)
    gaps[1:] += 1
    return np.cumsum(gaps), labels.astype(np.int64)


def information_bound_bytes(n: int, labels: np.ndarray, k: int) -> float:
    """log2 C(n, m) + m * H(labels), in bytes: the floor for any index+label code."""
    m = int(labels.size)
    log_binom = (math.lgamma(n + 1) - math.lgamma(m + 1) - math.lgamma(n - m + 1)) / math.log(2)
    p = np.bincount(labels, minlength=k) / max(m, 1)
    p = p[p > 0]
    entropy = float(-(p * np.log2(p)).sum())
    return (log_binom + m * entropy) / 8.0
