"""The return path: 24-byte MACed replies (codec, the device's outbox) and the
sender's carousel, which stops when the device says it is done."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ReplyError
from protocol.frames import FrameEncoder, TransferAssembler, parse_frame, split_stream
from protocol.replies import (
    REPLY_BYTES,
    Reply,
    ReplyState,
    decode_reply,
    encode_reply,
    new_reply_key,
    split_replies,
)
from receiver.reply_outbox import REPLY_KEY_FILE, ReplyOutbox, reply_key
from tests.subprocess_cli import cli, cli_env

KEY = bytes(range(32))
VECTOR = Path(__file__).parent / "vectors" / "signed-audience-v4.plada"

replies = st.builds(
    Reply,
    transfer=st.binary(min_size=4, max_size=4),
    state=st.sampled_from(list(ReplyState)),
    held=st.integers(0, (1 << 24) - 1),
    needed=st.integers(0, (1 << 24) - 1),
    time=st.integers(0, (1 << 32) - 1),
)


@given(replies)
def test_a_reply_is_24_bytes_and_round_trips(reply: Reply) -> None:
    data = encode_reply(reply, KEY)
    assert len(data) == REPLY_BYTES
    assert decode_reply(data, KEY) == reply


@given(replies, st.integers(0, REPLY_BYTES * 8 - 1))
def test_any_flipped_bit_or_another_key_is_refused(reply: Reply, bit: int) -> None:
    data = bytearray(encode_reply(reply, KEY))
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ReplyError):
        decode_reply(bytes(data), KEY)
    with pytest.raises(ReplyError):
        decode_reply(encode_reply(reply, KEY), new_reply_key())


@given(st.binary(max_size=80))
def test_arbitrary_bytes_are_a_typed_refusal(data: bytes) -> None:
    with pytest.raises(ReplyError):
        decode_reply(data, KEY)
    assert all(len(piece) == REPLY_BYTES for piece in split_replies(data))


def test_counts_saturate_and_the_layout_is_fixed() -> None:
    reply = Reply(b"\x01\x02\x03\x04", ReplyState.RECEIVING, 1 << 30, 7, 1_700_000_000)
    data = encode_reply(reply, KEY)
    # magic, transfer, state, held (saturated), needed, time: FORMAT.md's table
    assert data[:16].hex() == "f2" + "01020304" + "01" + "ffffff" + "070000" + "00f15365"
    assert decode_reply(data, KEY).held == (1 << 24) - 1


def test_the_outbox_says_progress_then_the_outcome_and_remembers(tmp_path) -> None:
    home, outbox = tmp_path / "home", tmp_path / "uplink"
    home.mkdir()
    box = ReplyOutbox(home, outbox, progress_seconds=0, repeat_seconds=3600, max_files=3)
    key = reply_key(home)
    assert (home / REPLY_KEY_FILE).stat().st_mode & 0o777 == 0o600
    transfer = b"\xaa\xbb\xcc\xdd"
    box.progress(transfer, 3, 10)
    box.progress(transfer, 3, 10)  # unchanged: not said again
    assert box.written == 1
    path = outbox / "aabbccdd.reply"
    assert decode_reply(path.read_bytes(), key).text() == "transfer aabbccdd: held 3 of 10 needed"
    box.outcome(transfer, queued=True)
    said = decode_reply(path.read_bytes(), key)
    assert said.state is ReplyState.QUEUED and (said.held, said.needed) == (3, 10)
    path.unlink()  # the uplink took it
    box.remind(transfer)  # too soon to say it again
    assert not path.exists()
    restarted = ReplyOutbox(home, outbox, repeat_seconds=0, max_files=3)
    restarted.remind(transfer)  # remembered over a restart, and said again
    assert decode_reply(path.read_bytes(), key).state is ReplyState.QUEUED
    for number in range(5):  # the outbox holds at most max_files replies
        restarted.outcome(bytes([0, 0, 0, number]), queued=False)
        time.sleep(0.01)
    assert len(list(outbox.glob("*.reply"))) == 3


def test_a_reply_key_open_to_others_or_malformed_is_refused(tmp_path) -> None:
    reply_key(tmp_path)
    (tmp_path / REPLY_KEY_FILE).chmod(0o644)
    with pytest.raises(ReplyError, match="chmod 600"):
        reply_key(tmp_path)
    (tmp_path / REPLY_KEY_FILE).chmod(0o600)
    (tmp_path / REPLY_KEY_FILE).write_text("not hex\n")
    with pytest.raises(ReplyError, match="delete it"):
        reply_key(tmp_path)


def _carousel(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli("plada-send"), "frames", str(VECTOR), "--link", "acoustic-64", "--carousel", *extra],
        env=cli_env(),
        capture_output=True,
        timeout=120,
    )


def test_the_carousel_streams_frames_that_rebuild_the_payload(tmp_path) -> None:
    done = _carousel(tmp_path, "--out", "-", "--rate", "0", "--max-frames", "40")
    assert done.returncode == 0, done.stderr
    frames = split_stream(done.stdout)
    assert len(frames) == 40 and b"stopped (max-frames) after 40 frames" in done.stderr
    payload = VECTOR.read_bytes()
    first = parse_frame(frames[0])
    assembler = TransferAssembler(first.transfer, first.length, first.mtu)
    for frame in frames[len(frames) - FrameEncoder(payload, 64).source_count - 2 :]:
        assembler.add(parse_frame(frame))  # the last frames alone, mostly repair
    assert assembler.payload == payload


def test_the_carousel_stops_when_the_device_says_done_or_refused(tmp_path) -> None:
    payload = VECTOR.read_bytes()
    transfer = FrameEncoder(payload, 64).transfer
    key_file, uplink = tmp_path / "device.key", tmp_path / "uplink"
    uplink.mkdir()
    key = new_reply_key()
    key_file.write_text(key.hex() + "\n")
    forged = encode_reply(Reply(transfer, ReplyState.QUEUED, 1, 1, 1), new_reply_key())
    (uplink / "forged.reply").write_bytes(forged)
    waiting = ["--out", "-", "--rate", "20000", "--until-done", str(uplink)]
    waiting += ["--reply-key", str(key_file)]
    run = _carousel(tmp_path, *waiting, "--max-frames", "100")
    assert run.returncode == 0 and b"stopped (max-frames)" in run.stderr  # forgery ignored
    assert b"1 replies failed their MAC" in run.stderr
    now = int(time.time())
    (uplink / "forged.reply").unlink()
    (uplink / "a.reply").write_bytes(  # an earlier send's word: refused an hour ago
        encode_reply(Reply(transfer, ReplyState.REFUSED, 9, 9, now - 3600), key)
    )
    run = _carousel(tmp_path, *waiting, "--max-frames", "100")
    assert run.returncode == 0 and b"stopped (max-frames)" in run.stderr
    assert b"1 replies older than the carousel ignored" in run.stderr
    (uplink / "a.reply").write_bytes(
        encode_reply(Reply(transfer, ReplyState.RECEIVING, 5, 9, now), key)
        + encode_reply(Reply(transfer, ReplyState.QUEUED, 9, 9, now + 1), key)
    )
    run = _carousel(tmp_path, *waiting, "--max-frames", "100000")
    assert run.returncode == 0, run.stderr
    assert b"stopped (done)" in run.stderr and b"done, job queued" in run.stderr
    refused = Reply(transfer, ReplyState.REFUSED, time=int(time.time()))
    (uplink / "a.reply").write_bytes(encode_reply(refused, key))
    run = _carousel(tmp_path, *waiting, "--max-frames", "100000")
    assert run.returncode == 2 and b"TransferRefusedError" in run.stderr


@pytest.mark.parametrize(
    "case, extra, error",
    [
        ("a regular file as --out", ["--out", "{tmp}/frames.bin"], "ConfigError"),
        ("--until-done without its key", ["--out", "-", "--until-done", "{tmp}"], "ConfigError"),
        (
            "a malformed reply key",
            ["--out", "-", "--until-done", "{tmp}", "--reply-key", "{tmp}/bad.key"],
            "KeyFileError",
        ),
        (
            "a missing reply key",
            ["--out", "-", "--until-done", "{tmp}", "--reply-key", "{tmp}/none.key"],
            "KeyFileError",
        ),
        ("a negative rate", ["--out", "-", "--rate", "-5"], "ConfigError"),
        ("a missing link key", ["--out", "-", "--link-key", "{tmp}/none.key"], "KeyFileError"),
        ("a malformed link key", ["--out", "-", "--link-key", "{tmp}/bad.key"], "KeyFileError"),
    ],
)
def test_careless_carousel_options_are_one_typed_line(tmp_path, case, extra, error) -> None:
    (tmp_path / "frames.bin").write_bytes(b"")
    (tmp_path / "bad.key").write_text("zz\n")
    run = _carousel(tmp_path, *(part.format(tmp=tmp_path) for part in extra))
    assert run.returncode == 2, (case, run.stderr)
    lines = run.stderr.decode().strip().splitlines()
    assert (
        lines[-1].startswith(f"plada-send: error: {error}: ")
        and "Traceback" not in run.stderr.decode()
    )
    assert (tmp_path / "frames.bin").read_bytes() == b""


def test_frame_files_refuse_carousel_only_options(tmp_path) -> None:
    run = subprocess.run(
        [
            *cli("plada-send"),
            "frames",
            str(VECTOR),
            "--link",
            "acoustic-64",
            "--out",
            str(tmp_path / "out"),
            "--rate",
            "300",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "--rate goes with --carousel" in run.stderr
    assert not (tmp_path / "out").exists()
    assert os.path.exists(VECTOR)
