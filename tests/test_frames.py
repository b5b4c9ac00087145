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
    parse_frame,
    transfer_id,
)
from sender.link_frames import read_stream
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


def test_plada_send_frames_writes_files_and_streams(tmp_path) -> None:
    payload = Path(__file__).parent / "vectors" / "signed-audience-v4.plada"
    for extra in ([], ["--stream"]):
        out = tmp_path / ("stream" if extra else "files")
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
            read_stream(next(out.iterdir()))
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
