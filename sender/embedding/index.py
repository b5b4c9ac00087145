"""FAISS index over reference embeddings: near-duplicate (leakage) checks against the task."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from protocol.atomic_files import write_atomic
from protocol.errors import ReferenceSetError
from sender.embedding.store import EmbeddingStore

INDEX_FILE = "reference.faiss"


def build_index(embeddings: np.ndarray) -> faiss.Index:
    """Exact inner-product index (cosine similarity for L2-normalised rows)."""
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Write the index atomically."""
    write_atomic(
        Path(path), lambda handle: faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
    )


def load_index(path: str | os.PathLike[str]) -> faiss.Index:
    if not Path(path).is_file():
        raise ReferenceSetError(f"FAISS index {path} is missing: run 'plada-send score' again")
    return faiss.read_index(str(path))


def choose_index(
    n: int, dim: int, memory_budget: int, nlist: int | None = None
) -> dict[str, int | str]:
    """Exact flat index when it fits ``memory_budget`` bytes, else IVF-PQ sized to fit
    (``nlist`` lists: default ~4 sqrt(n); fewer build faster on a small machine)."""
    if n * dim * 4 <= memory_budget:
        return {"kind": "flat"}
    nlist = nlist or int(2 ** round(np.log2(max(1.0, 4 * np.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39))
    for m in (64, 32, 16, 8, 4):
        if dim % m == 0 and n * (m + 8) + nlist * dim * 4 <= memory_budget:
            return {"kind": "ivfpq", "nlist": nlist, "m": m}
    raise ReferenceSetError(
        f"no index of {n} x {dim} embeddings fits in {memory_budget / 1e9:.2f} GB: "
        "raise --memory-budget"
    )


def build_store_index(
    store: EmbeddingStore,
    memory_budget: int,
    kind: str = "auto",
    nprobe: int = 32,
    chunk_rows: int = 65536,
    seed: int = 0,
    progress: bool = True,
    nlist: int | None = None,
) -> tuple[faiss.Index, dict[str, int | str]]:
    """A FAISS inner-product index over a merged :class:`EmbeddingStore` (valid rows only)."""
    from tqdm import tqdm

    n, dim = store.n, store.dim
    plan = choose_index(n, dim, memory_budget, nlist) if kind == "auto" else {"kind": kind}
    if plan["kind"] == "flat":
        index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif plan["kind"] == "ivfpq":
        if "nlist" not in plan:
            plan = choose_index(n, dim, min(memory_budget, n * dim * 4 - 1), nlist)
        quantizer = faiss.IndexFlatIP(dim)
        ivf = faiss.IndexIVFPQ(
            quantizer, dim, int(plan["nlist"]), int(plan["m"]), 8, faiss.METRIC_INNER_PRODUCT
        )
        rng = np.random.default_rng(seed)
        sample = np.sort(
            rng.choice(n, size=min(n, max(39 * int(plan["nlist"]), 20_000)), replace=False)
        )
        ivf.train(store.read_rows(sample))
        ivf.nprobe = min(nprobe, int(plan["nlist"]))
        index = ivf
    else:
        raise ReferenceSetError(f"unknown index kind {kind!r} (auto, flat or ivfpq)")
    valid = store.valid
    bar = tqdm(total=n, unit="vec", unit_scale=True, disable=not progress, desc="indexing")
    for start, chunk in store.iter_chunks(chunk_rows):
        rows = np.arange(start, start + chunk.shape[0], dtype=np.int64)
        keep = valid[rows]
        vectors = np.ascontiguousarray(chunk.numpy()[keep])
        index.add_with_ids(vectors, rows[keep])
        bar.update(chunk.shape[0])
    bar.close()
    return index, plan


def near_duplicate_ids(
    index: faiss.Index,
    queries: np.ndarray,
    threshold: float,
    exact: Callable[[np.ndarray], np.ndarray] | None = None,
    k: int = 16,
    margin: float = 0.05,
) -> tuple[np.ndarray, int]:
    """(sorted reference ids within ``threshold`` cosine of any query, queries with one).

    Candidates come from the index (approximate for IVF-PQ, hence ``margin``); when
    ``exact`` maps ids to their stored embeddings, each candidate is re-checked exactly.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims, ids = index.search(queries, k)
    found: set[int] = set()
    hit_queries = 0
    for q in range(queries.shape[0]):
        loose = (ids[q] >= 0) & (sims[q] >= (threshold - margin if exact else threshold))
        candidates = ids[q][loose]
        if exact is not None and candidates.size:
            order = np.argsort(candidates)
            true_sims = exact(candidates[order]) @ queries[q]
            candidates = candidates[order][true_sims >= threshold]
        if candidates.size:
            hit_queries += 1
            found.update(int(c) for c in candidates)
    return np.asarray(sorted(found), dtype=np.int64), hit_queries
