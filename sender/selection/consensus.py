"""kNN consensus filtering: drop kept images whose neighbours mostly carry other labels.

A teacher's hard label is most often wrong on images that sit among images of
another class. After selection, each kept image's ``k`` nearest kept neighbours
(cosine, exact FAISS search) vote; an image whose label fewer than
``min_agreement`` of them share is dropped and its slot refilled by the selection
rule from the images not yet considered. Off by default: it costs a search over
the kept set only, but whether it helps depends on the embedding.
"""

from __future__ import annotations

import faiss
import numpy as np

from protocol.errors import ConfigError


def consensus_outliers(
    embeddings: np.ndarray, labels: np.ndarray, k: int = 10, min_agreement: float = 0.5
) -> np.ndarray:
    """Boolean mask over rows: True where fewer than ``min_agreement`` of the k
    nearest other rows share the row's label."""
    if k < 1 or not 0.0 <= min_agreement <= 1.0:
        raise ConfigError("consensus needs k >= 1 and an agreement share in [0, 1]")
    m = embeddings.shape[0]
    if m <= 1:
        return np.zeros(m, dtype=bool)
    k = min(k, m - 1)
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, ids = index.search(x, k + 1)
    neighbours = np.empty((m, k), dtype=np.int64)
    for row in range(m):  # drop the row itself wherever exact ties put it
        others = ids[row][ids[row] != row][:k]
        neighbours[row, : others.size] = others
        neighbours[row, others.size :] = others[-1] if others.size else row
    agreement = (labels[neighbours] == labels[:, None]).mean(axis=1)
    return agreement < min_agreement
