"""``plada-send select`` and ``plan``: a payload from a scored work directory, and the
prediction of what each candidate payload teaches."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from plada_cli import add_reference_options, reference_from_args, task_images_for
from protocol.atomic_files import writable_file_path
from protocol.errors import ConfigError, PladaError
from protocol.timestamps import utc_text
from sender.commands.options import (
    Subparsers,
    add_clip_options,
    add_fleet_options,
    add_quiet,
    clip_embedder,
    fleet_choice,
    keep_fraction,
    parse_keeps,
)
from sender.scoring.scores import score_names
from sender.selection.plan_file import CHOICE_RULES, WITHIN_NOISE
from sender.selection.strategies import STRATEGIES
from trainer.choices import STUDENT_BATCH, STUDENT_STEPS

if TYPE_CHECKING:
    from sender.scoring.images import TeacherSettings
    from sender.selection.payloads import ContactSheet, PayloadSummary, Selection
    from sender.selection.plan import PlanSettings
    from sender.selection.plan_file import Plan
    from sender.signer import PayloadSigner

SELECTION_FLAGS = ("strategy", "score", "keep", "alpha", "reserve", "seed")


def add_select(sub: Subparsers) -> None:
    sel = sub.add_parser("select", help="select from a scored work directory and write a payload")
    sel.add_argument("work", help="the scored work directory (plada-send score --out)")
    sel.add_argument(
        "--plan", help="a plan (plada-send plan): send its best candidate within the byte budget"
    )
    add_budget_options(sel, "byte budget: refuse larger payloads")
    _add_selection_options(sel)
    add_fleet_options(sel)
    sel.add_argument("--task-id", help="task id written into the payload")
    sel.add_argument("--json", help="also write the summary as JSON here")
    sel.add_argument("--out", required=True, help="the payload file to write")
    sheet = sel.add_argument_group("contact sheet (OUT.selection.png: kept images per class)")
    sheet.add_argument(
        "--reference", help="the reference set to draw from (default: the one score used)"
    )
    sheet.add_argument("--cache-dir", help="reference cache (default $PLADA_CACHE)")
    sheet.add_argument("--image-size", type=int, help="image side for ImageFolders")
    sheet.add_argument("--no-sheet", action="store_true", help="do not draw the contact sheet")
    _add_signing_options(sel)
    sel.set_defaults(func=_run_select)


def _add_selection_options(sel: argparse.ArgumentParser) -> None:
    sel.add_argument(
        "--strategy",
        choices=["auto", *STRATEGIES],
        default=None,
        help="default safety-net; auto: the one the domain-gap measurement recommended; "
        "random, random-balanced: the controls",
    )
    sel.add_argument(
        "--score",
        choices=score_names(),
        default=None,
        help="default: knn when the work directory has it, else energy",
    )
    sel.add_argument("--leak-threshold", type=float, default=0.97, help="near-duplicate cosine")
    sel.add_argument(
        "--keep-leaks", action="store_true", help="report test near-duplicates but keep them"
    )
    sel.add_argument(
        "--consensus",
        type=int,
        default=0,
        metavar="K",
        help="drop kept images whose K nearest kept neighbours mostly disagree (0: off)",
    )
    sel.add_argument(
        "--consensus-agreement",
        type=float,
        default=0.5,
        help="with --consensus: the share of neighbours that must agree",
    )
    sel.add_argument(
        "--keep", type=keep_fraction, help="share of the reference set: 1%% or 0.01 (default 1%%)"
    )
    sel.add_argument("--alpha", type=float, help="safety-net quota exponent (default -0.2)")
    sel.add_argument(
        "--reserve", type=float, help="safety-net share of the budget (default 1.0: all)"
    )
    sel.add_argument("--seed", type=int, help="the random controls' draw (default 0)")


def _add_signing_options(sel: argparse.ArgumentParser) -> None:
    signing = sel.add_argument_group("signing")
    signing.add_argument("--signing-key", help="the sender's private key (plada-send keygen)")
    signing.add_argument(
        "--expires-in", default="7d", help="payload lifetime: seconds or 30m / 12h / 7d"
    )
    signing.add_argument(
        "--sequence-file", help="sequence counter (default: SENDER.sequence beside the key)"
    )
    signing.add_argument(
        "--audience",
        help="address the payload to one device id or device group (receivers with another "
        "--device-id / --group refuse it); default: any receiver that trusts this sender",
    )
    signing.add_argument(
        "--unsigned", action="store_true", help="write an unsigned payload (development only)"
    )


def add_budget_options(parser: argparse.ArgumentParser, what: str) -> None:
    """The byte budget: --max-bytes, or a link's rate and how long it is up."""
    parser.add_argument("--max-bytes", type=int, help=what)
    parser.add_argument("--link-bps", type=float, help="byte budget from a link rate (bits/s) ...")
    parser.add_argument("--window", help="... and how long it is up: seconds or 30m / 2h")


def _signer(args: argparse.Namespace) -> PayloadSigner | None:
    from sender.signer import PayloadSigner

    if args.unsigned:
        if args.signing_key:
            raise ConfigError("--unsigned and --signing-key exclude each other")
        return None
    if not args.signing_key:
        raise ConfigError(
            "payloads are signed: pass --signing-key KEY (create one with `plada-send keygen`), "
            "or --unsigned for development (receivers refuse unsigned payloads by default)"
        )
    return PayloadSigner.from_files(
        args.signing_key, args.expires_in, args.sequence_file, args.audience
    )


def _selection(args: argparse.Namespace, budget: int | None) -> Selection:
    """The selection the flags give, or with --plan the plan's best within the budget."""
    from sender.selection.payloads import ConsensusRule, Selection, planned
    from sender.selection.scored_work import LeakageRule
    from sender.selection.strategies import SelectionConfig

    given = [name for name in SELECTION_FLAGS if getattr(args, name) is not None]
    choice = None
    fleet = fleet_choice(args)
    if args.plan:
        given += ["fleet"] if fleet is not None else []
        if given:
            drop = " ".join(f"--{name}" for name in given)
            raise ConfigError(f"--plan chooses the selection and its fleet: drop {drop}")
        config, score, choice = planned(args.plan, args.work, budget)
        fleet = choice.fleet
    else:  # the flags given, SelectionConfig's defaults for the rest
        config = SelectionConfig(**{k: getattr(args, k) for k in given if k != "score"})
        score = args.score
    leakage = LeakageRule(args.leak_threshold, exclude=not args.keep_leaks)
    consensus = ConsensusRule(args.consensus, args.consensus_agreement)
    return Selection(config, score, leakage, consensus, choice, fleet)


def _sheet(args: argparse.Namespace) -> ContactSheet | None:
    """The contact sheet's reference set and file, or None (none named, or unreadable:
    the picture is an extra, the payload does not wait for it)."""
    from sender.selection.payloads import contact_sheet_target

    if args.no_sheet:
        return None
    try:
        return contact_sheet_target(
            args.work, args.out, args.reference, args.cache_dir, args.image_size
        )
    except PladaError as exc:
        print(f"warning: no contact sheet, the reference set cannot be read: {exc}")
        return None


def _run_select(args: argparse.Namespace) -> int:
    from sender.selection.payloads import PayloadOptions, byte_budget, make_payload

    writable_file_path(args.out, "--out")  # every output, before selecting and signing
    if args.json:
        writable_file_path(args.json, "--json")
    budget = byte_budget(args.max_bytes, args.link_bps, args.window)
    selection = _selection(args, budget)
    options = PayloadOptions(args.task_id, _signer(args), budget, _sheet(args))
    summary = make_payload(args.work, selection, args.out, options)
    if args.json:
        summary.write_json(args.json)
    _print_payload(summary, args)
    return 0


def _print_payload(summary: PayloadSummary, args: argparse.Namespace) -> None:
    """What select wrote, in a few lines."""
    chosen = summary.selection
    print(
        f"kept {summary.kept} images ({100 * summary.keep_fraction:.2f}%), "
        f"strategy {chosen['strategy']}, score {chosen['score']}"
    )
    print("class histogram: " + " ".join(f"{k}:{v}" for k, v in summary.class_histogram.items()))
    for warning in summary.warnings:
        print(f"warning: {warning}")
    leak = summary.leakage
    if leak is not None:
        action = "excluded" if leak.excluded else "NOT excluded (--keep-leaks)"
        print(
            f"leakage check: {leak.test_images_with_near_duplicates} of "
            f"{leak.test_images_checked} test images have reference near-duplicates "
            f"(cosine >= {leak.threshold}): {leak.near_duplicate_reference_images} "
            f"reference images {action}; {leak.kept_near_duplicates} kept"
        )
    if summary.fleet is not None:
        fleet = summary.fleet
        print(
            f"fleet: kept only images every release holds ({', '.join(fleet['releases'])}); "
            f"{fleet['rows_excluded']} reference rows some release lacks were left out"
        )
    if summary.consensus is not None:
        c = summary.consensus
        print(
            f"consensus filter: dropped and refilled {c.dropped} images whose {c.k} "
            f"nearest kept neighbours agree < {c.min_agreement:.0%} with their label"
        )
    print(
        f"payload {args.out}: {summary.payload_bytes} bytes "
        f"(a uniformly random selection of as many images takes at least "
        f"{summary.information_bound_bytes:.0f} bytes)"
    )
    _print_origin(summary, args)


def _print_origin(summary: PayloadSummary, args: argparse.Namespace) -> None:
    """The plan's choice, the contact sheet and the signature."""
    planned = summary.plan
    if planned is not None:
        budget = planned.budget_bytes
        fits = "" if budget is None else f" (budget {budget} bytes)"
        print(
            f"planned: {planned.candidate}, predicted accuracy "
            f"{100 * planned.predicted_accuracy:.1f}%{fits}"
        )
    drawn = summary.contact_sheet
    if drawn is not None:
        shown = drawn.get("file") or f"skipped ({drawn['skipped']})"
        print(f"contact sheet: {shown}")
    elif not args.no_sheet:
        print("contact sheet: skipped (name the reference set with --reference to draw it)")
    signed = summary.signed
    if signed is None:
        print("UNSIGNED (development): receivers accept it only with --allow-unsigned")
    else:
        print(
            f"signed by {signed.sender} (key {signed.key_id}), sequence "
            f"{signed.sequence}, expires {utc_text(signed.expires)}"
        )
        print(
            f"order: a device that accepts this payload refuses, as rollbacks, the payloads "
            f"of {signed.sender} signed before it (sequence < {signed.sequence}) that it has "
            "not taken yet: deliver those first, or select them again after this one"
        )


def add_plan_measurement(plan: argparse.ArgumentParser) -> None:
    """How hard the plan measures: the screen, the confirmation, the noise, the teacher's
    variance and the choice."""
    plan.add_argument("--screen-steps", type=int, default=100, help="proxy steps, every candidate")
    plan.add_argument(
        "--confirm-steps",
        type=int,
        default=STUDENT_STEPS,
        help="proxy steps for the best candidates: the device student's (its --max-steps)",
    )
    plan.add_argument(
        "--confirm-batch",
        type=int,
        default=STUDENT_BATCH,
        help="proxy images per step for the best candidates: the device student's --batch-size",
    )
    plan.add_argument(
        "--confirm-share",
        type=float,
        default=0.25,
        help="share of the screened candidates confirmed (the best by the screen), besides "
        "the screen's accuracy-for-bytes front",
    )
    plan.add_argument(
        "--noise-repeats",
        type=int,
        default=3,
        help="the best confirmed candidates run again with another seed, to measure the "
        "proxy's noise (0: assume one validation image)",
    )
    plan.add_argument(
        "--teacher-splits",
        type=int,
        default=None,
        help="the finalists are judged under this many splits of the task (default 2), each "
        "with its own split teacher and disjoint validation images while they last (4 with "
        "the default validation fraction: cross-validation), and chosen on their mean (1: "
        "the plan's own split only)",
    )
    plan.add_argument(
        "--finalists",
        type=int,
        default=None,
        help="at most this many of the confirmed candidates near the best (the best of each "
        "keep fraction first; default one per default keep) and the choice are judged "
        "under the further splits",
    )
    plan.add_argument(
        "--choose",
        choices=CHOICE_RULES,
        default=WITHIN_NOISE,
        help="within-noise: the smallest keep fraction (its best row) predicted within the "
        "measured noise of the best; best: the highest prediction whatever its bytes",
    )


def add_plan(sub: Subparsers) -> None:
    plan = sub.add_parser(
        "plan", help="predict each candidate payload's accuracy and size; choose the best"
    )
    plan.add_argument("work", help="the scored work directory (plada-send score)")
    add_reference_options(plan)
    add_fleet_options(plan)
    plan.add_argument(
        "--train",
        help="the labeled task images that were scored (.npz or ImageFolder; with a work "
        "directory scored from stored embeddings, an ImageFolder)",
    )
    plan.add_argument("--task", help="with stored embeddings: a task directory with train/")
    plan.add_argument("--out", help="plan directory (default WORK/plan)")
    plan.add_argument(
        "--keeps", help="keep fractions to try, e.g. 0.25%%,1%%,5%% (default 0.25%%..10%%)"
    )
    plan.add_argument(
        "--validation-fraction",
        type=float,
        default=0.25,
        help="share of the labeled images held out (per class) to score the proxy students",
    )
    add_plan_measurement(plan)
    add_budget_options(
        plan,
        "byte budget: larger candidates are sized, not trained on (default 1 MiB, the "
        "largest payload a receiver takes in unless its operator raises it)",
    )
    plan.add_argument("--max-images", type=int, default=8192, help="proxy images per candidate")
    plan.add_argument(
        "--deployment",
        help="unlabeled images from where the device will work (a directory of images or a "
        ".npz): the validation images are weighted by how much they resemble them",
    )
    plan.add_argument(
        "--proxy-workers",
        type=int,
        default=0,
        help="processes the proxies train on, one compute thread each (default: one per "
        "core on a CPU, 1 with CUDA); the predictions do not depend on it",
    )
    plan.add_argument(
        "--proxy-size",
        type=int,
        help="with stored embeddings: the thumbnails' side the proxy needs (default: the "
        "store's own)",
    )
    plan.add_argument(
        "--teacher-epochs", type=int, help="default: the epochs the work directory's teacher had"
    )
    plan.add_argument(
        "--knn-k", type=int, default=5, help="labeled images per class for kNN relevance"
    )
    add_clip_options(plan)
    plan.add_argument("--seed", type=int, default=0, help="split, teacher and proxy seed")
    plan.add_argument(
        "--sender-id", default="plan", help="sizes are of payloads signed as this sender"
    )
    add_quiet(plan)
    plan.set_defaults(func=_run_plan)


def _or_default(given: int | None, default: int) -> int:
    return default if given is None else given


def _plan_settings(args: argparse.Namespace, teacher: TeacherSettings) -> PlanSettings:
    from protocol.signing import check_sender_id
    from sender.selection.payloads import byte_budget
    from sender.selection.plan import PlanSettings

    budget = byte_budget(args.max_bytes, args.link_bps, args.window)
    default = PlanSettings()
    return PlanSettings(
        keeps=parse_keeps(args.keeps) if args.keeps else default.keeps,
        validation_fraction=args.validation_fraction,
        screen_steps=args.screen_steps,
        confirm_steps=args.confirm_steps,
        confirm_batch_size=args.confirm_batch,
        confirm_share=args.confirm_share,
        noise_repeats=args.noise_repeats,
        teacher_splits=_or_default(args.teacher_splits, default.teacher_splits),
        finalists=_or_default(args.finalists, default.finalists),
        choose=args.choose,
        max_bytes=default.max_bytes if budget is None else budget,
        proxy_workers=args.proxy_workers,
        max_images=args.max_images,
        seed=args.seed,
        sender_id=check_sender_id(args.sender_id),
        teacher=teacher,
        fleet=fleet_choice(args),
        deployment=args.deployment,
    )


def _run_plan(args: argparse.Namespace) -> int:
    from sender.scoring.teacher_kinds import EMBEDDINGS
    from sender.scoring.work_dir import ScoreReport
    from sender.selection.plan_file import PLAN_FILE, PLAN_PLOT
    from sender.selection.plan_report import plan_summary

    out = Path(args.out) if args.out else Path(args.work) / "plan"
    if ScoreReport.read(args.work).path == EMBEDDINGS:
        plan = _plan_embeddings(args, out)
    else:
        plan = _plan_images(args, out)
    print(plan_summary(plan), end="")
    chosen = plan.row(plan.chosen)
    print(
        f"chosen: {chosen.name}, {chosen.payload_bytes} bytes, predicted "
        f"{100 * chosen.predicted_accuracy:.1f}%"
    )
    print(f"plan: {out / PLAN_FILE} (plot {out / PLAN_PLOT})")
    return 0


def _plan_images(args: argparse.Namespace, out: Path) -> Plan:
    """The plan of a work directory scored from reference images."""
    from sender.scoring.images import TeacherSettings
    from sender.selection.plan import make_plan, work_teacher

    if not args.train or args.task or args.proxy_size:
        raise ConfigError(
            "a work directory scored from reference images plans with --train (the labeled "
            "images that were scored); --task and --proxy-size go with stored embeddings"
        )
    base = TeacherSettings(epochs=args.teacher_epochs or 0, knn_k=args.knn_k)
    teacher = work_teacher(args.work, base)  # a typed error before anything loads
    embedder = clip_embedder(args)
    reference = reference_from_args(args)
    train = task_images_for(args.train, reference, "task")
    settings = _plan_settings(args, replace(teacher, embedder=embedder))
    return make_plan(reference, train, args.work, out, settings, progress=not args.quiet)


def _plan_embeddings(args: argparse.Namespace, out: Path) -> Plan:
    """The plan of a work directory scored from stored embeddings (thumbnails for the proxy)."""
    from sender.embedding.embedders import OpenClipEmbedder
    from sender.scoring.embeddings import EmbeddingTask
    from sender.scoring.images import TeacherSettings
    from sender.selection.embedding_plan import PlannedStore, embed_plan_task, plan_from_embeddings

    if args.teacher_epochs:
        raise ConfigError(
            f"{args.work} was scored from stored embeddings: drop "
            "--teacher-epochs (the store and the work directory's teacher are used)"
        )
    settings = _plan_settings(args, TeacherSettings(knn_k=args.knn_k))  # flags checked first
    planned = PlannedStore.open(args.work, args.proxy_size, settings.fleet)
    if not args.clip_weights:
        raise ConfigError("give --clip-weights (the CLIP that embedded the store)")
    model = args.clip_model or planned.store.meta.model
    embedder = OpenClipEmbedder(model, args.clip_weights, args.device)
    task = EmbeddingTask.from_folders(args.task, args.train)
    embedded = embed_plan_task(embedder, task.train_dir, planned)
    return plan_from_embeddings(planned, embedded, out, settings, embedder, not args.quiet)
