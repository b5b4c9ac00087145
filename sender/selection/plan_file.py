"""The plan as a file: its candidates, their predicted accuracy and payload size, the
front and the choice (``plan.json``), read back by ``plada-send select --plan``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError
from sender.errors import BudgetError
from sender.scoring.domain_gap import DomainGap
from sender.scoring.work_dir import SCORES_FILE
from sender.selection.deployment import DeploymentEvidence
from sender.selection.strategies import SelectionConfig

PLAN_FILE = "plan.json"
PLAN_PLOT = "plan.png"
PLAN_SUMMARY = "plan.txt"
PLAN_SCHEMA = 1
# how the plan chooses: the smallest keep fraction predicted within the proxy's measured
# noise of the best, its best row (the operator pays link time for every byte), or the
# best prediction
WITHIN_NOISE, BEST = "within-noise", "best"
CHOICE_RULES = (WITHIN_NOISE, BEST)
# a candidate whose payload is over the plan's byte budget: sized, never trained on
OVER_BUDGET = "over-budget"


@dataclass(frozen=True)
class Candidate:
    """One selection the plan can send."""

    strategy: str
    score: str  # ignored by the random controls
    keep: float
    reserve: float = 1.0
    alpha: float = -0.2

    @property
    def name(self) -> str:
        keep = f"{100 * self.keep:g}%"
        if self.strategy == "random":
            return f"random/{keep}"
        if self.strategy == "random-balanced":
            return f"random-balanced/{keep}/a{self.alpha:g}"
        if self.strategy == "safety-net":
            return f"safety-net/{self.score}/{keep}/r{self.reserve:g}/a{self.alpha:g}"
        return f"{self.strategy}/{self.score}/{keep}"

    def config(self) -> SelectionConfig:
        return SelectionConfig(self.strategy, self.keep, self.alpha, self.reserve)


@dataclass
class PlanRow:
    """One candidate's predicted accuracy and the size of the payload it would send."""

    name: str
    candidate: Candidate
    payload_bytes: int
    kept_images: int = 0
    classes_covered: int = 0
    smallest_class_share: float = 0.0
    stage: str = "screen"  # "confirm": predicted by the longer run; "final": and judged
    # again under the plan's further splits of the task (another split teacher each);
    # OVER_BUDGET: not predicted (its payload is over the plan's byte budget)
    predicted_accuracy: float = 0.0
    screen_accuracy: float = 0.0
    confirm_accuracy: float | None = None
    repeat_accuracy: float | None = None  # the confirmation run again, with another seed
    # a finalist's confirmation-length run under each further split (its own split
    # teacher's selection, labels and validation images); its prediction is then the mean
    # over every split
    split_accuracies: list[float] = field(default_factory=list)
    # a front row's most reachable validation accuracy (the share of validation images of
    # the classes its labels hold); below the best screen accuracy, it is not confirmed
    ceiling: float | None = None
    # on the plan's split this row keeps exactly the rows of that (earlier) row, so its
    # runs are that row's: measured with it, and not counted again in the noise
    same_as: str | None = None

    @classmethod
    def from_json(cls, row: dict[str, object]) -> PlanRow:
        return cls(**row | {"candidate": Candidate(**row["candidate"])})  # type: ignore[arg-type]


def predicted(rows: list[PlanRow]) -> list[PlanRow]:
    """The rows the plan made a prediction for (not those over its byte budget)."""
    return [r for r in rows if r.stage != OVER_BUDGET]


def rate_front(rows: list[PlanRow]) -> list[str]:
    """Names of the predicted rows no other beats on both bytes and predicted accuracy."""
    front: list[str] = []
    best = -1.0
    for row in sorted(predicted(rows), key=lambda r: (r.payload_bytes, -r.predicted_accuracy)):
        if row.predicted_accuracy > best:
            front.append(row.name)
            best = row.predicted_accuracy
    return front


def nothing_fits(rows: list[PlanRow], what: str, fix: str) -> BudgetError:
    """The error for a byte budget no row fits (``what``), naming the smallest and ``fix``."""
    smallest = min(rows, key=lambda r: r.payload_bytes)
    return BudgetError(
        f"no {what} (the smallest, {smallest.name}, is {smallest.payload_bytes}): {fix}"
    )


def choose(rows: list[PlanRow], max_bytes: int | None = None, band: float = 0.0) -> PlanRow:
    """Of the rows that fit ``max_bytes`` and are predicted within ``band`` of the best,
    those of the smallest keep fraction, and of them the best predicted (``band`` 0: the
    best, ties to fewer bytes); among the finalists when any fits (judged under every
    split), else among the confirmed rows (the longer runs).

    A payload's size follows the images it keeps: rows of one keep fraction differ in
    bytes by their selection's entropy only (a few percent), too little to give up
    predicted accuracy for."""
    rows = predicted(rows)
    fitting = [r for r in rows if max_bytes is None or r.payload_bytes <= max_bytes]
    if not fitting:
        raise nothing_fits(
            rows,
            f"planned payload fits {max_bytes} bytes",
            "raise the budget, or plan with smaller keep fractions (--keeps)",
        )
    finals = [r for r in fitting if r.stage == "final"]  # every split's estimate
    confirmed = [r for r in fitting if r.stage == "confirm"]  # the longer runs' estimates
    pool = finals or confirmed or fitting
    best = max(r.predicted_accuracy for r in pool)
    near = [r for r in pool if r.predicted_accuracy >= best - band - 1e-12]
    fewest = min(r.candidate.keep for r in near)
    same_size = [r for r in near if r.candidate.keep == fewest]
    return max(same_size, key=lambda r: (r.predicted_accuracy, -r.payload_bytes))


@dataclass(frozen=True)
class PlanNoise:
    """How far apart two proxy runs of one candidate land (the confirmation run again with
    another seed), and the band below the best prediction the choice accepts."""

    repeated: int  # candidates run twice
    rms_difference: float  # between a candidate's two runs
    # one run's standard deviation (at least one validation image), which is also that of
    # the difference of two two-run predictions: the band
    band: float
    rule: str  # WITHIN_NOISE or BEST
    # with further splits of the task: how many, the finalists judged under all of them,
    # and one split's sd of a finalist's accuracy about its mean (split offsets removed),
    # which holds the split teacher's and the validation split's variance too
    splits: int = 1
    finalists: int = 0
    split_sd: float | None = None

    @property
    def choice_band(self) -> float:
        """The band :func:`choose` is given: 0 under the BEST rule."""
        return self.band if self.rule == WITHIN_NOISE else 0.0


def selection_key(row: PlanRow) -> str:
    """The name that stands for a row's selection on the plan's split: its own, or that
    of the row whose rows it keeps."""
    return row.same_as or row.name


def counted_once(rows: list[PlanRow]) -> list[PlanRow]:
    """``rows`` with one row per selection (the first given), so that runs shared by
    rows keeping the same rows are counted once."""
    seen: set[str] = set()
    kept = []
    for row in rows:
        if selection_key(row) not in seen:
            seen.add(selection_key(row))
            kept.append(row)
    return kept


def noise_of(rows: list[PlanRow], validation_images: float, rule: str) -> PlanNoise:
    """The proxy's noise from the rows run twice. Two runs of one candidate differ by d
    with E[d^2] = 2 s^2 (s: one run's sd); two candidates' two-run means differ by noise
    of sd s, so s is the band. Never below one validation image (of the effective number,
    when the images are weighted)."""
    pairs = [
        (r.confirm_accuracy, r.repeat_accuracy)
        for r in counted_once([r for r in rows if r.repeat_accuracy is not None])
        if r.confirm_accuracy is not None
    ]
    squares = [(a - b) ** 2 for a, b in pairs]
    rms = float(np.sqrt(np.mean(squares))) if squares else 0.0
    band = max(rms / np.sqrt(2), 1.0 / max(1, validation_images))
    return PlanNoise(len(pairs), rms, float(band), rule)


def split_noise(finalists: list[PlanRow], first: PlanNoise) -> PlanNoise:
    """The noise once ``finalists`` were judged under further splits. Each finalist's
    accuracies (split 0's prediction, then one per further split) less its mean and less
    each split's mean offset (a two-way table without interaction) give one split's sd;
    two finalists' means over k splits differ by noise of sd ``split_sd * sqrt(2 / k)``,
    the band. Its floor is what the proxy's own noise leaves of that difference (s: one
    run's sd, the first band), finalist by finalist (:func:`mean_variance`), for the two
    noisiest."""
    finalists = counted_once(finalists)
    table = np.array([[r.predicted_accuracy, *r.split_accuracies] for r in finalists])
    if len(finalists) < 2 or table.shape[1] < 2:
        return first
    count, splits = table.shape
    residual = table - table.mean(1, keepdims=True) - table.mean(0) + table.mean()
    sd = float(np.sqrt((residual**2).sum() / ((count - 1) * (splits - 1))))
    variances = sorted(mean_variance(r, first.band, splits) for r in finalists)
    floor = float(np.sqrt(variances[-1] + variances[-2]))
    band = max(sd * float(np.sqrt(2 / splits)), floor)
    return replace(first, band=band, splits=splits, finalists=count, split_sd=sd)


def mean_variance(finalist: PlanRow, run_sd: float, splits: int) -> float:
    """The proxy's share of the variance of a finalist's mean over ``splits`` splits:
    its split-0 prediction is the mean of its runs there (two when it was repeated,
    variance s^2 / 2; else one, s^2) and each further split adds one run (s^2), so the
    mean has variance (s^2 / runs + (k - 1) s^2) / k^2. Two repeated finalists' means
    then differ by noise of sd s sqrt(2k - 1) / k."""
    runs = 2 if finalist.repeat_accuracy is not None else 1
    return run_sd**2 * (1 / runs + splits - 1) / splits**2


def file_digest(path: Path) -> str:
    """SHA-256 of a file (what ties a plan to the scoring it was made for)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PlanSplit:
    """How the task's labeled images were split for the plan."""

    teacher_train: int
    validation: int
    seed: int  # of the split teacher (the plan's seed, plus the fold)
    teacher_accuracy: float | None = None  # the split teacher's, on the split's validation
    fold: int = 0  # which block of the plan's seeded order the validation images are


@dataclass(frozen=True)
class PlanEvidence:
    """The domain-gap measurement on the split, beside the measured candidates."""

    domain_gap: DomainGap
    recommended_by_gap: str


@dataclass
class Plan:
    """Every candidate's predicted accuracy and size, the front and the choice (plan.json)."""

    work_dir: str
    scores_sha256: str
    reference: dict[str, str | int]
    task: str
    classes: list[str]
    split: PlanSplit
    split_teacher_validation_accuracy: float | None
    evidence: PlanEvidence
    settings: dict[str, object]
    proxy: str
    candidates: list[PlanRow]
    front: list[str]
    chosen: str
    seconds: float
    schema: int = PLAN_SCHEMA
    noise: PlanNoise | None = None  # None in plans made before the noise was measured
    fleet: dict[str, object] | None = None  # the releases its candidates suit (FleetRestriction)
    deployment: DeploymentEvidence | None = None  # how --deployment weighted the validation
    more_splits: list[PlanSplit] = field(default_factory=list)  # the finalists' further splits

    def row(self, name: str) -> PlanRow:
        return next(r for r in self.candidates if r.name == name)

    @property
    def choice_band(self) -> float:
        """The band below the best prediction that the plan's rule accepts."""
        return 0.0 if self.noise is None else self.noise.choice_band

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Plan:
        """A plan read back from plan.json (``TypeError``/``KeyError`` if malformed)."""
        evidence = data["evidence"]
        return cls(
            **data
            | {
                "split": PlanSplit(**data["split"]),  # type: ignore[arg-type]
                "evidence": PlanEvidence(
                    DomainGap(**evidence["domain_gap"]),  # type: ignore[index]
                    evidence["recommended_by_gap"],  # type: ignore[index]
                ),
                "candidates": [PlanRow.from_json(r) for r in data["candidates"]],  # type: ignore[attr-defined]
                "noise": PlanNoise(**data["noise"]) if data.get("noise") else None,  # type: ignore[arg-type]
                "deployment": DeploymentEvidence(**data["deployment"])  # type: ignore[arg-type]
                if data.get("deployment")
                else None,
                "more_splits": [PlanSplit(**s) for s in data.get("more_splits", [])],  # type: ignore[attr-defined]
            }
        )


def load_plan(path: str | os.PathLike[str], work_dir: str | os.PathLike[str]) -> Plan:
    """A plan made for ``work_dir``'s current scores; typed errors name the fix otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"plan {path} is unreadable ({exc}): run 'plada-send plan' again"
        ) from exc
    try:
        if data.get("schema") != PLAN_SCHEMA or not data.get("candidates"):
            raise ValueError("another schema")
        plan = Plan.from_json(data)
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a plada plan (schema {PLAN_SCHEMA}): run 'plada-send plan'"
        ) from exc
    scores_path = Path(work_dir) / SCORES_FILE
    if not scores_path.is_file():
        raise ConfigError(f"{scores_path} not found: run 'plada-send score' first")
    if file_digest(scores_path) != plan.scores_sha256:
        raise ConfigError(
            f"{path} was made for another scoring than {scores_path}: "
            "run 'plada-send plan' again on this work directory"
        )
    return plan
