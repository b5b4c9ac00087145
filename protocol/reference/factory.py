"""Opening a reference set from the spec a user gives (``--reference``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import ReferenceSetError
from protocol.reference.base import ReferenceSource
from protocol.reference.glyph_pool import GlyphPool, parse_glyph_spec
from protocol.reference.image_folder import ImageFolderReference
from protocol.reference.webdataset import WebDatasetReference
from protocol.world.glyphs import default_cache_dir

if TYPE_CHECKING:
    from protocol.reference.canonical import AvailabilityBuild


def open_reference(
    spec: str, cache_dir: str | os.PathLike[str] | None = None, image_size: int = 64
) -> ReferenceSource:
    """Open a reference set from a spec.

    - ``glyphs`` or ``glyphs:seed=0,per=700``: the embedded glyph world (generated and
      cached on first use);
    - ``wds:<dir or pattern>``, or a directory holding ``*.tar`` shards: WebDataset shards;
    - any other directory: an ImageFolder tree ``<wnid>/<file>``.
    """
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


@dataclass(frozen=True)
class ReferenceLocation:
    """Where a reference set is: its spec (``--reference``), where this machine caches it,
    the image side for image files (``--image-size``), and the canonical manifest whose
    indices payloads use where this copy is not the whole set (``--canonical``)."""

    spec: str = "glyphs"
    cache_dir: str | None = None
    image_size: int = 64
    canonical: str | None = None

    def open(self, build: AvailabilityBuild | None = None) -> ReferenceSource:
        """The reference set (see :func:`open_reference`); with a canonical manifest, the
        copy seen through it, with the availability ``build`` makes (None: the cached
        decoded check where one was built, else the listing's)."""
        local = open_reference(self.spec, self.cache_dir, self.image_size)
        if self.canonical is None:
            return local
        from protocol.reference.canonical import open_canonical

        cache = Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()
        return open_canonical(local, self.canonical, cache, build)

    def absolute(self) -> ReferenceLocation:
        """The same location with its paths absolute (for processes with another working
        directory, e.g. a cluster's workers); ``glyphs`` specs have none."""
        spec = self.spec
        if spec.startswith("wds:"):
            spec = "wds:" + os.path.abspath(spec[4:])
        elif os.path.exists(spec):
            spec = os.path.abspath(spec)
        cache = None if self.cache_dir is None else os.path.abspath(self.cache_dir)
        canonical = None if self.canonical is None else os.path.abspath(self.canonical)
        return ReferenceLocation(spec, cache, self.image_size, canonical)
