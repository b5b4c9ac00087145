"""A fleet whose reference copies differ: what a payload teaches on each copy.

The embedded world's pool written as an image tree is the full release (the canonical
manifest). Device copies derived from it, as a fleet holds them:

- ``release-b``: another release, 10% of the concepts dropped and 5% of the remaining
  images (seeded);
- ``damaged-1``, ``damaged-5``: 1% and 5% of the files torn (unreadable, keys intact).

Each device builds its availability (``plada-receive reference --canonical --check
decode``); the station registers them (``plada-send fleet add``). Two payloads from one
scoring: made for the full release, and restricted to the rows every copy holds (``select
--fleet``). Each is trained on each copy (real ``plada-receive train`` students, with
``--min-coverage 0`` so that the shortfall's cost is measured, not refused) and the table
shows coverage, whether the default rule (98% overall, 90% per class) accepts it, and the
students' holdout accuracy. Rerunning on the same ``--work`` skips finished steps.

    python -m benchmarks.fleet_copies --work work/fleet-copies [--target digits] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.demo_steps import run
from benchmarks.heldout_targets import TARGETS, make_target
from benchmarks.numerics import numerics_report, reexec_pinned

SEND = [sys.executable, "-m", "sender.cli"]
RECEIVE = [sys.executable, "-m", "receiver.cli"]
COPIES = ("full", "release-b", "damaged-1", "damaged-5")
IMAGE_SIZE = 32


def write_tree(pool, root: Path) -> None:
    """The pool's images as ``root/<concept>/<item>.png`` (keys as the pool's)."""
    from PIL import Image

    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    keys = pool.manifest.keys
    for start in range(0, len(keys), 4096):
        rows = np.arange(start, min(start + 4096, len(keys)))
        for row, image in zip(rows, pool.load(rows), strict=True):
            file = staging / f"{keys[row]}.png"
            file.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0]).save(file)
    staging.rename(root)


def derive_copy(full: Path, out: Path, name: str, seed: int = 0) -> None:
    """A device copy of ``full`` (hard links; torn files are copies)."""
    rng = np.random.default_rng(seed)
    files = sorted(full.glob("*/*.png"))
    folders = sorted({f.parent.name for f in files})
    keep = np.ones(len(files), bool)
    torn = np.zeros(len(files), bool)
    if name == "release-b":
        dropped = set(rng.choice(folders, round(0.10 * len(folders)), replace=False))
        keep &= np.array([f.parent.name not in dropped for f in files])
        keep[rng.choice(np.flatnonzero(keep), round(0.05 * keep.sum()), replace=False)] = False
    elif name.startswith("damaged-"):
        share = int(name.split("-")[1]) / 100
        torn[rng.choice(len(files), round(share * len(files)), replace=False)] = True
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for file, kept, tear in zip(files, keep, torn, strict=True):
        if not kept:
            continue
        target = staging / file.parent.name / file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if tear:
            target.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 3])
        else:
            os.link(file, target)
    staging.rename(out)


def write_labeled_folder(images, root: Path) -> None:
    """Labeled images as ``root/<class>/<i>.png`` (grey or RGB as they are)."""
    from PIL import Image

    for label, name in enumerate(images.class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(images.labels == label):
            pixels = images.images[i]
            picture = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
            Image.fromarray(picture).save(root / name / f"{int(i):05d}.png")


def target_folders(name: str, work: Path) -> tuple[Path, Path]:
    """The target's train and test images as ImageFolders, made once."""
    train_dir, test_dir = work / "task" / "train", work / "task" / "test"
    if not test_dir.is_dir():
        if name == "digits":
            from protocol.world.digits import load_digits_split

            train, test = load_digits_split()
        else:
            train, test = make_target(name)
        write_labeled_folder(train, train_dir)
        write_labeled_folder(test, test_dir)
    return train_dir, test_dir


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Path]:
    """The releases, the canonical manifest, the scoring, availabilities and the fleet."""
    from protocol.reference.factory import open_reference

    releases = work / "releases"
    full = releases / "full"
    if not full.is_dir():
        write_tree(open_reference(f"glyphs:per={args.per}", work / "cache"), full)
    for name in COPIES[1:]:
        if not (releases / name).is_dir():
            derive_copy(full, releases / name, name, args.seed)
    train, test = target_folders(args.target, work)
    logs, manifest, scored = work / "logs", work / "canonical.manifest", work / "sender"
    size = ["--image-size", str(IMAGE_SIZE), "--cache-dir", str(work / "cache")]
    if not manifest.is_file():
        ref = [*SEND, "reference", "--reference", str(full), *size]
        run([*ref, "--manifest-out", str(manifest)], logs / "manifest.log")
    if not (scored / "score_report.json").is_file():
        score = [*SEND, "score", "--reference", str(full), *size, "--train", str(train)]
        run([*score, "--test", str(test), "--out", str(scored), "--quiet"], logs / "score.log")
    for name in COPIES:
        avail = work / "avail" / f"{name}.avail"
        if not avail.is_file():
            device = ["--reference", str(releases / name), "--canonical", str(manifest), *size]
            built = [*RECEIVE, "reference", *device, "--availability-out", str(avail), "--quiet"]
            run(built, logs / f"availability-{name}.log")
            run(
                [*SEND, "fleet", "add", name, str(avail), "--fleet", str(work / "fleet")],
                logs / f"fleet-{name}.log",
            )
    return {"manifest": manifest, "scored": scored, "test": test}


def payloads(args: argparse.Namespace, work: Path, made: dict[str, Path]) -> dict[str, Path]:
    """The payload made for the full release and the one restricted to every copy."""
    out = {}
    for name, extra in (("for-full", []), ("for-fleet", ["--fleet", str(work / "fleet")])):
        payload = work / f"{name}.plada"
        if not payload.is_file():
            select = [*SEND, "select", str(made["scored"]), "--keep", str(args.keep)]
            select += ["--unsigned", "--no-sheet", *extra, "--out", str(payload)]
            run(select, work / "logs" / f"select-{name}.log")
        out[name] = payload
    return out


def student(args, work: Path, made: dict[str, Path], payload: Path, copy: str) -> dict:
    """Students of ``payload`` trained on ``copy`` (coverage judged, never refused)."""
    out = work / "students" / f"{payload.stem}-on-{copy}"
    if not (out / "report.json").is_file():
        device = [
            "--reference",
            str(work / "releases" / copy),
            "--canonical",
            str(made["manifest"]),
        ]
        device += ["--image-size", str(IMAGE_SIZE), "--cache-dir", str(work / "cache")]
        train = [*RECEIVE, "train", str(payload), *device, "--allow-unsigned"]
        train += [
            "--min-coverage",
            "0",
            "--min-class-coverage",
            "0",
            "--holdout",
            str(made["test"]),
        ]
        train += ["--seeds", *map(str, args.seeds), "--no-export", "--quiet"]
        train += ["--min-steps", str(args.steps), "--max-steps", str(args.steps), "--out", str(out)]
        run(train, work / "logs" / f"train-{out.name}.log")
    report = json.loads((out / "report.json").read_text())
    coverage = report["coverage"]
    accepted = coverage["overall"] >= 0.98 and coverage["worst_class_share"] >= 0.90
    return {
        "payload": payload.stem,
        "copy": copy,
        "payload_bytes": payload.stat().st_size,
        "kept": coverage["kept"],
        "present": coverage["present"],
        "overall": coverage["overall"],
        "worst_class_share": coverage["worst_class_share"],
        "default_rule_accepts": accepted,
        "accuracies": [r["holdout_accuracy"] for r in report["runs"]],
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'payload':10s} {'copy':10s} {'bytes':>6s} {'held':>9s} {'overall':>8s} "
        f"{'min class':>9s} {'rule':>7s} {'accuracy':>15s}"
    )
    for r in rows:
        accs = 100 * np.array(r["accuracies"])
        rule = "accepts" if r["default_rule_accepts"] else "refuses"
        print(
            f"{r['payload']:10s} {r['copy']:10s} {r['payload_bytes']:6d} "
            f"{r['present']:>4d}/{r['kept']:<4d} {100 * r['overall']:7.1f}% "
            f"{100 * r['worst_class_share']:8.1f}% {rule:>7s} "
            f"{accs.mean():7.1f} +- {accs.std():4.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="work/fleet-copies")
    parser.add_argument("--target", default="digits", choices=["digits", *TARGETS])
    parser.add_argument("--per", type=int, default=150, help="pool images per concept")
    parser.add_argument("--keep", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="the draw of the derived copies")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    parser.add_argument("--steps", type=int, default=250, help="student steps")
    args = parser.parse_args(argv)
    reexec_pinned()  # the same numbers on any x86 machine (benchmarks/numerics.py)
    started = time.perf_counter()
    work = Path(args.work)
    made = prepare(args, work)
    rows = [
        student(args, work, made, payload, copy)
        for payload in payloads(args, work, made).values()
        for copy in COPIES
    ]
    print_table(rows)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "numerics": numerics_report(),
        "target": args.target,
        "pool_per_concept": args.per,
        "keep": args.keep,
        "copies_seed": args.seed,
        "seeds": args.seeds,
        "steps": args.steps,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"total {report['seconds']:.0f}s; report: {work / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
