"""The image decoders behind one interface: Pillow, torchvision and TorchCodec agree,
refuse what Pillow refuses, and turn damaged files into typed errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from protocol import images
from protocol.reference import encoded
from protocol.reference.encoded import (
    TENSOR_DECODERS,
    UnreadableImage,
    decode_files,
    decode_rgb,
    image_kind,
    jpeg_header,
    resolve_tensor_decoder,
)


def _image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(base, np.ones((8, 8, 1), np.uint8)))


def _encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


BASELINE = _encode(_image(), format="JPEG", quality=92)
PROGRESSIVE = _encode(_image(seed=1), format="JPEG", quality=92, progressive=True)
PNG = _encode(_image(seed=2), format="PNG")


def test_jpeg_headers_are_read_without_decoding() -> None:
    assert jpeg_header(BASELINE) == encoded.JpegHeader(96, 64, progressive=False)
    assert jpeg_header(PROGRESSIVE) == encoded.JpegHeader(96, 64, progressive=True)
    for data in (PNG, b"", b"\xff\xd8", b"\xff\xd8 not a jpeg", BASELINE[:20]):
        assert jpeg_header(data) is None
    kinds = [image_kind(d) for d in (BASELINE, PROGRESSIVE, PNG, b"junk")]
    assert kinds == ["baseline-jpeg", "progressive-jpeg", "other", "other"]


@pytest.mark.parametrize("decoder", TENSOR_DECODERS)
def test_every_decoder_matches_pillow_and_types_its_failures(decoder: str) -> None:
    files = [BASELINE, PROGRESSIVE, PNG, b"\xff\xd8 damaged", BASELINE[: len(BASELINE) // 3]]
    out = decode_files(files, lambda i: f"file-{i}", torch.device("cpu"), decoder)
    for position in range(3):
        expected = np.asarray(decode_rgb(files[position], "x")).transpose(2, 0, 1)
        assert out[position].dtype == torch.uint8 and out[position].shape == expected.shape
        difference = np.abs(out[position].numpy().astype(int) - expected.astype(int))
        assert difference.mean() < 1.5, (decoder, position, difference.mean())
    assert isinstance(out[3], UnreadableImage) and "file-3" in str(out[3])
    assert isinstance(out[4], UnreadableImage) and "file-4" in str(out[4])


@pytest.mark.parametrize("decoder", TENSOR_DECODERS)
def test_the_pixel_limit_holds_on_every_decoder(decoder: str, monkeypatch) -> None:
    big = _encode(_image(800, 600), format="JPEG")
    calls = []
    monkeypatch.setattr(encoded, "decode_jpeg_batch", lambda files, *a: calls.append(files) or [])
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 200_000)  # < 800 x 600
    (refused,) = decode_files([big], lambda i: "big.JPEG", torch.device("cpu"), decoder)
    assert isinstance(refused, UnreadableImage) and "too many pixels" in str(refused)
    assert calls == [[]]  # refused from its header: nothing was handed to the decoder
    with pytest.raises(UnreadableImage, match="too many pixels"):
        decode_rgb(big, "big.JPEG")  # the same limit on the Pillow path


def test_auto_picks_torchcodec_only_on_cuda_and_names_bad_choices() -> None:
    assert resolve_tensor_decoder("auto", "cpu") == "torchvision"
    assert resolve_tensor_decoder("torchcodec", "cpu") == "torchcodec"
    with pytest.raises(encoded.ReferenceSetError, match="unknown decoder 'nvjpeg'"):
        resolve_tensor_decoder("nvjpeg", "cpu")
