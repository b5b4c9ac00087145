"""How far the target task is from the reference set, and which selection that calls for.

Evidence: each target image's cosine similarity to its nearest reference image,
compared with the same quantity for held-out reference images. A target image is
an outlier when its similarity is below the ``percentile`` of the reference's own
(an OOD test at 99% true-positive rate by default). When most target images are
outliers the task is far out of domain: low-energy images then describe the
reference set's own modes rather than the task, and the paper found high-energy
(``inverse``) selection better there; otherwise lowest energy + safety-net.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class DomainGap:
    """The measurement and the strategy chosen from it."""

    target_images: int
    reference_sample: int
    target_nn_similarity_median: float
    reference_nn_similarity_median: float
    reference_nn_similarity_threshold: float
    percentile: float
    outlier_fraction: float
    far_ood_fraction: float
    strategy: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


SIMILARITY_BLOCK_ENTRIES = 1 << 24  # query x pool similarities held at once (64 MB)


def _nearest_similarity(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Each query's highest cosine similarity to ``pool``, a block of queries at a time
    (each block's similarities to the 100,000-row sample bounded to 64 MB, not 1.6 GB)."""
    import torch

    pool_t = torch.from_numpy(np.ascontiguousarray(pool, np.float32)).T
    block = max(1, SIMILARITY_BLOCK_ENTRIES // max(1, pool.shape[0]))
    out = [np.zeros(0, np.float32)]
    with torch.no_grad():
        for start in range(0, queries.shape[0], block):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + block], np.float32))
            out.append((q @ pool_t).max(dim=1).values.numpy())
    return np.concatenate(out)


def measure_domain_gap(
    reference_sample: np.ndarray,
    reference_queries: np.ndarray,
    target: np.ndarray,
    percentile: float = 1.0,
    far_ood_fraction: float = 0.5,
) -> DomainGap:
    """Compare target and held-out reference images' nearest-neighbour similarity to a sample.

    All inputs are L2-normalised embeddings; ``reference_queries`` must not be in
    ``reference_sample``.
    """
    target_sims = _nearest_similarity(target, reference_sample)
    reference_sims = _nearest_similarity(reference_queries, reference_sample)
    threshold = float(np.percentile(reference_sims, percentile))
    outliers = float(np.mean(target_sims < threshold))
    far = outliers >= far_ood_fraction
    strategy = "inverse" if far else "safety-net"
    reason = (
        f"{100 * outliers:.1f}% of target images are less similar to the reference set than "
        f"{100 - percentile:g}% of reference images are (threshold {threshold:.3f}); "
        + (
            "far out of domain: high-energy selection"
            if far
            else "in domain: lowest energy + safety-net"
        )
    )
    return DomainGap(
        target_images=int(target.shape[0]),
        reference_sample=int(reference_sample.shape[0]),
        target_nn_similarity_median=float(np.median(target_sims)),
        reference_nn_similarity_median=float(np.median(reference_sims)),
        reference_nn_similarity_threshold=threshold,
        percentile=percentile,
        outlier_fraction=outliers,
        far_ood_fraction=far_ood_fraction,
        strategy=strategy,
        reason=reason,
    )


def split_reference_sample(
    n: int, sample: int = 100_000, queries: int = 2_000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted row sets (sample, held-out queries) drawn from range(n)."""
    rng = np.random.default_rng(seed)
    queries = min(queries, max(1, n // 10))
    sample = min(sample, n - queries)
    rows = rng.choice(n, size=sample + queries, replace=False)
    return np.sort(rows[:sample]), np.sort(rows[sample:])
