"""Option groups that several ``plada-receive`` subcommands share, and the settings they
make: trust (who is trusted, how fresh a payload must be), caps per job, training."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from plada_cli import machine_cores
from receiver.acceptance import DEFAULT_MAX_CLASSES, DEFAULT_MAX_IMAGES, CoverageRule
from receiver.errors import TrustStoreError
from receiver.trust_store import TrustOptions
from trainer.choices import (
    AMP_MODES,
    AUGMENTATIONS,
    CACHE_PLACES,
    DECODE_CHOICES,
    STUDENT_BATCH,
    STUDENT_STEPS,
)

if TYPE_CHECKING:
    from receiver.job import JobSettings

TRUST_ENV = "PLADA_TRUST_DIR"
Subparsers = argparse._SubParsersAction


def add_trust_options(parser: argparse.ArgumentParser, daemon: bool = False) -> None:
    """Who is trusted and how fresh a payload must be, shared by verify, train and daemon."""
    group = parser.add_argument_group("trust")
    default = "HOME/trust" if daemon else f"${TRUST_ENV}"
    group.add_argument("--trust", help=f"trust store directory of sender keys (default {default})")
    if not daemon:
        group.add_argument(
            "--ledger",
            help="last accepted sequence number per sender (default TRUST/ledger.sqlite)",
        )
    group.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept unsigned payloads: development only, never on a deployed device",
    )
    group.add_argument(
        "--no-expiry-check",
        action="store_true",
        help="for a device without a trusted clock: ignore payload expiry (sequence numbers "
        "still stop replays)",
    )
    group.add_argument(
        "--device-id", help="this device's id: payloads addressed to it are accepted"
    )
    group.add_argument(
        "--group",
        action="append",
        default=[],
        help="a device group this device belongs to (repeat for several)",
    )
    group.add_argument(
        "--require-audience",
        action="store_true",
        help="refuse payloads that name no audience (device id or group)",
    )
    _add_limits(group)
    _add_caps(parser)


def _add_limits(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-lifetime-days",
        type=float,
        default=400.0,
        help="refuse payloads that expire further ahead than this",
    )
    group.add_argument(
        "--max-clock-ahead-hours",
        type=float,
        default=24.0,
        help="refuse sequence numbers (milliseconds since 1970) this far past the clock",
    )


def _add_caps(parser: argparse.ArgumentParser) -> None:
    caps = parser.add_argument_group("caps per job")
    caps.add_argument(
        "--max-job-images",
        type=int,
        default=DEFAULT_MAX_IMAGES,
        help="refuse payloads that keep more reference images",
    )
    caps.add_argument(
        "--max-job-classes",
        type=int,
        default=DEFAULT_MAX_CLASSES,
        help="refuse payloads with more classes",
    )
    coverage = parser.add_argument_group("a partial copy of the reference set (--canonical)")
    coverage.add_argument(
        "--min-coverage",
        type=share,
        default=CoverageRule.min_overall,
        help="refuse payloads whose kept images this copy holds less of (a share or a percentage)",
    )
    coverage.add_argument(
        "--min-class-coverage",
        type=share,
        default=CoverageRule.min_class,
        help="... or less of, in any one class",
    )


def share(text: str) -> float:
    """A share given as 0.98 or 98%."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (0.98 or 98%)") from exc
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 100%")
    return value


def coverage_rule(args: argparse.Namespace) -> CoverageRule:
    """The coverage a partial copy must have of a payload (--min-coverage options)."""
    return CoverageRule(args.min_coverage, args.min_class_coverage)


def trust_options(args: argparse.Namespace) -> TrustOptions:
    """The freshness and audience rules of the trust options."""
    audiences = set(args.group) | ({args.device_id} if args.device_id else set())
    return TrustOptions(
        allow_unsigned=args.allow_unsigned,
        check_expiry=not args.no_expiry_check,
        audiences=frozenset(audiences),
        require_audience=args.require_audience,
        max_lifetime=args.max_lifetime_days * 86400,
        max_clock_ahead=args.max_clock_ahead_hours * 3600,
    )


def trust_dir(args: argparse.Namespace) -> Path | None:
    """--trust, else $PLADA_TRUST_DIR, else None."""
    chosen = args.trust or os.environ.get(TRUST_ENV)
    return Path(chosen) if chosen else None


def existing_trust_dir(args: argparse.Namespace) -> Path | None:
    """The named trust store, which must exist (a typo must not look like 'trusts nobody')."""
    folder = trust_dir(args)
    if folder is not None and not folder.is_dir():
        state = "is not a directory" if folder.exists() else "does not exist"
        raise TrustStoreError(
            f"trust store {folder} {state}: name the right --trust (or ${TRUST_ENV}), or "
            f"install a sender key there with `plada-receive trust add SENDER.pub --trust "
            f"{folder}`"
        )
    return folder


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options of the student's training, shared by ``train`` and ``daemon``."""
    group = parser.add_argument_group("training")
    group.add_argument("--model", default="small-cnn", help="small-cnn or a torchvision model name")
    group.add_argument("--weights", help="local state_dict to start from (no download)")
    group.add_argument(
        "--epochs",
        type=int,
        help="passes over the kept images; the run takes epochs x steps-per-epoch optimizer "
        "steps, raised to --min-steps and capped at --max-steps, and ends with the epoch "
        "that holds its last step (so a small payload may run more epochs than this). "
        "Given alone, it decides the length (no floor, no cap); default: "
        f"{DEFAULT_EPOCHS}, within {STUDENT_STEPS} steps",
    )
    group.add_argument(
        "--min-steps",
        type=int,
        help=f"train at least this many steps (0: no floor; default {STUDENT_STEPS}, or 0 "
        "with --epochs)",
    )
    group.add_argument(
        "--max-steps",
        type=int,
        help=f"train at most this many steps (0: no cap; default {STUDENT_STEPS}, or 0 "
        "with --epochs)",
    )
    group.add_argument(
        "--batch-size", type=int, default=STUDENT_BATCH, help="images per optimizer step"
    )
    group.add_argument(
        "--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, cosine)"
    )
    group.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy smoothing")
    group.add_argument(
        "--augment",
        choices=("auto", *AUGMENTATIONS),
        default="auto",
        help="auto: crop-flip for image files, affine for the glyph world",
    )
    group.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    group.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="bf16 autocast (auto: on CUDA only)",
    )
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument(
        "--progressive",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="progressive resizing: start at this fraction of the image side (e.g. 0.5) and "
        "grow to full size by 75%% of the steps (0: off)",
    )
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:N")
    group.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="one student per seed (mean accuracy)"
    )
    _add_loading_options(group)


def _add_loading_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--decode",
        choices=DECODE_CHOICES,
        default="auto",
        help="image files: Pillow threads, or decoded in batches on the device (nvJPEG on "
        "CUDA) by torchcodec or torchvision; tensor: torchcodec on CUDA when installed, "
        "else torchvision; auto: tensor on CUDA, pil on the CPU",
    )
    group.add_argument(
        "--loader-threads",
        type=int,
        default=min(8, machine_cores()),
        help="Pillow decoding threads (image files); default: up to 8, at most this "
        "machine's cores",
    )
    group.add_argument(
        "--cache",
        choices=("off", *CACHE_PLACES),
        default="off",
        help="image files: decode the kept images once, before the first epoch, into a uint8 "
        "cache in GPU memory, host memory or a memory-mapped file (auto: the first that "
        "fits); later epochs crop and flip it on the device",
    )
    group.add_argument(
        "--checkpoint-seconds", type=float, default=60.0, help="save training state this often"
    )
    group.add_argument("--checkpoint-steps", type=int, default=0, help="0: by time only")
    group.add_argument("--no-export", action="store_true", help="skip the torch.export program")


DEFAULT_EPOCHS = 30


def training_length(args: argparse.Namespace) -> tuple[int, int, int]:
    """(epochs, min steps, max steps): by default the student's fixed schedule of
    ``STUDENT_STEPS`` steps; ``--epochs`` alone decides the length by itself."""
    epochs_alone = args.epochs is not None and args.min_steps is None and args.max_steps is None
    fixed = 0 if epochs_alone else STUDENT_STEPS
    return (
        DEFAULT_EPOCHS if args.epochs is None else args.epochs,
        fixed if args.min_steps is None else args.min_steps,
        fixed if args.max_steps is None else args.max_steps,
    )


def job_settings(args: argparse.Namespace) -> JobSettings:
    """:class:`~receiver.job.JobSettings` from the training options (loads torch)."""
    from receiver.job import JobSettings
    from trainer.training import TrainConfig

    epochs, min_steps, max_steps = training_length(args)
    config = TrainConfig(
        model=args.model,
        epochs=epochs,
        min_steps=min_steps,
        max_steps=max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        device=args.device,
        weights=args.weights,
        balanced=args.balanced,
        amp=args.amp,
        compile=args.compile,
        progressive=args.progressive,
    )
    return JobSettings(
        train=config,
        seeds=tuple(args.seeds),
        decode=args.decode,
        loader_threads=args.loader_threads,
        export=not args.no_export,
        checkpoint_seconds=args.checkpoint_seconds,
        checkpoint_steps=args.checkpoint_steps,
        cache=args.cache,
    )
