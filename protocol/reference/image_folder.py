"""A reference set stored as an ImageFolder tree: ``<wnid>/<file>.JPEG`` (ImageNet-21K)."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.errors import ReferenceSetError
from protocol.manifest import ReferenceManifest
from protocol.names import printable_name, unusable_name
from protocol.reference.encoded import EncodedReference, UnreadableImage
from protocol.task_data import IMAGE_SUFFIXES


def _scan(root: Path, problems: list[str]) -> dict[str, str]:
    """canonical key -> path relative to ``root``; entries that cannot be keys or read
    are skipped and described in ``problems``."""
    found: dict[str, str] = {}
    with os.scandir(root) as folders:
        listed = sorted(folders, key=lambda entry: entry.name)
    for folder in listed:
        try:
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            if unusable_name(folder.name):
                problems.append(f"{root}: skipped folder {printable_name(folder.name)} (not UTF-8)")
                continue
            with os.scandir(folder.path) as scan:
                files = sorted(scan, key=lambda entry: entry.name)
        except OSError as exc:
            problems.append(
                f"{root}: skipped folder {printable_name(folder.name)} ({exc.strerror})"
            )
            continue
        for entry in files:
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() not in IMAGE_SUFFIXES:
                continue
            if unusable_name(entry.name):
                problems.append(
                    f"{root}: skipped {folder.name}/{printable_name(entry.name)} (not a UTF-8 name)"
                )
                continue
            try:
                if not entry.is_file():
                    continue
            except OSError as exc:
                problems.append(f"{root}: skipped {folder.name}/{entry.name} ({exc.strerror})")
                continue
            key = f"{folder.name}/{stem}"
            if key in found:
                raise ReferenceSetError(
                    f"{root}: {found[key]} and {folder.name}/{entry.name} have the same "
                    "key; keep one image per file name"
                )
            found[key] = f"{folder.name}/{entry.name}"
    return found


class ImageFolderReference(EncodedReference):
    """Images under ``root/<block>/``; key ``<block>/<file stem>``; loaded RGB at ``image_size``."""

    def __init__(self, root: str | os.PathLike[str], image_size: int = 64) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.problems: list[str] = []  # entries skipped, for reports
        files = _scan(self.root, self.problems)
        if not files:
            raise ReferenceSetError(f"{self.root} holds no <folder>/<image> files")
        self.manifest = ReferenceManifest.from_unsorted(self.root.name, files)
        self._files = [files[key] for key in self.manifest.keys]

    def describe(self, index: int) -> str:
        return str(self.root / self._files[index])

    def read_bytes(self, index: int) -> bytes:
        path = self.root / self._files[index]
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise UnreadableImage(
                f"reference image {path} is missing: restore it from the reference copy"
            ) from exc
        except OSError as exc:
            raise UnreadableImage(f"reference image {path} is unreadable: {exc}") from exc
