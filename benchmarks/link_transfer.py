"""Frames over simulated links: how many frames a payload takes against the floor.

``python -m benchmarks.link_transfer [--trials 5] [--sizes 1000,100000,1000000]``

For each link profile and payload size, the sender runs its carousel (source frames,
then repair frames) into a channel, and the receiver assembles what comes out until
the payload decodes. Channels: independent loss at 0, 10, 30 and 50%, and a
Gilbert-Elliott channel with bursts (mean burst 8 frames, 20% loss); every channel
also reorders frames (within windows of 8), duplicates 2% of them and flips one bit
in 5% (caught by the CRC and counted). Printed side by side per row:

- frames sent until the payload decoded (median over trials), and bytes on air;
- the floor, ceil(payload / symbol) / (1 - loss), where the loss includes the 5%
  of frames the CRC drops: no code can need fewer frames;
- their ratio;
- plain repetition of the file in the same frames (the naive carousel: rounds of
  every chunk until each has arrived once), median frames;
- the airtime of the fountain transfer at the profile's bit rate;
- the decode time of a 200 KB payload per profile (after all frames).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from protocol.errors import FrameError
from protocol.frames import PROFILES, FrameEncoder, TransferAssembler, parse_frame
from protocol.timestamps import duration_text

CHANNELS = {"iid-0": 0.0, "iid-10": 0.1, "iid-30": 0.3, "iid-50": 0.5, "burst-8/20%": 0.2}
REORDER_WINDOW, DUPLICATE, BITFLIP = 8, 0.02, 0.05


def _losses(channel: str, rng: np.random.Generator) -> Iterator[bool]:
    """Whether each next frame is lost."""
    if channel.startswith("iid"):
        p = CHANNELS[channel]
        while True:
            yield bool(rng.random() < p)
    # Gilbert-Elliott: Bad loses everything; mean burst 8, stationary loss 20%
    leave_bad = 1 / 8
    enter_bad = CHANNELS[channel] * leave_bad / (1 - CHANNELS[channel])
    bad = False
    while True:
        bad = rng.random() >= leave_bad if bad else rng.random() < enter_bad
        yield bad


def _channel(frames: Iterator[bytes], channel: str, rng: np.random.Generator):
    """(send index, frame) of what comes out of the channel: lost, reordered,
    duplicated, flipped."""
    losses = _losses(channel, rng)
    window: list[tuple[int, bytes]] = []
    for index, frame in enumerate(frames):
        if next(losses):
            continue
        if rng.random() < BITFLIP:
            damaged = bytearray(frame)
            bit = int(rng.integers(len(frame) * 8))
            damaged[bit // 8] ^= 1 << (bit % 8)
            frame = bytes(damaged)
        window.append((index, frame))
        if rng.random() < DUPLICATE:
            window.append((index, frame))
        if len(window) >= REORDER_WINDOW:
            order = rng.permutation(len(window))
            yield from (window[i] for i in order)
            window.clear()
    yield from window


def fountain_transfer(payload: bytes, frame_bytes: int, channel: str, seed: int) -> dict:
    """Frames the link had to carry until the payload decoded (up to the latest one
    sent among those that arrived by then; frames still in flight do not count), with
    the CRC rejections counted."""
    rng = np.random.default_rng(seed)
    encoder = FrameEncoder(payload, frame_bytes)
    stats = {"sent": 0, "crc_rejected": 0}
    assembler = None
    for index, data in _channel(encoder.carousel(), channel, rng):
        stats["sent"] = max(stats["sent"], index + 1)
        try:
            frame = parse_frame(data)
        except FrameError:
            stats["crc_rejected"] += 1
            continue
        if assembler is None:
            assembler = TransferAssembler(frame.transfer, frame.length, frame.mtu)
        if assembler.add(frame) is not None:
            break
    first = encoder.frames()[0]
    symbol = len(parse_frame(first).symbol)
    on_air = stats["sent"] * len(first)
    return stats | {"source": encoder.source_count, "symbol": symbol, "on_air_bytes": on_air}


def repetition_transfer(chunks: int, channel: str, seed: int) -> int:
    """Frames the naive carousel sends (rounds of every chunk) until each arrived once."""
    rng = np.random.default_rng(seed)
    losses = _losses(channel, rng)
    missing = np.ones(chunks, dtype=bool)
    sent = 0
    while missing.any():
        for chunk in range(chunks):
            sent += 1
            arrived = not next(losses) and rng.random() >= BITFLIP
            if arrived:
                missing[chunk] = False
            if not missing.any():
                break
    return sent


def decode_seconds(frame_bytes: int, size: int = 200_000) -> float:
    """Time to assemble (and decode) a payload of ``size`` from its source frames."""
    payload = np.random.default_rng(0).bytes(size)
    frames = FrameEncoder(payload, frame_bytes).frames()
    started = time.perf_counter()
    first = parse_frame(frames[0])
    assembler = TransferAssembler(first.transfer, first.length, first.mtu)
    for data in frames:
        assembler.add(parse_frame(data))
    assert assembler.payload == payload
    return time.perf_counter() - started


def _trials(trials: int, size: int, frame_bytes: int) -> int:
    """More trials for short transfers, whose frame counts vary most (cheap anyway)."""
    frames = size / frame_bytes
    return trials if frames >= 200 else max(trials, 41)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trials", type=int, default=5, help="transfers per row (median; 41 under 200 frames)"
    )
    parser.add_argument("--sizes", default="1000,100000,1000000", help="payload bytes")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="link profiles")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    print(
        "| profile | payload | channel | frames (median) | floor | ratio | repetition (median) "
        "| bytes on air | airtime | CRC rejects |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.profiles.split(","):
        profile = PROFILES[name]
        for size in sizes:
            payload = np.random.default_rng(size).bytes(size)
            for channel, loss in CHANNELS.items():
                trials = _trials(args.trials, size, profile.frame_bytes)
                runs = [
                    fountain_transfer(payload, profile.frame_bytes, channel, seed)
                    for seed in range(trials)
                ]
                sent = statistics.median(run["sent"] for run in runs)
                on_air = statistics.median(run["on_air_bytes"] for run in runs)
                # the floor counts frames the CRC drops as lost too: no code gets them
                floor = -(-size // runs[0]["symbol"]) / ((1 - loss) * (1 - BITFLIP))
                repetition = statistics.median(
                    repetition_transfer(runs[0]["source"], channel, seed) for seed in range(trials)
                )
                row = {
                    "profile": name,
                    "payload_bytes": size,
                    "channel": channel,
                    "frames": sent,
                    "floor": round(floor, 1),
                    "ratio": round(sent / floor, 3),
                    "repetition_frames": repetition,
                    "bytes_on_air": on_air,
                    "airtime_seconds": profile.airtime_seconds(on_air),
                    "crc_rejected": sum(run["crc_rejected"] for run in runs),
                }
                rows.append(row)
                print(
                    f"| {name} | {size} | {channel} | {sent:g} | {floor:.1f} | "
                    f"{row['ratio']:.3f} | {repetition:g} | {int(on_air):,} | "
                    f"{duration_text(row['airtime_seconds'])} | {row['crc_rejected']} |",
                    flush=True,
                )
    print()
    print("| profile | decode of a 200 KB payload |")
    print("|---|---|")
    timings = {}
    for name in args.profiles.split(","):
        seconds = min(decode_seconds(PROFILES[name].frame_bytes) for _ in range(3))
        timings[name] = seconds
        print(f"| {name} | {seconds * 1000:.1f} ms |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "decode_200kb": timings}, indent=1))


if __name__ == "__main__":
    main()
