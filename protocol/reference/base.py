"""The local reference set as both sides see it: a manifest plus a way to load images."""

from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np

from protocol.manifest import ReferenceManifest


class ReferenceSource(abc.ABC):
    """A reference set: its manifest and uint8 images by manifest index."""

    manifest: ReferenceManifest
    in_channels: int
    image_size: int  # the side of the square images it loads

    def __len__(self) -> int:
        return len(self.manifest)

    @abc.abstractmethod
    def load(self, indices: np.ndarray) -> np.ndarray:
        """uint8 images [m, C, H, W] for sorted manifest ``indices``."""

    def iter_chunks(self, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, images) over the whole set in manifest order."""
        for start in range(0, len(self), chunk):
            stop = min(start + chunk, len(self))
            yield start, self.load(np.arange(start, stop))
