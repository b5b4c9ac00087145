"""The embedded default target task: scikit-learn's real handwritten digits.

1,797 8x8 images (17 gray levels) of digits written by 43 people, upscaled to
the pool's 32x32 with the same bilinear operator the pool uses for its
low-resolution images, and split 50/50, stratified, with a fixed seed.
"""

from __future__ import annotations

import numpy as np

from protocol.task_data import LabeledImages
from protocol.world.glyphs import IMAGE_SIZE, apply_separable, resize_matrix

CLASS_NAMES = tuple(str(d) for d in range(10))


def upscale_digits(native: np.ndarray) -> np.ndarray:
    """Native 8x8 digits (values 0..16, [N, 8, 8]) -> uint8 [N, 32, 32], as the pool's resize."""
    small = native.astype(np.float64) / 16.0
    large = apply_separable(small, resize_matrix(8, IMAGE_SIZE))
    return np.rint(np.clip(large, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_digits_split(seed: int = 0, native: bool = False) -> tuple[LabeledImages, LabeledImages]:
    """(train, test) halves of the digits task as 32x32 uint8 images.

    ``native=True`` gives the original 8x8 images instead (values 0..16), the most
    compact honest form for sending real pixels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    if not native:
        images = upscale_digits(images)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.size), test_size=0.5, stratify=labels, random_state=seed
    )
    train_idx.sort()
    test_idx.sort()

    def part(index: np.ndarray, split: str) -> LabeledImages:
        return LabeledImages(
            images=images[index][:, None],
            labels=labels[index],
            class_names=CLASS_NAMES,
            name=f"digits-{split}",
        )

    return part(train_idx, "train"), part(test_idx, "test")
