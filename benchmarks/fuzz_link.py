"""The link's parsers as fuzz targets: frames, the frames inbox and replies.

Shared by the atheris driver (``python -m benchmarks.fuzz_payload --mode frame``,
``frames-inbox``, ``reply``) and the hypothesis tests (``tests/test_fuzz.py``).
The contract: a parser returns its result or raises a ``PladaError`` subtype, and
the frames inbox takes any file in without an exception, leaving nothing behind.

The first byte of each input picks a gate so that the fuzzer reaches past it:
even, the bytes as they came (the CRC, tag or MAC must hold by chance); odd, the
bytes with a valid trailer made for them (a CRC, a tag with the link key, a MAC with
the reply key), as an attacker with the key would send, so the header parser, the
assembler (RaptorQ) and the inbox's rules all see arbitrary content.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from protocol.errors import PladaError
from protocol.frames import (
    CRC_BYTES,
    TAG_BYTES,
    FrameEncoder,
    TransferAssembler,
    frame_tag,
    pack_stream,
    parse_frame,
    split_stream,
)
from protocol.replies import (
    REPLY_BYTES,
    Reply,
    ReplyState,
    decode_reply,
    encode_reply,
    reply_mac,
    split_replies,
)
from receiver.frames_inbox import FrameSettings, FramesInbox

LINK_MODES = ("frame", "frames-inbox", "reply")
LINK_KEY = bytes(range(32))
REPLY_KEY = bytes(range(32, 64))
TAGGED_MAGIC, MAC_BODY = 0xF3, REPLY_BYTES - 8
_ASSEMBLERS: dict[tuple, TransferAssembler] = {}


def _trailed(body: bytes, tagged: bool) -> bytes:
    """``body`` with a valid trailer: a CRC, or (magic set to tagged) a tag."""
    if tagged:
        body = bytes([TAGGED_MAGIC]) + body[1:] if body else body
        return body + frame_tag(LINK_KEY, body)
    return body + struct.pack("<I", zlib.crc32(body))


def frame_input(data: bytes) -> str:
    """One frame through ``parse_frame`` (with and without the link key) and, once it
    parses, into an assembler of its transfer: the outcome's name."""
    gate, body = (data[0], data[1:]) if data else (0, b"")
    tagged = bool(gate & 2)
    frame_bytes = _trailed(body, tagged) if gate & 1 else body
    key = LINK_KEY if tagged else None
    try:
        frame = parse_frame(frame_bytes, key)
        if len(_ASSEMBLERS) > 16:
            _ASSEMBLERS.clear()
        head = (frame.transfer, frame.length, frame.mtu)
        if head not in _ASSEMBLERS:
            _ASSEMBLERS[head] = TransferAssembler(*head)
        decoded = _ASSEMBLERS[head].add(frame)
    except PladaError as exc:
        return type(exc).__name__
    return "decoded" if decoded is not None else "held"


def reply_input(data: bytes) -> str:
    """One reply file through ``split_replies`` and ``decode_reply``."""
    gate, body = (data[0], data[1:]) if data else (0, b"")
    if gate & 1:  # each 16-byte body MACed with the device's key
        pieces = [body[i : i + MAC_BODY] for i in range(0, len(body), MAC_BODY)]
        body = b"".join(_maced(piece) for piece in pieces if len(piece) == MAC_BODY)
    outcomes = []
    for raw in split_replies(body):
        try:
            decode_reply(raw, REPLY_KEY)
            outcomes.append("accepted")
        except PladaError as exc:
            outcomes.append(type(exc).__name__)
    return outcomes[0] if outcomes else "empty"


def _maced(body: bytes) -> bytes:
    """``body`` as the device would MAC it (its fields as they are)."""
    return body + reply_mac(REPLY_KEY, body)


_INBOX: list[FramesInbox] = []


def _frames_inbox() -> FramesInbox:
    if not _INBOX:
        logging.getLogger("plada.receiver").addHandler(logging.NullHandler())
        memory = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsync costs nothing there
        home = Path(tempfile.mkdtemp(prefix="plada-fuzz-frames-", dir=memory))
        (home / "inbox").mkdir()
        limits = FrameSettings(max_transfers=8, max_log_bytes=256 << 10, max_payload_bytes=64 << 10)
        _INBOX.append(FramesInbox(home, home / "inbox", limits, link_key=None))
    return _INBOX[0]


def frames_inbox_input(data: bytes) -> str:
    """One file into a real frames inbox pass: a frame file (gate bit 1 clear) or a
    stream file, its frames given valid CRCs (gate bit 0). Anything left in the frames
    folder, an exception, or a decoded payload that is not its transfer's is a finding."""
    inbox = _frames_inbox()
    gate, body = (data[0], data[1:]) if data else (0, b"")
    stream = bool(gate & 2)
    if gate & 1:
        pieces = split_stream(body) if stream else [body]
        body = pack_stream([_trailed(piece, False) for piece in pieces if piece])
        body = body if stream else body[2:]
    name = inbox.folder / ("fuzz.frames" if stream else "fuzz.frame")
    name.write_bytes(body)
    completed = inbox.poll()
    if name.exists():
        raise AssertionError("the frames inbox left a frame file behind")
    for payload in (inbox.inbox).iterdir():  # decoded: what the intake would take next
        payload.unlink()
    return "decoded" if completed else "held"


def seed_link_inputs(mode: str) -> list[bytes]:
    """Valid inputs of ``mode``, from the real encoders."""
    payloads = [bytes(range(256)) * 3, b"plada" * 40, bytes(1000)]
    if mode == "frame":
        seeds = []
        for payload in payloads:
            for gate, key in ((0, None), (2, LINK_KEY)):
                frames = FrameEncoder(payload, 64, key=key).frames(repair=2)
                seeds += [bytes([gate]) + frame for frame in frames[:3]]
                trailer = TAG_BYTES if key else CRC_BYTES
                seeds += [bytes([gate | 1]) + frame[:-trailer] for frame in frames[:2]]
        return seeds
    if mode == "frames-inbox":
        seeds = []
        for payload in payloads:
            frames = FrameEncoder(payload, 115).frames(repair=2)
            seeds.append(bytes([2]) + pack_stream(frames))
            seeds.append(bytes([0]) + frames[0])
            seeds.append(bytes([3]) + pack_stream([f[:-CRC_BYTES] for f in frames]))
        return seeds
    replies = [
        encode_reply(Reply(b"\x01\x02\x03\x04", state, 5, 9, 1_800_000_000), REPLY_KEY)
        for state in ReplyState
    ]
    return [bytes([0]) + b"".join(replies), bytes([1]) + b"".join(r[:MAC_BODY] for r in replies)]


def link_input(data: bytes, mode: str) -> str:
    """One input of ``mode`` (one of ``LINK_MODES``)."""
    if mode == "frame":
        return frame_input(data)
    if mode == "frames-inbox":
        return frames_inbox_input(data)
    return reply_input(data)


def clean_up() -> None:
    """Remove the frames inbox's home (the end of a campaign)."""
    for inbox in _INBOX:
        with contextlib.suppress(OSError):
            shutil.rmtree(inbox.home)
    _INBOX.clear()
