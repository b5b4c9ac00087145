"""Unsigned LEB128 varints, vectorised with NumPy.

Each value is written as 7-bit groups, least significant first; the high bit of a
byte is set on every byte but the last of a value. Decoding is strict: a value
may take at most ``max_bytes`` bytes and must use the fewest bytes possible
(its last byte is non-zero unless the value is a single zero byte), so every
value list has exactly one encoding.
"""

from __future__ import annotations

import numpy as np

from protocol.errors import CorruptPayloadError, TruncatedPayloadError

MAX_VARINT_BYTES = 9  # 63 bits: every count and index in the protocol fits


def encode_uvarints(values: np.ndarray) -> bytes:
    """Encode non-negative integers (any integer dtype) as concatenated LEB128 varints."""
    v = np.asarray(values)
    if v.size == 0:
        return b""
    if v.dtype.kind not in "iu":
        raise TypeError("varints encode integers only")
    if v.dtype.kind == "i" and int(v.min()) < 0:
        raise ValueError("varints encode non-negative integers only")
    v = v.astype(np.uint64).ravel()
    if int(v.max()) >= 1 << (7 * MAX_VARINT_BYTES):
        raise ValueError(f"value exceeds {7 * MAX_VARINT_BYTES} bits")
    groups = np.empty((v.size, MAX_VARINT_BYTES), dtype=np.uint8)
    length = np.ones(v.size, dtype=np.int64)
    rest = v.copy()
    for j in range(MAX_VARINT_BYTES):
        groups[:, j] = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest >>= np.uint64(7)
        length += (rest > 0).astype(np.int64)
    position = np.arange(MAX_VARINT_BYTES)[None, :]
    groups |= np.where(position < (length[:, None] - 1), 0x80, 0).astype(np.uint8)
    return groups[position < length[:, None]].tobytes()


def decode_uvarints(
    data: bytes | memoryview, count: int, max_bytes: int = MAX_VARINT_BYTES
) -> tuple[np.ndarray, int]:
    """Decode exactly ``count`` varints from the start of ``data``.

    Returns the values (uint64) and the number of bytes consumed. Raises
    ``TruncatedPayloadError`` when fewer than ``count`` values are present and
    ``CorruptPayloadError`` on an overlong or non-minimal encoding.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    if count <= FEW_VARINTS:
        return _decode_few(data, count, max_bytes)
    return _decode_many(data, count, max_bytes)


FEW_VARINTS = 8  # up to this many (a frame header), a plain loop beats NumPy's set-up


def _decode_few(data: bytes | memoryview, count: int, max_bytes: int) -> tuple[np.ndarray, int]:
    """:func:`decode_uvarints` for a handful of values, byte by byte (the same checks,
    in the same order: truncation, then length, then minimality)."""
    values, position, overlong, non_minimal = [], 0, False, False
    while len(values) < count:
        value, start = 0, position
        while position < len(data) and data[position] >= 0x80:
            value |= (data[position] & 0x7F) << (7 * (position - start))
            position += 1
        if position >= len(data):
            raise TruncatedPayloadError(
                f"expected {count} varints but the data holds {len(values)}: "
                "the payload is truncated"
            )
        value |= data[position] << (7 * (position - start))
        position += 1
        overlong |= position - start > max_bytes
        non_minimal |= position - start > 1 and data[position - 1] == 0
        values.append(value)
    if overlong:
        raise CorruptPayloadError(f"a varint is longer than {max_bytes} bytes")
    if non_minimal:
        raise CorruptPayloadError("a varint is not minimally encoded")
    return np.array(values, dtype=np.uint64), position


def _decode_many(data: bytes | memoryview, count: int, max_bytes: int) -> tuple[np.ndarray, int]:
    """:func:`decode_uvarints` vectorised, for long lists."""
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size < count:
        raise TruncatedPayloadError(
            f"expected {count} varints but the data holds {ends.size}: the payload is truncated"
        )
    ends = ends[:count]
    consumed = int(ends[-1]) + 1
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > max_bytes:
        raise CorruptPayloadError(f"a varint is longer than {max_bytes} bytes")
    if np.any((lengths > 1) & (raw[ends] == 0)):
        raise CorruptPayloadError("a varint is not minimally encoded")
    body = raw[:consumed]
    group = np.repeat(np.arange(count), lengths)
    shift = (np.arange(consumed) - starts[group]).astype(np.uint64) * np.uint64(7)
    parts = (body & 0x7F).astype(np.uint64) << shift
    values = np.add.reduceat(parts, starts)
    return values.astype(np.uint64), consumed
