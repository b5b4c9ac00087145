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
the screen's rate-accuracy front are trained again with another seed on the device
student's schedule (steps and batch; a short run underrates the larger selections),
and that accuracy is the prediction. The best confirmed candidates are trained once
more with a third seed: the two runs' mean is their prediction, and how far the pairs
land apart is the proxy's noise. By default the choice is the best row of the smallest
keep fraction predicted within that noise of the best (the operator pays link time for
every byte, and the bytes follow the kept images; a rule that takes the top prediction
pays bytes for noise), and it too is run again before it is taken: repeated on the
plan's split, or judged under the further splits below.

One split teacher is one draw of the teacher's own variance: far from the reference set
the fixed schemes move by up to ten points between teacher seeds. So the finalists (the
confirmed rows within twice the noise band of the best, the best of each keep fraction
first, and the choice) are judged again under further splits of the task
(``teacher_splits``), each with its own split teacher, that teacher's selection and
labels, and its own validation images: the next fold of the same seeded order, so that
the splits validate on disjoint images (cross-validation). Their prediction is the
mean over the splits, and the band becomes the noise of a difference between two such
means, from the spread between splits (:func:`sender.selection.plan_file.split_noise`),
so a candidate one teacher happened to favour does not win on that alone. The same
candidate applied to the full work directory (the teacher refit on all labeled images)
is the payload that would be sent, and is encoded to get its exact size.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError, ReferenceMismatchError, TaskDataError
from protocol.payload import RECEIVER_DEFAULT_MAX_BYTES, SenderStamp
from protocol.reference.base import ReferenceSource
from protocol.signing import SigningKey
from protocol.task_data import LabeledImages, load_unlabeled_images
from sender.scoring.domain_gap import DomainGap
from sender.scoring.images import (
    TeacherSettings,
    domain_gap,
    reference_images,
    teacher_scores,
)
from sender.scoring.scores import COVER, TASK_SCORES, score_names
from sender.scoring.teacher_kinds import IMAGES
from sender.scoring.work_dir import SCORES_FILE, ScoreReport
from sender.selection.deployment import (
    DeploymentEvidence,
    Scenery,
    Validation,
    pixel_features,
    weigh_validation,
)
from sender.selection.fleet import FleetChoice
from sender.selection.plan_file import (
    CHOICE_RULES,
    OVER_BUDGET,
    WITHIN_NOISE,
    Candidate,
    Plan,
    PlanEvidence,
    PlanNoise,
    PlanRow,
    PlanSplit,
    choose,
    counted_once,
    file_digest,
    noise_of,
    nothing_fits,
    predicted,
    rate_front,
    selection_key,
    split_noise,
)
from sender.selection.plan_report import write_plan_outputs
from sender.selection.proxy_pool import ProxyJob, ProxyPool, default_workers
from sender.selection.scored_work import ScoredWork
from sender.selection.strategies import RankedSelection, order_key
from trainer.choices import STUDENT_BATCH, STUDENT_STEPS

DEFAULT_KEEPS = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.10)
# safety-net (reserve, alpha): the paper's half-reserve, all-reserve, and equal quotas
SAFETY_NET_GRID = ((0.5, -0.2), (1.0, -0.2), (1.0, 0.0))
COVER_SAFETY_NET = ((1.0, -0.2),)  # cover orders within each quota; one quota setting
PLAN_SENDER = "plan"  # sender id the sizes are measured with, unless one is given
SIZE_SEQUENCE = 2**31  # a large sequence number, so sizes are not underestimated


def candidate_grid(
    keeps: tuple[float, ...] = DEFAULT_KEEPS, scores: tuple[str, ...] | None = None
) -> list[Candidate]:
    """Every strategy and score at every keep fraction: lowest (each score), inverse
    (each row score: "least relevant" means nothing for kNN relevance or coverage),
    safety-net (each score, on :data:`SAFETY_NET_GRID`; cover on its one setting), and
    the random and random-balanced controls. ``scores``: default every registered score."""
    scores = score_names() if scores is None else scores
    grid: list[Candidate] = []
    for keep in keeps:
        grid += [Candidate("lowest", score, keep) for score in scores]
        grid += [Candidate("inverse", s, keep) for s in scores if s not in TASK_SCORES]
        grid += [
            Candidate("safety-net", score, keep, reserve, alpha)
            for score in scores
            for reserve, alpha in (COVER_SAFETY_NET if score == COVER else SAFETY_NET_GRID)
        ]
        grid.append(Candidate("random", scores[0], keep))
        grid.append(Candidate("random-balanced", scores[0], keep, 1.0, 0.0))
    return grid


@dataclass(frozen=True)
class PlanSettings:
    """How the plan splits the task, what it tries, and how hard it measures."""

    keeps: tuple[float, ...] = DEFAULT_KEEPS
    validation_fraction: float = 0.25
    screen_steps: int = 100
    batch_size: int = 64  # the screen's
    # the confirmation trains as the device's student does (by default the receiver's
    # own schedule): a short run underrates the larger, more varied selections
    confirm_steps: int = STUDENT_STEPS
    confirm_batch_size: int = STUDENT_BATCH
    confirm_share: float = 0.25  # of the candidates, besides the screen's front
    # the best confirmed candidates run again with another seed, to measure the proxy's
    # noise; with one split, the choice is then repeated too, until it has two runs (at
    # most as many more); with more, the further splits are its further runs
    noise_repeats: int = 3
    # the teacher's own variance: the best confirmed candidates (at most ``finalists``)
    # are judged again under further splits of the task, each with its own split teacher,
    # and the choice is made on their mean over all ``teacher_splits`` splits
    teacher_splits: int = 2
    finalists: int = len(DEFAULT_KEEPS)  # room for the best of each default keep
    choose: str = WITHIN_NOISE  # or BEST (see sender.selection.plan_file.choose)
    # candidates whose payload is larger are sized but not trained on (a receiver refuses
    # them unless its operator raised its own limit); by default a receiver's default
    max_bytes: int = RECEIVER_DEFAULT_MAX_BYTES
    proxy_workers: int = 0  # processes the proxies train on; 0: one per core (see proxy_pool)
    max_images: int = 8192  # a proxy run learns from at most this many of the kept images
    seed: int = 0  # of the split, the split teacher and the proxies
    sender_id: str = PLAN_SENDER
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    fleet: FleetChoice | None = None  # candidates keep only rows these releases all hold
    # unlabeled images of where the device works: the validation images are weighted
    # towards them (sender.selection.deployment); None: equal weights
    deployment: str | None = None

    def as_json(self) -> dict[str, object]:
        """The settings as JSON (the teacher's embedder by name only)."""
        nested = ("teacher", "fleet")
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        teacher = {f.name: getattr(self.teacher, f.name) for f in fields(self.teacher)}
        embedder = self.teacher.embedder
        teacher["embedder"] = None if embedder is None else getattr(embedder, "name", "custom")
        fleet = None if self.fleet is None else self.fleet.as_json()
        return plain | {"keeps": list(self.keeps), "teacher": teacher, "fleet": fleet}

    def split_seed(self, fold: int) -> int:
        """The seed of the split teacher (and its proxies) of split ``fold``; every split's
        validation images come from the one order of :attr:`seed`."""
        return self.seed + fold

    def __post_init__(self) -> None:
        if not 0.05 <= self.validation_fraction <= 0.5:
            raise ConfigError(
                f"validation fraction must be in [0.05, 0.5], not {self.validation_fraction}"
            )
        if not self.keeps or not all(0 < keep <= 1 for keep in self.keeps):
            raise ConfigError(f"keep fractions must be in (0, 1], not {self.keeps}")
        if self.choose not in CHOICE_RULES:
            raise ConfigError(f"--choose must be one of {', '.join(CHOICE_RULES)}")
        if self.max_bytes < 1:
            raise ConfigError(f"--max-bytes must be positive, not {self.max_bytes}")
        if self.proxy_workers < 0:
            raise ConfigError("--proxy-workers must be >= 0")
        if self.noise_repeats < 0:
            raise ConfigError("--noise-repeats must be >= 0")
        if self.teacher_splits < 1 or self.finalists < 1:
            raise ConfigError("--teacher-splits and --finalists must be >= 1")
        if not 0 <= self.confirm_share <= 1:
            raise ConfigError(f"confirm share must be in [0, 1], not {self.confirm_share}")
        runs = (self.screen_steps, self.confirm_steps, self.batch_size, self.confirm_batch_size)
        if min(runs) < 1:
            raise ConfigError("proxy steps and batch size must be >= 1")


def work_teacher(work_dir: str | os.PathLike[str], base: TeacherSettings) -> TeacherSettings:
    """The teacher the work directory was scored with, to train again on the split:
    ``base`` with the report's teacher kind, and its epochs unless ``base`` gives them
    (``epochs=0``: the report's). A typed error for a work directory the plan cannot
    retrain (scored from stored embeddings)."""
    report = ScoreReport.read(work_dir)
    if report.path != IMAGES:
        raise ConfigError(
            f"{work_dir} was scored from stored embeddings ({report.teacher.kind} teacher); "
            "the plan retrains the teacher on images: score with --reference and --train "
            "to plan"
        )
    epochs = base.epochs or int(report.teacher.details.get("epochs", 40))
    return replace(base, kind=report.teacher.kind, epochs=epochs)


def split_rows(
    labels: np.ndarray,
    class_names: tuple[str, ...],
    validation_fraction: float,
    seed: int,
    fold: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(teacher-train rows, validation rows): per class, a seeded ``validation_fraction``
    (at least one image) goes to validation. Every class needs two labeled images.

    ``fold`` k takes the k-th such block of each class's seeded order, so the folds of
    one seed validate on disjoint images until they are used up (``1 /
    validation_fraction`` folds: cross-validation), and then wrap round."""
    rng = np.random.default_rng(seed)
    validation: list[np.ndarray] = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        if members.size < 2:
            raise TaskDataError(
                f"class {name!r} has {members.size} labeled image(s); the plan needs at least "
                "two per class (one to train the teacher, one to validate): add labeled "
                "images of it"
            )
        count = max(1, round(validation_fraction * members.size))
        block = np.arange(fold * count, (fold + 1) * count)
        validation.append(np.unique(np.take(rng.permutation(members), block, mode="wrap")))
    held = np.sort(np.concatenate(validation))
    return np.setdiff1d(np.arange(labels.size), held), held


def split_task(
    task: LabeledImages, validation_fraction: float, seed: int, fold: int = 0
) -> tuple[LabeledImages, LabeledImages]:
    """(teacher-train, validation) of a labeled task (see :func:`split_rows`)."""
    rest, held = split_rows(task.labels, task.class_names, validation_fraction, seed, fold)

    def part(rows: np.ndarray, suffix: str) -> LabeledImages:
        return LabeledImages(
            task.images[rows], task.labels[rows], task.class_names, f"{task.name}-{suffix}"
        )

    return part(rest, "teacher"), part(held, "validation")


@dataclass(frozen=True)
class ProxyRun:
    """How long one proxy student trains, and from which seed."""

    steps: int
    batch_size: int
    seed: int


def proxy_accuracy(
    images: np.ndarray, labels: np.ndarray, validation: Validation, run: ProxyRun
) -> float:
    """(Weighted) validation accuracy of a small student trained as ``run`` says on
    (images, labels)."""
    import torch

    from trainer.training import StepHooks, TrainConfig, predict, train_classifier

    if labels.size == 0:
        return 0.0
    config = TrainConfig(
        min_steps=run.steps,
        max_steps=run.steps,
        batch_size=run.batch_size,
        label_smoothing=0.1,
        seed=run.seed,
    )
    model = train_classifier(
        (torch.from_numpy(images), torch.from_numpy(labels)),
        len(validation.images.class_names),
        config,
        in_channels=images.shape[1],
        hooks=StepHooks(progress=False),
    ).model
    logits, _ = predict(model, torch.from_numpy(validation.images.images))
    return validation.accuracy(logits.argmax(1).numpy())


RowImages = Callable[[np.ndarray], np.ndarray]  # reference rows -> uint8 images


@dataclass(frozen=True)
class SplitScores:
    """What the split teacher gives the proxy: every score of every reference row, and
    its labels."""

    scores: dict[str, np.ndarray]
    predicted: np.ndarray


class Proxy:
    """Proxy runs over the split teacher's selections: ``images`` reads the selected
    reference rows' pixels (the in-memory pool, or a store's thumbnails); the runs train
    on :class:`ProxyPool` (use the proxy as a context, to stop its workers after)."""

    def __init__(
        self,
        images: RowImages,
        split: SplitScores,
        excluded: np.ndarray,
        validation: Validation,
        settings: PlanSettings,
    ) -> None:
        self.images, self.predicted = images, split.predicted
        self.scores = tuple(split.scores)  # the split teacher's score names
        self.validation, self.settings = validation, settings
        k = len(validation.images.class_names)
        self.selections = RankedSelection(split.scores, split.predicted, k, excluded)
        workers = settings.proxy_workers or default_workers()
        self.pool = ProxyPool(proxy_accuracy, validation, workers)
        self._keeper: dict[bytes, str] = {}  # a selection's digest -> its first candidate
        # candidate -> an earlier candidate that keeps exactly the same rows on this split
        self.same_as: dict[str, str] = {}

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        self.pool.close(wait=error is None)

    def kept(self, candidate: Candidate) -> np.ndarray:
        return self.selections.select(candidate.config(), candidate.score)

    def job(self, kept: np.ndarray, run: ProxyRun) -> ProxyJob:
        """What one proxy run learns from: the kept rows' pixels (at most ``max_images``
        of them, drawn with the run's seed) and the split teacher's labels."""
        cap = self.settings.max_images
        if kept.size > cap:
            pick = np.random.default_rng(run.seed).choice(kept.size, cap, replace=False)
            kept = kept[np.sort(pick)]
        return self.images(kept), self.predicted[kept].astype(np.int64), run

    def accuracies(self, candidates: Iterable[Candidate], run: ProxyRun) -> Iterator[float]:
        """Each candidate's proxy accuracy, in order (trained in parallel). Candidates
        that keep the same rows (the same sorted rows, so the same labels and job) are
        trained once: the run is deterministic, so its copies would only repeat it."""
        first_of: dict[bytes, int] = {}  # a selection's digest -> the job that trains it
        job_of: list[int] = []  # each candidate's job, filled as the jobs are taken

        def jobs() -> Iterator[ProxyJob]:
            for candidate in candidates:
                kept = self.kept(candidate)
                key = hashlib.blake2b(kept, digest_size=16).digest()
                keeper = self._keeper.setdefault(key, candidate.name)
                if keeper != candidate.name:
                    self.same_as[candidate.name] = keeper
                if key not in first_of:
                    first_of[key] = len(first_of)
                    yield self.job(kept, run)
                job_of.append(first_of[key])

        results: list[float] = []
        given = 0
        for accuracy in self.pool.run(jobs()):
            results.append(accuracy)
            while given < len(job_of) and job_of[given] < len(results):
                yield results[job_of[given]]
                given += 1
        yield from (results[job] for job in job_of[given:])

    def accuracy(self, candidate: Candidate, run: ProxyRun) -> float:
        return next(self.accuracies([candidate], run))

    def ceiling(self, candidate: Candidate) -> float:
        """The highest validation accuracy a student taught ``candidate`` can reach: the
        (weighted) share of validation images whose class its labels hold."""
        taught = np.unique(self.predicted[self.kept(candidate)])
        return self.validation.accuracy_within(taught)


def size_row(work: ScoredWork, candidate: Candidate, key: SigningKey) -> PlanRow:
    """The candidate's payload from the full work directory: exact signed size, coverage."""
    config, score = work.resolve(candidate.config(), candidate.score)
    kept = work.ranked().select(config, score)
    created = int(time.time())
    stamp = SenderStamp(key.sender, SIZE_SEQUENCE, created + 7 * 86400)
    payload = work.payload(kept, config, score, sender=stamp, created=created)
    encoded = work.encode(payload, key)
    counts = np.bincount(payload.labels, minlength=len(work.scored.class_names))
    return PlanRow(
        name=candidate.name,
        candidate=candidate,
        payload_bytes=len(encoded.data),
        kept_images=int(kept.size),
        classes_covered=int((counts > 0).sum()),
        smallest_class_share=float(counts.min() / max(1, kept.size)),
    )


def _check_plannable(work: ScoredWork, reference: ReferenceSource, train: LabeledImages) -> None:
    """The plan needs the reference set and the task the work directory was scored with."""
    scored, manifest = work.scored, reference.manifest
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


def by_ordering(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates grouped by the ordering of the rows they select from (see
    :class:`RankedSelection`: each ordering is sorted once)."""
    return sorted(candidates, key=lambda c: order_key(c.config(), c.score))


@dataclass(frozen=True)
class SplitTrial:
    """One split of the task for the plan: how it split (with its split teacher's
    validation accuracy), the proxy over that teacher's selections, and what the split
    measured besides (the domain gap, measured only for the first split, whose gap the
    plan reports; the deployment weighting)."""

    split: PlanSplit
    proxy: Proxy
    gap: Callable[[], DomainGap]
    deployment: DeploymentEvidence | None = None


SplitTrials = Callable[[int], SplitTrial]  # the split (and its split teacher) of a fold


@dataclass(frozen=True)
class Measured:
    """Every candidate's row, the noise, and what each split measured (the first split's
    domain gap and deployment weighting)."""

    rows: list[PlanRow]
    noise: PlanNoise
    splits: list[PlanSplit]
    gap: DomainGap
    deployment: DeploymentEvidence | None
    workers_worth_starting: bool = False  # its proxy runs were worth starting workers for


def measure_candidates(
    work: ScoredWork, trials: SplitTrials, settings: PlanSettings, progress: bool
) -> Measured:
    """Screen every candidate of the grid, confirm the best share and the screen's front
    with longer runs, measure the noise, then judge the finalists under the further
    splits (see the module docstring)."""
    measured = _measure_first_split(work, trials, settings, progress)
    if settings.teacher_splits < 2:
        return measured
    finalists = pick_finalists(measured.rows, measured.noise, settings.finalists)
    work.release_ranking()  # every payload is sized: held no longer while a split scores
    splits = [measured.splits[0]]
    for k in range(1, settings.teacher_splits):  # one split teacher's scores held at a time
        trial = trials(k)
        trial.proxy.pool.worth_starting = measured.workers_worth_starting  # runs as long
        splits.append(judge_under_split(trial, finalists, progress))
    noise = split_noise(finalists, measured.noise)
    for row in finalists:
        row.predicted_accuracy = float(np.mean([row.predicted_accuracy, *row.split_accuracies]))
        row.stage = "final"
    return replace(measured, noise=noise, splits=splits)


def _measure_first_split(
    work: ScoredWork, trials: SplitTrials, settings: PlanSettings, progress: bool
) -> Measured:
    """Every candidate of the grid (the scores both the work directory and the split
    teacher have) measured on the plan's own split; its proxy is stopped, and its
    teacher's scores let go, after."""
    first = trials(0)
    candidates = candidate_grid(settings.keeps, usable_scores(work, first.proxy.scores))
    with first.proxy as proxy:
        rows = screen_candidates(work, proxy, candidates, progress)
        confirm_candidates(proxy, rows, progress)
        noise = measure_noise(proxy, rows, progress)
        started = proxy.pool.worth_starting
    return Measured(rows, noise, [first.split], first.gap(), first.deployment, started)


def pick_finalists(rows: list[PlanRow], noise: PlanNoise, count: int) -> list[PlanRow]:
    """The confirmed rows predicted within twice the noise band of the best: the best of
    each keep fraction first, then the next best (at least the best two, at most
    ``count``), and the row the choice would take now.

    The choice trades bytes against accuracy, so the finalists span the sizes within
    reach: the top few of one noisy ranking are often neighbours of one size, and a
    larger payload that teaches more would never be judged again."""
    confirmed = [r for r in rows if r.stage == "confirm"]
    ranked = distinct_best(confirmed, len(confirmed))
    best = ranked[0].predicted_accuracy
    near = [r for r in ranked if r.predicted_accuracy >= best - 2 * noise.band - 1e-12]
    best_of_keep: dict[float, PlanRow] = {}
    for row in near:  # best first: each keep's first row is its best, in the same order
        best_of_keep.setdefault(row.candidate.keep, row)
    firsts = {r.name for r in best_of_keep.values()}
    spread = [*best_of_keep.values(), *(r for r in ranked if r.name not in firsts)]
    finalists = spread[: max(2, min(count, len(near)))]
    chosen = choose(confirmed, band=noise.choice_band)
    return with_copies([*finalists, chosen], confirmed)


def distinct_best(rows: list[PlanRow], count: int) -> list[PlanRow]:
    """The ``count`` best predicted rows, counting a selection once."""
    return counted_once(sorted(rows, key=lambda r: -r.predicted_accuracy))[:count]


def with_copies(picked: list[PlanRow], rows: list[PlanRow]) -> list[PlanRow]:
    """``picked`` (a selection once) and the other ``rows`` that keep the same rows as
    one of them (measured with them, at no cost: a selection trains once per run)."""
    picked = counted_once(picked)
    keys, names = {selection_key(r) for r in picked}, {r.name for r in picked}
    return picked + [r for r in rows if selection_key(r) in keys and r.name not in names]


def judge_under_split(trial: SplitTrial, finalists: list[PlanRow], progress: bool) -> PlanSplit:
    """Each finalist's confirmation-length run under another split: its selection by that
    split's teacher, with its labels, scored on its validation images."""
    from tqdm import tqdm

    settings = trial.proxy.settings
    run = ProxyRun(settings.confirm_steps, settings.confirm_batch_size, trial.split.seed + 1)
    with trial.proxy as proxy:
        accuracies = proxy.accuracies((r.candidate for r in finalists), run)
        desc = f"plan: split {trial.split.fold + 1}"
        bar = tqdm(accuracies, total=len(finalists), desc=desc, unit="cand", disable=not progress)
        for row, accuracy in zip(finalists, bar, strict=True):
            row.split_accuracies.append(accuracy)
    return trial.split


def screen_candidates(
    work: ScoredWork, proxy: Proxy, candidates: list[Candidate], progress: bool
) -> list[PlanRow]:
    """Every candidate's payload size and, within the byte budget, its short-run
    accuracy, in the grid's order (a typed error when no candidate fits the budget)."""
    from tqdm import tqdm

    settings = proxy.settings
    key = SigningKey.generate(settings.sender_id)
    screen_run = ProxyRun(settings.screen_steps, settings.batch_size, settings.seed)
    by_name: dict[str, PlanRow] = {}
    fitting: list[Candidate] = []  # in the order their accuracies come

    def within_budget() -> Iterator[Candidate]:
        for candidate in by_ordering(candidates):
            row = by_name[candidate.name] = size_row(work, candidate, key)
            if row.payload_bytes > settings.max_bytes:
                row.stage = OVER_BUDGET
                bar.total -= 1  # sized, and not trained on
                continue
            fitting.append(candidate)
            yield candidate

    accuracies = proxy.accuracies(within_budget(), screen_run)
    bar = tqdm(
        accuracies, total=len(candidates), desc="plan: screen", unit="cand", disable=not progress
    )
    for done, accuracy in enumerate(bar):
        row = by_name[fitting[done].name]
        row.screen_accuracy = row.predicted_accuracy = accuracy
        row.same_as = proxy.same_as.get(row.name)
    rows = [by_name[candidate.name] for candidate in candidates]
    if not fitting:
        raise nothing_fits(
            rows,
            f"candidate payload fits the plan's byte budget of {settings.max_bytes} bytes",
            "raise --max-bytes, or plan smaller keep fractions (--keeps); nothing written",
        )
    return rows


def reachable_front(proxy: Proxy, rows: list[PlanRow], best_screen: float) -> list[str]:
    """The screen's rate-accuracy front, less the rows whose labels miss so many classes
    that no run could reach the best screen accuracy (a longer run of the best only
    rises above it); each front row's ceiling is recorded."""
    by_name = {r.name: r for r in rows}
    front = by_ordering([by_name[name].candidate for name in rate_front(rows)])
    for candidate in front:
        by_name[candidate.name].ceiling = proxy.ceiling(candidate)
    return [c.name for c in front if by_name[c.name].ceiling >= best_screen]


def confirm_candidates(proxy: Proxy, rows: list[PlanRow], progress: bool) -> None:
    """Train the screen's best share and its front again on the student's schedule."""
    from tqdm import tqdm

    settings = proxy.settings
    confirm_run = ProxyRun(settings.confirm_steps, settings.confirm_batch_size, settings.seed + 1)
    ranked = sorted(predicted(rows), key=lambda r: -r.screen_accuracy)
    promoted = {r.name for r in ranked[: max(1, round(settings.confirm_share * len(ranked)))]}
    promoted |= set(reachable_front(proxy, rows, ranked[0].screen_accuracy))
    confirm = [r for r in rows if r.name in promoted]
    confirm.sort(key=lambda r: order_key(r.candidate.config(), r.candidate.score))
    accuracies = proxy.accuracies((r.candidate for r in confirm), confirm_run)
    bar = tqdm(
        accuracies, total=len(confirm), desc="plan: confirm", unit="cand", disable=not progress
    )
    for row, accuracy in zip(confirm, bar, strict=True):
        row.confirm_accuracy = row.predicted_accuracy = accuracy
        row.stage = "confirm"


def measure_noise(proxy: Proxy, rows: list[PlanRow], progress: bool) -> PlanNoise:
    """Run the best confirmed candidates again with another seed (their prediction is
    then the mean of both runs) and measure the noise from the pairs; then, with one
    split, repeat the choice until it has two runs, so a lucky single run is never what
    wins (with further splits, the finalists' judgement under them is the choice's
    second run, and :func:`split_noise` counts a finalist's runs)."""
    from tqdm import tqdm

    settings = proxy.settings
    run = ProxyRun(settings.confirm_steps, settings.confirm_batch_size, settings.seed + 2)
    confirmed = [r for r in rows if r.stage == "confirm"]
    validation = proxy.validation.effective_images

    def repeated(row: PlanRow, accuracy: float) -> None:
        row.repeat_accuracy = accuracy
        row.predicted_accuracy = (row.confirm_accuracy + accuracy) / 2

    first = with_copies(distinct_best(confirmed, settings.noise_repeats), confirmed)
    bar = tqdm(total=len(first), desc="plan: repeat", unit="cand", disable=not progress)
    for row, accuracy in zip(
        first, proxy.accuracies((r.candidate for r in first), run), strict=True
    ):
        repeated(row, accuracy)
        bar.update()
    choice_repeats = settings.noise_repeats if settings.teacher_splits < 2 else 0
    for _ in range(choice_repeats):  # the choice too, until it has two runs
        noise = noise_of(confirmed, validation, settings.choose)
        chosen = choose(confirmed, band=noise.choice_band)
        if chosen.repeat_accuracy is not None:
            break
        bar.total += 1
        repeated(chosen, proxy.accuracy(chosen.candidate, run))
        bar.update()
    bar.close()
    return noise_of(confirmed, validation, settings.choose)


@dataclass(frozen=True)
class PlanInputs:
    """What either path's plan describes besides its measurements, for :func:`finish_plan`."""

    work: ScoredWork
    reference: dict[str, str | int]
    proxy: str  # what the proxy student is, in words


def finish_plan(
    inputs: PlanInputs,
    measured: Measured,
    out_dir: str | os.PathLike[str],
    settings: PlanSettings,
    started: float,
) -> Plan:
    """The plan of measured ``rows``: chosen, and written as plan.json, plan.png, plan.txt."""
    work, rows, noise = inputs.work, measured.rows, measured.noise
    plan = Plan(
        work_dir=str(work.path.resolve()),
        scores_sha256=file_digest(work.path / SCORES_FILE),
        reference=inputs.reference,
        task=work.scored.task,
        classes=list(work.scored.class_names),
        split=measured.splits[0],
        split_teacher_validation_accuracy=measured.splits[0].teacher_accuracy,
        evidence=PlanEvidence(measured.gap, measured.gap.strategy),
        settings=settings.as_json(),
        proxy=inputs.proxy,
        candidates=rows,
        front=rate_front(rows),
        chosen=choose(rows, band=noise.choice_band).name,
        seconds=round(time.perf_counter() - started, 1),
        noise=noise,
        fleet=None if work.fleet is None else work.fleet.as_json(),
        deployment=measured.deployment,
        more_splits=measured.splits[1:],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_plan_outputs(out, plan)
    return plan


def proxy_words(settings: PlanSettings, images: str, validation: int) -> str:
    """What the proxy student is, for plan.json."""
    return (
        f"small CNN trained from scratch on the selected reference {images} with the split "
        f"teacher's hard labels ({settings.screen_steps} steps of {settings.batch_size} for "
        f"all, {settings.confirm_steps} of {settings.confirm_batch_size} for the confirmed), "
        f"accuracy on the {validation} validation images"
    )


def weighted_validation(
    validation: LabeledImages,
    scenery: Scenery | None,
    features: np.ndarray | None,
    settings: PlanSettings,
) -> tuple[Validation, DeploymentEvidence | None]:
    """The validation images, weighted towards the deployment's ``scenery`` when given
    (``features``: the validation images in the scenery's feature)."""
    if scenery is None or features is None:
        return Validation.equal(validation), None
    return weigh_validation(validation, features, scenery, settings.seed)


def usable_scores(work: ScoredWork, split_scores: Iterable[str]) -> tuple[str, ...]:
    """The registered scores both the work directory and the split teacher have."""
    have = set(split_scores)
    return tuple(s for s in score_names() if s in work.scored.scores and s in have)


def make_plan(
    reference: ReferenceSource,
    train: LabeledImages,
    work_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    settings: PlanSettings,
    progress: bool = True,
) -> Plan:
    """Predict every candidate's accuracy and size from the reference images; write
    plan.json, plan.png, plan.txt."""
    started = time.perf_counter()
    work = ScoredWork.open(work_dir, fleet=settings.fleet)
    _check_plannable(work, reference, train)
    scenery = None
    if settings.deployment:
        _, channels, side, _ = train.images.shape
        pixels = pixel_features(load_unlabeled_images(settings.deployment, side, channels))
        scenery = Scenery(str(settings.deployment), pixels, "pixels")
    images = reference_images(reference, train.images.shape[1])

    def trial(fold: int) -> SplitTrial:
        """The split of ``fold``, its teacher trained on the images and scoring the pool."""
        seed = settings.split_seed(fold)
        fraction = settings.validation_fraction
        teacher_part, validation = split_task(train, fraction, settings.seed, fold)
        teacher = replace(settings.teacher, seed=seed)
        scored = teacher_scores(images, teacher_part, validation, teacher, progress)
        split = SplitScores(scored.scores, scored.predicted)
        features = None if scenery is None else pixel_features(validation.images)
        weighted, evidence = weighted_validation(validation, scenery, features, settings)
        proxy = Proxy(images.__getitem__, split, work.excluded, weighted, settings)
        accuracy = scored.outputs.report.test_accuracy
        counts = PlanSplit(teacher_part.labels.size, validation.labels.size, seed, accuracy, fold)
        gap = domain_gap(scored.outputs)  # cheap here, and the outputs are let go
        return SplitTrial(counts, proxy, lambda: gap, evidence)

    measured = measure_candidates(work, trial, settings, progress)
    words = proxy_words(settings, "images", measured.splits[0].validation)
    inputs = PlanInputs(work, reference.manifest.summary(), words)
    return finish_plan(inputs, measured, out_dir, settings, started)
