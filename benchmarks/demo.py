"""The whole plada path on the embedded default world, through the real CLIs.

The sender runs the production path of the card: the world's own small CLIP
(``plada-send world-clip``, trained once per cache on the glyph pool, never on a
target) embeds the reference pool with thumbnails; FAISS indexes it; a linear probe on
the CLIP embeddings of the task's images scores every stored row; the plan measures
every candidate on the thumbnails; each payload is selected from that work directory.
One more row keeps the image path's teacher (a CNN trained on the task's pixels) for
comparison. Sender and receiver run as separate processes with separate caches: each
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
from dataclasses import dataclass, field
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
    work: str = "sender"  # the work directory it is selected from


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
    Scheme(
        "image-teacher-1",
        "safety-net, kNN, CNN teacher on pixels",
        "safety-net",
        "knn",
        0.01,
        work="sender-images",
    ),
)
PLAN = "plan"  # the payload the plan chose
BUDGET_SCHEME = "safety-1"  # the pixel baseline gets exactly this (signed) payload's byte budget


def run(cmd: list[str], log: Path) -> str:
    """Run a CLI, keep its output in ``log``; stop the benchmark with it if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.stderr.write("\n" + proc.stdout + proc.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


class Steps:
    """The demo's commands, run one after another with a numbered progress line each."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}  # seconds per step, by its log's name

    def run(self, cmd: list[str], log: Path, what: str) -> str:
        """Run a CLI, keep its output in ``log``; stop the demo with it if it fails."""
        self.done += 1
        started = time.perf_counter()
        print(f"  [{self.done:2d}/{self.total}] {what} ...", end="", flush=True)
        stdout = run(cmd, log)
        total = time.perf_counter() - self.started
        self.timings[log.stem] = round(time.perf_counter() - started, 1)
        print(f" {time.perf_counter() - started:5.1f}s (total {total / 60:4.1f} min)")
        return stdout


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


@dataclass
class Station:
    """The sender's side of the demo: its commands, folders and what they printed."""

    work: Path
    args: argparse.Namespace
    run: Any  # Steps.run
    send: list[str]
    reference: list[str]
    clip: list[str] = field(default_factory=list)  # --clip-model M --clip-weights W

    @property
    def key(self) -> Path:
        return self.work / "keys" / "demo-station"

    @property
    def task(self) -> list[str]:
        return ["--train", str(self.work / "task/train.npz")]

    def embed(self) -> None:
        """world-clip, embed (with thumbnails), merge, index."""
        work, run, send = self.work, self.run, self.send
        samples = self.args.clip_samples
        trained = run(
            [*send, "world-clip", *self.reference, "--quiet"]
            + ([] if samples is None else ["--samples", str(samples)]),
            work / "logs/world-clip.log",
            "sender world-clip (the world's own CLIP, trained once per cache)",
        )
        self.clip = trained.strip().splitlines()[-1].split()
        store = str(work / "embeddings")
        run(
            [
                *send,
                "embed",
                *self.reference,
                *self.clip,
                "--workers",
                "1",
                "--quiet",
                "--out",
                store,
            ],
            work / "logs/embed.log",
            "sender embed (CLIP embeddings and 32x32 thumbnails of every reference image)",
        )
        run([*send, "merge", store], work / "logs/merge.log", "sender merge")
        run([*send, "index", store, "--quiet"], work / "logs/index.log", "sender index (FAISS)")

    def score(self) -> None:
        """The probe teacher on stored embeddings, and the image path's CNN teacher."""
        work, test = self.work, ["--test", str(self.work / "task/test.npz")]
        self.run(
            [
                *self.send,
                "score",
                "--embeddings",
                str(work / "embeddings"),
                *self.clip,
                *self.task,
                *test,
                "--teacher",
                "probe",
                "--out",
                str(work / "sender"),
                "--quiet",
            ],
            work / "logs/score.log",
            "sender score --embeddings (probe on CLIP embeddings, every stored row scored)",
        )
        self.run(
            [
                *self.send,
                "score",
                *self.reference,
                *self.task,
                *test,
                "--out",
                str(work / "sender-images"),
                "--quiet",
                "--teacher-epochs",
                str(self.args.teacher_epochs),
            ],
            work / "logs/score-images.log",
            "sender score (image path: CNN teacher on the task's pixels)",
        )

    def select(self, scheme: Scheme) -> dict[str, Any]:
        out = self.work / "payloads" / f"{scheme.name}.plada"
        summary = self.work / "payloads" / f"{scheme.name}.json"
        flags = ["--strategy", scheme.strategy, "--score", scheme.score, "--keep", str(scheme.keep)]
        flags += ["--reserve", str(scheme.reserve), "--alpha", str(scheme.alpha)]
        self.run(
            [
                *self.send,
                "select",
                str(self.work / scheme.work),
                *flags,
                "--signing-key",
                str(self.key.with_suffix(".key")),
                "--out",
                str(out),
                "--json",
                str(summary),
                *([] if scheme.name == BUDGET_SCHEME else ["--no-sheet"]),
            ],
            self.work / "logs" / f"select-{scheme.name}.log",
            f"sender select {scheme.name}",
        )
        return json.loads(summary.read_text())

    def plan(self) -> dict[str, Any]:
        """The plan over the embeddings work directory, and the payload it chooses."""
        work, steps = self.work, self.args.steps
        plan_dir = work / "plan"
        plan_cmd = [*self.send, "plan", str(work / "sender"), *self.clip, *self.task]
        plan_cmd += ["--out", str(plan_dir), "--quiet", "--sender-id", "demo-station"]
        plan_cmd += ["--screen-steps", str(max(1, round(0.4 * steps)))]
        plan_cmd += ["--confirm-steps", str(steps)]  # as the students below train
        if self.args.plan_keeps:
            plan_cmd += ["--keeps", self.args.plan_keeps]
        self.run(plan_cmd, work / "logs/plan.log", "sender plan (every candidate measured)")
        summary = work / "payloads" / f"{PLAN}.json"
        self.run(
            [
                *self.send,
                "select",
                str(work / "sender"),
                "--plan",
                str(plan_dir),
                "--signing-key",
                str(self.key.with_suffix(".key")),
                "--out",
                str(work / "payloads" / f"{PLAN}.plada"),
                "--json",
                str(summary),
            ],
            work / "logs/select-plan.log",
            "sender select plan",
        )
        return json.loads(summary.read_text())


def sender_side(station: Station, schemes: list[Scheme]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Every sender step; (the pool's fingerprint, each payload's summary)."""
    work, run, send = station.work, station.run, station.send
    print("sender (ground station):")
    run([*send, "task", "digits", "--out", str(work / "task")], work / "logs/task.log", "task")
    sender_fp = run(
        [*send, "reference", *station.reference],
        work / "logs/sender-reference.log",
        "sender reference (renders the pool once per cache)",
    ).split()[-1]
    station.embed()
    station.score()
    if not station.key.with_suffix(".key").is_file():
        run(
            [*send, "keygen", "--sender-id", "demo-station", "--out", str(station.key)],
            work / "logs/keygen.log",
            "sender keygen (the station's signing key)",
        )
    payloads = {scheme.name: station.select(scheme) for scheme in schemes}
    payloads[PLAN] = station.plan()
    return sender_fp, payloads


def receiver_side(
    run: Any,
    receive: list[str],
    reference: list[str],
    work: Path,
    args: argparse.Namespace,
    names: list[str],
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Every receiver step; (its pool's fingerprint, each student's report)."""
    print("receiver (edge device):")
    receiver_fp = run(
        [*receive, "reference", *reference],
        work / "logs/receiver-reference.log",
        "receiver reference (its own copy of the pool)",
    ).split()[-1]
    trust = ["--trust", str(work / "receiver-trust")]
    public = work / "keys" / "demo-station.pub"
    run([*receive, "trust", "add", str(public), *trust], work / "logs/trust.log", "trust add")
    students: dict[str, dict[str, Any]] = {}
    steps = ["--min-steps", str(args.steps), "--max-steps", str(args.steps)]
    for name in names:
        out = work / "students" / name
        run(
            [*receive, "train", str(work / "payloads" / f"{name}.plada"), *reference, *trust]
            + ["--holdout", str(work / "task/test.npz"), "--seeds", *map(str, args.seeds)]
            + [*steps, "--out", str(out), "--quiet"]
            + (["--no-export"] if args.no_export else []),
            work / "logs" / f"train-{name}.log",
            f"receiver train {name}",
        )
        students[name] = json.loads((out / "report.json").read_text())
    return receiver_fp, students


def main() -> None:
    args = parse_args()
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
    need_key = not (work / "keys" / "demo-station.key").is_file()
    steps = Steps(13 + need_key + 2 * len(schemes))
    run = steps.run
    station = Station(work, args, run, send, sender_ref)
    sender_fp, payloads = sender_side(station, schemes)
    score_report = json.loads((work / "sender/score_report.json").read_text())
    image_report = json.loads((work / "sender-images/score_report.json").read_text())
    names = [scheme.name for scheme in schemes] + [PLAN]
    receiver_fp, students = receiver_side(run, receive, receiver_ref, work, args, names)
    if receiver_fp != sender_fp:
        raise SystemExit(f"demo: reference fingerprints differ: {sender_fp} vs {receiver_fp}")

    print("baseline: real target pixels in the same byte budget:")
    budget = payloads[BUDGET_SCHEME]["payload_bytes"]
    t0 = time.perf_counter()
    pixels = pixel_baseline(work / "task", budget, tuple(args.seeds), args.steps)
    print(
        f"  [{time.perf_counter() - t0:5.1f}s] {pixels['images']} images "
        f"in {pixels['payload_bytes']} bytes"
    )

    rows = table_rows(schemes, payloads, students, pixels)
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
        "rows": rows,
        "numerics": numerics_report(),
        "seconds": round(elapsed, 1),
        "steps": steps.timings,
    }
    report_path = work / "report.json"
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

    rows = [_row(s.name, s.label, s.keep, payloads[s.name], accuracies(s.name)) for s in schemes]
    planned = payloads[PLAN]["plan"]
    keep = payloads[PLAN]["selection"]["keep"]
    plan = _row(PLAN, "plan's choice (predicted best)", keep, payloads[PLAN], accuracies(PLAN))
    rows.append(
        plan
        | {"candidate": planned["candidate"], "predicted_accuracy": planned["predicted_accuracy"]}
    )
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
    plan_row = next(row for row in report["rows"] if row["scheme"] == PLAN)
    print(
        f"plan's choice: {plan_row['candidate']}, "
        f"predicted {100 * plan_row['predicted_accuracy']:.1f}% "
        f"(short student on the validation split's thumbnails), real "
        f"{100 * plan_row['accuracy_mean']:.1f}%, {plan_row['payload_bytes']} bytes "
        f"(plot: {work / 'plan' / 'plan.png'})"
    )
    sheet = work / "payloads" / f"{BUDGET_SCHEME}.selection.png"
    print(f"what the {BUDGET_SCHEME} payload teaches: {sheet}")
    steps = report["steps"]
    print("step timings: " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in steps.items()))


if __name__ == "__main__":
    main()
