"""Frames over simulated links: how many frames a payload takes against the floor.

``python -m benchmarks.link_transfer [--trials 5] [--sizes 1000,100000,1000000]``

For each link profile and payload size, the sender runs its carousel (source frames,
then repair frames) into a channel, and the receiver assembles what comes out until
the payload decodes. Channels: independent loss at 0, 10, 30 and 50%, and a
Gilbert-Elliott channel with bursts (mean burst 8 frames, 20% loss); every channel
also reorders frames (within windows of 8), duplicates 2% of them and flips one bit
in 5% (caught by the CRC and counted). Printed side by side per row:

- frames needed: the fewest frames the sender must send for the receiver to
  decode (median over trials), and their bytes on air;
- the floor, ceil(payload / symbol) / (1 - loss), where the loss includes the 5%
  of frames the CRC drops: what an ideal code needs on average;
- their ratio;
- frames sent until the payload decoded in arrival order: the needed frames plus
  the delay of the reordering (the latest frame sent among those that had arrived);
- plain repetition of the file in the same frames (the naive carousel: rounds of
  every chunk until each has arrived once), median frames;
- the airtime of the fountain transfer at the profile's bit rate;
- the decode time of a 200 KB payload per profile, from source and repair frames
  after 30% loss, shuffled.
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


def _decoded_at(frames: Iterator[tuple[int, bytes]], stats: dict) -> int:
    """Feed ``frames`` (send index, bytes) to a receiver in the given order until the
    payload decodes; the send index of the frame that completed it. Frames that fail
    the CRC are counted in ``stats``."""
    assembler = None
    for index, data in frames:
        try:
            frame = parse_frame(data)
        except FrameError:
            stats["crc_rejected"] += 1
            continue
        if assembler is None:
            assembler = TransferAssembler(frame.transfer, frame.length, frame.mtu)
        if assembler.add(frame) is not None:
            return index
    raise AssertionError("the frames ran out before the payload decoded")


def fountain_transfer(payload: bytes, frame_bytes: int, channel: str, seed: int) -> dict:
    """One transfer through the channel, measured two ways:

    - ``needed``: the fewest frames the sender must send for the receiver to decode,
      the smallest n such that the frames among the first n sent that arrived intact
      rebuild the payload (reordering delays frames; it does not make more needed);
    - ``latest``: frames sent up to the latest one among those that had arrived when
      the payload decoded in arrival order (frames in flight do not count), which
      adds the reordering's delay.
    """
    rng = np.random.default_rng(seed)
    encoder = FrameEncoder(payload, frame_bytes)
    sizes: list[int] = []  # of every frame sent, in order
    sent = (sizes.append(len(frame)) or frame for frame in encoder.carousel())
    channel_out = _channel(sent, channel, rng)
    arrived: list[tuple[int, bytes]] = []
    stats = {"crc_rejected": 0}
    _decoded_at((arrived.append(item) or item for item in channel_out), stats)
    latest = max(index for index, _ in arrived) + 1
    # the rest of the reorder window: every frame sent before the latest one used
    arrived += [next(channel_out) for _ in range(2 * REORDER_WINDOW + 2)]
    needed = _decoded_at(iter(sorted(set(arrived))), {"crc_rejected": 0}) + 1
    return {
        "needed": needed,
        "latest": latest,
        "crc_rejected": stats["crc_rejected"],
        "source": encoder.source_count,
        "symbol": encoder.symbol_bytes,
        "on_air_bytes": sum(sizes[:needed]),
    }


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


def decode_seconds(frame_bytes: int, size: int = 200_000, loss: float = 0.3) -> float:
    """Time for a receiver to rebuild a payload of ``size`` (CRC, parsing, RaptorQ) from
    what a link losing ``loss`` of the source and repair frames delivers, shuffled, so
    repair symbols take part in the decode."""
    rng = np.random.default_rng(0)
    payload = rng.bytes(size)
    encoder = FrameEncoder(payload, frame_bytes)
    frames = encoder.frames(repair=encoder.source_count)
    kept = [frames[i] for i in rng.permutation(len(frames)) if rng.random() >= loss]
    started = time.perf_counter()
    first = parse_frame(kept[0])
    assembler = TransferAssembler(first.transfer, first.length, first.mtu)
    for data in kept:
        if assembler.add(parse_frame(data)) is not None:
            break
    seconds = time.perf_counter() - started
    assert assembler.payload == payload
    return seconds


def _trials(trials: int, size: int, frame_bytes: int) -> int:
    """More trials for short transfers, whose frame counts vary most (cheap anyway)."""
    frames = size / frame_bytes
    return trials if frames >= 200 else max(trials, 201)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trials", type=int, default=5, help="transfers per row (median; 201 under 200 frames)"
    )
    parser.add_argument("--sizes", default="1000,100000,1000000", help="payload bytes")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="link profiles")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    print(
        "| profile | payload | channel | frames needed | floor | ratio | sent until decoded "
        "| repetition | bytes on air | airtime | CRC rejects |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
                needed = statistics.median(run["needed"] for run in runs)
                latest = statistics.median(run["latest"] for run in runs)
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
                    "frames_needed": needed,
                    "frames_until_decoded": latest,
                    "floor": round(floor, 1),
                    "ratio": round(needed / floor, 3),
                    "repetition_frames": repetition,
                    "bytes_on_air": on_air,
                    "airtime_seconds": profile.airtime_seconds(on_air),
                    "crc_rejected": sum(run["crc_rejected"] for run in runs),
                }
                rows.append(row)
                print(
                    f"| {name} | {size} | {channel} | {needed:g} | {floor:.1f} | "
                    f"{row['ratio']:.3f} | {latest:g} | {repetition:g} | {int(on_air):,} | "
                    f"{duration_text(row['airtime_seconds'])} | {row['crc_rejected']} |",
                    flush=True,
                )
    print()
    print("| profile | decode of a 200 KB payload (30% lost, shuffled) |")
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
