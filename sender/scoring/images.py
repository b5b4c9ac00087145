"""The sender's two stages: score the reference set once, then select and write payloads.

``score`` is the expensive pass (teacher training, one forward pass or embedding
lookup per reference image); it writes a work directory that ``make_payload``
reads as often as needed, e.g. to try keep fractions against a byte budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError, TaskDataError
from protocol.reference.base import ReferenceSource
from protocol.task_data import LabeledImages
from sender.embedding import index as faiss_index
from sender.embedding.embedders import Embedder, PixelEmbedder
from sender.scoring.domain_gap import DomainGap, measure_domain_gap, split_reference_sample
from sender.scoring.embedding_teachers import train_probe
from sender.scoring.image_teachers import CnnTeacher, TeacherReport
from sender.scoring.scores import energy, entropy, knn_relevance
from sender.scoring.teacher_kinds import IMAGE_TEACHERS
from sender.scoring.work_dir import (
    REFERENCE_EMBEDDINGS,
    SCORE_REPORT,
    SCORES_FILE,
    TEST_EMBEDDINGS,
    ScoresFile,
    save_embeddings,
)

INDEX_FILE = faiss_index.INDEX_FILE


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

    report: dict[str, Any]  # the teacher's report, with its test accuracy
    logits: np.ndarray  # [n, k] reference logits
    reference_embeddings: np.ndarray  # [n, d] for kNN relevance and the domain gap
    train_embeddings: np.ndarray  # [t, d]
    duplicate_reference: np.ndarray  # [n, d'] for the leakage index
    duplicate_test: np.ndarray | None  # [s, d'] test images, if any
    duplicate_train: np.ndarray  # [t, d'] the task's training images, for the domain gap
    embedder: str
    duplicate_embedder: str
    score_start: float  # when scoring (as opposed to teacher training) began


def _cnn_teacher(
    images: np.ndarray,
    train: LabeledImages,
    test: LabeledImages | None,
    epochs: int,
    seed: int,
    progress: bool,
) -> TeacherOutputs:
    """A small CNN trained on the task; its penultimate features embed both sides."""
    teacher = CnnTeacher(epochs=epochs, seed=seed)
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
        report=asdict(report) | {"test_accuracy": accuracy},
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
    embedder: Embedder | None,
    seed: int,
) -> TeacherOutputs:
    """A linear probe on the embedder's features (the same probe as on stored embeddings)."""
    if embedder is None:
        raise ConfigError("the probe teacher needs an embedder (e.g. --clip-model/--clip-weights)")
    score_start = time.perf_counter()
    ref_emb = embedder.embed(images)
    train_emb = embedder.embed(train.images)
    head = train_probe(train_emb, train.labels, len(train.class_names), seed=seed)
    test_emb = None if test is None else embedder.embed(test.images)
    accuracy = None
    if test is not None:
        accuracy = float((head.logits(test_emb).argmax(1) == test.labels).mean())
    report = TeacherReport(kind="probe", train_images=int(train.labels.size))
    return TeacherOutputs(
        report=asdict(report) | {"test_accuracy": accuracy},
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


def check_image_teacher(kind: str) -> None:
    """Refuse a teacher that does not train on images (before any work is done)."""
    if kind not in IMAGE_TEACHERS:
        raise ConfigError(f"unknown teacher {kind!r} ({' or '.join(IMAGE_TEACHERS)})")


def teacher_scores(
    images: np.ndarray,
    train: LabeledImages,
    test: LabeledImages | None,
    teacher_kind: str = "cnn",
    embedder: Embedder | None = None,
    temperature: float = 1.0,
    knn_k: int = 5,
    teacher_epochs: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> tuple[TeacherOutputs, dict[str, np.ndarray], np.ndarray]:
    """Train the teacher on ``train`` and score ``images``: (outputs, scores, predicted)."""
    check_image_teacher(teacher_kind)
    if teacher_kind == "cnn":
        outputs = _cnn_teacher(images, train, test, teacher_epochs, seed, progress)
    else:
        outputs = _probe_teacher(images, train, test, embedder, seed)
    predicted = outputs.logits.argmax(1).astype(np.int64)
    scores = {
        "energy": energy(outputs.logits, temperature),
        "entropy": entropy(outputs.logits),
        "knn": knn_relevance(
            outputs.reference_embeddings, predicted, outputs.train_embeddings, train.labels, knn_k
        ),
    }
    return outputs, scores, predicted


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
    teacher_kind: str = "cnn",
    embedder: Embedder | None = None,
    temperature: float = 1.0,
    knn_k: int = 5,
    teacher_epochs: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the teacher, score every reference image, and write the work directory."""
    check_image_teacher(teacher_kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if test is not None and test.class_names != train.class_names:
        raise TaskDataError("train and test splits list different classes")
    started = time.perf_counter()
    images = reference_images(reference, train.images.shape[1])
    outputs, scores, predicted = teacher_scores(
        images,
        train,
        test,
        teacher_kind,
        embedder,
        temperature,
        knn_k,
        teacher_epochs,
        seed,
        progress,
    )
    scoring_seconds = time.perf_counter() - outputs.score_start
    gap = domain_gap(outputs)
    faiss_index.save_index(faiss_index.build_index(outputs.duplicate_reference), out / INDEX_FILE)
    save_embeddings(out / REFERENCE_EMBEDDINGS, outputs.duplicate_reference)
    if outputs.duplicate_test is not None:
        save_embeddings(out / TEST_EMBEDDINGS, outputs.duplicate_test)
    manifest = reference.manifest
    ScoresFile(
        scores=scores,
        predicted=predicted,
        class_names=train.class_names,
        reference_name=manifest.name,
        reference_fingerprint=manifest.fingerprint,
        reference_size=len(reference),
        task=train.name,
        recommended_strategy=gap.strategy,
        reference_block_starts=manifest.block_starts(),
    ).write(out / SCORES_FILE)
    summary = {
        "task": train.name,
        "reference": manifest.summary(),
        "teacher": outputs.report,
        "embedder": outputs.embedder,
        "duplicate_check_embedder": outputs.duplicate_embedder,
        "domain_gap": gap.as_dict(),
        "recommended_strategy": gap.strategy,
        "predicted_histogram": np.bincount(predicted, minlength=len(train.class_names)).tolist(),
        "scoring_seconds": scoring_seconds,
        "scoring_images_per_second": len(reference) / max(scoring_seconds, 1e-9),
        "total_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / SCORE_REPORT, summary)
    return summary
