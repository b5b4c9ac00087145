"""Small on-disk worlds for tests: glyph images as an ImageNet-style JPEG tree, the same
images as WebDataset tar shards, a digits task as labeled ImageFolders, and a tiny
open_clip architecture with random weights saved to a file."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_CLIP_NAME = "plada-tiny-vit"


def save_tiny_clip(folder: Path) -> tuple[str, str]:
    """Register the tiny architecture with open_clip; save random weights; (name, path)."""
    import open_clip
    import torch

    config = folder / f"{TINY_CLIP_NAME}.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    weights = folder / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return TINY_CLIP_NAME, str(weights)


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0]).convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_reference_tree(pool, root: Path, per_block: int, blocks: int) -> list[str]:
    """Write ``blocks`` x ``per_block`` pool images as ``n<8 digits>/n<8>_<i>.JPEG``."""
    keys = []
    starts = pool.manifest.block_starts()
    for b in range(blocks):
        wnid = f"n{b + 1:08d}"
        folder = root / wnid
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.arange(starts[b], starts[b] + per_block)
        for i, image in zip(rows, pool.load(rows), strict=True):
            name = f"{wnid}_{int(i)}"
            (folder / f"{name}.JPEG").write_bytes(_jpeg(image))
            keys.append(f"{wnid}/{name}")
    return keys


def write_shards(tree: Path, out: Path, per_shard: int, seed: int = 0) -> list[Path]:
    """The tree's images as WebDataset shards, in shuffled order, with .cls members."""
    files = sorted(tree.glob("*/*.JPEG"))
    order = np.random.default_rng(seed).permutation(len(files))
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(files), per_shard)):
        path = out / f"reference-{number:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in order[start : start + per_shard]:
                file = files[j]
                for suffix, data in ((".jpg", file.read_bytes()), (".cls", b"0")):
                    info = tarfile.TarInfo(file.stem + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def write_task_tree(task, root: Path, limit_per_class: int | None = None) -> None:
    """A LabeledImages task as ``root/<class>/<i>.png``."""
    from PIL import Image

    for label, name in enumerate(task.class_names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(task.labels == label)[:limit_per_class]
        for i in rows:
            Image.fromarray(task.images[i][0]).save(folder / f"{int(i):05d}.png")
