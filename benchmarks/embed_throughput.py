"""``plada-send embed`` throughput: images/s with JPEG decoding included.

Generates ImageNet-sized JPEGs (500 x 375, textured so they do not compress to
nothing) in an ImageFolder tree and saves an open_clip architecture with random
weights to a file. Then it prints, side by side: decoding alone with each decoder
(PIL in DataLoader workers; TorchCodec and torchvision batched on the device, nvJPEG
on a GPU), the model alone on tensors already on the device, and the real embed pass
with each decoder. It ends with how closely each batched decoder's embeddings agree
with PIL's.

    python -m benchmarks.embed_throughput [--images 2048] [--model ViT-B-32] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np

IMAGENET_21K = 14_200_000


def write_jpegs(
    root: Path, count: int, per_folder: int = 256, seed: int = 0, size: tuple[int, int] = (500, 375)
) -> None:
    """``count`` textured JPEGs of ``size`` (width, height) in ``n<8 digits>/`` folders."""
    from PIL import Image

    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / f"n{i // per_folder:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        tile = np.roll(base, shift=(i * 7) % 40, axis=1)
        big = np.kron(tile, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
        noise = rng.integers(0, 24, size=big.shape, dtype=np.uint8)
        Image.fromarray(big + noise).save(folder / f"{folder.name}_{i}.JPEG", quality=90)


def jpeg_tree(root: Path, count: int) -> Path:
    """``root/tree`` with ``count`` JPEGs, written unless a tree is there already."""
    tree = root / "tree"
    if not tree.is_dir():
        print(f"writing {count} JPEGs to {tree} ...")
        write_jpegs(tree, count)
    return tree


def decode_floor(reference, preprocess, side: int, batch_size: int, workers: int) -> float:
    """Images/s of the DataLoader alone (read + JPEG decode + preprocess)."""
    from torch.utils.data import DataLoader

    from sender.embedding.engine import ReferenceImages

    rows = np.arange(len(reference))
    loader = DataLoader(
        ReferenceImages(reference, rows, preprocess, side),
        batch_size=batch_size,
        num_workers=workers,
    )
    started = time.perf_counter()
    for _ in loader:
        pass
    return rows.size / (time.perf_counter() - started)


def model_ceiling(model_name: str, weights: str, device: str, batch_size: int) -> float:
    """Images/s of the model alone on preprocessed tensors already on the device."""
    import torch

    from sender.embedding.embedders import OpenClipEmbedder

    embedder = OpenClipEmbedder(model_name, weights, device)
    side = embedder.image_size
    batch = torch.randn(batch_size, 3, side, side, device=device)
    for _ in range(3):
        embedder.embed_batch(batch)
    repeats = 20 if device.startswith("cuda") else 2
    started = time.perf_counter()
    for _ in range(repeats):
        embedder.embed_batch(batch)  # returns numpy: includes the copy back and a sync
    return repeats * batch_size / (time.perf_counter() - started)


def tensor_decode_floor(
    reference, preprocess, device: str, batch_size: int, workers: int, decoder: str
) -> float:
    """Images/s of threaded byte reads + batched decode (``decoder``) and preprocessing."""
    import torch

    from protocol.reference.encoded import decode_jpeg_batch
    from sender.embedding.tensor_decode import (
        PreprocessSpec,
        TensorPreprocessor,
        iter_encoded_batches,
    )

    rows = np.arange(len(reference))
    prepare = TensorPreprocessor(PreprocessSpec.from_transform(preprocess), torch.device(device))
    ranges = [(s, min(s + batch_size, rows.size)) for s in range(0, rows.size, batch_size)]
    loader = iter_encoded_batches(reference, ranges, threads=max(4, workers))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    waited = decoding = fitting = 0.0
    started = last = time.perf_counter()
    for data, _, _ in loader:
        now = time.perf_counter()
        waited += now - last
        images = decode_jpeg_batch(data, prepare.device, decoder)
        sync()
        decoded = time.perf_counter()
        decoding += decoded - now
        by_shape: dict[tuple[int, ...], list] = {}
        for image in images:
            assert image is not None
            by_shape.setdefault(tuple(image.shape), []).append(image)
        for group in by_shape.values():
            prepare._fit(torch.stack(group))
        sync()
        last = time.perf_counter()
        fitting += last - decoded
    total = time.perf_counter() - started
    print(
        f"  {decoder} path, {rows.size} images: waiting for bytes {waited:.1f}s, "
        f"decode {decoding:.1f}s, resize/crop/normalise {fitting:.1f}s, total {total:.1f}s"
    )
    return rows.size / total


def main(argv: list[str] | None = None) -> int:
    import os

    import open_clip
    import torch

    from protocol.reference.image_folder import ImageFolderReference
    from sender.embedding.embedders import load_open_clip, resolve_model_name
    from sender.embedding.engine import EmbedSettings
    from sender.embedding.local import embed_reference
    from sender.embedding.store import merge_parts

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--work", default=None, help="folder for the JPEGs (default: temp)")
    parser.add_argument(
        "--decoders",
        nargs="+",
        default=["torchcodec", "torchvision"],
        help="batched decoders to compare with PIL (those not installed are skipped)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    decoders = [d for d in args.decoders if d != "torchcodec" or find_spec("torchcodec")]
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work or scratch)
        tree = jpeg_tree(root, args.images)
        name = resolve_model_name(args.model)  # a name, or the path of a config .json
        model = open_clip.create_model(name, pretrained=None)
        weights = root / f"{name}-random.pt"
        torch.save(model.state_dict(), weights)
        del model
        reference = ImageFolderReference(tree)
        model, preprocess = load_open_clip(args.model, str(weights), "cpu")
        size = model.visual.image_size
        side = int(size[0] if isinstance(size, tuple | list) else size)
        del model
        rates = {
            "decode + preprocess, PIL in workers": decode_floor(
                reference, preprocess, side, args.batch_size, workers
            )
        }
        for decoder in decoders:
            rates[f"decode + preprocess, {decoder} on device"] = tensor_decode_floor(
                reference, preprocess, args.device, args.batch_size, workers, decoder
            )
        rates["model only, tensors on device"] = model_ceiling(
            name, str(weights), args.device, args.batch_size
        )
        stores = {}
        for decode in ("pil", *decoders):
            out = root / f"emb-{decode}"
            settings = EmbedSettings(
                name,
                str(weights),
                device=args.device,
                batch_size=args.batch_size,
                workers=workers,
                part_rows=4096,
                progress=False,
                decode=decode,
            )
            summary = embed_reference(reference, out, settings)
            rates[f"embed --decode {decode}"] = summary.images_per_second
            merge_parts(out)
            stores[decode] = np.fromfile(out / "embeddings.f16", dtype="<f2").astype(np.float32)
        dim = stores["pil"].size // len(reference)
        pil = stores["pil"].reshape(-1, dim)
        cosines = {}
        for decoder in decoders:
            other = stores[decoder].reshape(-1, dim)
            cosine = (pil * other).sum(1) / np.linalg.norm(pil, axis=1)
            cosines[decoder] = cosine / np.linalg.norm(other, axis=1)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"\n{args.model}, random weights, {args.images} JPEGs 500x375, device {device}, "
        f"{workers} reader workers, batch {args.batch_size}"
    )
    print(f"{'stage':<44} {'img/s':>9} {'14.2M images':>14}")
    for stage, value in rates.items():
        print(f"{stage:<44} {value:>9.0f} {IMAGENET_21K / value / 3600:>12.2f} h")
    for decoder, cosine in cosines.items():
        print(
            f"embeddings, {decoder} vs PIL preprocessing: cosine mean {cosine.mean():.5f}, "
            f"min {cosine.min():.5f}"
        )
    if args.json:
        result = {
            "device": device,
            "model": args.model,
            "images": args.images,
            "batch_size": args.batch_size,
            "images_per_second": rates,
            "cosine_vs_pil": {
                decoder: {"mean": float(c.mean()), "min": float(c.min())}
                for decoder, c in cosines.items()
            },
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
