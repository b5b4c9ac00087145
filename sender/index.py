"""FAISS index over reference embeddings: near-duplicate (leakage) checks against the task."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from protocol.errors import ReferenceSetError


def build_index(embeddings: np.ndarray) -> faiss.Index:
    """Exact inner-product index (cosine similarity for L2-normalised rows)."""
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Write the index atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def load_index(path: str | os.PathLike[str]) -> faiss.Index:
    if not Path(path).is_file():
        raise ReferenceSetError(f"FAISS index {path} is missing: run 'plada-send score' again")
    return faiss.read_index(str(path))


@dataclass(frozen=True)
class LeakageReport:
    """Task test images whose nearest kept reference image is a near duplicate."""

    threshold: float
    queries: int
    duplicates: list[tuple[int, int, float]]  # (test image, reference index, cosine)
    max_similarity: float

    def as_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "test_images_checked": self.queries,
            "near_duplicates": len(self.duplicates),
            "max_similarity": round(self.max_similarity, 4),
            "pairs": [list(p) for p in self.duplicates[:100]],
        }


def near_duplicates(
    index: faiss.Index, kept: np.ndarray, queries: np.ndarray, threshold: float = 0.97
) -> LeakageReport:
    """Nearest kept reference image of each query (search restricted to ``kept`` ids)."""
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(kept, dtype=np.int64))
    params = faiss.SearchParameters(sel=selector)
    sims, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1, params=params)
    sims, ids = sims[:, 0], ids[:, 0]
    hits = np.flatnonzero((sims >= threshold) & (ids >= 0))
    pairs = [(int(q), int(ids[q]), float(sims[q])) for q in hits]
    top = float(sims[ids >= 0].max()) if np.any(ids >= 0) else 0.0
    return LeakageReport(threshold, int(queries.shape[0]), pairs, top)
