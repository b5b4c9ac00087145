"""Batched JPEG decoding and CLIP preprocessing on the embedding device.

With ``--decode torchcodec`` or ``--decode torchvision`` a thread pool reads the encoded
bytes ahead of use; the main process decodes a whole batch with that library's
``decode_jpeg`` (nvJPEG when the device is a GPU), then resizes (shorter side, bicubic
with antialiasing), center-crops and normalises on the same device. Output matches open_clip's PIL
preprocessing closely, though not bit for bit. Images that nvJPEG cannot decode (PNG,
CMYK, damaged files) are retried one by one with PIL; those that still fail are
reported as unreadable, as in the PIL path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protocol.errors import ConfigError
from protocol.reference.base import ReferenceSource
from protocol.reference.encoded import EncodedReference, UnreadableImage, decode_files


@dataclass(frozen=True)
class PreprocessSpec:
    """The parts of an open_clip preprocess transform that matter: size and normalisation."""

    side: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, preprocess: Any) -> PreprocessSpec:
        side, mean, std = None, None, None
        for step in getattr(preprocess, "transforms", []):
            name = type(step).__name__
            if name == "Resize" and isinstance(step.size, int | list | tuple):
                size = step.size
                side = int(size if isinstance(size, int) else size[0])
            elif name == "Normalize":
                mean, std = tuple(step.mean), tuple(step.std)
        if side is None or mean is None or std is None:
            raise ConfigError(
                "--decode torchcodec/torchvision support Resize + CenterCrop + Normalize "
                "preprocessing only; use --decode pil for this model"
            )
        return cls(side, mean, std)


def iter_encoded_batches(
    reference: ReferenceSource,
    batches: list[tuple[int, int]],
    threads: int = 16,
    prefetch: int = 2,
) -> Iterator[tuple[list[bytes], torch.Tensor, list[str]]]:
    """(encoded files, rows, problems) per [start, stop) row range, read by a thread pool
    ahead of use.

    File reads release the GIL, so threads in this process read as fast as worker
    processes without pickling every file through a pipe.
    """
    if not isinstance(reference, EncodedReference):
        raise ConfigError("--decode torchcodec/torchvision need a reference set of image files")

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="plada-read") as pool:
        queued: deque[tuple[np.ndarray, list[Future]]] = deque()

        def read_ahead(start: int, stop: int) -> None:
            rows = np.arange(start, stop, dtype=np.int64)
            queued.append((rows, [pool.submit(reference.try_read_bytes, int(r)) for r in rows]))

        upcoming = iter(batches)
        for start, stop in upcoming:
            read_ahead(start, stop)
            if len(queued) > prefetch:
                break
        while queued:
            rows, futures = queued.popleft()
            following = next(upcoming, None)
            if following is not None:
                read_ahead(*following)
            results = [f.result() for f in futures]
            yield [d for d, _ in results], torch.from_numpy(rows), [p for _, p in results]


class TensorPreprocessor:
    """Decode + resize + crop + normalise a batch of encoded images on ``device``."""

    def __init__(
        self, spec: PreprocessSpec, device: torch.device, decoder: str = "torchvision"
    ) -> None:
        self.spec = spec
        self.device = device
        self.decoder = decoder
        self.mean = torch.tensor(spec.mean, device=device).view(3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(3, 1, 1)

    def _fit(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tf

        side = self.spec.side
        x = tf.resize(image.float(), [side], InterpolationMode.BICUBIC, antialias=True)
        x = tf.center_crop(x, [side, side]).clamp_(0, 255).round_().div_(255.0)
        return (x - self.mean) / self.std  # works for [3, H, W] and [B, 3, H, W]

    def __call__(self, encoded: list[bytes], problems: list[str], where: list[str]):
        """(batch [B, 3, S, S] on device, problems per image; '' when fine)."""
        side = self.spec.side
        out = torch.zeros(len(encoded), 3, side, side, device=self.device)
        problems = list(problems)
        present = [i for i, item in enumerate(encoded) if not problems[i] and item]
        decoded = decode_files(
            [encoded[i] for i in present], lambda k: where[present[k]], self.device, self.decoder
        )
        groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
        for i, image in zip(present, decoded, strict=True):
            if isinstance(image, UnreadableImage):
                problems[i] = str(image)
                continue
            groups.setdefault(tuple(image.shape), []).append((i, image))
        for members in groups.values():  # one resize per image size, not per image
            rows = [i for i, _ in members]
            out[rows] = self._fit(torch.stack([image for _, image in members]))
        return out, problems
