"""``plada-send score``: a teacher trained on the task scores every reference image, in
memory from the reference images (``--reference --train``) or streamed from stored CLIP
embeddings (``--embeddings``)."""

from __future__ import annotations

import argparse

from plada_cli import (
    add_reference_options,
    reference_from_args,
    reference_location,
    task_images_for,
)
from protocol.atomic_files import writable_directory
from protocol.errors import ConfigError
from sender.commands.options import Subparsers, add_clip_options, add_quiet, clip_embedder
from sender.scoring.teacher_kinds import EMBEDDINGS, IMAGES, TEACHERS, teacher_for
from sender.scoring.work_dir import ScoreReport


def add_score(sub: Subparsers) -> None:
    score = sub.add_parser(
        "score",
        help="train the teacher and score every reference image",
        description="Two paths. The image path (--reference, --train): a CNN teacher on the\n"
        "task's pixels scores the reference images. The production path (--embeddings): a\n"
        "probe, kNN or zero-shot teacher on CLIP embeddings scores the stored rows. Each\n"
        "group of options below says which path reads it.",
    )
    both = score.add_argument_group("both paths")
    both.add_argument("--train", help="labeled task images (.npz or ImageFolder)")
    both.add_argument("--test", help="labeled test images, for teacher accuracy and leakage")
    both.add_argument("--task-id", help="task name recorded in the work directory")
    both.add_argument(
        "--teacher",
        choices=tuple(TEACHERS),
        default=None,
        help="; ".join(f"{kind.name}: {kind.summary}" for kind in TEACHERS.values())
        + " (default: cnn, or probe with --embeddings)",
    )
    both.add_argument("--temperature", type=float, default=1.0, help="energy temperature")
    both.add_argument(
        "--knn-k", type=int, default=5, help="labeled images per class for kNN relevance"
    )
    both.add_argument("--seed", type=int, default=0, help="the teacher's seed")
    both.add_argument("--out", required=True, help="work directory")
    add_quiet(both)
    images = score.add_argument_group("image path (without --embeddings)")
    add_reference_options(images)
    images.add_argument("--teacher-epochs", type=int, default=40, help="cnn teacher's epochs")
    stored = score.add_argument_group("production path: stored CLIP embeddings")
    stored.add_argument("--embeddings", help="merged reference embeddings (plada-send merge)")
    stored.add_argument("--task", help="task directory with train/ and optional test/ ImageFolders")
    stored.add_argument("--classes", help="class names (zero-shot): a file, one per line, or a,b,c")
    stored.add_argument("--chunk-rows", type=int, default=8192, help="rows per streamed chunk")
    add_clip_options(stored)
    score.set_defaults(func=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    writable_directory(args.out, "--out")  # before any work
    if args.embeddings:
        report = _score_embeddings(args)
        what = "reference embeddings"
    else:
        report = _score_images(args)
        what = "reference images"
    _print_report(report, what, args.out)
    return 0


def _score_images(args: argparse.Namespace) -> ScoreReport:
    teacher = teacher_for(args.teacher, IMAGES)
    if not args.train:
        raise ConfigError("give --train (labeled task images)")
    reference = reference_from_args(args)
    train = task_images_for(args.train, reference, "task", args.task_id)  # before torch loads
    test = task_images_for(args.test, reference, "test", args.task_id) if args.test else None
    embedder = clip_embedder(args)
    from sender.scoring.images import TeacherSettings, score_reference
    from sender.scoring.work_dir import record_reference

    settings = TeacherSettings(
        kind=teacher,
        embedder=embedder,
        epochs=args.teacher_epochs,
        knn_k=args.knn_k,
        temperature=args.temperature,
        seed=args.seed,
    )
    report = score_reference(reference, train, test, args.out, settings, not args.quiet)
    record_reference(args.out, reference_location(args))
    return report


def _score_embeddings(args: argparse.Namespace) -> ScoreReport:
    teacher = teacher_for(args.teacher, EMBEDDINGS)
    if not args.clip_weights:
        raise ConfigError("--embeddings needs --clip-weights (the weights that embedded them)")
    from sender.embedding.embedders import OpenClipEmbedder
    from sender.embedding.store import EmbeddingStore
    from sender.scoring.embeddings import EmbeddingTask, StreamScoring, score_embeddings

    store = EmbeddingStore(args.embeddings)  # merged and whole, before the weights load
    model = args.clip_model or store.meta.model
    task = EmbeddingTask.from_folders(args.task, args.train, args.test, args.classes, args.task_id)
    settings = StreamScoring(
        teacher=teacher,
        temperature=args.temperature,
        knn_k=args.knn_k,
        chunk_rows=args.chunk_rows,
        progress=not args.quiet,
    )
    embedder = OpenClipEmbedder(model, args.clip_weights, args.device)
    return score_embeddings(args.embeddings, args.out, embedder, task, settings)


def _print_report(report: ScoreReport, what: str, out: str) -> None:
    accuracy = report.teacher.test_accuracy
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    print(
        f"scored {report.reference['size']} {what} in {report.scoring_seconds:.1f}s "
        f"({report.scoring_images_per_second:.0f}/s); "
        f"teacher {report.teacher.kind} test accuracy {shown}"
    )
    if report.domain_gap is not None:
        print(f"domain gap: {report.domain_gap.reason}")
    knn = report.knn_relevance
    if knn is not None:
        if knn.skipped is not None:
            print(f"kNN relevance: skipped ({knn.skipped})")
        else:
            print(
                f"kNN relevance: {knn.task_images} task images x {knn.depth} nearest "
                f"reference rows -> {knn.candidates} candidates in {knn.seconds:.1f}s"
            )
    print(f"recommended strategy: {report.recommended_strategy}")
    print(f"work directory: {out}")
