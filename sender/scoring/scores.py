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

Kept free of torch so that the command line can list the scores without loading it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol.errors import ConfigError

KNN = "knn"


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
        if name in ROW_SCORES or name == KNN:
            raise ConfigError(f"a selection score named {name!r} is already registered")
        ROW_SCORES[name] = function
        return function

    return register


def score_names() -> tuple[str, ...]:
    """Every selection score: the registered row scores, then ``knn``."""
    return (*ROW_SCORES, KNN)


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


def knn_relevance(
    reference_embeddings: np.ndarray,
    predicted: np.ndarray,
    task_embeddings: np.ndarray,
    task_labels: np.ndarray,
    k: int = 5,
) -> np.ndarray:
    """Minus the mean cosine similarity to the ``k`` nearest task images of the predicted class.

    Uses exact FAISS inner-product search per class; embeddings must be L2-normalised.
    """
    import faiss

    scores = np.zeros(reference_embeddings.shape[0], dtype=np.float32)
    for c in np.unique(predicted):
        members = task_embeddings[task_labels == c]
        rows = np.flatnonzero(predicted == c)
        if members.shape[0] == 0:
            scores[rows] = 1.0  # no task image of that class: least relevant possible
            continue
        index = faiss.IndexFlatIP(members.shape[1])
        index.add(np.ascontiguousarray(members, dtype=np.float32))
        sims, _ = index.search(
            np.ascontiguousarray(reference_embeddings[rows]), min(k, len(members))
        )
        scores[rows] = -sims.mean(axis=1)
    return scores
