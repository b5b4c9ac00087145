"""One selection from a scored work directory, written as a (signed) payload.

``make_payload`` reads a work directory (``plada-send score``) as often as needed, e.g.
to try keep fractions against a byte budget. The selection is either given (strategy,
score, keep, ...) or the plan's best candidate within the budget (:func:`planned`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError
from protocol.payload import Payload, information_bound_bytes, selection_text, write_payload
from protocol.reference.base import ReferenceSource
from protocol.reference.factory import ReferenceLocation
from sender.errors import BudgetError
from sender.scoring.work_dir import recorded_reference
from sender.selection.consensus import consensus_outliers
from sender.selection.fleet import FleetChoice
from sender.selection.plan_file import choose, load_plan
from sender.selection.scored_work import LeakageReport, LeakageRule, ScoredWork
from sender.selection.strategies import SelectionConfig
from sender.signer import PayloadSigner, parse_duration

MIN_IMAGES_PER_CLASS = 10  # fewer, on average, is worth a warning


@dataclass(frozen=True)
class ConsensusRule:
    """Drop kept images whose ``k`` nearest kept neighbours agree with their label less
    than ``agreement`` of the time, and refill (0: off; see :mod:`.consensus`)."""

    k: int = 0
    agreement: float = 0.5


@dataclass(frozen=True)
class PlannedChoice:
    """The plan's candidate a payload was made from."""

    candidate: str
    predicted_accuracy: float
    planned_bytes: int
    budget_bytes: int | None
    fleet: FleetChoice | None = None  # the releases the plan's candidates suit
    fleet_digest: str | None = None  # ... as they were when it planned


@dataclass(frozen=True)
class Selection:
    """What to keep: a configuration and a score (None: the work directory's best), the
    leakage and consensus rules, and the plan's choice it came from, if any."""

    config: SelectionConfig = field(default_factory=SelectionConfig)
    score: str | None = None
    leakage: LeakageRule = field(default_factory=LeakageRule)
    consensus: ConsensusRule = field(default_factory=ConsensusRule)
    planned: PlannedChoice | None = None
    fleet: FleetChoice | None = None  # keep only rows every release it names holds


@dataclass(frozen=True)
class PayloadOptions:
    """How the payload is written: its task id, signer, byte budget and contact sheet."""

    task_id: str | None = None
    signer: PayloadSigner | None = None  # None: unsigned (development only)
    max_bytes: int | None = None  # refuse (write nothing) above this
    sheet: ContactSheet | None = None


@dataclass(frozen=True)
class ContactSheet:
    """Where the selection's contact sheet is drawn from, and to."""

    reference: ReferenceSource
    path: Path


@dataclass(frozen=True)
class SignatureSummary:
    sender: str
    key_id: str
    sequence: int
    expires: int


@dataclass(frozen=True)
class ConsensusReport:
    k: int
    min_agreement: float
    dropped: int


@dataclass
class PayloadSummary:
    """What ``make_payload`` wrote (``select --json`` writes it as JSON)."""

    payload: str
    payload_bytes: int
    kept: int
    keep_fraction: float
    body_coding: dict[str, str | int]
    signed: SignatureSummary | None
    selection: dict[str, str | float]
    unreadable_excluded: int
    class_histogram: dict[str, int]
    information_bound_bytes: float
    leakage: LeakageReport | None
    consensus: ConsensusReport | None
    warnings: list[str]
    contact_sheet: dict[str, str] | None  # {"file": PNG} or {"skipped": why}
    plan: PlannedChoice | None = None
    fleet: dict[str, object] | None = None  # the releases it suits (FleetRestriction)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(Path(path), asdict(self))


def byte_budget(max_bytes: int | None, link_bps: float | None, window: str | None) -> int | None:
    """The byte budget: ``max_bytes``, or what a link of ``link_bps`` carries while it is
    up (``window``: seconds or 30m / 2h); None without either. Typed errors for a
    half-given link."""
    if max_bytes is not None and link_bps is not None:
        raise ConfigError("give --max-bytes or --link-bps/--window, not both")
    if link_bps is not None:
        if window is None:
            raise ConfigError("--link-bps needs --window (how long the link is up, e.g. 20m)")
        if link_bps <= 0:
            raise ConfigError(f"--link-bps must be positive, not {link_bps}")
        return int(link_bps * parse_duration(window) / 8)
    if window is not None:
        raise ConfigError("--window needs --link-bps (the link's rate in bits per second)")
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"--max-bytes must be positive, not {max_bytes}")
    return max_bytes


def planned(
    plan_path: str | os.PathLike[str], work_dir: str | os.PathLike[str], budget: int | None
) -> tuple[SelectionConfig, str, PlannedChoice]:
    """The plan's choice within ``budget`` (its rule and noise band): its configuration,
    score and record."""
    plan = load_plan(plan_path, work_dir)
    row = choose(plan.candidates, budget, plan.choice_band)
    fleet, digest = None, None
    if plan.fleet is not None:
        recorded = plan.settings["fleet"]
        fleet = FleetChoice(str(recorded["folder"]), tuple(plan.fleet["releases"]))
        digest = str(plan.fleet["digest"])
    choice = PlannedChoice(
        row.name, row.predicted_accuracy, row.payload_bytes, budget, fleet, digest
    )
    return row.candidate.config(), row.candidate.score, choice


def contact_sheet_target(
    work_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    reference: str | None = None,
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> ContactSheet | None:
    """Where select draws the contact sheet: the reference set ``reference`` names, else
    the one ``score`` recorded in the work directory (with the cache and image size it
    recorded, unless given); None without either. A ``PladaError`` when the set cannot be
    read."""
    recorded = recorded_reference(work_dir)
    spec = reference or (recorded.spec if recorded else None)
    if spec is None:
        return None
    size = image_size or (recorded.image_size if recorded else 64)
    if cache_dir is None and recorded is not None and not reference:
        cache_dir = recorded.cache_dir
    out = Path(out)
    location = ReferenceLocation(spec, cache_dir, size)
    return ContactSheet(location.open(), out.with_name(f"{out.stem}.selection.png"))


def make_payload(
    work_dir: str | os.PathLike[str],
    selection: Selection,
    out_path: str | os.PathLike[str],
    options: PayloadOptions | None = None,
) -> PayloadSummary:
    """Select from a scored work directory, write the payload, and return a summary.

    With a signer the payload is signed with the next sequence number of its sender;
    without it it is unsigned (development only). ``strategy == "auto"`` takes the
    strategy the domain-gap measurement recommended at scoring time. Reference images
    that are near-duplicates of the task's test images are excluded before selecting,
    unless the leakage rule only reports them; unreadable reference images are always
    excluded. A payload over the byte budget is not written (``BudgetError``).
    """
    options = options or PayloadOptions()
    work = ScoredWork.open(work_dir, selection.leakage, selection.fleet)
    _check_planned_fleet(work, selection.planned)
    config, score = work.resolve(selection.config, selection.score)
    scored = work.scored
    kept, consensus = _kept_rows(work, config, score, selection.consensus)
    warnings = selection_warnings(int(kept.size), len(scored.class_names), scored.reference_size)
    signer = options.signer
    created = int(time.time())
    stamp = signer.stamp(created) if signer else None
    payload = work.payload(kept, config, score, options.task_id, stamp, created)
    encoded = work.encode(payload, signer.key if signer else None)
    if options.max_bytes is not None and len(encoded.data) > options.max_bytes:
        raise BudgetError(
            f"the payload is {len(encoded.data)} bytes, over the budget of {options.max_bytes}: "
            "keep fewer images or raise the budget (nothing written)"
        )
    write_payload(out_path, encoded.data)
    k = len(scored.class_names)
    return PayloadSummary(
        payload=str(out_path),
        payload_bytes=len(encoded.data),
        kept=int(kept.size),
        keep_fraction=kept.size / scored.reference_size,
        body_coding=encoded.body,
        signed=_signature_summary(payload, signer),
        selection=payload.selection,
        unreadable_excluded=int(scored.excluded.size),
        class_histogram=payload.class_histogram(),
        information_bound_bytes=round(
            information_bound_bytes(scored.reference_size, payload.labels, k), 1
        ),
        leakage=work.leakage_of(kept),
        consensus=consensus,
        warnings=warnings,
        contact_sheet=_contact_sheet(payload, work, options.sheet),
        plan=selection.planned,
        fleet=None if work.fleet is None else work.fleet.as_json(),
    )


def _check_planned_fleet(work: ScoredWork, planned: PlannedChoice | None) -> None:
    """A plan's choice is sent for the releases it was planned for, as they were."""
    if planned is None or planned.fleet_digest is None:
        return
    if work.fleet is None or work.fleet.digest != planned.fleet_digest:
        raise ConfigError(
            "the fleet's registered releases changed since the plan was made: run "
            "'plada-send plan' again (its candidates must suit the releases as they are)"
        )


def _kept_rows(
    work: ScoredWork, config: SelectionConfig, score: str, rule: ConsensusRule
) -> tuple[np.ndarray, ConsensusReport | None]:
    """The selected rows, after the consensus filter when it is on (dropped rows are
    replaced by the next ones the selection would keep)."""
    kept = work.select(config, score)
    if rule.k <= 0:
        return kept, None
    labels = work.scored.predicted[kept]
    dropped = kept[consensus_outliers(work.embeddings_of(kept), labels, rule.k, rule.agreement)]
    kept = work.select(config, score, excluded=dropped)
    return kept, ConsensusReport(rule.k, rule.agreement, int(dropped.size))


def _contact_sheet(
    payload: Payload, work: ScoredWork, sheet: ContactSheet | None
) -> dict[str, str] | None:
    """Draw the selection's contact sheet, or say why not (another reference set)."""
    from sender.selection.contact_sheet import write_contact_sheet

    if sheet is None:
        return None
    reference, scored = sheet.reference, work.scored
    if reference.manifest.fingerprint != scored.reference_fingerprint:
        return {
            "skipped": f"the reference set {reference.manifest.name} is not the one this work "
            f"directory scored ({scored.reference_name}): name it with --reference"
        }
    title = f"{payload.task}: {selection_text(payload.selection)}"
    write_contact_sheet(
        sheet.path, reference, payload.indices, payload.labels, payload.class_names, title
    )
    return {"file": str(sheet.path)}


def selection_warnings(kept: int, classes: int, reference_size: int) -> list[str]:
    """Refuse a selection too small to teach every class; warn about a thin one."""
    if kept < classes:
        need = classes / reference_size
        raise ConfigError(
            f"the selection keeps {kept} of {reference_size} reference images, fewer than the "
            f"task's {classes} classes: raise --keep to at least {need:.2g} (nothing written)"
        )
    if kept < MIN_IMAGES_PER_CLASS * classes:
        return [
            f"only {kept / classes:.1f} kept images per class on average (fewer than "
            f"{MIN_IMAGES_PER_CLASS}): the student will learn little; raise --keep"
        ]
    return []


def _signature_summary(payload: Payload, signer: PayloadSigner | None) -> SignatureSummary | None:
    if signer is None or payload.sender is None:
        return None
    key = signer.key
    stamp = payload.sender
    return SignatureSummary(key.sender, key.key_id.hex(), stamp.sequence, stamp.expires)
