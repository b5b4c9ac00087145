"""The table of ``benchmarks/gpu_suite.sh``: its JSON results as one Markdown table.

    python -m benchmarks.gpu_report DIR [--mode full|smoke]

Reads ``DIR/embed.json``, ``DIR/receiver.json`` and, when present,
``DIR/receiver-compiled.json`` and ``DIR/embed-distributed.json``; prints the table and writes it to
``DIR/gpu_suite.md``, with the device and date in its heading.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EMBED_GOAL = 10_000  # img/s, ViT-B-32 on 500x375 JPEGs, decoding included
TRAIN_GOAL = 5_000  # img/s, ResNet-18 at 224 px end to end over 5 epochs


def _rows(embed: dict, receivers: dict[str, dict]) -> list[tuple[str, float, float, str]]:
    """(measurement, img/s, share of its compute-only ceiling, goal) for the table."""
    rows = []
    rates = embed["images_per_second"]
    ceiling = rates["model only, tensors on device"]
    for stage, rate in rates.items():
        goal = f">= {EMBED_GOAL:,}" if stage.startswith("embed --decode") else ""
        rows.append((f"embed: {stage}", rate, rate / ceiling, goal))
    for label, result in receivers.items():
        rates = result["images_per_second"]
        compute = rates["compute only"]
        for stage, rate in rates.items():
            end_to_end = stage in ("end to end", "cached: epoch 1", "cached: later epochs")
            goal = f">= {TRAIN_GOAL:,}" if end_to_end else ""
            rows.append((f"train{label}: {stage}", rate, rate / compute, goal))
    return rows


def report(folder: Path, mode: str) -> str:
    """The Markdown table of the suite's results in ``folder``."""
    embed = json.loads((folder / "embed.json").read_text())
    receivers = {"": json.loads((folder / "receiver.json").read_text())}
    compiled = folder / "receiver-compiled.json"
    if compiled.is_file():
        receivers[" (torch.compile)"] = json.loads(compiled.read_text())
    first = receivers[""]
    lines = [
        f"### gpu_suite.sh ({mode}): {first['device']}, {time.strftime('%Y-%m-%d')}",
        "",
        f"Embedding: {embed['model']}, {embed['images']} JPEGs of 500x375, batch "
        f"{embed['batch_size']}. Training: {first['model']} at {first['image_size']} px from "
        f"{first['jpeg_size']} px JPEGs, batch {first['batch_size']}, decode {first['decode']}, "
        f"cache in {first['cache']}.",
        "",
        "| measurement | img/s | of its compute-only ceiling | goal |",
        "|---|---:|---:|---|",
    ]
    for name, rate, share, goal in _rows(embed, receivers):
        lines.append(f"| {name} | {rate:,.0f} | {share:.2f}x | {goal} |")
    lines.append("")
    for decoder, cosine in embed["cosine_vs_pil"].items():
        lines.append(
            f"- embeddings, {decoder} vs PIL: cosine mean {cosine['mean']:.5f}, "
            f"min {cosine['min']:.5f} (must stay >= 0.999)"
        )
    for label, result in receivers.items():
        for path, minutes in result["paper_run_minutes"].items():
            lines.append(f"- paper run (142K x 5 epochs){label}, {path}: {minutes:.1f} min")
    distributed = folder / "embed-distributed.json"
    if distributed.is_file():
        lines += ["", *_ray_lines(json.loads(distributed.read_text()))]
    return "\n".join(lines) + "\n"


def _ray_lines(result: dict) -> list[str]:
    """The local engine against Ray's actor pool (benchmarks/embed_distributed.py)."""
    lines = [
        "| embed engine | actors | start-up s | steady img/s | vs local | Ray ms/batch "
        "| same bytes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for run in result["runs"]:
        ratio = f"{run.get('vs_local', 1.0):.2f}x"
        overhead = f"{run['overhead_ms_per_batch']:+.1f}" if "overhead_ms_per_batch" in run else ""
        same = {True: "yes", False: "NO"}.get(run.get("identical_to_local"), "")
        lines.append(
            f"| {run['model']} {run['engine']} | {run['actors']} | {run['startup_seconds']:.1f} "
            f"| {run['steady_images_per_second']:,.0f} | {ratio} | {overhead} | {same} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--mode", default="full", choices=["full", "smoke"])
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    table = report(folder, args.mode)
    (folder / "gpu_suite.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
