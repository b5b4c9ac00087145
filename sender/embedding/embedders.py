"""Image embedders: open_clip from local weights (production) and pixels (duplicate checks)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from protocol.errors import ConfigError, WeightsError, exception_summary
from sender.scoring.scores import l2_normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Embedder(Protocol):
    """Maps uint8 images [N, C, H, W] to L2-normalised float32 embeddings [N, D]."""

    name: str

    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray: ...


class ClipEmbedder(Embedder, Protocol):
    """An image and text embedder with CLIP's interface, as the production sender uses it:
    images preprocessed like the stored reference embeddings, class-name prompts."""

    model_name: str
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> [3, S, S]

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray: ...

    def embed_text(self, texts: list[str]) -> np.ndarray: ...

    @property
    def logit_scale(self) -> float: ...


def resolve_model_name(model_name: str) -> str:
    """An open_clip model name; a config ``.json`` path is registered and named by its stem."""
    import open_clip

    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ConfigError(f"model config {path} not found")
        open_clip.add_model_config(path)
        model_name = path.stem
    if model_name not in open_clip.list_models():
        raise ConfigError(
            f"open_clip has no model {model_name!r}: pass a name from open_clip.list_models() "
            "or the path of its config .json"
        )
    return model_name


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def check_local_files(model_name: str, pretrained: str | os.PathLike[str]) -> None:
    """The typed error for a model config or weights file that is not there, before
    open_clip (seconds to import) is loaded."""
    if model_name.endswith(".json") and not Path(model_name).is_file():
        raise ConfigError(f"model config {model_name} not found")
    text, name = str(pretrained), model_name.removesuffix(".json")
    if _looks_like_path(text) and not Path(text).is_file():
        raise WeightsError(
            f"CLIP weights {text} not found: copy the open_clip checkpoint for "
            f"{Path(name).name} to this machine and pass its path (plada never "
            "downloads weights)"
        )


def load_open_clip(model_name: str, pretrained: str | os.PathLike[str], device: str = "cpu"):
    """(model in eval mode, PIL preprocess transform) from a local file or a cached tag.

    ``model_name`` is an open_clip model name or the path of a model config JSON
    (a custom architecture, registered under the file's stem). ``pretrained`` is a
    weights file, or an open_clip pretrained tag whose checkpoint is already in the
    local Hugging Face cache; nothing is ever downloaded.
    """
    check_local_files(model_name, pretrained)
    import open_clip

    model_name = resolve_model_name(model_name)
    text = str(pretrained)
    if Path(text).is_file():
        source = f"CLIP weights {text}"
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if text not in tags:
            raise ConfigError(
                f"{text!r} is neither a weights file nor a pretrained tag of {model_name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
        return _load_cached_tag(model_name, text, device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=text, device=device
        )
    except Exception as exc:  # open_clip raises RuntimeError/KeyError/OSError on bad files
        raise WeightsError(
            f"cannot load {source}: {exception_summary(exc)}; pass the path of a readable "
            "open_clip checkpoint"
        ) from exc
    return model.eval(), preprocess


def cached_tag_file(model_name: str, tag: str) -> Path:
    """The local checkpoint of an open_clip pretrained tag, found without the network
    (the Hugging Face cache, or open_clip's own ``~/.cache/clip``); a ``WeightsError``
    naming where it was looked for, if it is not there."""
    from open_clip import pretrained

    cfg = pretrained.get_pretrained_cfg(model_name, tag)
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, named = os.path.split(cfg["hf_hub"])  # "org/model/" or "org/model/file"
        names = [named] if named else [pretrained.HF_SAFE_WEIGHTS_NAME, pretrained.HF_WEIGHTS_NAME]
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        where = f"the Hugging Face cache ({repo}: {' or '.join(names)})"
    else:
        local = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
        if cfg.get("url") and local.is_file():
            return local
        where = str(local)
    raise WeightsError(
        f"the checkpoint of pretrained tag {tag!r} of {model_name} is not on this machine "
        f"(looked in {where}); copy it there or pass a weights file (plada never downloads)"
    )


def _load_cached_tag(model_name: str, tag: str, device: str):
    """Model and preprocess of a cached pretrained tag, loaded from its file with the
    tag's own preprocessing and activation; nothing reaches the network."""
    import open_clip
    from open_clip import pretrained

    path = cached_tag_file(model_name, tag)
    cfg = pretrained.get_pretrained_cfg(model_name, tag)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=str(path),
            device=device,
            force_quick_gelu=bool(cfg.get("quick_gelu", False)),
            image_mean=cfg.get("mean"),
            image_std=cfg.get("std"),
            image_interpolation=cfg.get("interpolation"),
            image_resize_mode=cfg.get("resize_mode"),
        )
    except Exception as exc:  # open_clip raises RuntimeError/KeyError/OSError on bad files
        raise WeightsError(
            f"cannot load the cached checkpoint {path} of tag {tag!r}: "
            f"{exception_summary(exc)}; copy it again"
        ) from exc
    return model.eval(), preprocess


class OpenClipEmbedder:
    """CLIP image (and text) towers via open_clip, from local weights (never downloaded)."""

    def __init__(
        self, model_name: str, weights: str | os.PathLike[str], device: str = "auto"
    ) -> None:
        from trainer.training import resolve_device

        self.device = resolve_device(device)
        # load first: it checks the files before open_clip is imported
        self.model, self.preprocess = load_open_clip(model_name, weights, str(self.device))
        self.model_name = resolve_model_name(model_name)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.name = f"open_clip:{model_name}"

    @torch.no_grad()
    def embed(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Embed uint8 arrays [N, C, H, W] (resized bicubically to the model's input)."""
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

    @torch.no_grad()
    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch [B, 3, S, S] (from :attr:`preprocess`)."""
        batch = batch.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, torch.float16, enabled=self.device.type == "cuda"):
            features = self.model.encode_image(batch)
        return l2_normalize(features.float().cpu().numpy())

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text-tower embeddings (open_clip's bundled tokenizer)."""
        import open_clip

        tokenizer = open_clip.get_tokenizer(self.model_name)
        tokens = tokenizer(texts).to(self.device)
        return l2_normalize(self.model.encode_text(tokens).float().cpu().numpy())

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (exp of the stored log scale)."""
        return float(self.model.logit_scale.detach().exp())


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
