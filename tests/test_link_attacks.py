"""The link under attack: forged frames with genuine headers, junk floods, old replies.

Each test plays one attacker with a transmitter against the real frames code (the
frames inbox, the reply outbox, the carousel's reply watch)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError, FrameTagError
from protocol.frames import (
    TAG_BYTES,
    Frame,
    FrameEncoder,
    build_frame,
    parse_frame,
)
from protocol.shared_keys import new_shared_key

LINK_KEY = bytes(range(32))


def _inbox(home: Path, link_key: bytes | None = None, replies=None, **limits):
    from receiver.frames_inbox import FrameSettings, FramesInbox

    (home / "inbox").mkdir(parents=True, exist_ok=True)
    return FramesInbox(home, home / "inbox", FrameSettings(**limits), replies, link_key)


def _drop(home: Path, frames: list[bytes], start: int = 0) -> None:
    for number, frame in enumerate(frames, start):
        (home / "frames" / f"f{number:07d}.frame").write_bytes(frame)


def _forgery(genuine: bytes, rng: random.Random, tagged: bool) -> bytes:
    """A frame with ``genuine``'s header (read off the air) and other symbol bytes:
    with a valid CRC, or tagged with a guessed tag."""
    frame = parse_frame(genuine, LINK_KEY)
    symbol = rng.randbytes(len(frame.symbol))
    forged = Frame(frame.transfer, frame.length, frame.mtu, frame.block, frame.symbol_id, symbol)
    if not tagged:
        return build_frame(forged)
    return build_frame(forged, LINK_KEY)[:-TAG_BYTES] + rng.randbytes(TAG_BYTES)


# --- tagged frames, the codec -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=3000),
    frame_bytes=st.sampled_from([51, 64, 115, 340]),
    where=st.integers(min_value=0),
    flip=st.integers(min_value=1, max_value=255),
)
def test_a_tagged_frame_parses_only_whole_and_with_its_key(payload, frame_bytes, where, flip):
    encoder = FrameEncoder(payload, frame_bytes, key=LINK_KEY)
    data = encoder.frames(repair=1)[-1]
    assert len(data) <= frame_bytes
    frame = parse_frame(data, LINK_KEY)
    assert frame.transfer == encoder.transfer and len(frame.symbol) == encoder.symbol_bytes
    damaged = bytearray(data)
    damaged[where % len(data)] ^= flip
    with pytest.raises(FrameError):  # any changed byte: the tag fails (or the magic)
        parse_frame(bytes(damaged), LINK_KEY)
    with pytest.raises(FrameTagError):  # another link's key
        parse_frame(data, new_shared_key())
    with pytest.raises(FrameTagError):  # a receiver without a key cannot check it
        parse_frame(data)
    untagged = FrameEncoder(payload, frame_bytes).frames()[0]
    with pytest.raises(FrameTagError):  # a CRC-only frame on a keyed link
        parse_frame(untagged, LINK_KEY)


def test_tags_cost_four_bytes_a_frame_over_the_crc() -> None:
    payload = random.Random(1).randbytes(5000)
    plain, tagged = FrameEncoder(payload, 64), FrameEncoder(payload, 64, key=LINK_KEY)
    assert tagged.symbol_bytes >= plain.symbol_bytes - 4
    assert max(len(f) for f in tagged.frames(repair=8)) <= 64


# --- finding 1: forged frames with genuine headers ----------------------------------------


@pytest.mark.parametrize("tagged_forgeries", [False, True])
def test_forged_frames_with_genuine_headers_cost_a_keyed_receiver_no_genuine_frame(
    tmp_path, tagged_forgeries
) -> None:
    """One forgery beside every fourth genuine frame (20% of what arrives), each copying
    that frame's header and arriving first: with the link key the transfer decodes from
    the very genuine frames it needs without them, and nothing is ever polluted."""
    home = tmp_path / "home"
    inbox = _inbox(home, LINK_KEY)
    rng = random.Random(7)
    payload = rng.randbytes(4000)
    genuine = FrameEncoder(payload, 64, key=LINK_KEY).frames()
    needed = FrameEncoder(payload, 64, key=LINK_KEY).source_count
    arriving, forged = [], 0
    for number, frame in enumerate(genuine[:needed]):
        if number % 4 == 0 or number == needed - 1:
            arriving.append(_forgery(frame, rng, tagged_forgeries))
            forged += 1
        arriving.append(frame)
    _drop(home, arriving[:-2])  # all but the last genuine frame needed, and its forgery
    assert inbox.poll() == 0
    assert inbox.report()[0]["held"] == needed - 1
    _drop(home, arriving[-2:], start=len(arriving))
    assert inbox.poll() == 1
    assert [p.read_bytes() for p in (home / "inbox").iterdir()] == [payload]
    assert inbox.stats["tag_rejected"] == forged and "polluted" not in inbox.stats


def test_a_keyed_receiver_drops_every_frame_of_an_unkeyed_sender(tmp_path) -> None:
    home = tmp_path / "home"
    inbox = _inbox(home, LINK_KEY)
    _drop(home, FrameEncoder(random.Random(2).randbytes(900), 64).frames(repair=4))
    assert inbox.poll() == 0 and inbox.transfers == {}
    assert inbox.stats["tag_rejected"] == inbox.stats["frames"] + inbox.stats["tag_rejected"]


def test_the_daemon_refuses_a_link_key_open_to_others_with_one_line(tmp_path) -> None:
    from protocol.errors import KeyFileError
    from protocol.shared_keys import key_text, read_link_key_file

    path = tmp_path / "link.key"
    path.write_text(key_text(LINK_KEY))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_link_key_file(path)
    path.chmod(0o600)
    assert read_link_key_file(path) == LINK_KEY
    path.write_text("not a key\n")
    with pytest.raises(KeyFileError, match="plada-send link-key"):
        read_link_key_file(path)


# --- finding 3: frames held for a transfer that never finishes ----------------------------


def test_the_log_quota_holds_at_every_append_not_only_when_a_transfer_opens(tmp_path) -> None:
    """One transfer claiming a mebibyte, fed distinct frames without end: its log (and
    what is held in memory) stops at the byte quota."""
    home = tmp_path / "home"
    inbox = _inbox(home, max_log_bytes=40_000)
    rng = random.Random(3)
    head = parse_frame(FrameEncoder(rng.randbytes(1 << 20), 64).frames()[0])
    for round_ in range(3):
        junk = [
            build_frame(
                Frame(head.transfer, head.length, head.mtu, 0, i, rng.randbytes(len(head.symbol)))
            )
            for i in range(round_ * 1000, (round_ + 1) * 1000)
        ]
        _drop(home, junk, start=round_ * 1000)
        inbox.poll()
        logged = sum(p.stat().st_size for p in (home / "transfers").glob("*.log"))
        assert logged <= 40_000
    assert inbox.stats["over_quota"] > 0
    assert len(inbox.transfers[head.transfer].assembler.held) < 1000


# --- finding 7: eviction prefers the transfers with the least evidence --------------------


def test_a_flood_of_one_frame_junk_transfers_never_evicts_a_genuine_transfer(tmp_path) -> None:
    home = tmp_path / "home"
    inbox = _inbox(home, max_transfers=4)
    rng = random.Random(4)
    payload = rng.randbytes(3000)
    genuine = FrameEncoder(payload, 64).frames(repair=10)
    _drop(home, genuine[:5])
    inbox.poll()
    for round_ in range(4):  # 64 made-up transfers of one frame each, per genuine frame
        junk = [FrameEncoder(rng.randbytes(4000), 64).frames()[0] for _ in range(64)]
        _drop(home, junk, start=10_000 + round_ * 100)
        inbox.poll()
        assert len(inbox.transfers) <= 4
    assert inbox.stats["evicted"] >= 250
    transfer = FrameEncoder(payload, 64).transfer
    assert len(inbox.transfers[transfer].assembler.held) == 5  # kept through the flood
    _drop(home, genuine[5:], start=20_000)
    assert inbox.poll() == 1


# --- finding 2: junk cannot leave permanent state or push genuine state out ---------------


def test_done_records_are_bounded_and_the_newest_are_kept(tmp_path) -> None:
    home = tmp_path / "home"
    inbox = _inbox(home, max_done_records=3)
    transfers = []
    for number in range(5):
        encoder = FrameEncoder(random.Random(number).randbytes(500), 64)
        transfers.append(encoder.transfer.hex())
        _drop(home, encoder.frames(), start=number * 100)
        assert inbox.poll() == 1
    kept = sorted(p.stem for p in (home / "transfers").glob("*.done"))
    assert kept == sorted(transfers[2:])
    restarted = _inbox(home, max_done_records=3)
    assert sorted(t.hex() for t in restarted._finished) == kept


def test_junk_progress_never_pushes_a_final_reply_out_nor_rewrites_the_state_file(
    tmp_path,
) -> None:
    from protocol.replies import ReplyState, decode_reply
    from receiver.reply_outbox import ReplyOutbox, reply_key

    home = tmp_path / "home"
    home.mkdir()
    box = ReplyOutbox(home, home / "outbox", progress_seconds=0, max_files=8)
    genuine = b"\x0a\x0b\x0c\x0d"
    box.progress(genuine, 5, 10)
    box.outcome(genuine, queued=True)
    state = home / "replies.json"
    written = state.stat().st_mtime_ns, state.read_bytes()
    for number in range(300):  # one junk frame each, for made-up transfers
        box.progress(number.to_bytes(4, "big"), 1, 40)
    replies = list((home / "outbox").glob("*.reply"))
    assert len(replies) == 8
    said = decode_reply((home / "outbox" / "0a0b0c0d.reply").read_bytes(), reply_key(home))
    assert said.state is ReplyState.QUEUED
    assert (state.stat().st_mtime_ns, state.read_bytes()) == written
    assert list(json.loads(state.read_text())) == ["0a0b0c0d"]


# --- finding 7: an old reply is an earlier send's -----------------------------------------


def test_a_reply_older_than_the_carousel_is_ignored(tmp_path) -> None:
    from protocol.replies import Reply, ReplyState, encode_reply
    from sender.link.carousel import ReplyWatch

    key, transfer = new_shared_key(), b"\x01\x02\x03\x04"
    now = int(time.time())
    old = Reply(transfer, ReplyState.REFUSED, 9, 9, now - 3600)
    (tmp_path / "old.reply").write_bytes(encode_reply(old, key))
    watch = ReplyWatch(tmp_path, key, transfer, not_before=now - 300)
    assert watch.poll() is None and watch.stale == 1
    fresh = Reply(transfer, ReplyState.QUEUED, 9, 9, now)
    (tmp_path / "fresh.reply").write_bytes(encode_reply(fresh, key))
    assert watch.poll() == fresh
