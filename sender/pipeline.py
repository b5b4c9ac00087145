"""The sender's two stages: score the reference set once, then select and write payloads.

``score`` is the expensive pass (teacher training, one forward pass or embedding
lookup per reference image); it writes a work directory that ``make_payload``
reads as often as needed, e.g. to try keep fractions against a byte budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError, TaskDataError
from protocol.manifest import BlockLayout
from protocol.payload import (
    Payload,
    decode_header,
    encode_payload,
    information_bound_bytes,
    write_payload,
)
from protocol.reference.base import ReferenceSource
from protocol.task_data import LabeledImages
from sender import index as faiss_index
from sender.domain_gap import measure_domain_gap, split_reference_sample
from sender.scoring import SCORES, energy, entropy, knn_relevance
from sender.selection import SelectionConfig, select
from sender.signer import PayloadSigner
from sender.work_dir import REFERENCE_EMBEDDINGS, SCORE_REPORT, SCORES_FILE, TEST_EMBEDDINGS

INDEX_FILE = faiss_index.INDEX_FILE


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
    sample_rows, query_rows = split_reference_sample(len(reference), sample=20_000)
    gap = measure_domain_gap(ref_emb[sample_rows], ref_emb[query_rows], train_emb)
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
        reference_block_starts=reference.manifest.block_starts(),
        task=np.asarray(train.name),
        recommended_strategy=np.asarray(gap.strategy),
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
        "domain_gap": gap.as_dict(),
        "recommended_strategy": gap.strategy,
        "predicted_histogram": np.bincount(predicted, minlength=len(train.class_names)).tolist(),
        "scoring_seconds": scoring_seconds,
        "scoring_images_per_second": len(reference) / max(scoring_seconds, 1e-9),
        "total_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / SCORE_REPORT, summary)
    return summary


def _leakage_index(work: Path, embeddings_dir: str | None) -> Path | None:
    """The index to search for near-duplicates: the work directory's, else the store's."""
    candidates = [work / INDEX_FILE]
    if embeddings_dir:
        candidates.append(Path(embeddings_dir) / INDEX_FILE)
    return next((path for path in candidates if path.is_file()), None)


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
    (see :mod:`sender.consensus`).
    """
    from sender.embedding_store import EmbeddingStore

    work = Path(work_dir)
    path = work / SCORES_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: run 'plada-send score' first")
    with np.load(path, allow_pickle=False) as data:
        available = [name for name in SCORES if name in data.files]
        score = score or ("knn" if "knn" in available else "energy")
        if score not in available:
            raise ConfigError(
                f"score {score!r} is not in {path} (available: {', '.join(available)})"
            )
        scores = data[score]
        predicted = data["predicted"]
        class_names = tuple(str(c) for c in data["class_names"])
        fingerprint = data["reference_fingerprint"].tobytes()
        reference_size = int(data["reference_size"])
        reference_name = str(data["reference_name"])
        layout = (
            BlockLayout(
                reference_name, fingerprint, reference_size, data["reference_block_starts"]
            )
            if "reference_block_starts" in data.files and data["reference_block_starts"].size
            else None
        )
        task = task_id or str(data["task"])
        unreadable = data["excluded"] if "excluded" in data.files else np.zeros(0, np.int64)
        recommended = (
            str(data["recommended_strategy"])
            if "recommended_strategy" in data.files
            else "safety-net"
        )
        embeddings_dir = str(data["embeddings_dir"]) if "embeddings_dir" in data.files else None
    if config.strategy == "auto":
        config = replace(config, strategy=recommended)
    excluded = unreadable
    leakage: dict[str, Any] | None = None
    index_path = _leakage_index(work, embeddings_dir)
    if (work / TEST_EMBEDDINGS).is_file() and index_path is not None:
        queries = np.load(work / TEST_EMBEDDINGS).astype(np.float32)
        exact = None
        if embeddings_dir and index_path.parent == Path(embeddings_dir):
            exact = EmbeddingStore(embeddings_dir).read_rows
        duplicates, hit_queries = faiss_index.near_duplicate_ids(
            faiss_index.load_index(index_path), queries, leak_threshold, exact=exact
        )
        if exclude_leaks:
            excluded = np.union1d(excluded, duplicates)
        leakage = {
            "threshold": leak_threshold,
            "test_images_checked": int(queries.shape[0]),
            "test_images_with_near_duplicates": hit_queries,
            "near_duplicate_reference_images": int(duplicates.size),
            "excluded": exclude_leaks,
        }
    kept = select(scores, predicted, len(class_names), config, excluded=excluded)
    consensus = None
    if consensus_k > 0:
        from sender.consensus import consensus_outliers

        if embeddings_dir:
            embeddings = EmbeddingStore(embeddings_dir).read_rows(kept)
        elif (work / REFERENCE_EMBEDDINGS).is_file():
            embeddings = np.load(work / REFERENCE_EMBEDDINGS, mmap_mode="r")[kept]
        else:
            raise ConfigError(f"{work} has no reference embeddings for the consensus filter")
        dropped = kept[consensus_outliers(embeddings, predicted[kept], consensus_k,
                                          consensus_agreement)]  # fmt: skip
        kept = select(scores, predicted, len(class_names), config,
                      excluded=np.union1d(excluded, dropped))  # fmt: skip
        consensus = {"k": consensus_k, "min_agreement": consensus_agreement,
                     "dropped": int(dropped.size)}  # fmt: skip
    if leakage is not None:
        leakage["kept_near_duplicates"] = int(np.intersect1d(kept, duplicates).size)
    labels = predicted[kept].astype(np.int64)
    created = int(time.time())
    payload = Payload(
        task=task,
        reference_name=reference_name,
        reference_fingerprint=fingerprint,
        reference_size=reference_size,
        class_names=class_names,
        indices=kept,
        labels=labels,
        selection=config.as_header() | {"score": score},
        created=created,
        sender=signer.stamp(created) if signer else None,
    )
    encoded = encode_payload(payload, reference=layout, signer=signer.key if signer else None)
    write_payload(out_path, encoded)
    return {
        "payload": str(out_path),
        "payload_bytes": len(encoded),
        "kept": int(kept.size),
        "keep_fraction": kept.size / reference_size,
        "body_coding": decode_header(encoded)["body"],
        "signed": None
        if signer is None
        else {
            "sender": signer.key.sender,
            "key_id": signer.key.key_id.hex(),
            "sequence": payload.sender.sequence,
            "expires": payload.sender.expires,
        },
        "selection": payload.selection,
        "unreadable_excluded": int(unreadable.size),
        "class_histogram": payload.class_histogram(),
        "information_bound_bytes": round(
            information_bound_bytes(reference_size, labels, len(class_names)), 1
        ),
        "leakage": leakage,
        "consensus": consensus,
    }
