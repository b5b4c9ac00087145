import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError
from sender.scoring.scores import cover_order, energy, entropy, knn_relevance, l2_normalize
from sender.selection.strategies import (
    RankedSelection,
    SelectionConfig,
    class_quotas,
    order_key,
    select,
    stable_order,
)


def test_energy_and_entropy_match_torch() -> None:
    logits = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32) * 5
    t = torch.from_numpy(logits)
    assert np.allclose(energy(logits), -torch.logsumexp(t, 1).numpy(), atol=1e-5)
    assert np.allclose(energy(logits, 2.0), -2 * torch.logsumexp(t / 2, 1).numpy(), atol=1e-5)
    p = torch.softmax(t, 1)
    assert np.allclose(entropy(logits), -(p * p.log()).sum(1).numpy(), atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 10_000), min_size=2, max_size=30),
    st.integers(0, 5000),
    st.floats(-1.0, 1.0),
)
def test_quotas_sum_to_budget_and_respect_supply(counts, budget, alpha) -> None:
    counts = np.asarray(counts)
    quotas = class_quotas(counts, budget, alpha)
    assert np.all(quotas <= counts) and np.all(quotas >= 0)
    assert quotas.sum() <= budget
    if budget <= counts.sum() and np.all(quotas < counts):
        assert quotas.sum() == budget
    assert np.all(quotas[counts == 0] == 0)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 400),
    k=st.integers(1, 6),
    levels=st.integers(1, 50),  # few distinct values: many ties, broken by row as select does
    nan_share=st.sampled_from([0.0, 0.1]),
    excluded_share=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_ranked_selection_keeps_exactly_what_select_keeps(
    n, k, levels, nan_share, excluded_share, seed
) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, n).astype(np.float32)
    scores[rng.random(n) < nan_share] = np.nan
    predicted = rng.integers(0, k, n)
    excluded = np.flatnonzero(rng.random(n) < excluded_share)
    ranked = RankedSelection({"s": scores, "t": -scores}, predicted, k, excluded)
    configs = [
        SelectionConfig(strategy, keep, alpha, reserve, seed=seed % 3)
        for strategy in ("lowest", "inverse", "random", "safety-net", "random-balanced")
        for keep in (0.003, 0.05, 0.3, 1.0)
        for reserve, alpha in ((0.5, -0.2), (1.0, 0.0), (1.0, 1.0))
    ]
    runs = sorted(((c, s) for c in configs for s in "st"), key=lambda run: order_key(*run))
    for config, score in runs:
        values = scores if score == "s" else -scores
        expected = select(values, predicted, k, config, excluded=excluded)
        kept = ranked.select(config, score)
        np.testing.assert_array_equal(kept, expected, err_msg=f"{config} {score}")


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([-np.inf, -2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 1.0, 3.0, np.inf])
        | st.floats(-1e6, 1e6, width=32),
        max_size=200,
    ),
    dropped=st.integers(0, 2**16),
    wide=st.booleans(),
)
def test_stable_order_is_the_stable_argsort(values, dropped, wide) -> None:
    # ties (0.0 and -0.0 among them) keep row order, as the stable argsort that select uses
    array = np.asarray(values, dtype=np.float64 if wide else np.float32)
    rows = np.flatnonzero(np.random.default_rng(dropped).random(array.size) < 0.8)
    rows = rows.astype(np.int32)
    expected = rows[np.argsort(array[rows], kind="stable")]
    got = stable_order(array, rows)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == rows.dtype


def test_negative_alpha_favours_rare_classes() -> None:
    quotas = class_quotas(np.array([10_000, 100]), 100, -0.5)
    assert quotas[1] > quotas[0]
    assert class_quotas(np.array([10_000, 100]), 100, 0.0).tolist() == [50, 50]


def test_strategies() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=1000)
    predicted = np.where(np.arange(1000) < 990, 0, 1)  # class 1 is rare
    low = select(scores, predicted, 2, SelectionConfig("lowest", keep=0.05))
    inv = select(scores, predicted, 2, SelectionConfig("inverse", keep=0.05))
    net = select(scores, predicted, 2, SelectionConfig("safety-net", keep=0.05, alpha=0, reserve=1))
    assert len(low) == len(inv) == len(net) == 50
    assert np.all(np.diff(net) > 0)
    assert scores[low].max() <= np.sort(scores)[49] and scores[inv].min() >= np.sort(scores)[-50]
    assert np.sum(predicted[net] == 1) == 10  # all of the rare class, quota 25 capped at 10
    with pytest.raises(ConfigError):
        SelectionConfig("uniform")


def test_random_controls_ignore_the_score_and_are_reproducible() -> None:
    rng = np.random.default_rng(2)
    scores = rng.normal(size=2000)
    predicted = np.where(np.arange(2000) < 1900, 0, 1)  # class 1 is rare
    uniform = select(scores, predicted, 2, SelectionConfig("random", keep=0.05))
    again = select(-scores, predicted, 2, SelectionConfig("random", keep=0.05))
    other = select(scores, predicted, 2, SelectionConfig("random", keep=0.05, seed=1))
    assert uniform.size == 100 and np.array_equal(uniform, again)
    assert not np.array_equal(uniform, other)
    # not the lowest scores: a uniform draw spans the score distribution
    assert scores[uniform].max() > np.sort(scores)[99] + 1.0
    balanced = select(
        scores, predicted, 2, SelectionConfig("random-balanced", keep=0.05, alpha=0, reserve=1)
    )
    assert balanced.size == 100 and np.sum(predicted[balanced] == 1) == 50
    assert np.sum(predicted[uniform] == 1) < 20  # the uniform draw follows the 95:5 mix
    header = SelectionConfig("random", seed=3).as_header()
    assert header["seed"] == 3 and "seed" not in SelectionConfig().as_header()


def test_knn_relevance_prefers_images_near_their_predicted_class() -> None:
    task = l2_normalize(np.array([[1, 0], [0, 1]], dtype=np.float32))
    ref = l2_normalize(np.array([[1, 0.1], [1, 0.9], [0.1, 1]], dtype=np.float32))
    relevance = knn_relevance(ref, np.array([0, 0, 1]), task, np.array([0, 1]), k=1)
    scores = relevance.scores
    assert relevance.owner.tolist() == [0, 0, 1]  # each row's nearest task image of its class
    assert scores[0] < scores[1]  # (1, .1) is closer to class 0's image than (1, .9)
    assert scores[2] < scores[1]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-1, 6), st.floats(-1, 2, width=32)), min_size=1, max_size=80),
    st.integers(1, 4),
)
def test_cover_takes_each_task_images_next_rows_round_by_round(rows, per_round) -> None:
    owner = np.array([o for o, _ in rows])
    knn = np.array([v for _, v in rows], dtype=np.float32)
    order = np.argsort(cover_order(knn, owner, per_round), kind="stable")
    owned = owner[order] >= 0
    assert not np.any(owned[1:] & ~owned[:-1])  # unowned rows come after every owned one
    seen: dict[int, int] = {}
    rounds = []
    for row in order[owned]:
        seen[owner[row]] = seen.get(owner[row], 0) + 1
        rounds.append((seen[owner[row]] - 1) // per_round)
    assert rounds == sorted(rounds)  # no task image's next round before every current one
    # the round of each row, from its definition: the rows of its task image ahead of it
    # in (kNN, row) order, by per_round; unowned rows one round after the last
    ahead = [
        sum((owner[j] == owner[i]) and ((knn[j], j) < (knn[i], i)) for j in range(len(knn)))
        for i in range(len(knn))
    ]
    expected = [a // per_round if o >= 0 else -1 for a, o in zip(ahead, owner, strict=True)]
    last = max((e for e in expected if e >= 0), default=-1)
    expected = [last + 1 if e < 0 else e for e in expected]
    if last < 0:
        expected = [0] * len(expected)
    assert np.floor(cover_order(knn, owner, per_round)).astype(int).tolist() == expected
    resolution = 1e-6 * (np.ptp(knn) + 1e-12)  # kNN mapped into [0, 1) in float32
    for o in set(owner[owner >= 0]):  # each task image's rows in kNN order
        mine = knn[order[owner[order] == o]]
        assert np.all(np.diff(mine) >= -resolution)


def test_cover_spreads_a_budget_that_knn_piles_onto_one_task_image() -> None:
    """Two task images of one class: many reference rows crowd around the first, a few
    lie near the second. kNN relevance spends the whole budget on the crowd; cover
    takes the second's nearest rows as well, and with a round as large as the budget it
    is kNN relevance again."""
    rng = np.random.default_rng(0)
    task = l2_normalize(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    crowd = task[0] + rng.normal(0, 0.02, (60, 3))
    sparse = task[1] + rng.normal(0, 0.15, (8, 3))
    reference = l2_normalize(np.vstack([crowd, sparse]).astype(np.float32))
    predicted = np.zeros(68, dtype=np.int64)
    relevance = knn_relevance(reference, predicted, task, np.array([0, 0]), k=1)
    assert set(relevance.owner[:60]) == {0} and set(relevance.owner[60:]) == {1}
    config = SelectionConfig("lowest", keep=10 / 68)
    by_knn = select(relevance.scores, predicted, 1, config)
    by_cover = select(relevance.cover(), predicted, 1, config)
    assert (by_knn >= 60).sum() <= 1 and (by_cover >= 60).sum() == 5
    np.testing.assert_array_equal(select(relevance.cover(100), predicted, 1, config), by_knn)
    with pytest.raises(ConfigError):
        cover_order(relevance.scores, relevance.owner, 0)
