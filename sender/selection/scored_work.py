"""A scored work directory opened for selecting: its scores, the rows no payload may keep,
and the payload of any selection from it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from protocol.errors import ConfigError
from protocol.payload import EncodedPayload, Payload, SenderStamp, encode_payload_detailed
from protocol.signing import SigningKey
from sender.scoring.scores import KNN
from sender.scoring.work_dir import REFERENCE_EMBEDDINGS, SCORES_FILE, ScoresFile
from sender.selection.fleet import FleetChoice, FleetRestriction, restriction_of
from sender.selection.strategies import RankedSelection, SelectionConfig, select


@dataclass(frozen=True)
class LeakageRule:
    """Near-duplicates of the task's test images: cosine at or above ``threshold`` in the
    duplicate-check embedding; excluded before selecting, or only reported."""

    threshold: float = 0.97
    exclude: bool = True


@dataclass(frozen=True)
class LeakageReport:
    """What the leakage check found (and, once selected, how many the payload kept)."""

    threshold: float
    test_images_checked: int
    test_images_with_near_duplicates: int
    near_duplicate_reference_images: int
    excluded: bool
    kept_near_duplicates: int | None = None


@dataclass
class ScoredWork:
    """A scored work directory opened for selecting: its scores, and the rows no
    payload may keep (unreadable images, near-duplicates of the task's test images
    unless the leakage check only reports them, and rows a fleet's release lacks)."""

    path: Path
    scored: ScoresFile
    duplicates: np.ndarray
    leakage: LeakageReport | None
    excluded: np.ndarray
    fleet: FleetRestriction | None = None
    _ranked: RankedSelection | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        work_dir: str | os.PathLike[str],
        rule: LeakageRule | None = None,
        fleet: FleetChoice | None = None,
    ) -> ScoredWork:
        """Read ``scores.npz`` and apply the leakage check and the fleet's releases once,
        for any number of selections (from the candidates found when scoring: no index
        is opened)."""
        rule = rule or LeakageRule()
        work = Path(work_dir)
        scored = ScoresFile.read(work / SCORES_FILE)
        duplicates, leakage = np.zeros(0, np.int64), None
        if scored.leakage is not None:
            duplicates, hit_queries = scored.leakage.duplicates(rule.threshold)
            leakage = LeakageReport(
                rule.threshold,
                scored.leakage.queries,
                hit_queries,
                int(duplicates.size),
                rule.exclude,
            )
        excluded = np.union1d(scored.excluded, duplicates) if rule.exclude else scored.excluded
        restriction = restriction_of(fleet, scored.reference_fingerprint, scored.reference_size)
        if restriction is not None:
            excluded = np.union1d(excluded, restriction.absent)
        return cls(work, scored, duplicates, leakage, excluded, restriction)

    def resolve(self, config: SelectionConfig, score: str | None) -> tuple[SelectionConfig, str]:
        """The concrete configuration and score: ``auto`` becomes the recommended
        strategy, no score the best one present (knn, else energy; energy for inverse)."""
        available = self.scored.available_scores
        if config.strategy == "auto":
            config = replace(config, strategy=self.scored.recommended_strategy)
        if score is None:  # high energy is the inverse rule; "least relevant" means nothing
            relevance = config.strategy != "inverse" and KNN in available
            score = KNN if relevance else "energy"
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

    def ranked(self) -> RankedSelection:
        """The work directory's selections sorted once per ordering, for selecting many
        resolved configurations (the plan's candidates); each keeps what :meth:`select`
        keeps."""
        if self._ranked is None:
            scored = self.scored
            classes = len(scored.class_names)
            self._ranked = RankedSelection(scored.scores, scored.predicted, classes, self.excluded)
        return self._ranked

    def release_ranking(self) -> None:
        """Let go of :meth:`ranked`'s sorted rows (two int32 arrays of the reference set)
        once every selection that needs them is made."""
        self._ranked = None

    def leakage_of(self, kept: np.ndarray) -> LeakageReport | None:
        """The leakage report with how many near-duplicates ``kept`` holds."""
        if self.leakage is None:
            return None
        held = int(np.intersect1d(kept, self.duplicates).size)
        return replace(self.leakage, kept_near_duplicates=held)

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

    def store_dir(self, otherwise: str = "") -> Path:
        """The embeddings store the work directory was scored from (recorded relative to
        it); a typed error when it was scored from images or the store is not there
        (``otherwise``: the other way out, added to its fix)."""
        recorded = self.scored.embeddings_dir
        if not recorded:
            raise ConfigError(f"{self.path} was scored from reference images, not a store")
        store = self.path / recorded
        if not store.is_dir():
            raise ConfigError(
                f"the embeddings store {recorded} that {self.path} was scored from is not "
                f"at {store.resolve()}: keep the work directory beside it (as when it was "
                f"scored){otherwise}"
            )
        return store

    def embeddings_of(self, rows: np.ndarray) -> np.ndarray:
        """The stored embeddings of ``rows`` (for the consensus filter): from the
        embeddings store the work directory records, relative to itself, or from the
        in-memory path's reference embeddings."""
        if self.scored.embeddings_dir:
            from sender.embedding.store import EmbeddingStore

            store = self.store_dir(", or select without --consensus")
            return EmbeddingStore(store).read_rows(rows)
        if (self.path / REFERENCE_EMBEDDINGS).is_file():
            return np.load(self.path / REFERENCE_EMBEDDINGS, mmap_mode="r")[rows]
        raise ConfigError(f"{self.path} has no reference embeddings for the consensus filter")
