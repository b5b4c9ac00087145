"""The in-memory scoring path: a teacher trained on the task's images scores every
reference image, for reference sets that fit in memory (the embedded glyph world, small
ImageFolders).

The teacher (a small CNN on pixels, or a linear probe on an embedder's features) labels
and embeds every reference image; every registered row score (:mod:`.scores`) and the
kNN relevance follow, and the work directory is written as the stored-embeddings path
writes it (:mod:`.work_dir`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError, TaskDataError
from protocol.reference.base import ReferenceSource
from protocol.task_data import LabeledImages
from sender.embedding import index as faiss_index
from sender.embedding.embedders import Embedder, PixelEmbedder
from sender.scoring.domain_gap import DomainGap, measure_domain_gap, split_reference_sample
from sender.scoring.embedding_teachers import train_probe
from sender.scoring.image_teachers import CnnTeacher
from sender.scoring.scores import COVER, KNN, ScoreRows, knn_relevance, row_scores
from sender.scoring.teacher_kinds import IMAGES, teacher_for
from sender.scoring.work_dir import (
    REFERENCE_EMBEDDINGS,
    SCORES_FILE,
    LeakageCandidates,
    ScoreReport,
    ScoresFile,
    TeacherSummary,
    predicted_histogram,
    save_embeddings,
)


@dataclass(frozen=True)
class TeacherSettings:
    """Which teacher scores the task on this path, and how it is trained."""

    kind: str = "cnn"
    embedder: Embedder | None = None  # the probe's (e.g. --clip-model/--clip-weights)
    epochs: int = 40  # the CNN's
    knn_k: int = 5  # labeled images per class for kNN relevance
    temperature: float = 1.0  # of the energy score
    seed: int = 0


def reference_images(reference: ReferenceSource, channels: int, chunk: int = 16384) -> np.ndarray:
    """The whole (in-memory sized) reference set; its channels must be the task's."""
    images = np.concatenate([images for _, images in reference.iter_chunks(chunk)])
    if images.shape[1] != channels:
        raise TaskDataError(
            f"task images have {channels} channels, reference images "
            f"{images.shape[1]}: convert the task to match the reference set"
        )
    return images


@dataclass
class TeacherOutputs:
    """What a teacher gives the scoring pass: logits and embeddings of the reference set
    and the task, and embeddings for the near-duplicate (leakage) check."""

    report: TeacherSummary  # with its test accuracy
    logits: np.ndarray  # [n, k] reference logits
    reference_embeddings: np.ndarray  # [n, d] for kNN relevance and the domain gap
    train_embeddings: np.ndarray  # [t, d]
    duplicate_reference: np.ndarray  # [n, d'] for the leakage index
    duplicate_test: np.ndarray | None  # [s, d'] test images, if any
    duplicate_train: np.ndarray  # [t, d'] the task's training images, for the domain gap
    embedder: str
    duplicate_embedder: str
    score_start: float  # when scoring (as opposed to teacher training) began


@dataclass
class TaskScores:
    """A teacher's outputs, every score of every reference image, and its labels."""

    outputs: TeacherOutputs
    scores: dict[str, np.ndarray]  # name -> float32 [n], lower is more relevant
    predicted: np.ndarray  # int64 [n]


def _cnn_teacher(
    images: np.ndarray,
    train: LabeledImages,
    test: LabeledImages | None,
    settings: TeacherSettings,
    progress: bool,
) -> TeacherOutputs:
    """A small CNN trained on the task; its penultimate features embed both sides."""
    teacher = CnnTeacher(epochs=settings.epochs, seed=settings.seed)
    report = teacher.fit(train, progress=progress)
    score_start = time.perf_counter()
    logits, ref_emb = teacher.logits(images, progress=progress)
    _, train_emb = teacher.logits(train.images)
    accuracy = None
    if test is not None:
        test_logits, _ = teacher.logits(test.images)
        accuracy = float((test_logits.argmax(1) == test.labels).mean())
    # the teacher's features cluster by class, so duplicates are looked for in pixels
    pixels = PixelEmbedder()
    return TeacherOutputs(
        report=replace(report, test_accuracy=accuracy),
        logits=logits,
        reference_embeddings=ref_emb,
        train_embeddings=train_emb,
        duplicate_reference=pixels.embed(images),
        duplicate_test=None if test is None else pixels.embed(test.images),
        duplicate_train=pixels.embed(train.images),
        embedder="teacher-features",
        duplicate_embedder=pixels.name,
        score_start=score_start,
    )


def _probe_teacher(
    images: np.ndarray,
    train: LabeledImages,
    test: LabeledImages | None,
    settings: TeacherSettings,
) -> TeacherOutputs:
    """A linear probe on the embedder's features (the same probe as on stored embeddings)."""
    embedder = settings.embedder
    if embedder is None:
        raise ConfigError("the probe teacher needs an embedder (e.g. --clip-model/--clip-weights)")
    score_start = time.perf_counter()
    ref_emb = embedder.embed(images)
    train_emb = embedder.embed(train.images)
    head = train_probe(train_emb, train.labels, len(train.class_names), seed=settings.seed)
    test_emb = None if test is None else embedder.embed(test.images)
    accuracy = None
    if test is not None:
        accuracy = float((head.logits(test_emb).argmax(1) == test.labels).mean())
    return TeacherOutputs(
        report=TeacherSummary("probe", int(train.labels.size), accuracy),
        logits=head.logits(ref_emb),
        reference_embeddings=ref_emb,
        train_embeddings=train_emb,
        duplicate_reference=ref_emb,
        duplicate_test=test_emb,
        duplicate_train=train_emb,
        embedder=embedder.name,
        duplicate_embedder=embedder.name,
        score_start=score_start,
    )


def teacher_scores(
    images: np.ndarray,
    train: LabeledImages,
    test: LabeledImages | None,
    settings: TeacherSettings,
    progress: bool = True,
) -> TaskScores:
    """Train the teacher on ``train`` and score ``images`` with every registered score."""
    if teacher_for(settings.kind, IMAGES) == "cnn":
        outputs = _cnn_teacher(images, train, test, settings, progress)
    else:
        outputs = _probe_teacher(images, train, test, settings)
    predicted = outputs.logits.argmax(1).astype(np.int64)
    rows = ScoreRows(outputs.logits, outputs.reference_embeddings, settings.temperature)
    scores = row_scores(rows)
    relevance = knn_relevance(
        outputs.reference_embeddings,
        predicted,
        outputs.train_embeddings,
        train.labels,
        settings.knn_k,
    )
    scores[KNN], scores[COVER] = relevance.scores, relevance.cover()
    return TaskScores(outputs, scores, predicted)


def domain_gap(outputs: TeacherOutputs) -> DomainGap:
    """How far the task's training images are from the reference set, measured in the
    duplicate-check embedding: pixels or CLIP, never the teacher's own features, which
    are trained to map any image onto the task's classes and so call everything near."""
    reference = outputs.duplicate_reference
    sample_rows, query_rows = split_reference_sample(reference.shape[0], sample=20_000)
    return measure_domain_gap(
        reference[sample_rows], reference[query_rows], outputs.duplicate_train
    )


def score_reference(
    reference: ReferenceSource,
    train: LabeledImages,
    test: LabeledImages | None,
    out_dir: str | os.PathLike[str],
    settings: TeacherSettings,
    progress: bool = True,
) -> ScoreReport:
    """Train the teacher, score every reference image, and write the work directory."""
    teacher_for(settings.kind, IMAGES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if test is not None and test.class_names != train.class_names:
        raise TaskDataError("train and test splits list different classes")
    started = time.perf_counter()
    images = reference_images(reference, train.images.shape[1])
    scored = teacher_scores(images, train, test, settings, progress)
    outputs = scored.outputs
    scoring_seconds = time.perf_counter() - outputs.score_start
    gap = domain_gap(outputs)
    leakage = None
    if outputs.duplicate_test is not None:
        index = faiss_index.build_index(outputs.duplicate_reference)
        leakage = LeakageCandidates.find(index, outputs.duplicate_test)
    save_embeddings(out / REFERENCE_EMBEDDINGS, outputs.duplicate_reference)
    manifest = reference.manifest
    ScoresFile(
        scores=scored.scores,
        predicted=scored.predicted,
        class_names=train.class_names,
        reference_name=manifest.name,
        reference_fingerprint=manifest.fingerprint,
        reference_size=len(reference),
        task=train.name,
        recommended_strategy=gap.strategy,
        reference_block_starts=manifest.block_starts(),
        leakage=leakage,
    ).write(out / SCORES_FILE)
    report = ScoreReport(
        path=IMAGES,
        task=train.name,
        classes=list(train.class_names),
        reference=manifest.summary(),
        embedder=outputs.embedder,
        duplicate_check_embedder=outputs.duplicate_embedder,
        teacher=outputs.report,
        domain_gap=gap,
        recommended_strategy=gap.strategy,
        predicted_histogram=predicted_histogram(scored.predicted, len(train.class_names)),
        scoring_seconds=scoring_seconds,
        scoring_images_per_second=len(reference) / max(scoring_seconds, 1e-9),
        knn_relevance=None,
        total_seconds=time.perf_counter() - started,
    )
    report.write(out)
    return report
