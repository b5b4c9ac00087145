"""The daemon's health file and the ``plada-receive status`` view of a daemon home.

The daemon rewrites ``<home>/health.json`` (atomically, at most once a second while
training) with its state, current job, progress and throughput. ``status`` combines
it with the job queue, the quarantine and the live worker locks, so it also tells
the truth about a daemon that died without a chance to update its file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError, StorageError
from protocol.timestamps import duration_text
from receiver.job_queue import JobQueue
from receiver.job_report import REPORT_FILE
from receiver.ledger import LEDGER_FILE, SequenceLedger
from receiver.workers import live_owners

HEALTH_FILE = "health.json"
QUEUE_FILE = "queue.sqlite"


class HealthFile:
    """The current health document of one daemon, written atomically when it changes."""

    def __init__(self, path: Path, min_interval: float = 1.0, **fields: Any) -> None:
        self.path = path
        self.min_interval = min_interval
        self.document: dict[str, Any] = {"pid": os.getpid(), "started": time.time(), **fields}
        self._lock = threading.Lock()
        self._written = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        """Merge ``fields`` and write the file unless it was written less than a second ago."""
        with self._lock:
            self.document.update(fields)
            now = time.time()
            if not force and now - self._written < self.min_interval:
                return
            self.document["updated"] = now
            try:
                write_json_atomic(self.path, self.document)
            except StorageError:  # best effort: a full disk must not stop the work
                return
            self._written = now


def open_home_queue(home: str | Path) -> JobQueue:
    """The job queue of an existing daemon home (``ConfigError`` if there is none)."""
    path = Path(home) / QUEUE_FILE
    if not path.is_file():
        raise ConfigError(f"{home} is not a daemon home (no {QUEUE_FILE}): start the daemon there")
    return JobQueue(path)


STALL_SECONDS = 120.0  # an intake pass reads every waiting file; none should take this long


def collect_status(home: str | Path, recent: int = 10) -> dict[str, Any]:
    """Everything ``status`` shows, as one JSON-ready dict."""
    home = Path(home)
    queue = open_home_queue(home)
    try:
        counts = queue.counts()
        jobs = [job.as_dict() for job in queue.jobs(recent)]
    finally:
        queue.close()
    ledger = SequenceLedger(home / LEDGER_FILE, read_only=True)
    try:
        senders = [asdict(row) for row in ledger.senders()]
    finally:
        ledger.close()
    try:
        health = json.loads((home / HEALTH_FILE).read_text())
    except (OSError, ValueError):
        health = {}
    owners = live_owners(home / "workers")
    for job in jobs:
        job["coverage"] = _coverage_of(job)
    for job in jobs:  # its daemon died (kill -9, power cut): requeued when one starts
        if job["state"] == "running" and job.get("owner") not in owners:
            job["state"] = "interrupted"
    quarantine = home / "quarantine"
    quarantined = _by_age(quarantine.glob("*.reason.json")) if quarantine.is_dir() else []
    reasons = []
    for path in quarantined[-recent:]:
        try:
            reasons.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return {
        "home": str(home),
        "daemons_running": owners,
        "health": health,
        "intake_stalled_seconds": intake_stalled_seconds(health) if owners else None,
        "queue": counts,
        "jobs": jobs,
        "senders": senders,
        "quarantined": len(quarantined),
        "recent_quarantine": reasons,
    }


def _coverage_of(job: dict[str, Any]) -> dict[str, Any] | None:
    """A finished job's coverage (its report's), where its copy was partial."""
    if job["state"] != "done" or not job.get("result_dir"):
        return None
    try:
        report = json.loads((Path(job["result_dir"]) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    coverage = report.get("coverage") if isinstance(report, dict) else None
    return coverage if isinstance(coverage, dict) else None


def _by_age(paths) -> list[Path]:
    """Oldest first, by modification time (files that vanish meanwhile are left out)."""
    dated = []
    for path in paths:
        try:
            dated.append((path.stat().st_mtime, path.name, path))
        except OSError:
            continue
    return [path for _, _, path in sorted(dated)]


def intake_stalled_seconds(health: dict[str, Any], now: float | None = None) -> float | None:
    """How long the intake thread has not finished a pass, when that is far longer than
    its poll interval (a thread stuck on a file, say); None while it keeps passing. The
    health file stays fresh without it: the job loop writes it too."""
    passed = health.get("intake_pass_at")
    if passed is None:
        return None
    age = (time.time() if now is None else now) - float(passed)
    limit = max(STALL_SECONDS, 10 * float(health.get("intake_poll_seconds", 1.0)))
    return age if age > limit else None


def render_status(status: dict[str, Any]) -> str:
    """Human-readable lines for a terminal."""
    health = status["health"]
    running = status["daemons_running"]
    lines = [f"daemon home {status['home']}"]
    if running:
        age = time.time() - float(health.get("updated", 0))
        lines.append(
            f"daemon running ({', '.join(running)}); state {health.get('state', '?')}, "
            f"health updated {age:.0f}s ago"
        )
    else:
        lines.append("daemon NOT running (no live worker lock); queued jobs wait for it")
    stalled = status.get("intake_stalled_seconds")
    if stalled is not None:
        lines.append(
            f"INTAKE STALLED: no intake pass finished for {stalled:.0f}s (payloads and frames "
            "are not taken in); see the daemon's log, then restart it"
        )
    held = (health.get("reference") or {}).get("present")
    if held is not None:
        size = health["reference"].get("size") or 1
        lines.append(
            f"reference copy: {held} of {size} canonical images present "
            f"({100 * held / size:.2f}%; --canonical)"
        )
    current = health.get("current") if running else None
    if current:
        lines.append(
            f"training job {current['job']} ({current['task']}), seed {current['seed']}: "
            f"step {current['step']}/{current['total_steps']} epoch {current['epoch']}, "
            f"loss {current['loss']:.3f}, {current['images_per_second']:.0f} img/s, "
            f"eta {duration_text(current.get('eta_seconds'))}"
            + (f", resumed at step {current['resumed_from']}" if current["resumed_from"] else "")
        )
    counts = status["queue"]
    lines.append(
        "queue: "
        + ", ".join(f"{counts[s]} {s}" for s in counts)
        + f"; {status['quarantined']} quarantined"
    )
    quota = (health.get("intake") or {}).get("quarantine")
    if quota:
        lines.append(
            f"quarantine: {quota['files']} of {quota['max_files']} files, "
            f"{quota['bytes'] / 2**20:.1f} of {quota['max_bytes'] / 2**20:.0f} MiB; "
            f"{quota['purged']} oldest purged"
        )
    for transfer in health.get("transfers") or []:
        lines.append(
            f"transfer {transfer['transfer']}: {transfer['held']} of {transfer['needed']} "
            f"frames held ({transfer['bytes']} B), first {transfer['first_seen']}, "
            f"last {transfer['last_seen']}"
        )
    skipped = (health.get("intake") or {}).get("skipped")
    if skipped:
        lines.append(f"inbox: {skipped} entries could not be claimed (see the log)")
    if status["jobs"]:
        lines.append(f"{'job':>5} {'state':11} {'images':>8}  task / result")
        for job in status["jobs"]:
            detail = job["result_dir"] or job["error"] or job["source_name"]
            coverage = job.get("coverage")
            if coverage and coverage.get("present") != coverage.get("kept"):
                detail += (
                    f" (coverage {coverage['present']}/{coverage['kept']}, least class "
                    f"{100 * float(coverage.get('worst_class_share', 0)):.0f}%)"
                )
            lines.append(
                f"{job['id']:>5} {job['state']:11} {job['images']:>8}  {job['task']}: {detail}"
            )
    for sender in status["senders"]:
        lines.append(
            f"sender {sender['sender']}: last accepted sequence {sender['sequence']} "
            f"({sender['accepted']})"
        )
    for reason in status["recent_quarantine"][-3:]:
        name = reason["file"] if len(reason["file"]) <= 60 else reason["file"][:57] + "..."
        lines.append(f"quarantined {name}: {reason['error']}: {reason['message']}")
    return "\n".join(lines)


def print_status(home: str | Path, as_json: bool = False) -> int:
    """The ``status`` subcommand."""
    status = collect_status(home)
    print(json.dumps(status, indent=2, default=str) if as_json else render_status(status))
    return 0
