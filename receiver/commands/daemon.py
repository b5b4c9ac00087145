"""``plada-receive daemon``, ``status``, ``retry`` and ``reply-key``: the unattended
receiver and the commands that look after it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plada_cli import add_reference_options, reference_location
from protocol.atomic_files import writable_directory
from protocol.errors import ConfigError
from receiver.commands.options import (
    Subparsers,
    add_training_options,
    add_trust_options,
    coverage_rule,
    job_settings,
    trust_options,
)
from receiver.intake import IntakeSettings
from receiver.status import open_home_queue, print_status

DEFAULT_INTAKE = IntakeSettings()


def add_daemon(sub: Subparsers) -> None:
    daemon = sub.add_parser("daemon", help="watch an inbox and train every accepted payload")
    daemon.add_argument(
        "--home", required=True, help="state directory: queue, spool, quarantine, results, logs"
    )
    daemon.add_argument("--inbox", help="where payload files arrive (default HOME/inbox)")
    add_reference_options(daemon, canonical=True)
    daemon.add_argument("--holdout", help="labeled images to evaluate every job on")
    daemon.add_argument(
        "--poll-seconds", type=float, default=1.0, help="how often the inbox and queue are read"
    )
    _add_intake_options(daemon)
    _add_http_options(daemon)
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
        "--link-key",
        metavar="FILE",
        help="take only frames tagged with this link key (the ground station's `plada-send "
        "link-key`): forged frames are dropped before they reach a decoder",
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
    daemon.set_defaults(func=_run_daemon)


def _add_intake_options(daemon: argparse.ArgumentParser) -> None:
    intake = daemon.add_argument_group("intake")
    intake.add_argument(
        "--settle-seconds",
        type=float,
        default=DEFAULT_INTAKE.settle_seconds,
        help="a file must be unchanged this long before it is read",
    )
    intake.add_argument(
        "--reorder-seconds",
        type=float,
        default=DEFAULT_INTAKE.reorder_seconds,
        help="a verified payload waits this long, so that older ones of its sender that "
        "arrive just after it are accepted first",
    )
    intake.add_argument(
        "--max-payload-bytes",
        type=int,
        default=DEFAULT_INTAKE.max_bytes,
        help="refuse inbox files and uploads larger than this",
    )
    intake.add_argument(
        "--quarantine-max-files",
        type=int,
        default=DEFAULT_INTAKE.quarantine_max_files,
        help="quarantine quota: the oldest entries are purged beyond it",
    )
    intake.add_argument(
        "--quarantine-max-mb",
        type=float,
        default=DEFAULT_INTAKE.quarantine_max_bytes / 2**20,
        help="quarantine quota in MiB: the oldest entries are purged beyond it",
    )


def _add_http_options(daemon: argparse.ArgumentParser) -> None:
    http = daemon.add_argument_group("HTTP uploads")
    http.add_argument(
        "--http-port", type=int, default=0, help="also accept uploads on 127.0.0.1:PORT (0: off)"
    )
    http.add_argument(
        "--http-max-connections",
        type=int,
        default=16,
        help="requests served at once; more are answered 503",
    )
    http.add_argument(
        "--http-timeout-seconds",
        type=float,
        default=10.0,
        help="an HTTP client silent this long is disconnected",
    )


def _intake_settings(args: argparse.Namespace) -> IntakeSettings:
    return IntakeSettings(
        settle_seconds=args.settle_seconds,
        reorder_seconds=args.reorder_seconds,
        max_bytes=args.max_payload_bytes,
        max_images=args.max_job_images,
        max_classes=args.max_job_classes,
        quarantine_max_files=args.quarantine_max_files,
        quarantine_max_bytes=int(args.quarantine_max_mb * 2**20),
        trust_dir=Path(args.trust) if args.trust else None,  # default HOME/trust
        trust=trust_options(args),
        coverage=coverage_rule(args),
    )


def _run_daemon(args: argparse.Namespace) -> int:
    from receiver.daemon import DaemonConfig, run_daemon
    from receiver.http_upload import HttpLimits

    writable_directory(args.home, "--home")
    config = DaemonConfig(
        home=args.home,
        reference=reference_location(args),
        inbox=args.inbox,
        holdout=args.holdout,
        settings=job_settings(args),
        http_port=args.http_port,
        http=HttpLimits(args.http_max_connections, args.http_timeout_seconds),
        poll_seconds=args.poll_seconds,
        intake=_intake_settings(args),
        exit_when_idle=args.exit_when_idle,
        max_restarts=args.max_restarts,
        accept_empty_ledger=args.accept_empty_ledger,
        reply_outbox=args.reply_outbox,
        reply_progress_seconds=args.reply_progress_seconds,
        link_key=args.link_key,
    )
    return run_daemon(config)


def add_reply_key(sub: Subparsers) -> None:
    key = sub.add_parser(
        "reply-key", help="print the key this device MACs its replies with (made if missing)"
    )
    key.add_argument("--home", required=True, help="the daemon's state directory")
    key.set_defaults(func=_run_reply_key)


def _run_reply_key(args: argparse.Namespace) -> int:
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


def add_status(sub: Subparsers) -> None:
    status = sub.add_parser("status", help="queue, current job, progress and throughput")
    status.add_argument("--home", required=True, help="the daemon's home")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=lambda args: print_status(args.home, as_json=args.json))


def add_retry(sub: Subparsers) -> None:
    retry = sub.add_parser(
        "retry", help="queue a failed job again", description="Queue a failed job again."
    )
    retry.add_argument("--home", required=True, help="the daemon's home")
    retry.add_argument("job", type=int, help="the job's number, as `plada-receive status` lists it")
    retry.set_defaults(func=_run_retry)


def _run_retry(args: argparse.Namespace) -> int:
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
