"""Frames over a lossy link: any K+2 frames in any order, with duplicates, rebuild the
payload; damaged frames fail their CRC; transfers interleave; headers stay small; the
test vector holds; `plada-send frames` writes what it says."""

from __future__ import annotations

import json
import random
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError
from protocol.frames import (
    PROFILES,
    FrameEncoder,
    TransferAssembler,
    link_profile,
    pack_stream,
    parse_frame,
    split_stream,
    transfer_id,
)
from tests.subprocess_cli import cli, cli_env

VECTOR = Path(__file__).parent / "vectors" / "frames-acoustic-64.json"


def _assemble(frames: list[bytes]) -> bytes | None:
    first = parse_frame(frames[0])
    assembler = TransferAssembler(first.transfer, first.length, first.mtu)
    for data in frames:
        payload = assembler.add(parse_frame(data))
        if payload is not None:
            return payload
    return None


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=6000),
    profile=st.sampled_from(sorted(PROFILES)),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_k_plus_two_frames_in_any_order_with_duplicates_rebuild(payload, profile, seed):
    rng = random.Random(seed)
    encoder = FrameEncoder(payload, PROFILES[profile].frame_bytes)
    frames = encoder.frames(repair=encoder.source_count + 4)
    assert all(len(frame) <= PROFILES[profile].frame_bytes for frame in frames)
    chosen = rng.sample(frames, encoder.source_count + 2)  # any K + 2: a loss pattern
    chosen += rng.choices(chosen, k=rng.randint(0, 5))  # duplicates
    rng.shuffle(chosen)
    assert _assemble(chosen) == payload


def test_source_frames_alone_rebuild_and_k_frames_nearly_always_do() -> None:
    rng = random.Random(7)
    payload = rng.randbytes(20_000)
    encoder = FrameEncoder(payload, 64)
    frames = encoder.frames(repair=encoder.source_count)
    assert _assemble(frames[: encoder.source_count]) == payload
    exactly_k = sum(
        _assemble(rng.sample(frames, encoder.source_count)) == payload for _ in range(40)
    )
    assert exactly_k >= 36  # RFC 6330: a decode from K symbols fails about 1 in 100


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_bit_flip_is_caught_by_the_crc(profile: str) -> None:
    frame = FrameEncoder(b"payload bytes " * 40, PROFILES[profile].frame_bytes).frames()[0]
    for bit in range(0, len(frame) * 8, 7):
        damaged = bytearray(frame)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FrameError):
            parse_frame(bytes(damaged))


def test_interleaved_transfers_both_complete() -> None:
    first, second = b"first payload " * 300, b"the second one " * 500
    streams = [FrameEncoder(data, 115).frames(repair=10) for data in (first, second)]
    assemblers: dict[bytes, TransferAssembler] = {}
    done = {}
    mixed = [frame for pair in zip(*streams, strict=False) for frame in pair]
    mixed += streams[1][len(streams[0]) :]
    for data in mixed:
        frame = parse_frame(data)
        assembler = assemblers.setdefault(
            frame.transfer, TransferAssembler(frame.transfer, frame.length, frame.mtu)
        )
        payload = assembler.add(frame)
        if payload is not None:
            done[frame.transfer] = payload
    assert done == {transfer_id(first): first, transfer_id(second): second}


def test_foreign_and_inconsistent_frames_are_refused() -> None:
    frames = FrameEncoder(b"x" * 500, 64).frames()
    for junk in (b"", b"\xf1", b"hello world, not a frame at all", frames[0][:-1]):
        with pytest.raises(FrameError):
            parse_frame(junk)
    first = parse_frame(frames[0])
    assembler = TransferAssembler(first.transfer, first.length + 1, first.mtu)
    with pytest.raises(FrameError, match="disagrees"):
        assembler.add(first)
    with pytest.raises(FrameError, match="unknown link profile"):
        link_profile("carrier-pigeon")
    with pytest.raises(FrameError, match="--mtu"):
        link_profile(mtu=8)


def test_stray_frames_with_a_valid_crc_are_dropped_and_the_transfer_goes_on(tmp_path) -> None:
    """Frames that name the transfer but a block it has not got (raptorq itself would
    panic on them) or a symbol of another size are dropped and counted, never held, and
    the genuine frames still rebuild the payload."""
    from protocol.frames import Frame, build_frame

    home = tmp_path / "home"
    payload = random.Random(8).randbytes(2000)
    frames = FrameEncoder(payload, 64).frames(repair=6)
    first = parse_frame(frames[0])
    strays = [
        build_frame(Frame(first.transfer, first.length, first.mtu, 3, 1, first.symbol)),
        build_frame(Frame(first.transfer, first.length, first.mtu, 0, 90, b"x" * 5)),
    ]
    assembler = TransferAssembler(first.transfer, first.length, first.mtu)
    for stray, reason in zip(strays, ("block 3", "5-byte symbol"), strict=True):
        with pytest.raises(FrameError, match=reason):
            assembler.add(parse_frame(stray))
    assert not assembler.held
    inbox = _frames_inbox(home)
    _drop(home, [strays[0], strays[1], *frames[:3], *strays, *frames[3:]])
    assert inbox.poll() == 1 and inbox.stats["inconsistent"] == 4
    assert (home / "inbox" / f"frames-{transfer_id(payload).hex()}.plada").read_bytes() == payload


@pytest.mark.parametrize(
    ("length", "mtu"), [(1000, 8), (451_224, 8), (451_225, 8), (1_000_000, 8), (1_000_000, 24)]
)
def test_the_block_count_is_raptorqs(length: int, mtu: int) -> None:
    """The assembler's block count (which keeps foreign blocks away from raptorq) is the
    encoder's own, on both sides of the K'max boundary."""
    from raptorq import Encoder

    from protocol.frames import source_blocks

    source = Encoder.with_defaults(bytes(length), mtu).get_encoded_packets(0)
    assert source_blocks(length, len(source[0]) - 4) == source[-1][0] + 1


def test_a_foreign_block_never_reaches_raptorq(capfd) -> None:
    """A frame naming a block past the transfer's last is refused before the decoder, so
    a flood of them cannot fill the device's log with raptorq's panic backtraces."""
    from protocol.frames import Frame

    frames = FrameEncoder(bytes(range(256)) * 2000, 64, mtu=8).frames()  # two blocks
    last = parse_frame(frames[-1])
    assert last.block == 1
    assembler = TransferAssembler(last.transfer, last.length, last.mtu)
    assert assembler.add(last) is None
    for block in (2, 7, 255):
        stray = Frame(last.transfer, last.length, last.mtu, block, 0, last.symbol)
        with pytest.raises(FrameError, match=f"block {block}"):
            assembler.add(stray)
    assert "panicked" not in capfd.readouterr().err and len(assembler.held) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_typed_refusal(data: bytes) -> None:
    try:
        parse_frame(data)
    except FrameError:
        return
    assert zlib.crc32(data[:-4]) == int.from_bytes(data[-4:], "little")  # only a valid CRC


def test_headers_of_tiny_frames_stay_small() -> None:
    for name in ("acoustic-64", "lora-sf10"):
        profile = PROFILES[name]
        for size in (1000, 100_000):
            frame = FrameEncoder(bytes(size), profile.frame_bytes).frames()[-1]
            overhead = len(frame) - len(parse_frame(frame).symbol)
            assert overhead <= 17, (name, size, overhead)  # magic, id, 4 varints, CRC-32


def test_the_frame_vector_is_reproduced_bit_for_bit() -> None:
    vector = json.loads(VECTOR.read_text())
    payload = bytes.fromhex(vector["payload"])
    frames = FrameEncoder(payload, vector["frame_bytes"]).frames(repair=vector["repair"])
    assert [frame.hex() for frame in frames] == vector["frames"]
    assert _assemble([bytes.fromhex(f) for f in vector["frames"][2:]]) == payload


def test_the_tagged_frame_vector_is_reproduced_bit_for_bit() -> None:
    vector = json.loads((VECTOR.parent / "frames-tagged-acoustic-64.json").read_text())
    payload, key = bytes.fromhex(vector["payload"]), bytes.fromhex(vector["link_key"])
    frames = FrameEncoder(payload, vector["frame_bytes"], key=key).frames(vector["repair"])
    assert [frame.hex() for frame in frames] == vector["frames"]
    assert all(frame[0] == 0xF3 for frame in frames)


def test_plada_send_frames_writes_files_and_streams(tmp_path) -> None:
    payload = Path(__file__).parent / "vectors" / "signed-audience-v4.plada"
    for extra in ([], ["--stream"]):
        # with --stream, --out names the stream file itself
        out = tmp_path / ("frames.stream" if extra else "files")
        proc = subprocess.run(
            [
                *cli("plada-send"),
                "frames",
                str(payload),
                "--link",
                "lora-sf9",
                "--repair",
                "30%",
                "--out",
                str(out),
                *extra,
            ],
            env=cli_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert "11 source + 4 repair" in proc.stdout and "at 1760 bps" in proc.stdout
        frames = (
            split_stream(out.read_bytes())
            if extra
            else [path.read_bytes() for path in sorted(out.iterdir())]
        )
        assert len(frames) == 15 and _assemble(frames[3:]) == payload.read_bytes()
    bad = subprocess.run(
        [
            *cli("plada-send"),
            "frames",
            str(payload),
            "--link",
            "lora-sf9",
            "--repair",
            "lots",
            "--out",
            str(tmp_path / "bad"),
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--repair 'lots'" in bad.stderr


# --- the receiver's frames inbox -------------------------------------------------------------


def _frames_inbox(home: Path, **settings):
    from receiver.frames_inbox import FrameSettings, FramesInbox

    (home / "inbox").mkdir(parents=True, exist_ok=True)
    return FramesInbox(home, home / "inbox", FrameSettings(**settings))


def _drop(home: Path, frames: list[bytes], start: int = 0) -> None:
    for number, frame in enumerate(frames, start):
        (home / "frames" / f"f{number:06d}.frame").write_bytes(frame)


def test_frames_inbox_rebuilds_after_a_restart_and_ignores_late_frames(tmp_path) -> None:
    home = tmp_path / "home"
    payload = random.Random(3).randbytes(3000)
    frames = FrameEncoder(payload, 64).frames(repair=20)
    inbox = _frames_inbox(home)
    _drop(home, frames[:30])
    assert inbox.poll() == 0
    (report,) = inbox.report()
    assert report["held"] == 30 and report["needed"] == len(frames) - 20
    restarted = _frames_inbox(home)  # as after a reboot: the log rebuilds the transfer
    assert restarted.report()[0]["held"] == 30
    damaged = bytearray(frames[40])
    damaged[10] ^= 0x04
    _drop(home, [bytes(damaged), *frames[30:75]], start=100)
    assert restarted.poll() == 1 and restarted.stats["crc_rejected"] == 1
    (written,) = (home / "inbox").iterdir()
    assert written.read_bytes() == payload and restarted.report() == []
    _drop(home, frames[75:], start=200)  # late frames of a finished transfer
    assert restarted.poll() == 0 and list((home / "inbox").iterdir()) == [written]
    assert not list((home / "transfers").glob("*.log"))


def test_a_flood_of_junk_frames_is_bounded(tmp_path) -> None:
    home = tmp_path / "home"
    inbox = _frames_inbox(home, max_transfers=4, max_log_bytes=20_000)
    rng = random.Random(5)
    for round_ in range(10):  # valid frames of 30 made-up transfers, plus random junk
        junk = [FrameEncoder(rng.randbytes(4000), 64).frames()[0] for _ in range(3)]
        junk += [rng.randbytes(60) for _ in range(20)]
        _drop(home, junk, start=round_ * 100)
        inbox.poll()
    assert len(inbox.transfers) <= 4 and inbox.stats["evicted"] >= 26
    assert sum(p.stat().st_size for p in (home / "transfers").glob("*.log")) <= 20_000
    assert inbox.stats["crc_rejected"] == 200
    from protocol.frames import Frame, build_frame

    huge = build_frame(Frame(b"\x01\x02\x03\x04", 64 << 20, 64, 0, 0, b"x" * 40))
    _drop(home, [huge], start=4000)  # a valid CRC claiming 64 MiB: no decoder is made
    inbox.poll()
    assert inbox.stats["too_long"] == 1 and b"\x01\x02\x03\x04" not in inbox.transfers
    payload = rng.randbytes(2000)  # a genuine transfer still gets through
    _drop(home, FrameEncoder(payload, 64).frames(repair=4), start=5000)
    assert inbox.poll() == 1


def test_a_log_torn_by_a_crash_is_cut_to_its_whole_frames_and_appends_stay_readable(
    tmp_path,
) -> None:
    home = tmp_path / "home"
    payload = random.Random(4).randbytes(2000)
    frames = FrameEncoder(payload, 64).frames(repair=10)
    inbox = _frames_inbox(home)
    _drop(home, frames[:12])
    assert inbox.poll() == 0
    (log,) = (home / "transfers").glob("*.log")
    whole = log.stat().st_size
    with open(log, "ab") as handle:  # a record cut short by a power cut mid-append
        handle.write(pack_stream([frames[12]])[:20])
    (home / "transfers" / "notes.log").write_text("not ours")  # stray files: left alone
    (home / "transfers" / "zz.done").write_text("")
    restarted = _frames_inbox(home)
    assert log.stat().st_size == whole and restarted.report()[0]["held"] == 12
    _drop(home, frames[12:], start=100)
    assert restarted.poll() == 1
    assert (home / "inbox" / f"frames-{transfer_id(payload).hex()}.plada").read_bytes() == payload


def test_a_transfer_that_decodes_from_its_log_alone_is_handed_on_at_start(tmp_path) -> None:
    """A crash after the log held enough frames but before the payload was handed on:
    the restart decodes it from the log, with no new frame needed."""
    home = tmp_path / "home"
    payload = random.Random(6).randbytes(1500)
    frames = FrameEncoder(payload, 64).frames(repair=4)
    (home / "transfers").mkdir(parents=True)
    (home / "transfers" / f"{transfer_id(payload).hex()}.log").write_bytes(pack_stream(frames))
    inbox = _frames_inbox(home)
    assert inbox.report() == [] and inbox.stats["decoded"] == 1
    assert (home / "inbox" / f"frames-{transfer_id(payload).hex()}.plada").read_bytes() == payload
    assert not list((home / "transfers").glob("*.log"))


def test_a_stream_file_over_a_mebibyte_is_read_whole(tmp_path) -> None:
    home = tmp_path / "home"
    inbox = _frames_inbox(home)
    payload = random.Random(9).randbytes(800_000)
    stream = pack_stream(FrameEncoder(payload, 64).frames())
    assert len(stream) > 1 << 20
    (home / "frames" / "pass.frames").write_bytes(stream)
    assert inbox.poll() == 1
    assert (home / "inbox" / f"frames-{transfer_id(payload).hex()}.plada").read_bytes() == payload


def _poll_in_a_thread(inbox) -> list[int]:
    """One pass, in a thread that a blocked open cannot keep the test in."""
    import threading

    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(inbox.poll()), daemon=True)
    thread.start()
    thread.join(timeout=300)  # a bound for a hang, not a speed: a pass takes well under 1 s
    assert not thread.is_alive(), "frame intake blocked on a FIFO or device"
    return done


def test_a_frame_file_swapped_for_a_fifo_or_link_after_the_scan_never_blocks_intake(
    tmp_path, monkeypatch
) -> None:
    import contextlib
    import os

    from receiver import frames_inbox

    home = tmp_path / "home"
    inbox = _frames_inbox(home)
    payload = random.Random(8).randbytes(1500)
    _drop(home, FrameEncoder(payload, 64).frames(repair=6))
    folder = home / "frames"
    os.mkfifo(folder / "a-fifo.frame")
    (folder / "a-link.frames").symlink_to("/dev/zero")
    swapped = [folder / "swapped-fifo.frame", folder / "swapped-link.frames"]
    for path in swapped:
        path.write_bytes(b"regular when scanned")
    scandir = os.scandir

    def scan_then_swap(path):  # regular files at the scan, then a FIFO and a link
        entries = list(scandir(path))
        if swapped[0].is_file():
            swapped[0].unlink()
            os.mkfifo(swapped[0])
            swapped[1].unlink()
            swapped[1].symlink_to("/dev/zero")
        return contextlib.nullcontext(iter(entries))

    monkeypatch.setattr(frames_inbox.os, "scandir", scan_then_swap)
    assert _poll_in_a_thread(inbox) == [1]
    monkeypatch.undo()
    assert [p.read_bytes() for p in (home / "inbox").iterdir()] == [payload]
    assert inbox.stats["set_aside"] == 4 and list(folder.iterdir()) == []


def test_a_directory_named_like_a_frame_file_is_set_aside_and_reported_once(tmp_path) -> None:
    home = tmp_path / "home"
    inbox = _frames_inbox(home)
    folder = home / "frames"
    (folder / "x.frame").mkdir()
    payload = random.Random(9).randbytes(1500)
    _drop(home, FrameEncoder(payload, 64).frames(repair=6))
    assert _poll_in_a_thread(inbox) == [1]
    assert [p.read_bytes() for p in (home / "inbox").iterdir()] == [payload]
    assert inbox.stats["set_aside"] == 1 and inbox.waiting() == 0
    payload = random.Random(10).randbytes(1500)  # later frames still come in
    _drop(home, FrameEncoder(payload, 64).frames(repair=6), start=100)
    assert inbox.poll() == 1 and inbox.stats["set_aside"] == 1  # reported once
    assert [p.name for p in folder.iterdir()] == ["x.frame"]


def test_a_forged_frame_with_a_genuine_header_never_closes_the_transfer(tmp_path) -> None:
    """A frame that copies a genuine header with other symbol bytes makes the transfer
    decode to wrong bytes: its frames are dropped, with no done-record and no "refused"
    reply, and the genuine frames of the next carousel round still deliver it."""
    from protocol.frames import Frame, build_frame
    from protocol.replies import ReplyState, decode_reply
    from receiver.frames_inbox import FrameSettings, FramesInbox
    from receiver.reply_outbox import ReplyOutbox, reply_key

    home = tmp_path / "home"
    (home / "inbox").mkdir(parents=True)
    replies = ReplyOutbox(home, home / "outbox", progress_seconds=0)
    inbox = FramesInbox(home, home / "inbox", FrameSettings(), replies)
    payload = random.Random(11).randbytes(1200)
    frames = FrameEncoder(payload, 64).frames(repair=8)
    genuine = parse_frame(frames[0])  # source symbol 0; the forgery comes first
    wrong = bytes(b ^ 0x5A for b in genuine.symbol)
    forged = build_frame(Frame(genuine.transfer, genuine.length, genuine.mtu, 0, 0, wrong))
    _drop(home, [forged, *frames])  # the decode that includes the forgery fails
    assert inbox.poll() == 0 and inbox.stats["polluted"] == 1
    assert not list((home / "transfers").glob("*.done"))
    _drop(home, frames, start=1000)  # the carousel's next round
    assert inbox.poll() == 1
    assert [p.read_bytes() for p in (home / "inbox").iterdir()] == [payload]
    key = reply_key(home)
    states = {decode_reply(p.read_bytes(), key).state for p in (home / "outbox").iterdir()}
    assert ReplyState.REFUSED not in states


def test_frames_refuse_what_is_not_a_whole_signed_payload(tmp_path) -> None:
    """A picture, a torn payload or an unsigned one never goes on the air: one line,
    exit 2, no frame written."""
    signed = (Path(__file__).parent / "vectors" / "signed-audience-v4.plada").read_bytes()
    files = {
        "picture.png": (b"\x89PNG\r\n\x1a\n" + bytes(3000), "NotAPayloadError"),
        "torn.plada": (signed[:-40], "is not a whole plada payload"),
        "unsigned.plada": (
            (Path(__file__).parent / "vectors" / "delta-varint-zstd.plada").read_bytes(),
            "UnsignedPayloadError",
        ),
    }
    for name, (data, error) in files.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out-{name}"
        args = ["frames", str(tmp_path / name), "--link", "lora-sf9", "--out", str(out)]
        proc = subprocess.run(
            [*cli("plada-send"), *args],
            env=cli_env(),
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and error in proc.stderr, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists(), name


def test_plada_receive_frames_decodes_a_folder_without_a_daemon(tmp_path) -> None:
    """Frame files with losses, a forged frame with a genuine header and a foreign
    coding, and junk: the folder still decodes to the payload's bytes; too few frames
    is one line naming how many are held."""
    from protocol.frames import Frame, build_frame

    payload = (Path(__file__).parent / "vectors" / "signed-audience-v4.plada").read_bytes()
    frames = FrameEncoder(payload, 110).frames(repair=8)
    genuine = parse_frame(frames[0])
    forged = [
        build_frame(replace_symbol(genuine, bytes(len(genuine.symbol)))),
        build_frame(Frame(genuine.transfer, genuine.length + 7, genuine.mtu, 0, 3, b"x" * 9)),
    ]
    folder = tmp_path / "received"
    folder.mkdir()
    kept = [f for n, f in enumerate(frames) if n % 4 != 1]  # a quarter lost
    for number, frame in enumerate([*forged, *kept]):
        (folder / f"{number:04d}.frame").write_bytes(frame)
    (folder / "9999.frame").write_bytes(b"static on the channel")
    out = tmp_path / "task.plada"
    command = [*cli("plada-receive"), "frames", str(folder), "--out", str(out)]
    proc = subprocess.run(command, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == payload and "1 damaged" in proc.stdout
    for path in sorted(folder.iterdir())[6:]:
        path.unlink()
    out.unlink()
    short = subprocess.run(command, env=cli_env(), capture_output=True, text=True)
    assert short.returncode == 2 and "no transfer is complete" in short.stderr, short.stderr
    assert len(short.stderr.strip().splitlines()) == 1 and not out.exists()


def replace_symbol(frame, symbol: bytes):
    from dataclasses import replace

    return replace(frame, symbol=symbol)
