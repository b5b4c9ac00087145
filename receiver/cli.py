"""``plada-receive``: the edge device's command line.

plada-receive trust add SENDER.pub --trust DIR        trust a sender's public key
plada-receive trust reset-sequence SENDER --home DIR  forget a sender's last sequence number
plada-receive verify PAYLOAD --reference SPEC --trust DIR
plada-receive train PAYLOAD --reference SPEC --trust DIR [--holdout test.npz] --out DIR
plada-receive daemon --home DIR --reference SPEC      watch an inbox, train every payload
plada-receive status --home DIR                       queue, current job, progress
plada-receive reply-key --home DIR                    the key replies to frames are MACed with
plada-receive retry --home DIR JOB                    queue a failed job again (JOB: its number)
plada-receive reference --reference SPEC              build/verify the local set
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from plada_cli import (
    add_reference_options,
    description,
    print_reference,
    reference_from_args,
    run_cli,
    task_images_for,
)
from protocol.atomic_files import writable_directory
from protocol.errors import ConfigError, PladaError, TrustStoreError
from protocol.payload import decode_payload, read_payload_bytes
from protocol.signing import SenderKey
from protocol.timestamps import utc_text
from receiver.intake import IntakeSettings, check_job_size
from receiver.ledger import LEDGER_FILE, SequenceLedger
from receiver.status import open_home_queue, print_status
from receiver.trust_store import (
    TrustOptions,
    add_key,
    build_trust_policy,
    load_trust_store,
    remove_keys,
)

if TYPE_CHECKING:
    from protocol.payload import Payload
    from protocol.reference.base import ReferenceSource
    from protocol.task_data import LabeledImages
    from protocol.trust import TrustPolicy
    from receiver.job import JobSettings

# Subcommands import the modules that load torch or faiss when they run, so that
# --help and the light subcommands start in a fraction of a second.

TRUST_ENV = "PLADA_TRUST_DIR"
DEFAULT_INTAKE = IntakeSettings()


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
    caps = parser.add_argument_group("caps per job")
    caps.add_argument(
        "--max-job-images",
        type=int,
        default=DEFAULT_INTAKE.max_images,
        help="refuse payloads that keep more reference images",
    )
    caps.add_argument(
        "--max-job-classes",
        type=int,
        default=DEFAULT_INTAKE.max_classes,
        help="refuse payloads with more classes",
    )


def trust_options_from_args(args: argparse.Namespace) -> TrustOptions:
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


def _trust_dir(args: argparse.Namespace) -> Path | None:
    chosen = args.trust or os.environ.get(TRUST_ENV)
    return Path(chosen) if chosen else None


def _existing_trust_dir(args: argparse.Namespace) -> Path | None:
    """The named trust store, which must exist (a typo must not look like 'trusts nobody')."""
    trust_dir = _trust_dir(args)
    if trust_dir is not None and not trust_dir.is_dir():
        state = "is not a directory" if trust_dir.exists() else "does not exist"
        raise TrustStoreError(
            f"trust store {trust_dir} {state}: name the right --trust (or ${TRUST_ENV}), or "
            f"install a sender key there with `plada-receive trust add SENDER.pub --trust "
            f"{trust_dir}`"
        )
    return trust_dir


def _ledger(args: argparse.Namespace, read_only: bool = False) -> SequenceLedger | None:
    trust_dir = _existing_trust_dir(args)
    path = args.ledger or (trust_dir / LEDGER_FILE if trust_dir else None)
    return SequenceLedger(path, read_only=read_only) if path else None


def _policy(args: argparse.Namespace, ledger=None):
    return build_trust_policy(
        _existing_trust_dir(args),
        trust_options_from_args(args),
        last_sequence=ledger.last if ledger is not None else None,
    )


def _origin(payload) -> str:
    if payload.sender is None:
        return "UNSIGNED (accepted for development)"
    stamp = payload.sender
    return (
        f"signed by {stamp.sender} (key {payload.key_id.hex()}), sequence {stamp.sequence}, "
        f"expires {utc_text(stamp.expires)}"
    )


def _cmd_verify(args: argparse.Namespace) -> int:
    import hashlib

    raw = read_payload_bytes(args.payload)
    reference = reference_from_args(args)
    ledger = _ledger(args, read_only=True)  # verify writes nothing
    try:
        accepted_before = ledger is not None and ledger.was_accepted(
            hashlib.sha256(raw).hexdigest()
        )
        policy = _policy(args, ledger)
        if accepted_before:
            policy = policy.without_freshness()
        payload = decode_payload(raw, reference=reference.manifest, trust=policy)
        check_job_size(payload, args.max_job_images, args.max_job_classes)
    finally:
        if ledger is not None:
            ledger.close()
    print(
        f"ok: task {payload.task!r}, {payload.count} images, {len(payload.class_names)} classes, "
        f"reference {payload.reference_name} ({payload.reference_fingerprint.hex()[:16]}...)"
    )
    print(f"origin: {_origin(payload)}")
    if accepted_before:
        print("accepted before on this device: `train` trains it again without a replay check")
    return 0


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options of the student's training, shared by ``train`` and ``daemon``."""
    group = parser.add_argument_group("training")
    group.add_argument("--model", default="small-cnn", help="small-cnn or a torchvision model name")
    group.add_argument("--weights", help="local state_dict to start from (no download)")
    group.add_argument(
        "--epochs",
        type=int,
        default=30,
        help="passes over the kept images; the run takes epochs x steps-per-epoch optimizer "
        "steps, raised to --min-steps and capped at --max-steps, and ends with the epoch "
        "that holds its last step (so a small payload may run more epochs than this)",
    )
    group.add_argument(
        "--min-steps", type=int, default=250, help="train at least this many steps (0: no floor)"
    )
    group.add_argument(
        "--max-steps", type=int, default=250, help="train at most this many steps (0: no cap)"
    )
    group.add_argument("--batch-size", type=int, default=128, help="images per optimizer step")
    group.add_argument(
        "--lr", type=float, default=3e-3, help="peak AdamW learning rate (warmup, cosine)"
    )
    group.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy smoothing")
    group.add_argument(
        "--augment",
        choices=["auto", "none", "affine", "affine-flip", "crop-flip"],
        default="auto",
        help="auto: crop-flip for image files, affine for the glyph world",
    )
    group.add_argument("--balanced", action="store_true", help="class-balanced sampling")
    group.add_argument(
        "--amp",
        choices=["auto", "bf16", "off"],
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
    group.add_argument(
        "--decode",
        choices=["auto", "pil", "tensor", "torchcodec", "torchvision"],
        default="auto",
        help="image files: Pillow threads, or decoded in batches on the device (nvJPEG on "
        "CUDA) by torchcodec or torchvision; tensor: torchcodec on CUDA when installed, "
        "else torchvision; auto: tensor on CUDA, pil on the CPU",
    )
    group.add_argument(
        "--loader-threads", type=int, default=8, help="Pillow decoding threads (image files)"
    )
    group.add_argument(
        "--cache",
        choices=["off", "auto", "cuda", "memory", "mmap"],
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


def job_settings_from_args(args: argparse.Namespace):
    """:class:`JobSettings` from the training options."""
    from receiver.job import JobSettings
    from trainer.training import TrainConfig

    config = TrainConfig(
        model=args.model,
        epochs=args.epochs,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
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


def _cmd_train(args: argparse.Namespace) -> int:
    import hashlib

    raw = read_payload_bytes(args.payload)  # read once: hashed, verified, trained
    sha256 = hashlib.sha256(raw).hexdigest()
    reference = reference_from_args(args)
    # every local argument is checked before the payload is accepted: a mistake here
    # must not use it up, nor leave an empty --out behind
    created = not Path(args.out).exists()
    try:
        out = writable_directory(args.out, "--out")
        holdout = task_images_for(args.holdout, reference, "holdout") if args.holdout else None
        settings = job_settings_from_args(args)  # from here on torch is loaded
        from receiver.job import claim_output_dir, job_identity

        claim_output_dir(out, job_identity(sha256, settings, reference), args.overwrite)
        again, policy, payload = _accept(args, raw, sha256, reference, settings, holdout, out)
    except PladaError:
        if created:
            with contextlib.suppress(OSError):
                Path(args.out).rmdir()
        raise
    from receiver.job import run_job, summarize

    verb = "accepted before on this device, training again" if again else "accepted"
    print(f"{verb}: {_origin(payload)}")
    report = run_job(
        args.payload,
        reference,
        out,
        settings,
        holdout,
        not args.quiet,
        trust=policy.without_freshness(),
        raw=raw,
        verified=payload,
    )
    print(summarize(report))
    print(f"report: {out / 'report.json'}")
    return 0


def _accept(
    args: argparse.Namespace,
    raw: bytes,
    sha256: str,
    reference: ReferenceSource,
    settings: JobSettings,
    holdout: LabeledImages | None,
    out: Path,
) -> tuple[bool, TrustPolicy, Payload]:
    """Verify the payload and check that it can train here; only then record it in the
    ledger. A payload accepted here before (another run, other settings, a failed job)
    trains again without the freshness checks, which are about acceptance. Returns
    (accepted before, the policy it passed, the payload)."""
    from receiver.job import check_trainable, started_with

    ledger = _ledger(args)
    try:
        again = (ledger is not None and ledger.was_accepted(sha256)) or started_with(out, sha256)
        policy = _policy(args, ledger)
        if again:
            policy = policy.without_freshness()
        payload = decode_payload(raw, reference=reference.manifest, trust=policy)
        check_job_size(payload, args.max_job_images, args.max_job_classes)
        check_trainable(payload, reference, settings, holdout)
        if payload.sender is not None and ledger is not None and not again:
            ledger.record(payload.sender.sender, payload.sender.sequence, sha256)
    finally:
        if ledger is not None:
            ledger.close()
    return again, policy, payload


def _trust_store_dir(args: argparse.Namespace) -> Path:
    trust_dir = Path(args.home) / "trust" if args.home else _trust_dir(args)
    if trust_dir is None:
        raise ConfigError(f"name the trust store: --trust DIR, --home HOME or ${TRUST_ENV}")
    return trust_dir


def _cmd_trust_add(args: argparse.Namespace) -> int:
    trust_dir = _trust_store_dir(args)
    for path in args.keys:
        key = SenderKey.load(path)
        written = add_key(trust_dir, key)
        print(f"trusted sender {key.sender}, key {key.key_id.hex()} ({written})")
    return 0


def _cmd_trust_remove(args: argparse.Namespace) -> int:
    removed = remove_keys(_trust_store_dir(args), args.selector)
    if not removed:
        raise ConfigError(f"no trusted key matches {args.selector!r}: see `trust list`")
    print(f"removed {len(removed)} key(s): " + ", ".join(p.name for p in removed))
    return 0


def _cmd_trust_reset_sequence(args: argparse.Namespace) -> int:
    path = Path(args.home) / LEDGER_FILE if args.home else _trust_store_dir(args) / LEDGER_FILE
    if not path.is_file():
        raise TrustStoreError(f"no sequence ledger at {path}: nothing to reset")
    ledger = SequenceLedger(path)
    try:
        forgotten = ledger.reset(args.sender)
    finally:
        ledger.close()
    if forgotten is None:
        raise ConfigError(f"the ledger {path} holds no sequence number of {args.sender!r}")
    print(
        f"forgot sequence {forgotten} of sender {args.sender} in {path}: its next payload is "
        "accepted whatever its sequence number, and replays are refused from then on"
    )
    return 0


def _cmd_trust_list(args: argparse.Namespace) -> int:
    trust_dir = _trust_store_dir(args)
    store = load_trust_store(trust_dir)
    for key in store:
        print(f"{key.sender}\t{key.key_id.hex()}\t{key.public_key.hex()}")
    print(f"{len(store)} trusted key(s) in {trust_dir}")
    return 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    from receiver.daemon import DaemonConfig, run_daemon
    from receiver.http_upload import HttpLimits

    config = DaemonConfig(
        home=args.home,
        inbox=args.inbox,
        reference=args.reference,
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        holdout=args.holdout,
        settings=job_settings_from_args(args),
        http_port=args.http_port,
        http=HttpLimits(args.http_max_connections, args.http_timeout_seconds),
        poll_seconds=args.poll_seconds,
        intake=IntakeSettings(
            settle_seconds=args.settle_seconds,
            reorder_seconds=args.reorder_seconds,
            max_bytes=args.max_payload_bytes,
            max_images=args.max_job_images,
            max_classes=args.max_job_classes,
            quarantine_max_files=args.quarantine_max_files,
            quarantine_max_bytes=int(args.quarantine_max_mb * 2**20),
        ),
        exit_when_idle=args.exit_when_idle,
        max_restarts=args.max_restarts,
        trust_dir=args.trust,
        trust=trust_options_from_args(args),
        accept_empty_ledger=args.accept_empty_ledger,
        reply_outbox=args.reply_outbox,
        reply_progress_seconds=args.reply_progress_seconds,
    )
    return run_daemon(config)


def _cmd_reply_key(args: argparse.Namespace) -> int:
    from receiver.reply_outbox import REPLY_KEY_FILE, reply_key

    home = writable_directory(args.home, "--home")
    key = reply_key(home)
    print(
        f"reply key of {home / REPLY_KEY_FILE}; give it to the ground station as the file of "
        "`plada-send frames --reply-key`",
        file=sys.stderr,
    )
    print(key.hex())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    return print_status(args.home, as_json=args.json)


def _cmd_retry(args: argparse.Namespace) -> int:
    queue = open_home_queue(args.home)
    try:
        job = queue.get(args.job)
        if job is None or job.state != "failed":
            state = "does not exist" if job is None else f"is {job.state}, not failed"
            raise ConfigError(f"job {args.job} {state}: only failed jobs can be retried")
        queue.retry(args.job)
    finally:
        queue.close()
    print(f"job {args.job} queued again; a running daemon resumes it from its last checkpoint")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plada-receive", description=description(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("reference", help="build or verify the local reference set")
    add_reference_options(ref)
    ref.set_defaults(func=print_reference)

    verify = sub.add_parser("verify", help="verify a payload against the local reference set")
    verify.add_argument("payload", help="the payload file (.plada)")
    add_reference_options(verify)
    add_trust_options(verify)
    verify.set_defaults(func=_cmd_verify)

    train = sub.add_parser("train", help="train a student from a payload")
    train.add_argument("payload", help="the payload file (.plada)")
    add_reference_options(train)
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
    train.set_defaults(func=_cmd_train)

    daemon = sub.add_parser("daemon", help="watch an inbox and train every accepted payload")
    daemon.add_argument(
        "--home", required=True, help="state directory: queue, spool, quarantine, results, logs"
    )
    daemon.add_argument("--inbox", help="where payload files arrive (default HOME/inbox)")
    add_reference_options(daemon)
    daemon.add_argument("--holdout", help="labeled images to evaluate every job on")
    daemon.add_argument(
        "--http-port", type=int, default=0, help="also accept uploads on 127.0.0.1:PORT (0: off)"
    )
    daemon.add_argument(
        "--poll-seconds", type=float, default=1.0, help="how often the inbox and queue are read"
    )
    daemon.add_argument(
        "--settle-seconds",
        type=float,
        default=2.0,
        help="a file must be unchanged this long before it is read",
    )
    daemon.add_argument(
        "--reorder-seconds",
        type=float,
        default=DEFAULT_INTAKE.reorder_seconds,
        help="a verified payload waits this long, so that older ones of its sender that "
        "arrive just after it are accepted first",
    )
    daemon.add_argument(
        "--max-payload-bytes",
        type=int,
        default=DEFAULT_INTAKE.max_bytes,
        help="refuse inbox files and uploads larger than this",
    )
    daemon.add_argument(
        "--quarantine-max-files",
        type=int,
        default=DEFAULT_INTAKE.quarantine_max_files,
        help="quarantine quota: the oldest entries are purged beyond it",
    )
    daemon.add_argument(
        "--quarantine-max-mb",
        type=float,
        default=DEFAULT_INTAKE.quarantine_max_bytes / 2**20,
        help="quarantine quota in MiB: the oldest entries are purged beyond it",
    )
    daemon.add_argument(
        "--http-max-connections",
        type=int,
        default=16,
        help="requests served at once; more are answered 503",
    )
    daemon.add_argument(
        "--http-timeout-seconds",
        type=float,
        default=10.0,
        help="an HTTP client silent this long is disconnected",
    )
    daemon.add_argument(
        "--accept-empty-ledger",
        action="store_true",
        help="start even though the sequence ledger is lost and cannot be rebuilt (old "
        "payloads would be accepted again)",
    )
    daemon.add_argument(
        "--reply-outbox",
        help="write a 24-byte reply per frames transfer here (held/needed, then done), "
        "for an uplink to send; MACed with HOME/reply.key (see `plada-receive reply-key`)",
    )
    daemon.add_argument(
        "--reply-progress-seconds",
        type=float,
        default=30.0,
        help="at most one held/needed reply per transfer this often",
    )
    daemon.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="fail a job that crashed the daemon this often without progress",
    )
    daemon.add_argument(
        "--exit-when-idle",
        action="store_true",
        help="exit once the inbox and queue are empty (batch use, tests)",
    )
    add_trust_options(daemon, daemon=True)
    add_training_options(daemon)
    daemon.set_defaults(func=_cmd_daemon)

    key = sub.add_parser(
        "reply-key", help="print the key this device MACs its replies with (made if missing)"
    )
    key.add_argument("--home", required=True, help="the daemon's state directory")
    key.set_defaults(func=_cmd_reply_key)

    status = sub.add_parser("status", help="queue, current job, progress and throughput")
    status.add_argument("--home", required=True, help="the daemon's home")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_cmd_status)

    retry = sub.add_parser(
        "retry", help="queue a failed job again", description="Queue a failed job again."
    )
    retry.add_argument("--home", required=True, help="the daemon's home")
    retry.add_argument("job", type=int, help="the job's number, as `plada-receive status` lists it")
    retry.set_defaults(func=_cmd_retry)

    trust = sub.add_parser("trust", help="list, add or remove trusted sender keys")
    actions = trust.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="trust the senders of these public keys")
    add.add_argument("keys", nargs="+", metavar="KEY.pub", help="public key files (keygen)")
    add.set_defaults(func=_cmd_trust_add)
    remove = actions.add_parser("remove", help="stop trusting a sender or one of its keys")
    remove.add_argument("selector", metavar="SENDER|KEYID", help="a sender id or a key id (hex)")
    remove.set_defaults(func=_cmd_trust_remove)
    listing = actions.add_parser("list", help="the trusted keys")
    listing.set_defaults(func=_cmd_trust_list)
    reset = actions.add_parser(
        "reset-sequence",
        help="forget a sender's last accepted sequence number (after a lockout)",
    )
    reset.add_argument("sender", metavar="SENDER", help="the sender id")
    reset.set_defaults(func=_cmd_trust_reset_sequence)
    for command in (add, remove, listing, reset):
        where = command.add_mutually_exclusive_group()
        where.add_argument("--trust", help=f"trust store directory (default ${TRUST_ENV})")
        where.add_argument("--home", help="a daemon's home: its trust store HOME/trust")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one-line messages and exit status 2."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
