"""``plada-send embed``: CLIP embeddings of the whole reference set, resumable and shardable.

The reference set is cut into fixed parts of ``part_rows`` manifest rows. A run
embeds the parts of its ``--shard i/N`` slice that are not on disk yet, writing
each one atomically as soon as it is complete, so a killed run loses at most one
part. Images that cannot be decoded are skipped (zero vector, ``valid = False``)
and listed; they are never selected. ``merge`` then checks that every part is
there and concatenates them into the flat file the scoring pass streams.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from protocol.atomic_files import write_atomic, write_json_atomic
from protocol.errors import ConfigError, ReferenceSetError
from protocol.manifest import ReferenceManifest
from protocol.reference.base import ReferenceSource
from protocol.reference.encoded import (
    TENSOR_DECODERS,
    EncodedReference,
    UnreadableImage,
    decode_rgb,
    image_kind,
    resolve_tensor_decoder,
)
from sender.embedders import OpenClipEmbedder
from sender.embedding_store import (
    MANIFEST_FILE,
    SKIPPED_FILE,
    StoreMeta,
    create_store_meta,
    merge_parts,
    part_path,
    parts_of_shard,
    read_part,
    write_part,
)
from sender.tensor_decode import PreprocessSpec, TensorPreprocessor, iter_encoded_batches

UNREADABLE = "unreadable"  # a file that could not even be read


class ReferenceImages(Dataset):
    """Preprocessed reference images by manifest row; unreadable ones come back flagged."""

    def __init__(
        self, reference: ReferenceSource, rows: np.ndarray, preprocess: Any, side: int
    ) -> None:
        self.reference = reference
        self.rows = rows
        self.preprocess = preprocess
        self.side = side

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, str, str]:
        """(preprocessed image, row, problem or '', kind of file: see :func:`image_kind`)."""
        from PIL import Image

        row = int(self.rows[item])
        kind = "array"  # a set held in memory, no files
        if isinstance(self.reference, EncodedReference):
            image, problem, kind = None, "", UNREADABLE
            try:
                data = self.reference.read_bytes(row)
                kind = image_kind(data)
                image = decode_rgb(data, self.reference.describe(row))
            except UnreadableImage as exc:
                problem = str(exc)
        else:
            array = self.reference.load(np.array([row]))[0]
            image, problem = Image.fromarray(array.transpose(1, 2, 0).squeeze(2)), None
            image = image.convert("RGB")
        if image is None:
            return torch.zeros(3, self.side, self.side), row, problem or "unreadable", kind
        return self.preprocess(image), row, "", kind


@dataclass
class EmbedSummary:
    """What one ``embed`` run did."""

    parts_total: int
    parts_in_slice: int
    parts_resumed: int
    parts_written: int
    images_embedded: int
    images_skipped: int
    seconds: float
    formats: dict[str, int] = field(default_factory=dict)  # files by image_kind()

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / max(self.seconds, 1e-9)


def embed_reference(
    reference: ReferenceSource,
    out_dir: str | os.PathLike[str],
    model_name: str,
    pretrained: str,
    device: str = "cpu",
    batch_size: int = 256,
    workers: int = 4,
    part_rows: int = 65536,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    decode: str = "auto",
) -> EmbedSummary:
    """Embed the parts of ``shard`` that are not done yet (see module docstring).

    ``decode="pil"`` decodes and preprocesses in the DataLoader workers with
    open_clip's own transform; ``"torchcodec"`` or ``"torchvision"`` decode whole
    batches on the embedding device (nvJPEG on a GPU; see :mod:`sender.tensor_decode`).
    The summary counts the files by kind (baseline or progressive JPEG, other), since
    only baseline JPEGs take a GPU decoder's hardware path.
    """
    from tqdm import tqdm

    if part_rows < 1 or batch_size < 1:
        raise ConfigError("--part-rows and --batch-size must be positive")
    root = Path(out_dir)
    embedder = OpenClipEmbedder(model_name, pretrained, device)
    side = embedder.image_size
    dim = int(embedder.embed_batch(torch.zeros(1, 3, side, side)).shape[1])
    manifest = reference.manifest
    meta = StoreMeta(
        model=embedder.model_name,
        pretrained=Path(pretrained).name,
        dim=dim,
        n=len(manifest),
        part_rows=part_rows,
        reference_name=manifest.name,
        reference_fingerprint=manifest.fingerprint_hex,
    )
    create_store_meta(root, meta)
    if not (root / MANIFEST_FILE).is_file():
        manifest.save(root / MANIFEST_FILE)
    mine = parts_of_shard(meta, shard)
    pending = [p for p in mine if read_part(root, p, meta) is None]
    resumed = len(mine) - len(pending)
    started = time.perf_counter()
    rows = (
        np.concatenate([np.arange(*meta.part_range(p)) for p in pending])
        if pending
        else np.zeros(0, dtype=np.int64)
    )
    prepare = None
    batches: Any
    if decode == "auto":
        on_cuda = embedder.device.type == "cuda"
        decode = resolve_tensor_decoder("auto", embedder.device) if on_cuda else "pil"
    if decode == "pil":
        batches = DataLoader(
            ReferenceImages(reference, rows, embedder.preprocess, side),
            batch_size=batch_size,
            num_workers=workers,
            shuffle=False,
            pin_memory=embedder.device.type == "cuda",
        )
    elif decode in TENSOR_DECODERS:
        spec = PreprocessSpec.from_transform(embedder.preprocess)
        prepare = TensorPreprocessor(spec, embedder.device, decode)
        batches = iter_encoded_batches(reference, rows, batch_size, threads=max(4, workers))
    else:
        choices = ", ".join(("pil", *TENSOR_DECODERS))
        raise ConfigError(f"--decode must be one of {choices}, not {decode!r}")
    bar = tqdm(
        total=int(rows.size),
        unit="img",
        unit_scale=True,
        disable=not progress,
        desc=f"embedding {shard[0]}/{shard[1]}",
    )
    writer = _PartWriter(root, meta, pending)
    formats: Counter[str] = Counter()
    for batch in batches:
        if prepare is not None:
            encoded, batch_rows, problems = batch
            formats.update(image_kind(data) if data else UNREADABLE for data in encoded)
            where = [reference.manifest.keys[int(r)] for r in batch_rows]
            images, problems = prepare(encoded, list(problems), where)
        else:
            images, batch_rows, problems, kinds = batch
            formats.update(kinds)
        writer.add(embedder.embed_batch(images), batch_rows.numpy(), list(problems))
        bar.update(len(batch_rows))
    bar.close()
    if writer.current < len(pending):
        raise ReferenceSetError(f"embedding stopped inside part {pending[writer.current]}")
    return EmbedSummary(
        parts_total=meta.num_parts,
        parts_in_slice=len(mine),
        parts_resumed=resumed,
        parts_written=writer.current,
        images_embedded=int(rows.size),
        images_skipped=writer.skipped,
        seconds=time.perf_counter() - started,
        formats=dict(sorted(formats.items())),
    )


class _PartWriter:
    """Fills the pending parts in order from embedded batches; writes each when complete."""

    def __init__(self, root: Path, meta: StoreMeta, pending: list[int]) -> None:
        self.root, self.meta, self.pending = root, meta, pending
        self.current = 0
        self.skipped = 0
        self._reset()

    def _reset(self) -> None:
        if self.current < len(self.pending):
            start, stop = self.meta.part_range(self.pending[self.current])
            self.start = start
            self.embeddings = np.zeros((stop - start, self.meta.dim), dtype=np.float16)
            self.valid = np.ones(stop - start, dtype=bool)
            self.problems: dict[int, str] = {}
            self.filled = 0

    def add(self, embeddings: np.ndarray, rows: np.ndarray, problems: list[str]) -> None:
        offset = 0
        while offset < len(rows):
            size = self.embeddings.shape[0]
            take = min(len(rows) - offset, size - self.filled)
            if rows[offset] != self.start + self.filled:
                raise ReferenceSetError("embedding batches arrived out of order")
            block = slice(self.filled, self.filled + take)
            self.embeddings[block] = embeddings[offset : offset + take]
            for j in range(offset, offset + take):
                if problems[j]:
                    local = int(rows[j]) - self.start
                    self.valid[local] = False
                    self.embeddings[local] = 0.0
                    self.problems[int(rows[j])] = problems[j]
                    self.skipped += 1
            self.filled += take
            offset += take
            if self.filled == size:
                part = self.pending[self.current]
                write_part(self.root, part, self.embeddings, self.valid, self.problems)
                self.current += 1
                self._reset()


def merge_embeddings(
    out_dir: str | os.PathLike[str], sources: list[str] | None = None, int8: bool = False
) -> dict[str, Any]:
    """Gather parts from ``sources`` (other machines' directories), check coverage, merge."""
    import shutil

    root = Path(out_dir)
    meta = StoreMeta.load(root)
    manifest = ReferenceManifest.load(root / MANIFEST_FILE)
    if manifest.fingerprint_hex != meta.reference_fingerprint or len(manifest) != meta.n:
        raise ReferenceSetError(
            f"{root / MANIFEST_FILE} does not match {root / 'meta.json'}: the directory mixes "
            "two reference sets; embed again into an empty directory"
        )
    for source in sources or []:
        other = StoreMeta.load(Path(source))
        if other != meta:
            raise ConfigError(f"{source} holds embeddings of something else; cannot merge it")
        for part in range(meta.num_parts):
            found = part_path(Path(source), part)
            if read_part(root, part, meta) is None and read_part(Path(source), part, meta):
                with open(found, "rb") as copied:
                    write_atomic(
                        part_path(root, part), lambda handle: shutil.copyfileobj(copied, handle)
                    )
    summary = merge_parts(root, int8=int8)
    skipped = [
        {"index": row, "key": manifest.keys[row], "reason": reason}
        for row, reason in summary.pop("skipped").items()
    ]
    write_json_atomic(root / SKIPPED_FILE, skipped)
    return summary | {"skipped": len(skipped)}
