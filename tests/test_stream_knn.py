"""kNN relevance on the streaming path: the task searches the reference index, and the
result equals a brute-force reading of the definition."""

from __future__ import annotations

import numpy as np

from sender.embedding.index import build_store_index
from sender.scoring.scores import l2_normalize
from sender.scoring.stream_knn import default_depth, stream_knn_relevance
from sender.selection.strategies import SelectionConfig, select
from tests.test_stream_scoring import clustered, make_store


def brute_force_knn(reference, predicted, task, labels, energy, depth, k):
    """The module's definition, read literally: loops and a full sort per task image;
    the scores and each row's owner (its most similar finder, -1 for none)."""
    n = reference.shape[0]
    found: dict[int, list[tuple[float, int]]] = {}
    for t in range(task.shape[0]):
        sims = reference @ task[t]
        for r in np.argsort(-sims, kind="stable")[:depth]:
            if predicted[r] == labels[t]:
                found.setdefault(int(r), []).append((float(sims[r]), t))
    low, high = energy.min(), energy.max()
    scores = 1.0 + (energy.astype(np.float64) - low) / (high - low + 1e-12)
    owner = np.full(n, -1)
    for r, values in found.items():
        scores[r] = -sum(sorted((v for v, _ in values), reverse=True)[:k]) / k
        owner[r] = max(values, key=lambda pair: (pair[0], -pair[1]))[1]
    assert len(scores) == n
    return scores.astype(np.float32), owner


def test_stream_knn_matches_brute_force_through_the_store_index(tmp_path) -> None:
    reference = l2_normalize(clustered(600, 16, seed=3))
    store = make_store(tmp_path / "emb", reference)
    index, plan = build_store_index(store, 1 << 30, kind="flat", progress=False)
    assert plan["kind"] == "flat"
    rng = np.random.default_rng(4)
    near = reference[rng.choice(600, 40, replace=False)]
    task = l2_normalize(near + rng.normal(0, 0.2, (40, 16)))
    labels = rng.integers(0, 3, 40)
    predicted = rng.integers(0, 3, 600)
    energy = rng.normal(size=600).astype(np.float32)
    stored = store.read_rows(np.arange(600)).astype(np.float32)  # what the index holds (fp16)
    for depth, k in ((7, 1), (25, 5), (600, 3)):
        got, stats = stream_knn_relevance(index, task, labels, predicted, energy, k=k, depth=depth)
        want, owner = brute_force_knn(stored, predicted, task, labels, energy, depth, k)
        np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got.owner, owner)
        assert stats["candidates"] == int((want < 1).sum()) and stats["depth"] == depth
    # candidates come first in a selection, then the rest in energy order
    relevance, stats = stream_knn_relevance(index, task, labels, predicted, energy, k=5, depth=10)
    scores = relevance.scores
    kept = select(scores, predicted, 3, SelectionConfig("lowest", keep=0.5))
    candidates = np.flatnonzero(scores < 1)
    assert stats["candidates"] < kept.size and np.isin(candidates, kept).all()
    rest = np.setdiff1d(kept, candidates)
    assert (
        energy[rest].max()
        <= np.sort(energy[np.setdiff1d(np.arange(600), candidates)])[rest.size - 1]
    )


def test_default_depth_covers_a_ten_percent_keep() -> None:
    assert default_depth(14_200_000, 3650) == 390
    assert default_depth(1000, 10) == 10
    assert default_depth(100, 1000, k=5) == 5
    assert default_depth(10**9, 10) == 2048
