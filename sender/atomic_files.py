"""Writing files so that a failure leaves nothing half-written: temp file, then rename."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with storage_guard(tmp):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
