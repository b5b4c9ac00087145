"""The embedded default reference pool: font glyphs rendered deterministically from a seed.

About 150 concepts (digits, Latin and Greek letters, symbols, shapes), each a
block of ``images_per_concept`` 32x32 grayscale images drawn from the TrueType
fonts that ship inside matplotlib, varied by random affine warps, stroke width,
blur, resolution loss, contrast and noise. Digits are under 10% of the pool.

Sender and receiver both regenerate the pool; the arithmetic is float64 NumPy
without reductions whose order could vary, and randomness comes from PCG64 raw
output (a stream NumPy keeps stable across releases), so the bytes and hence the
manifest fingerprint are identical on every machine with the same fonts.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from protocol.errors import ReferenceSetError
from protocol.manifest import ReferenceManifest

IMAGE_SIZE = 32
_CANVAS = 48  # intermediate resolution; a multiple of every degraded resolution
_SOURCE = 80  # side of the square each rendered glyph is padded into
_GLYPH_PX = 56  # rendering size in pixels
_RESOLUTIONS = (8, 12, 16, 24, 48)
_STROKE_STEPS = (-1, 0, 0, 1, 1, 2, 2, 3)  # erosion (<0) or dilation (>0) steps at canvas scale

_TEXT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
)
_TEX_FONTS = ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf")

_GREEK_LOWER = "αβγδεζηθικλμνξοπρστυφχψω"
_GREEK_UPPER = "ΓΔΘΛΞΠΣΦΨΩ"  # the ones that do not look like Latin capitals
_GREEK_NAMES = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
]
_SYMBOLS = {
    "hash": "#",
    "dollar": "$",
    "percent": "%",
    "ampersand": "&",
    "at": "@",
    "plus": "+",
    "equals": "=",
    "question": "?",
    "exclamation": "!",
    "asterisk": "*",
    "slash": "/",
    "backslash": "\\",
    "less": "<",
    "greater": ">",
    "tilde": "~",
    "section": "§",
    "pilcrow": "¶",
    "copyright": "©",
    "euro": "€",
    "pound": "£",
    "yen": "¥",
    "infinity": "∞",
    "summation": "∑",
    "integral": "∫",
    "root": "√",
    "approx": "≈",
    "notequal": "≠",
    "plusminus": "±",
    "divide": "÷",
    "times": "×",
}
_SHAPES = {
    "disc": "●",
    "circle": "○",
    "square-filled": "■",
    "square": "□",
    "triangle-filled": "▲",
    "triangle": "△",
    "triangle-down": "▼",
    "diamond-filled": "◆",
    "diamond": "◇",
    "star-filled": "★",
    "star": "☆",
    "spade": "♠",
    "club": "♣",
    "heart": "♥",
    "diamond-suit": "♦",
    "arrow-left": "←",
    "arrow-right": "→",
    "arrow-up": "↑",
    "arrow-down": "↓",
    "check": "✓",
}


@dataclass(frozen=True)
class Concept:
    """One block of the pool: a name (the manifest block) and the character drawn."""

    name: str
    char: str
    fonts: tuple[str, ...]


def all_concepts() -> tuple[Concept, ...]:
    """Every concept of the default world, in manifest (key) order."""
    text = _TEXT_FONTS + _TEX_FONTS
    concepts = [Concept(f"digit-{d}", str(d), text) for d in range(10)]
    concepts += [Concept(f"latin-upper-{c}", c, text) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    concepts += [Concept(f"latin-lower-{c}", c, text) for c in "abcdefghijklmnopqrstuvwxyz"]
    concepts += [
        Concept(f"greek-lower-{name}", char, _TEXT_FONTS)
        for name, char in zip(_GREEK_NAMES, _GREEK_LOWER, strict=True)
    ]
    upper_names = [_GREEK_NAMES[_GREEK_LOWER.index(c.lower())] for c in _GREEK_UPPER]
    concepts += [
        Concept(f"greek-upper-{name}", char, _TEXT_FONTS)
        for name, char in zip(upper_names, _GREEK_UPPER, strict=True)
    ]
    concepts += [Concept(f"symbol-{name}", char, _TEXT_FONTS) for name, char in _SYMBOLS.items()]
    concepts += [Concept(f"shape-{name}", char, _TEXT_FONTS) for name, char in _SHAPES.items()]
    # manifest order is key order: sort by "<name>/" so "a-b/..." precedes "a/..."
    return tuple(sorted(concepts, key=lambda concept: concept.name + "/"))


@dataclass(frozen=True)
class GlyphWorldSpec:
    """What identifies a generated pool: seed, block size and (optionally) a concept subset."""

    seed: int = 0
    images_per_concept: int = 700
    concept_names: tuple[str, ...] | None = None  # None: all concepts

    def concepts(self) -> tuple[Concept, ...]:
        concepts = all_concepts()
        if self.concept_names is None:
            return concepts
        wanted = set(self.concept_names)
        unknown = wanted - {concept.name for concept in concepts}
        if unknown:
            raise ReferenceSetError(f"unknown glyph concepts: {sorted(unknown)}")
        return tuple(concept for concept in concepts if concept.name in wanted)

    @property
    def tag(self) -> str:
        """Short directory-safe name, unique per spec."""
        subset = ""
        if self.concept_names is not None:
            names = ",".join(sorted(self.concept_names)).encode()
            subset = "-sub" + hashlib.sha256(names).hexdigest()[:10]
        return f"glyphs-v1-s{self.seed}-p{self.images_per_concept}{subset}"

    def keys(self) -> list[str]:
        return [
            f"{concept.name}/{i:05d}"
            for concept in self.concepts()
            for i in range(self.images_per_concept)
        ]


# --- deterministic randomness -------------------------------------------------------------


class _Stream:
    """Uniform and integer draws from PCG64 raw output, stable across NumPy versions."""

    def __init__(self, seed: int, block: int) -> None:
        self._bits = np.random.PCG64(np.random.SeedSequence([seed, block, 0x61C8]))

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        raw = self._bits.random_raw(size)
        unit = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
        return low + (high - low) * unit

    def integers(self, high: int, size: int) -> np.ndarray:
        return np.minimum((self.uniform(0.0, 1.0, size) * high).astype(np.int64), high - 1)

    def bell(self, shape: tuple[int, ...]) -> np.ndarray:
        """Zero-mean, unit-variance bell-shaped noise (Irwin-Hall sum of three uniforms).

        Only exact elementwise arithmetic, so every platform gives the same bits.
        """
        count = int(np.prod(shape))
        total = self.uniform(0.0, 1.0, count) + self.uniform(0.0, 1.0, count)
        total = total + self.uniform(0.0, 1.0, count)
        return ((total - 1.5) * 2.0).reshape(shape)


# --- rendering ---------------------------------------------------------------------------


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def glyph_ink(font_path: str | os.PathLike[str], char: str, px: int) -> np.ndarray | None:
    """One character rasterized at ``px`` pixels by FreeType, as float [h, w] in [0, 1]
    cropped to its ink box; None when the font lacks it or it draws nothing."""
    from matplotlib.ft2font import FT2Font

    font = FT2Font(str(font_path))
    if font.get_char_index(ord(char)) == 0:
        return None
    font.set_size(px, 72)
    font.set_text(char, 0.0)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image(), dtype=np.float64) / 255.0
    rows = np.flatnonzero(bitmap.max(axis=1) > 0.1)
    cols = np.flatnonzero(bitmap.max(axis=0) > 0.1)
    if rows.size == 0 or cols.size == 0:
        return None
    return bitmap[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@lru_cache(maxsize=256)
def _render(font_file: str, char: str) -> np.ndarray | None:
    """Rasterize one character, centred on its ink box in a zero square; None if absent."""
    ink = glyph_ink(_font_dir() / font_file, char, _GLYPH_PX)
    if ink is None or max(ink.shape) > _SOURCE - 4:
        return None
    square = np.zeros((_SOURCE, _SOURCE), dtype=np.float64)
    top = (_SOURCE - ink.shape[0]) // 2
    left = (_SOURCE - ink.shape[1]) // 2
    square[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return square


def _glyph_sources(concept: Concept) -> tuple[np.ndarray, np.ndarray]:
    """Rendered glyphs of a concept in every font that has it, and their ink extents."""
    renders = [_render(font, concept.char) for font in concept.fonts]
    renders = [r for r in renders if r is not None]
    if not renders:
        raise ReferenceSetError(
            f"no font in matplotlib renders {concept.char!r} ({concept.name}); "
            "the matplotlib installation is incomplete"
        )
    stack = np.stack(renders)
    extents = np.empty((len(renders), 2), dtype=np.float64)
    for i, render in enumerate(renders):
        rows = np.flatnonzero(render.max(axis=1) > 0.1)
        cols = np.flatnonzero(render.max(axis=0) > 0.1)
        extents[i] = (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    return stack, extents


def _warp(sources: np.ndarray, extents: np.ndarray, rng: _Stream, count: int) -> np.ndarray:
    """Random affine warp of randomly chosen fonts into ``count`` canvases (bilinear)."""
    font = rng.integers(len(sources), count)
    angle = rng.uniform(-0.21, 0.21, count)  # about +-12 degrees
    shear = rng.uniform(-0.25, 0.25, count)
    fill = rng.uniform(0.7, 1.0, count) * _CANVAS  # longest ink side, in canvas pixels
    aspect = np.exp(rng.uniform(-0.25, 0.25, count))
    shift = rng.uniform(-0.06, 0.06, (count * 2)).reshape(count, 2) * _CANVAS
    scale = fill / extents[font].max(axis=1)  # source -> canvas
    cos, sin = np.cos(angle), np.sin(angle)
    # forward map M = R(angle) @ Shear @ diag(scale*aspect, scale/aspect); we need its inverse
    sx, sy = scale * aspect, scale / aspect
    m00, m01 = cos * sx, (cos * shear - sin) * sy
    m10, m11 = sin * sx, (sin * shear + cos) * sy
    det = m00 * m11 - m01 * m10
    i00, i01, i10, i11 = m11 / det, -m01 / det, -m10 / det, m00 / det
    grid = np.arange(_CANVAS, dtype=np.float64) - (_CANVAS - 1) / 2.0
    gy = grid[None, :, None] - shift[:, 1, None, None]
    gx = grid[None, None, :] - shift[:, 0, None, None]
    centre = (_SOURCE - 1) / 2.0
    src_y = centre + i10[:, None, None] * gx + i11[:, None, None] * gy
    src_x = centre + i00[:, None, None] * gx + i01[:, None, None] * gy
    src_y = np.clip(src_y, 0.0, _SOURCE - 1.000001)
    src_x = np.clip(src_x, 0.0, _SOURCE - 1.000001)
    y0 = src_y.astype(np.int64)
    x0 = src_x.astype(np.int64)
    wy = src_y - y0
    wx = src_x - x0
    flat = sources.reshape(-1)
    base = font[:, None, None] * (_SOURCE * _SOURCE) + y0 * _SOURCE + x0
    top = flat.take(base) * (1.0 - wx) + flat.take(base + 1) * wx
    bottom = flat.take(base + _SOURCE) * (1.0 - wx) + flat.take(base + _SOURCE + 1) * wx
    return top * (1.0 - wy) + bottom * wy


def _morph(images: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Grayscale dilation (radius > 0) or erosion (radius < 0), 3x3 steps, per image."""
    out = images.copy()
    for step in range(1, int(np.abs(radius).max(initial=0)) + 1):
        for sign, reduce in ((1, np.maximum), (-1, np.minimum)):
            chosen = np.flatnonzero(radius * sign >= step)
            if chosen.size == 0:
                continue
            x = out[chosen]
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
            acc = x.copy()
            for dy in (0, 1, 2):
                for dx in (0, 1, 2):
                    acc = reduce(acc, padded[:, dy : dy + _CANVAS, dx : dx + _CANVAS])
            out[chosen] = acc
    return out


def _blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur (radius 2) with a per-image sigma, as fixed-order sums."""
    taps = np.arange(-2, 3, dtype=np.float64)
    weights = np.exp(-(taps[None, :] ** 2) / (2.0 * sigma[:, None] ** 2))
    weights = weights / weights.sum(axis=1, keepdims=True)
    for axis in (1, 2):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[axis] = (2, 2)
        padded = np.pad(images, pad)
        acc = np.zeros_like(images)
        for k in range(5):
            window = padded[:, k : k + _CANVAS, :] if axis == 1 else padded[:, :, k : k + _CANVAS]
            acc = acc + weights[:, k, None, None] * window
        images = acc
    return images


def resize_matrix(source: int, target: int) -> np.ndarray:
    """Bilinear (align-corners=False) interpolation weights, at most two per output row."""
    weights = np.zeros((target, source), dtype=np.float64)
    for i in range(target):
        pos = min(max((i + 0.5) * source / target - 0.5, 0.0), source - 1.0)
        lo = min(math.floor(pos), source - 1)
        hi = min(lo + 1, source - 1)
        frac = pos - lo
        weights[i, lo] += 1.0 - frac
        weights[i, hi] += frac
    return weights


def apply_separable(images: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """out[n] = matrix @ images[n] @ matrix.T, summed in a fixed order (no BLAS)."""
    target, source = matrix.shape
    rows = np.zeros((images.shape[0], target, images.shape[2]), dtype=np.float64)
    for j in range(source):
        rows = rows + matrix[None, :, j, None] * images[:, None, j, :]
    out = np.zeros((images.shape[0], target, target), dtype=np.float64)
    for j in range(source):
        out = out + rows[:, :, j, None] * matrix[None, None, :, j]
    return out


def _degrade_and_resize(images: np.ndarray, resolution: np.ndarray) -> np.ndarray:
    """Area-average down to each image's resolution, then bilinear to the output size."""
    out = np.empty((images.shape[0], IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    for res in _RESOLUTIONS:
        chosen = np.flatnonzero(resolution == res)
        if chosen.size == 0:
            continue
        factor = _CANVAS // res
        x = images[chosen].reshape(chosen.size, res, factor, res, factor)
        acc = np.zeros((chosen.size, res, res), dtype=np.float64)
        for a in range(factor):
            for b in range(factor):
                acc = acc + x[:, :, a, :, b]
        out[chosen] = apply_separable(acc / (factor * factor), resize_matrix(res, IMAGE_SIZE))
    return out


def render_concept(concept: Concept, seed: int, block: int, count: int) -> np.ndarray:
    """Generate the ``count`` images of one concept block as uint8 [count, 32, 32]."""
    rng = _Stream(seed, block)
    sources, extents = _glyph_sources(concept)
    canvas = _warp(sources, extents, rng, count)
    radius = np.asarray(_STROKE_STEPS)[rng.integers(len(_STROKE_STEPS), count)]
    canvas = _morph(canvas, radius)
    canvas = _blur(canvas, rng.uniform(0.5, 1.6, count))
    canvas = np.clip(canvas, 0.0, 1.0)
    resolution = np.asarray(_RESOLUTIONS)[rng.integers(len(_RESOLUTIONS), count)]
    small = _degrade_and_resize(canvas, resolution)
    peak = small.reshape(count, -1).max(axis=1)
    small = small / np.maximum(peak, 1e-6)[:, None, None]  # ink normalised to full range
    contrast = rng.uniform(0.6, 1.0, count)[:, None, None]
    background = rng.uniform(0.0, 0.12, count)[:, None, None]
    noise = rng.uniform(0.0, 0.05, count)[:, None, None] * rng.bell((count, IMAGE_SIZE, IMAGE_SIZE))
    value = background + (contrast - background) * small + noise
    return np.rint(np.clip(value, 0.0, 1.0) * 255.0).astype(np.uint8)


def manifest_for(spec: GlyphWorldSpec, images: np.ndarray) -> ReferenceManifest:
    """Manifest of a generated pool; its content digest covers every pixel."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).digest()
    return ReferenceManifest(name=spec.tag, keys=tuple(spec.keys()), content_digest=digest)


def default_cache_dir() -> Path:
    """``$PLADA_CACHE`` or ``~/.cache/plada``."""
    return Path(os.environ.get("PLADA_CACHE", Path.home() / ".cache" / "plada"))
