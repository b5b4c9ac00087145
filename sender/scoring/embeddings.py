"""Production scoring: a teacher on CLIP embeddings, streamed over the stored reference set.

Inputs: a merged embeddings directory (``plada-send embed`` + ``merge``), the same
CLIP weights (for the task's images and the class names), and the task as a
labeled ImageFolder and/or a list of class names. Output: the same work directory
``plada-send select`` reads for the embedded world (``scores.npz``,
``score_report.json``, ``test_embeddings.npy``), plus the domain-gap evidence and
the selection strategy it recommends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError, TaskDataError
from protocol.manifest import ReferenceManifest, reference_summary
from protocol.reference.encoded import UnreadableImage, decode_rgb
from protocol.task_data import image_folder_files
from sender.embedding.embedders import ClipEmbedder
from sender.embedding.index import INDEX_FILE, load_index
from sender.embedding.store import MANIFEST_FILE, EmbeddingStore
from sender.scoring.domain_gap import DomainGap, measure_domain_gap, split_reference_sample
from sender.scoring.embedding_teachers import KnnTeacher, train_probe, zero_shot_head
from sender.scoring.stream import LinearHead, StreamScores, score_chunks
from sender.scoring.stream_knn import stream_knn_relevance
from sender.scoring.teacher_kinds import EMBEDDING_TEACHERS
from sender.scoring.work_dir import (
    SCORE_REPORT,
    SCORES_FILE,
    TEST_EMBEDDINGS,
    ScoresFile,
    save_embeddings,
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
    """A labeled task split embedded with CLIP."""

    embeddings: np.ndarray  # [m, d] L2-normalised
    labels: np.ndarray  # [m]
    class_names: tuple[str, ...]


def embed_folder(embedder: ClipEmbedder, root: Path, batch_size: int = 64) -> EmbeddedSplit:
    """A labeled ImageFolder embedded through CLIP's own preprocessing."""
    files, labels, classes = image_folder_files(root)
    out = []
    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start : start + batch_size]:
            try:
                batch.append(embedder.preprocess(decode_rgb(file.read_bytes(), str(file))))
            except (UnreadableImage, OSError) as exc:
                raise TaskDataError(
                    f"task image {file} is unreadable: {exc}; fix or remove it"
                ) from exc
        out.append(embedder.embed_batch(torch.stack(batch)))
    return EmbeddedSplit(np.concatenate(out), labels, classes)


def _task_splits(
    embedder: ClipEmbedder,
    train_dir: str | None,
    test_dir: str | None,
    class_names: list[str] | None,
) -> tuple[EmbeddedSplit | None, EmbeddedSplit | None, tuple[str, ...]]:
    """(train, test, class names): the task's labeled images (either may be absent) and
    the classes, which both splits must list in the same order."""
    train = embed_folder(embedder, Path(train_dir)) if train_dir else None
    test = embed_folder(embedder, Path(test_dir)) if test_dir else None
    names = tuple(class_names) if class_names else (train.class_names if train else None)
    if names is None:
        raise TaskDataError("give the task's labeled images (--task/--train) or --classes")
    for split in (train, test):
        if split is not None and split.class_names != names:
            raise TaskDataError(
                f"the task's folders {split.class_names} differ from the class names {names}"
            )
    return train, test, names


def _embedding_teacher(
    teacher: str,
    embedder: ClipEmbedder,
    train: EmbeddedSplit | None,
    names: tuple[str, ...],
    knn_k: int,
) -> LinearHead | KnnTeacher:
    """The teacher on embeddings: a linear head (probe, zero-shot) or the kNN teacher."""
    if teacher not in EMBEDDING_TEACHERS:
        raise ConfigError(
            f"unknown embedding teacher {teacher!r} ({', '.join(EMBEDDING_TEACHERS)})"
        )
    if teacher == "zeroshot":
        return zero_shot_head(embedder, list(names))
    if train is None:
        raise TaskDataError(f"the {teacher} teacher needs labeled training images (--task/--train)")
    if teacher == "probe":
        return train_probe(train.embeddings, train.labels, len(names))
    return KnnTeacher(train.embeddings, train.labels, len(names), k=knn_k)


def _teacher_logits(model: LinearHead | KnnTeacher, embeddings: np.ndarray) -> np.ndarray:
    if isinstance(model, KnnTeacher):
        return model.logits_numpy(embeddings)
    return model.logits(embeddings)


def _store_domain_gap(store: EmbeddingStore, target: np.ndarray) -> DomainGap:
    """The task's domain gap against a sample of the store's readable rows."""
    sample_rows, query_rows = split_reference_sample(store.n)
    valid = store.valid
    return measure_domain_gap(
        store.read_rows(sample_rows[valid[sample_rows]]),
        store.read_rows(query_rows[valid[query_rows]]),
        target,
    )


def _store_knn(
    store: EmbeddingStore,
    train: EmbeddedSplit | None,
    scores: StreamScores,
    k: int,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """The ``knn`` score (task images searching the store's FAISS index, see
    :mod:`sender.scoring.stream_knn`) when there are labeled task images and an index, and
    what it took; else None and why it was skipped."""
    index_path = store.root / INDEX_FILE
    if train is None:
        return None, {"skipped": "no labeled task images"}
    if not index_path.is_file():
        return None, {"skipped": f"no index at {index_path}: run 'plada-send index {store.root}'"}
    return stream_knn_relevance(
        load_index(index_path),
        train.embeddings,
        train.labels,
        scores.predicted,
        scores.energy,
        k=k,
    )


def score_embeddings(
    store_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    embedder: ClipEmbedder,
    teacher: str = "probe",
    train_dir: str | None = None,
    test_dir: str | None = None,
    class_names: list[str] | None = None,
    temperature: float = 1.0,
    knn_k: int = 5,
    chunk_rows: int = 8192,
    source: str = "f16",
    task_name: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the teacher, stream-score every stored reference row, write the work directory."""
    started = time.perf_counter()
    store = EmbeddingStore(store_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if store.meta.model != embedder.model_name:
        raise ConfigError(
            f"the reference was embedded with {store.meta.model}, the task with "
            f"{embedder.model_name}: use the same model and weights"
        )
    train, test, names = _task_splits(embedder, train_dir, test_dir, class_names)
    model = _embedding_teacher(teacher, embedder, train, names, knn_k)
    accuracy = None
    if test is not None:
        accuracy = float((_teacher_logits(model, test.embeddings).argmax(1) == test.labels).mean())
    target = test if test is not None else train
    gap = None if target is None else _store_domain_gap(store, target.embeddings)
    knn = model if isinstance(model, KnnTeacher) else None
    scores = score_chunks(
        store.iter_chunks(chunk_rows, source),
        store.n,
        None if knn is not None else model,
        temperature=temperature,
        chunk_rows=chunk_rows,
        logit_fn=None if knn is None else knn.logits,
        num_classes=len(names),
        progress=progress,
    )
    invalid = np.flatnonzero(~store.valid)
    strategy = gap.strategy if gap else "safety-net"
    meta = store.meta
    per_row = {"energy": scores.energy, "entropy": scores.entropy}
    knn, knn_stats = _store_knn(store, train, scores, knn_k)
    if knn is not None:
        per_row["knn"] = knn
    ScoresFile(
        scores=per_row,
        predicted=scores.predicted,
        class_names=names,
        reference_name=meta.reference_name,
        reference_fingerprint=bytes.fromhex(meta.reference_fingerprint),
        reference_size=store.n,
        task=task_name or (Path(train_dir).parent.name if train_dir else "task"),
        recommended_strategy=strategy,
        reference_block_starts=_block_starts(store_dir, meta.reference_fingerprint),
        excluded=invalid,
        embeddings_dir=str(Path(store_dir).resolve()),
    ).write(out / SCORES_FILE)
    if test is not None:
        save_embeddings(out / TEST_EMBEDDINGS, test.embeddings)
    summary = {
        "task": task_name,
        "classes": list(names),
        "reference": reference_summary(meta.reference_name, store.n, meta.reference_fingerprint)
        | {"unreadable_images": int(invalid.size)},
        "embedder": f"open_clip:{meta.model}",
        "teacher": {
            "kind": teacher,
            "train_images": 0 if train is None else len(train.labels),
            "test_accuracy": accuracy,
        },
        "domain_gap": None if gap is None else gap.as_dict(),
        "recommended_strategy": strategy,
        "predicted_histogram": np.bincount(scores.predicted, minlength=len(names)).tolist(),
        "scoring_seconds": scores.seconds,
        "scoring_images_per_second": scores.stats["rows_per_second"],
        "knn_relevance": knn_stats,
        "total_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / SCORE_REPORT, summary)
    return summary
