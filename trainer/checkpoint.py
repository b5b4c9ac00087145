"""Training checkpoints that survive ``kill -9`` and power loss.

A checkpoint is one ``torch.save`` file written through a temporary file, flushed
to disk, then renamed; the previous checkpoint is kept beside it (``.prev``) until
the new one is in place. Loading tries the newest, then the previous one, and
skips files that are unreadable or belong to another run (its *identity*: the
configuration and data a run was started with).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from protocol.atomic_files import fsync_directory, write_atomic
from protocol.errors import exception_summary
from trainer.faults import crash_point

CHECKPOINT_FORMAT = 1
log = logging.getLogger("plada.trainer")


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Durably replace the checkpoint at ``path``; the old one becomes ``.prev``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": CHECKPOINT_FORMAT, **state}
    staged = path.with_name(path.name + ".new")

    def write(handle) -> None:
        torch.save(record, handle)

    write_atomic(staged, write, durable=True)  # complete and on disk before any rename
    crash_point("checkpoint-written")
    if path.exists():
        os.replace(path, previous_path(path))
    os.replace(staged, path)
    fsync_directory(path.parent)


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The newest readable checkpoint of the run ``identity``, or None."""
    for candidate in (Path(path), previous_path(Path(path))):
        if not candidate.is_file():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged files
            log.warning(
                "checkpoint unreadable, trying an older one",
                extra={
                    "event": "checkpoint-unreadable",
                    "file": str(candidate),
                    "error": exception_summary(exc),
                },
            )
            continue
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            continue
        if state.get("identity") != identity:
            log.warning(
                "checkpoint belongs to another run, ignored",
                extra={"event": "checkpoint-mismatch", "file": str(candidate)},
            )
            continue
        return state
    return None
