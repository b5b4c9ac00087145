"""``plada-send``: the ground station's command line.

plada-send task digits --out DIR          export the embedded default task
plada-send reference --reference SPEC     build/verify a reference set, print its fingerprint
plada-send score --reference SPEC --train T.npz [--test T.npz] --out WORK
plada-send select WORK --strategy safety-net --keep 0.01 --out task.plada
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from protocol.cli_support import run_cli
from protocol.errors import ConfigError
from protocol.reference.options import add_reference_options, print_reference, reference_from_args


def _cmd_task(args: argparse.Namespace) -> int:
    from protocol.world.digits import load_digits_split

    if args.name != "digits":
        raise ConfigError(f"unknown built-in task {args.name!r} (available: digits)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_digits_split(seed=args.seed)
    train.save(out / "train.npz")
    test.save(out / "test.npz")
    print(f"task digits: {len(train)} train and {len(test)} test images in {out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from protocol.task_data import load_labeled_images
    from sender.pipeline import score_reference

    embedder = None
    if args.clip_model or args.clip_weights:
        if not (args.clip_model and args.clip_weights):
            raise ConfigError("give both --clip-model and --clip-weights")
        from sender.embedders import OpenClipEmbedder

        embedder = OpenClipEmbedder(args.clip_model, args.clip_weights, args.device)
    reference = reference_from_args(args)
    size = args.image_size if reference.in_channels == 3 else None
    train = load_labeled_images(args.train, size)
    test = load_labeled_images(args.test, size) if args.test else None
    summary = score_reference(
        reference, train, test, args.out, teacher_kind=args.teacher, embedder=embedder,
        temperature=args.temperature, knn_k=args.knn_k, teacher_epochs=args.teacher_epochs,
        seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    accuracy = summary["teacher"]["test_accuracy"]
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    print(
        f"scored {summary['reference']['size']} reference images in "
        f"{summary['scoring_seconds']:.1f}s ({summary['scoring_images_per_second']:.0f} img/s); "
        f"teacher {summary['teacher']['kind']} test accuracy {shown}"
    )
    print(f"work directory: {args.out}")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from sender.pipeline import make_payload
    from sender.selection import SelectionConfig

    config = SelectionConfig(
        strategy=args.strategy, keep=args.keep, alpha=args.alpha, reserve=args.reserve
    )
    summary = make_payload(args.work, config, args.out, score=args.score, task_id=args.task_id)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    hist = " ".join(f"{k}:{v}" for k, v in summary["class_histogram"].items())
    print(f"kept {summary['kept']} images ({100 * summary['keep_fraction']:.2f}%), "
          f"strategy {args.strategy}, score {args.score}")  # fmt: skip
    print(f"class histogram: {hist}")
    leak = summary["leakage"]
    if leak is not None:
        print(
            f"leakage check: {leak['near_duplicates']} of {leak['test_images_checked']} test "
            f"images have a kept near-duplicate (cosine >= {leak['threshold']}); "
            f"max {leak['max_similarity']}"
        )
    print(f"payload {args.out}: {summary['payload_bytes']} bytes "
          f"(information bound {summary['information_bound_bytes']:.0f} bytes)")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plada-send", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    task = sub.add_parser("task", help="export a built-in task as train.npz / test.npz")
    task.add_argument("name", choices=["digits"])
    task.add_argument("--out", required=True)
    task.add_argument("--seed", type=int, default=0)
    task.set_defaults(func=_cmd_task)

    ref = sub.add_parser("reference", help="build or verify a reference set; print its fingerprint")
    add_reference_options(ref)
    ref.set_defaults(func=print_reference)

    score = sub.add_parser("score", help="train the teacher and score every reference image")
    add_reference_options(score)
    score.add_argument("--train", required=True, help="labeled task images (.npz or ImageFolder)")
    score.add_argument("--test", help="labeled test images, for teacher accuracy and leakage")
    score.add_argument("--teacher", choices=["cnn", "probe"], default="cnn")
    score.add_argument("--teacher-epochs", type=int, default=40)
    score.add_argument("--clip-model", help="open_clip model name, e.g. ViT-B-32")
    score.add_argument("--clip-weights", help="local open_clip weights file")
    score.add_argument("--device", default="cpu")
    score.add_argument("--temperature", type=float, default=1.0, help="energy temperature")
    score.add_argument("--knn-k", type=int, default=5)
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--out", required=True, help="work directory")
    score.add_argument("--quiet", action="store_true")
    score.set_defaults(func=_cmd_score)

    sel = sub.add_parser("select", help="select from a scored work directory and write a payload")
    sel.add_argument("work")
    sel.add_argument(
        "--strategy", choices=["lowest", "safety-net", "inverse"], default="safety-net"
    )
    sel.add_argument("--score", choices=["energy", "entropy", "knn"], default="knn")
    sel.add_argument("--keep", type=float, default=0.01, help="fraction of the reference set")
    sel.add_argument("--alpha", type=float, default=-0.2, help="safety-net quota exponent")
    sel.add_argument("--reserve", type=float, default=0.5, help="safety-net share of the budget")
    sel.add_argument("--task-id", help="task id written into the payload")
    sel.add_argument("--json", help="also write the summary as JSON here")
    sel.add_argument("--out", required=True)
    sel.set_defaults(func=_cmd_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one-line messages and exit status 2."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
