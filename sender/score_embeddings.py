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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protocol.atomic_files import write_json_atomic
from protocol.errors import ConfigError, TaskDataError
from protocol.task_data import image_folder_files
from sender.domain_gap import measure_domain_gap, split_reference_sample
from sender.embedding_store import EmbeddingStore
from sender.embedding_teachers import KnnTeacher, train_probe, zero_shot_head
from sender.stream_scoring import LinearHead, score_chunks
from sender.work_dir import SCORE_REPORT, SCORES_FILE, TEST_EMBEDDINGS


def _block_starts(store_dir: str | os.PathLike[str], fingerprint_hex: str) -> np.ndarray:
    """The reference folders' starts from the store's manifest (empty when it is absent)."""
    from protocol.manifest import ReferenceManifest
    from sender.embed import MANIFEST_FILE

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


def embed_folder(
    embedder: Any, root: Path, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(embeddings, labels, class names) of a labeled ImageFolder, via CLIP's preprocess."""
    from protocol.reference.encoded import UnreadableImage, decode_rgb

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
    return np.concatenate(out), labels, classes


def score_embeddings(
    store_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    embedder: Any,
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
    train = embed_folder(embedder, Path(train_dir)) if train_dir else None
    test = embed_folder(embedder, Path(test_dir)) if test_dir else None
    names = tuple(class_names) if class_names else (train[2] if train else None)
    if names is None:
        raise TaskDataError("give the task's labeled images (--task/--train) or --classes")
    for split in (train, test):
        if split is not None and split[2] != names:
            raise TaskDataError(
                f"the task's folders {split[2]} differ from the class names {names}"
            )
    head: LinearHead | None = None
    knn: KnnTeacher | None = None
    if teacher == "probe":
        if train is None:
            raise TaskDataError("the probe teacher needs labeled training images (--task/--train)")
        head = train_probe(train[0], train[1], len(names))
    elif teacher == "zeroshot":
        head = zero_shot_head(embedder, list(names))
    elif teacher == "knn":
        if train is None:
            raise TaskDataError("the kNN teacher needs labeled training images (--task/--train)")
        knn = KnnTeacher(train[0], train[1], len(names), k=knn_k)
    else:
        raise ConfigError(f"unknown embedding teacher {teacher!r} (probe, zeroshot or knn)")

    def task_logits(x: np.ndarray) -> np.ndarray:
        return head.logits(x) if head is not None else knn.logits_numpy(x)  # type: ignore[union-attr]

    accuracy = None
    if test is not None:
        accuracy = float((task_logits(test[0]).argmax(1) == test[1]).mean())
    target = test[0] if test is not None else (train[0] if train is not None else None)
    gap = None
    if target is not None:
        sample_rows, query_rows = split_reference_sample(store.n)
        valid = store.valid
        gap = measure_domain_gap(
            store.read_rows(sample_rows[valid[sample_rows]]),
            store.read_rows(query_rows[valid[query_rows]]),
            target,
        )
    scores = score_chunks(
        store.iter_chunks(chunk_rows, source), store.n, head, temperature=temperature,
        chunk_rows=chunk_rows, logit_fn=None if knn is None else knn.logits,
        num_classes=len(names), progress=progress,
    )  # fmt: skip
    invalid = np.flatnonzero(~store.valid)
    np.savez(
        out / SCORES_FILE,
        energy=scores.energy,
        entropy=scores.entropy,
        predicted=scores.predicted,
        excluded=invalid,
        class_names=np.asarray(names),
        reference_fingerprint=np.frombuffer(
            bytes.fromhex(store.meta.reference_fingerprint), np.uint8
        ),
        reference_size=np.int64(store.n),
        reference_name=np.asarray(store.meta.reference_name),
        reference_block_starts=_block_starts(store_dir, store.meta.reference_fingerprint),
        task=np.asarray(task_name or (Path(train_dir).parent.name if train_dir else "task")),
        recommended_strategy=np.asarray(gap.strategy if gap else "safety-net"),
        embeddings_dir=np.asarray(str(Path(store_dir).resolve())),
    )
    if test is not None:
        np.save(out / TEST_EMBEDDINGS, test[0].astype(np.float16))
    summary = {
        "task": task_name,
        "classes": list(names),
        "reference": {
            "name": store.meta.reference_name,
            "size": store.n,
            "fingerprint": store.meta.reference_fingerprint,
            "unreadable_images": int(invalid.size),
        },
        "embedder": f"open_clip:{store.meta.model}",
        "teacher": {
            "kind": teacher,
            "train_images": 0 if train is None else len(train[1]),
            "test_accuracy": accuracy,
        },
        "domain_gap": None if gap is None else gap.as_dict(),
        "recommended_strategy": gap.strategy if gap else "safety-net",
        "predicted_histogram": np.bincount(scores.predicted, minlength=len(names)).tolist(),
        "scoring_seconds": scores.seconds,
        "scoring_images_per_second": scores.stats["rows_per_second"],
        "total_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / SCORE_REPORT, summary)
    return summary
