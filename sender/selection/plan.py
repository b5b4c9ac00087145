"""Planning a payload: predict what each candidate selection teaches, and choose by measurement.

No fixed selection rule wins on every task, so the plan measures. The task's labeled
images are split (stratified, seeded) into a teacher-train part and a validation part.
A teacher trained on the teacher-train part alone scores the reference set again; each
candidate selection (strategy x score x keep x reserve x alpha, see
:func:`candidate_grid`) is applied to those scores, and a short student run at reduced
size learns from the selected reference images and that teacher's labels, the way a
receiver's student does. Its accuracy on the validation part is the prediction.

The proxy is not circular: it never sees the teacher's features or head, only the
selected images and their hard labels, so a selection that covers the classes with
poor or mislabelled images predicts poorly, as it teaches poorly.

Screening is successive halving: every candidate gets a short run; the best share and
the screen's rate-accuracy front get a longer run with another seed, whose accuracy is
then the prediction. The same candidate applied to the full work directory (the teacher
refit on all labeled images) is the payload that would be sent, and is encoded to get
its exact size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from protocol.atomic_files import write_atomic, write_json_atomic, write_text_atomic
from protocol.errors import BudgetError, ConfigError, ReferenceMismatchError, TaskDataError
from protocol.payload import SenderStamp
from protocol.reference.base import ReferenceSource
from protocol.signing import SigningKey
from protocol.task_data import LabeledImages
from sender.scoring.images import domain_gap, reference_images, teacher_scores
from sender.scoring.scores import SCORES
from sender.scoring.work_dir import SCORES_FILE
from sender.selection.payloads import ScoredWork
from sender.selection.strategies import SelectionConfig, select

PLAN_FILE = "plan.json"
PLAN_PLOT = "plan.png"
PLAN_SUMMARY = "plan.txt"
PLAN_SCHEMA = 1
DEFAULT_KEEPS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.10)
# safety-net (reserve, alpha): the paper's half-reserve, all-reserve, and equal quotas
SAFETY_NET_GRID = ((0.5, -0.2), (1.0, -0.2), (1.0, 0.0))
PLAN_SENDER = "plan"  # sender id the sizes are measured with, unless one is given
SIZE_SEQUENCE = 2**31  # a large sequence number, so sizes are not underestimated


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


def candidate_grid(
    keeps: tuple[float, ...] = DEFAULT_KEEPS, scores: tuple[str, ...] = SCORES
) -> list[Candidate]:
    """Every strategy and score at every keep fraction: lowest (each score), inverse
    (energy, entropy: "least relevant" means nothing for kNN relevance), safety-net
    (each score, on :data:`SAFETY_NET_GRID`), and the random and random-balanced controls."""
    grid: list[Candidate] = []
    for keep in keeps:
        grid += [Candidate("lowest", score, keep) for score in scores]
        grid += [Candidate("inverse", s, keep) for s in scores if s in ("energy", "entropy")]
        grid += [
            Candidate("safety-net", score, keep, reserve, alpha)
            for score in scores
            for reserve, alpha in SAFETY_NET_GRID
        ]
        grid.append(Candidate("random", scores[0], keep))
        grid.append(Candidate("random-balanced", scores[0], keep, 1.0, 0.0))
    return grid


@dataclass
class PlanSettings:
    """How the plan splits the task, what it tries, and how hard it measures."""

    keeps: tuple[float, ...] = DEFAULT_KEEPS
    validation_fraction: float = 0.25
    screen_steps: int = 100
    confirm_steps: int = 200
    confirm_share: float = 0.25  # of the candidates, besides the screen's front
    batch_size: int = 64
    max_images: int = 8192  # a proxy run learns from at most this many of the kept images
    seed: int = 0
    sender_id: str = PLAN_SENDER
    teacher: dict[str, Any] = field(default_factory=dict)  # teacher_scores keyword arguments

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON (the teacher's embedder by name only)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "teacher"}
        teacher = {k: v for k, v in self.teacher.items() if k != "embedder"}
        embedder = self.teacher.get("embedder")
        teacher["embedder"] = None if embedder is None else getattr(embedder, "name", "custom")
        return plain | {"keeps": list(self.keeps), "teacher": teacher}

    def __post_init__(self) -> None:
        if not 0.05 <= self.validation_fraction <= 0.5:
            raise ConfigError(
                f"validation fraction must be in [0.05, 0.5], not {self.validation_fraction}"
            )
        if not self.keeps or not all(0 < keep <= 1 for keep in self.keeps):
            raise ConfigError(f"keep fractions must be in (0, 1], not {self.keeps}")
        if self.screen_steps < 1 or self.confirm_steps < 1 or self.batch_size < 1:
            raise ConfigError("proxy steps and batch size must be >= 1")


def split_task(
    task: LabeledImages, validation_fraction: float, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """(teacher-train, validation): per class, a seeded ``validation_fraction`` (at least
    one image) goes to validation. Every class needs two labeled images."""
    rng = np.random.default_rng(seed)
    validation: list[np.ndarray] = []
    for c, name in enumerate(task.class_names):
        members = np.flatnonzero(task.labels == c)
        if members.size < 2:
            raise TaskDataError(
                f"class {name!r} has {members.size} labeled image(s); the plan needs at least "
                "two per class (one to train the teacher, one to validate)"
            )
        count = max(1, round(validation_fraction * members.size))
        validation.append(rng.permutation(members)[:count])
    held = np.sort(np.concatenate(validation))
    rest = np.setdiff1d(np.arange(task.labels.size), held)

    def part(rows: np.ndarray, suffix: str) -> LabeledImages:
        return LabeledImages(
            task.images[rows], task.labels[rows], task.class_names, f"{task.name}-{suffix}"
        )

    return part(rest, "teacher"), part(held, "validation")


def proxy_accuracy(
    images: np.ndarray,
    labels: np.ndarray,
    validation: LabeledImages,
    steps: int,
    seed: int,
    settings: PlanSettings,
) -> float:
    """Validation accuracy of a small student trained ``steps`` steps on (images, labels)."""
    import torch

    from trainer.training import TrainConfig, accuracy, train_classifier

    if labels.size == 0:
        return 0.0
    config = TrainConfig(
        min_steps=steps,
        max_steps=steps,
        batch_size=settings.batch_size,
        label_smoothing=0.1,
        seed=seed,
    )
    model = train_classifier(
        (torch.from_numpy(images), torch.from_numpy(labels)),
        len(validation.class_names),
        config,
        in_channels=images.shape[1],
        progress=False,
    ).model
    return accuracy(model, torch.from_numpy(validation.images), torch.from_numpy(validation.labels))


def rate_front(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the rows no other row beats on both bytes and predicted accuracy."""
    front: list[str] = []
    best = -1.0
    for row in sorted(rows, key=lambda r: (r["payload_bytes"], -r["predicted_accuracy"])):
        if row["predicted_accuracy"] > best:
            front.append(row["name"])
            best = row["predicted_accuracy"]
    return front


def choose(rows: list[dict[str, Any]], max_bytes: int | None = None) -> dict[str, Any]:
    """The row with the highest predicted accuracy within ``max_bytes`` (ties: fewer bytes),
    among the confirmed rows when any fits: their estimates come from the longer runs."""
    fitting = [r for r in rows if max_bytes is None or r["payload_bytes"] <= max_bytes]
    if not fitting:
        smallest = min(rows, key=lambda r: r["payload_bytes"])
        raise BudgetError(
            f"no planned payload fits {max_bytes} bytes (the smallest, {smallest['name']}, "
            f"is {smallest['payload_bytes']}): raise the budget, or plan with smaller "
            "keep fractions (--keeps)"
        )
    confirmed = [r for r in fitting if r["stage"] == "confirm"]  # the longer runs' estimates
    return max(confirmed or fitting, key=lambda r: (r["predicted_accuracy"], -r["payload_bytes"]))


def file_digest(path: Path) -> str:
    """SHA-256 of a file (what ties a plan to the scoring it was made for)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Proxy:
    """Proxy runs over the split teacher's selections, with the images loaded once each."""

    def __init__(
        self,
        images: np.ndarray,
        scores: dict[str, np.ndarray],
        predicted: np.ndarray,
        excluded: np.ndarray,
        validation: LabeledImages,
        settings: PlanSettings,
    ) -> None:
        self.images, self.scores, self.predicted = images, scores, predicted
        self.excluded, self.validation, self.settings = excluded, validation, settings

    def kept(self, candidate: Candidate) -> np.ndarray:
        k = len(self.validation.class_names)
        values = self.scores[candidate.score]
        return select(values, self.predicted, k, candidate.config(), excluded=self.excluded)

    def accuracy(self, candidate: Candidate, steps: int, seed: int) -> float:
        kept = self.kept(candidate)
        cap = self.settings.max_images
        if kept.size > cap:
            pick = np.random.default_rng(seed).choice(kept.size, cap, replace=False)
            kept = kept[np.sort(pick)]
        return proxy_accuracy(
            self.images[kept],
            self.predicted[kept].astype(np.int64),
            self.validation,
            steps,
            seed,
            self.settings,
        )


def _size_row(work: ScoredWork, candidate: Candidate, key: SigningKey) -> dict[str, Any]:
    """The candidate's payload from the full work directory: exact signed size, coverage."""
    config, score = work.resolve(candidate.config(), candidate.score)
    kept = work.select(config, score)
    created = int(time.time())
    stamp = SenderStamp(key.sender, SIZE_SEQUENCE, created + 7 * 86400)
    payload = work.payload(kept, config, score, sender=stamp, created=created)
    encoded = work.encode(payload, key)
    k = len(work.scored.class_names)
    counts = np.bincount(payload.labels, minlength=k)
    return {
        "name": candidate.name,
        "candidate": asdict(candidate),
        "payload_bytes": len(encoded.data),
        "kept_images": int(kept.size),
        "classes_covered": int((counts > 0).sum()),
        "smallest_class_share": float(counts.min() / max(1, kept.size)),
    }


def make_plan(
    reference: ReferenceSource,
    train: LabeledImages,
    work_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PlanSettings,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every candidate's accuracy and size; write plan.json, plan.png, plan.txt."""
    from tqdm import tqdm

    started = time.perf_counter()
    work = ScoredWork.open(work_dir)
    scored = work.scored
    manifest = reference.manifest
    if manifest.fingerprint != scored.reference_fingerprint or len(reference) != len(
        scored.predicted
    ):
        raise ReferenceMismatchError(
            f"{work.path} was scored on another reference set than {manifest.name}: "
            "plan with the same --reference, or score again"
        )
    if tuple(train.class_names) != tuple(scored.class_names):
        raise TaskDataError(
            f"the task's classes {list(train.class_names)[:5]} are not those "
            f"{list(scored.class_names)[:5]} of {work.path}: plan with the task that was scored"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher_part, validation = split_task(train, settings.validation_fraction, settings.seed)
    images = reference_images(reference, train.images.shape[1])
    outputs, scores, predicted = teacher_scores(
        images, teacher_part, validation, seed=settings.seed, progress=progress, **settings.teacher
    )
    gap = domain_gap(outputs)
    usable = [s for s in SCORES if s in scored.scores and s in scores]
    candidates = candidate_grid(settings.keeps, tuple(usable))
    proxy = _Proxy(images, scores, predicted, work.excluded, validation, settings)
    key = SigningKey.generate(settings.sender_id)
    rows = []
    bar = tqdm(candidates, desc="plan: screen", unit="cand", disable=not progress)
    for candidate in bar:
        row = _size_row(work, candidate, key)
        row["screen_accuracy"] = proxy.accuracy(candidate, settings.screen_steps, settings.seed)
        row["predicted_accuracy"] = row["screen_accuracy"]
        row["stage"] = "screen"
        rows.append(row)
    by_name = {c.name: c for c in candidates}
    ranked = sorted(rows, key=lambda r: -r["screen_accuracy"])
    promoted = {r["name"] for r in ranked[: max(1, round(settings.confirm_share * len(rows)))]}
    promoted |= set(rate_front(rows))
    confirm = [r for r in rows if r["name"] in promoted]
    bar = tqdm(confirm, desc="plan: confirm", unit="cand", disable=not progress)
    for row in bar:
        candidate = by_name[row["name"]]
        row["confirm_accuracy"] = proxy.accuracy(
            candidate, settings.confirm_steps, settings.seed + 1
        )
        row["predicted_accuracy"] = row["confirm_accuracy"]
        row["stage"] = "confirm"
    front = rate_front(rows)
    chosen = choose(rows)
    scores_path = work.path / SCORES_FILE
    plan = {
        "schema": PLAN_SCHEMA,
        "work_dir": str(work.path.resolve()),
        "scores_sha256": file_digest(scores_path),
        "reference": manifest.summary(),
        "task": scored.task,
        "classes": list(scored.class_names),
        "split": {
            "teacher_train": int(teacher_part.labels.size),
            "validation": int(validation.labels.size),
            "seed": settings.seed,
        },
        "split_teacher_validation_accuracy": outputs.report["test_accuracy"],
        "evidence": {"domain_gap": gap.as_dict(), "recommended_by_gap": gap.strategy},
        "settings": settings.as_dict(),
        "proxy": (
            f"small CNN trained from scratch on the selected reference images with the split "
            f"teacher's hard labels ({settings.screen_steps} steps for all, "
            f"{settings.confirm_steps} for the confirmed), batch {settings.batch_size}, "
            f"accuracy on the {validation.labels.size} validation images"
        ),
        "candidates": rows,
        "front": front,
        "chosen": chosen["name"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_plan_outputs(out, plan)
    return plan


def write_plan_outputs(out: Path, plan: dict[str, Any]) -> None:
    """plan.json, the human summary and the rate-accuracy plot, each written atomically."""
    write_json_atomic(out / PLAN_FILE, plan)
    write_text_atomic(out / PLAN_SUMMARY, plan_summary(plan))
    write_atomic(out / PLAN_PLOT, lambda handle: plot_plan(plan, handle))


def plan_summary(plan: dict[str, Any], limit: int = 20) -> str:
    """The rate-accuracy table (front first, then the best of the rest) as text."""
    rows = {r["name"]: r for r in plan["candidates"]}
    front = [rows[name] for name in plan["front"]]
    rest = sorted(
        (r for r in plan["candidates"] if r["name"] not in plan["front"]),
        key=lambda r: -r["predicted_accuracy"],
    )
    gap = plan["evidence"]["domain_gap"]
    lines = [
        f"plan for task {plan['task']} ({len(plan['classes'])} classes) "
        f"on {plan['reference']['name']}",
        f"split: {plan['split']['teacher_train']} teacher-train, {plan['split']['validation']} "
        f"validation images; split teacher's validation accuracy "
        f"{100 * (plan['split_teacher_validation_accuracy'] or 0):.1f}%",
        f"domain gap (evidence): {gap['reason']}",
        f"proxy: {plan['proxy']}",
        "",
        f"{'candidate':34s} {'bytes':>8s} {'images':>7s} {'classes':>7s} {'predicted':>9s}  stage",
    ]
    for row in front + rest[: max(0, limit - len(front))]:
        mark = (
            "*" if row["name"] == plan["chosen"] else ("F" if row["name"] in plan["front"] else " ")
        )
        lines.append(
            f"{mark}{row['name']:33s} {row['payload_bytes']:8d} {row['kept_images']:7d} "
            f"{row['classes_covered']:4d}/{len(plan['classes']):<2d} "
            f"{100 * row['predicted_accuracy']:8.1f}%  {row['stage']}"
        )
    lines += [
        "",
        "F: on the rate-accuracy front; *: chosen (highest predicted accuracy; "
        "select --plan --max-bytes N picks the best that fits N)",
        f"{len(plan['candidates'])} candidates in {plan['seconds']:.0f}s",
    ]
    return "\n".join(lines) + "\n"


STRATEGY_COLOURS = {
    "lowest": "tab:blue",
    "inverse": "tab:purple",
    "safety-net": "tab:green",
    "random": "tab:gray",
    "random-balanced": "tab:brown",
}


def plot_plan(plan: dict[str, Any], handle: BinaryIO) -> None:
    """Predicted accuracy against payload bytes, a colour per strategy, front and choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for strategy, colour in STRATEGY_COLOURS.items():
        rows = [r for r in plan["candidates"] if r["candidate"]["strategy"] == strategy]
        for stage, fill in (("screen", "none"), ("confirm", colour)):
            picked = [r for r in rows if r["stage"] == stage]
            if picked:
                ax.scatter(
                    [r["payload_bytes"] for r in picked],
                    [100 * r["predicted_accuracy"] for r in picked],
                    s=28,
                    facecolors=fill,
                    edgecolors=colour,
                    label=f"{strategy}"
                    if stage == "confirm" or not any(r["stage"] == "confirm" for r in rows)
                    else None,
                )
    by_name = {r["name"]: r for r in plan["candidates"]}
    front = [by_name[name] for name in plan["front"]]
    ax.step(
        [r["payload_bytes"] for r in front],
        [100 * r["predicted_accuracy"] for r in front],
        where="post",
        color="black",
        linewidth=1,
        label="rate-accuracy front",
    )
    chosen = by_name[plan["chosen"]]
    ax.annotate(
        f"chosen: {chosen['name']}\n{chosen['payload_bytes']} B, "
        f"{100 * chosen['predicted_accuracy']:.1f}%",
        (chosen["payload_bytes"], 100 * chosen["predicted_accuracy"]),
        xytext=(-160, -60),
        textcoords="offset points",
        arrowprops={"arrowstyle": "->"},
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes (signed, zstd)")
    ax.set_ylabel("predicted student accuracy on validation (%)")
    ax.set_title(f"plan: {plan['task']} on {plan['reference']['name']} (filled: confirmed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(handle, format="png")
    plt.close(fig)


def load_plan(path: str | os.PathLike[str], work_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A plan made for ``work_dir``'s current scores; typed errors name the fix otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"plan {path} is unreadable ({exc}): run 'plada-send plan' again"
        ) from exc
    if (
        not isinstance(plan, dict)
        or plan.get("schema") != PLAN_SCHEMA
        or not plan.get("candidates")
    ):
        raise ConfigError(
            f"{path} is not a plada plan (schema {PLAN_SCHEMA}): run 'plada-send plan'"
        )
    scores_path = Path(work_dir) / SCORES_FILE
    if not scores_path.is_file():
        raise ConfigError(f"{scores_path} not found: run 'plada-send score' first")
    if file_digest(scores_path) != plan.get("scores_sha256"):
        raise ConfigError(
            f"{path} was made for another scoring than {scores_path}: "
            "run 'plada-send plan' again on this work directory"
        )
    return plan


def planned_candidate(
    plan: dict[str, Any], max_bytes: int | None
) -> tuple[Candidate, dict[str, Any]]:
    """The plan's best candidate within ``max_bytes`` and its row."""
    row = choose(plan["candidates"], max_bytes)
    try:
        return Candidate(**row["candidate"]), row
    except TypeError as exc:
        raise ConfigError(
            f"the plan's candidate {row.get('name')} is malformed: plan again"
        ) from exc
