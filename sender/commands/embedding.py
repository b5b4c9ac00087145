"""``plada-send embed``, ``merge`` and ``index``: the reference set embedded once with CLIP,
merged into one store, and indexed with FAISS."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from plada_cli import add_reference_options, machine_cores, reference_location
from protocol.atomic_files import creatable_directory
from protocol.errors import ConfigError
from protocol.reference.encoded import TENSOR_DECODERS
from sender.commands.options import Subparsers, add_clip_options, parse_bytes

if TYPE_CHECKING:
    from sender.embedding.engine import EmbedEngine

RAY_FLAGS = ("address", "actors", "actor_cpus", "actor_gpus", "ray_cpus")


def add_embed(sub: Subparsers) -> None:
    emb = sub.add_parser("embed", help="CLIP-embed the reference set (resumable, shardable)")
    add_reference_options(emb)
    add_clip_options(emb, required=True)
    emb.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    emb.add_argument(
        "--workers",
        type=int,
        default=min(4, machine_cores()),
        help="image-decoding processes (ray: threads per actor); default: up to 4, at most "
        "this machine's cores",
    )
    emb.add_argument("--part-rows", type=int, default=65536, help="rows per resumable part")
    emb.add_argument(
        "--decode",
        choices=("auto", "pil", *TENSOR_DECODERS),
        default="auto",
        help="pil: open_clip's transform in the workers; torchcodec, torchvision: batched on "
        "the device (nvJPEG on a GPU); auto: torchcodec on CUDA when installed, else "
        "torchvision on CUDA, pil on the CPU",
    )
    emb.add_argument("--shard", default="0/1", help="this machine's slice i/N of the parts")
    emb.add_argument(
        "--thumbnails",
        type=int,
        default=32,
        metavar="SIZE",
        help="also keep a SIZE x SIZE uint8 thumbnail of every row, for plada-send plan "
        "(3 SIZE^2 bytes a row: 44 GB for 14.2M rows at 32); 0: none. On a store made "
        "without them, the same command adds them (it redoes only the parts that lack them)",
    )
    emb.add_argument("--out", required=True, help="embeddings directory")
    emb.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_engine_options(emb)
    emb.set_defaults(
        func=_run_embed,
        interrupted="finished parts are kept in --out; the same command resumes from them",
    )


def _add_engine_options(emb: argparse.ArgumentParser) -> None:
    engine = emb.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (and its decoding workers); ray: a Ray Data actor pool, "
        "on a local instance or the cluster of --address (needs plada[distributed])",
    )
    engine.add_argument(
        "--address",
        help="Ray cluster to join (head host:port or ray://host:10001); default: a local "
        "instance bound to 127.0.0.1",
    )
    engine.add_argument(
        "--actors",
        type=int,
        help="Ray actors, one model each (default: one per GPU, else one per node's CPUs)",
    )
    engine.add_argument("--actor-cpus", type=float, help="CPUs reserved per Ray actor")
    engine.add_argument(
        "--actor-gpus", type=float, help="GPUs per Ray actor (default: 1 with a cuda --device)"
    )
    engine.add_argument(
        "--ray-cpus", type=int, help="CPUs of the local Ray instance (default: all)"
    )
    engine.add_argument(
        "--retries", type=int, default=3, help="Ray: tries of a failed batch after the first"
    )


def _engine(args: argparse.Namespace) -> EmbedEngine:
    """The engine --engine names, with its options."""
    if args.engine == "ray":
        from sender.embedding.ray_engine import RayEngine, RayOptions

        return RayEngine(
            RayOptions(
                address=args.address,
                actors=args.actors,
                actor_cpus=args.actor_cpus,
                actor_gpus=args.actor_gpus,
                local_cpus=args.ray_cpus,
                retries=args.retries,
            )
        )
    for flag in RAY_FLAGS:
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --engine ray")
    from sender.embedding.local import LocalEngine

    return LocalEngine()


def _run_embed(args: argparse.Namespace) -> int:
    from sender.embedding.engine import EmbedJob, EmbedSettings
    from sender.embedding.store import parse_shard
    from trainer.training import resolve_device

    settings = EmbedSettings(
        model=args.clip_model,
        weights=args.clip_weights,
        device=str(resolve_device(args.device)),  # the driver's choice, for Ray's actors too
        batch_size=args.batch_size,
        workers=args.workers,
        part_rows=args.part_rows,
        shard=parse_shard(args.shard),
        decode=args.decode,
        progress=not args.quiet,
        thumbnails=args.thumbnails,
    )
    job = EmbedJob(reference_location(args), creatable_directory(args.out, "--out"), settings)
    summary = _engine(args).embed(job)
    print(
        f"shard {args.shard}: {summary.parts_in_slice} of {summary.parts_total} parts, "
        f"{summary.parts_resumed} already done, {summary.parts_written} written; "
        f"{summary.images_embedded} images in {summary.seconds:.1f}s "
        f"({summary.images_per_second:.0f} img/s), {summary.images_skipped} unreadable skipped"
    )
    if args.engine == "ray" and summary.images_embedded:
        steady = summary.images_embedded > summary.first_batch_images
        rate = f", then {summary.steady_images_per_second:.0f} img/s" if steady else ""
        print(
            f"ray: {summary.first_batch_seconds:.1f}s to the first batch (cluster and actors "
            f"starting){rate}"
        )
    if summary.formats:
        kinds = ", ".join(f"{count} {kind}" for kind, count in summary.formats.items())
        print(f"files: {kinds} (only baseline JPEGs take a GPU decoder's hardware path)")
    return 0


def add_merge(sub: Subparsers) -> None:
    merge = sub.add_parser("merge", help="check all parts are there and merge them")
    merge.add_argument("embeddings", help="the embeddings directory (plada-send embed --out)")
    merge.add_argument(
        "--from", dest="sources", nargs="*", default=[], help="other machines' embeddings dirs"
    )
    merge.add_argument("--int8", action="store_true", help="also write an int8 copy")
    merge.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from sender.embedding.store import merge_embeddings

    merged = merge_embeddings(args.embeddings, args.sources, int8=args.int8)
    print(
        f"merged {merged.n} x {merged.dim} embeddings into {args.embeddings} "
        f"({merged.valid} readable, {merged.skipped} skipped"
        f"{', int8 copy' if merged.int8 else ''}); {merged.thumbnails.describe()}"
    )
    return 0


def add_index(sub: Subparsers) -> None:
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
    idx.set_defaults(func=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from sender.embedding.index import index_store

    built = index_store(
        args.embeddings, parse_bytes(args.memory_budget), args.kind, args.out, not args.quiet
    )
    detail = ", ".join(f"{k}={v}" for k, v in built.layout.items())
    print(f"index {built.path}: {built.vectors} vectors ({detail}) in {built.seconds:.1f}s")
    return 0


def add_world_clip(sub: Subparsers) -> None:
    clip = sub.add_parser(
        "world-clip",
        help="the embedded glyph world's own CLIP (trained once per cache, no download)",
    )
    add_reference_options(clip)
    clip.add_argument(
        "--samples", type=int, default=160_000, help="training images seen (the recipe's size)"
    )
    clip.add_argument("--quiet", action="store_true", help="no progress bar")
    clip.set_defaults(func=_run_world_clip)


def _run_world_clip(args: argparse.Namespace) -> int:
    from protocol.reference.glyph_pool import GlyphPool
    from protocol.world.glyphs import default_cache_dir
    from sender.embedding.world_clip import WorldClipRecipe, world_clip

    if not args.reference.startswith("glyphs"):
        raise ConfigError(
            "world-clip trains on the embedded glyph world only (--reference glyphs...); "
            "for another reference set, pass your own open_clip weights to embed"
        )
    if args.samples < 1:
        raise ConfigError("--samples must be positive")
    pool = reference_location(args).open()
    assert isinstance(pool, GlyphPool)
    cache = args.cache_dir or default_cache_dir()
    found = world_clip(pool, cache, WorldClipRecipe(samples=args.samples), not args.quiet)
    print(f"world CLIP {found.fingerprint[:16]} (weights sha256 {found.weights_sha256[:16]}...)")
    print(f"--clip-model {found.config} --clip-weights {found.weights}")
    return 0
