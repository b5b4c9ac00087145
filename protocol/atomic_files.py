"""Writing files so that a failure leaves nothing half-written: temp file, then rename.

``durable=True`` also flushes the file and its directory to stable storage before
returning, so the rename survives a power cut, not only a crash of the process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from protocol.errors import StorageError


@contextlib.contextmanager
def storage_guard(*temporaries: Path) -> Iterator[None]:
    """Turn write failures (disk full, permissions) into :class:`StorageError`, removing
    the temporary files so nothing half-written is left; finished files are untouched."""
    try:
        yield
    except BaseException as exc:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        raise StorageError(
            f"cannot write {temporaries[0].parent}: {exc.strerror or exc}; free space or fix "
            "permissions and rerun (work already finished is kept)"
        ) from exc


def fsync_directory(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    """A hidden name beside ``path`` that no other writer (process or thread) uses."""
    return path.with_name(f".{path.name[:180]}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def atomic_outputs(*paths: Path, durable: bool = False) -> Iterator[list[BinaryIO]]:
    """Binary handles on temporary files that replace ``paths`` together when the block
    ends without an error; after an error they are removed and ``paths`` untouched
    (an ``OSError`` such as a full disk becomes :class:`StorageError`)."""
    paths = tuple(Path(path) for path in paths)
    temporaries = [_temporary(path) for path in paths]
    with storage_guard(*temporaries), contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(tmp, "wb")) for tmp in temporaries]
        yield handles
        if durable:
            for handle in handles:
                handle.flush()
                os.fsync(handle.fileno())
        stack.close()
        for tmp, path in zip(temporaries, paths, strict=True):
            os.replace(tmp, path)
        if durable:
            for folder in {path.parent for path in paths}:
                fsync_directory(folder)


def write_atomic(path: Path, write: Callable[[BinaryIO], None], durable: bool = False) -> None:
    """Create ``path`` through ``write(handle)`` on a temporary file, then rename it."""
    with atomic_outputs(Path(path), durable=durable) as (handle,):
        write(handle)


def write_bytes_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` via a temporary file and rename."""
    write_atomic(path, lambda handle: handle.write(data), durable)


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    """Write UTF-8 ``text`` via a temporary file and rename."""
    write_bytes_atomic(path, text.encode(), durable)


def write_json_atomic(path: Path, data: Any, durable: bool = False) -> None:
    """Write JSON via a temporary file and rename."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", durable)


def create_secret_file(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (mode 0600) holding ``text``, durably;
    ``FileExistsError`` if it exists (a secret is never overwritten), and nothing left
    behind if the write fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        path.unlink(missing_ok=True)
        raise


def writable_directory(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Create ``path`` (with parents) if needed and prove it takes a file, before any
    work starts; a bad path, a file in the way or missing permissions is a
    :class:`StorageError` naming ``what``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".plada-write-check.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StorageError(
            f"cannot write to {what} {path}: {os_error_words(exc)}; choose a writable directory"
        ) from exc
    return path


def creatable_directory(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Check, writing nothing, that ``path`` is a writable directory or can be made as one
    (its nearest existing ancestor is a writable directory): for commands that must
    leave no trace when a later check fails. A :class:`StorageError` naming ``what``."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        problem = "a file is in the way of a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable (permission denied)"
    else:
        return path
    raise StorageError(f"cannot write to {what} {path}: {problem}; choose a writable directory")


def writable_file_path(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """Check, before any work, that a file can be written at ``path``: its directory is
    made if needed and takes a file, and no directory is in the way."""
    path = Path(path)
    if path.is_dir() or str(path).endswith(os.sep):
        raise StorageError(f"{what} {path} is a directory; give a file name")
    writable_directory(path.parent, f"the directory of {what}")
    return path


_OS_ERROR_WORDS = {
    errno.ENOENT: "a directory on the way does not exist and cannot be made there",
    errno.EEXIST: "a file is in the way of a directory",
    errno.ENOTDIR: "a file is in the way of a directory",
    errno.EISDIR: "a directory is in the way of a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
}


def os_error_words(exc: OSError) -> str:
    """What an operating-system error on a path means for the user, in words."""
    reason = exc.strerror or type(exc).__name__
    words = _OS_ERROR_WORDS.get(exc.errno)  # type: ignore[arg-type]
    return f"{words} ({reason})" if words else reason


def path_error_text(exc: OSError) -> str:
    """An operating-system error on a path as one sentence naming the path and the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"{os_error_words(exc)}{where}: free space and run the command again"
    return f"cannot use {exc.filename}: {os_error_words(exc)}; choose another path"
