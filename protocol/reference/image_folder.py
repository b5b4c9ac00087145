"""A reference set stored as an ImageFolder tree: ``<block>/<file>`` (ImageNet-21K layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.errors import ReferenceSetError
from protocol.manifest import ReferenceManifest
from protocol.reference.base import ReferenceSource
from protocol.task_data import IMAGE_SUFFIXES


class ImageFolderReference(ReferenceSource):
    """Keys are ``<folder>/<file name>``; images are loaded as RGB at ``image_size``."""

    in_channels = 3

    def __init__(self, root: Path, image_size: int = 64) -> None:
        self.root = root
        self.image_size = image_size
        keys = [
            f"{folder.name}/{file.name}"
            for folder in root.iterdir()
            if folder.is_dir()
            for file in folder.iterdir()
            if file.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not keys:
            raise ReferenceSetError(f"{root} holds no <folder>/<image> files")
        self.manifest = ReferenceManifest.from_unsorted(root.name, keys)

    def load(self, indices: np.ndarray) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        size = self.image_size
        out = np.empty((len(indices), 3, size, size), dtype=np.uint8)
        for row, index in enumerate(indices):
            path = self.root / self.manifest.keys[int(index)]
            try:
                with Image.open(path) as img:
                    rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            except FileNotFoundError as exc:
                raise ReferenceSetError(
                    f"reference image {path} is missing: restore it from the reference copy"
                ) from exc
            except (OSError, UnidentifiedImageError) as exc:
                raise ReferenceSetError(f"reference image {path} is unreadable: {exc}") from exc
            out[row] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
        return out
