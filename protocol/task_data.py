"""Labeled image sets: a task's training images on the sender, a holdout on the receiver.

Two on-disk forms: a ``.npz`` file (``images`` uint8 [N, C, H, W] or [N, H, W],
``labels`` int64, ``class_names`` str) and an ImageFolder tree
(``<class>/<image>``, classes sorted by name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_atomic
from protocol.errors import TaskDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabeledImages:
    """uint8 images [N, C, H, W], int64 labels in [0, k), and the k class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str = "task"

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TaskDataError(f"{self.name}: images must be uint8 [N, C, H, W]")
        if self.labels.shape != (self.images.shape[0],):
            raise TaskDataError(f"{self.name}: need one label per image")
        if len(self.class_names) < 2:
            raise TaskDataError(f"{self.name}: a task needs at least two classes")
        if self.labels.size and (
            self.labels.min() < 0 or self.labels.max() >= len(self.class_names)
        ):
            raise TaskDataError(f"{self.name}: labels must lie in [0, {len(self.class_names)})")

    def __len__(self) -> int:
        return int(self.labels.size)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write as ``.npz`` (atomically)."""
        arrays = {
            "images": self.images,
            "labels": self.labels,
            "class_names": np.asarray(self.class_names),
        }
        write_atomic(Path(path), lambda handle: np.savez_compressed(handle, **arrays))


def load_labeled_images(path: str | os.PathLike[str], size: int | None = None) -> LabeledImages:
    """Load a ``.npz`` labeled set, or an ImageFolder tree resized to ``size`` (RGB)."""
    path = Path(path)
    if path.is_dir():
        return _load_image_folder(path, size or 224)
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: give a .npz file or an ImageFolder directory")
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"].astype(np.int64)
            names = tuple(str(n) for n in data["class_names"])
    except (OSError, ValueError, KeyError) as exc:
        raise TaskDataError(
            f"{path} is not a labeled .npz (needs images, labels, class_names): {exc}"
        ) from exc
    if images.ndim == 3:
        images = images[:, None]
    return LabeledImages(images=images, labels=labels, class_names=names, name=path.stem)


def image_folder_files(
    root: str | os.PathLike[str],
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """(image files, int64 labels, sorted class names) of an ImageFolder ``<class>/<image>``."""
    root = Path(root)
    if not root.is_dir():
        raise TaskDataError(f"{root} is not a directory: give an ImageFolder <class>/<image>")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if len(classes) < 2:
        raise TaskDataError(f"{root}: an ImageFolder needs one sub-directory per class (>= 2)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                labels.append(label)
    if not files:
        raise TaskDataError(f"{root}: no images found")
    return files, np.asarray(labels, np.int64), classes


def _load_image_folder(root: Path, size: int) -> LabeledImages:
    from PIL import Image, UnidentifiedImageError

    files, labels, classes = image_folder_files(root)
    images = []
    for file in files:
        try:
            with Image.open(file) as img:
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError) as exc:
            raise TaskDataError(f"cannot read image {file}: {exc}") from exc
        images.append(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    return LabeledImages(
        images=np.stack(images), labels=labels, class_names=classes, name=root.name
    )
