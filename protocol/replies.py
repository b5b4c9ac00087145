"""Replies: a device's word on a transfer, 24 bytes, for whatever return link exists.

A device that has an uplink (often none: frames work without one) says how far it
got with a transfer: "held h of the k frames needed", then "done, job queued" or
"refused" (the frames decoded, the payload did not pass the intake). A reply is
MACed with a 32-byte key the device and its ground station share (a signature would
not fit: Ed25519's alone is 64 bytes); the sender stops its carousel once the device
says it is done. Layout (``protocol/FORMAT.md``), integers little-endian::

    magic     1 byte   0xF2 (replies, version 1)
    transfer  4 bytes  the transfer id of the frames
    state     1 byte   1 receiving, 2 queued, 3 refused
    held      3 bytes  distinct frames held (saturates at 2^24 - 1)
    needed    3 bytes  frames a decode takes at least (K)
    time      4 bytes  when the device wrote it, Unix seconds
    mac       8 bytes  HMAC-SHA256(key, "plada-reply-1" || the 16 bytes above), cut to 8

Pure: reading keys from disk and moving replies are the callers' business.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from protocol.errors import ReplyError
from protocol.shared_keys import KEY_BYTES, new_shared_key, parse_shared_key

REPLY_MAGIC = 0xF2
REPLY_BYTES = 24
MAC_BYTES = 8
_DOMAIN = b"plada-reply-1"
_MAX_COUNT = (1 << 24) - 1
_BODY = struct.Struct("<B4sB3s3sI")


class ReplyState(enum.IntEnum):
    """How far a device got with a transfer."""

    RECEIVING = 1
    QUEUED = 2
    REFUSED = 3

    @property
    def final(self) -> bool:
        """Whether more frames can change nothing (the carousel may stop)."""
        return self is not ReplyState.RECEIVING


@dataclass(frozen=True)
class Reply:
    """One reply, as the device meant it."""

    transfer: bytes
    state: ReplyState
    held: int = 0
    needed: int = 0
    time: int = 0

    def text(self) -> str:
        """One line for a person."""
        if self.state is ReplyState.RECEIVING:
            return f"transfer {self.transfer.hex()}: held {self.held} of {self.needed} needed"
        if self.state is ReplyState.QUEUED:
            return f"transfer {self.transfer.hex()}: done, job queued"
        return f"transfer {self.transfer.hex()}: decoded, and the payload was refused"


def new_reply_key() -> bytes:
    """A fresh random key for a device's replies."""
    return new_shared_key()


def parse_reply_key(text: str) -> bytes:
    """A key from its hex text (the key file's content); ``ReplyError`` if malformed."""
    key = parse_shared_key(text)
    if key is None:
        raise ReplyError(f"a reply key is {KEY_BYTES} bytes written as {2 * KEY_BYTES} hex digits")
    return key


def reply_mac(key: bytes, body: bytes) -> bytes:
    """The 8-byte MAC of a reply's 16-byte ``body``."""
    return hmac.new(key, _DOMAIN + body, hashlib.sha256).digest()[:MAC_BYTES]


def encode_reply(reply: Reply, key: bytes) -> bytes:
    """The 24 bytes of ``reply``, MACed with ``key``."""
    if len(reply.transfer) != 4:
        raise ValueError("a transfer id is 4 bytes")
    body = _BODY.pack(
        REPLY_MAGIC,
        reply.transfer,
        int(reply.state),
        min(reply.held, _MAX_COUNT).to_bytes(3, "little"),
        min(reply.needed, _MAX_COUNT).to_bytes(3, "little"),
        reply.time & 0xFFFFFFFF,
    )
    return body + reply_mac(key, body)


def decode_reply(data: bytes, key: bytes) -> Reply:
    """The reply in ``data``, from untrusted bytes; ``ReplyError`` unless it is one, well
    formed and MACed with ``key``."""
    if len(data) != REPLY_BYTES or data[0] != REPLY_MAGIC:
        raise ReplyError(f"not a plada reply (magic byte, or not {REPLY_BYTES} bytes)")
    body, mac = data[: _BODY.size], data[_BODY.size :]
    if not hmac.compare_digest(reply_mac(key, body), mac):
        raise ReplyError("reply fails its MAC: damaged, forged, or made with another key")
    _, transfer, state, held, needed, when = _BODY.unpack(body)
    try:
        state = ReplyState(state)
    except ValueError as exc:
        raise ReplyError(f"reply declares an unknown state {state}") from exc
    return Reply(
        transfer, state, int.from_bytes(held, "little"), int.from_bytes(needed, "little"), when
    )


def split_replies(data: bytes) -> list[bytes]:
    """The replies in a file an uplink delivered: one or more, back to back (a torn last
    one is left out)."""
    whole = len(data) - len(data) % REPLY_BYTES
    return [data[i : i + REPLY_BYTES] for i in range(0, whole, REPLY_BYTES)]
