"""Training batches for the student: from images held in memory, or decoded on the fly.

A training loop asks a source for the batches of a *plan*: an iterator of
``(step, rows)`` where ``rows`` are positions in the labeled subset. Sources return
normalised float images on the training device (channels-last) with their labels.

- :class:`TensorBatches`: uint8 images already in memory (the glyph world, small
  sets); augmentation runs batched on the device.
- :class:`EncodedBatches`: images read from the local reference set (ImageFolder or
  WebDataset shards) while earlier batches train. On CPU a thread pool decodes and
  crops with Pillow (JPEG DCT scaling when the crop allows). On CUDA the files of a
  batch are decoded together on the GPU (nvJPEG through ``torchvision.io.decode_jpeg``)
  and cropped there. Augmentation draws depend only on ``(seed, step, image)``, so a
  resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from protocol.errors import ConfigError
from protocol.reference.encoded import (
    TENSOR_DECODERS,
    EncodedReference,
    UnreadableImage,
    decode_files,
    decode_rgb,
    resolve_tensor_decoder,
)
from trainer.choices import AUGMENTATIONS, DECODE_CHOICES
from trainer.decoded_cache import DecodedCache

# image files: Pillow threads, or batched on the device by a tensor decoder ("tensor": the
# best one installed); auto: tensor on CUDA, Pillow on the CPU
CROP_AREA = (0.25, 1.0)  # random-resized-crop area fraction; milder than 0.08 for short runs
CROP_RATIO = (3 / 4, 4 / 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    """Normalised images on the device, their labels, and images that could not be read."""

    images: torch.Tensor
    labels: torch.Tensor
    problems: list[str] = field(default_factory=list)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Pixel values in [0, 255] [N, C, H, W] -> float channels-last, per-channel normalised."""
    x = images.float().div(255.0) if images.is_floating_point() else images.float().div_(255.0)
    x = x.contiguous(memory_format=torch.channels_last)
    if x.shape[1] == 3:
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std
    return (x - 0.5) / 0.5


def augment_batch(
    x: torch.Tensor, kind: str, generator: torch.Generator, out_size: int | None = None
) -> torch.Tensor:
    """Batched augmentation by one affine warp per image.

    ``affine``: rotation, scale and shift; ``affine-flip`` adds a horizontal flip;
    ``crop-flip``: a random resized crop (area and aspect ratio as torchvision's) with
    a flip, sampled at ``out_size`` pixels (default: the input's size).
    """
    if kind == "none":
        return x
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).mul_(high - low).add_(low).to(x.device)

    if kind == "crop-flip":
        area = uniform(*CROP_AREA)
        ratio = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        half_w = torch.sqrt(area * ratio).clamp(max=1.0)
        half_h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = uniform(-1.0, 1.0) * (1 - half_w)
        cy = uniform(-1.0, 1.0) * (1 - half_h)
        flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        zero = torch.zeros_like(cx)
        theta = torch.stack(
            [torch.stack([half_w * flip, zero, cx], 1), torch.stack([zero, half_h, cy], 1)], 1
        )
        shape = list(x.shape) if out_size is None else [n, x.shape[1], out_size, out_size]
        grid = F.affine_grid(theta.to(x.dtype), shape, align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    angle = uniform(-0.17, 0.17)
    scale = uniform(0.9, 1.1)
    tx, ty = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip = torch.ones(n, device=x.device)
    if kind == "affine-flip":
        flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    background = x.amin(dim=(2, 3), keepdim=True)
    return F.grid_sample(x - background, grid, align_corners=False) + background


class TensorBatches:
    """Batches of uint8 images held in memory; augmentation draws from one generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: str, seed: int):
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {AUGMENTATIONS}, not {augment!r}")
        self.images = images
        self.labels = labels
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to continue the augmentation stream."""
        return {"augment_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["augment_rng"])

    def batches(
        self, plan: Iterator[tuple[int, torch.Tensor]], device: torch.device
    ) -> Iterator[Batch]:
        for _step, rows in plan:
            x = normalize(self.images[rows].to(device))
            x = augment_batch(x, self.augment, self.generator)
            yield Batch(x, self.labels[rows].to(device))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The augmentation draws of one step: a function of ``(seed, step)`` alone, so a
    resumed run draws what an unbroken one would, with no state to checkpoint."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class CachedBatches:
    """Batches cropped and flipped on the device from a decoded cache
    (:mod:`trainer.decoded_cache`): the images are decoded once, before the first epoch."""

    def __init__(
        self,
        cache: DecodedCache,
        labels: torch.Tensor,
        image_size: int,
        augment: str = "crop-flip",
        seed: int = 0,
    ) -> None:
        if augment not in ("none", "crop-flip"):
            raise ConfigError(
                f"a decoded cache supports augment none or crop-flip, not {augment!r}"
            )
        if len(cache) != int(labels.shape[0]):
            raise ConfigError("the decoded cache and the labels have different lengths")
        self.cache = cache
        self.labels = labels
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.image_shape = (3, image_size, image_size)
        self._unreadable = torch.zeros(len(cache), dtype=torch.bool)
        self._unreadable[list(cache.problems)] = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # draws depend on (seed, step) only

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state

    def batches(
        self, plan: Iterator[tuple[int, torch.Tensor]], device: torch.device
    ) -> Iterator[Batch]:
        images = self.cache.images
        for step, rows in plan:
            bad = self._unreadable[rows]
            problems = [self.cache.problems[int(r)] for r in rows[bad]]
            rows = rows[~bad]
            picked = images[rows.to(images.device)]
            if picked.device.type == "cpu" and device.type == "cuda":
                picked = picked.pin_memory()  # cached pinned blocks: the copy runs async
            x = normalize(picked.to(device, non_blocking=True))
            if self.augment == "crop-flip":
                x = augment_batch(x, "crop-flip", step_generator(self.seed, step), self.image_size)
            elif x.shape[-1] != self.image_size:
                size = (self.image_size, self.image_size)
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True)
            x = x.contiguous(memory_format=torch.channels_last)
            yield Batch(x, self.labels[rows].to(device), problems)


@dataclass(frozen=True)
class CropBox:
    """A crop of a decoded image (pixels) and whether to mirror it."""

    left: int
    top: int
    width: int
    height: int
    flip: bool


def crop_box(width: int, height: int, augment: str, rng: np.random.Generator) -> CropBox:
    """Random resized crop + flip for training, or the centred square for ``none``."""
    if augment == "crop-flip":
        for _ in range(10):  # torchvision's rejection loop, then fall back to the centre
            area = width * height * rng.uniform(*CROP_AREA)
            ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
            w = round(math.sqrt(area * ratio))
            h = round(math.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return CropBox(left, top, w, h, bool(rng.random() < 0.5))
    side = min(width, height)
    return CropBox((width - side) // 2, (height - side) // 2, side, side, False)


def _crop_rng(seed: int, step: int, slot: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, slot])


@dataclass(frozen=True)
class Loading:
    """How image files are read and decoded for training: the decoder (see
    :data:`DECODE_CHOICES`), Pillow threads, and batches decoded ahead."""

    decode: str = "auto"
    threads: int = 8
    prefetch: int = 3


class EncodedBatches:
    """Batches decoded on the fly from the reference set's image files."""

    def __init__(
        self,
        reference: EncodedReference,
        indices: np.ndarray,
        labels: torch.Tensor,
        image_size: int,
        augment: str = "crop-flip",
        seed: int = 0,
        loading: Loading | None = None,
    ) -> None:
        loading = loading or Loading()
        decode = loading.decode
        if decode not in DECODE_CHOICES:
            raise ConfigError(f"decode must be one of {', '.join(DECODE_CHOICES)}, not {decode!r}")
        if augment not in ("none", "crop-flip"):
            raise ConfigError(
                f"images decoded on the fly support augment none or crop-flip, not {augment!r}"
            )
        self.reference = reference
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = labels
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.decode = decode
        self.threads = max(1, loading.threads)
        self.prefetch = max(1, loading.prefetch)
        self.image_shape = (3, image_size, image_size)
        self._side_stream = None  # CUDA: where batches are decoded, beside the training

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}  # draws depend on (seed, step, slot) only

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state

    # --- CPU: Pillow in worker threads (decoding releases the GIL) -----------------
    def _pil_image(self, index: int, step: int, slot: int) -> tuple[np.ndarray | None, str]:
        from PIL import Image

        try:
            data = self.reference.read_bytes(index)
            where = self.reference.describe(index)
            img = decode_rgb(data, where, _smallest_full_side(self.image_size, self.augment))
        except UnreadableImage as exc:
            return None, str(exc)
        box = crop_box(img.width, img.height, self.augment, _crop_rng(self.seed, step, slot))
        region = (box.left, box.top, box.left + box.width, box.top + box.height)
        size = (self.image_size, self.image_size)
        out = img.resize(size, Image.Resampling.BILINEAR, box=region)
        if box.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1), ""

    # --- CUDA (or CPU tensors): batched torchvision decode, crops on the device ----
    def _tensor_batch(
        self, encoded: list[tuple[bytes, str]], refs: np.ndarray, step: int, device: torch.device
    ) -> tuple[torch.Tensor, list[bool], list[str]]:
        problems = [problem for _, problem in encoded]
        decoder = self.decode if self.decode in TENSOR_DECODERS else "auto"
        present = [i for i, (data, problem) in enumerate(encoded) if data and not problem]
        decoded = decode_files(
            [encoded[i][0] for i in present],
            lambda k: self.reference.describe(int(refs[present[k]])),
            device,
            resolve_tensor_decoder(decoder, device),
        )
        side = self.image_size
        out = torch.empty(len(present), 3, side, side, device=device)
        kept = [False] * len(encoded)
        row = 0
        for slot, image in zip(present, decoded, strict=True):
            if isinstance(image, UnreadableImage):
                problems[slot] = str(image)
                continue
            height, width = int(image.shape[1]), int(image.shape[2])
            box = crop_box(width, height, self.augment, _crop_rng(self.seed, step, slot))
            crop = image[:, box.top : box.top + box.height, box.left : box.left + box.width]
            resized = F.interpolate(
                crop[None].float(),
                size=(side, side),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            out[row] = resized.flip(-1) if box.flip else resized
            kept[slot] = True
            row += 1
        return out[:row], kept, problems

    def batches(
        self, plan: Iterator[tuple[int, torch.Tensor]], device: torch.device
    ) -> Iterator[Batch]:
        """The plan's batches. On the device path each batch is decoded one batch ahead,
        so that on CUDA its decoding (on a side stream) overlaps the previous batch's
        training on the default stream."""
        use_tensor = self.decode != "pil" and (self.decode != "auto" or device.type == "cuda")
        decoded = self._decoded_batches(plan, device, use_tensor)
        if not use_tensor:
            yield from decoded
            return
        held = None
        try:
            for batch in decoded:
                if held is not None:
                    yield _hand_over(held, self._side_stream, device)
                held = batch
            if held is not None:
                yield _hand_over(held, self._side_stream, device)
        finally:
            decoded.close()  # stop the readers at once when training stops early

    def _decoded_batches(
        self, plan: Iterator[tuple[int, torch.Tensor]], device: torch.device, use_tensor: bool
    ) -> Iterator[Batch]:
        if use_tensor and device.type == "cuda" and self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        on_side = (
            torch.cuda.stream(self._side_stream)
            if use_tensor and self._side_stream is not None
            else contextlib.nullcontext()
        )
        with ThreadPoolExecutor(self.threads, thread_name_prefix="plada-decode") as pool:
            queued: deque[tuple[int, torch.Tensor, np.ndarray, list[Future]]] = deque()

            def submit(step: int, rows: torch.Tensor) -> None:
                refs = self.indices[rows.numpy()]
                if use_tensor:
                    futures = [pool.submit(self.reference.try_read_bytes, int(i)) for i in refs]
                else:
                    futures = [
                        pool.submit(self._pil_image, int(i), step, slot)
                        for slot, i in enumerate(refs)
                    ]
                queued.append((step, rows, refs, futures))

            upcoming = iter(plan)
            for step, rows in upcoming:
                submit(step, rows)
                if len(queued) > self.prefetch:
                    break
            while queued:
                step, rows, refs, futures = queued.popleft()
                ahead = next(upcoming, None)
                if ahead is not None:
                    submit(*ahead)
                results = [f.result() for f in futures]
                labels = self.labels[rows]
                if use_tensor:
                    with on_side:
                        images, kept, problems = self._tensor_batch(results, refs, step, device)
                        x = normalize(images)
                else:
                    kept = [image is not None for image, _ in results]
                    problems = [problem for _, problem in results]
                    stacked = [image for image, _ in results if image is not None]
                    shape = (0, *self.image_shape)
                    cpu = torch.from_numpy(np.stack(stacked)) if stacked else torch.empty(shape)
                    x = normalize(cpu.to(device, non_blocking=True))
                mask = torch.tensor(kept, dtype=torch.bool)
                with on_side:
                    y = labels[mask].to(device, non_blocking=True)
                yield Batch(x, y, [p for p in problems if p])


def _hand_over(batch: Batch, stream, device: torch.device) -> Batch:
    """Make a batch decoded on the side ``stream`` safe to use on the current one."""
    if stream is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        batch.images.record_stream(current)
        batch.labels.record_stream(current)
    return batch


def _smallest_full_side(side: int, augment: str) -> int:
    """The decoded size at which even the smallest crop still covers ``side`` pixels."""
    fraction = math.sqrt(CROP_AREA[0] / CROP_RATIO[1]) if augment == "crop-flip" else 1.0
    return math.ceil(side / fraction)
