"""``plada-send frames --carousel``: frames for ever, paced for a modem, until done.

On a one-way link the sender cannot know what arrived, so it loops: source frames,
then fresh repair frames, as a stream of length-prefixed frames (the format of
``--stream``) to standard output, a named pipe or a serial device, at ``--rate`` bits
per second (the profile's rate by default). Where a return link exists the device's
24-byte replies (:mod:`protocol.replies`) land in a folder or file, ``--until-done``;
the carousel stops once a reply MACed with the device's key says the transfer is
done (or its payload refused). Replies that fail the MAC are counted and ignored.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from protocol.errors import ConfigError, ReplyError, StorageError
from protocol.frames import STREAM_LENGTH, FrameEncoder, LinkProfile
from protocol.replies import Reply, ReplyState, decode_reply, split_replies
from protocol.shared_keys import read_key_file, read_link_key_file
from protocol.timestamps import duration_text
from sender.errors import TransferRefusedError
from sender.link.outgoing import read_signed_payload

MAX_REPLY_FILE_BYTES = 64 << 10  # a reply file is 24 bytes; anything far larger is junk


def read_reply_key_file(path: str | Path) -> bytes:
    """The device's reply key from the file ``plada-receive reply-key`` printed."""
    fix = "copy it from `plada-receive reply-key`"
    return read_key_file(path, "reply key", fix, private=False)


@dataclass
class ReplyWatch:
    """Reads the device's replies about one transfer where the uplink delivers them."""

    location: Path
    key: bytes
    transfer: bytes
    not_before: int = 0  # Unix seconds: replies written before it are stale
    ignored: int = 0  # replies that failed their MAC or were malformed
    stale: int = 0  # replies of this transfer written before ``not_before``
    latest: Reply | None = None
    _seen: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def poll(self) -> Reply | None:
        """The device's latest word on the transfer (a final one wins), if any."""
        for data in self._new_files():
            for raw in split_replies(data):
                try:
                    reply = decode_reply(raw, self.key)
                except ReplyError:
                    self.ignored += 1
                    continue
                if reply.transfer != self.transfer:
                    continue
                if reply.time < self.not_before:  # an earlier send's word, replayed or kept
                    self.stale += 1
                elif _newer(reply, self.latest):
                    self.latest = reply
        return self.latest

    def _new_files(self) -> list[bytes]:
        if self.location.is_dir():
            paths = sorted(self.location.iterdir())
        else:
            paths = [self.location] if self.location.exists() else []
        contents = []
        for path in paths:
            try:
                info = path.stat()
                if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_REPLY_FILE_BYTES:
                    continue
                if self._seen.get(path.name) == (info.st_mtime_ns, info.st_size):
                    continue
                contents.append(path.read_bytes())
                self._seen[path.name] = (info.st_mtime_ns, info.st_size)
            except OSError:  # removed or unreadable meanwhile: read it next time
                continue
        return contents


def _newer(reply: Reply, than: Reply | None) -> bool:
    """Whether ``reply`` replaces ``than``: the first final word stands, else the latest."""
    if than is None:
        return True
    if than.state.final:
        return False
    return reply.state.final or reply.time >= than.time


def check_link_output(out: str) -> Path:
    """``--out`` of a carousel that is not ``-``: a named pipe or a device, else
    ``ConfigError`` (a regular file would grow without end)."""
    path = Path(out)
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        raise ConfigError(
            f"--out {out} is not a named pipe or device: an endless carousel needs `-` "
            f"(standard output), a pipe made with `mkfifo {out}`, or a modem's device"
        )
    return path


def open_link_output(path: Path | None) -> BinaryIO:
    """The carousel's output: standard output (None), or the pipe or device ``path``
    that :func:`check_link_output` passed (opening a pipe waits for its reader)."""
    if path is None:
        return sys.stdout.buffer
    try:
        return open(path, "wb", buffering=0)
    except OSError as exc:
        raise StorageError(f"cannot open --out {path}: {exc.strerror}") from exc


@dataclass
class CarouselRun:
    """What a carousel sent, and why it stopped."""

    frames: int = 0
    bytes_on_air: int = 0
    seconds: float = 0.0
    stopped: str = ""  # done, refused, max-frames or interrupted
    reply: Reply | None = None
    ignored_replies: int = 0


def run_carousel(
    encoder: FrameEncoder,
    out: BinaryIO,
    rate_bps: float = 0.0,
    max_frames: int = 0,
    watch: ReplyWatch | None = None,
    poll_seconds: float = 1.0,
    on_frame: Callable[[CarouselRun], None] | None = None,
) -> CarouselRun:
    """Write ``encoder``'s carousel to ``out`` as length-prefixed frames, at most
    ``rate_bps`` bits per second (0: as fast as ``out`` takes them), until ``watch``
    reads a final reply, ``max_frames`` are sent (0: no limit) or an interrupt."""
    run = CarouselRun()
    started = last_poll = time.monotonic()
    try:
        for frame in encoder.carousel():
            record = STREAM_LENGTH.pack(len(frame)) + frame
            try:
                out.write(record)
                out.flush()
            except BrokenPipeError as exc:
                raise StorageError(
                    f"the reader of --out went away after {run.frames} frames; start it "
                    "again, then the carousel"
                ) from exc
            except OSError as exc:
                raise StorageError(f"cannot write frames to --out: {exc.strerror}") from exc
            run.frames += 1
            run.bytes_on_air += len(frame)
            if on_frame is not None:
                on_frame(run)
            if rate_bps:
                time.sleep(max(0.0, started + run.bytes_on_air * 8 / rate_bps - time.monotonic()))
            now = time.monotonic()
            if watch is not None and now - last_poll >= poll_seconds:
                last_poll = now
                reply = watch.poll()
                if reply is not None and reply.state.final:
                    run.stopped = "done" if reply.state is ReplyState.QUEUED else "refused"
                    break
            if max_frames and run.frames >= max_frames:
                run.stopped = "max-frames"
                break
    except KeyboardInterrupt:
        run.stopped = "interrupted"
    run.seconds = time.monotonic() - started
    if watch is not None:
        run.reply, run.ignored_replies = watch.latest, watch.ignored
    return run


def close_link_output(out: BinaryIO) -> None:
    """Close ``out`` unless it is standard output (whose broken pipe, once its reader
    left, is pointed at /dev/null so that the interpreter's last flush is quiet)."""
    try:
        if out is sys.stdout.buffer:
            out.flush()
        else:
            out.close()
    except BrokenPipeError:
        if out is sys.stdout.buffer:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@dataclass(frozen=True)
class CarouselSettings:
    """How a carousel is paced and when it stops."""

    rate_bps: float | None = None  # bits per second on air (None: the profile's; 0: unpaced)
    max_frames: int = 0  # 0: no limit
    until_done: str | None = None  # the folder (or file) the device's replies land in
    reply_key: str | None = None  # the device's reply key file
    link_key: str | None = None  # the link key file: tagged frames
    reply_skew: float = 300.0  # replies written this long before the carousel began still count

    def __post_init__(self) -> None:
        if (self.until_done is None) != (self.reply_key is None):
            raise ConfigError(
                "--until-done and --reply-key go together: the replies' folder and key"
            )
        if (self.rate_bps or 0) < 0 or self.max_frames < 0 or self.reply_skew < 0:
            raise ConfigError("--rate, --max-frames and --reply-skew take a number >= 0")


def send_carousel(
    payload_path: str | Path,
    profile: LinkProfile,
    out: str,
    settings: CarouselSettings,
    say: Callable[[str], None],
) -> CarouselRun:
    """Send the payload's carousel to ``out`` (``-``: standard output) until the device
    says it is done, ``max_frames`` or an interrupt; ``say`` gets the start and the end
    line. ``TransferRefusedError`` when the device rebuilt the payload and refused it."""
    from tqdm import tqdm

    key = read_link_key_file(settings.link_key) if settings.link_key else None
    encoder = FrameEncoder(read_signed_payload(payload_path), profile.frame_bytes, key=key)
    watch = None
    if settings.until_done is not None:
        key = read_reply_key_file(settings.reply_key)  # type: ignore[arg-type]
        not_before = int(time.time() - settings.reply_skew)
        watch = ReplyWatch(Path(settings.until_done), key, encoder.transfer, not_before)
    target = None if out == "-" else check_link_output(out)  # before a word is said
    rate = profile.bits_per_second if settings.rate_bps is None else settings.rate_bps
    pace = f"{rate:g} bps" if rate else "as fast as the reader takes them"
    say(
        f"carousel of transfer {encoder.transfer.hex()}: {encoder.source_count} source frames, "
        f"then repair frames, to {out} at {pace} for {profile.name}"
        + (", tagged with the link key" if key else "")
    )
    stream = open_link_output(target)
    bar = tqdm(unit="frame", file=sys.stderr, desc="on air", disable=None)
    try:
        run = run_carousel(
            encoder, stream, rate, settings.max_frames, watch, on_frame=lambda _: bar.update()
        )
    finally:
        bar.close()
        close_link_output(stream)
    said = f"; the device said: {run.reply.text()}" if run.reply else ""
    ignored = f" ({run.ignored_replies} replies failed their MAC)" if run.ignored_replies else ""
    if watch is not None and watch.stale:
        ignored += f" ({watch.stale} replies older than the carousel ignored)"
    say(
        f"carousel stopped ({run.stopped}) after {run.frames} frames, {run.bytes_on_air} B on "
        f"air in {duration_text(run.seconds)}{said}{ignored}"
    )
    if run.stopped == "refused":
        raise TransferRefusedError(
            f"the device rebuilt transfer {encoder.transfer.hex()} and refused its payload: "
            "see its quarantine; fix the payload, then send it again"
        )
    return run
