"""``plada-send frames``: a signed payload as frame files (or one stream file) for a link.

Source frames come first, then ``repair`` repair frames: on a link with loss rate p
a transfer needs about K / (1 - p) frames, so ``--repair 30%`` covers about 23% loss
without a return path. The floor a link cannot beat is K frames (the payload's bytes
in whole symbols); what is printed beside the frames is that floor and the airtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.atomic_files import (
    atomic_outputs,
    create_secret_file,
    writable_directory,
    writable_file_path,
)
from protocol.errors import ConfigError, StorageError
from protocol.frames import FrameEncoder, LinkProfile, pack_stream
from protocol.shared_keys import key_text, new_shared_key, read_link_key_file
from protocol.timestamps import duration_text
from sender.link.outgoing import read_signed_payload


def make_link_key(out: str | Path) -> Path:
    """Write a new link key to ``out`` (mode 0600); never replaces a file."""
    path = Path(out)
    try:
        create_secret_file(path, key_text(new_shared_key()))
    except FileExistsError:
        raise ConfigError(
            f"{path} exists: a link key is never replaced (devices hold copies); keep it, "
            "or give --out a new file"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot write the link key {path}: {exc.strerror}") from None
    return path


def parse_repair(text: str, source_count: int) -> int:
    """``--repair``: a count of repair frames, or a percentage of the source frames."""
    try:
        if text.endswith("%"):
            value = float(text[:-1])
            if not 0 <= value <= 1000:
                raise ValueError
            return int(-(-source_count * value // 100))
        value = int(text)
        if value < 0:
            raise ValueError
        return value
    except ValueError as exc:
        raise ConfigError(f"--repair {text!r}: give a count (40) or a percentage (30%)") from exc


@dataclass(frozen=True)
class FramedTransfer:
    """What ``plada-send frames`` wrote."""

    transfer: str
    payload_bytes: int
    source_frames: int
    repair_frames: int
    frame_bytes: int
    bytes_on_air: int
    airtime_seconds: float
    written: list[str]

    def summary(self, profile: LinkProfile) -> str:
        total = self.source_frames + self.repair_frames
        floor = self.source_frames
        return (
            f"transfer {self.transfer}: {self.payload_bytes} B payload -> {total} frames "
            f"({self.source_frames} source + {self.repair_frames} repair) of up to "
            f"{self.frame_bytes} B for {profile.name}; {self.bytes_on_air} B on air, "
            f"{duration_text(self.airtime_seconds)} at {profile.bits_per_second:g} bps; "
            f"the floor is {floor} frames"
        )


def stream_path(out: str | Path, transfer: str) -> Path:
    """Where ``--stream`` writes: ``out`` itself, or ``<transfer>.frames`` in it when it is
    a directory (or ends with a slash)."""
    if Path(out).is_dir() or str(out).endswith("/"):
        return writable_directory(out, "--out") / f"{transfer}.frames"
    return writable_file_path(out, "--out")


def write_frames(
    payload_path: str | Path,
    profile: LinkProfile,
    out: str | Path,
    repair: str = "0",
    stream: bool = False,
    link_key: str | Path | None = None,
) -> FramedTransfer:
    """Frame the payload at ``payload_path`` for ``profile`` into ``out`` (a folder of
    ``<transfer>-<n>.frame`` files, or with ``stream`` one ``<transfer>.frames`` file of
    length-prefixed frames), written atomically; tagged with the key in the file
    ``link_key``, if given."""
    key = read_link_key_file(link_key) if link_key else None
    data = read_signed_payload(payload_path)
    encoder = FrameEncoder(data, profile.frame_bytes, key=key)
    repairs = parse_repair(repair, encoder.source_count)
    frames = encoder.frames(repairs)
    transfer = encoder.transfer.hex()
    if stream:
        paths = [stream_path(out, transfer)]
        with atomic_outputs(*paths, durable=True) as (handle,):
            handle.write(pack_stream(frames))
    else:
        folder = writable_directory(out, "--out")
        paths = [folder / f"{transfer}-{number:06d}.frame" for number in range(len(frames))]
        with atomic_outputs(*paths, durable=True) as handles:
            for handle, frame in zip(handles, frames, strict=True):
                handle.write(frame)
    on_air = sum(len(frame) for frame in frames)
    return FramedTransfer(
        transfer,
        len(data),
        encoder.source_count,
        repairs,
        max(len(frame) for frame in frames),
        on_air,
        profile.airtime_seconds(on_air),
        [str(path) for path in paths],
    )
