"""The sender's two stages: score the reference set once, then select and write payloads.

``score`` is the expensive pass (teacher training, one forward pass or embedding
lookup per reference image); it writes a work directory that ``make_payload``
reads as often as needed, e.g. to try keep fractions against a byte budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomic_files import write_json_atomic
from protocol.errors import BudgetError, ConfigError, TaskDataError
from protocol.payload import (
    EncodedPayload,
    Payload,
    SenderStamp,
    encode_payload_detailed,
    information_bound_bytes,
    selection_text,
    write_payload,
)
from protocol.reference.base import ReferenceSource
from protocol.signing import SigningKey
from protocol.task_data import LabeledImages
from sender import index as faiss_index
from sender.consensus import consensus_outliers
from sender.domain_gap import DomainGap, measure_domain_gap, split_reference_sample
from sender.embedders import Embedder, PixelEmbedder
from sender.embedding_store import EmbeddingStore
from sender.embedding_teachers import train_probe
from sender.scoring import energy, entropy, knn_relevance
from sender.selection import SelectionConfig, select
from sender.signer import PayloadSigner
from sender.teacher_kinds import IMAGE_TEACHERS
from sender.teachers import CnnTeacher, TeacherReport
from sender.work_dir import (
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


@dataclass
class ScoredWork:
    """A scored work directory opened for selecting: its scores, and the rows no
    payload may keep (unreadable images, and near-duplicates of the task's test images
    unless the leakage check only reports them)."""

    path: Path
    scored: ScoresFile
    duplicates: np.ndarray
    leakage: dict[str, Any] | None
    excluded: np.ndarray

    @classmethod
    def open(
        cls,
        work_dir: str | os.PathLike[str],
        leak_threshold: float = 0.97,
        exclude_leaks: bool = True,
    ) -> ScoredWork:
        """Read ``scores.npz`` and run the leakage check once, for any number of selections."""
        work = Path(work_dir)
        scored = ScoresFile.read(work / SCORES_FILE)
        duplicates, leakage = _leakage_check(work, scored, leak_threshold, exclude_leaks)
        excluded = np.union1d(scored.excluded, duplicates) if exclude_leaks else scored.excluded
        return cls(work, scored, duplicates, leakage, excluded)

    def resolve(self, config: SelectionConfig, score: str | None) -> tuple[SelectionConfig, str]:
        """The concrete configuration and score: ``auto`` becomes the recommended
        strategy, no score the best one present (knn, else energy; energy for inverse)."""
        available = self.scored.available_scores
        if config.strategy == "auto":
            config = replace(config, strategy=self.scored.recommended_strategy)
        if score is None:  # high energy is the inverse rule; "least relevant" means nothing
            relevance = config.strategy != "inverse" and "knn" in available
            score = "knn" if relevance else "energy"
        if score not in available:
            raise ConfigError(
                f"score {score!r} is not in {self.path / SCORES_FILE} "
                f"(available: {', '.join(available)})"
            )
        return config, score

    def select(
        self, config: SelectionConfig, score: str, excluded: np.ndarray | None = None
    ) -> np.ndarray:
        """The kept rows of a resolved configuration (``excluded``: further rows to skip)."""
        scored = self.scored
        skip = self.excluded if excluded is None else np.union1d(self.excluded, excluded)
        return select(
            scored.scores[score], scored.predicted, len(scored.class_names), config, excluded=skip
        )

    def payload(
        self,
        kept: np.ndarray,
        config: SelectionConfig,
        score: str,
        task_id: str | None = None,
        sender: SenderStamp | None = None,
        created: int | None = None,
    ) -> Payload:
        """The payload of ``kept`` rows with the teacher's labels."""
        scored = self.scored
        return Payload(
            task=task_id or scored.task,
            reference_name=scored.reference_name,
            reference_fingerprint=scored.reference_fingerprint,
            reference_size=scored.reference_size,
            class_names=scored.class_names,
            indices=kept,
            labels=scored.predicted[kept].astype(np.int64),
            selection=config.as_header() | {"score": score},
            created=int(time.time()) if created is None else created,
            sender=sender,
        )

    def encode(self, payload: Payload, key: SigningKey | None = None) -> EncodedPayload:
        """The payload's bytes, in the smallest coding this reference's layout allows."""
        return encode_payload_detailed(payload, reference=self.scored.block_layout(), signer=key)


def make_payload(
    work_dir: str | os.PathLike[str],
    config: SelectionConfig,
    out_path: str | os.PathLike[str],
    score: str | None = None,
    task_id: str | None = None,
    leak_threshold: float = 0.97,
    exclude_leaks: bool = True,
    consensus_k: int = 0,
    consensus_agreement: float = 0.5,
    signer: PayloadSigner | None = None,
    max_bytes: int | None = None,
    sheet: tuple[ReferenceSource, Path] | None = None,
) -> dict[str, Any]:
    """Select from a scored work directory, write the payload, and return a summary.

    With ``signer`` the payload is signed (format v3) with the next sequence number
    of its sender; without it it is unsigned (development only).

    ``config.strategy == "auto"`` takes the strategy the domain-gap measurement
    recommended at scoring time. Reference images that are near-duplicates of the
    task's test images (cosine >= ``leak_threshold`` in the duplicate-check
    embedding) are excluded before selecting, unless ``exclude_leaks`` is False;
    unreadable reference images are always excluded. ``consensus_k > 0`` drops kept
    images whose nearest kept neighbours disagree with their label and refills them
    (see :mod:`sender.consensus`). A payload larger than ``max_bytes`` is not written
    (``BudgetError``). ``sheet``: (the local reference set, a PNG path) for a contact
    sheet of the kept images per class (:mod:`sender.contact_sheet`).
    """
    work = ScoredWork.open(work_dir, leak_threshold, exclude_leaks)
    config, score = work.resolve(config, score)
    scored = work.scored
    kept = work.select(config, score)
    consensus = None
    if consensus_k > 0:
        dropped = _consensus_outliers(work.path, scored, kept, consensus_k, consensus_agreement)
        kept = work.select(config, score, excluded=dropped)
        consensus = {
            "k": consensus_k,
            "min_agreement": consensus_agreement,
            "dropped": int(dropped.size),
        }
    warnings = selection_warnings(int(kept.size), len(scored.class_names), scored.reference_size)
    leakage = None if work.leakage is None else dict(work.leakage)
    if leakage is not None:
        leakage["kept_near_duplicates"] = int(np.intersect1d(kept, work.duplicates).size)
    created = int(time.time())
    stamp = signer.stamp(created) if signer else None
    payload = work.payload(kept, config, score, task_id, stamp, created)
    encoded = work.encode(payload, signer.key if signer else None)
    if max_bytes is not None and len(encoded.data) > max_bytes:
        raise BudgetError(
            f"the payload is {len(encoded.data)} bytes, over the budget of {max_bytes}: "
            "keep fewer images or raise the budget (nothing written)"
        )
    write_payload(out_path, encoded.data)
    drawn = None if sheet is None else _contact_sheet(payload, scored, *sheet)
    k = len(scored.class_names)
    return {
        "payload": str(out_path),
        "payload_bytes": len(encoded.data),
        "kept": int(kept.size),
        "keep_fraction": kept.size / scored.reference_size,
        "body_coding": encoded.body,
        "signed": _signature_summary(payload, signer),
        "selection": payload.selection,
        "unreadable_excluded": int(scored.excluded.size),
        "class_histogram": payload.class_histogram(),
        "information_bound_bytes": round(
            information_bound_bytes(scored.reference_size, payload.labels, k), 1
        ),
        "leakage": leakage,
        "consensus": consensus,
        "warnings": warnings,
        "contact_sheet": drawn,
    }


def _contact_sheet(
    payload: Payload, scored: ScoresFile, reference: ReferenceSource, path: Path
) -> dict[str, Any]:
    """Draw the selection's contact sheet, or say why not (another reference set)."""
    from sender.contact_sheet import write_contact_sheet

    if reference.manifest.fingerprint != scored.reference_fingerprint:
        return {
            "skipped": f"the reference set {reference.manifest.name} is not the one this work "
            f"directory scored ({scored.reference_name}): name it with --reference"
        }
    title = f"{payload.task}: {selection_text(payload.selection)}"
    write_contact_sheet(
        path, reference, payload.indices, payload.labels, payload.class_names, title
    )
    return {"file": str(path)}


MIN_IMAGES_PER_CLASS = 10  # fewer, on average, is worth a warning


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


def _leakage_index(work: Path, embeddings_dir: str | None) -> Path | None:
    """The index to search for near-duplicates: the work directory's, else the store's."""
    candidates = [work / INDEX_FILE]
    if embeddings_dir:
        candidates.append(Path(embeddings_dir) / INDEX_FILE)
    return next((path for path in candidates if path.is_file()), None)


def _leakage_check(
    work: Path, scored: ScoresFile, threshold: float, exclude: bool
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Reference rows that are near-duplicates of the task's test images, and the
    report of the check (None when the work directory has no test images or index)."""
    index_path = _leakage_index(work, scored.embeddings_dir)
    if not (work / TEST_EMBEDDINGS).is_file() or index_path is None:
        return np.zeros(0, np.int64), None
    queries = np.load(work / TEST_EMBEDDINGS).astype(np.float32)
    exact = None
    if scored.embeddings_dir and index_path.parent == Path(scored.embeddings_dir):
        exact = EmbeddingStore(scored.embeddings_dir).read_rows
    duplicates, hit_queries = faiss_index.near_duplicate_ids(
        faiss_index.load_index(index_path), queries, threshold, exact=exact
    )
    return duplicates, {
        "threshold": threshold,
        "test_images_checked": int(queries.shape[0]),
        "test_images_with_near_duplicates": hit_queries,
        "near_duplicate_reference_images": int(duplicates.size),
        "excluded": exclude,
    }


def _consensus_outliers(
    work: Path, scored: ScoresFile, kept: np.ndarray, k: int, agreement: float
) -> np.ndarray:
    """Kept rows whose ``k`` nearest kept neighbours mostly carry another label."""
    if scored.embeddings_dir:
        embeddings = EmbeddingStore(scored.embeddings_dir).read_rows(kept)
    elif (work / REFERENCE_EMBEDDINGS).is_file():
        embeddings = np.load(work / REFERENCE_EMBEDDINGS, mmap_mode="r")[kept]
    else:
        raise ConfigError(f"{work} has no reference embeddings for the consensus filter")
    return kept[consensus_outliers(embeddings, scored.predicted[kept], k, agreement)]


def _signature_summary(payload: Payload, signer: PayloadSigner | None) -> dict[str, Any] | None:
    if signer is None or payload.sender is None:
        return None
    return {
        "sender": signer.key.sender,
        "key_id": signer.key.key_id.hex(),
        "sequence": payload.sender.sequence,
        "expires": payload.sender.expires,
    }
