"""Frames turned into payloads without a daemon: ``plada-receive frames``.

The frames of a folder (``.frame`` files, one frame each, and ``.frames`` streams of
length-prefixed frames, as the link or ``plada-send frames`` wrote them) are read in
name order. A frame that fails its CRC or tag is dropped; the rest are grouped by
their transfer's coding (id, length, symbol size), so a forged header of another
coding never mixes with the genuine frames. A CRC proves nothing, so a decode whose
bytes are not the transfer id's, or no decode from more symbols than one takes, held
a forgery: the folder is finite, so instead of
collecting again (as the daemon does from a carousel that keeps sending) the decode
is tried again leaving out one window of frames at a time, and then random subsets.
Nothing is trusted here: the payload is verified by ``verify`` or ``train``.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ConfigError, FrameError, FrameTagError, TransferError
from protocol.frames import (
    MAX_FRAME_BYTES,
    Frame,
    TransferAssembler,
    parse_frame,
    read_stream,
)
from protocol.payload import MAX_PAYLOAD_BYTES

FRAME_SUFFIX, STREAM_SUFFIX = ".frame", ".frames"
RANDOM_RETRIES = 32  # subsets tried when no single left-out window clears a forgery
Coding = tuple[bytes, int, int]  # transfer id, payload length, symbol size (mtu)


@dataclass
class OfflineTransfers:
    """What the frames of a folder decoded to, and what was left over."""

    payloads: dict[bytes, bytes] = field(default_factory=dict)  # transfer id -> payload
    partial: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # id -> (held, K)
    counts: Counter[str] = field(default_factory=Counter)


def frame_files(folder: Path) -> list[Path]:
    """The frame and stream files of ``folder``, in name order (a typed error if none)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of frames: give the folder they are in")
    found = sorted(
        p for p in folder.iterdir() if p.suffix in (FRAME_SUFFIX, STREAM_SUFFIX) and p.is_file()
    )
    if not found:
        raise ConfigError(f"{folder} holds no {FRAME_SUFFIX} or {STREAM_SUFFIX} files")
    return found


def _frames_of(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        if path.suffix == STREAM_SUFFIX:
            yield from read_stream(handle)
        else:
            yield handle.read(MAX_FRAME_BYTES + 1)


def decode_folder(folder: Path, key: bytes | None = None) -> OfflineTransfers:
    """Assemble every transfer whose frames are in ``folder`` (see the module docstring)."""
    result = OfflineTransfers()
    codings: dict[Coding, dict[bytes, Frame]] = {}  # distinct frames, in arrival order
    for path in frame_files(folder):
        for data in _frames_of(path):
            frame = _parsed(data, key, result.counts)
            if frame is not None:
                codings.setdefault((frame.transfer, frame.length, frame.mtu), {})[data] = frame
    for coding, frames in codings.items():
        transfer = coding[0]
        if transfer in result.payloads:
            result.counts["late"] += len(frames)
            continue
        payload, held, needed = _decoded(coding, list(frames.values()), result.counts)
        if payload is not None:
            result.payloads[transfer] = payload
        elif held:  # the most complete coding of each transfer
            result.partial[transfer] = max(result.partial.get(transfer, (0, 0)), (held, needed))
    return result


def _parsed(data: bytes, key: bytes | None, counts: Counter[str]) -> Frame | None:
    try:
        frame = parse_frame(data, key)
    except FrameTagError:
        counts["tag rejected"] += 1
        return None
    except FrameError:
        counts["damaged"] += 1
        return None
    if frame.length > MAX_PAYLOAD_BYTES:
        counts["too long"] += 1
        return None
    counts["frames"] += 1
    return frame


def _decoded(
    coding: Coding, frames: list[Frame], counts: Counter[str]
) -> tuple[bytes | None, int, int]:
    """The payload of one coding's frames (None if they cannot give it), how many
    distinct symbols they hold, and how many a decode takes. A false decode, or none
    from more symbols than a decode takes, means a forgery is among them."""
    try:
        payload, held, needed = _decode_in_order(coding, frames, counts)
    except TransferError:
        counts["false decodes"] += 1
        return _decode_around_forgeries(coding, frames, counts)
    if payload is None and held > needed + 2:
        counts["stalled decodes"] += 1
        return _decode_around_forgeries(coding, frames, counts)
    return payload, held, needed


def _decode_in_order(
    coding: Coding, frames: list[Frame], counts: Counter[str] | None = None
) -> tuple[bytes | None, int, int]:
    """Feed ``frames`` to a fresh decoder; ``TransferError`` on a false decode."""
    assembler = TransferAssembler(*coding)
    for frame in frames:
        try:
            payload = assembler.add(frame)
        except FrameError:
            if counts is not None:
                counts["inconsistent"] += 1
            continue
        if payload is not None:
            return payload, len(assembler.held), assembler.source_count
    return None, len(assembler.held), assembler.source_count


def _decode_around_forgeries(
    coding: Coding, frames: list[Frame], counts: Counter[str]
) -> tuple[bytes | None, int, int]:
    """Decode again without one window of frames at a time, then from random subsets
    (seeded by the transfer id, so a rerun gives the same answer)."""
    needed = TransferAssembler(*coding).source_count
    spare = len(frames) - needed - 2  # RaptorQ decodes from K + 2 symbols nearly always
    if spare < 1:
        return None, len({f.key for f in frames}), needed
    tries = [frames[:start] + frames[start + spare :] for start in range(0, len(frames), spare)]
    draw = random.Random(coding[0])
    tries += [draw.sample(frames, needed + 2) for _ in range(RANDOM_RETRIES)]
    for subset in tries:
        try:
            payload, _, _ = _decode_in_order(coding, subset)
        except TransferError:
            continue
        if payload is not None:
            counts["decoded around a forgery"] += 1
            return payload, len({f.key for f in frames}), needed
    return None, len({f.key for f in frames}), needed
