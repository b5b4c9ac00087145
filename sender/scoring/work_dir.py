"""The scoring work directory: written by ``plada-send score``, read by ``select`` and ``plan``.

Both scoring paths (images through a teacher, and stored CLIP embeddings) write the
same files: :class:`ScoresFile` (``scores.npz``: every score and the teacher's label of
each reference row, the reference set's identity, and each test image's nearest
reference rows for the leakage check) and :class:`ScoreReport` (``score_report.json``).
Its keys carry a schema version, so a work directory from another plada release is
refused with a clear message instead of being half read.

A work directory is self-contained for ``select``: the leakage check reads the
candidates found at scoring time, not the index, and the embeddings store (needed only
by the consensus filter) is recorded relative to the work directory, so the two can be
moved together, or the work directory alone when the filter is not used.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from protocol.atomic_files import write_atomic, write_json_atomic
from protocol.errors import ConfigError
from protocol.manifest import BlockLayout
from protocol.reference.factory import ReferenceLocation
from sender.scoring.domain_gap import DomainGap
from sender.scoring.scores import score_names

if TYPE_CHECKING:
    import faiss

SCORES_FILE = "scores.npz"
REFERENCE_EMBEDDINGS = "reference_embeddings.npy"
SCORE_REPORT = "score_report.json"
REFERENCE_SPEC = "reference.json"  # how score named the reference set: select draws from it
SCORES_SCHEMA = 3  # 2: embeddings store by absolute path, leakage through the index
_SCORE_KEY = "score_"  # prefix of each relevance score's key


def save_embeddings(path: str | os.PathLike[str], embeddings: np.ndarray) -> None:
    """Write embeddings (reference or test images) as fp16 ``.npy``, atomically."""
    half = np.asarray(embeddings).astype(np.float16)
    write_atomic(Path(path), lambda handle: np.save(handle, half))


def record_reference(work: str | os.PathLike[str], location: ReferenceLocation) -> None:
    """Note how ``score`` named the reference set (and where this station caches it), so
    that ``select`` can draw the contact sheet from the same set."""
    cache = None if location.cache_dir is None else str(Path(location.cache_dir).resolve())
    record = {"spec": location.spec, "image_size": location.image_size, "cache_dir": cache}
    write_json_atomic(Path(work) / REFERENCE_SPEC, record)


def recorded_reference(work: str | os.PathLike[str]) -> ReferenceLocation | None:
    """What :func:`record_reference` wrote, or None."""
    try:
        recorded = json.loads((Path(work) / REFERENCE_SPEC).read_text())
        spec, size, cache = recorded["spec"], recorded["image_size"], recorded["cache_dir"]
        return ReferenceLocation(str(spec), cache, int(size))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class LeakageCandidates:
    """Each task test image's nearest reference rows with their exact cosine similarity
    (in the duplicate-check embedding), found when scoring: ``select`` checks leakage at
    any threshold from them, without the index or the embeddings store."""

    ids: np.ndarray  # int64 [t, k]: reference rows, -1 where the index found fewer
    similarities: np.ndarray  # float32 [t, k]

    @classmethod
    def find(
        cls,
        index: faiss.Index,
        test_embeddings: np.ndarray,
        exact: Callable[[np.ndarray], np.ndarray] | None = None,
        k: int = 16,
    ) -> LeakageCandidates:
        """The ``k`` nearest rows of each test image in ``index`` (see
        :func:`~sender.embedding.index.nearest_rows`), the queries kept at fp16 as the
        stored embeddings are."""
        from sender.embedding.index import nearest_rows

        queries = np.asarray(test_embeddings).astype(np.float16).astype(np.float32)
        return cls(*nearest_rows(index, queries, k, exact))

    @property
    def queries(self) -> int:
        return int(self.ids.shape[0])

    def duplicates(self, threshold: float) -> tuple[np.ndarray, int]:
        """(sorted reference rows within ``threshold`` of a test image, test images with one)."""
        hits = (self.ids >= 0) & (self.similarities >= threshold)
        return np.unique(self.ids[hits]).astype(np.int64), int(hits.any(axis=1).sum())


def predicted_histogram(predicted: np.ndarray, classes: int) -> list[int]:
    """How many reference rows the teacher gave each class."""
    return np.bincount(predicted, minlength=classes).tolist()


def _empty_rows() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass
class ScoresFile:
    """Per-reference-image scores and teacher labels, with what ``select`` needs to
    write a payload (class names, the reference set's identity and folder layout)."""

    scores: dict[str, np.ndarray]  # name (one of SCORES) -> float32 [n], lower is more relevant
    predicted: np.ndarray  # int64 [n]: the teacher's label of each reference image
    class_names: tuple[str, ...]
    reference_name: str
    reference_fingerprint: bytes
    reference_size: int
    task: str
    recommended_strategy: str = "safety-net"
    reference_block_starts: np.ndarray = field(default_factory=_empty_rows)  # empty: no folders
    excluded: np.ndarray = field(default_factory=_empty_rows)  # unreadable reference rows
    # the embeddings store scored (production path), relative to the work directory
    embeddings_dir: str | None = None
    leakage: LeakageCandidates | None = None  # None: the task had no test images

    def __post_init__(self) -> None:
        known = score_names()
        unknown = set(self.scores) - set(known)
        if unknown:
            raise ConfigError(f"unknown scores {sorted(unknown)} (known: {', '.join(known)})")

    @property
    def available_scores(self) -> list[str]:
        """The scores present, in :func:`~sender.scoring.scores.score_names` order."""
        return [name for name in score_names() if name in self.scores]

    def block_layout(self) -> BlockLayout | None:
        """The reference folders' layout for block coding, or None without folders."""
        if not self.reference_block_starts.size:
            return None
        return BlockLayout(
            self.reference_name,
            self.reference_fingerprint,
            self.reference_size,
            self.reference_block_starts,
        )

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``scores.npz`` atomically."""
        arrays = {
            "schema": np.int64(SCORES_SCHEMA),
            "predicted": np.asarray(self.predicted, np.int64),
            "class_names": np.asarray(self.class_names),
            "reference_name": np.asarray(self.reference_name),
            "reference_fingerprint": np.frombuffer(self.reference_fingerprint, np.uint8),
            "reference_size": np.int64(self.reference_size),
            "reference_block_starts": np.asarray(self.reference_block_starts, np.int64),
            "task": np.asarray(self.task),
            "recommended_strategy": np.asarray(self.recommended_strategy),
            "excluded": np.asarray(self.excluded, np.int64),
            "embeddings_dir": np.asarray(self.embeddings_dir or ""),
        }
        if self.leakage is not None:
            arrays["leakage_ids"] = np.asarray(self.leakage.ids, np.int64)
            arrays["leakage_similarities"] = np.asarray(self.leakage.similarities, np.float32)
        arrays |= {_SCORE_KEY + name: values for name, values in self.scores.items()}
        write_atomic(Path(path), lambda handle: np.savez(handle, **arrays))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ScoresFile:
        """Read a ``scores.npz`` written by :meth:`write`; a missing file or another
        schema is a ``ConfigError`` naming the fix."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path} not found: run 'plada-send score' first")
        try:
            return cls._read(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ConfigError(
                f"{path} is damaged ({type(exc).__name__}): run 'plada-send score' again"
            ) from exc

    @classmethod
    def _read(cls, path: Path) -> ScoresFile:
        with np.load(path, allow_pickle=False) as data:
            schema = int(data["schema"]) if "schema" in data.files else 1
            if schema != SCORES_SCHEMA:
                raise ConfigError(
                    f"{path} has work-directory schema {schema}, this plada reads "
                    f"{SCORES_SCHEMA}: run 'plada-send score' again"
                )
            scores = {
                key.removeprefix(_SCORE_KEY): data[key]
                for key in data.files
                if key.startswith(_SCORE_KEY)
            }
            leakage = None
            if "leakage_ids" in data.files:
                leakage = LeakageCandidates(data["leakage_ids"], data["leakage_similarities"])
            return cls(
                scores=scores,
                predicted=data["predicted"],
                class_names=tuple(str(c) for c in data["class_names"]),
                reference_name=str(data["reference_name"]),
                reference_fingerprint=data["reference_fingerprint"].tobytes(),
                reference_size=int(data["reference_size"]),
                task=str(data["task"]),
                recommended_strategy=str(data["recommended_strategy"]),
                reference_block_starts=data["reference_block_starts"],
                excluded=data["excluded"],
                embeddings_dir=str(data["embeddings_dir"]) or None,
                leakage=leakage,
            )


@dataclass(frozen=True)
class TeacherSummary:
    """What the teacher is and how well it does on the task's own test split."""

    kind: str
    train_images: int
    test_accuracy: float | None = None
    details: dict[str, str | int | float] = field(default_factory=dict)  # e.g. the CNN's epochs


@dataclass(frozen=True)
class KnnSummary:
    """What the streamed kNN relevance took (:mod:`sender.scoring.stream_knn`), or why
    it was skipped."""

    skipped: str | None = None
    depth: int = 0
    nprobe: int = 0
    task_images: int = 0
    candidates: int = 0
    search_seconds: float = 0.0
    score_seconds: float = 0.0
    seconds: float = 0.0


@dataclass(frozen=True)
class ScoreReport:
    """What ``plada-send score`` did, on either path (``score_report.json``)."""

    path: str  # the scoring path: "images" or "embeddings" (sender.scoring.teacher_kinds)
    task: str | None
    classes: list[str]
    reference: dict[str, str | int]  # name, size, fingerprint (and unreadable images)
    embedder: str
    duplicate_check_embedder: str
    teacher: TeacherSummary
    domain_gap: DomainGap | None
    recommended_strategy: str
    predicted_histogram: list[int]
    scoring_seconds: float
    scoring_images_per_second: float
    knn_relevance: KnnSummary | None
    total_seconds: float

    def write(self, work: str | os.PathLike[str]) -> None:
        write_json_atomic(Path(work) / SCORE_REPORT, asdict(self))

    @classmethod
    def read(cls, work: str | os.PathLike[str]) -> ScoreReport:
        """The report of a scored work directory; a typed error naming the fix otherwise."""
        path = Path(work) / SCORE_REPORT
        if not path.is_file():
            raise ConfigError(f"{path} not found: run 'plada-send score' first")
        try:
            data = json.loads(path.read_text())
            gap, knn = data.pop("domain_gap"), data.pop("knn_relevance")
            return cls(
                **data
                | {
                    "teacher": TeacherSummary(**data["teacher"]),
                    "domain_gap": None if gap is None else DomainGap(**gap),
                    "knn_relevance": None if knn is None else KnnSummary(**knn),
                }
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path} is damaged: run 'plada-send score' again") from exc
