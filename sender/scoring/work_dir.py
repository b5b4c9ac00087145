"""The scoring work directory: written by ``plada-send score``, read by ``select``.

Both scoring paths (images through a teacher, and stored CLIP embeddings) write
the same :class:`ScoresFile`; its keys carry a schema version, so a work
directory from another plada release is refused with a clear message instead of
being half read.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.atomic_files import write_atomic, write_json_atomic
from protocol.errors import ConfigError
from protocol.manifest import BlockLayout
from sender.scoring.scores import SCORES

SCORES_FILE = "scores.npz"
REFERENCE_EMBEDDINGS = "reference_embeddings.npy"
TEST_EMBEDDINGS = "test_embeddings.npy"
SCORE_REPORT = "score_report.json"
REFERENCE_SPEC = "reference.json"  # how score named the reference set: select draws from it
SCORES_SCHEMA = 2  # 1: the unversioned files of earlier releases
_SCORE_KEY = "score_"  # prefix of each relevance score's key


def save_embeddings(path: str | os.PathLike[str], embeddings: np.ndarray) -> None:
    """Write embeddings (reference or test images) as fp16 ``.npy``, atomically."""
    half = np.asarray(embeddings).astype(np.float16)
    write_atomic(Path(path), lambda handle: np.save(handle, half))


def record_reference_spec(
    work: str | os.PathLike[str], spec: str, image_size: int, cache_dir: str | None
) -> None:
    """Note how the reference set was named (and cached, on this station) when the work
    directory was scored."""
    cache = None if cache_dir is None else str(Path(cache_dir).resolve())
    record = {"spec": spec, "image_size": image_size, "cache_dir": cache}
    write_json_atomic(Path(work) / REFERENCE_SPEC, record)


def recorded_reference_spec(work: str | os.PathLike[str]) -> dict | None:
    """What :func:`record_reference_spec` wrote, or None."""
    try:
        recorded = json.loads((Path(work) / REFERENCE_SPEC).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) and "spec" in recorded else None


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
    embeddings_dir: str | None = None  # the embeddings store scored (production path)

    def __post_init__(self) -> None:
        unknown = set(self.scores) - set(SCORES)
        if unknown:
            raise ConfigError(f"unknown scores {sorted(unknown)} (known: {', '.join(SCORES)})")

    @property
    def available_scores(self) -> list[str]:
        """The scores present, in :data:`~sender.scoring.scores.SCORES` order."""
        return [name for name in SCORES if name in self.scores]

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
            )
