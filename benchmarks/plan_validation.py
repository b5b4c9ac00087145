"""Does the plan predict what a payload teaches? Predicted vs real students, per target.

For each target task: ``plada-send score`` and ``plada-send plan`` (the real CLIs), then
real students trained by ``plada-receive train`` on the payloads of at least 12 of the
plan's candidates: the fixed schemes of ``make demo`` (the paper's, ours, the random
controls), the plan's choice, and candidates spread over the plan's predicted ranking.
Prints, per target, the table, Spearman(predicted, real), the pairwise decision
accuracy (over every pair of evaluated candidates whose real accuracies differ, the
share the proxy orders the same way; a tie in the prediction counts half), and the
plan's choice against the best evaluated candidate (the bar: within 2 points), with the
gap's paired standard error; also the same real students scored on the plan's validation
split, which separates the proxy's errors from the difference between validation and
test. Rerunning on the same ``--work`` skips every step whose outputs exist.

Real students are measured on the target's test split and, for a held-out target, on
5,400 more images drawn from the same distribution (``test-more.npz`` beside it): a test
split of 450-900 images measures a gap to about +-0.8 points, too coarse for the bar.
The gap on the test split alone is printed beside it.

    python -m benchmarks.plan_validation --work work/plan-validation \
        [--targets digits font-digits font-letters photos] [--deployment]

``--deployment`` plans each target a second time with its test images, unlabeled, as
``plan --deployment`` (the device's own scenery), into ``plan-deployment/``; run it after
a run without, on the same ``--work``, to compare the two plans' choices on the same
students.

``--teacher-seeds 0 1`` scores, plans and sends each target once per teacher seed (the
teacher and the plan's split both change with it); the summary gives each seed's row,
each target's mean over its seeds, and the decision accuracy averaged over the targets.
``--plan-name NAME --reuse-students`` judges a second plan of the same work directories
(another version, other settings) on the students the first one trained, plus its own
choice.

``--path embeddings`` runs the production path instead: the world's CLIP
(``plada-send world-clip``) embeds the pool once, with thumbnails, into a store that
every target shares (merged and indexed); each target is scored with ``score
--embeddings`` (probe teacher) and planned on the thumbnails.

    python -m benchmarks.plan_validation --path embeddings --work work/plan-validation-emb \
        --targets font-digits font-letters photos-iid
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

from benchmarks.demo_steps import run
from benchmarks.heldout_targets import TARGETS, make_target, more_test_images

# The test split's 450-900 images measure the gap between two students to about +-0.8
# points (paired standard error; +-1.1 on font-letters), coarse for a 2-point bar; 5,400
# more images of the same distribution bring it to about +-0.3.
MORE_TEST_IMAGES = 5400

FIXED = {  # make demo's fixed schemes, as plan candidate names
    "vanilla-1": "lowest/energy/1%",
    "vanilla-5": "lowest/energy/5%",
    "paper-safety-1": "safety-net/energy/1%/r0.5/a-0.2",
    "safety-1": "safety-net/knn/1%/r1/a-0.2",
    "safety-5": "safety-net/knn/5%/r1/a-0.2",
    "cover-1": "safety-net/cover/1%/r1/a-0.2",
    "inverse-1": "inverse/energy/1%",
    "random-1": "random/1%",
    "random-balanced-1": "random-balanced/1%/a0",
}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def evaluated_names(plan: dict[str, Any], count: int) -> list[str]:
    """The fixed schemes, the plan's choice, and candidates at evenly spaced predicted ranks."""
    names = [name for name in FIXED.values()] + [plan["chosen"]]
    ranked = sorted(plan["candidates"], key=lambda r: -r["predicted_accuracy"])
    for position in np.linspace(0, len(ranked) - 1, num=max(count, 2)).round().astype(int):
        if len(dict.fromkeys(names)) >= count:
            break
        names.append(ranked[position]["name"])
    return list(dict.fromkeys(names))


def decision_accuracy(predicted: list[float], real: list[float]) -> float:
    """Over every pair whose real accuracies differ, the share the prediction orders the
    same way (a tie in the prediction counts half)."""
    agree, pairs = 0.0, 0
    for i in range(len(real)):
        for j in range(i + 1, len(real)):
            if real[i] == real[j]:
                continue
            pairs += 1
            same = np.sign(predicted[i] - predicted[j]) * np.sign(real[i] - real[j])
            agree += 1.0 if same > 0 else 0.5 if same == 0 else 0.0
    return agree / max(pairs, 1)


def shared_store(work: Path, args: argparse.Namespace) -> list[str]:
    """The pool embedded once by the world's CLIP (thumbnails, merged, indexed) for every
    target; the ``--clip-model``/``--clip-weights`` flags that made it."""
    send = [sys.executable, "-m", "sender.cli"]
    ref = ["--reference", args.reference, "--cache-dir", str(work / "cache")]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    clip = run([*send, "world-clip", *ref, "--quiet"], work / "logs" / "world-clip.log")
    flags = clip.strip().splitlines()[-1].split()
    store = work / "embeddings"
    if not (store / "reference.faiss").is_file():
        embed = [*send, "embed", *ref, *flags, "--workers", "1", "--quiet", "--out", str(store)]
        run(embed, work / "logs" / "embed.log")
        run([*send, "merge", str(store)], work / "logs" / "merge.log")
        run([*send, "index", str(store), "--quiet"], work / "logs" / "index.log")
    return flags


def plan_validation_split(train_file: Path, plan: dict[str, Any]):
    """The plan's validation split of the task's labeled images, as the plan drew it."""
    from protocol.task_data import load_labeled_images
    from sender.selection.plan import split_task

    settings = plan["settings"]
    train = load_labeled_images(train_file)
    return split_task(train, settings["validation_fraction"], settings["seed"])[1]


def slug_of(name: str) -> str:
    """A candidate's name as a file name."""
    return name.replace("/", "_").replace("%", "pct")


def student_correct(program: Path, *image_sets) -> list[np.ndarray]:
    """Which images of each labeled set a receiver's exported student
    (``model-seed*.pt2``) gets right."""
    import torch

    module = torch.export.load(str(program)).module()
    correct = []
    with torch.no_grad():
        for images in image_sets:
            parts = torch.from_numpy(images.images).split(1024)
            logits = torch.cat([module(part.float()) for part in parts])
            correct.append(logits.argmax(1).numpy() == images.labels)
    return correct


def measurement_images(target: str, task: Path):
    """The test split and, for a held-out target, ``MORE_TEST_IMAGES`` fresh draws of its
    test distribution (written once beside it): the images real students are measured on."""
    from protocol.task_data import LabeledImages, load_labeled_images

    test = load_labeled_images(task / "test.npz")
    more_file = task / "test-more.npz"
    if not more_file.is_file():
        more = more_test_images(target, MORE_TEST_IMAGES)
        if more is None:
            return test
        more.save(more_file)
    more = load_labeled_images(more_file)
    images = np.concatenate([test.images, more.images])
    return LabeledImages(images, np.concatenate([test.labels, more.labels]), test.class_names)


def standard_error(differences: np.ndarray) -> float:
    """The standard error of a gap between accuracies measured on the same images, from
    each image's difference (paired)."""
    return float(differences.std(ddof=1) / np.sqrt(differences.size))


def validate_target(
    target: str, work: Path, args: argparse.Namespace, teacher_seed: int = 0
) -> dict[str, Any]:
    """Score, plan, and train real students on the evaluated candidates of one target,
    with the teacher (and the plan's split) of ``teacher_seed``."""
    send = [sys.executable, "-m", "sender.cli"]
    receive = [sys.executable, "-m", "receiver.cli"]
    ref = ["--reference", args.reference, "--cache-dir", str(work.parent / "cache")]
    logs = work / "logs"
    for sub in ("task", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    task = work / "task"
    if (task / "test.npz").is_file():
        pass  # resuming: every step below is skipped when its outputs exist
    elif target == "digits":
        run([*send, "task", "digits", "--out", str(task)], logs / "task.log")
    else:
        train, test = make_target(target)
        train.save(task / "train.npz")
        test.save(task / "test.npz")
    train_file, test_file = str(task / "train.npz"), str(task / "test.npz")
    # each teacher seed scores, plans and sends on its own; seed 0 keeps the plain names
    suffix = "" if teacher_seed == 0 else f"-teacher{teacher_seed}"
    seed = ["--seed", str(teacher_seed)]
    scored = work / f"sender{suffix}"
    plan_name = args.plan_name or ("plan-deployment" if args.deployment else "plan")
    plan_dir = work / (plan_name + suffix)
    # --deployment: the target's test images, unlabeled, stand for the device's scenery
    scenery = ["--deployment", test_file] if args.deployment else []
    # the image path plans from the reference images; the embeddings path from the store
    source = ref if args.clip is None else ["--embeddings", str(work.parent / "embeddings")]
    if not (scored / "score_report.json").is_file():
        score = [*send, "score", *source, *(args.clip or []), "--train", train_file]
        score += ["--test", test_file, *seed, "--out", str(scored), "--quiet"]
        run(score, logs / f"score{suffix}.log")
    if not (plan_dir / "plan.json").is_file():
        plan_cmd = [*send, "plan", str(scored), *(ref if args.clip is None else args.clip)]
        plan_cmd += ["--train", train_file, *scenery, *seed, "--out", str(plan_dir), "--quiet"]
        if args.teacher_splits is not None:
            plan_cmd += ["--teacher-splits", str(args.teacher_splits)]
        run(plan_cmd, logs / f"{plan_dir.name}.log")
    plan = json.loads((plan_dir / "plan.json").read_text())
    validation = plan_validation_split(Path(train_file), plan)
    measured = measurement_images(target, task)
    rows = {r["name"]: r for r in plan["candidates"]}
    results, correct = [], {}
    names = evaluated_names(plan, args.candidates)
    if args.reuse_students:  # the candidates students exist for, and this plan's choice
        trained = [n for n in rows if (work / f"students{suffix}" / slug_of(n)).is_dir()]
        names = list(dict.fromkeys([*trained, plan["chosen"]]))
    for name in names:
        c = rows[name]["candidate"]
        slug = slug_of(name)  # students kept by candidate:
        payload = work / f"payloads{suffix}" / f"{slug}.plada"  # a second plan of the
        out = work / f"students{suffix}" / slug  # target reuses those both evaluate
        if not (out / "report.json").is_file():
            select = [*send, "select", str(scored), "--strategy", c["strategy"]]
            select += ["--score", c["score"], "--keep", str(c["keep"])]
            select += ["--reserve", str(c["reserve"]), "--alpha", str(c["alpha"])]
            payload.parent.mkdir(exist_ok=True)
            run([*select, "--unsigned", "--out", str(payload)], logs / f"select-{slug}{suffix}.log")
            train = [*receive, "train", str(payload), *ref, "--allow-unsigned"]
            train += ["--holdout", test_file, "--seeds", *map(str, args.seeds)]
            train += ["--min-steps", str(args.steps), "--max-steps", str(args.steps)]
            run([*train, "--out", str(out), "--quiet"], logs / f"train-{slug}{suffix}.log")
        report = json.loads((out / "report.json").read_text())
        programs = [out / f"model-seed{r['seed']}.pt2" for r in report["runs"]]
        each, on_validation = zip(
            *(student_correct(program, measured, validation) for program in programs),
            strict=True,
        )
        correct[name] = np.mean(each, axis=0)  # each image, over the student seeds
        accs = [float(c.mean()) for c in each]
        results.append(
            {
                "name": name,
                "fixed": [k for k, v in FIXED.items() if v == name],
                "chosen": name == plan["chosen"],
                "payload_bytes": rows[name]["payload_bytes"],
                "predicted_accuracy": rows[name]["predicted_accuracy"],
                "stage": rows[name]["stage"],
                "real_accuracy": float(np.mean(accs)),
                "real_std": float(np.std(accs)),
                "real_validation_accuracy": float(np.mean([c.mean() for c in on_validation])),
                # the receiver's own report, on the test split alone
                "real_test_split_accuracy": float(
                    np.mean([r["holdout_accuracy"] for r in report["runs"]])
                ),
            }
        )
    chosen = next(r for r in results if r["chosen"])
    best = max(results, key=lambda r: r["real_accuracy"])
    gap = correct[best["name"]] - correct[chosen["name"]]  # each image's, paired
    best_on_validation = max(results, key=lambda r: r["real_validation_accuracy"])
    best_fixed = max((r for r in results if r["fixed"]), key=lambda r: r["real_accuracy"])
    return {
        "target": target,
        "teacher_seed": teacher_seed,
        "plan_seconds": plan["seconds"],
        "domain_gap": plan["evidence"]["domain_gap"]["reason"],
        "rows": results,
        "spearman": spearman(
            [r["predicted_accuracy"] for r in results], [r["real_accuracy"] for r in results]
        ),
        "decision_accuracy": decision_accuracy(
            [r["predicted_accuracy"] for r in results], [r["real_accuracy"] for r in results]
        ),
        "chosen": chosen["name"],
        "chosen_real": chosen["real_accuracy"],
        "best": best["name"],
        "best_real": best["real_accuracy"],
        "best_fixed": best_fixed["name"],
        "best_fixed_real": best_fixed["real_accuracy"],
        "gap_to_best_points": 100 * (best["real_accuracy"] - chosen["real_accuracy"]),
        "gap_per_image": gap,  # not written
        "gap_standard_error_points": 100 * standard_error(gap),
        "test_images": len(measured),
        "gap_on_test_split_points": 100
        * (best["real_test_split_accuracy"] - chosen["real_test_split_accuracy"]),
        # the same students scored on the plan's validation split: how well validation
        # stands in for the test set, and how well the proxy predicts the real students there
        "spearman_predicted_vs_real_on_validation": spearman(
            [r["predicted_accuracy"] for r in results],
            [r["real_validation_accuracy"] for r in results],
        ),
        "spearman_validation_vs_test": spearman(
            [r["real_validation_accuracy"] for r in results],
            [r["real_accuracy"] for r in results],
        ),
        "best_on_validation": best_on_validation["name"],
        "best_on_validation_real": best_on_validation["real_accuracy"],
    }


def print_target(result: dict[str, Any]) -> None:
    print(f"\ntarget {result['target']}  (domain gap: {result['domain_gap']})")
    header = (
        f"{'candidate':34s} {'fixed scheme':18s} {'bytes':>7s} {'predicted':>9s} "
        f"{'real, validation':>16s} {'real, test':>13s}"
    )
    print(f"(test: {result['test_images']} images)")
    print("-" * len(header))
    for r in sorted(result["rows"], key=lambda r: -r["real_accuracy"]):
        mark = "*" if r["chosen"] else " "
        fixed = ",".join(r["fixed"]) or "-"
        print(
            f"{mark}{r['name']:33s} {fixed:18s} {r['payload_bytes']:7d} "
            f"{100 * r['predicted_accuracy']:8.1f}% "
            f"{100 * r['real_validation_accuracy']:15.1f}% "
            f"{100 * r['real_accuracy']:6.1f} +- {100 * r['real_std']:.1f}%"
        )
    print(
        f"the same students on the plan's validation split: Spearman(predicted, real there) "
        f"{result['spearman_predicted_vs_real_on_validation']:.3f}, Spearman(validation, test) "
        f"{result['spearman_validation_vs_test']:.3f}; best there {result['best_on_validation']} "
        f"(real on test {100 * result['best_on_validation_real']:.1f}%)"
    )
    print(f"decision accuracy: {result['decision_accuracy']:.3f}")
    print(
        f"spearman: {result['spearman']:.3f} over {len(result['rows'])} candidates; "
        f"plan's choice {result['chosen']} real {100 * result['chosen_real']:.1f}% vs best "
        f"{result['best']} {100 * result['best_real']:.1f}% "
        f"({result['gap_to_best_points']:+.1f} +- "
        f"{result['gap_standard_error_points']:.1f} points; best fixed scheme "
        f"{100 * result['best_fixed_real']:.1f}%)"
    )


def bytes_ratio(result: dict[str, Any]) -> float:
    """The chosen payload's bytes over the best evaluated candidate's."""
    rows = {row["name"]: row for row in result["rows"]}
    return rows[result["chosen"]]["payload_bytes"] / rows[result["best"]]["payload_bytes"]


def print_summary(results: list[dict[str, Any]]) -> None:
    """One row per target and teacher seed, then each target's mean over its seeds, then
    the decision accuracy averaged over the targets."""
    print("\nsummary")
    print(
        f"{'target':14s} {'teacher':>7s} {'spearman':>8s} {'decision':>8s} {'chosen real':>11s} "
        f"{'bytes':>7s} {'best real':>9s} {'bytes':>7s} {'gap':>6s} {'+-':>4s} {'bytes/best':>10s} "
        f"{'gap, test split alone':>21s}"
    )
    for r in results:
        rows = {row["name"]: row for row in r["rows"]}
        print(
            f"{r['target']:14s} {r['teacher_seed']:7d} {r['spearman']:8.3f} "
            f"{r['decision_accuracy']:8.3f} {100 * r['chosen_real']:10.1f}% "
            f"{rows[r['chosen']]['payload_bytes']:7d} {100 * r['best_real']:8.1f}% "
            f"{rows[r['best']]['payload_bytes']:7d} {r['gap_to_best_points']:+5.1f} "
            f"{r['gap_standard_error_points']:4.1f} {bytes_ratio(r):10.2f} "
            f"{r['gap_on_test_split_points']:+21.1f}"
        )
    targets = list(dict.fromkeys(r["target"] for r in results))
    print("\nmean over teacher seeds")
    decisions = []
    for target in targets:
        mine = [r for r in results if r["target"] == target]

        def mean(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return float(np.mean([r[key] for r in rows]))

        decisions.append(mean("decision_accuracy"))
        # every seed's students are measured on the target's same images
        gap_se = standard_error(np.mean([r["gap_per_image"] for r in mine], axis=0))
        print(
            f"{target:14s} seeds {len(mine)}: spearman {mean('spearman'):.3f}, "
            f"decision {mean('decision_accuracy'):.3f}, chosen {100 * mean('chosen_real'):.1f}% "
            f"vs best {100 * mean('best_real'):.1f}%, gap {mean('gap_to_best_points'):+.1f} "
            f"+- {100 * gap_se:.1f} points, "
            f"bytes/best {np.mean([bytes_ratio(r) for r in mine]):.2f}"
        )
    print(f"decision accuracy: {np.mean(decisions):.3f} averaged over {len(targets)} targets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="work/plan-validation")
    parser.add_argument("--reference", default="glyphs")
    parser.add_argument("--targets", nargs="+", default=["digits", *TARGETS])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--teacher-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="score and plan each target once per teacher seed (its split too); the "
        "summary gives each seed's row and their mean",
    )
    parser.add_argument("--steps", type=int, default=250, help="real student steps")
    parser.add_argument("--candidates", type=int, default=14, help="candidates trained per target")
    parser.add_argument(
        "--path",
        choices=["images", "embeddings"],
        default="images",
        help="score and plan from the reference images, or from a store of CLIP embeddings",
    )
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="plan with each target's test images, unlabeled, as --deployment (a second "
        "plan beside the first; students of candidates both evaluate are trained once)",
    )
    parser.add_argument(
        "--plan-name",
        help="the plan's folder in each target (default plan, or plan-deployment): a "
        "second plan of the same work directories, made by another version or settings",
    )
    parser.add_argument(
        "--teacher-splits",
        type=int,
        help="the plan's --teacher-splits (default: the plan's own default)",
    )
    parser.add_argument(
        "--reuse-students",
        action="store_true",
        help="evaluate the candidates whose students exist (from an earlier plan of the "
        "same targets) and this plan's choice, to compare two plans on the same students",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    work = Path(args.work)
    args.clip = shared_store(work, args) if args.path == "embeddings" else None
    results = []
    for target in args.targets:
        for teacher_seed in args.teacher_seeds:
            print(f"target {target}, teacher seed {teacher_seed}:")
            results.append(validate_target(target, work / target, args, teacher_seed))
            print_target(results[-1])
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "path": args.path,
        "deployment": args.deployment,
        "seeds": args.seeds,
        "teacher_seeds": args.teacher_seeds,
        "steps": args.steps,
        "targets": [{k: v for k, v in r.items() if k != "gap_per_image"} for r in results],
        "seconds": round(time.perf_counter() - started, 1),
    }
    name = args.plan_name or ("plan-deployment" if args.deployment else "plan")
    kind = name.removeprefix("plan-")  # report.json, report-deployment.json, ...
    report_file = work / ("report.json" if name == "plan" else f"report-{kind}.json")
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(results)
    print(f"total {report['seconds']:.0f}s; report: {report_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
