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
from dataclasses import dataclass

import numpy as np

from protocol import images
from protocol.errors import ReferenceSetError
from protocol.images import opened_image, pixel_problem
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
        with opened_image(io.BytesIO(data)) as img:
            if at_least is not None and img.format == "JPEG":
                img.draft("RGB", (at_least, at_least))
            img.load()  # decode now: truncation surfaces here, not later
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"{where}: refused, {exc}") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad/truncated data
        raise UnreadableImage(f"{where}: not a readable image ({exc})") from exc


TENSOR_DECODERS = ("torchcodec", "torchvision")  # batched decoders to tensors (nvJPEG on CUDA)
_SOF_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)
_SOF_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's frame header says, read without decoding anything."""

    width: int
    height: int
    progressive: bool


def jpeg_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG file, or None if ``data`` is not a (readable) JPEG."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            position += 2
            continue
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _SOF_MARKERS:
            if position + 9 > len(data) or length < 8:
                return None
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            return JpegHeader(width, height, marker in _SOF_PROGRESSIVE)
        if marker in (0xD9, 0xDA) or length < 2:  # end of image, scan data: no frame found
            return None
        position += 2 + length
    return None


def image_kind(data: bytes) -> str:
    """``baseline-jpeg``, ``progressive-jpeg`` or ``other`` (PNG, damaged, ...): which
    files can take a hardware JPEG decoder's fast path."""
    header = jpeg_header(data)
    if header is None:
        return "other"
    return "progressive-jpeg" if header.progressive else "baseline-jpeg"


def pixel_limit() -> int:
    """The most pixels an image may have, on every decode path."""
    return images.MAX_IMAGE_PIXELS


def _complete_jpeg(data: bytes) -> bool:
    """Whether a JPEG file ends with its end-of-image marker (padding aside): batched
    decoders fill a truncated file with grey and only warn, so one without it goes to
    Pillow, which refuses truncation."""
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def resolve_tensor_decoder(decoder: str, device) -> str:
    """``auto``: TorchCodec on CUDA when it is installed, else torchvision."""
    if decoder in TENSOR_DECODERS:
        return decoder
    if decoder != "auto":
        raise ReferenceSetError(
            f"unknown decoder {decoder!r}: use auto or one of {', '.join(TENSOR_DECODERS)}"
        )
    import importlib.util

    import torch

    on_cuda = torch.device(device).type == "cuda"
    return "torchcodec" if on_cuda and importlib.util.find_spec("torchcodec") else "torchvision"


def _decode_one(item, device, decoder: str):
    if decoder == "torchcodec":
        from torchcodec.decoders import decode_jpeg

        return decode_jpeg(item, mode="RGB", device=device)
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(item, mode=ImageReadMode.RGB, device=device)


def decode_jpeg_batch(encoded: list[bytes], device, decoder: str = "torchvision") -> list:
    """JPEG files decoded together (``decoder``: torchcodec or torchvision; nvJPEG on a
    CUDA ``device``) to uint8 [3, H, W] tensors; None for each file it cannot decode
    (PNG, CMYK, damaged)."""
    import torch

    if decoder not in TENSOR_DECODERS:
        raise ReferenceSetError(f"unknown decoder {decoder!r} ({', '.join(TENSOR_DECODERS)})")
    data = [torch.frombuffer(bytearray(item), dtype=torch.uint8) for item in encoded]
    if not data:
        return []
    try:
        return list(_decode_one(data, device, decoder))
    except RuntimeError:  # one bad file fails the batch: retry one by one
        out = []
        for item in data:
            try:
                out.append(_decode_one(item, device, decoder))
            except RuntimeError:
                out.append(None)
        return out


def decode_files(
    encoded: list[bytes], where: Callable[[int], str], device, decoder: str = "torchvision"
) -> list:
    """Image files as uint8 [3, H, W] tensors on ``device``: JPEGs with
    :func:`decode_jpeg_batch`, the rest with Pillow; an :class:`UnreadableImage`
    (naming ``where(position)``) for each file neither can read, and for each JPEG
    larger than :func:`pixel_limit` (refused before it is decoded). JPEGs that do not
    end with their end-of-image marker are read by Pillow, which refuses truncation."""
    import torch

    limit = pixel_limit()
    out: list = [None] * len(encoded)
    jpegs = []
    for position, data in enumerate(encoded):
        header = jpeg_header(data)
        if header is None or not _complete_jpeg(data):
            continue
        problem = pixel_problem(header.width, header.height, limit)
        if problem is not None:
            out[position] = UnreadableImage(f"{where(position)}: refused, {problem}")
        else:
            jpegs.append(position)
    decoded = decode_jpeg_batch([encoded[i] for i in jpegs], device, decoder)
    for position, image in zip(jpegs, decoded, strict=True):
        out[position] = image
    for position, image in enumerate(out):
        if image is None:  # not a JPEG, or one the batched decoder could not read
            try:
                rgb = decode_rgb(encoded[position], where(position))
            except UnreadableImage as exc:
                out[position] = exc
                continue
            out[position] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).to(device)
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

    def try_read_bytes(self, index: int) -> tuple[bytes, str]:
        """(encoded file, '') or (b'', why it could not be read): for readers in threads
        that report bad images instead of stopping."""
        try:
            return self.read_bytes(index), ""
        except UnreadableImage as exc:
            return b"", str(exc)

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
