"""Dropping known, harmless lines that native code writes to standard error.

Ray Data builds its actors with constructor arguments in the object store, and Ray's C++
core worker then logs, once per actor, that "the actor restart will fail" if those
arguments are lost (ray-project/ray#53727, #57733). The arguments are Ray Data's own and
live as long as the dataset runs, so the line only alarms the operator. It is written by
C++ straight to file descriptor 2, past Python's ``logging`` and ``sys.stderr``, and Ray's
only switch for it (``RAY_BACKEND_LOG_LEVEL``) hides every other native error too and
makes each Ray process print a line about the setting. So, while Ray runs, descriptor 2
goes through a pipe whose reader forwards every line except those naming such a notice.

Python's own writes (``sys.stderr``: the progress bar, warnings, errors) go to a copy of
the original descriptor and do not pass the filter, so nothing of ours is delayed. Only
processes started while the filter is in place inherit the pipe; Ray's own processes
are started before it (by ``ray.init``) or by the raylet, which has the real descriptor.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

READ_SIZE = 65536


class _Forwarder(threading.Thread):
    """Copies whole lines from the pipe to the real descriptor, dropping the ones that
    contain a pattern; stops, after a last drain, when told to."""

    def __init__(self, source: int, target: int, patterns: tuple[bytes, ...]) -> None:
        super().__init__(name="plada-native-stderr", daemon=True)
        self.source, self.target, self.patterns = source, target, patterns
        self.wake_read, self.wake_write = os.pipe()
        self.pending = b""

    def run(self) -> None:
        os.set_blocking(self.source, False)
        while True:
            ready, _, _ = select.select([self.source, self.wake_read], [], [])
            ended = self._drain()
            if ended or self.wake_read in ready:
                break
        if not self._dropped(self.pending):
            self._emit(self.pending)

    def stop(self) -> None:
        os.write(self.wake_write, b"x")
        self.join()
        for fd in (self.wake_read, self.wake_write):
            os.close(fd)

    def _drain(self) -> bool:
        """Forward what the pipe holds now; True when every writer has closed it."""
        while True:
            try:
                chunk = os.read(self.source, READ_SIZE)
            except BlockingIOError:
                return False
            if not chunk:
                return True
            *lines, self.pending = (self.pending + chunk).split(b"\n")
            self._emit(b"".join(line + b"\n" for line in lines if not self._dropped(line)))

    def _dropped(self, line: bytes) -> bool:
        return any(pattern in line for pattern in self.patterns)

    def _emit(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self.target, data) :]
            except OSError:  # the real standard error is gone: nothing to show it on
                return


@contextmanager
def dropping_native_lines(*patterns: str) -> Iterator[None]:
    """While inside, lines written to descriptor 2 that contain one of ``patterns`` are
    dropped (see the module docstring); ``sys.stderr`` writes bypass the filter."""
    sys.stderr.flush()
    real = os.dup(2)
    source, sink = os.pipe()
    forwarder = _Forwarder(source, real, tuple(p.encode() for p in patterns))
    saved = sys.stderr
    if _on_descriptor_2(saved):
        sys.stderr = open(  # noqa: SIM115 - closed below, after the filter is removed
            os.dup(real), "w", buffering=1, encoding=saved.encoding, errors="backslashreplace"
        )
    os.dup2(sink, 2)
    os.close(sink)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer in this process is gone
        forwarder.stop()
        if sys.stderr is not saved:
            sys.stderr.close()
            sys.stderr = saved
        for fd in (source, real):
            os.close(fd)


def _on_descriptor_2(stream: object) -> bool:
    """Whether ``stream`` writes to descriptor 2 (not, say, a test's capture buffer)."""
    try:
        return stream.fileno() == 2  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
