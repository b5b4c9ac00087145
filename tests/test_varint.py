import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import CorruptPayloadError, TruncatedPayloadError
from protocol.varint import (
    MAX_VARINT_BYTES,
    _decode_few,
    _decode_many,
    decode_uvarints,
    encode_uvarints,
)

values = st.lists(st.integers(0, (1 << (7 * MAX_VARINT_BYTES)) - 1), min_size=0, max_size=300)


@given(values)
def test_round_trip(xs: list[int]) -> None:
    data = encode_uvarints(np.asarray(xs, dtype=np.uint64))
    decoded, used = decode_uvarints(data, len(xs))
    assert used == len(data)
    assert decoded.tolist() == xs


@given(values, st.binary(max_size=20))
def test_decoding_stops_after_count(xs: list[int], tail: bytes) -> None:
    data = encode_uvarints(np.asarray(xs, dtype=np.uint64))
    decoded, used = decode_uvarints(data + tail, len(xs))
    assert decoded.tolist() == xs and used == len(data)


def test_known_encodings() -> None:
    assert encode_uvarints(np.array([0, 1, 127, 128, 300])) == bytes.fromhex("00017f8001ac02")


def test_truncated() -> None:
    with pytest.raises(TruncatedPayloadError):
        decode_uvarints(bytes.fromhex("8001ac"), 2)


def test_overlong_and_non_minimal() -> None:
    with pytest.raises(CorruptPayloadError):
        decode_uvarints(b"\x80" * MAX_VARINT_BYTES + b"\x01", 1)
    with pytest.raises(CorruptPayloadError):
        decode_uvarints(b"\x80\x00", 1)  # zero written in two bytes


def test_rejects_negative() -> None:
    with pytest.raises(ValueError):
        encode_uvarints(np.array([-1]))


def _outcome(decode, data: bytes, count: int, max_bytes: int):
    try:
        values, used = decode(data, count, max_bytes)
    except (CorruptPayloadError, TruncatedPayloadError) as exc:
        return type(exc)
    return values.tolist(), used


@given(st.binary(max_size=40), st.integers(1, 8), st.integers(1, MAX_VARINT_BYTES))
def test_the_loop_for_few_values_agrees_with_the_vector_path(data, count, max_bytes) -> None:
    """Frame headers take the byte loop; it must accept and refuse exactly as NumPy does."""
    few = _outcome(_decode_few, data, count, max_bytes)
    assert few == _outcome(_decode_many, data, count, max_bytes)
