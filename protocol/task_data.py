"""Labeled image sets: a task's training images on the sender, a holdout on the receiver.

Two on-disk forms: a ``.npz`` file (``images`` uint8 [N, C, H, W] or [N, H, W],
``labels`` integers, ``class_names`` str, optional ``name``: the task's name) and
an ImageFolder tree (``<class>/<image>``, classes sorted by name).

A task's name is the ``.npz``'s ``name``, else the file or folder name, unless
that only names a split (``train``, ``test``, ...): then the folder above it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_atomic
from protocol.errors import TaskDataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = frozenset(
    {"train", "training", "test", "testing", "val", "valid", "validation", "holdout", "eval"}
)


@dataclass(frozen=True)
class LabeledImages:
    """uint8 images [N, C, H, W], int64 labels in [0, k), and the k class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str = "task"
    # files of an ImageFolder that could not be read, skipped: (path, reason) each
    unreadable: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TaskDataError(f"{self.name}: images must be uint8 [N, C, H, W]")
        if self.labels.shape != (self.images.shape[0],):
            raise TaskDataError(f"{self.name}: need one label per image")
        if self.labels.size == 0:
            raise TaskDataError(f"{self.name}: holds no images: give labeled images")
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
            "name": np.asarray(self.name),
        }
        write_atomic(Path(path), lambda handle: np.savez_compressed(handle, **arrays))


def task_name(path: Path) -> str:
    """The name a task file or folder stands for (see the module docstring)."""
    stem = path.stem if path.is_file() else path.name
    if stem.lower() in SPLIT_NAMES and path.resolve().parent.name:
        return path.resolve().parent.name
    return stem


def load_labeled_images(
    path: str | os.PathLike[str],
    size: int | None = None,
    channels: int | None = None,
) -> LabeledImages:
    """Load a ``.npz`` labeled set or an ImageFolder tree.

    ImageFolder images are converted to ``channels`` (1: grayscale, 3: RGB; default
    RGB) and resized to ``size`` (default 224). A ``.npz`` is taken as stored: one
    whose images have another shape than (``channels``, ``size``, ``size``) is a
    ``TaskDataError`` naming the fix.
    """
    path = Path(path)
    if path.is_dir():
        return _load_image_folder(path, size or 224, channels or 3)
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: give a .npz file or an ImageFolder directory")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # numpy's own words may advise unsafe loads
        raise TaskDataError(
            f"{path} is not a labeled .npz file ({type(exc).__name__}): give a .npz saved with "
            "numpy.savez (images, labels, class_names) or an ImageFolder directory"
        ) from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise TaskDataError(
            f"{path} is a single .npy array, not a labeled .npz: save images, labels and "
            "class_names together with numpy.savez (or give an ImageFolder directory)"
        )
    try:
        with data:
            images, raw_labels = data["images"], data["labels"]
            names = tuple(str(n) for n in data["class_names"])
            name = str(data["name"]) if "name" in data.files else task_name(path)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise TaskDataError(
            f"{path} is not a labeled .npz (needs images, labels, class_names): {exc}"
        ) from exc
    if images.ndim == 3:
        images = images[:, None]
    if images.dtype != np.uint8:
        raise TaskDataError(
            f"{path}: images are {images.dtype}, not uint8: scale them to 0..255 and convert "
            "(numpy: images.astype(np.uint8))"
        )
    labeled = LabeledImages(
        images=images, labels=_integer_labels(raw_labels, path), class_names=names, name=name
    )
    _check_shape(labeled, path, size, channels)
    return labeled


def _integer_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """int64 labels; float labels only when every value is a whole number."""
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels % 1 == 0):
        return labels.astype(np.int64)
    raise TaskDataError(
        f"{path}: labels must be whole class numbers, got {labels.dtype} values such as "
        f"{labels.ravel()[:3].tolist()}: store the class index of each image"
    )


def _check_shape(images: LabeledImages, path: Path, size: int | None, channels: int | None) -> None:
    c, h, w = images.images.shape[1:]
    want_c = channels or c
    want_hw = (size, size) if size else (h, w)
    if (c, h, w) != (want_c, *want_hw):
        raise TaskDataError(
            f"{path}: images are {c}x{h}x{w} (channels x height x width), the reference set's "
            f"are {want_c}x{want_hw[0]}x{want_hw[1]}: resize them, or give the images as an "
            "ImageFolder directory, which is converted"
        )


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


def _load_image_folder(root: Path, size: int, channels: int) -> LabeledImages:
    """An ImageFolder's images, converted; unreadable files are skipped and listed (a
    folder where none can be read is an error)."""
    files, all_labels, classes = image_folder_files(root)
    images, kept, unreadable = _converted_files(root, files, size, channels)
    labels = all_labels[kept]
    return LabeledImages(
        images=images,
        labels=labels,
        class_names=classes,
        name=task_name(root),
        unreadable=tuple(unreadable),
    )


def _converted_files(
    root: Path, files: list[Path], size: int, channels: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """(the readable files' images, uint8 [N, channels, size, size]; the indices of those
    files; (file, reason) of each unreadable one). None readable is a ``TaskDataError``."""
    from PIL import Image, UnidentifiedImageError

    from protocol.images import opened_image

    mode = {1: "L", 3: "RGB"}[channels]
    images, kept, unreadable = [], [], []
    for index, file in enumerate(files):
        try:
            with opened_image(file) as img:
                converted = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            unreadable.append((str(file), str(exc)))
            continue
        array = np.asarray(converted, dtype=np.uint8)
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        kept.append(index)
    if not images:
        file, reason = unreadable[0]
        raise TaskDataError(f"{root}: no image could be read (first: {file}: {reason})")
    return np.stack(images), np.asarray(kept, dtype=np.int64), unreadable


def unlabeled_image_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every image file under the directory ``root``, at any depth, sorted."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TaskDataError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_unlabeled_images(
    path: str | os.PathLike[str], size: int | None = None, channels: int | None = None
) -> np.ndarray:
    """Unlabeled images, uint8 [N, channels, size, size]: a directory of image files at any
    depth, converted as an ImageFolder's are (default 224 px RGB; unreadable ones skipped),
    or a ``.npz`` whose ``images`` are taken as stored (labels, if any, are ignored), which
    must have that shape when ``size`` and ``channels`` are given."""
    path = Path(path)
    if path.is_dir():
        files = unlabeled_image_files(path)
        images, _, _ = _converted_files(path, files, size or 224, channels or 3)
        return images
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: give a directory of images or a .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError) as exc:
        raise TaskDataError(
            f"{path} is not a .npz with an images array ({type(exc).__name__}): save uint8 "
            "images [N, C, H, W] with numpy.savez, or give a directory of images"
        ) from exc
    images = images[:, None] if images.ndim == 3 else images
    shape = images.shape if images.ndim == 4 else (0, 0, 0, 0)
    want = (channels or shape[1], size or shape[3], size or shape[3])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != want:
        raise TaskDataError(
            f"{path}: images are {images.dtype} {list(images.shape[1:])}, the task's are uint8 "
            f"{list(want)}: convert them, or give a directory of images"
        )
    if not len(images):
        raise TaskDataError(f"{path} holds no images: give at least one")
    return images
