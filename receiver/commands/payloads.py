"""``plada-receive verify`` and ``train``: one payload file judged in the acceptance order
(:mod:`receiver.acceptance`), and trained."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from plada_cli import (
    add_reference_options,
    reference_from_args,
    stop_on_signals,
    task_images_for,
)
from protocol.atomic_files import writable_directory
from protocol.errors import PladaError
from protocol.payload import Payload, SenderStamp
from protocol.reference.base import ReferenceSource
from protocol.reference.canonical import reference_availability
from protocol.timestamps import utc_text
from receiver.acceptance import (
    AcceptanceRules,
    AcceptedPayload,
    Received,
    open_acceptance,
    read_received,
    record_acceptance,
)
from receiver.commands.options import (
    Subparsers,
    add_training_options,
    add_trust_options,
    coverage_rule,
    existing_trust_dir,
    job_settings,
    trust_options,
)
from receiver.ledger import LEDGER_FILE, SequenceLedger
from receiver.workers import OUTPUT_LOCK, OutputDirLock


def add_verify(sub: Subparsers) -> None:
    verify = sub.add_parser("verify", help="verify a payload against the local reference set")
    verify.add_argument("payload", help="the payload file (.plada)")
    add_reference_options(verify, canonical=True)
    add_trust_options(verify)
    verify.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    received = read_received(args.payload)
    reference = reference_from_args(args)
    accepted = accept(args, received, reference, record=False)  # verify writes nothing
    payload = accepted.payload
    print(
        f"ok: task {payload.task!r}, {payload.count} images, {len(payload.class_names)} classes, "
        f"reference {payload.reference_name} ({payload.reference_fingerprint.hex()[:16]}...)"
    )
    print(f"origin: {_origin(payload)}")
    if accepted.again:
        print("accepted before on this device: `train` trains it again without a replay check")
    elif payload.sender is not None:
        print(_order_note(args, payload.sender))
    return 0


def _order_note(args: argparse.Namespace, stamp: SenderStamp) -> str:
    """What accepting this payload means for the sender's others (rollbacks)."""
    ledger = _ledger(args, read_only=True)
    try:
        last = ledger.last(stamp.sender) if ledger is not None else None
    finally:
        if ledger is not None:
            ledger.close()
    before = "none accepted here yet" if last is None else f"the last accepted here is {last}"
    return (
        f"order: {before}; once this one is accepted, payloads of {stamp.sender} signed "
        f"before it (sequence < {stamp.sequence}) are refused here as rollbacks: train "
        "older ones first, or have the sender select them again"
    )


def accept(
    args: argparse.Namespace,
    received: Received,
    reference: ReferenceSource,
    *,
    record: bool,
    known: bool = False,
    check: Callable[[Payload], None] | None = None,
) -> AcceptedPayload:
    """Judge a payload file under the trust options (the I/O around the acceptance: the
    trust store and the ledger read, and with ``record`` the acceptance written)."""
    ledger = _ledger(args, read_only=not record)
    try:
        rules = AcceptanceRules(
            trust_options(args),
            max_images=args.max_job_images,
            max_classes=args.max_job_classes,
            coverage=coverage_rule(args),
        )
        acceptance = open_acceptance(
            existing_trust_dir(args),
            rules,
            ledger,
            reference.manifest,
            reference_availability(reference),
        )
        accepted = acceptance.examine(received, known=known, check=check)
        if record and ledger is not None:
            record_acceptance(ledger, accepted)
    finally:
        if ledger is not None:
            ledger.close()
    return accepted


def _ledger(args: argparse.Namespace, read_only: bool) -> SequenceLedger | None:
    folder = existing_trust_dir(args)
    path = args.ledger or (folder / LEDGER_FILE if folder else None)
    return SequenceLedger(path, read_only=read_only) if path else None


def _origin(payload: Payload) -> str:
    if payload.sender is None:
        return "UNSIGNED (accepted for development)"
    stamp = payload.sender
    return (
        f"signed by {stamp.sender} (key {payload.key_id.hex()}), sequence {stamp.sequence}, "
        f"expires {utc_text(stamp.expires)}"
    )


def add_train(sub: Subparsers) -> None:
    train = sub.add_parser("train", help="train a student from a payload")
    train.add_argument("payload", help="the payload file (.plada)")
    add_reference_options(train, canonical=True)
    train.add_argument("--holdout", help="labeled images to evaluate on (.npz or ImageFolder)")
    train.add_argument(
        "--out", required=True, help="output directory: models, report.json, summary, plot"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another run's outputs in --out (default: refuse, so that one "
        "directory never mixes two runs)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    add_trust_options(train)
    add_training_options(train)
    train.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    received = read_received(args.payload)  # read and hashed once: judged, then trained
    reference = reference_from_args(args)
    # every local argument is checked before the payload is accepted: a mistake here
    # must not use it up, nor leave an empty --out behind
    created = not Path(args.out).exists()
    out = writable_directory(args.out, "--out")
    lock = None
    try:
        lock = OutputDirLock(out)
        holdout = task_images_for(args.holdout, reference, "holdout") if args.holdout else None
        settings = job_settings(args)  # from here on torch is loaded
        from receiver.job import check_trainable, claim_output_dir, job_identity, started_with

        claim_output_dir(out, job_identity(received.sha256, settings, reference), args.overwrite)
        accepted = accept(
            args,
            received,
            reference,
            record=True,
            known=started_with(out, received.sha256),
            check=lambda payload: check_trainable(payload, reference, settings, holdout),
        )
    except PladaError:
        if lock is not None:
            lock.release()
            if created:
                with contextlib.suppress(OSError):
                    (out / OUTPUT_LOCK).unlink()
                    out.rmdir()
        elif created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return _train_accepted(accepted, reference, out, settings, holdout, args.quiet)


def _train_accepted(accepted, reference, out: Path, settings, holdout, quiet: bool) -> int:
    """Train (or resume) under SIGINT/SIGTERM that stop at a checkpoint; print the report.
    From the "accepted" line on, a signal stops the training at its next step."""
    with stop_on_signals() as stop:
        verb = "accepted before on this device, training again" if accepted.again else "accepted"
        print(f"{verb}: {_origin(accepted.payload)}", flush=True)
        from receiver.job import JobControl, run_job
        from receiver.job_report import REPORT_FILE, summarize
        from trainer.training import TrainingInterrupted

        earlier = (out / REPORT_FILE).is_file()  # claimed above: this payload's, these settings
        try:
            control = JobControl(should_stop=stop)
            report = run_job(accepted, reference, out, settings, holdout, not quiet, control)
        except TrainingInterrupted as exc:
            print(
                f"plada-receive: stopped at step {exc.step}; its checkpoint is kept in {out}: "
                "the same command resumes from it",
                file=sys.stderr,
            )
            return stop.exit_status
    if earlier:
        print(
            f"{out} already held this payload's training with these settings: the report "
            "below is that earlier result (train into a new --out to train again)"
        )
    print(summarize(report))
    print(f"report: {out / REPORT_FILE}")
    return 0
