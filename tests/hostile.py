"""Shared pieces of the hostile-receiver tests: a reference manifest, signed payloads,
and an intake wired to a daemon home the way the daemon wires it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from protocol.manifest import ReferenceManifest
from protocol.payload import BODY_CODING, Payload, SenderStamp, encode_payload
from protocol.signing import SigningKey
from receiver.intake import Intake, IntakeSettings
from receiver.job_queue import JobQueue
from receiver.ledger import open_home_ledger
from receiver.trust_store import TrustOptions, add_key
from receiver.workers import WorkerLock

MANIFEST = ReferenceManifest.from_unsorted(
    "hostile-ref", [f"n{block:03d}/img{i:04d}" for block in range(20) for i in range(50)]
)
SENDERS = {name: SigningKey.generate(name) for name in ("station-a", "station-b", "station-c")}


def signed_payload(
    sender: str = "station-a",
    sequence: int | None = None,
    task: str = "task",
    count: int = 40,
    classes: int = 4,
    audience: str | None = None,
    expires_in: int = 86400,
    seed: int = 0,
) -> bytes:
    """A valid payload of ``sender`` for :data:`MANIFEST` (sequence: now in ms)."""
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.choice(len(MANIFEST), count, replace=False))
    now = int(time.time())
    payload = Payload(
        task,
        MANIFEST.name,
        MANIFEST.fingerprint,
        len(MANIFEST),
        tuple(f"class-{c}" for c in range(classes)),
        indices,
        rng.integers(0, classes, count),
        created=now,
        sender=SenderStamp(sender, sequence or int(time.time() * 1000), now + expires_in, audience),
    )
    return encode_payload(payload, codings=(BODY_CODING,), signer=SENDERS[sender])


def make_intake(home: Path, trust: TrustOptions | None = None, **settings: float | int) -> Intake:
    """An intake over ``home`` (inbox HOME/inbox, every test sender trusted)."""
    home.mkdir(parents=True, exist_ok=True)
    for key in SENDERS.values():
        add_key(home / "trust", key.public)
    queue = JobQueue(home / "queue.sqlite", check=True)
    ledger = open_home_ledger(home, queue.signed_history(), has_history=False)
    options = {"settle_seconds": 0.0, "reorder_seconds": 0.0} | settings
    intake = IntakeSettings(**options, trust=trust or TrustOptions())
    return Intake(home, home / "inbox", MANIFEST, queue, ledger, WorkerLock(home), intake)


def reasons(home: Path) -> dict[str, str]:
    """Original name -> error type of every quarantined entry."""
    import json

    records = [json.loads(p.read_text()) for p in (home / "quarantine").glob("*.reason.json")]
    return {record["file"]: record["error"] for record in records}


def jobs(intake: Intake) -> list[tuple[str, int | None]]:
    """(source name, sequence) of every job, oldest first."""
    return [(job.source_name, job.sequence) for job in reversed(intake.queue.jobs(1000))]
