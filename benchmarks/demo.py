"""The whole plada path on the embedded default world, through the real CLIs.

Sender and receiver run as separate processes with separate caches: each
regenerates the glyph reference pool from its seed and they must agree on its
fingerprint. Payloads are signed with the station's key (made once in WORK/keys)
and the receiver trusts only that key, as in deployment. Prints one table and
writes the same numbers to a JSON report.

    python -m benchmarks.demo --work work/demo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


SCHEMES = (
    Scheme("vanilla-1", "lowest energy (paper's vanilla)", "lowest", "energy", 0.01),
    Scheme("vanilla-5", "lowest energy (paper's vanilla)", "lowest", "energy", 0.05),
    Scheme("paper-safety-1", "safety-net, energy (paper)", "safety-net", "energy", 0.01, 0.5),
    Scheme("safety-1", "safety-net, kNN relevance (ours)", "safety-net", "knn", 0.01),
    Scheme("safety-5", "safety-net, kNN relevance (ours)", "safety-net", "knn", 0.05),
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
)
PLAN = "plan"  # the payload the plan chose
BUDGET_SCHEME = "safety-1"  # the pixel baseline gets exactly this (signed) payload's byte budget


class Steps:
    """The demo's commands, run one after another with a numbered progress line each."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.started = time.perf_counter()

    def run(self, cmd: list[str], log: Path, what: str) -> str:
        """Run a CLI, keep its output in ``log``; stop the demo with it if it fails."""
        self.done += 1
        started = time.perf_counter()
        print(f"  [{self.done:2d}/{self.total}] {what} ...", end="", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.stderr.write("\n" + proc.stdout + proc.stderr)
            raise SystemExit(f"demo: command failed ({proc.returncode}): {' '.join(cmd)}")
        total = time.perf_counter() - self.started
        print(f" {time.perf_counter() - started:5.1f}s (total {total / 60:4.1f} min)")
        return proc.stdout


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="work/demo")
    parser.add_argument("--reference", default="glyphs")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=250, help="student optimizer steps")
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--plan-keeps", help="the plan's keep fractions (default: its own grid)")
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
    args = parser.parse_args()
    wanted = set(args.schemes or [scheme.name for scheme in SCHEMES]) | {BUDGET_SCHEME}
    schemes = [scheme for scheme in SCHEMES if scheme.name in wanted]
    reexec_pinned()  # the same table on any x86 machine (benchmarks/numerics.py)
    started = time.perf_counter()
    work = Path(args.work)
    for sub in ("task", "sender", "payloads", "students", "logs", "keys"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    send = [sys.executable, "-m", "sender.cli"]
    receive = [sys.executable, "-m", "receiver.cli"]
    sender_ref = ["--reference", args.reference, "--cache-dir", str(work / "sender-cache")]
    receiver_ref = ["--reference", args.reference, "--cache-dir", str(work / "receiver-cache")]
    logs = work / "logs"

    # sender: task, reference, score, keygen, one select per scheme, plan, its select;
    # receiver: reference, trust, one train per payload and the plan's
    key = work / "keys" / "demo-station"
    need_key = not key.with_suffix(".key").is_file()  # the station's signing key, made once
    run = Steps(8 + need_key + 2 * len(schemes)).run
    print("sender (ground station):")
    run([*send, "task", "digits", "--out", str(work / "task")], logs / "task.log", "sender task")
    sender_fp = run(
        [*send, "reference", *sender_ref],
        logs / "sender-reference.log",
        "sender reference (renders the pool once per cache)",
    ).split()[-1]
    run(
        [
            *send,
            "score",
            *sender_ref,
            "--train",
            str(work / "task/train.npz"),
            "--test",
            str(work / "task/test.npz"),
            "--out",
            str(work / "sender"),
            "--quiet",
            "--teacher-epochs",
            str(args.teacher_epochs),
        ],
        logs / "score.log",
        "sender score (teacher on the digits, every reference image scored)",
    )
    score_report = json.loads((work / "sender/score_report.json").read_text())
    if need_key:
        run(
            [*send, "keygen", "--sender-id", "demo-station", "--out", str(key)],
            logs / "keygen.log",
            "sender keygen (the station's signing key)",
        )
    payloads: dict[str, dict[str, Any]] = {}
    for scheme in schemes:
        out = work / "payloads" / f"{scheme.name}.plada"
        summary_path = work / "payloads" / f"{scheme.name}.json"
        run(
            [
                *send,
                "select",
                str(work / "sender"),
                "--strategy",
                scheme.strategy,
                "--score",
                scheme.score,
                "--keep",
                str(scheme.keep),
                "--reserve",
                str(scheme.reserve),
                "--alpha",
                str(scheme.alpha),
                "--signing-key",
                str(key.with_suffix(".key")),
                "--out",
                str(out),
                "--json",
                str(summary_path),
                *([] if scheme.name == BUDGET_SCHEME else ["--no-sheet"]),
            ],
            logs / f"select-{scheme.name}.log",
            f"sender select {scheme.name}",
        )
        payloads[scheme.name] = json.loads(summary_path.read_text())

    plan_dir = work / "plan"
    plan_cmd = [*send, "plan", str(work / "sender"), *sender_ref, "--train"]
    plan_cmd += [str(work / "task/train.npz"), "--out", str(plan_dir), "--quiet"]
    plan_cmd += ["--teacher-epochs", str(args.teacher_epochs), "--sender-id", "demo-station"]
    plan_cmd += ["--screen-steps", str(max(1, round(0.4 * args.steps)))]
    plan_cmd += ["--confirm-steps", str(max(1, round(0.8 * args.steps)))]
    if args.plan_keeps:
        plan_cmd += ["--keeps", args.plan_keeps]
    run(plan_cmd, logs / "plan.log", "sender plan (every candidate measured: the longest step)")
    plan_summary = work / "payloads" / f"{PLAN}.json"
    run(
        [
            *send,
            "select",
            str(work / "sender"),
            "--plan",
            str(plan_dir),
            "--signing-key",
            str(key.with_suffix(".key")),
            "--out",
            str(work / "payloads" / f"{PLAN}.plada"),
            "--json",
            str(plan_summary),
        ],
        logs / "select-plan.log",
        "sender select plan",
    )
    payloads[PLAN] = json.loads(plan_summary.read_text())

    print("receiver (edge device):")
    receiver_fp = run(
        [*receive, "reference", *receiver_ref],
        logs / "receiver-reference.log",
        "receiver reference (its own copy of the pool)",
    )
    receiver_fp = receiver_fp.split()[-1]
    if receiver_fp != sender_fp:
        raise SystemExit(f"demo: reference fingerprints differ: {sender_fp} vs {receiver_fp}")
    trust = ["--trust", str(work / "receiver-trust")]
    run(
        [*receive, "trust", "add", str(key.with_suffix(".pub")), *trust],
        logs / "trust.log",
        "receiver trust add",
    )
    students: dict[str, dict[str, Any]] = {}
    for name in [scheme.name for scheme in schemes] + [PLAN]:
        out = work / "students" / name
        run(
            [
                *receive,
                "train",
                str(work / "payloads" / f"{name}.plada"),
                *receiver_ref,
                *trust,
                "--holdout",
                str(work / "task/test.npz"),
                "--seeds",
                *map(str, args.seeds),
                "--min-steps",
                str(args.steps),
                "--max-steps",
                str(args.steps),
                "--out",
                str(out),
                "--quiet",
                *(["--no-export"] if args.no_export else []),
            ],
            logs / f"train-{name}.log",
            f"receiver train {name}",
        )
        students[name] = json.loads((out / "report.json").read_text())

    print("baseline: real target pixels in the same byte budget:")
    budget = payloads[BUDGET_SCHEME]["payload_bytes"]
    t0 = time.perf_counter()
    pixels = pixel_baseline(work / "task", budget, tuple(args.seeds), args.steps)
    print(
        f"  [{time.perf_counter() - t0:5.1f}s] {pixels['images']} images "
        f"in {pixels['payload_bytes']} bytes"
    )

    rows = []
    for scheme in schemes:
        accs = [r["holdout_accuracy"] for r in students[scheme.name]["runs"]]
        rows.append(
            {
                "scheme": scheme.name,
                "description": scheme.label,
                "keep": scheme.keep,
                "kept_images": payloads[scheme.name]["kept"],
                "payload_bytes": payloads[scheme.name]["payload_bytes"],
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
                "accuracies": accs,
                "leakage": payloads[scheme.name]["leakage"],
            }
        )
    planned = payloads[PLAN]["plan"]
    accs = [r["holdout_accuracy"] for r in students[PLAN]["runs"]]
    rows.append(
        {
            "scheme": PLAN,
            "description": "plan's choice (predicted best)",
            "keep": payloads[PLAN]["selection"]["keep"],
            "kept_images": payloads[PLAN]["kept"],
            "payload_bytes": payloads[PLAN]["payload_bytes"],
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs)),
            "accuracies": accs,
            "leakage": payloads[PLAN]["leakage"],
            "candidate": planned["candidate"],
            "predicted_accuracy": planned["predicted_accuracy"],
        }
    )
    rows.append(
        {
            "scheme": "pixels",
            "description": "real target pixels, 8x8, zstd-19",
            "keep": None,
            "kept_images": pixels["images"],
            "payload_bytes": pixels["payload_bytes"],
            "accuracy_mean": float(np.mean(pixels["accuracies"])),
            "accuracy_std": float(np.std(pixels["accuracies"])),
            "accuracies": pixels["accuracies"],
        }
    )
    teacher_acc = score_report["teacher"]["test_accuracy"]
    elapsed = time.perf_counter() - started
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "reference": score_report["reference"],
        "reference_fingerprint_receiver": receiver_fp,
        "task": {"name": "sklearn digits", "train": 898, "test": 899},
        "teacher": score_report["teacher"],
        "seeds": list(args.seeds),
        "rows": rows,
        "numerics": numerics_report(),
        "seconds": round(elapsed, 1),
    }
    report_path = work / "report.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")

    n = score_report["reference"]["size"]
    print()
    print(
        f"reference pool: {n} glyph images, fingerprint {sender_fp[:16]}... (sender) == "
        f"{receiver_fp[:16]}... (receiver)"
    )
    print(
        f"target task: sklearn digits, teacher (CNN on 898 real images) test accuracy "
        f"{teacher_acc:.4f}"
    )
    print(
        f"student: small CNN trained only on reference images; accuracy on 899 real test digits, "
        f"mean +- std of {len(args.seeds)} seeds"
    )
    header = f"{'scheme':36s} {'keep':>5s} {'images':>7s} {'bytes':>7s} {'student accuracy':>18s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        keep = "-" if row["keep"] is None else f"{100 * row['keep']:.2g}%"
        acc = f"{100 * row['accuracy_mean']:.1f} +- {100 * row['accuracy_std']:.1f}%"
        print(
            f"{row['description']:36s} {keep:>5s} {row['kept_images']:7d} "
            f"{row['payload_bytes']:7d} {acc:>18s}"
        )
    plan_row = next(row for row in rows if row["scheme"] == PLAN)
    print(
        f"plan's choice: {plan_row['candidate']}, "
        f"predicted {100 * plan_row['predicted_accuracy']:.1f}% "
        f"(short student on the validation split), real {100 * plan_row['accuracy_mean']:.1f}%, "
        f"{plan_row['payload_bytes']} bytes (plot: {work / 'plan' / 'plan.png'})"
    )
    sheet = work / "payloads" / f"{BUDGET_SCHEME}.selection.png"
    print(f"what the {BUDGET_SCHEME} payload teaches: {sheet}")
    print(f"\ntotal {elapsed:.0f}s")
    print(f"report: {report_path}")


if __name__ == "__main__":
    main()
