"""What every embedding engine shares: the run's settings, the plan of parts and batches,
the part collector that writes each part once all its rows are in, and the summary.

An engine (:class:`EmbedEngine`: this process in :mod:`.local`, a Ray actor pool in
:mod:`.ray_engine`) embeds exactly the batches of :meth:`EmbedPlan.batches` and hands
them to a :class:`PartCollector`, so the parts come out the same whichever engine,
shard or resumed run computed them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from protocol.errors import ConfigError, ReferenceSetError
from protocol.reference.base import ReferenceSource
from protocol.reference.encoded import (
    TENSOR_DECODERS,
    EncodedReference,
    UnreadableImage,
    decode_rgb,
    image_kind,
    resolve_tensor_decoder,
)
from protocol.reference.factory import ReferenceLocation
from sender.embedding.embedders import OpenClipEmbedder
from sender.embedding.store import (
    MANIFEST_FILE,
    StoreMeta,
    create_store_meta,
    parts_of_shard,
    read_part,
    write_part,
)
from sender.embedding.tensor_decode import PreprocessSpec, TensorPreprocessor
from sender.embedding.thumbnails import (
    DEFAULT_THUMBNAIL_SIZE,
    Thumbnailer,
    check_thumbnail_size,
    thumbnail_part_size,
    write_thumbnail_part,
)

UNREADABLE = "unreadable"  # a file that could not even be read
Say = Callable[[str], None]


@dataclass(frozen=True)
class EmbedSettings:
    """How an embedding run goes, whichever engine runs it."""

    model: str  # open_clip model name, or a model config JSON
    weights: str  # local weights file (or a pretrained tag already cached)
    device: str = "cpu"
    batch_size: int = 256
    workers: int = 4  # decoding processes (local) or threads per actor (Ray)
    part_rows: int = 65536
    shard: tuple[int, int] = (0, 1)
    decode: str = "auto"
    progress: bool = True
    thumbnails: int = DEFAULT_THUMBNAIL_SIZE  # side of each row's stored thumbnail; 0: none

    def __post_init__(self) -> None:
        check_thumbnail_size(self.thumbnails)
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be positive")
        if self.part_rows < 1:
            raise ConfigError("--part-rows must be positive")


def open_reference_set(reference: ReferenceLocation, say: Say) -> ReferenceSource:
    """The reference set to embed; ``say`` gets a warning per entry its reader skipped."""
    source = reference.open()
    for problem in getattr(source, "problems", []):
        say(f"warning: {problem}")
    return source


@dataclass(frozen=True)
class EmbedJob:
    """One embedding run: the reference set, the embeddings directory, and how."""

    reference: ReferenceLocation
    out_dir: Path
    settings: EmbedSettings


class EmbedEngine(Protocol):
    """Embeds the parts of a job's shard that are not on disk yet."""

    def embed(self, job: EmbedJob) -> EmbedSummary: ...


class BatchDecoding:
    """How an engine turns reference rows into an embedder's input: open_clip's own
    transform on PIL images (``pil``), or whole batches decoded on the embedding device
    (``--decode``; see :func:`choose_decoder`); and that input into embeddings and
    thumbnails (:meth:`embed`)."""

    def __init__(self, embedder: OpenClipEmbedder, decode: str, thumbnails: int = 0) -> None:
        self.embedder = embedder
        self.decode = choose_decoder(decode, embedder.device)
        self.prepare = None
        spec = None
        if self.decode != "pil" or thumbnails:
            spec = PreprocessSpec.from_transform(embedder.preprocess)
        if self.decode != "pil":
            self.prepare = TensorPreprocessor(spec, embedder.device, self.decode)
        self.thumbnailer = Thumbnailer(spec, thumbnails) if thumbnails else None

    def embed(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(fp16 embeddings, uint8 thumbnails or None) of a preprocessed batch."""
        images = images.to(self.embedder.device, non_blocking=True)
        embeddings = self.embedder.embed_batch(images).astype(np.float16)
        return embeddings, None if self.thumbnailer is None else self.thumbnailer(images)

    def images(self, reference: ReferenceSource, rows: np.ndarray) -> ReferenceImages:
        """The rows as a dataset of preprocessed images (the PIL path)."""
        embedder = self.embedder
        return ReferenceImages(reference, rows, embedder.preprocess, embedder.image_size)

    def encoded(
        self, encoded: list[bytes], problems: list[str], keys: list[str]
    ) -> tuple[torch.Tensor, list[str], list[str]]:
        """A batch of encoded files decoded on the device: (images, a problem per row,
        the kind of each row's file; see :func:`image_kind`)."""
        assert self.prepare is not None, "the PIL path decodes no batches"
        kinds = [image_kind(data) if data else UNREADABLE for data in encoded]
        images, problems = self.prepare(encoded, problems, keys)
        return images, problems, kinds


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
    first_batch_seconds: float = 0.0  # start-up: until the first batch was embedded
    first_batch_images: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_embedded / max(self.seconds, 1e-9)

    @property
    def steady_images_per_second(self) -> float:
        """Images/s after the first batch: the rate without the start-up."""
        images = self.images_embedded - self.first_batch_images
        return images / max(self.seconds - self.first_batch_seconds, 1e-9)


@dataclass
class EmbedPlan:
    """An embeddings directory opened for one run: what it holds and which parts remain."""

    root: Path
    meta: StoreMeta
    mine: list[int]  # the parts of this run's --shard slice
    pending: list[int]  # those not on disk yet (or without the thumbnails asked for)
    thumbnails: int = 0  # the thumbnails' side; 0: none

    @property
    def rows(self) -> np.ndarray:
        """The manifest rows of the pending parts, in order."""
        if not self.pending:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(*self.meta.part_range(p)) for p in self.pending])

    def batches(self, batch_size: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of at most ``batch_size`` rows, cut at every part start.

        Every engine embeds exactly these batches, so a row's embedding never depends
        on which engine, shard or resumed run computed it (a forward pass's numbers can
        change with the rows it shares a batch with).
        """
        ranges = []
        for part in self.pending:
            start, stop = self.meta.part_range(part)
            ranges.extend((s, min(s + batch_size, stop)) for s in range(start, stop, batch_size))
        return ranges


def open_embedding_dir(
    reference: ReferenceSource,
    out_dir: str | os.PathLike[str],
    embedder: OpenClipEmbedder,
    settings: EmbedSettings,
) -> EmbedPlan:
    """Create (or check, when resuming) the directory for ``reference`` and list the parts
    of the settings' shard still to do."""
    root = Path(out_dir)
    side = embedder.image_size
    dim = int(embedder.embed_batch(torch.zeros(1, 3, side, side)).shape[1])
    manifest = reference.manifest
    meta = StoreMeta(
        model=embedder.model_name,
        pretrained=Path(settings.weights).name,
        dim=dim,
        n=len(manifest),
        part_rows=settings.part_rows,
        reference_name=manifest.name,
        reference_fingerprint=manifest.fingerprint_hex,
    )
    create_store_meta(root, meta)
    if not (root / MANIFEST_FILE).is_file():
        manifest.save(root / MANIFEST_FILE)
    mine = parts_of_shard(meta, settings.shard)
    size = settings.thumbnails

    def done(part: int) -> bool:
        start, stop = meta.part_range(part)
        if size and thumbnail_part_size(root, part, stop - start) != size:
            return False
        return read_part(root, part, meta) is not None

    return EmbedPlan(root, meta, mine, [p for p in mine if not done(p)], size)


def choose_decoder(decode: str, device: torch.device) -> str:
    """The decoder ``--decode`` names; ``auto`` is a batched one on CUDA, else PIL."""
    if decode == "auto":
        return resolve_tensor_decoder("auto", device) if device.type == "cuda" else "pil"
    if decode != "pil" and decode not in TENSOR_DECODERS:
        choices = ", ".join(("pil", *TENSOR_DECODERS))
        raise ConfigError(f"--decode must be one of {choices}, not {decode!r}")
    return decode


def progress_bar(total: int, desc: str, enabled: bool):
    """The embedding progress bar (images, with throughput), shared by every engine."""
    from tqdm import tqdm

    return tqdm(total=total, unit="img", unit_scale=True, disable=not enabled, desc=desc)


class PartCollector:
    """Fills the pending parts from embedded batches, in any order; writes each part
    atomically once every one of its rows has arrived exactly once. It also keeps the
    run's tally for its :class:`EmbedSummary` (its clock starts when it is made)."""

    def __init__(self, plan: EmbedPlan) -> None:
        self.plan, self.root, self.meta = plan, plan.root, plan.meta
        self.waiting = set(plan.pending)
        self.done: set[int] = set()
        self.open: dict[int, _OpenPart] = {}
        self.skipped = 0
        self.formats: Counter[str] = Counter()  # files by image_kind()
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (seconds, rows) of the first batch

    @property
    def written(self) -> int:
        return len(self.done)

    def add(
        self,
        rows: np.ndarray,
        embedded: tuple[np.ndarray, np.ndarray | None],
        problems: list[str],
        kinds: list[str],
    ) -> None:
        """One batch: manifest rows, their (embeddings, thumbnails or None), a problem per
        row ('' when fine) and the kind of each row's file."""
        embeddings, thumbnails = embedded
        if (thumbnails is None) != (self.plan.thumbnails == 0):
            raise ReferenceSetError("an engine returned thumbnails other than the run asked for")
        if self.first is None:
            self.first = (time.perf_counter() - self.started, len(rows))
        self.formats.update(kinds)
        parts = np.asarray(rows, dtype=np.int64) // self.meta.part_rows
        for part in np.unique(parts).tolist():
            if part in self.done:
                continue  # delivered again (an engine's retry): the part is on disk already
            if part not in self.waiting:
                raise ReferenceSetError(f"embedded rows of part {part}, which is not pending")
            held = self.open.get(part)
            if held is None:
                start, stop = self.meta.part_range(part)
                held = self.open[part] = _OpenPart(start, stop, self.meta.dim, self.plan.thumbnails)
            chosen = np.flatnonzero(parts == part)
            self.skipped += held.fill(
                rows[chosen],
                embeddings[chosen],
                None if thumbnails is None else thumbnails[chosen],
                [problems[i] for i in chosen],
            )
            if held.complete:
                if held.thumbnails is not None:  # first: the part file marks the part done
                    write_thumbnail_part(self.root, part, held.thumbnails)
                write_part(self.root, part, held.embeddings, held.valid, held.problems)
                del self.open[part]
                self.waiting.discard(part)
                self.done.add(part)

    def finish(self) -> None:
        """Raise unless every pending part was written."""
        if self.waiting:
            first = min(self.waiting)
            raise ReferenceSetError(
                f"embedding stopped with {len(self.waiting)} parts unfinished (first: part "
                f"{first}); rerun the same command to finish them"
            )

    def summary(self) -> EmbedSummary:
        """What the run did; raises first unless every pending part was written."""
        self.finish()
        plan = self.plan
        first_seconds, first_images = self.first or (0.0, 0)
        return EmbedSummary(
            parts_total=plan.meta.num_parts,
            parts_in_slice=len(plan.mine),
            parts_resumed=len(plan.mine) - len(plan.pending),
            parts_written=self.written,
            images_embedded=sum(
                stop - start for start, stop in map(plan.meta.part_range, plan.pending)
            ),
            images_skipped=self.skipped,
            seconds=time.perf_counter() - self.started,
            formats=dict(sorted(self.formats.items())),
            first_batch_seconds=first_seconds,
            first_batch_images=first_images,
        )


class _OpenPart:
    def __init__(self, start: int, stop: int, dim: int, thumbnails: int) -> None:
        self.start = start
        self.embeddings = np.zeros((stop - start, dim), dtype=np.float16)
        self.thumbnails = None
        if thumbnails:
            shape = (stop - start, 3, thumbnails, thumbnails)
            self.thumbnails = np.zeros(shape, dtype=np.uint8)
        self.valid = np.ones(stop - start, dtype=bool)
        self.seen = np.zeros(stop - start, dtype=bool)
        self.problems: dict[int, str] = {}

    @property
    def complete(self) -> bool:
        return bool(self.seen.all())

    def fill(
        self,
        rows: np.ndarray,
        embeddings: np.ndarray,
        thumbnails: np.ndarray | None,
        problems: list[str],
    ) -> int:
        local = np.asarray(rows, dtype=np.int64) - self.start
        if self.seen[local].any() or np.unique(local).size != local.size:
            raise ReferenceSetError(f"row {int(rows[0])} was embedded twice")
        self.seen[local] = True
        self.embeddings[local] = embeddings
        if self.thumbnails is not None:
            self.thumbnails[local] = thumbnails
        skipped = 0
        for j, problem in enumerate(problems):
            if problem:
                self.valid[local[j]] = False
                self.embeddings[local[j]] = 0.0
                self.problems[int(rows[j])] = problem
                skipped += 1
        return skipped
