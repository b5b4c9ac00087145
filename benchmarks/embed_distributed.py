"""``plada-send embed``: the local engine against the Ray engine on the same machine.

Generates ImageNet-sized JPEGs (as ``embed_throughput`` does) and an open_clip model with
random weights, then embeds them with the local engine and with ``--engine ray`` on a
private local Ray instance, with 1..N actors. It prints, side by side: the model alone
on tensors (the ceiling no engine can pass), each engine's start-up (until its first
batch is back), its steady rate after that, the Ray engine's rate as a ratio of the
local one, and Ray's cost per batch: (Ray's steady seconds - local steady seconds) /
batches. A tiny model (``--overhead-model``) shows that cost where compute does not hide
it. Every Ray run's parts must equal the local engine's byte for byte.

    python -m benchmarks.embed_distributed [--images 512] [--model ViT-B-32] \
        [--device cpu|cuda] [--actors 1 2 4] [--json out.json]

On a GPU machine the actors share its GPUs (each gets GPUs / actors, at most one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.embed_throughput import jpeg_tree, model_ceiling

SMOKE_CLIP = Path(__file__).with_name("smoke-clip.json")


def _random_weights(model: str, folder: Path) -> tuple[str, str]:
    """(model name, weights file) of an open_clip architecture with random weights."""
    import open_clip
    import torch

    from sender.embedding.embedders import resolve_model_name

    name = resolve_model_name(model)
    weights = folder / f"{name}-random.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(name, pretrained=None).state_dict(), weights)
    return name, str(weights)


def _parts_bytes(out: Path) -> list[bytes]:
    import numpy as np

    arrays = []
    for path in sorted((out / "parts").glob("part-*.npz")):
        with np.load(path) as data:
            arrays.append(data["embeddings"].tobytes())
    return arrays


def measure(
    tree: Path,
    root: Path,
    model: str,
    device: str,
    batch_size: int,
    workers: int,
    actor_counts: list[int],
) -> list[dict]:
    """One row per engine run for ``model`` over the JPEG tree."""
    import torch

    from protocol.reference.factory import ReferenceLocation
    from sender.embedding.engine import EmbedJob, EmbedSettings
    from sender.embedding.local import LocalEngine
    from sender.embedding.ray_engine import RayEngine, RayOptions

    name, weights = _random_weights(model, root)
    label = Path(model).stem
    part_rows = batch_size * 4
    rows = []
    local_out = root / f"emb-{label}-local"
    settings = EmbedSettings(
        model,
        weights,
        device=device,
        batch_size=batch_size,
        workers=workers,
        part_rows=part_rows,
        progress=False,
    )
    location = ReferenceLocation(str(tree))
    local = LocalEngine().embed(EmbedJob(location, local_out, settings))
    batches = -(-local.images_embedded // batch_size)
    local_row = _row(label, "local", 1, local, batches)
    rows.append(local_row | {"ceiling": model_ceiling(name, weights, device, batch_size)})
    reference_parts = _parts_bytes(local_out)
    gpus = torch.cuda.device_count() if device.startswith("cuda") else 0
    for actors in actor_counts:
        out = root / f"emb-{label}-ray-{actors}"
        options = RayOptions(
            actors=actors,
            actor_cpus=max(1.0, (os.cpu_count() or 1) // actors),
            actor_gpus=min(1.0, gpus / actors) if gpus else 0.0,
        )
        engine = RayEngine(options, say=lambda line: print(f"  {line}"))
        summary = engine.embed(EmbedJob(location, out, settings))
        row = _row(label, "ray", actors, summary, batches)
        row["identical_to_local"] = _parts_bytes(out) == reference_parts
        steady_local = local_row["steady_seconds"] / batches
        row["overhead_ms_per_batch"] = 1000 * (row["steady_seconds"] / batches - steady_local)
        row["vs_local"] = row["steady_images_per_second"] / local_row["steady_images_per_second"]
        row["total_vs_local"] = local_row["seconds"] / row["seconds"]
        rows.append(row)
    return rows


def _row(model: str, engine: str, actors: int, summary, batches: int) -> dict:
    return {
        "model": model,
        "engine": engine,
        "actors": actors,
        "images": summary.images_embedded,
        "batches": batches,
        "seconds": summary.seconds,
        "startup_seconds": summary.first_batch_seconds,
        "steady_seconds": summary.seconds - summary.first_batch_seconds,
        "images_per_second": summary.images_per_second,
        "steady_images_per_second": summary.steady_images_per_second,
    }


def print_table(rows: list[dict]) -> None:
    """The side-by-side table of every run."""
    header = (
        f"{'model':<12} {'engine':<8} {'actors':>6} {'start-up s':>10} {'total s':>8} "
        f"{'steady img/s':>12} {'vs local':>8} {'ms/batch':>9} {'identical':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        if "ceiling" in row:
            print(
                f"{row['model']:<12} {'model':<8} {'':>6} {'':>10} {'':>8} "
                f"{row['ceiling']:>12.0f} {'':>8} {'':>9} {'':>9}   (tensors only: the ceiling)"
            )
        ratio = f"{row['vs_local']:.2f}x" if "vs_local" in row else "1.00x"
        overhead = f"{row['overhead_ms_per_batch']:+.1f}" if "vs_local" in row else ""
        same = {True: "yes", False: "NO"}.get(row.get("identical_to_local"), "")
        print(
            f"{row['model']:<12} {row['engine']:<8} {row['actors']:>6} "
            f"{row['startup_seconds']:>10.1f} {row['seconds']:>8.1f} "
            f"{row['steady_images_per_second']:>12.0f} {ratio:>8} {overhead:>9} {same:>9}"
        )


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument(
        "--overhead-model",
        default=str(SMOKE_CLIP),
        help="a tiny model whose compute does not hide Ray's per-batch cost ('' to skip)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoders (default: cores)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1])
    parser.add_argument("--work", default=None, help="folder for the JPEGs (default: temp)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work or scratch)
        tree = jpeg_tree(root, args.images)
        models = [args.model] + ([args.overhead_model] if args.overhead_model else [])
        for model in models:
            print(f"{Path(model).stem}: local engine, then Ray with {args.actors} actors ...")
            rows += measure(tree, root, model, args.device, args.batch_size, workers, args.actors)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"\n{args.images} JPEGs 500x375, random weights, device {device}, "
        f"{os.cpu_count()} cores, batch {args.batch_size}, {workers} decoding workers/threads, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print_table(rows)
    if args.json:
        result = {"device": device, "cores": os.cpu_count(), "batch_size": args.batch_size}
        Path(args.json).write_text(json.dumps(result | {"runs": rows}, indent=2) + "\n")
    return 0 if all(row.get("identical_to_local", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
