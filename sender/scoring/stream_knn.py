"""kNN relevance at production scale: the task's images search the reference index.

On the in-memory path every reference image is compared with every task image of its
predicted class (:func:`sender.scoring.scores.knn_relevance`). At 14.2M rows that is a GEMM
against the whole task, so here the direction is reversed: each labeled task image t
(label y_t) asks the FAISS index over the reference embeddings for its ``depth``
nearest reference rows. A row r is a *candidate* when some task image of its predicted
class found it (relevance and label agreement at once), and scores

    knn(r) = -(sum of the ``k`` largest similarities s(t, r) over the task images t with
               y_t == predicted(r) that found r) / k

(absent ones count as 0, so rows found by several same-class task images rank first).
Rows no agreeing task image found come after every candidate, in energy order:
``knn(r) = 1 + (energy(r) - min) / (max - min + eps)``, a monotone map into [1, 2).

A candidate's *owner* is the most similar of those task images (the ``cover`` score's
round-robin groups, see :mod:`sender.scoring.scores`); other rows have none (-1).

``depth`` defaults to enough neighbours for the candidates to cover a 10% keep.
"""

from __future__ import annotations

import math
import time

import faiss
import numpy as np

from sender.scoring.scores import KnnRelevance

MAX_KEEP = 0.10  # the largest keep fraction the default depth is sized for
MAX_DEPTH = 2048
SCAN_CODES = 50_000  # codes an IVF search scans per task image by default (~2 ms on a core)


def default_depth(n: int, task_images: int, k: int = 5) -> int:
    """Neighbours per task image so that all of them together could fill a 10% keep."""
    wanted = math.ceil(MAX_KEEP * n / max(1, task_images))
    return int(min(n, max(k, min(MAX_DEPTH, wanted))))


def default_nprobe(n: int, nlist: int) -> int:
    """IVF lists to visit so that a search scans about :data:`SCAN_CODES` codes."""
    return int(min(nlist, max(1, round(SCAN_CODES * nlist / max(1, n)))))


def search_task_images(
    index: faiss.Index, task_embeddings: np.ndarray, depth: int, nprobe: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, reference ids) [t, depth] of each task image's nearest rows (-1: none);
    an IVF index visits ``nprobe`` lists (default :func:`default_nprobe`)."""
    ivf = _ivf_of(index)
    if ivf is not None:
        ivf.nprobe = nprobe or default_nprobe(index.ntotal, ivf.nlist)
    queries = np.ascontiguousarray(task_embeddings, dtype=np.float32)
    return index.search(queries, int(min(depth, index.ntotal)))


def reverse_knn_relevance(
    similarities: np.ndarray,
    neighbours: np.ndarray,
    task_labels: np.ndarray,
    predicted: np.ndarray,
    energy: np.ndarray,
    k: int = 5,
) -> tuple[KnnRelevance, int]:
    """The ``knn`` score of every reference row and its owner (see the module docstring),
    and the number of candidates (rows some agreeing task image found)."""
    n = predicted.shape[0]
    queries = np.repeat(np.arange(neighbours.shape[0]), neighbours.shape[1])
    rows = neighbours.ravel()
    sims = similarities.ravel().astype(np.float32)
    found = rows >= 0
    queries, rows, sims = queries[found], rows[found], sims[found]
    agree = task_labels[queries] == predicted[rows]
    queries, rows, sims = queries[agree], rows[agree], sims[agree]
    order = np.lexsort((queries, -sims, rows))  # by row, then most similar first
    queries, rows, sims = queries[order], rows[order], sims[order]
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    rank = np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))
    top = rank < k
    total = np.bincount(rows[top], weights=sims[top], minlength=n)
    e = energy.astype(np.float64)
    low, high = float(np.nanmin(e)), float(np.nanmax(e))
    scores = (1.0 + (e - low) / (high - low + 1e-12)).astype(np.float32)
    candidates = rows[starts]  # the rows, sorted, once each
    scores[candidates] = (-total[candidates] / k).astype(np.float32)
    owner = np.full(n, -1, dtype=np.int64)
    owner[candidates] = queries[starts]
    return KnnRelevance(scores, owner), int(candidates.size)


def stream_knn_relevance(
    index: faiss.Index,
    task_embeddings: np.ndarray,
    task_labels: np.ndarray,
    predicted: np.ndarray,
    energy: np.ndarray,
    k: int = 5,
    depth: int | None = None,
    nprobe: int | None = None,
) -> tuple[KnnRelevance, dict[str, float]]:
    """Search the index with the task's images and score every row; returns the scores
    with their owners, and what it took (depth, candidates, seconds)."""
    started = time.perf_counter()
    n = predicted.shape[0]
    depth = depth or default_depth(n, task_embeddings.shape[0], k)
    sims, ids = search_task_images(index, task_embeddings, depth, nprobe)
    searched = time.perf_counter()
    relevance, candidates = reverse_knn_relevance(sims, ids, task_labels, predicted, energy, k)
    done = time.perf_counter()
    return relevance, {
        "depth": depth,
        "nprobe": _nprobe_of(index),
        "task_images": int(task_embeddings.shape[0]),
        "candidates": candidates,
        "search_seconds": searched - started,
        "score_seconds": done - searched,
        "seconds": done - started,
    }


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of ``index``, or None for an exact (flat) index."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _nprobe_of(index: faiss.Index) -> int:
    """The lists the last search visited (0 for an exact index)."""
    ivf = _ivf_of(index)
    return 0 if ivf is None else int(ivf.nprobe)
