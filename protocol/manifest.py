"""Reference-set manifest: the canonical ordered list of image keys and its fingerprint.

A payload names reference images by their position in this list, so sender and
receiver must agree on it exactly. Both compute the fingerprint independently;
a payload carries the sender's, and the receiver refuses a payload whose
fingerprint differs from its own.

Canonical order is by key (code-point order, which equals UTF-8 byte order),
independent of file-system listing or shard order. A key is ``<block>/<item>``;
the block (synset folder, glyph concept) groups related images and is the unit
later codecs exploit.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import numpy as np

from protocol.atomic_files import write_atomic
from protocol.errors import ManifestError

MANIFEST_DOMAIN = b"plada-manifest-v1\n"
_FILE_MAGIC = "# plada-manifest v1"


def _check_keys(keys: Sequence[str]) -> None:
    if len(keys) == 0:
        raise ManifestError("manifest is empty: a reference set needs at least one image")
    previous = None
    for position, key in enumerate(keys):
        if not key or "\n" in key or "\r" in key:
            raise ManifestError(f"key #{position} {key!r} is empty or contains a line break")
        if previous is not None and key <= previous:
            kind = "duplicate" if key == previous else "out of order"
            raise ManifestError(
                f"key #{position} {key!r} is {kind} after {previous!r}; "
                "keys must be unique and sorted (use ReferenceManifest.from_unsorted)"
            )
        previous = key


def reference_summary(name: str, size: int, fingerprint_hex: str) -> dict[str, str | int]:
    """A reference set as reports and status files name it: name, size and fingerprint."""
    return {"name": name, "size": size, "fingerprint": fingerprint_hex}


@dataclass(frozen=True)
class BlockLayout:
    """What a block-coded payload needs of a reference set: identity and folder starts."""

    name: str
    fingerprint: bytes
    size: int
    block_starts: np.ndarray  # first index of each block, then ``size``


@dataclass(frozen=True)
class ReferenceManifest:
    """Canonical, sorted list of reference image keys plus an optional content digest."""

    name: str
    keys: tuple[str, ...]
    content_digest: bytes | None = None
    _fingerprint: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_keys(self.keys)
        if self.content_digest is not None and len(self.content_digest) != 32:
            raise ManifestError("content digest must be 32 bytes (SHA-256)")
        object.__setattr__(self, "_fingerprint", self._compute_fingerprint())

    @classmethod
    def from_unsorted(
        cls, name: str, keys: Iterable[str], content_digest: bytes | None = None
    ) -> ReferenceManifest:
        """Build a manifest from keys in any order (duplicates are an error)."""
        return cls(name=name, keys=tuple(sorted(keys)), content_digest=content_digest)

    def __len__(self) -> int:
        return len(self.keys)

    def _compute_fingerprint(self) -> bytes:
        digest = hashlib.sha256(MANIFEST_DOMAIN)
        digest.update(f"n={len(self.keys)}\n".encode())
        chunk: list[str] = []
        for key in self.keys:
            chunk.append(key)
            if len(chunk) == 65536:
                digest.update(("\n".join(chunk) + "\n").encode())
                chunk.clear()
        if chunk:
            digest.update(("\n".join(chunk) + "\n").encode())
        if self.content_digest is not None:
            digest.update(b"content=" + self.content_digest.hex().encode() + b"\n")
        return digest.digest()

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 over the canonical key list (and content digest, when present)."""
        return self._fingerprint

    @property
    def fingerprint_hex(self) -> str:
        return self._fingerprint.hex()

    def summary(self) -> dict[str, str | int]:
        """How reports name this reference set (see :func:`reference_summary`)."""
        return reference_summary(self.name, len(self.keys), self.fingerprint_hex)

    def block_names(self) -> list[str]:
        """Names of the blocks (first key component), in manifest order."""
        names: list[str] = []
        for key in self.keys:
            block = key.split("/", 1)[0]
            if not names or names[-1] != block:
                names.append(block)
        return names

    def block_starts(self) -> np.ndarray:
        """Index of the first image of each block, plus ``len(self)`` at the end."""
        return self._block_starts.copy()

    @cached_property
    def _block_starts(self) -> np.ndarray:
        starts: list[int] = []
        previous = None
        for position, key in enumerate(self.keys):
            block = key.partition("/")[0]
            if block != previous:
                starts.append(position)
                previous = block
        starts.append(len(self.keys))
        return np.asarray(starts, dtype=np.int64)

    def layout(self) -> BlockLayout:
        """The identity and block structure a block-coded payload is decoded against."""
        return BlockLayout(self.name, self.fingerprint, len(self.keys), self._block_starts)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the manifest as text, atomically (temp file + rename)."""
        path = Path(path)
        content = "-" if self.content_digest is None else self.content_digest.hex()
        header = f"{_FILE_MAGIC} name={self.name} n={len(self.keys)} content={content}\n"

        def write(handle: BinaryIO) -> None:
            text = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
            text.write(header)
            for key in self.keys:
                text.write(key + "\n")
            text.flush()
            text.detach()  # the handle stays open for the atomic writer

        write_atomic(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceManifest:
        """Read a manifest written by :meth:`save`, checking its declared size."""
        try:
            with open(path, encoding="utf-8", newline="\n") as handle:
                header = handle.readline().rstrip("\n")
                keys = tuple(line.rstrip("\n") for line in handle)
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ManifestError(f"manifest {path} is not UTF-8 text") from exc
        if not header.startswith(_FILE_MAGIC + " "):
            raise ManifestError(f"{path} is not a plada manifest (bad first line)")
        fields = dict(part.split("=", 1) for part in header[len(_FILE_MAGIC) + 1 :].split(" "))
        try:
            declared = int(fields["n"])
            name = fields["name"]
            content = fields["content"]
        except (KeyError, ValueError) as exc:
            raise ManifestError(f"manifest {path} has a malformed first line") from exc
        if declared != len(keys):
            raise ManifestError(
                f"manifest {path} declares {declared} keys but holds {len(keys)}: "
                "the file is truncated; rebuild it"
            )
        digest = None if content == "-" else bytes.fromhex(content)
        return cls(name=name, keys=keys, content_digest=digest)
