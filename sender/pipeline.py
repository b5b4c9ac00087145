"""The sender's two stages: score the reference set once, then select and write payloads.

``score`` is the expensive pass (teacher training, one forward pass or embedding
lookup per reference image); it writes a work directory that ``make_payload``
reads as often as needed, e.g. to try keep fractions against a byte budget.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import ConfigError, TaskDataError
from protocol.payload import Payload, encode_payload, information_bound_bytes, write_payload
from protocol.reference.base import ReferenceSource
from protocol.task_data import LabeledImages
from sender import index as faiss_index
from sender.scoring import SCORES, energy, entropy, knn_domain_gap, knn_relevance
from sender.selection import SelectionConfig, select

SCORES_FILE = "scores.npz"
REFERENCE_EMBEDDINGS = "reference_embeddings.npy"
TEST_EMBEDDINGS = "test_embeddings.npy"
INDEX_FILE = "reference.faiss"
SCORE_REPORT = "score_report.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _reference_images(reference: ReferenceSource, chunk: int = 16384) -> np.ndarray:
    parts = [images for _, images in reference.iter_chunks(chunk)]
    return np.concatenate(parts)


def score_reference(
    reference: ReferenceSource,
    train: LabeledImages,
    test: LabeledImages | None,
    out_dir: str | os.PathLike[str],
    teacher_kind: str = "cnn",
    embedder: Any = None,
    temperature: float = 1.0,
    knn_k: int = 5,
    teacher_epochs: int = 40,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the teacher, score every reference image, and write the work directory."""
    from sender.embedders import PixelEmbedder  # torch: only the scoring stage needs it
    from sender.teachers import CnnTeacher, ProbeTeacher

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if test is not None and test.class_names != train.class_names:
        raise TaskDataError("train and test splits list different classes")
    started = time.perf_counter()
    images = _reference_images(reference)
    if images.shape[1] != train.images.shape[1]:
        raise TaskDataError(
            f"task images have {train.images.shape[1]} channels, reference images "
            f"{images.shape[1]}: convert the task to match the reference set"
        )
    teacher_accuracy: float | None = None
    if teacher_kind == "cnn":
        teacher = CnnTeacher(epochs=teacher_epochs, seed=seed)
        report = teacher.fit(train, progress=progress)
        score_start = time.perf_counter()
        logits, ref_emb = teacher.logits(images)
        _, train_emb = teacher.logits(train.images)
        if test is not None:
            test_logits, _ = teacher.logits(test.images)
            teacher_accuracy = float((test_logits.argmax(1) == test.labels).mean())
        embedder_name, duplicate_embedder_name = "teacher-features", "pixels"
        # the teacher's features cluster by class, so duplicates are looked for in pixels
        duplicate_embedder = PixelEmbedder()
        dup_ref = duplicate_embedder.embed(images)
        dup_test = None if test is None else duplicate_embedder.embed(test.images)
    elif teacher_kind == "probe":
        if embedder is None:
            raise ConfigError(
                "the probe teacher needs an embedder (e.g. --clip-model/--clip-weights)"
            )
        score_start = time.perf_counter()
        ref_emb = embedder.embed(images)
        train_emb = embedder.embed(train.images)
        probe = ProbeTeacher(seed=seed)
        report = probe.fit(train_emb, train.labels)
        logits = probe.logits(ref_emb)
        dup_ref, dup_test = ref_emb, None
        if test is not None:
            dup_test = embedder.embed(test.images)
            teacher_accuracy = float((probe.logits(dup_test).argmax(1) == test.labels).mean())
        embedder_name = duplicate_embedder_name = embedder.name
    else:
        raise ConfigError(f"unknown teacher {teacher_kind!r} (cnn or probe)")
    predicted = logits.argmax(1).astype(np.int64)
    scores = {
        "energy": energy(logits, temperature),
        "entropy": entropy(logits),
        "knn": knn_relevance(ref_emb, predicted, train_emb, train.labels, knn_k),
    }
    scoring_seconds = time.perf_counter() - score_start
    index = faiss_index.build_index(dup_ref)
    faiss_index.save_index(index, out / INDEX_FILE)
    np.save(out / REFERENCE_EMBEDDINGS, dup_ref.astype(np.float16))
    if dup_test is not None:
        np.save(out / TEST_EMBEDDINGS, dup_test.astype(np.float16))
    np.savez(
        out / SCORES_FILE,
        predicted=predicted,
        class_names=np.asarray(train.class_names),
        reference_fingerprint=np.frombuffer(reference.manifest.fingerprint, dtype=np.uint8),
        reference_size=np.int64(len(reference)),
        reference_name=np.asarray(reference.manifest.name),
        task=np.asarray(train.name),
        **scores,
    )
    summary = {
        "task": train.name,
        "reference": {
            "name": reference.manifest.name,
            "size": len(reference),
            "fingerprint": reference.manifest.fingerprint_hex,
        },
        "teacher": asdict(report) | {"test_accuracy": teacher_accuracy},
        "embedder": embedder_name,
        "duplicate_check_embedder": duplicate_embedder_name,
        "domain_gap_knn_similarity": knn_domain_gap(ref_emb, train_emb),
        "predicted_histogram": np.bincount(predicted, minlength=len(train.class_names)).tolist(),
        "scoring_seconds": scoring_seconds,
        "scoring_images_per_second": len(reference) / max(scoring_seconds, 1e-9),
        "total_seconds": time.perf_counter() - started,
    }
    _write_json(out / SCORE_REPORT, summary)
    return summary


def make_payload(
    work_dir: str | os.PathLike[str],
    config: SelectionConfig,
    out_path: str | os.PathLike[str],
    score: str = "knn",
    task_id: str | None = None,
    leak_threshold: float = 0.97,
) -> dict[str, Any]:
    """Select from a scored work directory, write the payload, and return a summary."""
    work = Path(work_dir)
    path = work / SCORES_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: run 'plada-send score' first")
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r} (one of {', '.join(SCORES)})")
    with np.load(path, allow_pickle=False) as data:
        scores = data[score]
        predicted = data["predicted"]
        class_names = tuple(str(c) for c in data["class_names"])
        fingerprint = data["reference_fingerprint"].tobytes()
        reference_size = int(data["reference_size"])
        reference_name = str(data["reference_name"])
        task = task_id or str(data["task"])
    kept = select(scores, predicted, len(class_names), config)
    labels = predicted[kept]
    leakage = None
    if (work / TEST_EMBEDDINGS).is_file():
        index = faiss_index.load_index(work / INDEX_FILE)
        queries = np.load(work / TEST_EMBEDDINGS).astype(np.float32)
        leakage = faiss_index.near_duplicates(index, kept, queries, leak_threshold).as_dict()
    payload = Payload(
        task=task,
        reference_name=reference_name,
        reference_fingerprint=fingerprint,
        reference_size=reference_size,
        class_names=class_names,
        indices=kept,
        labels=labels,
        selection=config.as_header() | {"score": score},
        created=int(time.time()),
    )
    encoded = encode_payload(payload)
    write_payload(out_path, encoded)
    return {
        "payload": str(out_path),
        "payload_bytes": len(encoded),
        "kept": int(kept.size),
        "keep_fraction": kept.size / reference_size,
        "selection": payload.selection,
        "class_histogram": payload.class_histogram(),
        "information_bound_bytes": round(
            information_bound_bytes(reference_size, labels, len(class_names)), 1
        ),
        "leakage": leakage,
    }
