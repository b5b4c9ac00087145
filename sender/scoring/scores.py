"""Relevance scores for reference images, computed from teacher outputs.

Lower is more relevant everywhere: ``energy`` (-T logsumexp(logits / T)), ``entropy``
of the softmax, and ``knn`` (minus the mean cosine similarity of an image's
embedding to its nearest task images of the class the teacher predicts for it).
"""

from __future__ import annotations

import numpy as np

SCORES = ("energy", "entropy", "knn")


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
