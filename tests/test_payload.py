"""Payload v1: round trips, and a typed rejection for every class of malformed input."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import (
    CorruptPayloadError,
    DigestMismatchError,
    InvalidSelectionError,
    MalformedHeaderError,
    NotAPayloadError,
    PayloadError,
    PayloadLimitError,
    ReferenceMismatchError,
    TruncatedPayloadError,
    UnsupportedVersionError,
)
from protocol.manifest import ReferenceManifest
from protocol.payload import Payload, decode_payload, encode_payload
from protocol.payload import codec as fmt
from protocol.varint import encode_uvarints

FP = bytes(range(32))


def make(indices, labels, n=1000, k=3, **extra) -> Payload:
    names = tuple(f"class-{i}" for i in range(k))
    return Payload(
        task="t",
        reference_name="ref",
        reference_fingerprint=FP,
        reference_size=n,
        class_names=names,
        indices=np.asarray(indices),
        labels=np.asarray(labels),
        selection={"strategy": "safety-net", "keep": 0.01},
        created=1_700_000_000,
        **extra,
    )


def forge(header: dict, raw_body: bytes, *, frame: bytes | None = None) -> bytes:
    """Assemble a payload by hand with a valid digest over what the body decodes to.

    Lets a test break exactly one rule while everything else (including the digest,
    which is computed over the forged content) stays consistent.
    """
    header_bytes = msgpack.packb(header, use_bin_type=True)
    head = struct.pack("<8sBI", fmt.MAGIC, 1, len(header_bytes)) + header_bytes
    body = frame if frame is not None else zstandard.ZstdCompressor(level=3).compress(raw_body)
    return head + struct.pack("<I", len(body)) + body + b"\0" * 32


def header_for(count: int, raw_size: int, n: int = 1000, k: int = 3) -> dict:
    return {
        "task": "t",
        "created": 0,
        "reference": {"name": "ref", "fingerprint": FP, "size": n},
        "classes": [f"c{i}" for i in range(k)],
        "count": count,
        "selection": {},
        "body": {"coding": fmt.BODY_CODING, "raw_size": raw_size},
    }


def body(gaps, labels) -> bytes:
    return encode_uvarints(np.asarray(gaps)) + encode_uvarints(np.asarray(labels))


@st.composite
def payloads(draw):
    n = draw(st.integers(1, 5000))
    k = draw(st.integers(2, 300))
    m = draw(st.integers(1, min(n, 400)))
    indices = sorted(draw(st.sets(st.integers(0, n - 1), min_size=m, max_size=m)))
    labels = draw(st.lists(st.integers(0, k - 1), min_size=m, max_size=m))
    task = draw(st.text(max_size=40))
    return Payload(
        task=task,
        reference_name="ref",
        reference_fingerprint=FP,
        reference_size=n,
        class_names=tuple(f"c{i}" for i in range(k)),
        indices=np.asarray(indices),
        labels=np.asarray(labels),
        selection={"keep": 0.5},
        created=1,
    )


@settings(max_examples=150, deadline=None)
@given(payloads())
def test_round_trip(p: Payload) -> None:
    q = decode_payload(encode_payload(p), trust=None)
    assert np.array_equal(q.indices, p.indices) and np.array_equal(q.labels, p.labels)
    assert (q.task, q.class_names, q.reference_size) == (p.task, p.class_names, p.reference_size)
    assert q.reference_fingerprint == p.reference_fingerprint and q.selection == p.selection


@settings(max_examples=150, deadline=None)
@given(payloads(), st.data())
def test_any_single_byte_change_is_rejected_or_harmless(p: Payload, data) -> None:
    encoded = bytearray(encode_payload(p))
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] ^= data.draw(st.integers(1, 255))
    try:
        q = decode_payload(bytes(encoded), trust=None)
    except PayloadError:
        return
    # accepted only if it decodes to exactly the same content (e.g. a zstd frame-header bit)
    assert np.array_equal(q.indices, p.indices) and np.array_equal(q.labels, p.labels)
    assert (q.task, q.class_names, q.selection) == (p.task, p.class_names, p.selection)


@settings(max_examples=100, deadline=None)
@given(payloads(), st.data())
def test_every_truncation_is_rejected(p: Payload, data) -> None:
    encoded = encode_payload(p)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(PayloadError):
        decode_payload(encoded[:cut], trust=None)


def test_not_a_payload_and_version() -> None:
    with pytest.raises(NotAPayloadError):
        decode_payload(b"GIF89a" + b"\0" * 100, trust=None)
    with pytest.raises(TruncatedPayloadError):
        decode_payload(fmt.MAGIC[:5], trust=None)
    good = bytearray(encode_payload(make([1, 2], [0, 1])))
    good[8] = 3
    with pytest.raises(UnsupportedVersionError):
        decode_payload(bytes(good), trust=None)


def test_digest_detects_header_tampering() -> None:
    encoded = encode_payload(make([1, 2], [0, 1]))
    tampered = encoded.replace(b"class-1", b"class-X")
    with pytest.raises(DigestMismatchError):
        decode_payload(tampered, trust=None)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(CorruptPayloadError):
        decode_payload(encode_payload(make([1, 2], [0, 1])) + b"x", trust=None)


def test_size_caps() -> None:
    encoded = encode_payload(make([1, 2], [0, 1]))
    with pytest.raises(PayloadLimitError):
        decode_payload(encoded, max_bytes=len(encoded) - 1, trust=None)
    huge_header = struct.pack("<8sBI", fmt.MAGIC, 1, fmt.MAX_HEADER_BYTES + 1) + b"\0" * 64
    with pytest.raises(PayloadLimitError):
        decode_payload(huge_header, trust=None)


def test_decompression_bomb_is_refused_before_inflating() -> None:
    raw = body([1, 0], [0, 1])
    # a tiny frame that declares 1 GiB of output: refused on the declared size alone
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (1 << 20))
    frame = bytearray(bomb)
    with pytest.raises(PayloadLimitError):
        decode_payload(forge(header_for(2, len(raw)), raw, frame=bytes(frame)), trust=None)
    # the header itself may not declare a body larger than m images can need
    with pytest.raises(PayloadLimitError):
        decode_payload(forge(header_for(2, 1 << 30), raw), trust=None)


def test_frame_without_declared_size_is_refused() -> None:
    raw = body([1, 0], [0, 1])
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(PayloadLimitError):
        decode_payload(forge(header_for(2, len(raw)), raw, frame=frame), trust=None)


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda h: h.pop("classes"), MalformedHeaderError),
        (lambda h: h.__setitem__("count", "2"), MalformedHeaderError),
        (lambda h: h.__setitem__("classes", ["only-one"]), MalformedHeaderError),
        (lambda h: h["reference"].__setitem__("fingerprint", b"short"), MalformedHeaderError),
        (lambda h: h.__setitem__("count", 5000), PayloadLimitError),
        (lambda h: h.__setitem__("selection", {"x": [1, 2]}), MalformedHeaderError),
        (lambda h: h["body"].__setitem__("coding", "gzip"), UnsupportedVersionError),
        (lambda h: h.__setitem__("classes", ["c"] * (fmt.MAX_CLASSES + 1)), MalformedHeaderError),
    ],
)
def test_header_rules(mutate, error) -> None:
    raw = body([1, 0], [0, 1])
    header = header_for(2, len(raw))
    mutate(header)
    with pytest.raises(error):
        decode_payload(forge(header, raw), trust=None)


def test_oversized_array_in_header_hits_msgpack_limit() -> None:
    raw = body([1, 0], [0, 1])
    header = header_for(2, len(raw))
    header["extra"] = list(range(fmt.MAX_CLASSES + 1))
    with pytest.raises(MalformedHeaderError):
        decode_payload(forge(header, raw), trust=None)


@pytest.mark.parametrize(
    ("gaps", "labels", "n", "k", "error"),
    [
        ([1, 0], [0, 3], 1000, 3, InvalidSelectionError),  # label >= k
        ([998, 5], [0, 1], 1000, 3, InvalidSelectionError),  # index >= n
        ([1000, 0], [0, 1], 1000, 3, InvalidSelectionError),  # first index >= n
    ],
)
def test_content_rules(gaps, labels, n, k, error) -> None:
    raw = body(gaps, labels)
    with pytest.raises(error):
        decode_payload(forge(header_for(len(gaps), len(raw), n, k), raw), trust=None)


def test_count_disagreeing_with_body() -> None:
    raw = body([1, 0, 0], [0, 1, 1])  # three images in the body, header says two
    with pytest.raises(CorruptPayloadError):
        decode_payload(forge(header_for(2, len(raw)), raw), trust=None)
    short = body([1], [0])
    with pytest.raises((TruncatedPayloadError, PayloadLimitError)):
        decode_payload(forge(header_for(2, len(short)), short), trust=None)


def test_encoder_refuses_invalid_content() -> None:
    with pytest.raises(InvalidSelectionError):
        make([2, 1], [0, 0])  # not increasing
    with pytest.raises(InvalidSelectionError):
        make([1, 1], [0, 0])  # duplicate
    with pytest.raises(InvalidSelectionError):
        make([], [])


def test_reference_check() -> None:
    manifest = ReferenceManifest.from_unsorted("other", [f"a/{i:04d}" for i in range(1000)])
    with pytest.raises(ReferenceMismatchError, match="sync the reference set"):
        make([1, 2], [0, 1]).check_reference(manifest)
    matching = Payload(
        task="t",
        reference_name="other",
        reference_fingerprint=manifest.fingerprint,
        reference_size=1000,
        class_names=("a", "b"),
        indices=np.array([3]),
        labels=np.array([1]),
    )
    matching.check_reference(manifest)
