"""Decode once vs decode every epoch, on the demo world's receiver workload.

The embedded world keeps its glyphs decoded in memory, so to measure what decoding
costs a receiver, this writes 1% of the glyph pool (1,022 images) as JPEG files in
an ImageFolder tree and trains the demo's student on them as ``make demo`` does
(small CNN, 250 steps of 128 images: about 31 epochs over the kept images), once
decoding every batch from the files and once from the decode-once cache. It prints
the wall time of each, the cache's build time, and the ratio.

    python -m benchmarks.decode_once [--keep 0.01] [--steps 250] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_subset(pool, indices: np.ndarray, root: Path) -> None:
    """The pool's images ``indices`` as RGB JPEGs, one folder per 100 images."""
    from PIL import Image

    images = pool.load(indices)
    for position, image in enumerate(images):
        folder = root / f"n{position // 100:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image[0]).convert("RGB").save(buffer, format="JPEG", quality=90)
        (folder / f"{folder.name}_{position}.JPEG").write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    from protocol.reference.factory import open_reference
    from protocol.reference.image_folder import ImageFolderReference
    from trainer.batches import CachedBatches, EncodedBatches, Loading
    from trainer.decoded_cache import CacheOptions, build_cache, cache_side
    from trainer.training import StepHooks, TrainConfig, train_classifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", default="glyphs")
    parser.add_argument("--keep", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    pool = open_reference(args.reference)
    rng = np.random.default_rng(0)
    count = round(args.keep * len(pool))
    indices = np.sort(rng.choice(len(pool), count, replace=False))
    labels = torch.from_numpy(rng.integers(0, 10, count))
    config = TrainConfig(min_steps=args.steps, max_steps=args.steps, augment="crop-flip")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "reference"
        write_subset(pool, indices, root)
        reference = ImageFolderReference(root, image_size=32)
        rows = np.arange(count)
        started = time.perf_counter()
        files = EncodedBatches(
            reference, rows, labels, 32, "crop-flip", loading=Loading("pil", args.threads)
        )
        train_classifier(files, 10, config, in_channels=3, hooks=StepHooks(progress=False))
        every_epoch = time.perf_counter() - started
        started = time.perf_counter()
        cache = build_cache(
            reference, rows, cache_side(32), torch.device("cpu"), CacheOptions("memory")
        )
        built = time.perf_counter() - started
        cached = CachedBatches(cache, labels, 32, "crop-flip")
        train_classifier(cached, 10, config, in_channels=3, hooks=StepHooks(progress=False))
        once = time.perf_counter() - started
    epochs = args.steps * config.batch_size / count
    print(
        f"demo receiver workload: {count} JPEGs of 32 px, small CNN, {args.steps} steps of "
        f"{config.batch_size} ({epochs:.0f} epochs), {platform.machine()} CPU, "
        f"{args.threads} decode threads"
    )
    print(f"{'data path':34s} {'seconds':>8s}")
    print(f"{'decode every batch from the files':34s} {every_epoch:8.1f}")
    print(f"{'decode once (cache build)':34s} {built:8.1f}")
    print(f"{'decode once, then train (total)':34s} {once:8.1f}")
    print(f"decoding once is {every_epoch / once:.2f}x faster end to end")
    if args.json:
        result = {
            "images": count,
            "steps": args.steps,
            "epochs": epochs,
            "seconds_decoding_every_epoch": every_epoch,
            "seconds_cache_build": built,
            "seconds_decoding_once": once,
            "speedup": every_epoch / once,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
