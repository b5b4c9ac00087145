"""Selection scores, one registry for both scoring paths. Lower is more relevant everywhere.

A *row score* is one function of a block of reference rows (:class:`ScoreRows`: the
teacher's logits and the rows' embeddings) that returns one float per row. It is
registered once, with :func:`row_score`, and from then on both scoring paths compute it
and write it into the work directory: the in-memory path on every row at once
(:mod:`sender.scoring.images`), the streamed path chunk by chunk
(:mod:`sender.scoring.stream`), and ``plada-send select --score NAME`` and the plan can
use it. The built-in row scores are ``energy`` (-T logsumexp(logits / T)) and ``entropy``
of the softmax; the streamed pass computes these two fused, from the same exponentials.

``knn`` is the one score that needs the task's labeled images and a neighbour search
(minus the mean cosine similarity of a row's embedding to its nearest task images of
the class the teacher predicts for it). Each path computes it with its own search:
exact per class in memory (:func:`knn_relevance`), through the FAISS index over the
stored embeddings when streaming (:mod:`sender.scoring.stream_knn`).

``cover`` is made from the same search: each row's *owner* is the most similar task
image of the class the teacher predicts for it. Within each owner's rows, ranked by
``knn``, a row's cover value is its rank (in rounds of ``per_round`` rows), plus its
``knn`` mapped into [0, 1) (float32: kNN order to about 1e-7 of its range). Reading it
in ascending order takes every task image's nearest row before any task image's
second, so a selection covers the task's images instead of piling onto the densest
few (``per_round``: 1 is all coverage, a large value is ``knn`` again). Rows no task
image owns come last, in ``knn`` order.

Kept free of torch so that the command line can list the scores without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol.errors import ConfigError

KNN = "knn"
COVER = "cover"
TASK_SCORES = (KNN, COVER)  # need the task's labeled images and a neighbour search
COVER_PER_ROUND = 1  # rows each task image adds per round of the cover ordering


@dataclass(frozen=True)
class ScoreRows:
    """What a row score sees of a block of reference rows."""

    logits: np.ndarray  # float32 [rows, k]: the teacher's logits
    embeddings: np.ndarray  # float32 [rows, d]: the rows' embeddings, L2-normalised
    temperature: float  # the energy temperature the scoring pass was given


RowScore = Callable[[ScoreRows], np.ndarray]
ROW_SCORES: dict[str, RowScore] = {}  # name -> function, in registration order


def row_score(name: str) -> Callable[[RowScore], RowScore]:
    """Register the decorated function as the row score ``name``."""

    def register(function: RowScore) -> RowScore:
        if name in ROW_SCORES or name in TASK_SCORES:
            raise ConfigError(f"a selection score named {name!r} is already registered")
        ROW_SCORES[name] = function
        return function

    return register


def score_names() -> tuple[str, ...]:
    """Every selection score: the registered row scores, then ``knn`` and ``cover``."""
    return (*ROW_SCORES, *TASK_SCORES)


def row_scores(rows: ScoreRows, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The row scores ``names`` (default: every registered one) of a block of rows, float32."""
    chosen = tuple(ROW_SCORES) if names is None else names
    return {name: np.asarray(ROW_SCORES[name](rows), dtype=np.float32) for name in chosen}


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Free energy E = -T * logsumexp(logits / T); low for confident, in-domain inputs."""
    z = logits.astype(np.float64) / temperature
    peak = z.max(axis=1, keepdims=True)
    return (-temperature * (peak[:, 0] + np.log(np.exp(z - peak).sum(axis=1)))).astype(np.float32)


def entropy(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of softmax(logits)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return (-(np.exp(log_p) * log_p).sum(axis=1)).astype(np.float32)


@row_score("energy")
def energy_score(rows: ScoreRows) -> np.ndarray:
    """Low free energy: the teacher is confident the row is in its domain."""
    return energy(rows.logits, rows.temperature)


@row_score("entropy")
def entropy_score(rows: ScoreRows) -> np.ndarray:
    """Low entropy: the teacher is sure of the row's class."""
    return entropy(rows.logits)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), for cosine similarity by inner product."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class KnnRelevance:
    """``knn`` of every row and its owner: the index of its most similar task image of
    its predicted class (-1: none found it)."""

    scores: np.ndarray
    owner: np.ndarray

    def cover(self, per_round: int = COVER_PER_ROUND) -> np.ndarray:
        """The ``cover`` score (see the module docstring)."""
        return cover_order(self.scores, self.owner, per_round)


def knn_relevance(
    reference_embeddings: np.ndarray,
    predicted: np.ndarray,
    task_embeddings: np.ndarray,
    task_labels: np.ndarray,
    k: int = 5,
) -> KnnRelevance:
    """Minus the mean cosine similarity to the ``k`` nearest task images of the predicted
    class, and the nearest one's index.

    Uses exact FAISS inner-product search per class; embeddings must be L2-normalised.
    """
    import faiss

    n = reference_embeddings.shape[0]
    scores = np.zeros(n, dtype=np.float32)
    owner = np.full(n, -1, dtype=np.int64)
    for c in np.unique(predicted):
        members = np.flatnonzero(task_labels == c)
        rows = np.flatnonzero(predicted == c)
        if members.size == 0:
            scores[rows] = 1.0  # no task image of that class: least relevant possible
            continue
        index = faiss.IndexFlatIP(task_embeddings.shape[1])
        index.add(np.ascontiguousarray(task_embeddings[members], dtype=np.float32))
        sims, nearest = index.search(
            np.ascontiguousarray(reference_embeddings[rows]), min(k, members.size)
        )
        scores[rows] = -sims.mean(axis=1)
        owner[rows] = members[nearest[:, 0]]
    return KnnRelevance(scores, owner)


def cover_order(knn: np.ndarray, owner: np.ndarray, per_round: int = COVER_PER_ROUND) -> np.ndarray:
    """Round-robin over the task images: rank within the owner's rows (by ``knn``,
    ``per_round`` rows a round) plus ``knn`` mapped into [0, 1); unowned rows last.
    Linear memory: one stable sort of the rows by (owner, knn)."""
    if per_round < 1:
        raise ConfigError(f"cover takes at least 1 row per round, not {per_round}")
    n = knn.shape[0]
    values = np.asarray(knn, dtype=np.float32)
    finite = np.isfinite(values)
    low = float(values[finite].min()) if finite.any() else 0.0
    high = float(values[finite].max()) if finite.any() else 1.0
    order = np.lexsort((values, owner))  # by owner, then most relevant; stable (row order)
    grouped = owner[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    del grouped
    # each sorted position's rank within its owner's rows, in 32-bit (n < 2**31 rows, so
    # 4 bytes a row fewer at every step: at 14.2M rows this step peaked at ~600 MB)
    index = np.int32 if n < np.iinfo(np.int32).max else np.int64
    within = np.arange(n, dtype=index)
    within -= np.repeat(starts.astype(index), np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=index)
    rank[order] = within
    del order, within
    rank //= per_round
    rounds = rank.astype(np.float32)
    del rank
    owned = owner >= 0
    rounds[~owned] = float(rounds[owned].max()) + 1.0 if owned.any() else 0.0  # after them all
    unit = (values - low) / (high - low + 1e-12) * np.float32(0.999)  # in [0, 1)
    return (rounds + unit).astype(np.float32)
