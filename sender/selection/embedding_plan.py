"""Planning from stored embeddings (the production path): the split teacher on CLIP
embeddings, the proxy student on the store's thumbnails.

The task's labeled images are embedded with the CLIP that embedded the store, and shrunk
to the store's thumbnail size the same way its rows were (:mod:`sender.embedding.thumbnails`).
They are split as on the image path (:func:`sender.selection.plan.split_rows`); a teacher
of the kind the work directory was scored with (probe, kNN, or zero-shot, which needs no
training but still the labeled validation images) is built from the teacher-train part
alone and streams over every stored embedding, with kNN relevance through the store's
FAISS index, exactly as ``score --embeddings`` did. Each candidate is applied to those
scores, and the proxy learns from the selected rows' thumbnails with the split teacher's
hard labels, scored on the validation images' thumbnails.

The proxy learns from pixels, never from the CLIP embeddings: a classifier on the same
features the probe teacher was fit on would predict about the teacher's own accuracy for
nearly any selection.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ConfigError, ReferenceMismatchError, TaskDataError
from protocol.manifest import reference_summary
from protocol.task_data import LabeledImages
from sender.embedding.embedders import ClipEmbedder
from sender.embedding.store import EmbeddingStore
from sender.embedding.tensor_decode import PreprocessSpec
from sender.embedding.thumbnails import Thumbnailer, ThumbnailStore
from sender.scoring.embeddings import (
    EmbeddedSplit,
    StreamScoring,
    embed_folder,
    embed_unlabeled,
    embedding_teacher,
    score_store,
    store_domain_gap,
    store_index,
    teacher_accuracy,
)
from sender.scoring.work_dir import ScoreReport
from sender.selection.deployment import Scenery
from sender.selection.fleet import FleetChoice
from sender.selection.plan import (
    PlanInputs,
    PlanSettings,
    Proxy,
    SplitScores,
    SplitTrial,
    finish_plan,
    measure_candidates,
    proxy_words,
    split_rows,
    weighted_validation,
)
from sender.selection.plan_file import Plan, PlanSplit
from sender.selection.scored_work import ScoredWork


@dataclass(frozen=True)
class PlannedStore:
    """A work directory scored from stored embeddings, opened for planning: the work,
    how it was scored, its store and the store's thumbnails."""

    work: ScoredWork
    report: ScoreReport
    store: EmbeddingStore
    thumbnails: ThumbnailStore

    @classmethod
    def open(
        cls,
        work_dir: str | os.PathLike[str],
        proxy_size: int | None = None,
        fleet: FleetChoice | None = None,
    ) -> PlannedStore:
        """Typed errors, before anything heavy loads, for a store without (fitting)
        thumbnails or a store that is not the one the work directory was scored on;
        ``fleet``: the releases the candidates must suit."""
        work = ScoredWork.open(work_dir, fleet=fleet)
        report = ScoreReport.read(work_dir)
        store = EmbeddingStore(work.store_dir())
        if bytes.fromhex(store.meta.reference_fingerprint) != work.scored.reference_fingerprint:
            raise ReferenceMismatchError(
                f"the embeddings store {store.root} holds another reference set than {work_dir} "
                "was scored on: score again"
            )
        thumbnails = store.thumbnails()
        if proxy_size is not None:
            thumbnails.require_size(proxy_size)
        thumbnails.check_sample()
        return cls(work, report, store, thumbnails)


def embed_plan_task(
    embedder: ClipEmbedder, train_dir: str | None, planned: PlannedStore
) -> EmbeddedSplit:
    """The task's labeled images, embedded and shrunk to the store's thumbnails; a typed
    error for a task without them (zero-shot from class names alone cannot be planned)."""
    if not train_dir:
        raise TaskDataError(
            f"{planned.work.path} has no labeled task images to plan with (a "
            f"{planned.report.teacher.kind} teacher from class names alone): give --task DIR "
            "or --train DIR with at least two labeled images per class, which the plan splits "
            "into teacher-train and validation"
        )
    if planned.store.meta.model != embedder.model_name:
        raise ConfigError(
            f"the reference was embedded with {planned.store.meta.model}, the task with "
            f"{embedder.model_name}: use the same model and weights"
        )
    spec = PreprocessSpec.from_transform(embedder.preprocess)
    thumbnailer = Thumbnailer(spec, planned.thumbnails.size)
    task = embed_folder(embedder, Path(train_dir), thumbnailer=thumbnailer)
    if tuple(task.class_names) != tuple(planned.work.scored.class_names):
        raise TaskDataError(
            f"the task's classes {list(task.class_names)[:5]} are not those "
            f"{list(planned.work.scored.class_names)[:5]} of {planned.work.path}: plan with "
            "the task that was scored"
        )
    return task


def deployment_scenery(embedder: ClipEmbedder | None, settings: PlanSettings) -> Scenery | None:
    """The deployment images (``settings.deployment``) embedded by the store's CLIP, as
    the task's were; None without them."""
    if not settings.deployment:
        return None
    if embedder is None:
        raise ConfigError("--deployment needs the CLIP that embedded the store: --clip-weights")
    embeddings = embed_unlabeled(embedder, Path(settings.deployment))
    return Scenery(str(settings.deployment), embeddings, "CLIP embeddings")


def plan_from_embeddings(
    planned: PlannedStore,
    task: EmbeddedSplit,
    out_dir: str | os.PathLike[str],
    settings: PlanSettings,
    embedder: ClipEmbedder | None = None,
    progress: bool = True,
) -> Plan:
    """Predict every candidate's accuracy and size (see the module docstring); write
    plan.json, plan.png and plan.txt. ``embedder``: only the zero-shot teacher needs it."""
    started = time.perf_counter()
    scenery = deployment_scenery(embedder, settings)
    names = tuple(task.class_names)
    details = planned.report.teacher.details
    scoring = StreamScoring(
        teacher=planned.report.teacher.kind,
        temperature=float(details.get("temperature", 1.0)),
        knn_k=int(details.get("knn_k", settings.teacher.knn_k)),
        progress=progress,
    )
    store, work = planned.store, planned.work
    index = store_index(store)

    def trial(fold: int) -> SplitTrial:
        """The split of ``fold``, its teacher fit on the embeddings and streamed over the store."""
        fraction, seed = settings.validation_fraction, settings.split_seed(fold)
        teacher_rows, held = split_rows(task.labels, names, fraction, settings.seed, fold)
        teacher_part, validation = task.subset(teacher_rows), task.subset(held)
        model = embedding_teacher(scoring.teacher, embedder, teacher_part, names, scoring.knn_k)
        scored = score_store(store, index, model, teacher_part, scoring)
        split = SplitScores(scored.scores, scored.predicted)
        shown = LabeledImages(validation.thumbnails, validation.labels, names, "validation")
        embedded = validation.embeddings  # the scenery's feature
        weighted, evidence = weighted_validation(shown, scenery, embedded, settings)
        proxy = Proxy(planned.thumbnails.read_rows, split, work.excluded, weighted, settings)
        accuracy = teacher_accuracy(model, validation)
        counts = PlanSplit(int(teacher_rows.size), int(held.size), seed, accuracy, fold)
        return SplitTrial(
            counts, proxy, lambda: store_domain_gap(store, validation.embeddings), evidence
        )

    measured = measure_candidates(work, trial, settings, progress)
    meta = store.meta
    size = planned.thumbnails.size
    inputs = PlanInputs(
        work=work,
        reference=reference_summary(meta.reference_name, store.n, meta.reference_fingerprint),
        proxy=proxy_words(settings, f"thumbnails ({size} px)", measured.splits[0].validation),
    )
    return finish_plan(inputs, measured, out_dir, settings, started)
