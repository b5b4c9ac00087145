"""Frames under forgery: what forged frames with genuine headers cost a transfer.

``python -m benchmarks.link_forgery [--trials 11] [--sizes 1000,100000]``

An attacker with a transmitter near the device reads each frame's clear-text header
off the air and sends, just before the genuine frame arrives, a frame with the same
header (transfer id, length, coding, block, symbol id) and other symbol bytes: with
a valid CRC on a link without a key, with a guessed tag on a link with one. The
sender's carousel runs through a channel losing 30% of its frames; the forgeries
make up 0, 5 or 20% of what arrives. The receiver works as the daemon's frames
inbox does: a tagged frame whose tag fails is dropped; a transfer whose frames
decode to bytes other than their id's is dropped and collected again.

Printed per link profile, payload size and forged share (medians over trials):

- genuine frames sent until the payload decoded, and their ratio to the same
  channel's run without forgeries (the goal: within 1.3x);
- frames taken in (genuine that arrived, and forgeries) until then;
- the floor, ceil(payload / symbol) / (1 - loss);
- decodes polluted by a forgery (untagged only);
- the receiver's CPU per frame taken in (parse, trailer check, decode).

Untagged transfers that do not decode within 20x the floor are shown as ``never``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from protocol.errors import FrameError, TransferError
from protocol.frames import (
    PROFILES,
    TAG_BYTES,
    Frame,
    FrameEncoder,
    TransferAssembler,
    build_frame,
    parse_frame,
)

LOSS = 0.3
FORGED_SHARES = (0.0, 0.05, 0.2)
GIVE_UP = 20  # untagged transfers: stop after this many times the floor
LINK_KEY = bytes(range(32))


@dataclass(frozen=True)
class ForgeryRun:
    """One transfer under forgery."""

    decoded: bool
    genuine_sent: int  # frames the carousel sent until the payload decoded
    taken_in: int  # frames the receiver read (genuine that arrived, and forgeries)
    polluted: int  # decodes spoiled by a forgery
    cpu_seconds: float  # the receiver's time over every frame it read


def _forgery(frame: bytes, tagged: bool, rng: np.random.Generator) -> bytes:
    """``frame``'s header with random symbol bytes: a valid CRC, or a guessed tag."""
    parsed = parse_frame(frame, LINK_KEY if tagged else None)
    symbol = rng.bytes(len(parsed.symbol))
    forged = Frame(
        parsed.transfer, parsed.length, parsed.mtu, parsed.block, parsed.symbol_id, symbol
    )
    if not tagged:
        return build_frame(forged)
    return build_frame(forged, LINK_KEY)[:-TAG_BYTES] + rng.bytes(TAG_BYTES)


class _Receiver:
    """The frames inbox's rules for one transfer: tags checked, polluted decodes
    collected again."""

    def __init__(self, tagged: bool) -> None:
        self.key = LINK_KEY if tagged else None
        self.assembler: TransferAssembler | None = None
        self.polluted = 0

    def take(self, data: bytes) -> bool:
        """Whether ``data`` completed the payload."""
        try:
            frame = parse_frame(data, self.key)
        except FrameError:
            return False
        if self.assembler is None:
            self.assembler = TransferAssembler(frame.transfer, frame.length, frame.mtu)
        try:
            return self.assembler.add(frame) is not None
        except TransferError:
            self.polluted += 1
            self.assembler = None
            return False
        except FrameError:
            return False


def forged_transfer(payload: bytes, frame_bytes: int, share: float, tagged: bool, seed: int):
    """One carousel through a channel losing ``LOSS`` of its frames, with forgeries
    making up ``share`` of what arrives."""
    losses, attacker = np.random.default_rng(seed), np.random.default_rng(seed + 1_000_003)
    encoder = FrameEncoder(payload, frame_bytes, key=LINK_KEY if tagged else None)
    floor = encoder.source_count / (1 - LOSS)
    receiver, taken, cpu = _Receiver(tagged), 0, 0.0
    before = share / (1 - share)  # forgeries per genuine frame that arrives
    for sent, frame in enumerate(encoder.carousel(), 1):
        if sent > GIVE_UP * floor:
            return ForgeryRun(False, sent, taken, receiver.polluted, cpu)
        lost = losses.random() < LOSS  # the same channel with and without an attacker
        arriving = [_forgery(frame, tagged, attacker)] if attacker.random() < before else []
        arriving += [] if lost else [frame]
        for data in arriving:
            taken += 1
            started = time.perf_counter()
            done = receiver.take(data)
            cpu += time.perf_counter() - started
            if done:
                return ForgeryRun(True, sent, taken, receiver.polluted, cpu)
    raise AssertionError("a carousel never ends")


def trailer_check_us(frame_bytes: int, tagged: bool, count: int = 20_000) -> float:
    """Microseconds ``parse_frame`` takes per frame (the CRC or the tag checked)."""
    key = LINK_KEY if tagged else None
    frame = FrameEncoder(bytes(5000), frame_bytes, key=key).frames()[0]
    started = time.perf_counter()
    for _ in range(count):
        parse_frame(frame, key)
    return 1e6 * (time.perf_counter() - started) / count


def _row(profile: str, size: int, share: float, tagged: bool, trials: int) -> dict:
    frame_bytes = PROFILES[profile].frame_bytes
    payload = np.random.default_rng(size).bytes(size)
    runs = [forged_transfer(payload, frame_bytes, share, tagged, seed) for seed in range(trials)]
    clean = [forged_transfer(payload, frame_bytes, 0.0, tagged, seed) for seed in range(trials)]
    encoder = FrameEncoder(payload, frame_bytes, key=LINK_KEY if tagged else None)
    decoded = [run for run in runs if run.decoded]
    median = statistics.median
    return {
        "profile": profile,
        "payload": size,
        "link": "tagged" if tagged else "CRC only",
        "forged_share": share,
        "decoded": f"{len(decoded)}/{trials}",
        "genuine_sent": median(run.genuine_sent for run in runs) if decoded else None,
        "ratio": median(r.genuine_sent / c.genuine_sent for r, c in zip(runs, clean, strict=True))
        if len(decoded) == trials
        else None,
        "taken_in": median(run.taken_in for run in runs) if decoded else None,
        "floor": round(encoder.source_count / (1 - LOSS), 1),
        "polluted": median(run.polluted for run in runs),
        "cpu_us_per_frame": round(
            1e6 * sum(r.cpu_seconds for r in runs) / sum(r.taken_in for r in runs), 1
        ),
        "runs": [asdict(run) for run in runs],
    }


def _line(row: dict) -> str:
    never = "never" if row["ratio"] is None else None
    ratio = never or f"{row['ratio']:.2f}x"
    sent = never or f"{row['genuine_sent']:g}"
    taken = never or f"{row['taken_in']:g}"
    return (
        f"| {row['profile']} | {row['payload']:,} B | {row['link']} | "
        f"{row['forged_share']:.0%} | {row['decoded']} | {sent} | {ratio} | {taken} | "
        f"{row['floor']:g} | {row['polluted']:g} | {row['cpu_us_per_frame']:g} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=11, help="transfers per row (median)")
    parser.add_argument("--sizes", default="1000,100000", help="payload bytes")
    parser.add_argument("--profiles", default="lora-sf9,iridium-sbd-340", help="link profiles")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    print(f"loss {LOSS:.0%}; forgeries carry the genuine frame's header and arrive first")
    print(
        "| profile | payload | link | forged | decoded | genuine sent | vs unforged "
        "| taken in | floor | polluted | CPU us/frame |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for profile in args.profiles.split(","):
        for size in (int(size) for size in args.sizes.split(",")):
            for tagged in (True, False):
                for share in FORGED_SHARES:
                    rows.append(_row(profile, size, share, tagged, args.trials))
                    print(_line(rows[-1]), flush=True)
    for profile in args.profiles.split(","):
        frame_bytes = PROFILES[profile].frame_bytes
        crc, tag = trailer_check_us(frame_bytes, False), trailer_check_us(frame_bytes, True)
        print(
            f"parse_frame, {frame_bytes}-byte frames: {crc:.1f} us with a CRC, {tag:.1f} us tagged"
        )
    print(f"{time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
