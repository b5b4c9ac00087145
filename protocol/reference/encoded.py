"""Reference sets stored as encoded image files (JPEG/PNG): ImageFolder trees, tar shards.

Canonical keys are ``<block>/<stem>``: the synset folder and the original file name
without its extension (``n01440764/n01440764_10026``). An ImageFolder file
``n01440764/n01440764_10026.JPEG`` and a WebDataset sample with ``__key__``
``n01440764_10026`` get the same key, so the same images give the same manifest
fingerprint in either layout.
"""

from __future__ import annotations

import abc
import io
from collections.abc import Callable

import numpy as np

from protocol.errors import ReferenceSetError
from protocol.reference.base import ReferenceSource


class UnreadableImage(ReferenceSetError):
    """One reference image is missing, truncated or not an image."""


def decode_rgb(data: bytes, where: str, at_least: int | None = None):
    """A fully decoded RGB PIL image, or :class:`UnreadableImage` naming ``where``.

    ``at_least``: a JPEG may be decoded downscaled (DCT scaling, much faster) as long
    as both sides stay at or above this many pixels.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if at_least is not None and img.format == "JPEG":
                img.draft("RGB", (at_least, at_least))
            img.load()  # decode now: truncation surfaces here, not later
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"{where}: refused, too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad/truncated data
        raise UnreadableImage(f"{where}: not a readable image ({exc})") from exc


def decode_jpeg_batch(encoded: list[bytes], device) -> list:
    """JPEG files decoded together by torchvision (nvJPEG on a CUDA ``device``) to uint8
    [3, H, W] tensors; None for each file it cannot decode (PNG, CMYK, damaged)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in encoded]
    if not data:
        return []
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the batch: retry one by one
        out = []
        for item in data:
            try:
                out.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_files(encoded: list[bytes], where: Callable[[int], str], device) -> list:
    """Image files as uint8 [3, H, W] tensors on ``device``: JPEGs with
    :func:`decode_jpeg_batch`, the rest with Pillow; an :class:`UnreadableImage`
    (naming ``where(position)``) for each file neither can read."""
    import torch

    out = []
    for position, image in enumerate(decode_jpeg_batch(encoded, device)):
        if image is None:
            try:
                rgb = decode_rgb(encoded[position], where(position))
            except UnreadableImage as exc:
                out.append(exc)
                continue
            image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).to(device)
        out.append(image)
    return out


class EncodedReference(ReferenceSource):
    """A reference set whose images are encoded files addressed by manifest index."""

    in_channels = 3
    image_size: int

    @abc.abstractmethod
    def read_bytes(self, index: int) -> bytes:
        """The encoded file of image ``index`` (raises :class:`UnreadableImage`)."""

    @abc.abstractmethod
    def describe(self, index: int) -> str:
        """Where image ``index`` lives, for messages."""

    def read_image(self, index: int):
        """Decoded RGB PIL image ``index`` (raises :class:`UnreadableImage`)."""
        return decode_rgb(self.read_bytes(index), self.describe(index))

    def try_read_image(self, index: int):
        """(image, None) or (None, reason): for passes that skip bad images."""
        try:
            return self.read_image(index), None
        except UnreadableImage as exc:
            return None, str(exc)

    def load(self, indices: np.ndarray) -> np.ndarray:
        from PIL import Image

        size = self.image_size
        out = np.empty((len(indices), 3, size, size), dtype=np.uint8)
        for row, index in enumerate(indices):
            img = self.read_image(int(index)).resize((size, size), Image.Resampling.BILINEAR)
            out[row] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        return out
