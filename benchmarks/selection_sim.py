"""Simulated ImageNet-21K-like selections, for measuring payload codecs.

The reference set has 21,841 synsets (folders) whose sizes follow a heavy-tailed
log-normal law scaled to 14.2M images, in folder order (WordNet order, where
related synsets sit near each other).

* **clustered**: each class of the task has 1-5 centres in folder order, each
  spreading relevance over a window of neighbouring synsets (mean width 40).
  Every image gets a score ``relevance(synset) + noise``; the top ``p`` of
  images are kept, as an energy-ranked selection would. An image's label is its
  synset's class with the synset's purity (Beta(8, 1.5), mean 0.84), else the
  synset's runner-up class (60%) or any class.
* **uniform**: ``p`` of the images uniformly at random, labels uniform over k.
  No structure to exploit, so a codec can at best reach the information bound.

All parameters are fixed up front; the generator is seeded and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGENET21K_SYNSETS = 21_841
IMAGENET21K_IMAGES = 14_200_000


@dataclass(frozen=True)
class Selection:
    """One simulated selection over a reference set with folder boundaries."""

    name: str
    n: int
    block_starts: np.ndarray  # folder starts, then n
    indices: np.ndarray
    labels: np.ndarray
    k: int


def synset_sizes(
    seed: int = 0, synsets: int = IMAGENET21K_SYNSETS, images: int = IMAGENET21K_IMAGES
) -> np.ndarray:
    """Heavy-tailed folder sizes (log-normal, sigma 1) summing exactly to ``images``."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=6.0, sigma=1.0, size=synsets)
    sizes = np.maximum(1, np.round(raw * images / raw.sum()).astype(np.int64))
    sizes[np.argmax(sizes)] += images - int(sizes.sum())
    return sizes


def clustered(k: int, keep: float, seed: int = 0, sizes: np.ndarray | None = None) -> Selection:
    """Energy-ranked selection whose relevance clusters in folder order (see module doc)."""
    rng = np.random.default_rng(1000 + seed * 7919 + k)
    sizes = synset_sizes(seed) if sizes is None else sizes
    synsets = sizes.size
    n = int(sizes.sum())
    centres = rng.poisson(2.0, size=k) + 1
    centre_class = np.repeat(np.arange(k), centres)
    centre_at = rng.integers(0, synsets, size=centre_class.size)
    width = rng.geometric(1 / 40, size=centre_class.size)
    position = np.arange(synsets)
    best = np.zeros(synsets)
    second = np.zeros(synsets)
    best_class = rng.integers(0, k, size=synsets)
    second_class = rng.integers(0, k, size=synsets)
    for c, at, w in zip(centre_class, centre_at, width, strict=True):
        value = np.exp(-np.abs(position - at) / w)
        better = value > best
        second_class = np.where(better, best_class, np.where(value > second, c, second_class))
        second = np.where(better, best, np.maximum(second, value))
        best_class = np.where(better, c, best_class)
        best = np.maximum(best, value)
    relevance = best * rng.uniform(0.3, 1.0, size=synsets)
    purity = rng.beta(8.0, 1.5, size=synsets)
    block = np.repeat(np.arange(synsets), sizes)
    score = relevance[block].astype(np.float32)
    score += rng.normal(0.0, 0.15, size=n).astype(np.float32)
    m = max(1, round(keep * n))
    indices = np.sort(np.argpartition(-score, m - 1)[:m])
    del score
    b = block[indices]
    draw = rng.random(indices.size)
    labels = np.where(
        draw < purity[b],
        best_class[b],
        np.where(draw < purity[b] + 0.6 * (1 - purity[b]), second_class[b], -1),
    )
    rest = labels < 0
    labels[rest] = rng.integers(0, k, size=int(rest.sum()))
    starts = np.append(0, np.cumsum(sizes))
    return Selection(f"clustered k={k} p={keep:g}", n, starts, indices, labels.astype(np.int64), k)


def uniform(k: int, keep: float, seed: int = 0, sizes: np.ndarray | None = None) -> Selection:
    """Uniformly random images with uniformly random labels."""
    rng = np.random.default_rng(2000 + seed * 7919 + k)
    sizes = synset_sizes(seed) if sizes is None else sizes
    n = int(sizes.sum())
    m = max(1, round(keep * n))
    indices = np.sort(rng.choice(n, size=m, replace=False))
    labels = rng.integers(0, k, size=m)
    starts = np.append(0, np.cumsum(sizes))
    return Selection(f"uniform k={k} p={keep:g}", n, starts, indices, labels, k)
