"""The acceptance order of an incoming payload, in one place.

As python-tuf's trusted set owns the order of its updates, :class:`Acceptance` owns the
order in which a payload is judged, and every way a payload comes in goes through it:
``plada-receive verify`` and ``train``, the daemon's intake, and a spooled payload
when its job starts:

1. whether this device accepted these bytes before (its ledger, or the caller's own
   evidence): then they are checked again without the freshness rules (a resumed
   intake, a job trained again), or refused as a replay where each payload is taken
   once (the daemon's intake);
2. the byte cap and the framing, then the trust policy over the raw bytes: signature,
   audience, expiry, replay and rollback against the ledger's last sequence numbers;
3. the header, the body, the reference set's fingerprint and the content digest;
4. this device's caps per job (images, classes), and where its copy of the reference
   set is partial, how many of the kept images it holds (:class:`CoverageRule`);
5. the caller's local checks (``train``: the holdout, the model and its weights).

It is pure: the trust store, the rules, the ledger's view and the clock come in; an
:class:`AcceptedPayload` or a typed refusal comes out. The caller's two I/O steps are
one function each: reading the bytes, hashed once (:func:`read_received`), and
recording an acceptance in the ledger (:func:`record_acceptance`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from protocol.availability import Availability, Coverage, coverage_of
from protocol.errors import PayloadLimitError, ReplayError
from protocol.manifest import ReferenceManifest
from protocol.payload import (
    MAX_PAYLOAD_BYTES,
    Payload,
    check_framing,
    decode_payload,
    read_payload_bytes,
)
from protocol.trust import TrustPolicy, TrustStore
from receiver.errors import CoverageError
from receiver.ledger import SequenceLedger
from receiver.trust_store import TrustOptions, load_trust_store

DEFAULT_MAX_IMAGES = 2_000_000  # per job
DEFAULT_MAX_CLASSES = 10_000


@dataclass(frozen=True)
class Received:
    """A payload's bytes as they arrived, hashed once, and where they came from."""

    data: bytes
    sha256: str
    source: str  # a file name, or how it came (an upload, a spooled job)

    @classmethod
    def of(cls, data: bytes, source: str) -> Received:
        return cls(data, hashlib.sha256(data).hexdigest(), source)


def read_received(path: str | os.PathLike[str], max_bytes: int = MAX_PAYLOAD_BYTES) -> Received:
    """The bytes of a payload file, hashed once (a missing, unreadable, oversized, empty
    or torn file is a ``PayloadError``, before any reference set is opened)."""
    data = read_payload_bytes(path, max_bytes)
    check_framing(data, max_bytes)
    return Received.of(data, str(path))


class AcceptanceHistory(Protocol):
    """What acceptance reads of the ledger (:class:`receiver.ledger.SequenceLedger`)."""

    def last(self, sender: str) -> int | None: ...

    def intake_name_of(self, sha256: str) -> str | bool | None: ...


@dataclass(frozen=True)
class CoverageRule:
    """How much of a payload's kept images a partial copy must hold to train it: a share
    overall, and a share in every class (a class short of its images trains a student
    that barely knows it; the overall share bounds how far the student can fall).

    Defaults: 98% overall, 90% per class. Losing 2% of the kept images at random costs a
    student about what 2% fewer kept images cost, within the spread between student
    seeds (benchmarks/fleet_copies.py); a safety-net class with 20 kept images may miss
    2 of them. Below either, the payload is refused before it is recorded, so it trains
    once the files are back."""

    min_overall: float = 0.98
    min_class: float = 0.90

    def check(self, coverage: Coverage) -> None:
        """``CoverageError`` naming the shortfall and the fix, below either share."""
        name, share = coverage.worst_class()
        if coverage.overall >= self.min_overall and share >= self.min_class:
            return
        raise CoverageError(
            f"this device holds {coverage.present} of the payload's {coverage.kept} images "
            f"({100 * coverage.overall:.1f}%; class {name!r} {100 * share:.1f}%), under "
            f"--min-coverage {100 * self.min_overall:g}% overall and "
            f"{100 * self.min_class:g}% per class: restore the missing reference images "
            "(plada-receive reference --canonical lists them), or have the sender restrict "
            "the selection to this device's release (plada-send fleet add, select --fleet)"
        )


def payload_coverage(payload: Payload, availability: Availability | None) -> Coverage:
    """How many of ``payload``'s kept images a copy with ``availability`` holds (all of
    them without one)."""
    present = (
        np.ones(payload.reference_size, bool) if availability is None else availability.present
    )
    return coverage_of(present, payload.indices, payload.labels, payload.class_names)


@dataclass(frozen=True)
class AcceptanceRules:
    """What this device takes in: its trust options and caps, and what a payload it
    accepted before is (``retrain``: taken again without the freshness rules, as
    ``plada-receive train`` does; else a replay, unless it is the same intake file)."""

    trust: TrustOptions = field(default_factory=TrustOptions)
    max_bytes: int = MAX_PAYLOAD_BYTES
    max_images: int = DEFAULT_MAX_IMAGES
    max_classes: int = DEFAULT_MAX_CLASSES
    retrain: bool = True
    coverage: CoverageRule = field(default_factory=CoverageRule)


@dataclass(frozen=True)
class AcceptedPayload:
    """A payload that passed every check, with the bytes it was decoded from."""

    received: Received
    payload: Payload
    again: bool  # accepted on this device before: freshness not checked, not recorded again

    @property
    def sha256(self) -> str:
        return self.received.sha256


def check_job_size(payload: Payload, max_images: int, max_classes: int) -> None:
    """``PayloadLimitError`` if the payload asks for more images or classes per job than
    this device takes (checked before anything trains)."""
    if payload.count > max_images or len(payload.class_names) > max_classes:
        raise PayloadLimitError(
            f"the job asks for {payload.count} images in {len(payload.class_names)} classes; "
            f"this device takes at most {max_images} images and {max_classes} classes per "
            "job (--max-job-images, --max-job-classes)"
        )


class Acceptance:
    """Judges payloads for one reference set under one trust store and ledger view."""

    def __init__(
        self,
        store: TrustStore,
        rules: AcceptanceRules,
        history: AcceptanceHistory | None,
        manifest: ReferenceManifest,
        availability: Availability | None = None,
    ) -> None:
        options = rules.trust
        self.rules, self.history, self.manifest = rules, history, manifest
        self.availability = availability  # a partial copy's rows; None: the whole set
        self.policy = TrustPolicy(
            store,
            options.allow_unsigned,
            options.check_expiry,
            clock=options.clock,
            last_sequence=None if history is None else history.last,
            audiences=options.audiences,
            require_audience=options.require_audience,
            max_lifetime=options.max_lifetime,
            max_clock_ahead=options.max_clock_ahead,
        )

    def examine(
        self,
        received: Received,
        *,
        claim: str | None = None,
        known: bool = False,
        check: Callable[[Payload], None] | None = None,
    ) -> AcceptedPayload:
        """Judge ``received`` in the acceptance order (module docstring). ``claim``: the
        intake file it is read from; ``known``: the caller knows this device took it
        before; ``check``: the caller's local checks, last."""
        again = known or self.accepted_before(received, claim)
        policy = self.policy.without_freshness() if again else self.policy
        payload = decode_payload(
            received.data, self.rules.max_bytes, reference=self.manifest, trust=policy
        )
        check_job_size(payload, self.rules.max_images, self.rules.max_classes)
        if self.availability is not None:
            self.rules.coverage.check(payload_coverage(payload, self.availability))
        if check is not None:
            check(payload)
        return AcceptedPayload(received, payload, again)

    def accepted_before(self, received: Received, claim: str | None = None) -> bool:
        """Whether the ledger holds these bytes; a ``ReplayError`` where a payload is taken
        once (and this is not the same intake file, resumed)."""
        recorded = False if self.history is None else self.history.intake_name_of(received.sha256)
        if recorded is False:
            return False
        if self.rules.retrain or (claim is not None and recorded == claim):
            return True
        raise ReplayError(
            f"{received.source} is a copy of a payload this device accepted before: a replay; "
            "not trained again"
        )


def open_acceptance(
    trust_dir: str | os.PathLike[str] | None,
    rules: AcceptanceRules,
    history: AcceptanceHistory | None,
    manifest: ReferenceManifest,
    availability: Availability | None = None,
) -> Acceptance:
    """An :class:`Acceptance` over the keys of the trust store ``trust_dir`` (None: it
    trusts nobody); reading the store is the only I/O."""
    store = load_trust_store(Path(trust_dir)) if trust_dir is not None else TrustStore()
    return Acceptance(store, rules, history, manifest, availability)


def record_acceptance(
    ledger: SequenceLedger, accepted: AcceptedPayload, intake_name: str | None = None
) -> None:
    """Record a new signed payload's sequence number (and its digest, and the intake file
    it came from) in the ledger; ``ReplayError``/``RollbackError`` if another process
    accepted a newer one first. Unsigned payloads and payloads taken again record nothing."""
    stamp = accepted.payload.sender
    if stamp is None or accepted.again:
        return
    ledger.record(stamp.sender, stamp.sequence, accepted.sha256, intake_name)
