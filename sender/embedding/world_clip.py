"""The embedded world's CLIP: a small open_clip model trained once, deterministically, on
the glyph pool, so that the production path (CLIP embeddings in FAISS, a teacher on them,
the plan on thumbnails) runs on a machine that can download no weights.

No target is ever seen: the model learns the pool's own concept labels the CLIP way, each
image against the captions of all 146 concepts ("a photo of a digit 0."), so both towers
are trained and zero-shot prompts mean something. Augmentations that any photograph
collection has (pose, scale, stroke weight, resolution, contrast) keep it from learning
only the renderer. The result is an ordinary open_clip checkpoint with its config JSON,
cached like the pool under a directory named by its own fingerprint (architecture,
training recipe and pool), and loaded by ``--clip-model CONFIG.json --clip-weights FILE``
exactly as a user's weights are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError, StorageError
from protocol.reference.glyph_pool import GlyphPool
from sender.embedding.embedders import CLIP_MEAN, CLIP_STD

WORLD_CLIP_NAME = "plada-world-clip"
RECIPE_VERSION = 1
ARCHITECTURE = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CAPTION = "a photo of a {}."


@dataclass(frozen=True)
class WorldClipRecipe:
    """How the world's CLIP is trained (part of its fingerprint)."""

    samples: int = 160_000  # images seen in all (about 1.6 passes over the default pool)
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    architecture: dict[str, object] = field(default_factory=lambda: dict(ARCHITECTURE))

    def fingerprint(self, pool_fingerprint: str) -> str:
        text = json.dumps(
            {"recipe": asdict(self), "pool": pool_fingerprint, "version": RECIPE_VERSION},
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class WorldClip:
    """Where the trained model is: its config JSON and weights, and its fingerprint."""

    config: Path
    weights: Path
    fingerprint: str
    weights_sha256: str


def concept_captions(pool: GlyphPool) -> tuple[list[str], np.ndarray]:
    """(one caption per concept, each row's concept) of a glyph pool."""
    names = [concept.name for concept in pool.spec.concepts()]
    captions = [CAPTION.format(name.replace("-", " ").replace("_", " ")) for name in names]
    labels = np.arange(len(pool)) // pool.spec.images_per_concept
    return captions, labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, 1, S, S] -> CLIP-normalised float [B, 3, S, S], randomly posed, scaled,
    thickened or thinned, blurred to a lower resolution, and contrast-jittered."""
    x = images.float().div_(255.0)
    b, _, side, _ = x.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) * (high - low) + low

    angle, scale = uniform(-0.26, 0.26), uniform(0.8, 1.15)
    shear, shift = uniform(-0.15, 0.15), torch.rand(b, 2, generator=generator) * 0.3 - 0.15
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)],
        1,
    )
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, align_corners=False, padding_mode="border")
    stroke = torch.rand(b, generator=generator)
    thick = torch.nn.functional.max_pool2d(x, 3, 1, 1)
    thin = -torch.nn.functional.max_pool2d(-x, 3, 1, 1)
    x = torch.where((stroke < 0.2).view(b, 1, 1, 1), thick, x)
    x = torch.where((stroke > 0.8).view(b, 1, 1, 1), thin, x)
    low = int(torch.randint(8, side + 1, (1,), generator=generator))  # one resolution a batch
    if low < side:
        x = torch.nn.functional.interpolate(x, size=(low, low), mode="area")
        x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear")
    contrast, brightness = uniform(0.6, 1.2), uniform(-0.1, 0.1)
    x = (x * contrast.view(b, 1, 1, 1) + brightness.view(b, 1, 1, 1)).clamp_(0, 1)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def _register(config: Path) -> None:
    import open_clip

    open_clip.add_model_config(config)


def _new_model(open_clip: Any) -> torch.nn.Module:
    """A new, randomly initialised world CLIP, without open_clip's warning that no
    pretrained weights were loaded (none are meant to be: this is the training)."""

    def not_the_random_init_warning(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(not_the_random_init_warning)
    try:
        return open_clip.create_model(WORLD_CLIP_NAME, pretrained=None)
    finally:
        root.removeFilter(not_the_random_init_warning)


def train_world_clip(pool: GlyphPool, recipe: WorldClipRecipe, progress: bool) -> dict:
    """The trained model's state dict (see the module docstring)."""
    import open_clip
    from tqdm import tqdm

    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    model = _new_model(open_clip)
    tokens = open_clip.get_tokenizer(WORLD_CLIP_NAME)(concept_captions(pool)[0])
    labels = torch.from_numpy(concept_captions(pool)[1])
    steps = recipe.samples // recipe.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.learning_rate, total_steps=steps, pct_start=0.1
    )
    model.train()
    bar = tqdm(total=steps * recipe.batch_size, unit="img", unit_scale=True, disable=not progress)
    bar.set_description("training the world's CLIP")
    for _ in range(steps):
        rows = torch.randint(0, len(pool), (recipe.batch_size,), generator=generator)
        images = torch.from_numpy(pool.load(np.sort(rows.numpy())))
        order = torch.argsort(torch.argsort(rows))  # pool.load read the rows sorted
        x = augment(images[order], generator)
        image = model.encode_image(x, normalize=True)
        text = model.encode_text(tokens, normalize=True)
        logits = model.logit_scale.exp() * image @ text.T
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.update(recipe.batch_size)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval().state_dict()


def world_clip(
    pool: GlyphPool,
    cache_dir: str | os.PathLike[str],
    recipe: WorldClipRecipe | None = None,
    progress: bool = True,
) -> WorldClip:
    """The cached world CLIP for ``pool``, trained once into ``cache_dir``."""
    recipe = recipe or WorldClipRecipe()
    fingerprint = recipe.fingerprint(pool.manifest.fingerprint_hex)
    folder = Path(cache_dir) / f"world-clip-{fingerprint[:16]}"
    found = _cached(folder, fingerprint)
    if found is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = staging / f"{WORLD_CLIP_NAME}.json"
        config.write_text(json.dumps(recipe.architecture, indent=2))
        _register(config)
        torch.save(train_world_clip(pool, recipe, progress), staging / "weights.pt")
        digest = hashlib.sha256((staging / "weights.pt").read_bytes()).hexdigest()
        write_json_atomic(
            staging / "world_clip.json",
            {"fingerprint": fingerprint, "weights_sha256": digest, "recipe": asdict(recipe)},
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except OSError as exc:
        raise StorageError(f"cannot cache the world's CLIP in {folder}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = _cached(folder, fingerprint)
    assert found is not None
    return found


def _cached(folder: Path, fingerprint: str) -> WorldClip | None:
    """The model in ``folder`` when it is whole and of ``fingerprint``."""
    config, weights = folder / f"{WORLD_CLIP_NAME}.json", folder / "weights.pt"
    try:
        record = json.loads((folder / "world_clip.json").read_text())
        if record["fingerprint"] != fingerprint or not config.is_file():
            return None
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    except (OSError, ValueError, KeyError):
        return None
    if digest != record["weights_sha256"]:
        raise ConfigError(
            f"{weights} does not match its recorded digest: delete {folder} to train it again"
        )
    return WorldClip(config, weights, fingerprint, digest)
