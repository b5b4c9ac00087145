"""Pruning the reference set to the most relevant images, with per-class safety-net quotas.

Strategies (scores: lower = more relevant):

- ``lowest``: the globally lowest-scoring ``keep`` fraction (the paper's vanilla rule);
- ``inverse``: the highest-scoring fraction (better for far out-of-domain tasks);
- ``safety-net``: a ``reserve`` share of the budget is split over classes with
  quota K_c proportional to N_c ** alpha (N_c = reference images predicted as c), each
  class filling its quota with its lowest-scoring images; the rest of the budget
  goes to the globally lowest-scoring images not yet kept. alpha < 0 favours rare
  classes, 0 gives equal quotas, 1 follows the predicted distribution;
- ``random``: a uniformly random ``keep`` fraction, labelled by the teacher (the
  control every selection rule must beat);
- ``random-balanced``: the safety-net's per-class quotas, filled at random within
  each class (the control for the quota alone).

The two controls ignore the score; they draw from ``seed``, so a payload is
reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from protocol.errors import ConfigError

STRATEGIES = ("lowest", "safety-net", "inverse", "random", "random-balanced")
RANDOM_STRATEGIES = ("random", "random-balanced")
AUTO = "auto"  # resolved from the domain-gap measurement before selecting


@dataclass(frozen=True)
class SelectionConfig:
    """How many images to keep and how to choose them."""

    strategy: str = "safety-net"
    keep: float = 0.01  # fraction of the reference set
    alpha: float = -0.2
    reserve: float = 1.0
    seed: int = 0  # the random controls' draw

    def __post_init__(self) -> None:
        if self.strategy not in (*STRATEGIES, AUTO):
            raise ConfigError(
                f"strategy must be one of {STRATEGIES} or auto, not {self.strategy!r}"
            )
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"keep fraction must be in (0, 1], not {self.keep}")
        if not 0.0 <= self.reserve <= 1.0:
            raise ConfigError(f"safety-net reserve must be in [0, 1], not {self.reserve}")

    @property
    def is_random(self) -> bool:
        return self.strategy in RANDOM_STRATEGIES

    def as_header(self) -> dict[str, float | str]:
        """The configuration as recorded in the payload (the seed only where it is used)."""
        header = asdict(self)
        if not self.is_random:
            del header["seed"]
        return header


def class_quotas(predicted_counts: np.ndarray, budget: int, alpha: float) -> np.ndarray:
    """Integer quotas K_c ∝ N_c^alpha summing to at most ``budget`` (0 for absent classes).

    Remainders go to the classes with the largest fractional parts; no quota exceeds N_c.
    """
    counts = predicted_counts.astype(np.float64)
    weights = np.where(counts > 0, np.power(np.maximum(counts, 1.0), alpha), 0.0)
    if weights.sum() == 0 or budget <= 0:
        return np.zeros_like(predicted_counts, dtype=np.int64)
    ideal = budget * weights / weights.sum()
    quotas = np.floor(ideal).astype(np.int64)
    leftover = budget - int(quotas.sum())
    order = np.argsort(-(ideal - quotas), kind="stable")
    quotas[order[:leftover]] += 1
    return np.minimum(quotas, predicted_counts.astype(np.int64))


def smallest(values: np.ndarray, candidates: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` candidates with the smallest values, ties broken by lower index.

    ``candidates`` must be sorted; returns them sorted. O(len) via a partition, the
    same set a stable full sort would give.
    """
    if count >= candidates.size:
        return candidates
    if count <= 0:
        return candidates[:0]
    subset = values[candidates]
    threshold = np.partition(subset, count - 1)[count - 1]
    below = candidates[subset < threshold]
    ties = candidates[subset == threshold][: count - below.size]
    return np.union1d(below, ties)


def select(
    scores: np.ndarray,
    predicted: np.ndarray,
    num_classes: int,
    config: SelectionConfig,
    excluded: np.ndarray | None = None,
) -> np.ndarray:
    """Sorted indices of the kept reference images.

    ``excluded`` (indices or a boolean mask) are never kept: unreadable images,
    near-duplicates of the task's test images. Linear in n (no full sort), so it
    runs in seconds on 14.2M rows.
    """
    if config.strategy == AUTO:
        raise ConfigError("resolve the auto strategy before selecting (see make_payload)")
    n = scores.shape[0]
    budget = max(1, round(config.keep * n))
    eligible = np.ones(n, dtype=bool)
    if excluded is not None:
        eligible[excluded] = False
    if config.is_random:  # a random order stands in for the score; unscored rows stay eligible
        values = np.random.default_rng(config.seed).random(n, dtype=np.float32)
    else:
        values = -scores if config.strategy == "inverse" else scores
        eligible &= ~np.isnan(values)
    candidates = np.flatnonzero(eligible)
    if config.strategy in ("lowest", "inverse", "random"):
        return smallest(values, candidates, budget)
    labels = predicted[candidates]
    counts = np.bincount(labels, minlength=num_classes)
    quotas = class_quotas(counts, round(config.reserve * budget), config.alpha)
    small = labels.astype(np.int16) if num_classes <= np.iinfo(np.int16).max else labels
    by_class = np.argsort(small, kind="stable")  # grouped by class, in index order (radix sort)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    kept = np.zeros(n, dtype=bool)
    for c in np.flatnonzero(quotas):
        members = candidates[by_class[bounds[c] : bounds[c + 1]]]
        kept[smallest(values, members, int(quotas[c]))] = True
    remaining = budget - int(kept.sum())
    if remaining > 0:
        kept[smallest(values, candidates[~kept[candidates]], remaining)] = True
    return np.flatnonzero(kept)


def order_key(config: SelectionConfig, score: str) -> tuple[str, str, int]:
    """Which ordering of the rows ``config`` on ``score`` reads its selection from: the
    score ascending, descending (inverse), or a seeded random draw (any score)."""
    if config.is_random:
        return ("", "random", config.seed)
    return (score, "descending" if config.strategy == "inverse" else "ascending", 0)


@dataclass(frozen=True)
class _Order:
    """Eligible rows by (value, row), and the same rows grouped by class in that order."""

    key: tuple[str, str, int]
    rows: np.ndarray
    by_class: np.ndarray
    bounds: np.ndarray  # class c's rows are by_class[bounds[c]:bounds[c + 1]]
    counts: np.ndarray


def stable_order(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows[np.argsort(values[rows], kind="stable")]`` for ascending ``rows`` of
    non-NaN ``values``. Float32 values below 2**32 rows sort as one array of 64-bit keys
    (the value's bits made order-preserving, then the row, so ties keep row order): one
    sort, faster than a stable argsort, holding no more memory."""
    if values.dtype != np.float32 or (rows.size and int(rows[-1]) >= 1 << 32):
        return rows[np.argsort(values[rows], kind="stable")]
    bits = values[rows].view(np.uint32)
    bits[bits == np.uint32(1 << 31)] = 0  # -0.0 ties with 0.0
    negative = bits >= np.uint32(1 << 31)
    np.invert(bits, out=bits, where=negative)  # more negative: smaller
    np.bitwise_or(bits, np.uint32(1 << 31), out=bits, where=~negative)
    del negative
    keys = bits.astype(np.uint64)
    del bits
    keys <<= np.uint64(32)
    np.bitwise_or(keys, rows, out=keys, dtype=np.uint64, casting="unsafe")
    keys.sort()
    keys &= np.uint64(0xFFFFFFFF)
    return keys.astype(rows.dtype)


class RankedSelection:
    """:func:`select` for many configurations and scores, keeping exactly the rows it
    keeps: each ordering of the rows (see :func:`order_key`) is sorted once and every
    keep and quota is read off it, which is what a plan over 14.2M rows needs. Only the
    latest ordering is held (two int32 arrays of the rows), so callers group their
    configurations by :func:`order_key`."""

    def __init__(
        self,
        scores: Mapping[str, np.ndarray],
        predicted: np.ndarray,
        num_classes: int,
        excluded: np.ndarray | None = None,
    ) -> None:
        self.scores, self.predicted, self.num_classes = scores, predicted, num_classes
        self.n = predicted.shape[0]
        self.eligible = np.ones(self.n, dtype=bool)
        if excluded is not None:
            self.eligible[excluded] = False
        self._order: _Order | None = None

    def _ordering(self, config: SelectionConfig, score: str) -> _Order:
        key = order_key(config, score)
        if self._order is None or self._order.key != key:
            self._order = None  # free the last one before sorting the next
            self._order = self._sort(key)
        return self._order

    def _sort(self, key: tuple[str, str, int]) -> _Order:
        (score, kind, seed), n, eligible = key, self.n, self.eligible
        if kind == "random":  # as select(): unscored rows stay eligible
            values = np.random.default_rng(seed).random(n, dtype=np.float32)
        else:
            values = -self.scores[score] if kind == "descending" else self.scores[score]
            eligible = eligible & ~np.isnan(values)
        index = np.int32 if n < np.iinfo(np.int32).max else np.int64
        rows = stable_order(values, np.flatnonzero(eligible).astype(index))
        del values
        labels = self.predicted[rows]
        counts = np.bincount(labels, minlength=self.num_classes)
        small = labels.astype(np.int16) if self.num_classes <= np.iinfo(np.int16).max else labels
        by_class = rows[np.argsort(small, kind="stable")]  # by class, in value order within
        return _Order(key, rows, by_class, np.concatenate([[0], np.cumsum(counts)]), counts)

    def select(self, config: SelectionConfig, score: str) -> np.ndarray:
        """Sorted indices of the rows :func:`select` keeps for ``config`` on ``score``."""
        if config.strategy == AUTO:
            raise ConfigError("resolve the auto strategy before selecting (see make_payload)")
        order = self._ordering(config, score)
        budget = max(1, round(config.keep * self.n))
        if config.strategy in ("lowest", "inverse", "random"):
            return np.sort(order.rows[:budget]).astype(np.int64)
        quotas = class_quotas(order.counts, round(config.reserve * budget), config.alpha)
        kept = np.zeros(self.n, dtype=bool)
        for c in np.flatnonzero(quotas):
            kept[order.by_class[order.bounds[c] : order.bounds[c] + quotas[c]]] = True
        remaining = budget - int(quotas.sum())
        if remaining > 0:  # the first `budget` rows hold at most quotas.sum() kept ones
            head = order.rows[:budget]
            kept[head[~kept[head]][:remaining]] = True
        return np.flatnonzero(kept)
