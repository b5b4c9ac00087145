"""The plan as a file: its candidates, their predicted accuracy and payload size, the
front and the choice (``plan.json``), read back by ``plada-send select --plan``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.errors import ConfigError
from sender.errors import BudgetError
from sender.scoring.domain_gap import DomainGap
from sender.scoring.work_dir import SCORES_FILE
from sender.selection.strategies import SelectionConfig

PLAN_FILE = "plan.json"
PLAN_PLOT = "plan.png"
PLAN_SUMMARY = "plan.txt"
PLAN_SCHEMA = 1


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
    stage: str = "screen"  # or "confirm": predicted by the longer run
    predicted_accuracy: float = 0.0
    screen_accuracy: float = 0.0
    confirm_accuracy: float | None = None

    @classmethod
    def from_json(cls, row: dict[str, object]) -> PlanRow:
        return cls(**row | {"candidate": Candidate(**row["candidate"])})  # type: ignore[arg-type]


def rate_front(rows: list[PlanRow]) -> list[str]:
    """Names of the rows no other row beats on both bytes and predicted accuracy."""
    front: list[str] = []
    best = -1.0
    for row in sorted(rows, key=lambda r: (r.payload_bytes, -r.predicted_accuracy)):
        if row.predicted_accuracy > best:
            front.append(row.name)
            best = row.predicted_accuracy
    return front


def choose(rows: list[PlanRow], max_bytes: int | None = None) -> PlanRow:
    """The row with the highest predicted accuracy within ``max_bytes`` (ties: fewer bytes),
    among the confirmed rows when any fits: their estimates come from the longer runs."""
    fitting = [r for r in rows if max_bytes is None or r.payload_bytes <= max_bytes]
    if not fitting:
        smallest = min(rows, key=lambda r: r.payload_bytes)
        raise BudgetError(
            f"no planned payload fits {max_bytes} bytes (the smallest, {smallest.name}, "
            f"is {smallest.payload_bytes}): raise the budget, or plan with smaller "
            "keep fractions (--keeps)"
        )
    confirmed = [r for r in fitting if r.stage == "confirm"]  # the longer runs' estimates
    return max(confirmed or fitting, key=lambda r: (r.predicted_accuracy, -r.payload_bytes))


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
    seed: int


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

    def row(self, name: str) -> PlanRow:
        return next(r for r in self.candidates if r.name == name)

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
