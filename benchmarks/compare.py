"""Every scheme side by side on the embedded default world, through the real CLIs.

The same steps as `make demo` (``benchmarks.demo``: the world's CLIP, FAISS, a probe
teacher on the stored embeddings, the plan on thumbnails), then a payload per scheme
(the paper's, ours, the random controls), the plan's choice twice (`make demo`'s plan,
whose payload is taken as `make demo` left it in WORK, or planned here when it is
absent; and the plan over its full default grid) and one more row with the image path's
teacher (a CNN trained on the task's pixels), each trained by the
device with three seeds, against real target pixels sent in the same byte budget.
Prints one table and writes the same numbers to WORK/compare.json (what
``notebooks/demo_report.ipynb`` draws).

    python -m benchmarks.compare --work work/demo     # what `make compare` runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.demo import parse_args as demo_args
from benchmarks.demo import plan_flags
from benchmarks.demo_steps import (
    SEND,
    Device,
    Station,
    Steps,
    key_missing,
    references,
    show_progress,
)
from benchmarks.numerics import numerics_report, reexec_pinned

SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Scheme:
    """One payload to make and train on."""

    name: str
    label: str
    strategy: str
    score: str
    keep: float
    reserve: float = 1.0
    alpha: float = -0.2
    work: str = "sender"  # the work directory it is selected from


SCHEMES = (
    Scheme("vanilla-1", "lowest energy (paper's vanilla)", "lowest", "energy", 0.01),
    Scheme("vanilla-5", "lowest energy (paper's vanilla)", "lowest", "energy", 0.05),
    Scheme("paper-safety-1", "safety-net, energy (paper)", "safety-net", "energy", 0.01, 0.5),
    Scheme("safety-1", "safety-net, kNN relevance (ours)", "safety-net", "knn", 0.01),
    Scheme("safety-5", "safety-net, kNN relevance (ours)", "safety-net", "knn", 0.05),
    Scheme("cover-1", "safety-net, cover of the task's images (ours)", "safety-net", "cover", 0.01),
    Scheme("inverse-1", "inverse: highest energy", "inverse", "energy", 0.01),
    Scheme("random-1", "random subset (control)", "random", "energy", 0.01),
    Scheme(
        "random-balanced-1",
        "random, equal per class (control)",
        "random-balanced",
        "energy",
        0.01,
        1.0,
        0.0,
    ),
    Scheme(
        "image-teacher-1",
        "safety-net, kNN, CNN teacher on pixels",
        "safety-net",
        "knn",
        0.01,
        work="sender-images",
    ),
)
PLAN = "plan"  # the payload the plan chose over its default grid
PLAN_FILES = "compare-plan"  # its plan, payload and students (`make demo` keeps "plan")
DEMO_PLAN = "demo-plan"  # the payload `make demo`'s plan chose (its smaller grid)
DEMO_PLAN_FILES = "plan"  # where `make demo` keeps that plan, payload and students
BUDGET_SCHEME = "safety-1"  # the pixel baseline gets exactly this (signed) payload's byte budget


def pixel_baseline(
    task_dir: Path, budget: int, seeds: tuple[int, ...], steps: int
) -> dict[str, Any]:
    """Send real target training images (native 8x8, zstd-19) within ``budget`` bytes."""
    import torch
    import zstandard

    from protocol.task_data import load_labeled_images
    from protocol.world.digits import load_digits_split, upscale_digits
    from trainer.training import StepHooks, TrainConfig, accuracy, train_classifier

    native, _ = load_digits_split(native=True)
    test = load_labeled_images(task_dir / "test.npz")
    rng = np.random.default_rng(0)
    per_class = [rng.permutation(np.flatnonzero(native.labels == c)) for c in range(10)]
    order = np.array([i for group in zip(*per_class, strict=False) for i in group])

    def encoded(count: int) -> bytes:
        chosen = order[:count]
        raw = native.labels[chosen].astype(np.uint8).tobytes() + native.images[chosen].tobytes()
        return zstandard.ZstdCompressor(level=19).compress(raw)

    low, high = 1, len(order)
    while low < high:  # largest count whose compressed size fits the budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(encoded(mid)) <= budget else (low, mid - 1)
    count = low
    blob = encoded(count)
    raw = zstandard.ZstdDecompressor().decompress(blob)
    labels = np.frombuffer(raw[:count], dtype=np.uint8).astype(np.int64)
    images = upscale_digits(np.frombuffer(raw[count:], dtype=np.uint8).reshape(count, 8, 8))[
        :, None
    ]
    accs = []
    for seed in seeds:
        config = TrainConfig(min_steps=steps, max_steps=steps, label_smoothing=0.1, seed=seed)
        data = (torch.from_numpy(images), torch.from_numpy(labels))
        model = train_classifier(data, 10, config, hooks=StepHooks(progress=False)).model
        accs.append(accuracy(model, torch.from_numpy(test.images), torch.from_numpy(test.labels)))
    return {"images": count, "payload_bytes": len(blob), "accuracies": accs}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="work/demo")
    parser.add_argument("--reference", default="glyphs")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=250, help="student optimizer steps")
    parser.add_argument("--teacher-epochs", type=int, default=40, help="the CNN teacher's")
    parser.add_argument("--plan-keeps", help="the plan's keep fractions (default: its own grid)")
    parser.add_argument(
        "--screen-steps",
        type=int,
        help="the plan's first proxy per candidate (default: 0.4 x --steps)",
    )
    parser.add_argument(
        "--clip-samples",
        type=int,
        help="images the world's CLIP trains on (default: world-clip's own recipe)",
    )
    parser.add_argument(
        "--no-export",
        action="store_true",
        help="skip the students' torch.export programs (quicker checks of the table)",
    )
    parser.add_argument(
        "--schemes",
        nargs="+",
        choices=[scheme.name for scheme in SCHEMES],
        help=f"only these selection schemes (default: all; {BUDGET_SCHEME} is always run, "
        "since the pixel baseline gets its byte budget)",
    )
    return parser.parse_args()


def scheme_flags(scheme: Scheme) -> list[str]:
    """``select`` options of one scheme (a contact sheet only for the budget's)."""
    flags = ["--strategy", scheme.strategy, "--score", scheme.score, "--keep", str(scheme.keep)]
    flags += ["--reserve", str(scheme.reserve), "--alpha", str(scheme.alpha)]
    return flags + ([] if scheme.name == BUDGET_SCHEME else ["--no-sheet"])


def score_images(station: Station, teacher_epochs: int) -> None:
    """The image path's teacher: a CNN trained on the task's pixels scores the pool."""
    work = station.work
    station.steps.run(
        [
            *SEND,
            "score",
            *station.reference,
            *station.task,
            "--test",
            str(work / "task/test.npz"),
            "--out",
            str(work / "sender-images"),
            "--teacher-epochs",
            str(teacher_epochs),
        ],
        work / "logs/score-images.log",
        "sender score (image path: CNN teacher on the task's pixels)",
    )


def sender_side(
    station: Station, schemes: list[Scheme], args: argparse.Namespace
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Every sender step; (the pool's fingerprint, each payload's summary)."""
    print("ground station:")
    fingerprint = station.prepare()
    station.score()
    score_images(station, args.teacher_epochs)
    station.keygen()
    payloads = {s.name: station.select(s.name, scheme_flags(s), s.work) for s in schemes}
    screen = args.screen_steps or max(1, round(0.4 * args.steps))
    flags = ["--screen-steps", str(screen)]
    flags += ["--confirm-steps", str(args.steps)]  # as the students below train
    keeps = ["--keeps", args.plan_keeps] if args.plan_keeps else []
    payloads[DEMO_PLAN] = demo_plan(station, args)
    payloads[PLAN] = station.plan(flags + keeps, PLAN_FILES)
    return fingerprint, payloads


def demo_plan_made(work: Path) -> bool:
    """Whether `make demo` left its plan and payload in ``work``."""
    payload = work / "payloads" / f"{DEMO_PLAN_FILES}.json"
    return payload.is_file() and (work / DEMO_PLAN_FILES / "plan.json").is_file()


def demo_plan(station: Station, args: argparse.Namespace) -> dict[str, Any]:
    """The payload of `make demo`'s plan: as `make demo` left it, or planned here with its
    settings (at this run's student steps, keeps and screen where given); its summary."""
    summary = station.work / "payloads" / f"{DEMO_PLAN_FILES}.json"
    if demo_plan_made(station.work):
        return json.loads(summary.read_text())
    settings = demo_args([])
    settings.steps = args.steps
    settings.plan_keeps = args.plan_keeps or settings.plan_keeps
    settings.screen_steps = args.screen_steps or settings.screen_steps
    return station.plan(plan_flags(settings), DEMO_PLAN_FILES)


def main() -> None:
    args = parse_args()
    wanted = set(args.schemes or [scheme.name for scheme in SCHEMES]) | {BUDGET_SCHEME}
    schemes = [scheme for scheme in SCHEMES if scheme.name in wanted]
    reexec_pinned()  # the same table on any x86 machine (benchmarks/numerics.py)
    started = time.perf_counter()
    work = Path(args.work)
    sender_ref, receiver_ref = references(work, args.reference)
    plan_steps = 0 if demo_plan_made(work) else 2  # plan and select, when `make demo` has not
    steps = Steps(14 + key_missing(work) + plan_steps + 2 * len(schemes), show_progress())
    station = Station(work, steps, sender_ref, args.clip_samples)
    sender_fp, payloads = sender_side(station, schemes, args)
    print("device:")
    device = Device(work, steps, receiver_ref)
    receiver_fp = device.prepare()
    if receiver_fp != sender_fp:
        raise SystemExit(f"compare: reference fingerprints differ: {sender_fp} vs {receiver_fp}")
    students = {scheme.name: device.train(scheme.name, args) for scheme in schemes}
    students[DEMO_PLAN] = device.train(DEMO_PLAN_FILES, args)
    students[PLAN] = device.train(PLAN_FILES, args)

    print("baseline: real target pixels in the same byte budget:")
    budget = payloads[BUDGET_SCHEME]["payload_bytes"]
    t0 = time.perf_counter()
    pixels = pixel_baseline(work / "task", budget, tuple(args.seeds), args.steps)
    print(
        f"  [{time.perf_counter() - t0:5.1f}s] {pixels['images']} images "
        f"in {pixels['payload_bytes']} bytes"
    )
    score_report = json.loads((work / "sender/score_report.json").read_text())
    image_report = json.loads((work / "sender-images/score_report.json").read_text())
    elapsed = time.perf_counter() - started
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "reference": score_report["reference"],
        "reference_fingerprint_receiver": receiver_fp,
        "task": {"name": "sklearn digits", "train": 898, "test": 899},
        "path": "stored CLIP embeddings (world CLIP) in FAISS, probe teacher, plan on thumbnails",
        "teacher": score_report["teacher"],
        "image_path_teacher": image_report["teacher"],
        "seeds": list(args.seeds),
        "rows": table_rows(schemes, payloads, students, pixels),
        "numerics": numerics_report(),
        "seconds": round(elapsed, 1),
        "steps": steps.timings,
    }
    report_path = work / "compare.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report, sender_fp, work, len(args.seeds))
    print(f"\ntotal {elapsed:.0f}s")
    print(f"report: {report_path}")


def _row(name: str, label: str, keep: float | None, payload: dict[str, Any], accs: list[float]):
    return {
        "scheme": name,
        "description": label,
        "keep": keep,
        "kept_images": payload["kept"],
        "payload_bytes": payload["payload_bytes"],
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "accuracies": accs,
        "leakage": payload.get("leakage"),
    }


def table_rows(
    schemes: list[Scheme],
    payloads: dict[str, dict[str, Any]],
    students: dict[str, dict[str, Any]],
    pixels: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per scheme, the plan's, and the pixel baseline's."""

    def accuracies(name: str) -> list[float]:
        return [r["holdout_accuracy"] for r in students[name]["runs"]]

    def plan_row(name: str, label: str) -> dict[str, Any]:
        planned, keep = payloads[name]["plan"], payloads[name]["selection"]["keep"]
        row = _row(name, label, keep, payloads[name], accuracies(name))
        return row | {
            "candidate": planned["candidate"],
            "predicted_accuracy": planned["predicted_accuracy"],
        }

    rows = [_row(s.name, s.label, s.keep, payloads[s.name], accuracies(s.name)) for s in schemes]
    rows.append(plan_row(DEMO_PLAN, "plan's choice, make demo's grid"))
    rows.append(plan_row(PLAN, "plan's choice, its default grid"))
    pixel_payload = {"kept": pixels["images"], "payload_bytes": pixels["payload_bytes"]}
    rows.append(
        _row(
            "pixels", "real target pixels, 8x8, zstd-19", None, pixel_payload, pixels["accuracies"]
        )
    )
    return rows


def print_table(report: dict[str, Any], sender_fp: str, work: Path, seeds: int) -> None:
    """The human summary of ``report``."""
    n = report["reference"]["size"]
    print()
    print(
        f"reference pool: {n} glyph images, fingerprint {sender_fp[:16]}... (sender) == "
        f"{report['reference_fingerprint_receiver'][:16]}... (receiver)"
    )
    print(
        "sender path: the world's CLIP embeds the pool (FAISS index, 32x32 thumbnails); a "
        "probe on CLIP embeddings of the 898 labeled digits scores every stored row"
    )
    print(
        "teachers' test accuracy: probe on CLIP embeddings "
        f"{report['teacher']['test_accuracy']:.4f}, CNN on pixels (image path) "
        f"{report['image_path_teacher']['test_accuracy']:.4f}"
    )
    print(
        f"student: small CNN trained only on reference images; accuracy on 899 real test digits, "
        f"mean +- std of {seeds} seeds"
    )
    header = f"{'scheme':40s} {'keep':>5s} {'images':>7s} {'bytes':>7s} {'student accuracy':>18s}"
    print(header)
    print("-" * len(header))
    for row in report["rows"]:
        keep = "-" if row["keep"] is None else f"{100 * row['keep']:.2g}%"
        acc = f"{100 * row['accuracy_mean']:.1f} +- {100 * row['accuracy_std']:.1f}%"
        print(
            f"{row['description']:40s} {keep:>5s} {row['kept_images']:7d} "
            f"{row['payload_bytes']:7d} {acc:>18s}"
        )
    for name, files in ((DEMO_PLAN, DEMO_PLAN_FILES), (PLAN, PLAN_FILES)):
        row = next(row for row in report["rows"] if row["scheme"] == name)
        print(
            f"{row['description']}: {row['candidate']}, "
            f"predicted {100 * row['predicted_accuracy']:.1f}% "
            f"(short student on the validation split's thumbnails), real "
            f"{100 * row['accuracy_mean']:.1f}%, {row['payload_bytes']} bytes "
            f"(plot: {work / files / 'plan.png'})"
        )
    sheet = work / "payloads" / f"{BUDGET_SCHEME}.selection.png"
    print(f"what the {BUDGET_SCHEME} payload teaches: {sheet}")
    steps = report["steps"]
    print("step timings: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in steps.items()))


if __name__ == "__main__":
    main()
