"""The daemon's frames inbox: frames in, payloads out, durably and within a quota.

Link software drops frame files (``*.frame``, one frame each) or stream files
(``*.frames``, length-prefixed frames) into ``HOME/frames/``. Each pass reads them,
drops every frame that fails its CRC (counted), and appends each valid new frame to
its transfer's log ``HOME/transfers/<transfer id>.log`` (length-prefixed frames,
fsynced before the frame file is removed), so a reboot loses nothing that was
written; on start the assemblers are rebuilt from the logs. As soon as a transfer
holds enough frames its payload decodes and is written into the payload inbox
(``frames-<transfer id>.plada``), where the ordinary intake verifies it, signature
first: frames carry no trust of their own. A transfer whose payload was handed on
leaves a small ``<id>.done`` record, so its late frames are ignored cheaply. Frames that
decode to bytes other than their transfer id's held a forgery: they are dropped with no
record and no reply, and the transfer is collected again from its next frames. Entries
of the frames folder are opened as inbox entries are (no links, never blocking, regular
files only); anything else is set aside and reported once.

With a link key (``plada-receive daemon --link-key FILE``) only tagged frames made
with that key are taken (``protocol.frames``): a forged frame, however genuine its
header, is dropped before it reaches a decoder, so no transfer is ever polluted.
Without one, a CRC proves nothing and a transfer polluted by a forged frame is
collected again from its next frames.

Bounded: frames of transfers longer than ``max_payload_bytes`` (the intake's cap)
are dropped before a decoder is made for them; a transfer holds at most twice the
frames a decode takes (more is junk: it is collected again); at most
``max_transfers`` open transfers and ``max_log_bytes`` of logs, checked at every
append (over them, the partial transfer with the least evidence of being genuine,
the fewest frames held, goes first, so a flood of junk frames for made-up transfers
evicts junk); partial transfers silent for ``expire_seconds`` are expired and logged;
the newest ``max_done_records`` done-records are kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from protocol.atomic_files import fsync_directory, write_bytes_atomic
from protocol.errors import FrameError, FrameTagError, TransferError
from protocol.frames import (
    MAX_FRAME_BYTES,
    TRANSFER_ID_BYTES,
    Frame,
    TransferAssembler,
    pack_stream,
    parse_frame,
    read_stream,
    whole_frames,
)
from protocol.names import printable_name
from protocol.payload import RECEIVER_DEFAULT_MAX_BYTES
from protocol.timestamps import utc_text
from receiver.claims import open_entry
from receiver.errors import InboxEntryError
from trainer.faults import crash_point

if TYPE_CHECKING:
    from receiver.reply_outbox import ReplyOutbox

log = logging.getLogger("plada.receiver")


@dataclass(frozen=True)
class FrameSettings:
    """How much the frames inbox may hold."""

    max_transfers: int = 64
    max_log_bytes: int = 16 << 20  # about 390 B of memory per frame held: <= ~110 MB
    expire_seconds: float = 7 * 86400.0
    # frames of longer transfers are dropped unread
    max_payload_bytes: int = RECEIVER_DEFAULT_MAX_BYTES
    max_done_records: int = 4096


@dataclass
class _Transfer:
    assembler: TransferAssembler
    first_seen: float
    last_seen: float
    log_bytes: int = 0


@dataclass
class FramesInbox:
    """Frames of every open transfer of one daemon home."""

    home: Path
    inbox: Path
    settings: FrameSettings = field(default_factory=FrameSettings)
    replies: ReplyOutbox | None = None  # where the device's word on each transfer goes
    link_key: bytes | None = field(default=None, repr=False)  # tagged frames only, with it

    def __post_init__(self) -> None:
        self.folder = self.home / "frames"
        self.logs = self.home / "transfers"
        for folder in (self.folder, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        self.transfers: dict[bytes, _Transfer] = {}
        self.stats: dict[str, int] = {
            "frames": 0,
            "crc_rejected": 0,
            "duplicates": 0,
            "decoded": 0,
            "expired": 0,
            "evicted": 0,
        }
        self._finished = _done_records(self.logs)  # oldest first
        self._log_bytes = 0  # of every open transfer's log
        self._open_logs: dict[bytes, BinaryIO] = {}  # appended to in this pass, not synced
        self._touched: set[bytes] = set()  # transfers that gained frames in this pass
        self._late: set[bytes] = set()  # finished transfers whose frames still come
        self._set_aside: set[str] = set()  # entries that could not be read or removed
        for path in sorted(self.logs.glob("*.log")):
            transfer = _hex_id(path.stem)
            if transfer is None:  # not a log this inbox wrote: left alone
                continue
            if transfer in self._finished:  # closed, but the log outlived it
                path.unlink()
                continue
            self._replay(path)

    # --- the logs ---------------------------------------------------------------------
    def _log_path(self, transfer: bytes) -> Path:
        return self.logs / f"{transfer.hex()}.log"

    def _done(self, transfer: bytes) -> bool:
        return transfer in self._finished

    def _sync_logs(self) -> None:
        """Make every frame appended since the last call durable."""
        for handle in self._open_logs.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        self._open_logs.clear()

    def _replay(self, path: Path) -> None:
        """Rebuild a transfer from its log (after a restart): a record torn by a crash
        mid-append is cut off first, so that what is appended next stays readable."""
        logged = path.read_bytes()
        frames, whole = whole_frames(logged)
        if whole < len(logged):
            with open(path, "r+b") as handle:
                handle.truncate(whole)
                os.fsync(handle.fileno())
        mtime = path.stat().st_mtime
        for data in frames:
            with contextlib.suppress(FrameError):
                frame = parse_frame(data, self.link_key)
                if self._done(frame.transfer):
                    return  # it decoded (handed to the intake) or failed: closed
                self._accept(frame, data, mtime, logged=True)

    def _hold(self, frame: Frame, data: bytes, now: float, logged: bool = False) -> bytes | None:
        """Hold one valid frame (appended to its transfer's log, unless it came from the
        log; durable at the next :meth:`_sync_logs`); the payload once it decodes."""
        transfer = self.transfers.get(frame.transfer)
        if transfer is None:
            assembler = TransferAssembler(frame.transfer, frame.length, frame.mtu)
            transfer = self.transfers[frame.transfer] = _Transfer(assembler, now, now)
        if frame.key in transfer.assembler.held:
            self.stats["duplicates"] += 1
            return None
        record = pack_stream([data])
        if not self._room_for(frame.transfer, len(record)):
            self.stats["over_quota"] = self.stats.get("over_quota", 0) + 1
            if not transfer.assembler.held:  # it would have opened it
                del self.transfers[frame.transfer]
            return None
        payload = transfer.assembler.add(frame)  # raises, before it is logged, for a stray
        transfer.last_seen = now
        if not logged:
            self._touched.add(frame.transfer)
            handle = self._open_logs.get(frame.transfer)
            if handle is None:
                # kept open for the rest of the frame file, closed by _sync_logs
                handle = self._open_logs[frame.transfer] = open(  # noqa: SIM115
                    self._log_path(frame.transfer), "ab"
                )
            handle.write(record)
            crash_point("frames-appended")
        transfer.log_bytes += len(record)
        self._log_bytes += len(record)
        return payload

    # --- one pass ---------------------------------------------------------------------
    def waiting(self) -> int:
        """Frame files not read yet."""
        with os.scandir(self.folder) as scan:
            return sum(1 for e in scan if _is_frame_file(e.name) and e.name not in self._set_aside)

    def _put_aside(self, name: str, why: str) -> None:
        """An entry that is not a readable regular file (a link, FIFO, device or
        directory) is lost to this device, as a lost frame is: removed where it can be,
        otherwise skipped from now on; reported once either way."""
        self.stats["set_aside"] = self.stats.get("set_aside", 0) + 1
        try:
            (self.folder / name).unlink(missing_ok=True)
        except OSError:  # a directory, or not ours to remove: never read again
            self._set_aside.add(name)
        log.warning(
            f"frame file {printable_name(name)} set aside: {why}",
            extra={"event": "frame-file-set-aside"},
        )

    def poll(self) -> int:
        """Read every frame file once; returns how many payloads were completed."""
        completed = 0
        now = time.time()
        with os.scandir(self.folder) as scan:
            entries = sorted(
                (e for e in scan if _is_frame_file(e.name) and e.name not in self._set_aside),
                key=lambda e: e.name,
            )
        for entry in entries:
            if entry.name in self._set_aside:
                continue
            try:
                handle = os.fdopen(open_entry(entry.path), "rb")
            except InboxEntryError as exc:
                self._put_aside(entry.name, str(exc))
                continue
            with handle:
                for piece in _frames_in(handle, entry.name.endswith(".frames")):
                    completed += self._take(piece, now)
            self._sync_logs()  # every frame the file held is durable: it may go
            crash_point("frames-synced")
            Path(entry.path).unlink(missing_ok=True)
        self._expire(now)
        self._reply()
        return completed

    def _reply(self) -> None:
        """Tell the uplink how far this pass got (held of needed; a finished transfer's
        outcome again when its frames still come)."""
        touched, late = self._touched, self._late
        self._touched, self._late = set(), set()
        if self.replies is None:
            return
        for key in sorted(touched & self.transfers.keys()):
            assembler = self.transfers[key].assembler
            self.replies.progress(key, len(assembler.held), assembler.needed)
        for key in sorted(late):
            self.replies.remind(key)

    def _take(self, data: bytes, now: float) -> int:
        try:
            frame = parse_frame(data, self.link_key)
        except FrameTagError:
            self.stats["tag_rejected"] = self.stats.get("tag_rejected", 0) + 1
            return 0
        except FrameError:
            self.stats["crc_rejected"] += 1
            return 0
        self.stats["frames"] += 1
        if frame.length > self.settings.max_payload_bytes:  # a CRC is no proof of anything
            self.stats["too_long"] = self.stats.get("too_long", 0) + 1
            return 0
        if self._done(frame.transfer):
            self._late.add(frame.transfer)
            return 0  # a late frame of a finished transfer
        if frame.transfer not in self.transfers:
            self._make_room()
        return self._accept(frame, data, now)

    def _accept(self, frame: Frame, data: bytes, now: float, logged: bool = False) -> int:
        """Hold a valid frame of an open transfer; once the transfer decodes, hand its
        payload to the intake and close it (1), else 0."""
        try:
            payload = self._hold(frame, data, now, logged)
        except TransferError as exc:  # a forged frame among them: nothing is proven
            self._restart(frame.transfer, str(exc))
            return 0
        except FrameError:  # a frame that cannot be this transfer's: dropped, counted
            self.stats["inconsistent"] = self.stats.get("inconsistent", 0) + 1
            if not self.transfers[frame.transfer].assembler.held:  # it would have opened it
                del self.transfers[frame.transfer]
            return 0
        if payload is None:
            return 0
        name = inbox_name(frame.transfer)
        write_bytes_atomic(self.inbox / name, payload, durable=True)
        crash_point("frames-decoded")
        held = len(self.transfers[frame.transfer].assembler.held)
        self._close(frame.transfer, done=True)
        self.stats["decoded"] += 1
        log.info(
            f"transfer {frame.transfer.hex()} complete from {held} frames: {name}",
            extra={"event": "transfer-done", "transfer": frame.transfer.hex(), "frames": held},
        )
        return 1

    def _close(self, transfer: bytes, done: bool) -> None:
        closed = self.transfers.pop(transfer, None)
        if closed is not None:
            self._log_bytes -= closed.log_bytes
        handle = self._open_logs.pop(transfer, None)
        if handle is not None:
            handle.close()
        if done:
            (self.logs / f"{transfer.hex()}.done").write_text(utc_text() + "\n")
            self._finished[transfer] = None
            while len(self._finished) > self.settings.max_done_records:
                oldest = next(iter(self._finished))
                del self._finished[oldest]
                (self.logs / f"{oldest.hex()}.done").unlink(missing_ok=True)
        self._log_path(transfer).unlink(missing_ok=True)
        fsync_directory(self.logs)

    def _restart(self, transfer: bytes, why: str) -> None:
        """Frames that decode to bytes other than their transfer id's held a forgery (a
        CRC proves nothing): the held frames are dropped, with no done-record and no
        reply, so the transfer starts again from its next frames and its genuine
        sender is never told "refused"."""
        self.stats["polluted"] = self.stats.get("polluted", 0) + 1
        log.warning(
            f"frames of transfer {transfer.hex()} dropped ({why}); collecting it again",
            extra={"event": "transfer-polluted", "transfer": transfer.hex()},
        )
        self._close(transfer, done=False)

    def _make_room(self) -> None:
        """Evict partial transfers while a new one would break the count quota."""
        while self.transfers and len(self.transfers) + 1 > self.settings.max_transfers:
            self._evict(self._weakest(spare=None))

    def _room_for(self, transfer: bytes, record_bytes: int) -> bool:
        """Whether ``record_bytes`` more of ``transfer``'s log fit the byte quota, after
        evicting other partial transfers with no more frames than it would hold."""
        evidence = len(self.transfers[transfer].assembler.held) + 1
        while self._log_bytes + record_bytes > self.settings.max_log_bytes:
            weakest = self._weakest(spare=transfer)
            if weakest is None or self._evidence(weakest) > evidence:
                return False
            self._evict(weakest)
        return True

    def _evidence(self, transfer: bytes) -> int:
        """How much a transfer has shown of being genuine: the frames it holds (each
        cost a sender airtime)."""
        return len(self.transfers[transfer].assembler.held)

    def _weakest(self, spare: bytes | None) -> bytes | None:
        """The open transfer with the least evidence (then the stalest), ``spare``
        apart; None if there is none."""
        others = [key for key in self.transfers if key != spare]
        if not others:
            return None
        return min(others, key=lambda key: (self._evidence(key), self.transfers[key].last_seen))

    def _evict(self, transfer: bytes) -> None:
        self.stats["evicted"] += 1
        log.warning(
            f"frames inbox over its quota: dropped partial transfer {transfer.hex()}",
            extra={"event": "transfer-evicted", "transfer": transfer.hex()},
        )
        self._close(transfer, done=False)

    def _expire(self, now: float) -> None:
        for key, transfer in list(self.transfers.items()):
            if now - transfer.last_seen > self.settings.expire_seconds:
                self.stats["expired"] += 1
                log.warning(
                    f"partial transfer {key.hex()} expired with {len(transfer.assembler.held)} "
                    "frames",
                    extra={"event": "transfer-expired", "transfer": key.hex()},
                )
                self._close(key, done=False)

    def report(self) -> list[dict[str, Any]]:
        """Each open transfer: frames held and needed, first and last seen."""
        return [
            {
                "transfer": key.hex(),
                "bytes": transfer.assembler.length,
                "held": len(transfer.assembler.held),
                "needed": transfer.assembler.needed,
                "first_seen": utc_text(transfer.first_seen),
                "last_seen": utc_text(transfer.last_seen),
            }
            for key, transfer in sorted(self.transfers.items())
        ]


INBOX_PREFIX = "frames-"


def inbox_name(transfer: bytes) -> str:
    """The payload inbox's name for the payload rebuilt from ``transfer``'s frames."""
    return f"{INBOX_PREFIX}{transfer.hex()}.plada"


def transfer_of(name: str) -> bytes | None:
    """The transfer whose frames made the inbox file ``name``; None for other files."""
    transfer = _hex_id(name.removeprefix(INBOX_PREFIX).removesuffix(".plada"))
    return transfer if transfer is not None and name == inbox_name(transfer) else None


def _hex_id(text: str) -> bytes | None:
    """The transfer id written as ``text`` (lowercase hex), or None."""
    if len(text) != 2 * TRANSFER_ID_BYTES or any(c not in "0123456789abcdef" for c in text):
        return None
    return bytes.fromhex(text)


def _done_records(logs: Path) -> dict[bytes, None]:
    """The transfers with a done-record in ``logs``, oldest first."""
    records = []
    for path in logs.glob("*.done"):
        transfer = _hex_id(path.stem)
        with contextlib.suppress(OSError):
            if transfer is not None:
                records.append((path.stat().st_mtime, transfer))
    return dict.fromkeys(transfer for _, transfer in sorted(records))


def _is_frame_file(name: str) -> bool:
    return name.endswith((".frame", ".frames"))


def _frames_in(handle: BinaryIO, stream: bool) -> Iterator[bytes]:
    """The frames of a frame file (one frame) or of a stream file (u16 length, then
    the frame, to the end; a torn last frame is left out), read as they come."""
    try:
        if stream:
            yield from read_stream(handle)
        else:
            yield handle.read(MAX_FRAME_BYTES + 1)
    except OSError:  # unreadable from here on: the rest is lost, as on the link
        return
