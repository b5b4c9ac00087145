"""A contact sheet of what a payload teaches: a sample of the kept reference images
of each class, with the class name and how many images it was given.

The operator looks at it before paying for the link: a class taught by the wrong
kind of image shows at a glance. Images come from the local reference set (read
from files for ImageFolder/WebDataset sets, the rendered pool for the glyph world).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protocol.atomic_files import write_atomic
from protocol.reference.base import ReferenceSource

SAMPLES_PER_CLASS = 10
MAX_CLASSES = 30


def sample_rows(
    kept: np.ndarray, labels: np.ndarray, classes: int, per_class: int = SAMPLES_PER_CLASS
) -> list[np.ndarray]:
    """For each class, up to ``per_class`` of its kept reference rows, spread evenly over
    them (deterministic)."""
    rows = []
    for label in range(classes):
        mine = kept[labels == label]
        if mine.size > per_class:
            mine = mine[np.linspace(0, mine.size - 1, per_class).round().astype(np.int64)]
        rows.append(mine)
    return rows


def shown_classes(counts: np.ndarray, limit: int = MAX_CLASSES) -> list[int]:
    """Every class when they fit; else the third with the fewest kept images (empty ones
    first: what an operator most needs to see) and the rest with the most."""
    if counts.size <= limit:
        return list(range(counts.size))
    order = np.argsort(counts, kind="stable")
    fewest = limit // 3
    return sorted({*order[:fewest].tolist(), *order[-(limit - fewest) :].tolist()})


def _tiles(images: np.ndarray) -> np.ndarray:
    """uint8 [m, C, H, W] as [m, H, W, 3] for display."""
    tiles = images.transpose(0, 2, 3, 1)
    return np.repeat(tiles, 3, axis=3) if tiles.shape[3] == 1 else tiles


def write_contact_sheet(
    path: Path,
    reference: ReferenceSource,
    kept: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    title: str,
) -> Path:
    """Render the sheet of a selection (``kept`` rows, their ``labels``) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.bincount(labels, minlength=len(class_names))
    shown = shown_classes(counts)
    samples = sample_rows(kept, labels, len(class_names))
    wanted = np.unique(np.concatenate([samples[c] for c in shown])).astype(np.int64)
    loaded = dict(zip(wanted.tolist(), _tiles(reference.load(wanted)), strict=True))
    side = reference.image_size
    figure, axes = plt.subplots(
        len(shown),
        1,
        figsize=(1.0 + 0.75 * SAMPLES_PER_CLASS, 0.4 + 0.8 * len(shown)),
        squeeze=False,
    )
    blank = np.full((side, side, 3), 255, np.uint8)
    for axis, label in zip(axes[:, 0], shown, strict=True):
        tiles = [loaded[row] for row in samples[label].tolist()]
        tiles += [blank] * (SAMPLES_PER_CLASS - len(tiles))
        gap = np.full((side, max(1, side // 16), 3), 255, np.uint8)
        strip = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        axis.imshow(strip, cmap=None, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
        axis.set_ylabel(
            f"{class_names[label]}\n{counts[label]} kept",
            rotation=0,
            ha="right",
            va="center",
            fontsize=8,
        )
    hidden = len(counts) - len(shown)
    empty = int((counts == 0).sum())
    note = f", {empty} classes with none" if empty else ""
    note += f" ({hidden} mid-sized classes not shown)" if hidden > 0 else ""
    figure.suptitle(f"{title}: {int(counts.sum())} kept images{note}", fontsize=10)
    figure.tight_layout()
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100))
    plt.close(figure)
    return path
