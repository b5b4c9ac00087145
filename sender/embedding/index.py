"""FAISS indexes over reference embeddings: the store's (``plada-send index``), searched
for kNN relevance and for the test images' near-duplicates (leakage), and the exact
in-memory one the in-memory scoring path searches for the same leakage check."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    """A FAISS index written by :func:`save_index` (``plada-send index`` writes the store's),
    memory-mapped: an IVF index's lists and a flat index's vectors stay in the file (the
    page cache holds what the searches touch), so a process that searches the 1 GB
    IVF-PQ index of 14.2M rows does not hold it all in its own memory."""
    if not Path(path).is_file():
        raise ReferenceSetError(
            f"FAISS index {path} is missing: run 'plada-send index {Path(path).parent}'"
        )
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError as error:  # FAISS's reader: a short read or a malformed header
        raise ReferenceSetError(
            f"FAISS index {path} is damaged or truncated: run 'plada-send index "
            f"{Path(path).parent}' again"
        ) from error


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


@dataclass(frozen=True)
class BuiltIndex:
    """What ``plada-send index`` wrote."""

    path: Path
    vectors: int
    layout: dict[str, int | str]  # the kind, and for IVF-PQ its lists and sub-quantizers
    seconds: float


def index_store(
    store_dir: str | os.PathLike[str],
    memory_budget: int,
    kind: str = "auto",
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> BuiltIndex:
    """Build the index of a merged store and save it (default: beside the store, where
    scoring looks for it)."""
    started = time.perf_counter()
    store = EmbeddingStore(store_dir)
    index, layout = build_store_index(store, memory_budget, kind=kind, progress=progress)
    path = Path(out) if out else store.root / INDEX_FILE
    save_index(index, path)
    return BuiltIndex(path, index.ntotal, layout, time.perf_counter() - started)


def nearest_rows(
    index: faiss.Index,
    queries: np.ndarray,
    k: int = 16,
    exact: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(reference ids, cosine similarities) [q, k] of each query's ``k`` nearest rows
    (-1 and -inf where the index has fewer).

    The index's similarities are approximate for IVF-PQ; when ``exact`` maps ids to their
    stored embeddings, every similarity is computed again from them.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    sims, ids = index.search(queries, k)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    if exact is not None and (ids >= 0).any():
        found = np.unique(ids[ids >= 0])
        vectors = exact(found)
        for q in range(queries.shape[0]):
            hit = ids[q] >= 0
            sims[q, hit] = vectors[np.searchsorted(found, ids[q, hit])] @ queries[q]
    return ids.astype(np.int64), sims
