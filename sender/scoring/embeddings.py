"""The stored-embeddings scoring path (production): a teacher on CLIP embeddings,
streamed over the stored reference set.

Inputs: a merged embeddings directory (``plada-send embed`` + ``merge``, and its FAISS
index from ``plada-send index`` for kNN relevance and the leakage check), the same CLIP
weights (for the task's images and the class names), and the task as a labeled
ImageFolder and/or a list of class names. Output: the same work directory the in-memory
path writes (:mod:`.work_dir`), with every registered score (:mod:`.scores`), the
domain-gap evidence and the selection strategy it recommends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from protocol.errors import ConfigError, TaskDataError
from protocol.manifest import ReferenceManifest, reference_summary
from protocol.reference.encoded import UnreadableImage, decode_rgb
from protocol.task_data import (
    image_folder_files,
    load_labeled_images,
    load_unlabeled_images,
    task_name,
    unlabeled_image_files,
)
from sender.embedding.embedders import ClipEmbedder
from sender.embedding.index import INDEX_FILE, load_index
from sender.embedding.store import MANIFEST_FILE, EmbeddingStore
from sender.embedding.thumbnails import Thumbnailer
from sender.scoring.domain_gap import DomainGap, measure_domain_gap, split_reference_sample
from sender.scoring.embedding_teachers import KnnTeacher, train_probe, zero_shot_head
from sender.scoring.scores import COVER, KNN, KnnRelevance
from sender.scoring.stream import LinearHead, StreamOptions, StreamScores, score_chunks
from sender.scoring.stream_knn import stream_knn_relevance
from sender.scoring.teacher_kinds import EMBEDDINGS, teacher_for
from sender.scoring.work_dir import (
    SCORES_FILE,
    KnnSummary,
    LeakageCandidates,
    ScoreReport,
    ScoresFile,
    TeacherSummary,
    predicted_histogram,
)


def _block_starts(store_dir: str | os.PathLike[str], fingerprint_hex: str) -> np.ndarray:
    """The reference folders' starts from the store's manifest (empty when it is absent)."""
    path = Path(store_dir) / MANIFEST_FILE
    if not path.is_file():
        return np.zeros(0, np.int64)
    manifest = ReferenceManifest.load(path)
    if manifest.fingerprint_hex != fingerprint_hex:
        raise ConfigError(f"{path} is not the manifest of the embeddings beside it")
    return manifest.block_starts()


def read_class_names(spec: str) -> list[str]:
    """Class names from a text file (one per line) or a comma-separated list."""
    path = Path(spec)
    names = path.read_text().splitlines() if path.is_file() else spec.split(",")
    names = [n.strip() for n in names if n.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise TaskDataError(f"need at least two distinct class names, got {names[:5]}")
    return names


@dataclass
class EmbeddedSplit:
    """A labeled task split embedded with CLIP (and, for the plan, shrunk to thumbnails
    the way the reference rows were: :mod:`sender.embedding.thumbnails`)."""

    embeddings: np.ndarray  # [m, d] L2-normalised
    labels: np.ndarray  # [m]
    class_names: tuple[str, ...]
    thumbnails: np.ndarray | None = None  # uint8 [m, 3, S, S]

    def subset(self, rows: np.ndarray) -> EmbeddedSplit:
        """The split's ``rows``."""
        thumbnails = None if self.thumbnails is None else self.thumbnails[rows]
        return EmbeddedSplit(self.embeddings[rows], self.labels[rows], self.class_names, thumbnails)


def _task_pil_images(root: Path) -> tuple[list[Callable[[], Any]], np.ndarray, tuple[str, ...]]:
    """(a loader of each image as RGB PIL, labels, class names) of labeled task images:
    an ImageFolder ``<class>/<image>`` or a ``.npz`` of uint8 [N, C, H, W]."""
    from PIL import Image

    if root.suffix == ".npz":
        task = load_labeled_images(root)
        pixels = task.images.transpose(0, 2, 3, 1)
        if pixels.shape[3] == 1:
            pixels = pixels[..., 0]

        def array(i: int) -> Callable[[], Any]:
            return lambda: Image.fromarray(pixels[i]).convert("RGB")

        return [array(i) for i in range(len(task))], task.labels, tuple(task.class_names)
    files, labels, classes = image_folder_files(root)

    def decoded(file: Path) -> Callable[[], Any]:
        def load() -> Any:
            try:
                return decode_rgb(file.read_bytes(), str(file))
            except (UnreadableImage, OSError) as exc:
                raise TaskDataError(
                    f"task image {file} is unreadable: {exc}; fix or remove it"
                ) from exc

        return load

    return [decoded(file) for file in files], labels, classes


def _unlabeled_pil_images(path: Path) -> Iterator[Any]:
    """Each unlabeled image as RGB PIL, decoded one at a time: every image file under a
    directory (unreadable ones skipped), or the ``images`` of a ``.npz``
    (:func:`~protocol.task_data.load_unlabeled_images`'s forms)."""
    from PIL import Image

    if not path.is_dir():
        stored = load_unlabeled_images(path)  # as stored
        pixels = stored.transpose(0, 2, 3, 1)
        for image in pixels[..., 0] if pixels.shape[3] == 1 else pixels:
            yield Image.fromarray(image).convert("RGB")
        return
    for file in unlabeled_image_files(path):
        try:
            yield decode_rgb(file.read_bytes(), str(file))
        except (UnreadableImage, OSError):
            continue


def embed_unlabeled(embedder: ClipEmbedder, path: Path, batch_size: int = 64) -> np.ndarray:
    """Unlabeled images (a directory or a ``.npz``) embedded through CLIP's own
    preprocessing, as the task's were: [N, d] L2-normalised."""
    batches, batch = [], []
    for image in _unlabeled_pil_images(path):
        batch.append(embedder.preprocess(image))
        if len(batch) == batch_size:
            batches.append(embedder.embed_batch(torch.stack(batch)))
            batch = []
    if batch:
        batches.append(embedder.embed_batch(torch.stack(batch)))
    if not batches:
        raise TaskDataError(f"{path}: no image could be read")
    return np.concatenate(batches)


def embed_folder(
    embedder: ClipEmbedder,
    root: Path,
    batch_size: int = 64,
    thumbnailer: Thumbnailer | None = None,
) -> EmbeddedSplit:
    """Labeled task images (an ImageFolder or a ``.npz``) embedded through CLIP's own
    preprocessing; with a ``thumbnailer``, also their thumbnails from the same batches."""
    loaders, labels, classes = _task_pil_images(root)
    out, thumbnails = [], []
    for start in range(0, len(loaders), batch_size):
        images = torch.stack(
            [embedder.preprocess(load()) for load in loaders[start : start + batch_size]]
        )
        out.append(embedder.embed_batch(images))
        if thumbnailer is not None:
            thumbnails.append(thumbnailer(images))
    shrunk = np.concatenate(thumbnails) if thumbnails else None
    return EmbeddedSplit(np.concatenate(out), labels, classes, shrunk)


def _task_split(task: Path, name: str) -> str | None:
    """A task directory's ``name/`` ImageFolder or ``name.npz``, when it has one."""
    for found in (task / name, task / f"{name}.npz"):
        if found.exists():
            return str(found)
    return None


@dataclass(frozen=True)
class EmbeddingTask:
    """The task as the stored-embeddings path takes it: labeled images (train, optional
    test; ImageFolders or ``.npz``) and/or the class names."""

    train_dir: str | None = None
    test_dir: str | None = None
    class_names: tuple[str, ...] | None = None
    name: str | None = None

    @classmethod
    def from_folders(
        cls,
        task_dir: str | None,
        train_dir: str | None = None,
        test_dir: str | None = None,
        classes: str | None = None,
        name: str | None = None,
    ) -> EmbeddingTask:
        """``--task DIR`` (with ``train/`` and optional ``test/``), ``--train``/``--test``
        folders, ``--classes`` (a file or a,b,c) and ``--task-id``, as the CLI gives them."""
        if task_dir:
            task = Path(task_dir)
            train_dir = train_dir or _task_split(task, "train")
            test_dir = test_dir or _task_split(task, "test")
            name = name or task.name
        names = tuple(read_class_names(classes)) if classes else None
        return cls(train_dir, test_dir, names, name)

    @property
    def task_name(self) -> str:
        """The name written into the work directory (and the payload): ``--task-id``,
        else the name the image path gives the same labeled images (a ``.npz``'s own
        ``name``, else the file or folder, or the folder above a ``train`` split)."""
        if self.name:
            return self.name
        if not self.train_dir:
            return "task"
        train = Path(self.train_dir)
        return load_labeled_images(train).name if train.suffix == ".npz" else task_name(train)


@dataclass(frozen=True)
class StreamScoring:
    """How the stored embeddings are scored."""

    teacher: str = "probe"
    temperature: float = 1.0
    knn_k: int = 5  # labeled images per class for kNN relevance
    chunk_rows: int = 8192
    source: str = "f16"  # or "i8": the int8 copy (merge --int8)
    progress: bool = True


@dataclass
class _EmbeddedTask:
    """The task's splits embedded with CLIP, and its classes."""

    train: EmbeddedSplit | None
    test: EmbeddedSplit | None
    class_names: tuple[str, ...]


def _embed_task(embedder: ClipEmbedder, task: EmbeddingTask) -> _EmbeddedTask:
    """The task's labeled images (either split may be absent) embedded, and the classes,
    which both splits must list in the same order."""
    train = embed_folder(embedder, Path(task.train_dir)) if task.train_dir else None
    test = embed_folder(embedder, Path(task.test_dir)) if task.test_dir else None
    names = task.class_names or (train.class_names if train else None)
    if names is None:
        raise TaskDataError("give the task's labeled images (--task/--train) or --classes")
    for split in (train, test):
        if split is not None and split.class_names != names:
            raise TaskDataError(
                f"the task's folders {split.class_names} differ from the class names {names}"
            )
    return _EmbeddedTask(train, test, names)


def embedding_teacher(
    teacher: str,
    embedder: ClipEmbedder | None,
    train: EmbeddedSplit | None,
    names: tuple[str, ...],
    knn_k: int,
) -> LinearHead | KnnTeacher:
    """The teacher on embeddings: a linear head (probe, zero-shot) or the kNN teacher."""
    teacher = teacher_for(teacher, EMBEDDINGS)
    if teacher == "zeroshot":
        if embedder is None:
            raise ConfigError("the zero-shot teacher needs the CLIP model (--clip-weights)")
        return zero_shot_head(embedder, list(names))
    if train is None:
        raise TaskDataError(f"the {teacher} teacher needs labeled training images (--task/--train)")
    if teacher == "probe":
        return train_probe(train.embeddings, train.labels, len(names))
    return KnnTeacher(train.embeddings, train.labels, len(names), k=knn_k)


def teacher_accuracy(model: LinearHead | KnnTeacher, split: EmbeddedSplit) -> float:
    """The teacher's accuracy on a labeled split."""
    embeddings = split.embeddings
    logits = (
        model.logits_numpy(embeddings)
        if isinstance(model, KnnTeacher)
        else model.logits(embeddings)
    )
    return float((logits.argmax(1) == split.labels).mean())


def _teacher_summary(
    model: LinearHead | KnnTeacher, task: _EmbeddedTask, settings: StreamScoring
) -> TeacherSummary:
    """The teacher's kind, training images and accuracy on the task's test images, and
    how it scored (which the plan's split teacher repeats)."""
    accuracy = None if task.test is None else teacher_accuracy(model, task.test)
    train_images = 0 if task.train is None else len(task.train.labels)
    details = {"temperature": settings.temperature, "knn_k": settings.knn_k}
    return TeacherSummary(
        teacher_for(settings.teacher, EMBEDDINGS), train_images, accuracy, details
    )


def store_domain_gap(store: EmbeddingStore, target: np.ndarray) -> DomainGap:
    """The task's domain gap against a sample of the store's readable rows."""
    sample_rows, query_rows = split_reference_sample(store.n)
    valid = store.valid
    return measure_domain_gap(
        store.read_rows(sample_rows[valid[sample_rows]]),
        store.read_rows(query_rows[valid[query_rows]]),
        target,
    )


def store_index(store: EmbeddingStore) -> faiss.Index | None:
    """The store's FAISS index (``plada-send index``), or None when it has none."""
    path = store.root / INDEX_FILE
    return load_index(path) if path.is_file() else None


def _store_knn(
    store: EmbeddingStore,
    index: faiss.Index | None,
    train: EmbeddedSplit | None,
    scores: StreamScores,
    k: int,
) -> tuple[KnnRelevance | None, KnnSummary]:
    """The ``knn`` score and its owners (task images searching the store's FAISS index, see
    :mod:`sender.scoring.stream_knn`) when there are labeled task images and an index,
    and what it took; else None and why it was skipped."""
    if train is None:
        return None, KnnSummary(skipped="no labeled task images")
    if index is None:
        where = store.root / INDEX_FILE
        return None, KnnSummary(skipped=f"no index at {where}: run 'plada-send index {store.root}'")
    relevance, stats = stream_knn_relevance(
        index, train.embeddings, train.labels, scores.predicted, scores.energy, k=k
    )
    return relevance, KnnSummary(**stats)


def _leakage(
    store: EmbeddingStore, index: faiss.Index | None, test: EmbeddedSplit | None
) -> LeakageCandidates | None:
    """The test images' nearest stored rows, their similarities checked exactly against
    the stored embeddings (None without test images or an index)."""
    if test is None or index is None:
        return None
    return LeakageCandidates.find(index, test.embeddings, exact=store.read_rows)


@dataclass
class StoreScores:
    """Every per-row score of a teacher over a store (kNN relevance when it was computed),
    its predicted labels, and what the pass and the kNN search took."""

    scores: dict[str, np.ndarray]
    predicted: np.ndarray
    stream: StreamScores
    knn: KnnSummary


def score_store(
    store: EmbeddingStore,
    index: faiss.Index | None,
    model: LinearHead | KnnTeacher,
    train: EmbeddedSplit | None,
    settings: StreamScoring,
) -> StoreScores:
    """Stream ``model`` over every stored row, then kNN relevance of ``train``'s images
    through ``index`` (when both are there)."""
    options = StreamOptions(settings.temperature, settings.chunk_rows, settings.progress)
    chunks = store.iter_chunks(settings.chunk_rows, settings.source)
    scores = score_chunks(chunks, store.n, model, options)
    per_row = dict(scores.scores)
    knn, knn_stats = _store_knn(store, index, train, scores, settings.knn_k)
    if knn is not None:
        per_row[KNN], per_row[COVER] = knn.scores, knn.cover()
    return StoreScores(per_row, scores.predicted, scores, knn_stats)


def score_embeddings(
    store_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    embedder: ClipEmbedder,
    task: EmbeddingTask,
    settings: StreamScoring | None = None,
) -> ScoreReport:
    """Build the teacher, stream-score every stored reference row, write the work directory."""
    settings = settings or StreamScoring()
    started = time.perf_counter()
    store = EmbeddingStore(store_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if store.meta.model != embedder.model_name:
        raise ConfigError(
            f"the reference was embedded with {store.meta.model}, the task with "
            f"{embedder.model_name}: use the same model and weights"
        )
    embedded = _embed_task(embedder, task)
    names = embedded.class_names
    model = embedding_teacher(settings.teacher, embedder, embedded.train, names, settings.knn_k)
    teacher = _teacher_summary(model, embedded, settings)
    target = embedded.test or embedded.train
    gap = None if target is None else store_domain_gap(store, target.embeddings)
    index = store_index(store)
    scores = score_store(store, index, model, embedded.train, settings)
    scored = ScoresFile(
        scores=scores.scores,
        predicted=scores.predicted,
        class_names=embedded.class_names,
        reference_name=store.meta.reference_name,
        reference_fingerprint=bytes.fromhex(store.meta.reference_fingerprint),
        reference_size=store.n,
        task=task.task_name,
        recommended_strategy=gap.strategy if gap else "safety-net",
        reference_block_starts=_block_starts(store_dir, store.meta.reference_fingerprint),
        excluded=np.flatnonzero(~store.valid),
        embeddings_dir=os.path.relpath(Path(store_dir).resolve(), out.resolve()),
        leakage=_leakage(store, index, embedded.test),
    )
    scored.write(out / SCORES_FILE)
    report = _report(store, task, embedded, scored, teacher, gap, scores.stream, scores.knn)
    report = replace(report, total_seconds=time.perf_counter() - started)
    report.write(out)
    return report


def _report(
    store: EmbeddingStore,
    task: EmbeddingTask,
    embedded: _EmbeddedTask,
    scored: ScoresFile,
    teacher: TeacherSummary,
    gap: DomainGap | None,
    scores: StreamScores,
    knn: KnnSummary,
) -> ScoreReport:
    """What the stored-embeddings scoring pass did (``score_report.json``)."""
    meta = store.meta
    reference = reference_summary(meta.reference_name, store.n, meta.reference_fingerprint)
    return ScoreReport(
        path=EMBEDDINGS,
        task=task.name,
        classes=list(embedded.class_names),
        reference=reference | {"unreadable_images": int(scored.excluded.size)},
        embedder=f"open_clip:{meta.model}",
        duplicate_check_embedder=f"open_clip:{meta.model}",
        teacher=teacher,
        domain_gap=gap,
        recommended_strategy=scored.recommended_strategy,
        predicted_histogram=predicted_histogram(scores.predicted, len(embedded.class_names)),
        scoring_seconds=scores.seconds,
        scoring_images_per_second=scores.rows_per_second,
        knn_relevance=knn,
        total_seconds=0.0,
    )
