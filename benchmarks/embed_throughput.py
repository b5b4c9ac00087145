"""``plada-send embed`` throughput: images/s with JPEG decoding included.

Generates ImageNet-sized JPEGs (500 x 375, textured so they do not compress to
nothing) in an ImageFolder tree, saves an open_clip architecture with random
weights to a file, and runs the real embed pass over the tree. Prints, side by
side, the decode + preprocess floor (the DataLoader alone, no model) and the full
pass, with the time 14.2M images would take at that rate.

    python -m benchmarks.embed_throughput [--images 2048] [--model ViT-B-32] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGENET_21K = 14_200_000


def write_jpegs(root: Path, count: int, per_folder: int = 256, seed: int = 0) -> None:
    """``count`` textured 500 x 375 JPEGs in ``n<8 digits>/`` folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(375 // 8 + 1, 500 // 8 + 1, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"n{i // per_folder:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        tile = np.roll(base, shift=(i * 7) % 40, axis=1)
        big = np.kron(tile, np.ones((8, 8, 1), dtype=np.uint8))[:375, :500]
        noise = rng.integers(0, 24, size=big.shape, dtype=np.uint8)
        Image.fromarray(big + noise).save(folder / f"{folder.name}_{i}.JPEG", quality=90)


def decode_floor(reference, preprocess, batch_size: int, workers: int) -> float:
    """Images/s of the DataLoader alone (read + JPEG decode + preprocess)."""
    from torch.utils.data import DataLoader

    from sender.embed import ReferenceImages

    rows = np.arange(len(reference))
    loader = DataLoader(ReferenceImages(reference, rows, preprocess), batch_size=batch_size,
                        num_workers=workers)  # fmt: skip
    started = time.perf_counter()
    for _ in loader:
        pass
    return rows.size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    import open_clip
    import torch

    from protocol.reference.image_folder import ImageFolderReference
    from sender.embed import embed_reference
    from sender.embedders import load_open_clip

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--work", default=None, help="folder for the JPEGs (default: temp)")
    args = parser.parse_args(argv)
    import os

    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work or scratch)
        tree = root / "tree"
        if not tree.is_dir():
            print(f"writing {args.images} JPEGs to {tree} ...")
            write_jpegs(tree, args.images)
        model = open_clip.create_model(args.model, pretrained=None)
        weights = root / f"{args.model}-random.pt"
        torch.save(model.state_dict(), weights)
        del model
        reference = ImageFolderReference(tree)
        _, preprocess = load_open_clip(args.model, str(weights), "cpu")
        floor = decode_floor(reference, preprocess, args.batch_size, workers)
        summary = embed_reference(
            reference, root / "emb", args.model, str(weights), device=args.device,
            batch_size=args.batch_size, workers=workers, part_rows=4096, progress=False,
        )  # fmt: skip
    rate = summary.images_per_second
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"\n{args.model}, random weights, {args.images} JPEGs 500x375, device {device}, "
          f"{workers} decode workers, batch {args.batch_size}")  # fmt: skip
    print(f"{'stage':<34} {'img/s':>9} {'14.2M images':>14}")
    for name, value in (
        ("decode + preprocess only (floor)", floor),
        ("embed (decode + model)", rate),
    ):
        print(f"{name:<34} {value:>9.0f} {IMAGENET_21K / value / 3600:>12.1f} h")
    print(f"embed / floor: {rate / floor:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
