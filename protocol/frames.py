"""Frames: a payload carried over a narrow, lossy, often one-way link.

A payload becomes self-describing frames of a chosen size, each holding one symbol
of a RaptorQ fountain code (RFC 6330, through the ``raptorq`` package, a compiled
implementation of the RFC): source symbols first, then as many repair symbols as
the link needs. Any K or K+1 distinct frames of a transfer, in any order and with
duplicates, rebuild the payload (K = ceil(length / symbol size)); a frame damaged
on the way fails its CRC and is dropped. The rebuilt bytes are an ordinary payload:
the receiver verifies them (signature first) like any file, so forged or corrupt
frames can never yield an accepted payload. Layout (``protocol/FORMAT.md``)::

    magic     1 byte   0xF1 (frames, version 1) or 0xF3 (tagged frames, version 1)
    transfer  4 bytes  the first 4 bytes of SHA-256(payload): which transfer
    length    uvarint  the payload's length in bytes
    mtu       uvarint  the coding parameter both sides derive the symbol size from
    block     uvarint  the RaptorQ source block number
    symbol id uvarint  the encoding symbol id within the block
    symbol    T bytes  one encoding symbol (all the bytes up to the trailer)
    crc       4 bytes  0xF1: CRC-32 (zlib) of every byte before it, little-endian
    tag       8 bytes  0xF3: HMAC-SHA256(link key, "plada-frame-1" || every byte
                       before it), cut to 8

A CRC only catches damage: anyone who can transmit can send a frame with a genuine
header and false symbol bytes, and one such symbol makes the whole decode wrong.
Tagged frames carry a MAC with a *link key* the ground station and its devices share
(``plada-send link-key``), so a receiver holding the key drops a forged frame before
it reaches the decoder, and a transfer decodes from its genuine frames alone whatever
else arrives beside them.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from protocol.errors import FrameError, FrameTagError, PayloadError, TransferError
from protocol.varint import decode_uvarints, encode_uvarints

FRAME_MAGIC = 0xF1
TAGGED_FRAME_MAGIC = 0xF3
TRANSFER_ID_BYTES = 4
CRC_BYTES = 4
TAG_BYTES = 8
_TAG_DOMAIN = b"plada-frame-1"
MIN_FRAME_BYTES = 24
MAX_FRAME_BYTES = 65535
MAX_TRANSFER_BYTES = 64 * 1024 * 1024  # the payload format's own cap
_CRC = struct.Struct("<I")
STREAM_LENGTH = struct.Struct("<H")  # a frame stream: each frame as u16 length, then its bytes


@dataclass(frozen=True)
class LinkProfile:
    """A link by name: the most bytes one frame may hold and its raw bit rate."""

    name: str
    frame_bytes: int
    bits_per_second: float
    note: str = ""

    def airtime_seconds(self, total_bytes: int) -> float:
        """Time on air for ``total_bytes`` at the profile's bit rate (no duty cycle)."""
        return total_bytes * 8 / self.bits_per_second


# EU868 LoRaWAN at 125 kHz: the largest application payload and the raw bit rate per
# spreading factor; Iridium SBD mobile-originated messages at the 2.4 kbps channel
PROFILES = {
    profile.name: profile
    for profile in (
        LinkProfile("iridium-sbd-340", 340, 2400, "Iridium SBD, small modems (9602/9603)"),
        LinkProfile("iridium-sbd-1960", 1960, 2400, "Iridium SBD, full modems (9522)"),
        LinkProfile("lora-sf7", 222, 5470, "LoRa SF7/125 kHz, 1% duty cycle in EU868"),
        LinkProfile("lora-sf8", 222, 3125, "LoRa SF8/125 kHz"),
        LinkProfile("lora-sf9", 115, 1760, "LoRa SF9/125 kHz"),
        LinkProfile("lora-sf10", 51, 980, "LoRa SF10/125 kHz"),
        LinkProfile("lora-sf11", 51, 440, "LoRa SF11/125 kHz"),
        LinkProfile("lora-sf12", 51, 250, "LoRa SF12/125 kHz"),
        LinkProfile("acoustic-64", 64, 300, "underwater acoustic modem, 64-byte frames"),
    )
}


def link_profile(name: str | None = None, mtu: int | None = None) -> LinkProfile:
    """The profile ``name``, or a custom one of ``mtu`` bytes per frame (1 kbps)."""
    if mtu is not None:
        if not MIN_FRAME_BYTES <= mtu <= MAX_FRAME_BYTES:
            raise FrameError(
                f"--mtu {mtu} is outside [{MIN_FRAME_BYTES}, {MAX_FRAME_BYTES}] bytes per frame"
            )
        return LinkProfile(f"custom-{mtu}", mtu, 1000.0, "custom frame size")
    if name not in PROFILES:
        raise FrameError(
            f"unknown link profile {name!r}: use one of {', '.join(PROFILES)}, or --mtu BYTES"
        )
    return PROFILES[name]


def transfer_id(payload: bytes) -> bytes:
    """The 4-byte id of the transfer of ``payload``."""
    return hashlib.sha256(payload).digest()[:TRANSFER_ID_BYTES]


@dataclass(frozen=True)
class Frame:
    """One parsed frame."""

    transfer: bytes
    length: int
    mtu: int
    block: int
    symbol_id: int
    symbol: bytes

    @property
    def key(self) -> tuple[int, int]:
        return self.block, self.symbol_id

    def packet(self) -> bytes:
        """The RaptorQ packet: its 4-byte payload id (block, symbol id) and the symbol."""
        return bytes([self.block]) + self.symbol_id.to_bytes(3, "big") + self.symbol


def _head(transfer: bytes, length: int, mtu: int, block: int, symbol_id: int) -> bytes:
    fields = np.array([length, mtu, block, symbol_id], dtype=np.uint64)
    return bytes([FRAME_MAGIC]) + transfer + encode_uvarints(fields)


def frame_tag(key: bytes, body: bytes) -> bytes:
    """The 8-byte tag of a tagged frame's ``body`` (every byte before the tag)."""
    return hmac.digest(key, _TAG_DOMAIN + body, "sha256")[:TAG_BYTES]


def trailer_bytes(key: bytes | None) -> int:
    """The bytes after the symbol: a tag with a link key, else a CRC."""
    return TAG_BYTES if key is not None else CRC_BYTES


def build_frame(frame: Frame, key: bytes | None = None) -> bytes:
    """The bytes of ``frame``: CRC included, or tagged with the link key ``key``."""
    body = _head(frame.transfer, frame.length, frame.mtu, frame.block, frame.symbol_id)
    body += frame.symbol
    if key is None:
        return body + _CRC.pack(zlib.crc32(body))
    body = bytes([TAGGED_FRAME_MAGIC]) + body[1:]
    return body + frame_tag(key, body)


def _checked_body(data: bytes, key: bytes | None) -> bytes:
    """``data`` without its trailer, once the trailer holds: the CRC of an untagged
    frame on a link without a key, the tag of a tagged one on a link with one."""
    if len(data) < MIN_FRAME_BYTES - 8 or data[0] not in (FRAME_MAGIC, TAGGED_FRAME_MAGIC):
        raise FrameError("not a plada frame (magic byte or length)")
    tagged = data[0] == TAGGED_FRAME_MAGIC
    if tagged and key is None:
        raise FrameTagError(
            "a tagged frame, and this receiver has no link key: dropped; give it the "
            "ground station's key (plada-receive daemon --link-key FILE)"
        )
    if not tagged and key is not None:
        raise FrameTagError(
            "an untagged frame on a link with a link key: dropped (forged, or sent "
            "without plada-send frames --link-key)"
        )
    if tagged:
        body, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(frame_tag(key, body), tag):  # type: ignore[arg-type]
            raise FrameTagError("frame fails its tag: damaged, forged or made with another key")
        return body
    body, crc = data[:-CRC_BYTES], data[-CRC_BYTES:]
    if zlib.crc32(body) != _CRC.unpack(crc)[0]:
        raise FrameError("frame fails its CRC: damaged on the link; dropped")
    return body


def parse_frame(data: bytes, key: bytes | None = None) -> Frame:
    """A frame from untrusted bytes; ``FrameError`` for a damaged or foreign one, and
    ``FrameTagError`` for one whose tag fails, or that is tagged (or not) when the
    receiver's link key ``key`` says otherwise."""
    body = _checked_body(data, key)
    transfer = body[1 : 1 + TRANSFER_ID_BYTES]
    try:
        values, used = decode_uvarints(body[1 + TRANSFER_ID_BYTES :], 4)
    except PayloadError as exc:
        raise FrameError(f"frame header is malformed ({exc})") from exc
    length, mtu, block, symbol_id = (int(v) for v in values)
    symbol = body[1 + TRANSFER_ID_BYTES + used :]
    if not 1 <= length <= MAX_TRANSFER_BYTES or not MIN_MTU <= mtu <= MAX_FRAME_BYTES:
        raise FrameError(f"frame declares length {length} and mtu {mtu}: out of range")
    if block > 255 or symbol_id > MAX_SYMBOL_ID or not symbol:
        raise FrameError("frame declares a block or symbol id out of range")
    return Frame(transfer, length, mtu, block, symbol_id, symbol)


MIN_MTU = 8
MAX_SYMBOL_ID = (1 << 21) - 1  # a 3-byte uvarint; a carousel starts over past it


def _overhead(length: int, mtu: int, last_block: int, trailer: int = CRC_BYTES) -> int:
    """Header and trailer bytes of the widest frame of a transfer (its last block, the
    largest symbol id)."""
    return len(_head(bytes(TRANSFER_ID_BYTES), length, mtu, last_block, MAX_SYMBOL_ID)) + trailer


def _symbol_bytes(length: int, mtu: int) -> int:
    """The symbol size raptorq derives from (``length``, ``mtu``): the mtu, rounded down
    to its alignment, which depends on the size."""
    from raptorq import Encoder

    probe = bytes(min(length, 4096))
    return len(Encoder.with_defaults(probe, mtu).get_encoded_packets(0)[0]) - 4


MAX_BLOCK_SYMBOLS = 56403  # RFC 6330's largest source block (K'max), raptorq's limit


def source_blocks(length: int, symbol_bytes: int) -> int:
    """How many source blocks raptorq splits a ``length``-byte payload of
    ``symbol_bytes``-byte symbols into (as few as fit K'max symbols each)."""
    symbols = -(-length // symbol_bytes)
    return -(-symbols // MAX_BLOCK_SYMBOLS)


def _fitting_mtu(length: int, frame_bytes: int, last_block: int = 0, trailer: int = 4) -> int:
    """The coding parameter for a payload of ``length`` in frames of ``frame_bytes``: the
    largest symbols that fit give the fewest frames, K; of the sizes that make K frames
    the smallest is taken, so the padding of the last symbol is not paid in every frame."""
    widest = frame_bytes - _overhead(length, frame_bytes, last_block, trailer)
    if widest < MIN_MTU:
        raise FrameError(f"frames of {frame_bytes} bytes cannot hold a symbol; use larger frames")
    source = -(-length // _symbol_bytes(length, widest))
    for mtu in range(max(MIN_MTU, -(-length // source)), widest):
        if -(-length // _symbol_bytes(length, mtu)) == source:
            return mtu
    return widest


@dataclass
class FrameEncoder:
    """The frames of one payload for one frame size: source frames, then repair."""

    payload: bytes
    frame_bytes: int
    mtu: int = 0
    key: bytes | None = field(default=None, repr=False)  # the link key: tagged frames

    def __post_init__(self) -> None:
        if not 1 <= len(self.payload) <= MAX_TRANSFER_BYTES:
            raise FrameError(f"a payload of {len(self.payload)} bytes cannot be framed")
        from raptorq import Encoder

        chosen, trailer = self.mtu, trailer_bytes(self.key)
        self.mtu = chosen or _fitting_mtu(len(self.payload), self.frame_bytes, 0, trailer)
        while True:
            self._encoder = Encoder.with_defaults(self.payload, self.mtu)
            self._source = self._encoder.get_encoded_packets(0)  # the payload's own symbols
            last_block = self._source[-1][0]
            if chosen or not last_block:
                break
            fitting = _fitting_mtu(len(self.payload), self.frame_bytes, last_block, trailer)
            if fitting == self.mtu:
                break
            self.mtu = fitting  # so many blocks that the block field takes another byte
        self.transfer = transfer_id(self.payload)
        self.source_count = len(self._source)
        self._blocks = self._source[-1][0] + 1
        widest_block = max(Counter(packet[0] for packet in self._source).values())
        self.max_repair = self._blocks * (MAX_SYMBOL_ID + 1 - widest_block)

    @property
    def symbol_bytes(self) -> int:
        """The size of one symbol (each frame carries one)."""
        return len(self._source[0]) - 4

    def frames(self, repair: int = 0) -> list[bytes]:
        """Every source frame (all blocks), then ``repair`` repair frames, spread over the
        blocks."""
        return [self._frame(packet) for packet in self._packets(repair)]

    def _packets(self, repair: int) -> list[bytes]:
        """The RaptorQ packets of :meth:`frames`."""
        if repair > self.max_repair:
            raise FrameError(
                f"{repair} repair frames run past the largest symbol id; at most "
                f"{self.max_repair} for this payload"
            )
        packets = list(self._source)
        if repair:
            keys = {packet[:4] for packet in self._source}
            every = self._encoder.get_encoded_packets(-(-repair // self._blocks))
            by_block: dict[int, list[bytes]] = {}
            for packet in every:
                if packet[:4] not in keys:
                    by_block.setdefault(packet[0], []).append(packet)
            rounds = zip(*by_block.values(), strict=False)  # block after block, in turn
            packets += [packet for turn in rounds for packet in turn][:repair]
        return packets

    def carousel(self) -> Iterator[bytes]:
        """Source frames, then fresh repair frames, for ever (a one-way link's loop);
        past the largest symbol id it starts over."""
        while True:
            sent, repair = 0, 0
            while True:
                packets = self._packets(repair)  # the binding makes them from the first
                yield from (self._frame(packet) for packet in packets[sent:])
                if repair == self.max_repair:
                    break
                sent = len(packets)  # then twice as many: making them costs twice the last
                repair = min(self.max_repair, max(16, 2 * repair, self.source_count // 4))

    def _frame(self, packet: bytes) -> bytes:
        block, symbol_id = packet[0], int.from_bytes(packet[1:4], "big")
        return build_frame(
            Frame(self.transfer, len(self.payload), self.mtu, block, symbol_id, packet[4:]),
            self.key,
        )


@dataclass
class TransferAssembler:
    """Collects the frames of one transfer until the payload decodes."""

    transfer: bytes
    length: int
    mtu: int
    held: set[tuple[int, int]] = field(default_factory=set)  # (block, symbol id) taken
    duplicates: int = 0
    payload: bytes | None = None

    def __post_init__(self) -> None:
        from raptorq import Decoder

        self._decoder = Decoder.with_defaults(self.length, self.mtu)
        self.symbol_bytes = _symbol_bytes(self.length, self.mtu)  # every frame's, in a transfer
        self.source_count = -(-self.length // self.symbol_bytes)
        self.blocks = source_blocks(self.length, self.symbol_bytes)
        # RaptorQ decodes from K + 2 distinct symbols but for one time in a million: a
        # transfer that holds twice as many without decoding holds junk
        self.capacity = 2 * self.source_count + 32

    @property
    def needed(self) -> int:
        """How many distinct frames a decode takes at least (K; 0 before the first)."""
        return self.source_count if self.held else 0

    def add(self, frame: Frame) -> bytes | None:
        """Take one frame; the payload once it decodes (and matches its transfer id).

        ``FrameError`` for a frame that cannot belong to this transfer (other length,
        coding or symbol size, a block it has not got): dropped, the transfer goes on.
        ``TransferError`` when the frames decode to bytes that are not the payload, or
        when twice the frames a decode takes have not decoded."""
        if self.payload is not None:
            return self.payload
        if (frame.length, frame.mtu) != (self.length, self.mtu):
            raise FrameError("frame disagrees with its transfer's length or coding")
        if len(frame.symbol) != self.symbol_bytes:
            raise FrameError(
                f"frame holds a {len(frame.symbol)}-byte symbol; its transfer's are "
                f"{self.symbol_bytes} bytes"
            )
        if frame.block >= self.blocks:  # raptorq would panic (and print a backtrace)
            raise FrameError(f"frame names block {frame.block}, which its transfer has not")
        if frame.key in self.held:
            self.duplicates += 1
            return None
        try:
            decoded = self._decoder.decode(frame.packet())
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a raptorq panic (a BaseException): kept out above
            raise FrameError(f"frame cannot be decoded: {type(exc).__name__}") from exc
        self.held.add(frame.key)
        if decoded is None:
            if len(self.held) >= self.capacity:
                raise TransferError(
                    f"{len(self.held)} frames held without a decode, twice what one takes"
                )
            return None
        decoded = bytes(decoded)
        if transfer_id(decoded) != self.transfer:
            raise TransferError("frames decoded to bytes that are not their transfer's payload")
        self.payload = decoded
        return decoded


def pack_stream(frames: list[bytes]) -> bytes:
    """Frames as one stream (``plada-send frames --stream``, ``POST /frames``)."""
    return b"".join(STREAM_LENGTH.pack(len(frame)) + frame for frame in frames)


def split_stream(data: bytes) -> list[bytes]:
    """The frames of a stream (a torn last frame is left out)."""
    return list(read_stream(io.BytesIO(data)))


def whole_frames(data: bytes) -> tuple[list[bytes], int]:
    """The frames of a stream and how many of its bytes they take: what follows them is
    a torn last frame (a write cut short), if anything."""
    frames = split_stream(data)
    return frames, sum(STREAM_LENGTH.size + len(frame) for frame in frames)


def read_stream(handle: BinaryIO) -> Iterator[bytes]:
    """The frames of a stream read from ``handle`` as they come, to its end (a torn last
    frame is left out)."""
    while len(head := handle.read(STREAM_LENGTH.size)) == STREAM_LENGTH.size:
        (length,) = STREAM_LENGTH.unpack(head)
        frame = handle.read(length)
        if len(frame) < length:
            return
        yield frame
