"""Selecting from a scored work directory and writing the payload.

``make_payload`` reads a work directory (``plada-send score``) as often as needed,
e.g. to try keep fractions against a byte budget.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from protocol.errors import BudgetError, ConfigError
from protocol.payload import (
    EncodedPayload,
    Payload,
    SenderStamp,
    encode_payload_detailed,
    information_bound_bytes,
    selection_text,
    write_payload,
)
from protocol.reference.base import ReferenceSource
from protocol.signing import SigningKey
from sender.embedding import index as faiss_index
from sender.embedding.store import EmbeddingStore
from sender.scoring.work_dir import REFERENCE_EMBEDDINGS, SCORES_FILE, TEST_EMBEDDINGS, ScoresFile
from sender.selection.consensus import consensus_outliers
from sender.selection.strategies import SelectionConfig, select
from sender.signer import PayloadSigner

INDEX_FILE = faiss_index.INDEX_FILE


@dataclass
class ScoredWork:
    """A scored work directory opened for selecting: its scores, and the rows no
    payload may keep (unreadable images, and near-duplicates of the task's test images
    unless the leakage check only reports them)."""

    path: Path
    scored: ScoresFile
    duplicates: np.ndarray
    leakage: dict[str, Any] | None
    excluded: np.ndarray

    @classmethod
    def open(
        cls,
        work_dir: str | os.PathLike[str],
        leak_threshold: float = 0.97,
        exclude_leaks: bool = True,
    ) -> ScoredWork:
        """Read ``scores.npz`` and run the leakage check once, for any number of selections."""
        work = Path(work_dir)
        scored = ScoresFile.read(work / SCORES_FILE)
        duplicates, leakage = _leakage_check(work, scored, leak_threshold, exclude_leaks)
        excluded = np.union1d(scored.excluded, duplicates) if exclude_leaks else scored.excluded
        return cls(work, scored, duplicates, leakage, excluded)

    def resolve(self, config: SelectionConfig, score: str | None) -> tuple[SelectionConfig, str]:
        """The concrete configuration and score: ``auto`` becomes the recommended
        strategy, no score the best one present (knn, else energy; energy for inverse)."""
        available = self.scored.available_scores
        if config.strategy == "auto":
            config = replace(config, strategy=self.scored.recommended_strategy)
        if score is None:  # high energy is the inverse rule; "least relevant" means nothing
            relevance = config.strategy != "inverse" and "knn" in available
            score = "knn" if relevance else "energy"
        if score not in available:
            raise ConfigError(
                f"score {score!r} is not in {self.path / SCORES_FILE} "
                f"(available: {', '.join(available)})"
            )
        return config, score

    def select(
        self, config: SelectionConfig, score: str, excluded: np.ndarray | None = None
    ) -> np.ndarray:
        """The kept rows of a resolved configuration (``excluded``: further rows to skip)."""
        scored = self.scored
        skip = self.excluded if excluded is None else np.union1d(self.excluded, excluded)
        return select(
            scored.scores[score], scored.predicted, len(scored.class_names), config, excluded=skip
        )

    def payload(
        self,
        kept: np.ndarray,
        config: SelectionConfig,
        score: str,
        task_id: str | None = None,
        sender: SenderStamp | None = None,
        created: int | None = None,
    ) -> Payload:
        """The payload of ``kept`` rows with the teacher's labels."""
        scored = self.scored
        return Payload(
            task=task_id or scored.task,
            reference_name=scored.reference_name,
            reference_fingerprint=scored.reference_fingerprint,
            reference_size=scored.reference_size,
            class_names=scored.class_names,
            indices=kept,
            labels=scored.predicted[kept].astype(np.int64),
            selection=config.as_header() | {"score": score},
            created=int(time.time()) if created is None else created,
            sender=sender,
        )

    def encode(self, payload: Payload, key: SigningKey | None = None) -> EncodedPayload:
        """The payload's bytes, in the smallest coding this reference's layout allows."""
        return encode_payload_detailed(payload, reference=self.scored.block_layout(), signer=key)


def make_payload(
    work_dir: str | os.PathLike[str],
    config: SelectionConfig,
    out_path: str | os.PathLike[str],
    score: str | None = None,
    task_id: str | None = None,
    leak_threshold: float = 0.97,
    exclude_leaks: bool = True,
    consensus_k: int = 0,
    consensus_agreement: float = 0.5,
    signer: PayloadSigner | None = None,
    max_bytes: int | None = None,
    sheet: tuple[ReferenceSource, Path] | None = None,
) -> dict[str, Any]:
    """Select from a scored work directory, write the payload, and return a summary.

    With ``signer`` the payload is signed (format v3) with the next sequence number
    of its sender; without it it is unsigned (development only).

    ``config.strategy == "auto"`` takes the strategy the domain-gap measurement
    recommended at scoring time. Reference images that are near-duplicates of the
    task's test images (cosine >= ``leak_threshold`` in the duplicate-check
    embedding) are excluded before selecting, unless ``exclude_leaks`` is False;
    unreadable reference images are always excluded. ``consensus_k > 0`` drops kept
    images whose nearest kept neighbours disagree with their label and refills them
    (see :mod:`sender.selection.consensus`). A payload larger than ``max_bytes`` is not written
    (``BudgetError``). ``sheet``: (the local reference set, a PNG path) for a contact
    sheet of the kept images per class (:mod:`sender.selection.contact_sheet`).
    """
    work = ScoredWork.open(work_dir, leak_threshold, exclude_leaks)
    config, score = work.resolve(config, score)
    scored = work.scored
    kept = work.select(config, score)
    consensus = None
    if consensus_k > 0:
        dropped = _consensus_outliers(work.path, scored, kept, consensus_k, consensus_agreement)
        kept = work.select(config, score, excluded=dropped)
        consensus = {
            "k": consensus_k,
            "min_agreement": consensus_agreement,
            "dropped": int(dropped.size),
        }
    warnings = selection_warnings(int(kept.size), len(scored.class_names), scored.reference_size)
    leakage = None if work.leakage is None else dict(work.leakage)
    if leakage is not None:
        leakage["kept_near_duplicates"] = int(np.intersect1d(kept, work.duplicates).size)
    created = int(time.time())
    stamp = signer.stamp(created) if signer else None
    payload = work.payload(kept, config, score, task_id, stamp, created)
    encoded = work.encode(payload, signer.key if signer else None)
    if max_bytes is not None and len(encoded.data) > max_bytes:
        raise BudgetError(
            f"the payload is {len(encoded.data)} bytes, over the budget of {max_bytes}: "
            "keep fewer images or raise the budget (nothing written)"
        )
    write_payload(out_path, encoded.data)
    drawn = None if sheet is None else _contact_sheet(payload, scored, *sheet)
    k = len(scored.class_names)
    return {
        "payload": str(out_path),
        "payload_bytes": len(encoded.data),
        "kept": int(kept.size),
        "keep_fraction": kept.size / scored.reference_size,
        "body_coding": encoded.body,
        "signed": _signature_summary(payload, signer),
        "selection": payload.selection,
        "unreadable_excluded": int(scored.excluded.size),
        "class_histogram": payload.class_histogram(),
        "information_bound_bytes": round(
            information_bound_bytes(scored.reference_size, payload.labels, k), 1
        ),
        "leakage": leakage,
        "consensus": consensus,
        "warnings": warnings,
        "contact_sheet": drawn,
    }


def _contact_sheet(
    payload: Payload, scored: ScoresFile, reference: ReferenceSource, path: Path
) -> dict[str, Any]:
    """Draw the selection's contact sheet, or say why not (another reference set)."""
    from sender.selection.contact_sheet import write_contact_sheet

    if reference.manifest.fingerprint != scored.reference_fingerprint:
        return {
            "skipped": f"the reference set {reference.manifest.name} is not the one this work "
            f"directory scored ({scored.reference_name}): name it with --reference"
        }
    title = f"{payload.task}: {selection_text(payload.selection)}"
    write_contact_sheet(
        path, reference, payload.indices, payload.labels, payload.class_names, title
    )
    return {"file": str(path)}


MIN_IMAGES_PER_CLASS = 10  # fewer, on average, is worth a warning


def selection_warnings(kept: int, classes: int, reference_size: int) -> list[str]:
    """Refuse a selection too small to teach every class; warn about a thin one."""
    if kept < classes:
        need = classes / reference_size
        raise ConfigError(
            f"the selection keeps {kept} of {reference_size} reference images, fewer than the "
            f"task's {classes} classes: raise --keep to at least {need:.2g} (nothing written)"
        )
    if kept < MIN_IMAGES_PER_CLASS * classes:
        return [
            f"only {kept / classes:.1f} kept images per class on average (fewer than "
            f"{MIN_IMAGES_PER_CLASS}): the student will learn little; raise --keep"
        ]
    return []


def _leakage_index(work: Path, embeddings_dir: str | None) -> Path | None:
    """The index to search for near-duplicates: the work directory's, else the store's."""
    candidates = [work / INDEX_FILE]
    if embeddings_dir:
        candidates.append(Path(embeddings_dir) / INDEX_FILE)
    return next((path for path in candidates if path.is_file()), None)


def _leakage_check(
    work: Path, scored: ScoresFile, threshold: float, exclude: bool
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Reference rows that are near-duplicates of the task's test images, and the
    report of the check (None when the work directory has no test images or index)."""
    index_path = _leakage_index(work, scored.embeddings_dir)
    if not (work / TEST_EMBEDDINGS).is_file() or index_path is None:
        return np.zeros(0, np.int64), None
    queries = np.load(work / TEST_EMBEDDINGS).astype(np.float32)
    exact = None
    if scored.embeddings_dir and index_path.parent == Path(scored.embeddings_dir):
        exact = EmbeddingStore(scored.embeddings_dir).read_rows
    duplicates, hit_queries = faiss_index.near_duplicate_ids(
        faiss_index.load_index(index_path), queries, threshold, exact=exact
    )
    return duplicates, {
        "threshold": threshold,
        "test_images_checked": int(queries.shape[0]),
        "test_images_with_near_duplicates": hit_queries,
        "near_duplicate_reference_images": int(duplicates.size),
        "excluded": exclude,
    }


def _consensus_outliers(
    work: Path, scored: ScoresFile, kept: np.ndarray, k: int, agreement: float
) -> np.ndarray:
    """Kept rows whose ``k`` nearest kept neighbours mostly carry another label."""
    if scored.embeddings_dir:
        embeddings = EmbeddingStore(scored.embeddings_dir).read_rows(kept)
    elif (work / REFERENCE_EMBEDDINGS).is_file():
        embeddings = np.load(work / REFERENCE_EMBEDDINGS, mmap_mode="r")[kept]
    else:
        raise ConfigError(f"{work} has no reference embeddings for the consensus filter")
    return kept[consensus_outliers(embeddings, scored.predicted[kept], k, agreement)]


def _signature_summary(payload: Payload, signer: PayloadSigner | None) -> dict[str, Any] | None:
    if signer is None or payload.sender is None:
        return None
    return {
        "sender": signer.key.sender,
        "key_id": signer.key.key_id.hex(),
        "sequence": payload.sender.sequence,
        "expires": payload.sender.expires,
    }
