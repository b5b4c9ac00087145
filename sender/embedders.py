"""Image embedders: open_clip from local weights (production) and pixels (duplicate checks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from protocol.errors import ConfigError, WeightsError
from sender.scoring import l2_normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Embedder(Protocol):
    """Maps uint8 images [N, C, H, W] to L2-normalised float32 embeddings [N, D]."""

    name: str

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray: ...


class OpenClipEmbedder:
    """CLIP image tower via open_clip, loaded from a local weights file (never downloaded)."""

    def __init__(
        self, model_name: str, weights: str | os.PathLike[str], device: str = "cpu"
    ) -> None:
        import open_clip

        path = Path(weights)
        if not path.is_file():
            raise WeightsError(
                f"CLIP weights {path} not found: copy the open_clip checkpoint for {model_name} "
                "to this machine and pass its path (plada never downloads weights)"
            )
        if model_name not in open_clip.list_models():
            raise ConfigError(f"open_clip has no model {model_name!r}; see open_clip.list_models()")
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path), device=device
            )
        except Exception as exc:  # open_clip raises RuntimeError/KeyError/etc. on bad files
            raise WeightsError(f"cannot load CLIP weights {path} into {model_name}: {exc}") from exc
        self.model = model.eval()
        self.device = torch.device(device)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.name = f"open_clip:{model_name}"

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            x = x.to(self.device).float().div_(255.0)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = torch.nn.functional.interpolate(
                x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
            )
            out.append(self.model.encode_image((x - mean) / std).float().cpu().numpy())
        return l2_normalize(np.concatenate(out))


class PixelEmbedder:
    """Mean-centred, L2-normalised pixels at ``side`` x ``side``: a class-agnostic embedding.

    Used for near-duplicate (leakage) checks when the teacher's own features are
    class-discriminative (same-class images look alike to them); an exact or
    lightly re-encoded copy of an image scores a cosine near 1.
    """

    name = "pixels"

    def __init__(self, side: int = 16) -> None:
        self.side = side

    def embed(self, images: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).float()
            x = torch.nn.functional.adaptive_avg_pool2d(x, self.side).flatten(1)
            out.append((x - x.mean(dim=1, keepdim=True)).numpy())
        return l2_normalize(np.concatenate(out))
