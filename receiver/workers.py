"""Which daemons are alive: one lock file per daemon, held for its whole life.

Each daemon holds an exclusive ``flock`` on ``<home>/workers/<owner>.lock``. The
kernel drops the lock when the process ends, however it ends (``kill -9``, OOM
killer, power cut), so "can I take this lock?" tells whether its owner is gone.
The locks work between processes of one machine; keep the daemon home on a local
disk, not a network share.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import threading
from pathlib import Path

from protocol.errors import ConfigError

LOCK_SUFFIX = ".lock"


class WorkerLock:
    """This daemon's identity and life lock."""

    def __init__(self, home: Path) -> None:
        self.directory = Path(home) / "workers"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = self.directory / (self.owner + LOCK_SUFFIX)
        # lock under a private name, then rename: a file under the final name is always
        # locked, so no other daemon can take it for the lock of a dead owner
        staging = self.directory / f".{self.owner}.new"
        self._fd = os.open(staging, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(staging, self.path)

    def alive(self, owner: str) -> bool:
        """Whether the daemon ``owner`` still runs (this one always does)."""
        if owner == self.owner:
            return True
        return owner_alive(self.directory, owner)

    def release(self) -> None:
        """Give up the lock on a clean exit."""
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


# Probing takes the lock for a moment, and flock locks conflict between two open files
# even within one process: without this, the intake thread probing a dead owner would
# make the worker thread's probe of the same owner, at the same moment, see it alive.
_PROBE = threading.Lock()


def owner_alive(directory: Path, owner: str) -> bool:
    """True while the daemon ``owner`` holds its lock; a dead owner's file is removed.

    Another process probing the same owner at the same moment can make a dead owner
    look alive once; that only delays its recovery to the next pass."""
    with _PROBE:
        return _probe(directory / (owner + LOCK_SUFFIX))


def _probe(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops a lock we just took
    path.unlink(missing_ok=True)
    return False


def live_owners(directory: Path) -> list[str]:
    """The daemons alive now."""
    if not directory.is_dir():
        return []
    owners = [p.name[: -len(LOCK_SUFFIX)] for p in directory.glob("*" + LOCK_SUFFIX)]
    return [owner for owner in owners if owner_alive(directory, owner)]


OUTPUT_LOCK = ".train.lock"


class OutputDirLock:
    """An exclusive hold on a ``train --out`` directory for one process's life, so two
    runs never write the same checkpoint and outputs."""

    def __init__(self, out: Path) -> None:
        self._fd = os.open(Path(out) / OUTPUT_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise ConfigError(
                f"another `plada-receive train` is writing to --out {out}: wait for it to "
                "finish, or choose another --out"
            ) from None

    def release(self) -> None:
        os.close(self._fd)  # closing drops the lock; the empty file stays
