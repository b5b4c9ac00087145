"""Target tasks from sources the glyph pool never saw, for checking method choices.

The pool renders matplotlib's own fonts, and the demo's target is scikit-learn's
handwritten digits; nothing in plada may be tuned to either. These targets come from
elsewhere:

- ``font-digits``: digits 0-9 in handwriting, script and other fonts that are not
  matplotlib's (Debian packages: ``apt-get install fonts-humor-sans fonts-femkeklaver
  fonts-breip fonts-dancingscript fonts-comic-neue fonts-urw-base35 fonts-freefont-ttf
  fonts-liberation2``), under random affine warps, stroke and blur;
- ``font-letters``: the letters a-j in the same fonts;
- ``photos``: real photographs (the ones scikit-learn and matplotlib ship: a temple,
  a flower, a portrait), grayscale patches; the class is the photograph, and train
  and test patches come from disjoint parts of it (the left 60%, the right 40%), so
  the test set is shifted from the labeled images. Far out of the pool's domain;
- ``photos-iid``: the same patches drawn from the whole photograph and split at
  random, the usual i.i.d. protocol.

Each is written as ``train.npz`` / ``test.npz`` in the task format (uint8 [N, 1, 32,
32], white on black like the pool):

    python -m benchmarks.heldout_targets font-digits --out work/targets/font-digits
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from protocol.task_data import LabeledImages
from protocol.world.glyphs import glyph_ink

SIDE = 32
TARGETS = ("font-digits", "font-letters", "photos", "photos-iid")
# font files outside matplotlib, from the Debian packages named in the module docstring
FONT_FILES = (
    "truetype/humor-sans/Humor-Sans.ttf",
    "truetype/femkeklaver/femkeklaver.ttf",
    "truetype/breip/breipfont.ttf",
    "opentype/dancingscript/DancingScript-Regular.otf",
    "opentype/comic-neue/ComicNeue-Regular.otf",
    "opentype/urw-base35/Z003-MediumItalic.otf",
    "opentype/urw-base35/URWBookman-LightItalic.otf",
    "opentype/urw-base35/C059-Italic.otf",
    "truetype/freefont/FreeSerifItalic.ttf",
    "truetype/liberation2/LiberationMono-Regular.ttf",
)
FONT_ROOT = Path("/usr/share/fonts")


def available_fonts() -> list[Path]:
    """The held-out fonts installed here; a clear error when none are."""
    fonts = [FONT_ROOT / name for name in FONT_FILES if (FONT_ROOT / name).is_file()]
    if len(fonts) < 3:
        raise SystemExit(
            "heldout_targets: fewer than 3 held-out fonts installed; run: apt-get install "
            "fonts-humor-sans fonts-femkeklaver fonts-breip fonts-dancingscript "
            "fonts-comic-neue fonts-urw-base35 fonts-freefont-ttf fonts-liberation2"
        )
    return fonts


def _warp(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random affine placement of ``ink`` in a SIDE x SIDE canvas, stroke and blur varied."""
    from scipy import ndimage

    fill = rng.uniform(0.55, 0.85) * SIDE
    scale = fill / max(ink.shape)
    angle = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.25, 0.25)
    aspect = rng.uniform(0.85, 1.15)
    forward = (
        np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        @ np.array([[1.0, shear], [0.0, 1.0]])
        @ np.diag([scale * aspect, scale])
    )
    inverse = np.linalg.inv(forward)
    centre = np.array([SIDE / 2, SIDE / 2]) + rng.uniform(-2, 2, size=2)
    offset = np.array(ink.shape) / 2 - inverse @ centre
    canvas = ndimage.affine_transform(ink, inverse, offset, output_shape=(SIDE, SIDE), order=1)
    stroke = rng.integers(-1, 2)
    if stroke > 0:
        canvas = ndimage.grey_dilation(canvas, size=(2, 2))
    elif stroke < 0:
        canvas = ndimage.grey_erosion(canvas, size=(2, 2)) * 0.5 + canvas * 0.5
    canvas = ndimage.gaussian_filter(canvas, rng.uniform(0.3, 1.2))
    canvas = canvas / max(canvas.max(), 1e-6) * rng.uniform(0.7, 1.0)
    canvas += rng.normal(0, 0.03, canvas.shape)
    return np.clip(canvas * 255, 0, 255).astype(np.uint8)


def font_task(
    chars: str, name: str, per_class: int = 180, seed: int = 0
) -> tuple[LabeledImages, LabeledImages]:
    """Half train, half test; every font in both, each image a fresh warp."""
    rng = np.random.default_rng(seed)
    fonts = available_fonts()
    images, labels = [], []
    for label, char in enumerate(chars):
        inks = [ink for ink in (glyph_ink(font, char, 64) for font in fonts) if ink is not None]
        for i in range(per_class):
            images.append(_warp(inks[i % len(inks)], rng))
            labels.append(label)
    return _split(np.stack(images)[:, None], np.array(labels), tuple(chars), name, rng)


def _split(
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    name: str,
    rng: np.random.Generator,
) -> tuple[LabeledImages, LabeledImages]:
    order = rng.permutation(labels.size)
    half = labels.size // 2
    train, test = np.sort(order[:half]), np.sort(order[half:])
    return (
        LabeledImages(images[train], labels[train], classes, name),
        LabeledImages(images[test], labels[test], classes, name),
    )


def _photographs() -> dict[str, np.ndarray]:
    """Grayscale float photographs shipped with scikit-learn and matplotlib."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = {}
    for filename, image in zip(("temple", "flower"), load_sample_images().images, strict=True):
        photos[filename] = np.asarray(Image.fromarray(image).convert("L"), np.float64)
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos["portrait"] = np.asarray(Image.open(hopper).convert("L"), np.float64)
    return photos


def photo_task(
    per_class: int = 300, seed: int = 0, shifted: bool = True
) -> tuple[LabeledImages, LabeledImages]:
    """Patches of each photograph: shifted, train from its left 60% and test from its
    right 40%; otherwise from anywhere, split at random."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photographs()
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, photo in enumerate(photos.values()):
        height, width = photo.shape
        cut = int(0.6 * width) if shifted else width
        regions = (
            (("train", (0, cut)), ("test", (cut, width))) if shifted else (("train", (0, width)),)
        )
        for split, (x_low, x_high) in regions:
            for _ in range(per_class // len(regions)):
                side = int(rng.uniform(0.15, 0.35) * min(height, x_high - x_low))
                y = rng.integers(0, height - side)
                x = rng.integers(x_low, x_high - side)
                patch = Image.fromarray(photo[y : y + side, x : x + side].astype(np.uint8))
                small = np.asarray(patch.resize((SIDE, SIDE), Image.BILINEAR), np.uint8)
                splits[split][0].append(small)
                splits[split][1].append(label)
    classes = tuple(photos)
    if not shifted:
        images, labels = splits["train"]
        return _split(np.stack(images)[:, None], np.array(labels), classes, "photos-iid", rng)
    return tuple(  # type: ignore[return-value]
        LabeledImages(np.stack(imgs)[:, None], np.array(labs), classes, "photos")
        for imgs, labs in splits.values()
    )


def make_target(name: str, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """(train, test) of a held-out target."""
    if name == "font-digits":
        return font_task("0123456789", name, seed=seed)
    if name == "font-letters":
        return font_task("abcdefghij", name, seed=seed)
    if name == "photos":
        return photo_task(seed=seed)
    if name == "photos-iid":
        return photo_task(seed=seed, shifted=False)
    raise SystemExit(f"unknown target {name!r} (known: {', '.join(TARGETS)})")


def more_test_images(name: str, at_least: int, seed: int = 0) -> LabeledImages | None:
    """Fresh draws from a target's test distribution (the same sources, other seeds), at
    least ``at_least`` images, so that students are measured on more images than its test
    split holds: every image of a font target's draw, the test regions of the shifted
    photographs, every patch of the i.i.d. ones. None for a target with no more images."""
    if name not in TARGETS:
        return None
    draws: list[LabeledImages] = []
    draw_seed = seed + 1000  # never the task's own seed
    while sum(len(d) for d in draws) < at_least:
        train, test = make_target(name, draw_seed)
        draws += [test] if name == "photos" else [train, test]  # photos: the test regions
        draw_seed += 1
    images = np.concatenate([d.images for d in draws])
    labels = np.concatenate([d.labels for d in draws])
    return LabeledImages(images, labels, draws[0].class_names, f"{name}-more")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", action="store_true", help="also write preview.png")
    args = parser.parse_args(argv)
    train, test = make_target(args.target, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train.save(out / "train.npz")
    test.save(out / "test.npz")
    if args.preview:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(4, 12, figsize=(9, 3.2))
        for ax, image, label in zip(axes.flat, train.images, train.labels, strict=False):
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
            ax.set_title(train.class_names[label], fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "preview.png")
    print(f"{args.target}: {len(train)} train and {len(test)} test images in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
