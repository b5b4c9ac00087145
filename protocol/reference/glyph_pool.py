"""The embedded glyph world as a reference set, generated once and cached on disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError, ReferenceSetError
from protocol.manifest import ReferenceManifest
from protocol.reference.base import ReferenceSource
from protocol.world import glyphs

# Fingerprint of the default world (seed 0, 700 images per concept), published so that
# a device can tell that its regenerated pool is byte-identical to everyone else's.
DEFAULT_FINGERPRINT = "7ae5b8f90e9e18eb133e3b8bb45b0177152a438d5882f39ccd266bd9f3acdcca"


def _progress_wanted() -> bool:
    """PLADA_PROGRESS=1 shows progress bars also when stderr is not a terminal."""
    return os.environ.get("PLADA_PROGRESS", "") == "1"


def parse_glyph_spec(spec: str) -> glyphs.GlyphWorldSpec:
    """``glyphs`` or ``glyphs:seed=S,per=P,concepts=a+b+c`` -> a world spec."""
    options: dict[str, str] = {}
    if ":" in spec:
        for part in spec.split(":", 1)[1].split(","):
            if "=" not in part:
                raise ConfigError(f"bad glyph world option {part!r} (expected key=value)")
            key, value = part.split("=", 1)
            options[key.strip()] = value.strip()
    unknown = set(options) - {"seed", "per", "concepts"}
    if unknown:
        raise ConfigError(f"unknown glyph world options {sorted(unknown)} (seed, per, concepts)")
    try:
        seed = int(options.get("seed", 0))
        per = int(options.get("per", 700))
    except ValueError as exc:
        raise ConfigError(f"glyph world seed and per must be integers: {spec!r}") from exc
    if per < 1:
        raise ConfigError("glyph world needs at least one image per concept")
    concepts = tuple(options["concepts"].split("+")) if "concepts" in options else None
    return glyphs.GlyphWorldSpec(seed=seed, images_per_concept=per, concept_names=concepts)


def _render_range(spec: glyphs.GlyphWorldSpec, names: list[str]) -> np.ndarray:
    order = {concept.name: i for i, concept in enumerate(glyphs.all_concepts())}
    by_name = {concept.name: concept for concept in spec.concepts()}
    return np.concatenate(
        [
            glyphs.render_concept(by_name[name], spec.seed, order[name], spec.images_per_concept)
            for name in names
        ]
    )


def generate_pool(
    spec: glyphs.GlyphWorldSpec, workers: int | None = None, progress: bool = False
) -> np.ndarray:
    """Render the pool, one concept per task over worker processes (the bytes do not
    change with the number of workers); ``progress`` shows a bar with images/s."""
    from tqdm import tqdm

    names = [concept.name for concept in spec.concepts()]
    per = spec.images_per_concept
    workers = workers or min(len(names), os.cpu_count() or 1, 4)
    images = np.empty((len(names) * per, glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE), np.uint8)
    bar = tqdm(
        total=images.shape[0],
        unit="img",
        desc="rendering pool",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
    )
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(names) < 8:
            rendered = (_render_range(spec, [name]) for name in names)
        else:
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            )
            rendered = pool.map(_render_range, [spec] * len(names), [[n] for n in names])
        for position, concept in enumerate(rendered):
            images[position * per : (position + 1) * per] = concept
            bar.update(per)
    bar.close()
    return images


class GlyphPool(ReferenceSource):
    """Cached glyph world: ``<cache>/<tag>/images.npy`` + ``manifest.txt``."""

    in_channels = 1
    image_size = glyphs.IMAGE_SIZE

    def __init__(
        self, spec: glyphs.GlyphWorldSpec, images: np.ndarray, manifest: ReferenceManifest
    ):
        self.spec = spec
        self.images = images
        self.manifest = manifest

    @classmethod
    def open(
        cls, spec: glyphs.GlyphWorldSpec, cache_dir: str | os.PathLike[str] | None = None
    ) -> GlyphPool:
        """Load the cached pool (verifying every pixel) or generate and cache it."""
        root = Path(cache_dir) if cache_dir is not None else glyphs.default_cache_dir()
        folder = root / spec.tag
        pool = cls._load_cached(spec, folder)
        if pool is None:
            print(
                f"generating reference pool {spec.tag} into {folder} (once per cache) ...",
                file=sys.stderr,
            )
            images = generate_pool(spec, progress=sys.stderr.isatty() or _progress_wanted())
            manifest = glyphs.manifest_for(spec, images)
            cls._check_published(spec, manifest)
            cls._store(folder, images, manifest)
            pool = cls(spec, images, manifest)
        return pool

    @staticmethod
    def _check_published(spec: glyphs.GlyphWorldSpec, manifest: ReferenceManifest) -> None:
        if spec == glyphs.GlyphWorldSpec() and manifest.fingerprint_hex != DEFAULT_FINGERPRINT:
            import matplotlib

            raise ReferenceSetError(
                f"the regenerated default glyph world has fingerprint {manifest.fingerprint_hex}, "
                f"not the published {DEFAULT_FINGERPRINT}: this matplotlib "
                f"({matplotlib.__version__}) "
                "renders its fonts differently; install the matplotlib version from pyproject.toml"
            )

    @classmethod
    def _load_cached(cls, spec: glyphs.GlyphWorldSpec, folder: Path) -> GlyphPool | None:
        images_path, manifest_path = folder / "images.npy", folder / "manifest.txt"
        if not (images_path.is_file() and manifest_path.is_file()):
            return None
        try:
            manifest = ReferenceManifest.load(manifest_path)
            images = np.load(images_path, mmap_mode="r")
        except (OSError, ValueError, ReferenceSetError) as exc:
            print(f"cached pool {folder} is unreadable ({exc}); regenerating", file=sys.stderr)
            return None
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).digest()
        if manifest.content_digest != digest or list(manifest.keys) != spec.keys():
            print(
                f"cached pool {folder} does not match its manifest; regenerating", file=sys.stderr
            )
            return None
        return cls(spec, images, manifest)

    @staticmethod
    def _store(folder: Path, images: np.ndarray, manifest: ReferenceManifest) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            np.save(staging / "images.npy", images)
            manifest.save(staging / "manifest.txt")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ReferenceSetError(f"cannot cache the reference pool in {folder}: {exc}") from exc

    def load(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self.images[np.asarray(indices)])[:, None]
