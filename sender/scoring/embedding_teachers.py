"""Teachers that live on CLIP embeddings, for scoring millions of reference rows.

- ``probe``: multinomial logistic regression on the task's image embeddings
  (full-batch L-BFGS in torch; no second BLAS thread pool in the scoring process);
- ``zeroshot``: CLIP's text tower on prompts built from the class names; needs no
  labeled images at all;
- ``knn``: per class, the mean cosine similarity to the ``k`` nearest labeled task
  images, scaled like CLIP logits. Costs one GEMM against the task's images per
  reference chunk, so it suits tasks of up to a few thousand labeled images.

Probe and zero-shot teachers are linear heads (one GEMM per chunk); the kNN
teacher is a logit function over chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protocol.errors import ConfigError, TaskDataError
from sender.embedding.embedders import ClipEmbedder
from sender.scoring.stream import LinearHead

PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "an image of a {}.",
)


def train_probe(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    c: float = 10.0,
    max_iter: int = 200,
    seed: int = 0,
) -> LinearHead:
    """Multinomial logistic regression, L2 penalty 1 / (2 C) |W|^2 (as scikit-learn's C)."""
    if embeddings.shape[0] != labels.shape[0] or embeddings.shape[0] == 0:
        raise TaskDataError("the probe needs one label per task embedding (and at least one)")
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        line_search_fn="strong_wolfe",
    )
    n = x.shape[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="sum")
        loss = (loss + weight.pow(2).sum() / (2 * c)) / n
        loss.backward()
        return loss

    optimizer.step(closure)
    return LinearHead(weight.detach().numpy(), bias.detach().numpy())


def zero_shot_head(
    embedder: ClipEmbedder, class_names: list[str], templates: tuple[str, ...] = PROMPT_TEMPLATES
) -> LinearHead:
    """Averaged prompt embeddings per class, scaled by CLIP's logit scale."""
    if len(class_names) < 2:
        raise ConfigError("zero-shot needs at least two class names")
    rows = []
    for name in class_names:
        readable = name.replace("_", " ")
        prompts = embedder.embed_text([t.format(readable) for t in templates])
        mean = prompts.mean(axis=0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    scale = embedder.logit_scale
    weight = np.stack(rows).astype(np.float32) * scale
    return LinearHead(weight, np.zeros(len(class_names), dtype=np.float32))


@dataclass
class KnnTeacher:
    """Class logits from the k nearest labeled task images of each class."""

    embeddings: np.ndarray  # [T, d] L2-normalised task images
    labels: np.ndarray  # [T]
    num_classes: int
    k: int = 5
    scale: float = 1.0 / 0.07  # CLIP's initial temperature
    max_block_floats: int = 1 << 25

    def __post_init__(self) -> None:
        counts = np.bincount(self.labels, minlength=self.num_classes)
        if np.any(counts == 0):
            missing = np.flatnonzero(counts == 0).tolist()
            raise TaskDataError(
                f"the kNN teacher needs labeled images of every class; none of {missing}"
            )
        width = int(counts.max())
        # columns of each class's images, padded with the index of a sentinel column
        members = np.full((self.num_classes, width), self.labels.size, dtype=np.int64)
        for c in range(self.num_classes):
            found = np.flatnonzero(self.labels == c)
            members[c, : found.size] = found
        self._members = torch.from_numpy(members)
        self._task = torch.from_numpy(np.ascontiguousarray(self.embeddings, np.float32)).T
        self._k = min(self.k, int(counts.min()))

    @torch.no_grad()
    def logits(self, chunk: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, num_classes] for float32 embeddings [rows, d]."""
        width = self._members.shape[1]
        block = max(1, self.max_block_floats // (self.num_classes * width))
        out = torch.empty(chunk.shape[0], self.num_classes)
        for start in range(0, chunk.shape[0], block):
            sims = chunk[start : start + block] @ self._task
            sims = torch.cat([sims, torch.full((sims.shape[0], 1), -2.0)], dim=1)
            grouped = sims[:, self._members]  # [rows, classes, width]
            top = grouped.topk(self._k, dim=2).values.mean(dim=2)
            out[start : start + block] = top * self.scale
        return out

    def logits_numpy(self, embeddings: np.ndarray) -> np.ndarray:
        return self.logits(torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))).numpy()
