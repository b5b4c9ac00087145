"""Receiver training throughput: images/s end to end vs the model alone.

Generates JPEGs (default 256 x 256, textured) in an ImageFolder tree, then measures
in one run, side by side, for one torchvision model (resnet18 by default):

- ``decode only``: the receiver's batch source (read + decode + random-resized-crop
  + flip + normalise) without a model;
- ``end to end``: the receiver's real training loop (``train_classifier`` on
  ``EncodedBatches``): decode + augment + forward + backward + AdamW step;
- ``cache: decode once`` and ``cached: epoch 1`` / ``later epochs``: the kept images
  decoded once into the decode-once cache (``--cache``), then the same loop cropping
  and flipping batches of it on the device; epoch 1 includes building the cache;
- ``compute only``: the same loop's model, optimizer, autocast and channels-last
  on one batch already decoded and resident on the device.

The ratio end-to-end / compute-only says how much of the device the data path
wastes; the last lines project the paper's run (1% of ImageNet-21K, 142K images x
5 epochs) at the measured rate.

    python -m benchmarks.receiver_throughput [--device cuda] [--images 4096] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.embed_throughput import write_jpegs

PAPER_IMAGES, PAPER_EPOCHS = 142_000, 5
GOAL_IMAGES_PER_SECOND = 5_000  # the paper's run in under 2.5 min on one GPU


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_only(source, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/s of the batch source alone."""
    count = len(source)
    plan = [
        (s, torch.arange(s * batch_size, (s + 1) * batch_size) % count)
        for s in range(warmup + steps)
    ]
    started, images = 0.0, 0
    for step, batch in enumerate(source.batches(iter(plan), device)):
        if step == warmup:
            _synchronize(device)
            started = time.perf_counter()
        if step >= warmup:
            images += batch.images.shape[0]
    _synchronize(device)
    return images / (time.perf_counter() - started)


def end_to_end(source, config, steps: int, warmup: int) -> float:
    """Images/s of the receiver's training loop on images decoded on the fly."""
    from trainer.training import StepHooks, StepReport, resolve_device, train_classifier

    device = resolve_device(config.device)
    marks: dict[int, float] = {}

    def on_step(report: StepReport) -> None:
        if report.step in (warmup, warmup + steps):
            _synchronize(device)  # no step waits for its loss: wait here to time the work
            marks[report.step] = time.perf_counter()

    train_classifier(
        source, 1000, config, in_channels=3, hooks=StepHooks(progress=False, on_step=on_step)
    )
    return steps * config.batch_size / (marks[warmup + steps] - marks[warmup])


def compute_only(config, image_size: int, steps: int, warmup: int) -> float:
    """Images/s of forward + backward + step on one resident, already normalised batch."""
    import torch.nn.functional as F

    from trainer.models import build_model
    from trainer.training import autocast_for, resolve_device

    device = resolve_device(config.device)
    model = build_model(config.model, 1000, 3).to(device, memory_format=torch.channels_last)
    step_model = torch.compile(model) if config.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    x = torch.randn(config.batch_size, 3, image_size, image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (config.batch_size,), device=device)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            started = time.perf_counter()
        with autocast_for(config, device):
            loss = F.cross_entropy(step_model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _synchronize(device)
    return steps * config.batch_size / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=0, help="JPEGs to generate (0: auto)")
    parser.add_argument("--jpeg-size", type=int, default=256, help="JPEG side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=0, help="0: 256 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (0: auto)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: auto)")
    parser.add_argument(
        "--decode", choices=["auto", "pil", "tensor", "torchcodec", "torchvision"], default="auto"
    )
    parser.add_argument("--threads", type=int, default=0, help="loader threads (0: CPU count)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--cache",
        choices=["auto", "cuda", "memory", "mmap", "off"],
        default="auto",
        help="where the decode-once cache lives for the cached rows (off: skip them)",
    )
    parser.add_argument("--workdir", default=None, help="where to write the JPEGs (default: tmp)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import os

    from protocol.reference.image_folder import ImageFolderReference
    from trainer.batches import CachedBatches, EncodedBatches, Loading
    from trainer.decoded_cache import CacheOptions, build_cache, cache_side
    from trainer.training import TrainConfig, resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 32)
    steps = args.steps or (40 if cuda else 4)
    warmup = args.warmup or (10 if cuda else 2)
    count = args.images or (4096 if cuda else 256)
    threads = args.threads or os.cpu_count() or 4
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp) / "reference"
        started = time.perf_counter()
        write_jpegs(root, count, size=(args.jpeg_size, args.jpeg_size))
        print(f"wrote {count} JPEGs of {args.jpeg_size}px in {time.perf_counter() - started:.1f}s")
        reference = ImageFolderReference(root, image_size=args.image_size)
        labels = torch.from_numpy(np.arange(count) % 1000)

        def source():
            return EncodedBatches(
                reference,
                np.arange(count),
                labels,
                args.image_size,
                "crop-flip",
                0,
                Loading(args.decode, threads, prefetch=4),
            )

        total = warmup + steps
        config = TrainConfig(
            model=args.model,
            epochs=1,
            min_steps=total,
            max_steps=total,
            batch_size=batch,
            augment="crop-flip",
            device=str(device),
            compile=args.compile,
            lr=1e-3,
        )
        decode_path = args.decode if args.decode != "auto" else ("tensor" if cuda else "pil")
        rates = {
            "decode only": decode_only(source(), batch, steps, warmup, device),
            "end to end": end_to_end(source(), config, steps, warmup),
        }
        build_seconds = None
        if args.cache != "off":
            started = time.perf_counter()
            cache = build_cache(
                reference,
                np.arange(count),
                cache_side(args.image_size),
                device,
                CacheOptions(args.cache, Path(tmp) / "decoded.u8", threads),
            )
            _synchronize(device)
            build_seconds = time.perf_counter() - started
            cached = CachedBatches(cache, labels, args.image_size, "crop-flip", 0)
            later = end_to_end(cached, config, steps, warmup)
            rates["cache: decode once"] = count / build_seconds
            rates["cached: epoch 1"] = count / (build_seconds + count / later)
            rates["cached: later epochs"] = later
        rates["compute only"] = compute_only(config, args.image_size, steps, warmup)
    compute = rates["compute only"]
    name = torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU"
    where = "" if build_seconds is None else f", cache in {cache.where}"
    print(
        f"\nmodel {args.model}, {args.image_size}px crops from {args.jpeg_size}px JPEGs, "
        f"batch {batch}, device {name}, decode {decode_path}{where}, {threads} threads, "
        f"amp {'bf16' if cuda else 'off'}, compile {args.compile}"
    )
    print(f"{'path':22s} {'images/s':>10s} {'vs compute':>11s}")
    for label, rate in rates.items():
        print(f"{label:22s} {rate:10.1f} {rate / compute:10.2f}x")
    paper = PAPER_IMAGES * PAPER_EPOCHS
    minutes = {"decoding every epoch": paper / rates["end to end"] / 60}
    if build_seconds is not None:
        once = PAPER_IMAGES / rates["cache: decode once"]
        minutes["decoding once"] = (once + paper / rates["cached: later epochs"]) / 60
    for label, value in minutes.items():
        rate = paper / (value * 60)
        print(
            f"paper run (142K images x 5 epochs), {label}: {value:.1f} min, {rate:.0f} img/s "
            f"(goal: >= {GOAL_IMAGES_PER_SECOND} img/s, under 2.5 min on one H100)"
        )
    best = paper / (min(minutes.values()) * 60)
    if args.json:
        result = {
            "device": name,
            "model": args.model,
            "batch_size": batch,
            "decode": decode_path,
            "cache": None if build_seconds is None else cache.where,
            "image_size": args.image_size,
            "jpeg_size": args.jpeg_size,
            "threads": threads,
            "compile": args.compile,
            "images_per_second": rates,
            "end_to_end_vs_compute": rates["end to end"] / compute,
            "paper_run_minutes": minutes,
            "goal_met": bool(best >= GOAL_IMAGES_PER_SECOND),
            "steps": steps,
            "warmup": warmup,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
