"""The device's replies to the frames it receives, for whatever uplink exists.

With ``plada-receive daemon --reply-outbox DIR`` the daemon keeps one file per
transfer, ``DIR/<transfer id>.reply`` (24 bytes, :mod:`protocol.replies`), replaced
atomically whenever the device's word on it changes: frames held of those needed
(at most once per ``progress_seconds``), then "done, job queued" or "refused". The
uplink software sends and removes them; late frames of a finished transfer bring its
final reply back (at most once per ``repeat_seconds``), since an uplink may lose it.
The files are MACed with the key in ``HOME/reply.key`` (made on first use, mode
0600), which the ground station needs a copy of (``plada-receive reply-key``).

Bounded, so that junk frames cannot push genuine state out: at most ``max_files``
replies wait in the outbox, and over it progress replies go first (oldest first):
a final word, which only a transfer that decoded to its own id's bytes earns, goes
only when nothing else is left. The final words on the newest ``max_remembered``
transfers are kept in ``HOME/replies.json`` (rewritten only when a final word is
said), so a restart neither repeats nor forgets them; progress is remembered in
memory only, for as many transfers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.atomic_files import create_secret_file, write_bytes_atomic, write_json_atomic
from protocol.errors import ReplyError, StorageError
from protocol.replies import Reply, ReplyState, encode_reply, new_reply_key, parse_reply_key

log = logging.getLogger("plada.receiver")

REPLY_KEY_FILE = "reply.key"
REPLY_SUFFIX = ".reply"
_STATE_FILE = "replies.json"


def reply_key(home: Path) -> bytes:
    """The reply key of the daemon home ``home`` (made, mode 0600, if missing)."""
    path = Path(home) / REPLY_KEY_FILE
    try:
        create_secret_file(path, new_reply_key().hex() + "\n")
    except FileExistsError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot write the reply key {path}: {exc.strerror}") from exc
    if path.stat().st_mode & 0o077:
        raise ReplyError(
            f"reply key {path} is readable or writable by others: anyone on this device "
            f"could forge its replies; run `chmod 600 {path}`"
        )
    try:
        return parse_reply_key(path.read_text())
    except ReplyError as exc:
        raise ReplyError(f"{path}: {exc}; delete it to make a new one") from None


@dataclass
class ReplyOutbox:
    """Writes a device's replies into its outbox folder."""

    home: Path
    outbox: Path
    progress_seconds: float = 30.0
    repeat_seconds: float = 60.0
    max_files: int = 256
    max_remembered: int = 1024
    _final: dict[str, dict] = field(init=False, repr=False)  # the final word, by transfer
    _progress: dict[str, dict] = field(init=False, repr=False)  # the last progress said

    def __post_init__(self) -> None:
        self.key = reply_key(self.home)
        self.outbox.mkdir(parents=True, exist_ok=True)
        self._state = self.home / _STATE_FILE
        try:
            said = json.loads(self._state.read_text())
            self._final = {
                k: v
                for k, v in said.items()
                if isinstance(v, dict) and v.get("state") != ReplyState.RECEIVING
            }
        except (OSError, ValueError, AttributeError):  # none yet, or damaged: start afresh
            self._final = {}
        self._progress = {}
        self.written = 0

    def _last(self, name: str) -> dict | None:
        return self._final.get(name) or self._progress.get(name)

    def progress(self, transfer: bytes, held: int, needed: int) -> None:
        """Frames held of those needed, for an open transfer."""
        last = self._last(transfer.hex())
        if last is not None and (last["held"], last["needed"]) == (held, needed):
            return
        if last is not None and time.time() - last["at"] < self.progress_seconds:
            return
        self._say(Reply(transfer, ReplyState.RECEIVING, held, needed, int(time.time())))

    def outcome(self, transfer: bytes, queued: bool) -> None:
        """The transfer's payload was queued as a job (or refused by the intake)."""
        last = self._last(transfer.hex()) or {}
        state = ReplyState.QUEUED if queued else ReplyState.REFUSED
        held, needed = last.get("held", 0), last.get("needed", 0)
        self._say(Reply(transfer, state, held, needed, int(time.time())))

    def remind(self, transfer: bytes) -> None:
        """Late frames of a finished transfer: say its outcome again, now and then."""
        last = self._final.get(transfer.hex())
        if last is None:
            return
        if time.time() - last["at"] >= self.repeat_seconds:
            self.outcome(transfer, last["state"] == ReplyState.QUEUED)

    def _say(self, reply: Reply) -> None:
        name = reply.transfer.hex()
        write_bytes_atomic(self.outbox / (name + REPLY_SUFFIX), encode_reply(reply, self.key))
        said = {"state": int(reply.state), "held": reply.held, "needed": reply.needed}
        said["at"] = time.time()
        memory = self._final if reply.state.final else self._progress
        self._progress.pop(name, None)
        memory.pop(name, None)
        memory[name] = said
        while len(memory) > self.max_remembered:
            memory.pop(next(iter(memory)))
        if reply.state.final:
            write_json_atomic(self._state, self._final)
        self.written += 1
        self._trim()
        log.info(
            f"reply: {reply.text()}",
            extra={"event": "reply", "transfer": name, "state": reply.state.name.lower()},
        )

    def _trim(self) -> None:
        """Drop replies while more than ``max_files`` wait: progress replies first, the
        oldest first; final words only when nothing else is left."""
        with os.scandir(self.outbox) as scan:
            waiting = [
                (
                    entry.name.removesuffix(REPLY_SUFFIX) in self._final,
                    entry.stat().st_mtime,
                    entry.path,
                )
                for entry in scan
                if entry.name.endswith(REPLY_SUFFIX) and entry.is_file(follow_symlinks=False)
            ]
        waiting.sort()
        for _, _, path in waiting[: max(0, len(waiting) - self.max_files)]:
            Path(path).unlink(missing_ok=True)
