"""Decode once, train many epochs: the kept reference images as one uint8 tensor.

Each image is decoded once, its shorter side resized to ``side`` and the centre
square kept, into a ``[N, 3, side, side]`` uint8 array. Training then crops and
flips batches of it on the device (:class:`~trainer.batches.CachedBatches`), so
later epochs cost no decoding at all.

Where it lives (``where``):

- ``cuda``: in GPU memory (142K images at 256 px are about 28 GB);
- ``memory``: in host memory (each batch is gathered into pinned memory, so its copy
  to a GPU runs asynchronously);
- ``mmap``: in a file, memory-mapped. The file is written under a temporary name and
  renamed when complete, so a killed run finds either a whole cache (and reopens it)
  or none (and builds it again);
- ``auto``: ``cuda`` when half the free GPU memory holds it, else ``memory`` when it
  fits in a quarter of the host's, else ``mmap``.

Images that cannot be read are recorded (``problems``) and reported by the batches
that draw them, as the on-the-fly path does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError
from protocol.reference.encoded import (
    EncodedReference,
    UnreadableImage,
    decode_files,
    decode_rgb,
    resolve_tensor_decoder,
)
from trainer.choices import CACHE_PLACES

CACHE_FORMAT = "plada-decoded-cache-v1"


def cache_side(image_size: int) -> int:
    """The cached square's side for a training crop of ``image_size`` (256 for 224)."""
    return math.ceil(image_size * 8 / 7)


def _square(data: bytes, where: str, side: int) -> np.ndarray:
    """One file decoded, shorter side resized to ``side``, centre square: uint8 [3, s, s]."""
    from PIL import Image

    image = decode_rgb(data, where, at_least=side)
    scale = side / min(image.width, image.height)
    width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.array(square, dtype=np.uint8).transpose(2, 0, 1)  # a writable copy


@dataclass
class DecodedCache:
    """The decoded images (``images[i]`` is kept image ``i``) and why some are missing."""

    images: torch.Tensor  # uint8 [N, 3, side, side]
    problems: dict[int, str]  # position -> why it could not be read
    side: int
    where: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def nbytes(self) -> int:
        return self.images.numel()


def _place(count: int, side: int, where: str, device: torch.device) -> str:
    if where not in CACHE_PLACES:
        raise ConfigError(f"cache place must be one of {', '.join(CACHE_PLACES)}, not {where!r}")
    if where != "auto":
        if where == "cuda" and device.type != "cuda":
            raise ConfigError("a cache in GPU memory needs a CUDA training device")
        return where
    size = count * 3 * side * side
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size <= free // 2:
            return "cuda"
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "memory" if size <= pages // 4 else "mmap"


Decoded = tuple[int, "np.ndarray | torch.Tensor | None", str]  # position, image, problem


def _decode_with_pil(
    reference: EncodedReference, indices: np.ndarray, side: int, threads: int
) -> Iterator[Decoded]:
    """Every kept image, in order, decoded and squared by Pillow in ``threads`` threads."""

    def one(position: int) -> Decoded:
        index = int(indices[position])
        try:
            data = reference.read_bytes(index)
            return position, _square(data, reference.describe(index), side), ""
        except UnreadableImage as exc:
            return position, None, str(exc)

    count = int(indices.size)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="plada-cache") as pool:
        for start in range(0, count, 1024):  # bounded: a few MB in flight, not the whole set
            yield from pool.map(one, range(start, min(count, start + 1024)))


def _decode_on_device(
    reference: EncodedReference,
    indices: np.ndarray,
    side: int,
    device: torch.device,
    threads: int,
    batch: int = 256,
) -> Iterator[Decoded]:
    """Every kept image, in order: files read by threads, decoded in batches on ``device``
    (nvJPEG on CUDA), resized and squared there."""
    import torch.nn.functional as F

    decoder = resolve_tensor_decoder("auto", device)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="plada-cache") as pool:
        for start in range(0, int(indices.size), batch):
            chunk = [int(i) for i in indices[start : start + batch]]
            files = list(pool.map(reference.try_read_bytes, chunk))
            present = [k for k, (data, _) in enumerate(files) if data]
            decoded = decode_files(
                [files[k][0] for k in present],
                lambda j, chunk=chunk, present=present: reference.describe(chunk[present[j]]),
                device,
                decoder,
            )
            images: dict[int, torch.Tensor | UnreadableImage] = dict(
                zip(present, decoded, strict=True)
            )
            for k, (_, problem) in enumerate(files):
                image = images.get(k)
                if image is None or isinstance(image, UnreadableImage):
                    yield start + k, None, problem or str(image)
                    continue
                height, width = int(image.shape[1]), int(image.shape[2])
                scale = side / min(height, width)
                size = (max(side, round(height * scale)), max(side, round(width * scale)))
                resized = F.interpolate(
                    image[None].float(), size=size, mode="bilinear", antialias=True
                )[0]
                top, left = (size[0] - side) // 2, (size[1] - side) // 2
                square = resized[:, top : top + side, left : left + side]
                yield start + k, square.round_().clamp_(0, 255).to(torch.uint8), ""


def _fill(target: torch.Tensor, decoded: Iterator[Decoded], progress: bool) -> dict[int, str]:
    """Write every decoded image into ``target``; returns the unreadable ones' problems."""
    from tqdm import tqdm

    problems: dict[int, str] = {}
    bar = tqdm(total=int(target.shape[0]), unit="img", desc="decode once", disable=not progress)
    for position, image, problem in decoded:
        if image is None:
            problems[position] = problem
            target[position] = 0
        else:
            target[position] = torch.as_tensor(image).to(target.device)
        bar.update(1)
    bar.close()
    return problems


@dataclass(frozen=True)
class CacheOptions:
    """Where a decoded cache lives and how it is filled.

    ``where``: auto, cuda, memory or mmap; ``path``: the cache file for ``mmap`` (or
    ``auto`` choosing it; a complete cache there of the same images and side is
    reopened instead of decoded again); ``decode``: ``pil`` (threads), ``tensor``
    (batches on the device), or ``auto`` (tensor on CUDA, pil on the CPU)."""

    where: str = "auto"
    path: Path | None = None
    threads: int = 8
    decode: str = "auto"
    progress: bool = False


def build_cache(
    reference: EncodedReference,
    indices: np.ndarray,
    side: int,
    device: torch.device,
    options: CacheOptions | None = None,
) -> DecodedCache:
    """Decode the images ``indices`` of ``reference`` once (see the module docstring)."""
    options = options or CacheOptions()
    where, path, threads = options.where, options.path, options.threads
    decode, progress = options.decode, options.progress
    indices = np.asarray(indices, dtype=np.int64)
    if decode not in ("auto", "pil", "tensor"):
        raise ConfigError(f"cache decode must be auto, pil or tensor, not {decode!r}")
    on_device = decode == "tensor" or (decode == "auto" and device.type == "cuda")
    place = _place(int(indices.size), side, where, device)
    shape = (int(indices.size), 3, side, side)

    def decoded() -> Iterator[Decoded]:
        if on_device:
            return _decode_on_device(reference, indices, side, device, threads)
        return _decode_with_pil(reference, indices, side, threads)

    if place == "mmap":
        if path is None:
            raise ConfigError("a memory-mapped cache needs a file path")
        return _mmap_cache(reference, indices, side, Path(path), decoded, progress)
    images = torch.empty(shape, dtype=torch.uint8, device=device if place == "cuda" else "cpu")
    problems = _fill(images, decoded(), progress)
    return DecodedCache(images, problems, side, place)


def _identity(reference: EncodedReference, indices: np.ndarray, side: int) -> dict:
    digest = hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()
    return {
        "format": CACHE_FORMAT,
        "reference": reference.manifest.fingerprint_hex,
        "indices_sha256": digest,
        "count": int(indices.size),
        "side": side,
    }


def _mmap_cache(
    reference: EncodedReference,
    indices: np.ndarray,
    side: int,
    path: Path,
    decoded,
    progress: bool,
) -> DecodedCache:
    identity = _identity(reference, indices, side)
    shape = (int(indices.size), 3, side, side)
    record = path.with_name(path.name + ".json")
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        saved = None
    complete = path.is_file() and path.stat().st_size == math.prod(shape)
    if isinstance(saved, dict) and saved.get("identity") == identity and complete:
        problems = {int(k): v for k, v in saved["problems"].items()}  # reopen it
        return DecodedCache(_mapped(path, shape), problems, side, "mmap")
    path.parent.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    partial = path.with_name(path.name + ".partial")
    target = np.memmap(partial, dtype=np.uint8, mode="w+", shape=shape)
    problems = _fill(torch.from_numpy(target), decoded(), progress)
    target.flush()
    del target
    os.replace(partial, path)
    write_json_atomic(record, {"identity": identity, "problems": problems}, durable=True)
    return DecodedCache(_mapped(path, shape), problems, side, "mmap")


def _mapped(path: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """The cache file as a tensor (copy-on-write: training never writes to it)."""
    return torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=shape))
