"""``plada-send``: the ground station's command line.

plada-send task digits --out DIR          export the embedded default task
plada-send reference --reference SPEC     build/verify a reference set, print its fingerprint
plada-send embed --reference SPEC --clip-model M --clip-weights W --out EMB [--shard i/N]
                 [--engine ray [--address HOST:PORT] [--actors N]]
plada-send merge EMB [--from OTHER ...] [--int8]
plada-send index EMB [--memory-budget 4GB]
plada-send score --embeddings EMB --clip-weights W --task DIR | --classes a,b --out WORK
plada-send score --reference SPEC --train T.npz [--test T.npz] --out WORK   (image teacher)
plada-send keygen --sender-id ID --out keys/ID      signing key (ID.key) + public key (ID.pub)
plada-send frames task.plada --link lora-sf9 --out FRAMES [--repair 30%]   frames for a link
plada-send frames task.plada --link acoustic-64 --carousel --out - [--until-done DIR --reply-key F]
plada-send plan WORK --reference SPEC --train T.npz [--out PLAN]   predict each payload's accuracy
plada-send select WORK --plan PLAN [--max-bytes N | --link-bps B --window 20m] \
    --signing-key keys/ID.key --out task.plada       the best planned payload that fits
plada-send select WORK --signing-key keys/ID.key --out task.plada   (safety-net, kNN, 1%)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from plada_cli import (
    add_reference_options,
    description,
    print_reference,
    reference_from_args,
    run_cli,
    task_images_for,
)
from protocol.atomic_files import writable_directory, write_json_atomic
from protocol.errors import ConfigError, PladaError, TransferRefusedError
from protocol.frames import PROFILES, link_profile
from protocol.reference.factory import open_reference
from protocol.signing import check_sender_id
from protocol.timestamps import utc_text
from protocol.world.digits import load_digits_split
from sender.embedding.store import EmbeddingStore, StoreMeta, parse_shard
from sender.scoring.teacher_kinds import EMBEDDING_TEACHERS, IMAGE_TEACHERS, TEACHERS
from sender.scoring.work_dir import record_reference_spec, recorded_reference_spec
from sender.selection.strategies import STRATEGIES, SelectionConfig
from sender.signer import PayloadSigner, generate_key_files, parse_duration

# Subcommands import the modules that load torch or faiss when they run, so that
# --help and the light subcommands start in a fraction of a second.


def _cmd_task(args: argparse.Namespace) -> int:
    if args.name != "digits":
        raise ConfigError(f"unknown built-in task {args.name!r} (available: digits)")
    out = writable_directory(args.out, "--out")
    train, test = load_digits_split(seed=args.seed)
    replace(train, name=args.name).save(out / "train.npz")
    replace(test, name=args.name).save(out / "test.npz")
    print(f"task digits: {len(train)} train and {len(test)} test images in {out}")
    return 0


def _parse_bytes(text: str) -> int:
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    number = text.upper().removesuffix("B")
    unit = number[-1] if number and number[-1] in units else ""
    try:
        return int(float(number.removesuffix(unit) if unit else number) * units[unit])
    except ValueError as exc:
        raise ConfigError(f"cannot read {text!r} as a size (e.g. 4GB, 512MB)") from exc


def _cmd_embed(args: argparse.Namespace) -> int:
    from sender.embedding.local import embed_reference

    shard = parse_shard(args.shard)
    if args.engine == "ray":
        return _print_embed_summary(args, _embed_on_ray(args, shard))
    for flag in ("address", "actors", "actor_cpus", "actor_gpus", "ray_cpus"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --engine ray")
    reference = reference_from_args(args)
    for problem in getattr(reference, "problems", []):
        print(f"warning: {problem}")
    summary = embed_reference(
        reference,
        args.out,
        args.clip_model,
        args.clip_weights,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        part_rows=args.part_rows,
        shard=shard,
        progress=not args.quiet,
        decode=args.decode,
    )
    return _print_embed_summary(args, summary)


def _embed_on_ray(args: argparse.Namespace, shard: tuple[int, int]):
    from sender.embedding.ray_engine import RayOptions, embed_reference_ray

    options = RayOptions(
        address=args.address,
        actors=args.actors,
        actor_cpus=args.actor_cpus,
        actor_gpus=args.actor_gpus,
        local_cpus=args.ray_cpus,
        retries=args.retries,
    )
    return embed_reference_ray(
        args.reference,
        args.out,
        args.clip_model,
        args.clip_weights,
        options,
        cache_dir=args.cache_dir,
        image_size=args.image_size,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        part_rows=args.part_rows,
        shard=shard,
        progress=not args.quiet,
        decode=args.decode,
    )


def _print_embed_summary(args: argparse.Namespace, summary) -> int:
    print(
        f"shard {args.shard}: {summary.parts_in_slice} of {summary.parts_total} parts, "
        f"{summary.parts_resumed} already done, {summary.parts_written} written; "
        f"{summary.images_embedded} images in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.0f} img/s), {summary.images_skipped} unreadable skipped"
    )
    if args.engine == "ray" and summary.images_embedded:
        print(
            f"ray: {summary.first_batch_seconds:.1f}s to the first batch (cluster and actors "
            f"starting), then {summary.steady_images_per_second:.0f} img/s"
        )
    if summary.formats:
        kinds = ", ".join(f"{count} {kind}" for kind, count in summary.formats.items())
        print(f"files: {kinds} (only baseline JPEGs take a GPU decoder's hardware path)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from sender.embedding.local import merge_embeddings

    summary = merge_embeddings(args.embeddings, args.sources, int8=args.int8)
    print(
        f"merged {summary['n']} x {summary['dim']} embeddings into {args.embeddings} "
        f"({summary['valid']} readable, {summary['skipped']} skipped"
        f"{', int8 copy' if summary['int8'] else ''})"
    )
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    import time

    from sender.embedding.index import INDEX_FILE, build_store_index, save_index

    started = time.perf_counter()
    store = EmbeddingStore(args.embeddings)
    index, plan = build_store_index(
        store, _parse_bytes(args.memory_budget), kind=args.kind, progress=not args.quiet
    )
    out = args.out or str(store.root / INDEX_FILE)
    save_index(index, out)
    detail = ", ".join(f"{k}={v}" for k, v in plan.items())
    print(f"index {out}: {index.ntotal} vectors ({detail}) in {time.perf_counter() - started:.1f}s")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    if args.embeddings:
        args.teacher = args.teacher or "probe"
        if args.teacher not in EMBEDDING_TEACHERS:
            raise ConfigError(f"the {args.teacher} teacher works on images: drop --embeddings")
        return _score_embeddings(args)
    args.teacher = args.teacher or "cnn"
    if args.teacher not in IMAGE_TEACHERS:
        raise ConfigError(f"--teacher {args.teacher} needs --embeddings (see 'plada-send embed')")
    if not args.train:
        raise ConfigError("give --train (labeled task images)")
    reference = reference_from_args(args)
    train = _task_images(args.train, reference, args)  # checked before torch loads
    test = _task_images(args.test, reference, args, "test") if args.test else None
    embedder = _embedder_from_args(args)
    from sender.scoring.images import score_reference

    summary = score_reference(
        reference,
        train,
        test,
        args.out,
        teacher_kind=args.teacher,
        embedder=embedder,
        temperature=args.temperature,
        knn_k=args.knn_k,
        teacher_epochs=args.teacher_epochs,
        seed=args.seed,
        progress=not args.quiet,
    )
    record_reference_spec(args.out, args.reference, args.image_size, args.cache_dir)
    return _print_score_summary(summary, "reference images", args.out)


def _embedder_from_args(args: argparse.Namespace):
    """The CLIP embedder of --clip-model/--clip-weights, or None when neither is given."""
    if not (args.clip_model or args.clip_weights):
        return None
    if not (args.clip_model and args.clip_weights):
        raise ConfigError("give both --clip-model and --clip-weights")
    from sender.embedding.embedders import OpenClipEmbedder

    return OpenClipEmbedder(args.clip_model, args.clip_weights, args.device)


def _task_images(path: str, reference, args: argparse.Namespace, what: str = "task"):
    """Labeled task images in the reference set's channels and size, named by --task-id."""
    return task_images_for(path, reference, what, getattr(args, "task_id", None))


def _parse_keeps(text: str) -> tuple[float, ...]:
    """Keep fractions from '0.25%,1%,0.05' (percent or fraction)."""
    keeps = []
    for part in text.split(","):
        part = part.strip()
        try:
            keeps.append(float(part[:-1]) / 100 if part.endswith("%") else float(part))
        except ValueError as exc:
            raise ConfigError(f"cannot read {part!r} as a keep fraction (e.g. 0.5%,1%,5%)") from exc
    return tuple(keeps)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from sender.selection.plan import PLAN_FILE, PLAN_PLOT, PLAN_SUMMARY, PlanSettings, make_plan

    work = Path(args.work)
    report_path = work / "score_report.json"
    if not report_path.is_file():
        raise ConfigError(f"{report_path} not found: run 'plada-send score' first")
    try:
        teacher = json.loads(report_path.read_text())["teacher"]
        teacher_kind = teacher["kind"]
        epochs = args.teacher_epochs or int(teacher.get("details", {}).get("epochs", 40))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{report_path} is damaged: run 'plada-send score' again") from exc
    if teacher_kind not in IMAGE_TEACHERS:
        raise ConfigError(
            f"{work} was scored from stored embeddings ({teacher_kind} teacher); the plan "
            "retrains the teacher on images: score with --reference and --train to plan"
        )
    embedder = _embedder_from_args(args)
    reference = reference_from_args(args)
    train = _task_images(args.train, reference, args)
    settings = PlanSettings(
        keeps=_parse_keeps(args.keeps) if args.keeps else PlanSettings().keeps,
        validation_fraction=args.validation_fraction,
        screen_steps=args.screen_steps,
        confirm_steps=args.confirm_steps,
        max_images=args.max_images,
        seed=args.seed,
        sender_id=check_sender_id(args.sender_id),
        teacher={
            "teacher_kind": teacher_kind,
            "embedder": embedder,
            "teacher_epochs": epochs,
            "knn_k": args.knn_k,
        },
    )
    out = Path(args.out) if args.out else work / "plan"
    plan = make_plan(reference, train, work, out, settings, progress=not args.quiet)
    print((out / PLAN_SUMMARY).read_text(), end="")
    chosen = next(r for r in plan["candidates"] if r["name"] == plan["chosen"])
    print(
        f"chosen: {chosen['name']}, {chosen['payload_bytes']} bytes, predicted "
        f"{100 * chosen['predicted_accuracy']:.1f}%"
    )
    print(f"plan: {out / PLAN_FILE} (plot {out / PLAN_PLOT})")
    return 0


def _print_score_summary(summary: dict, what: str, out: str) -> int:
    accuracy = summary["teacher"]["test_accuracy"]
    shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
    print(
        f"scored {summary['reference']['size']} {what} in {summary['scoring_seconds']:.1f}s "
        f"({summary['scoring_images_per_second']:.0f}/s); "
        f"teacher {summary['teacher']['kind']} test accuracy {shown}"
    )
    if summary.get("domain_gap") is not None:
        print(f"domain gap: {summary['domain_gap']['reason']}")
    knn = summary.get("knn_relevance")
    if knn is not None:
        if "skipped" in knn:
            print(f"kNN relevance: skipped ({knn['skipped']})")
        else:
            print(
                f"kNN relevance: {knn['task_images']} task images x {knn['depth']} nearest "
                f"reference rows -> {knn['candidates']} candidates in {knn['seconds']:.1f}s"
            )
    print(f"recommended strategy: {summary['recommended_strategy']}")
    print(f"work directory: {out}")
    return 0


def _score_embeddings(args: argparse.Namespace) -> int:
    from sender.embedding.embedders import OpenClipEmbedder
    from sender.scoring.embeddings import read_class_names, score_embeddings

    if not args.clip_weights:
        raise ConfigError("--embeddings needs --clip-weights (the weights that embedded them)")
    model = args.clip_model or StoreMeta.load(Path(args.embeddings)).model
    train, test = args.train, args.test
    if args.task:
        task = Path(args.task)
        train = train or (str(task / "train") if (task / "train").is_dir() else None)
        test = test or (str(task / "test") if (task / "test").is_dir() else None)
    summary = score_embeddings(
        args.embeddings,
        args.out,
        OpenClipEmbedder(model, args.clip_weights, args.device),
        teacher=args.teacher,
        train_dir=train,
        test_dir=test,
        class_names=read_class_names(args.classes) if args.classes else None,
        temperature=args.temperature,
        knn_k=args.knn_k,
        chunk_rows=args.chunk_rows,
        task_name=args.task_id or (Path(args.task).name if args.task else None),
        progress=not args.quiet,
    )
    return _print_score_summary(summary, "reference embeddings", args.out)


def _cmd_keygen(args: argparse.Namespace) -> int:
    writable_directory(Path(args.out).parent, "the --out directory")
    key = generate_key_files(args.sender_id, args.out, args.encrypt)
    print(f"sender {key.sender}: key id {key.key_id.hex()}")
    print(f"private key: {args.out}.key (keep it on this station; mode 0600)")
    print(f"public key:  {args.out}.pub (install on receivers: plada-receive trust add)")
    return 0


def _cmd_frames(args: argparse.Namespace) -> int:
    from sender.link.frames import write_frames

    profile = link_profile(args.link, args.mtu)
    if args.carousel:
        return _frames_carousel(args, profile)
    for option in ("until_done", "reply_key", "rate", "max_frames"):
        if getattr(args, option) is not None:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} goes with --carousel (frame files are written once)")
    written = write_frames(args.payload, profile, args.out, args.repair, args.stream)
    print(written.summary(profile))
    print(f"frames: {Path(written.written[0]).parent}")
    return 0


def _frames_carousel(args: argparse.Namespace, profile) -> int:
    from tqdm import tqdm

    from protocol.frames import FrameEncoder
    from protocol.payload import read_payload_bytes
    from protocol.timestamps import duration_text
    from sender.link.carousel import (
        ReplyWatch,
        check_link_output,
        close_link_output,
        open_link_output,
        read_reply_key_file,
        run_carousel,
    )

    if args.stream or args.repair != "0":
        raise ConfigError("--carousel sends repair frames for ever: drop --stream and --repair")
    if (args.until_done is None) != (args.reply_key is None):
        raise ConfigError("--until-done and --reply-key go together: the replies' folder and key")
    rate = profile.bits_per_second if args.rate is None else args.rate
    if rate < 0 or (args.max_frames or 0) < 0:
        raise ConfigError("--rate and --max-frames take a number >= 0")
    encoder = FrameEncoder(read_payload_bytes(args.payload), profile.frame_bytes)
    watch = None
    if args.until_done is not None:
        watch = ReplyWatch(
            Path(args.until_done), read_reply_key_file(args.reply_key), encoder.transfer
        )
    target = None if args.out == "-" else check_link_output(args.out)  # before a word is said
    pace = f"{rate:g} bps" if rate else "as fast as the reader takes them"
    print(
        f"carousel of transfer {encoder.transfer.hex()}: {encoder.source_count} source frames, "
        f"then repair frames, to {args.out} at {pace} for {profile.name}",
        file=sys.stderr,
    )
    out = open_link_output(target)
    bar = tqdm(unit="frame", file=sys.stderr, desc="on air", disable=None)
    try:
        run = run_carousel(
            encoder, out, rate, args.max_frames or 0, watch, on_frame=lambda _: bar.update()
        )
    finally:
        bar.close()
        close_link_output(out)
    said = f"; the device said: {run.reply.text()}" if run.reply else ""
    ignored = f" ({run.ignored_replies} replies failed their MAC)" if run.ignored_replies else ""
    print(
        f"carousel stopped ({run.stopped}) after {run.frames} frames, {run.bytes_on_air} B on "
        f"air in {duration_text(run.seconds)}{said}{ignored}",
        file=sys.stderr,
    )
    if run.stopped == "refused":
        raise TransferRefusedError(
            f"the device rebuilt transfer {encoder.transfer.hex()} and refused its payload: "
            "see its quarantine; fix the payload, then send it again"
        )
    return 130 if run.stopped == "interrupted" else 0


def _signer_from_args(args: argparse.Namespace):
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
        args.signing_key, args.expires_in, args.sequence_file, getattr(args, "audience", None)
    )


SELECTION_FLAGS = ("strategy", "score", "keep", "alpha", "reserve", "seed")


def _byte_budget(args: argparse.Namespace) -> int | None:
    """--max-bytes, or what --link-bps carries in --window; None without a budget."""
    if args.max_bytes is not None and args.link_bps is not None:
        raise ConfigError("give --max-bytes or --link-bps/--window, not both")
    if args.link_bps is not None:
        if args.window is None:
            raise ConfigError("--link-bps needs --window (how long the link is up, e.g. 20m)")
        if args.link_bps <= 0:
            raise ConfigError(f"--link-bps must be positive, not {args.link_bps}")
        return int(args.link_bps * parse_duration(args.window) / 8)
    if args.window is not None:
        raise ConfigError("--window needs --link-bps (the link's rate in bits per second)")
    if args.max_bytes is not None and args.max_bytes < 1:
        raise ConfigError(f"--max-bytes must be positive, not {args.max_bytes}")
    return args.max_bytes


def _sheet_target(args: argparse.Namespace):
    """(reference set, PNG path) for select's contact sheet: the set --reference names,
    else the one score recorded in the work directory; None without either."""
    if args.no_sheet:
        return None
    recorded = recorded_reference_spec(args.work) or {}
    spec = args.reference or recorded.get("spec")
    if spec is None:
        return None
    size = args.image_size or int(recorded.get("image_size", 64))
    cache_dir = args.cache_dir or (recorded.get("cache_dir") if not args.reference else None)
    try:
        reference = open_reference(spec, cache_dir, size)
    except PladaError as exc:  # the picture is an extra: the payload does not wait for it
        print(f"warning: no contact sheet, the reference set cannot be read: {exc}")
        return None
    out = Path(args.out)
    return reference, out.with_name(f"{out.stem}.selection.png")


def _cmd_select(args: argparse.Namespace) -> int:
    from sender.selection.payloads import make_payload

    budget = _byte_budget(args)
    planned = None
    if args.plan:
        from sender.selection.plan import load_plan, planned_candidate

        given = [f"--{name}" for name in SELECTION_FLAGS if getattr(args, name) is not None]
        if given:
            raise ConfigError(f"--plan chooses the selection: drop {' '.join(given)}")
        candidate, planned = planned_candidate(load_plan(args.plan, args.work), budget)
        config, score = candidate.config(), candidate.score
    else:  # the flags given, SelectionConfig's defaults for the rest
        given = {name: getattr(args, name) for name in SELECTION_FLAGS if name != "score"}
        config = SelectionConfig(**{k: v for k, v in given.items() if v is not None})
        score = args.score
    signer = _signer_from_args(args)
    sheet = _sheet_target(args)
    summary = make_payload(
        args.work,
        config,
        args.out,
        score=score,
        task_id=args.task_id,
        leak_threshold=args.leak_threshold,
        exclude_leaks=not args.keep_leaks,
        consensus_k=args.consensus,
        consensus_agreement=args.consensus_agreement,
        signer=signer,
        max_bytes=budget,
        sheet=sheet,
    )
    if planned is not None:
        summary["plan"] = {
            "candidate": planned["name"],
            "predicted_accuracy": planned["predicted_accuracy"],
            "planned_bytes": planned["payload_bytes"],
            "budget_bytes": budget,
        }
    if args.json:
        write_json_atomic(Path(args.json), summary)
    hist = " ".join(f"{k}:{v}" for k, v in summary["class_histogram"].items())
    chosen = summary["selection"]
    print(
        f"kept {summary['kept']} images ({100 * summary['keep_fraction']:.2f}%), "
        f"strategy {chosen['strategy']}, score {chosen['score']}"
    )
    print(f"class histogram: {hist}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    leak = summary["leakage"]
    if leak is not None:
        action = "excluded" if leak["excluded"] else "NOT excluded (--keep-leaks)"
        print(
            f"leakage check: {leak['test_images_with_near_duplicates']} of "
            f"{leak['test_images_checked']} test images have reference near-duplicates "
            f"(cosine >= {leak['threshold']}): {leak['near_duplicate_reference_images']} "
            f"reference images {action}; {leak['kept_near_duplicates']} kept"
        )
    if summary["consensus"] is not None:
        c = summary["consensus"]
        print(
            f"consensus filter: dropped and refilled {c['dropped']} images whose {c['k']} "
            f"nearest kept neighbours agree < {c['min_agreement']:.0%} with their label"
        )
    print(
        f"payload {args.out}: {summary['payload_bytes']} bytes "
        f"(information bound {summary['information_bound_bytes']:.0f} bytes)"
    )
    if planned is not None:
        fits = "" if budget is None else f" (budget {budget} bytes)"
        print(
            f"planned: {planned['name']}, predicted accuracy "
            f"{100 * planned['predicted_accuracy']:.1f}%{fits}"
        )
    drawn = summary["contact_sheet"]
    if drawn is not None:
        shown = drawn.get("file") or f"skipped ({drawn['skipped']})"
        print(f"contact sheet: {shown}")
    elif not args.no_sheet:
        print("contact sheet: skipped (name the reference set with --reference to draw it)")
    signed = summary["signed"]
    if signed is None:
        print("UNSIGNED (development): receivers accept it only with --allow-unsigned")
    else:
        print(
            f"signed by {signed['sender']} (key {signed['key_id']}), sequence "
            f"{signed['sequence']}, expires {utc_text(signed['expires'])}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plada-send", description=description(__doc__))
    sub = parser.add_subparsers(dest="command", required=True)

    task = sub.add_parser("task", help="export a built-in task as train.npz / test.npz")
    task.add_argument("name", choices=["digits"], help="the built-in task")
    task.add_argument("--out", required=True, help="directory for train.npz and test.npz")
    task.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    task.set_defaults(func=_cmd_task)

    ref = sub.add_parser("reference", help="build or verify a reference set; print its fingerprint")
    add_reference_options(ref)
    ref.set_defaults(func=print_reference)

    emb = sub.add_parser("embed", help="CLIP-embed the reference set (resumable, shardable)")
    add_reference_options(emb)
    emb.add_argument("--clip-model", required=True, help="open_clip model name, e.g. ViT-B-32")
    emb.add_argument(
        "--clip-weights",
        required=True,
        help="local weights file, or a pretrained tag already cached",
    )
    emb.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    emb.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    emb.add_argument(
        "--workers", type=int, default=4, help="image-decoding processes (ray: threads per actor)"
    )
    emb.add_argument("--part-rows", type=int, default=65536, help="rows per resumable part")
    emb.add_argument(
        "--decode",
        choices=["auto", "pil", "torchcodec", "torchvision"],
        default="auto",
        help="pil: open_clip's transform in the workers; torchcodec, torchvision: batched on "
        "the device (nvJPEG on a GPU); auto: torchcodec on CUDA when installed, else "
        "torchvision on CUDA, pil on the CPU",
    )
    emb.add_argument("--shard", default="0/1", help="this machine's slice i/N of the parts")
    emb.add_argument("--out", required=True, help="embeddings directory")
    emb.add_argument("--quiet", action="store_true", help="no progress bar")
    emb.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (and its decoding workers); ray: a Ray Data actor pool, "
        "on a local instance or the cluster of --address (needs plada[distributed])",
    )
    emb.add_argument(
        "--address",
        help="Ray cluster to join (head host:port or ray://host:10001); default: a local "
        "instance bound to 127.0.0.1",
    )
    emb.add_argument(
        "--actors",
        type=int,
        help="Ray actors, one model each (default: one per GPU, else one per node's CPUs)",
    )
    emb.add_argument("--actor-cpus", type=float, help="CPUs reserved per Ray actor")
    emb.add_argument(
        "--actor-gpus", type=float, help="GPUs per Ray actor (default: 1 with a cuda --device)"
    )
    emb.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    emb.add_argument(
        "--retries", type=int, default=3, help="Ray: tries of a failed batch after the first"
    )
    emb.set_defaults(func=_cmd_embed)

    merge = sub.add_parser("merge", help="check all parts are there and merge them")
    merge.add_argument("embeddings", help="the embeddings directory (plada-send embed --out)")
    merge.add_argument(
        "--from", dest="sources", nargs="*", default=[], help="other machines' embeddings dirs"
    )
    merge.add_argument("--int8", action="store_true", help="also write an int8 copy")
    merge.set_defaults(func=_cmd_merge)

    idx = sub.add_parser("index", help="FAISS index over merged embeddings (leakage, kNN)")
    idx.add_argument("embeddings", help="the merged embeddings directory")
    idx.add_argument(
        "--kind",
        choices=["auto", "flat", "ivfpq"],
        default="auto",
        help="flat: exact; ivfpq: compressed, approximate; auto: flat if it fits the budget",
    )
    idx.add_argument("--memory-budget", default="4GB", help="index size limit, e.g. 2GB")
    idx.add_argument("--out", help="index file (default EMB/reference.faiss)")
    idx.add_argument("--quiet", action="store_true", help="no progress bar")
    idx.set_defaults(func=_cmd_index)

    score = sub.add_parser("score", help="train the teacher and score every reference image")
    add_reference_options(score)
    score.add_argument("--embeddings", help="merged reference embeddings (production path)")
    score.add_argument("--task", help="task directory with train/ and optional test/ ImageFolders")
    score.add_argument("--train", help="labeled task images (.npz or ImageFolder)")
    score.add_argument("--test", help="labeled test images, for teacher accuracy and leakage")
    score.add_argument("--classes", help="class names: a file (one per line) or a,b,c")
    score.add_argument("--task-id", help="task name recorded in the work directory")
    score.add_argument("--chunk-rows", type=int, default=8192, help="rows per streamed chunk")
    score.add_argument(
        "--teacher",
        choices=TEACHERS,
        default=None,
        help="cnn (images; default) or probe (default with --embeddings), zeroshot, knn",
    )
    score.add_argument("--teacher-epochs", type=int, default=40, help="cnn teacher's epochs")
    score.add_argument("--clip-model", help="open_clip model name, e.g. ViT-B-32")
    score.add_argument("--clip-weights", help="local open_clip weights file")
    score.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    score.add_argument("--temperature", type=float, default=1.0, help="energy temperature")
    score.add_argument(
        "--knn-k", type=int, default=5, help="labeled images per class for kNN relevance"
    )
    score.add_argument("--seed", type=int, default=0, help="the teacher's seed")
    score.add_argument("--out", required=True, help="work directory")
    score.add_argument("--quiet", action="store_true", help="no progress bars")
    score.set_defaults(func=_cmd_score)

    sel = sub.add_parser("select", help="select from a scored work directory and write a payload")
    sel.add_argument("work", help="the scored work directory (plada-send score --out)")
    sel.add_argument(
        "--plan",
        help="a plan (plada-send plan): send its best candidate within the byte budget",
    )
    sel.add_argument("--max-bytes", type=int, help="byte budget: refuse larger payloads")
    sel.add_argument("--link-bps", type=float, help="byte budget from a link rate (bits/s) ...")
    sel.add_argument("--window", help="... and how long it is up: seconds or 30m / 2h")
    sel.add_argument(
        "--strategy",
        choices=["auto", *STRATEGIES],
        default=None,
        help="default safety-net; auto: the one the domain-gap measurement recommended; "
        "random, random-balanced: the controls",
    )
    sel.add_argument(
        "--score",
        choices=["energy", "entropy", "knn"],
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
    sel.add_argument("--keep", type=float, help="fraction of the reference set (default 0.01)")
    sel.add_argument("--alpha", type=float, help="safety-net quota exponent (default -0.2)")
    sel.add_argument(
        "--reserve", type=float, help="safety-net share of the budget (default 1.0: all)"
    )
    sel.add_argument("--seed", type=int, help="the random controls' draw (default 0)")
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
    sel.set_defaults(func=_cmd_select)

    plan = sub.add_parser(
        "plan", help="predict each candidate payload's accuracy and size; choose the best"
    )
    plan.add_argument("work", help="the scored work directory (plada-send score)")
    add_reference_options(plan)
    plan.add_argument("--train", required=True, help="the labeled task images that were scored")
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
    plan.add_argument("--screen-steps", type=int, default=100, help="proxy steps, every candidate")
    plan.add_argument("--confirm-steps", type=int, default=200, help="proxy steps, the best")
    plan.add_argument("--max-images", type=int, default=8192, help="proxy images per candidate")
    plan.add_argument(
        "--teacher-epochs", type=int, help="default: the epochs the work directory's teacher had"
    )
    plan.add_argument(
        "--knn-k", type=int, default=5, help="labeled images per class for kNN relevance"
    )
    plan.add_argument("--clip-model", help="open_clip model name (probe teacher)")
    plan.add_argument("--clip-weights", help="local open_clip weights file (probe teacher)")
    plan.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    plan.add_argument("--seed", type=int, default=0, help="split, teacher and proxy seed")
    plan.add_argument(
        "--sender-id", default="plan", help="sizes are of payloads signed as this sender"
    )
    plan.add_argument("--quiet", action="store_true", help="no progress bars")
    plan.set_defaults(func=_cmd_plan)

    frames = sub.add_parser(
        "frames", help="cut a payload into fountain-coded frames for a narrow, lossy link"
    )
    frames.add_argument("payload", help="the payload file (.plada)")
    link = frames.add_mutually_exclusive_group(required=True)
    link.add_argument("--link", help=f"link profile: {', '.join(PROFILES)}", metavar="PROFILE")
    link.add_argument("--mtu", type=int, help="custom frame size in bytes")
    frames.add_argument(
        "--out",
        required=True,
        help="folder for the frame files; with --carousel `-` (stdout), a named pipe or a device",
    )
    frames.add_argument(
        "--repair",
        default="0",
        help="repair frames after the source frames: a count, or a share of them (30%%)",
    )
    frames.add_argument(
        "--stream",
        action="store_true",
        help="one stream file of length-prefixed frames instead of one file per frame",
    )
    frames.add_argument(
        "--carousel",
        action="store_true",
        help="send for ever (source, then fresh repair frames) as a stream to --out",
    )
    frames.add_argument(
        "--rate",
        type=float,
        help="carousel pace in bits per second on air (default: the profile's; 0: unpaced)",
    )
    frames.add_argument(
        "--until-done",
        metavar="OUTBOX_REPLY",
        help="stop the carousel once a reply in this folder (or file) says the device is done",
    )
    frames.add_argument(
        "--reply-key", help="the device's reply key file (from `plada-receive reply-key`)"
    )
    frames.add_argument("--max-frames", type=int, help="stop the carousel after this many frames")
    frames.set_defaults(func=_cmd_frames)

    keygen = sub.add_parser("keygen", help="create a sender signing key and its public key")
    keygen.add_argument("--sender-id", required=True, help="this station's sender id")
    keygen.add_argument("--out", required=True, help="path prefix: writes OUT.key and OUT.pub")
    keygen.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the private key with the passphrase in PLADA_SIGNING_PASSPHRASE",
    )
    keygen.set_defaults(func=_cmd_keygen)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; typed errors become one-line messages and exit status 2."""
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
