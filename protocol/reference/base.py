"""The local reference set as both sides see it: a manifest plus a way to load images."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from protocol.errors import ReferenceSetError
from protocol.manifest import ReferenceManifest


class ReferenceSource(abc.ABC):
    """A reference set: its manifest and uint8 images by manifest index."""

    manifest: ReferenceManifest
    in_channels: int

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


def open_reference(
    spec: str, cache_dir: str | os.PathLike[str] | None = None, image_size: int = 64
) -> ReferenceSource:
    """Open a reference set from a spec.

    - ``glyphs`` or ``glyphs:seed=0,per=700``: the embedded glyph world (generated and
      cached on first use);
    - ``wds:<dir or pattern>``, or a directory holding ``*.tar`` shards: WebDataset shards;
    - any other directory: an ImageFolder tree ``<wnid>/<file>``.
    """
    from protocol.reference.glyph_pool import GlyphPool, parse_glyph_spec
    from protocol.reference.image_folder import ImageFolderReference
    from protocol.reference.webdataset import WebDatasetReference
    from protocol.world.glyphs import default_cache_dir

    if spec == "glyphs" or spec.startswith("glyphs:"):
        return GlyphPool.open(parse_glyph_spec(spec), cache_dir)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec.startswith("wds:"):
        return WebDatasetReference(spec[4:], image_size=image_size, cache_dir=cache)
    path = Path(spec)
    if path.is_dir():
        if any(path.glob("*.tar")) and not any(p.is_dir() for p in path.iterdir()):
            return WebDatasetReference(spec, image_size=image_size, cache_dir=cache)
        return ImageFolderReference(path, image_size=image_size)
    raise ReferenceSetError(
        f"reference {spec!r} is neither 'glyphs[:seed=S,per=P]', 'wds:<shards>' "
        "nor an existing directory"
    )
