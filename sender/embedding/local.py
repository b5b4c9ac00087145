"""``plada-send embed``: CLIP embeddings of the whole reference set, in this process,
resumable and shardable.

The reference set is cut into fixed parts of ``part_rows`` manifest rows. A run
embeds the parts of its ``--shard i/N`` slice that are not on disk yet, writing
each one atomically as soon as it is complete, so a killed run loses at most one
part. Images that cannot be decoded are skipped (zero vector, ``valid = False``)
and listed; they are never selected. ``merge`` then checks that every part is
there and concatenates them into the flat file the scoring pass streams.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from protocol.reference.base import ReferenceSource
from sender.embedding.embedders import OpenClipEmbedder
from sender.embedding.engine import (
    BatchDecoding,
    EmbedJob,
    EmbedPlan,
    EmbedSettings,
    EmbedSummary,
    PartCollector,
    Say,
    open_embedding_dir,
    open_reference_set,
    progress_bar,
)
from sender.embedding.tensor_decode import iter_encoded_batches


class LocalEngine:
    """The engine of this process (and its decoding workers); ``say`` gets its notes."""

    def __init__(self, say: Say = print) -> None:
        self.say = say

    def embed(self, job: EmbedJob) -> EmbedSummary:
        source = open_reference_set(job.reference, self.say)
        return embed_reference(source, job.out_dir, job.settings)


def embed_reference(
    reference: ReferenceSource, out_dir: str | os.PathLike[str], settings: EmbedSettings
) -> EmbedSummary:
    """Embed the parts of ``settings.shard`` that are not done yet (see module docstring).

    ``decode="pil"`` decodes and preprocesses in the DataLoader workers with open_clip's
    own transform; ``"torchcodec"`` or ``"torchvision"`` decode whole batches on the
    embedding device (nvJPEG on a GPU; see :mod:`sender.embedding.tensor_decode`). The
    summary counts the files by kind (baseline or progressive JPEG, other), since only
    baseline JPEGs take a GPU decoder's hardware path.
    """
    embedder = OpenClipEmbedder(settings.model, settings.weights, settings.device)
    plan = open_embedding_dir(reference, out_dir, embedder, settings)
    writer = PartCollector(plan)  # the run's clock starts here
    rows = plan.rows
    shard = settings.shard
    bar = progress_bar(int(rows.size), f"embedding {shard[0]}/{shard[1]}", settings.progress)
    decoding = BatchDecoding(embedder, settings.decode, settings.thumbnails)
    for images, batch_rows, problems, kinds in _embedding_batches(
        reference, decoding, plan, settings
    ):
        writer.add(batch_rows, decoding.embed(images), problems, kinds)
        bar.update(len(batch_rows))
    bar.close()
    return writer.summary()


def _embedding_batches(
    reference: ReferenceSource,
    decoding: BatchDecoding,
    plan: EmbedPlan,
    settings: EmbedSettings,
) -> Iterator[tuple[torch.Tensor, np.ndarray, list[str], list[str]]]:
    """(preprocessed images, rows, a problem per row, the kind of each row's file) of each
    batch of the plan: decoded by PIL in DataLoader workers, or in whole batches on the
    device."""
    batch_ranges = plan.batches(settings.batch_size)
    if decoding.prepare is None:
        offsets = np.cumsum([0] + [stop - start for start, stop in batch_ranges])
        loader = DataLoader(
            decoding.images(reference, plan.rows),
            batch_sampler=[range(offsets[i], offsets[i + 1]) for i in range(len(batch_ranges))],
            num_workers=settings.workers,
            pin_memory=decoding.embedder.device.type == "cuda",
        )
        for images, batch_rows, problems, kinds in loader:
            yield images, batch_rows.numpy(), list(problems), list(kinds)
        return
    threads = max(4, settings.workers)
    for encoded, batch_rows, problems in iter_encoded_batches(reference, batch_ranges, threads):
        keys = [reference.manifest.keys[int(r)] for r in batch_rows]
        images, problems, kinds = decoding.encoded(encoded, list(problems), keys)
        yield images, batch_rows.numpy(), problems, kinds
