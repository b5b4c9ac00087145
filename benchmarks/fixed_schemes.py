"""The fixed selection schemes side by side on held-out targets, over target draws.

The production path without the plan: the world's CLIP embeds the pool once into a
store every target shares (as ``benchmarks.plan_validation --path embeddings``); per
draw of each target (its labeled and test images, hence its teacher), ``plada-send
score --embeddings`` (probe teacher), then for each scheme ``select`` and real
students from ``plada-receive train``. Prints one table (rows: schemes; columns:
targets, each the mean over draws and student seeds) with every scheme's mean over
the targets and its payload bytes, so that a new selection rule (``cover``) is
judged beside kNN relevance, the paper's rules and the random controls, on targets
nobody tuned for. Rerunning on the same ``--work`` skips
every step whose outputs exist.

    python -m benchmarks.fixed_schemes --work work/fixed-schemes \
        [--targets digits font-digits font-letters photos photos-iid] [--draws 0 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.compare import SCHEMES, Scheme, scheme_flags
from benchmarks.demo_steps import run
from benchmarks.heldout_targets import TARGETS, make_target
from benchmarks.numerics import numerics_report, reexec_pinned
from benchmarks.plan_validation import shared_store

SEND = [sys.executable, "-m", "sender.cli"]
RECEIVE = [sys.executable, "-m", "receiver.cli"]
DEFAULT_SCHEMES = ("safety-1", "cover-1", "paper-safety-1", "vanilla-1", "random-balanced-1")


def target_task(target: str, folder: Path, seed: int) -> tuple[str, str]:
    """The target's train and test files (its draw ``seed``), made once."""
    task = folder / "task"
    if not (task / "test.npz").is_file():
        if target == "digits":
            run([*SEND, "task", "digits", "--out", str(task)], folder / "logs" / "task.log")
        else:
            train, test = make_target(target, seed)
            task.mkdir(parents=True, exist_ok=True)
            train.save(task / "train.npz")
            test.save(task / "test.npz")
    return str(task / "train.npz"), str(task / "test.npz")


def scheme_result(
    scored: Path, scheme: Scheme, ref: list[str], test: str, out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Select ``scheme`` from ``scored`` and train the students; bytes and accuracies."""
    payload, report = out / f"{scheme.name}.plada", out / scheme.name / "report.json"
    logs = out / "logs"
    if not report.is_file():
        select = [*SEND, "select", str(scored), *scheme_flags(scheme), *ref, "--unsigned"]
        run([*select, "--out", str(payload)], logs / f"select-{scheme.name}.log")
        train = [*RECEIVE, "train", str(payload), *ref, "--allow-unsigned", "--holdout", test]
        train += ["--seeds", *map(str, args.seeds), "--no-export", "--quiet"]
        train += ["--min-steps", str(args.steps), "--max-steps", str(args.steps)]
        run([*train, "--out", str(out / scheme.name)], logs / f"train-{scheme.name}.log")
    runs = json.loads(report.read_text())["runs"]
    return {
        "payload_bytes": payload.stat().st_size,
        "accuracies": [r["holdout_accuracy"] for r in runs],
    }


def target_results(target: str, work: Path, args: argparse.Namespace) -> dict[str, list]:
    """Every scheme's results on each draw of ``target`` (its labeled images, hence
    its teacher: the probe itself is convex and does not depend on a seed)."""
    ref = ["--reference", args.reference, "--cache-dir", str(work / "cache")]
    results: dict[str, list] = {scheme: [] for scheme in args.schemes}
    for draw in [0] if target == "digits" else args.draws:  # digits: one fixed split
        out = work / target / f"draw-{draw}"
        (out / "logs").mkdir(parents=True, exist_ok=True)
        train, test = target_task(target, out, draw)
        scored = out / "sender"
        if not (scored / "score_report.json").is_file():
            score = [*SEND, "score", "--embeddings", str(work / "embeddings"), *args.clip]
            score += ["--train", train, "--test", test]
            run([*score, "--out", str(scored), "--quiet"], out / "logs" / "score.log")
        for scheme in args.schemes:
            chosen = next(s for s in SCHEMES if s.name == scheme)
            results[scheme].append(scheme_result(scored, chosen, ref, test, out, args))
            accs = results[scheme][-1]["accuracies"]
            print(f"  {target} draw {draw} {scheme}: {100 * np.mean(accs):.1f}%", flush=True)
    return results


def print_table(table: dict[str, dict[str, list]], schemes: list[str]) -> None:
    targets = list(table)
    header = f"{'scheme':18s} " + " ".join(f"{t:>12s}" for t in targets)
    print(header + f" {'mean':>6s} {'bytes':>7s}")
    for scheme in schemes:
        means = [np.mean([r["accuracies"] for r in table[t][scheme]]) for t in targets]
        spread = [np.ptp([np.mean(r["accuracies"]) for r in table[t][scheme]]) for t in targets]
        cells = " ".join(
            f"{100 * m:6.1f} ({100 * s:3.1f})" for m, s in zip(means, spread, strict=True)
        )
        sizes = [r["payload_bytes"] for t in targets for r in table[t][scheme]]
        print(f"{scheme:18s} {cells} {100 * np.mean(means):6.1f} {np.mean(sizes):7.0f}")
    print(
        "cells: real accuracy, mean over the target's draws and student seeds"
        " (spread between draws)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="work/fixed-schemes")
    parser.add_argument("--reference", default="glyphs")
    parser.add_argument("--targets", nargs="+", default=["digits", *TARGETS])
    parser.add_argument(
        "--schemes",
        nargs="+",
        default=list(DEFAULT_SCHEMES),
        choices=[s.name for s in SCHEMES if s.work == "sender"],
    )
    parser.add_argument(
        "--draws", type=int, nargs="+", default=[0, 1], help="draws of each held-out target"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds")
    parser.add_argument("--steps", type=int, default=250, help="student steps")
    args = parser.parse_args(argv)
    reexec_pinned()  # the same numbers on any x86 machine (benchmarks/numerics.py)
    started = time.perf_counter()
    work = Path(args.work)
    args.clip = shared_store(work, args)
    table = {}
    for target in args.targets:
        table[target] = target_results(target, work, args)
    print()
    print_table(table, args.schemes)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "numerics": numerics_report(),
        "draws": args.draws,
        "seeds": args.seeds,
        "steps": args.steps,
        "targets": table,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"total {report['seconds']:.0f}s; report: {work / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
