"""Hostile files in a reference set: decompression bombs on every decode path,
truncated JPEGs, member and file names that are not UTF-8."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protocol.errors import TaskDataError
from protocol.images import MAX_IMAGE_PIXELS
from protocol.reference.encoded import UnreadableImage, decode_files, decode_rgb
from protocol.reference.image_folder import ImageFolderReference
from protocol.reference.webdataset import WebDatasetReference
from protocol.task_data import load_labeled_images


def _png_bomb(side: int) -> bytes:
    """A valid grey PNG of ``side`` x ``side`` pixels, all zero: tiny on disk."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(side) for _ in range(side)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _jpeg(width: int = 64, height: int = 48) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, format="JPEG"
    )
    return buffer.getvalue()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


PNG_BOMB = _png_bomb(12000)  # 144 Mpx in ~140 KB


def test_a_png_bomb_is_refused_from_its_header_without_decoding() -> None:
    assert len(PNG_BOMB) < 200_000 and MAX_IMAGE_PIXELS < 12000 * 12000
    tracemalloc.start()
    with pytest.raises(UnreadableImage, match="too many pixels"):
        decode_rgb(PNG_BOMB, "bomb.png")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 << 20  # nothing near the 144 MB it would decode to


@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_a_jpeg_bomb_is_refused_on_the_tensor_path(decoder: str) -> None:
    bomb = _jpeg_claiming(8000, 8000)  # 64 Mpx: under Pillow's own limits, over ours
    assert len(bomb) < 4000
    good = _jpeg()
    out = decode_files([bomb, good, PNG_BOMB], lambda i: f"file-{i}", torch.device("cpu"), decoder)
    assert isinstance(out[0], UnreadableImage) and "8000 x 8000" in str(out[0])
    assert isinstance(out[2], UnreadableImage) and "too many pixels" in str(out[2])
    assert tuple(out[1].shape) == (3, 48, 64)


@pytest.mark.parametrize("decoder", ["torchvision", "torchcodec"])
def test_a_truncated_jpeg_is_a_typed_skip_on_every_path(decoder: str) -> None:
    truncated = _jpeg(256, 256)[:-600]
    with pytest.raises(UnreadableImage, match="not a readable image"):
        decode_rgb(truncated, "cut.jpg")
    (out,) = decode_files([truncated], lambda i: "cut.jpg", torch.device("cpu"), decoder)
    assert isinstance(out, UnreadableImage)


def test_a_bomb_in_a_task_folder_is_skipped_and_named(tmp_path: Path) -> None:
    """Refused as a decompression bomb, never decoded; the folder's other images load,
    and a folder of nothing but bombs is a typed error."""
    for name in ("cat", "dog"):
        (tmp_path / "task" / name).mkdir(parents=True)
        (tmp_path / "task" / name / "ok.jpg").write_bytes(_jpeg())
    (tmp_path / "task" / "dog" / "bomb.png").write_bytes(PNG_BOMB)
    loaded = load_labeled_images(tmp_path / "task", 32, 3)
    assert len(loaded) == 2 and list(loaded.labels) == [0, 1]
    ((path, reason),) = loaded.unreadable
    assert path.endswith("bomb.png") and "too many pixels" in reason
    for name in ("cat", "dog"):
        (tmp_path / "bombs" / name).mkdir(parents=True)
        (tmp_path / "bombs" / name / "bomb.png").write_bytes(PNG_BOMB)
    with pytest.raises(TaskDataError, match=r"no image could be read .*too many pixels"):
        load_labeled_images(tmp_path / "bombs", 32, 3)


def test_a_picture_or_a_pickle_given_as_labeled_images_gets_no_unsafe_advice(tmp_path) -> None:
    """numpy's own message for these ends in "you can load it unsafely using the
    allow_pickle= keyword"; plada's names the right file kinds instead."""
    picture, pickled = tmp_path / "photo.png", tmp_path / "objects.npy"
    picture.write_bytes(_jpeg())
    np.save(pickled, np.array([{"label": 1}], dtype=object), allow_pickle=True)
    for path in (picture, pickled):
        with pytest.raises(TaskDataError, match=r"not a labeled \.npz file") as refused:
            load_labeled_images(path, 32, 3)
        assert "allow_pickle" not in str(refused.value) and "unsafe" not in str(refused.value)


def test_odd_names_in_an_image_folder_are_skipped_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "ref"
    for folder in ("n001", "n002"):
        (root / folder).mkdir(parents=True)
        for i in range(3):
            (root / folder / f"img{i}.JPEG").write_bytes(_jpeg())
    odd = os.path.join(os.fsencode(root / "n001"), b"caf\xe9.JPEG")
    with open(odd, "wb") as handle:
        handle.write(_jpeg())
    os.mkdir(os.path.join(os.fsencode(root), b"n\xff03"))
    reference = ImageFolderReference(root, image_size=32)
    assert len(reference.manifest) == 6  # the six good images, the set still opens
    assert any("caf\\xe9.JPEG" in problem for problem in reference.problems)
    assert any("n\\xff03" in problem for problem in reference.problems)
    assert reference.load(np.arange(6)).shape == (6, 3, 32, 32)


def test_odd_member_names_in_a_shard_are_skipped_and_reported(tmp_path: Path) -> None:
    shard = tmp_path / "ref-0000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for name in ("n001_1.jpg", "n001_2.jpg", "n002_1.jpg"):
            data = _jpeg()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(shard.read_bytes())  # rename one member to bytes that are not UTF-8
    at = raw.index(b"n001_2.jpg")
    raw[at : at + 4] = b"n\xfe\xff1"
    checksum_at = 148  # recompute that header's checksum
    header_start = at - at % 512
    header = raw[header_start : header_start + 512]
    header[checksum_at : checksum_at + 8] = b" " * 8
    raw[header_start + checksum_at : header_start + checksum_at + 8] = (
        f"{sum(header):06o}\0 ".encode()
    )
    shard.write_bytes(bytes(raw))
    reference = WebDatasetReference(str(shard), image_size=32)
    assert list(reference.manifest.keys) == ["n001/n001_1", "n002/n002_1"]
    assert len(reference.problems) == 1 and "not UTF-8" in reference.problems[0]
    assert reference.load(np.arange(2)).shape == (2, 3, 32, 32)
