"""``plada-receive``: the edge device's command line.

plada-receive verify PAYLOAD --reference SPEC        check a payload against the local set
plada-receive train PAYLOAD --reference SPEC [--holdout test.npz] --out DIR
plada-receive reference --reference SPEC             build/verify the local set
"""

from __future__ import annotations

import argparse
import sys

from protocol.cli_support import run_cli
from protocol.reference.options import add_reference_options, print_reference, reference_from_args


def _cmd_verify(args: argparse.Namespace) -> int:
    from protocol.payload import read_payload

    payload = read_payload(args.payload, reference=reference_from_args(args).manifest)
    print(
        f"ok: task {payload.task!r}, {payload.count} images, {len(payload.class_names)} classes, "
        f"reference {payload.reference_name} ({payload.reference_fingerprint.hex()[:16]}...)"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from protocol.task_data import load_labeled_images
    from receiver.job import JobSettings, run_job, summarize
    from receiver.training import TrainConfig

    reference = reference_from_args(args)
    size = args.image_size if reference.in_channels == 3 else None
    holdout = load_labeled_images(args.holdout, size) if args.holdout else None
    config = TrainConfig(
        model=args.model, epochs=args.epochs, min_steps=args.min_steps, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, label_smoothing=args.label_smoothing,
        augment=args.augment, device=args.device, weights=args.weights,
    )  # fmt: skip
    settings = JobSettings(train=config, seeds=tuple(args.seeds))
    report = run_job(args.payload, reference, args.out, settings, holdout, not args.quiet)
    print(summarize(report))
    print(f"report: {args.out}/report.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plada-receive", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("reference", help="build or verify the local reference set")
    add_reference_options(ref)
    ref.set_defaults(func=print_reference)

    verify = sub.add_parser("verify", help="verify a payload against the local reference set")
    verify.add_argument("payload")
    add_reference_options(verify)
    verify.set_defaults(func=_cmd_verify)

    train = sub.add_parser("train", help="train a student from a payload")
    train.add_argument("payload")
    add_reference_options(train)
    train.add_argument("--holdout", help="labeled images to evaluate on (.npz or ImageFolder)")
    train.add_argument("--model", default="small-cnn", help="small-cnn or a torchvision model name")
    train.add_argument("--weights", help="local state_dict to start from")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--min-steps", type=int, default=250)
    train.add_argument("--max-steps", type=int, default=250, help="0: no limit")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--label-smoothing", type=float, default=0.1)
    train.add_argument("--augment", choices=["none", "affine", "affine-flip"], default="affine")
    train.add_argument("--device", default="auto")
    train.add_argument("--seeds", type=int, nargs="+", default=[0])
    train.add_argument("--out", required=True)
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one-line messages and exit status 2."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
