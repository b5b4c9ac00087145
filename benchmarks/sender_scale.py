"""Sender at ImageNet-21K scale: stream-score and select n x 512 fp16 embeddings.

Writes a synthetic embeddings directory in plada's on-disk format (clustered unit
vectors, n = 14.2M by default: 14.5 GB), then for each class count k runs the real
scoring pass (``sender.scoring.stream`` over ``EmbeddingStore``), with ``--knn`` the
real kNN relevance (10 labeled task images per class searching the store's IVF-PQ
index, ``sender.scoring.stream_knn``; the index is built once, like the embeddings), and the
real selection (safety-net, 1%) in a fresh process, and prints wall time, rows/s, peak
resident memory and the ratio to two floors measured in the same run:

- read floor: the file's size over its sequential read bandwidth (warm page cache);
- GEMM floor: 2 n d k FLOP over this machine's fp32 GEMM rate (torch, all cores).

A naive baseline (numpy memmap + ``astype`` + numpy matmul + scipy logsumexp, the
obvious implementation) runs on a slice and is extrapolated to n.

    python -m benchmarks.sender_scale [--n 14200000] [--work work/scale] [--k 10 100 365] [--knn]

``--plan`` times ``plada-send plan`` on the store instead (``sender.selection.embedding_plan``,
in a fresh process per k): a work directory scored by a probe-like head is written first
(untimed, in a process of its own, as ``score --embeddings`` would leave it, with the
folder layout of ImageNet-21K's synsets); then a fresh process plans: it opens it, fits the
split teacher on the task's embeddings (10 labeled images per class), streams it over
every row with kNN relevance through the index, and measures the whole default grid of
candidates (payload sizes from the full work directory, proxies on thumbnails) within
the plan's default byte budget (1 MiB, what a receiver takes in by default; at 14.2M rows
the 5% and 10% payloads are over it: sized, not trained on; ``--plan-max-bytes`` raises
it). The
store's thumbnails are a sparse file of the production layout (32x32 RGB: 43.6 GB at
14.2M rows, taking no disk; every row reads as black, with its CRC-32 recorded), so the
proxy's reads come from the page cache and the number is the plan's compute, not a
disk's seek rate. Memory is given two ways: the plan process's peak resident set
(VmHWM, which also counts the pages of the memory-mapped store and index that it
touched) and its peak private memory (its anonymous pages plus its proxy workers'
proportional share, sampled).

    python -m benchmarks.sender_scale --plan --k 365
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from protocol.payload import RECEIVER_DEFAULT_MAX_BYTES

DIM = 512
CENTERS = 4096


def _store_is_ready(root: Path, n: int) -> bool:
    from sender.embedding.store import F16_FILE, StoreMeta

    try:
        meta = StoreMeta.load(root)
    except Exception:
        return False
    return meta.n == n and (root / F16_FILE).stat().st_size == n * DIM * 2


def write_synthetic_store(root: Path, n: int, seed: int = 0) -> float:
    """Clustered unit vectors in the embeddings-directory format; returns seconds."""
    import torch
    from tqdm import tqdm

    from protocol.atomic_files import write_json_atomic
    from sender.embedding.store import F16_FILE, VALID_FILE, StoreMeta

    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(CENTERS, DIM, generator=gen), dim=1)
    chunk = 65536
    with open(root / (F16_FILE + ".tmp"), "wb") as handle:
        for start in tqdm(range(0, n, chunk), desc="writing embeddings", unit="chunk"):
            rows = min(chunk, n - start)
            which = torch.randint(0, CENTERS, (rows,), generator=gen)
            x = centers[which] + torch.randn(rows, DIM, generator=gen) * (0.8 / DIM**0.5)
            x = torch.nn.functional.normalize(x, dim=1).half()
            handle.write(x.numpy().tobytes())
    os.replace(root / (F16_FILE + ".tmp"), root / F16_FILE)
    np.save(root / VALID_FILE, np.ones(n, dtype=bool))
    meta = StoreMeta(
        model="synthetic",
        pretrained="none",
        dim=DIM,
        n=n,
        part_rows=65536,
        reference_name="synthetic-21k",
        reference_fingerprint="00" * 32,
    )
    from dataclasses import asdict

    write_json_atomic(root / "meta.json", asdict(meta))
    return time.perf_counter() - started


def measure_read_bandwidth(path: Path) -> float:
    """Bytes/s of a sequential readinto pass over the file (second pass: warm cache)."""
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    best = 0.0
    for _ in range(2):
        started = time.perf_counter()
        total = 0
        with open(path, "rb", buffering=0) as handle:
            while got := handle.readinto(view):
                total += got
        best = max(best, total / (time.perf_counter() - started))
    return best


def measure_gemm_flops(k: int) -> float:
    """Best fp32 FLOP/s of torch GEMMs shaped like the scoring pass, and a square one."""
    import torch

    best = 0.0
    for rows, inner, cols in ((8192, DIM, max(k, 8)), (2048, 2048, 2048)):
        a, b = torch.randn(rows, inner), torch.randn(inner, cols)
        out = torch.empty(rows, cols)
        torch.mm(a, b, out=out)
        repeats = max(3, int(2e10 / (2 * rows * inner * cols)))
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        best = max(best, 2 * rows * inner * cols * repeats / (time.perf_counter() - started))
    return best


def _head(k: int, seed: int = 1):
    from sender.scoring.stream import LinearHead

    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(k, DIM)).astype(np.float32)
    weight *= 30.0 / np.linalg.norm(weight, axis=1, keepdims=True)  # a probe's logit scale
    return LinearHead(weight, np.zeros(k, dtype=np.float32))


def status_mb(field: str) -> float | None:
    """A memory field of this process's /proc status (``VmHWM``, ``RssAnon``) in MiB;
    None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss survives exec on Linux)."""
    peak = status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TreeMemory:
    """The plan's own memory, sampled while it runs: this process's anonymous pages plus
    its proxy workers' proportional share (PSS). File-backed pages (the memory-mapped
    store and index, which the page cache holds and can drop) are not counted; VmHWM
    (:func:`peak_rss_mb`) counts them, for this process alone."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.every_s, self.peak_mb = every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            anon = status_mb("RssAnon") or 0.0
            workers = 0.0
            for child in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):  # ended between listing and reading
                    workers += child.memory_full_info().pss / 2**20
            self.peak_mb = max(self.peak_mb, anon + workers)
            self._stop.wait(self.every_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


TASK_PER_CLASS = 10  # labeled task images per class searching the index (kNN relevance)


def task_queries(store, head, k: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A labeled task: perturbed stored rows, labelled by the head (10 per class seen)."""
    from sender.scoring.scores import l2_normalize

    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.n, 40 * k * TASK_PER_CLASS, replace=False))
    # read, not memory-mapped: the map's readahead would count much of the file as this
    # process's resident memory, which a real task (CLIP-embedded) never has
    stored = store.read_rows(rows)
    x = l2_normalize(stored + rng.normal(0, 0.02, (rows.size, DIM)))
    labels = head.logits(x).argmax(1)
    picked = np.concatenate([np.flatnonzero(labels == c)[:TASK_PER_CLASS] for c in range(k)])
    return x[picked], labels[picked]


def child_ours(
    store_dir: str, k: int, chunk_rows: int, source: str, index_path: str | None = None
) -> dict[str, float]:
    """Score (+ kNN relevance through the index) + select in this (fresh) process;
    report times and peak memory."""
    import torch

    from sender.embedding.index import load_index
    from sender.embedding.store import EmbeddingStore
    from sender.scoring.stream import StreamOptions, score_chunks
    from sender.scoring.stream_knn import stream_knn_relevance
    from sender.selection.strategies import SelectionConfig, select

    torch.set_num_threads(os.cpu_count() or 1)
    store = EmbeddingStore(store_dir)
    started = time.perf_counter()
    scores = score_chunks(
        store.iter_chunks(chunk_rows, source),
        store.n,
        _head(k),
        StreamOptions(chunk_rows=chunk_rows, progress=False),
    )
    score_s = time.perf_counter() - started
    values, knn = scores.energy, {}
    if index_path:  # the task's embeddings exist before scoring: not timed
        queries, labels = task_queries(store, _head(k), k)
        relevance, stats = stream_knn_relevance(
            load_index(index_path), queries, labels, scores.predicted, scores.energy
        )
        values, covering = relevance.scores, time.perf_counter()
        relevance.cover()  # the cover score, read off the same search (written beside knn)
        stats["cover_seconds"] = time.perf_counter() - covering
        knn = {f"knn_{key}": value for key, value in stats.items()}
    selecting = time.perf_counter()
    kept = select(values, scores.predicted, k, SelectionConfig(keep=0.01))
    select_s = time.perf_counter() - selecting
    knn_s = knn.get("knn_seconds", 0.0)
    return {
        "score_s": score_s,
        "knn_s": knn_s,
        "select_s": select_s,
        "wall_s": score_s + knn_s + select_s,
        "kept": int(kept.size),
        "peak_rss_mb": peak_rss_mb(),
        **knn,
    }


def child_naive(store_dir: str, k: int, rows: int) -> dict[str, float]:
    """The obvious implementation on the first ``rows`` rows (numpy/scipy only)."""
    from scipy.special import logsumexp

    from sender.embedding.store import F16_FILE

    head = _head(k)
    mapped = np.memmap(Path(store_dir) / F16_FILE, dtype=np.float16, mode="r").reshape(-1, DIM)
    started = time.perf_counter()
    x = mapped[:rows].astype(np.float32)
    logits = x @ head.weight.T + head.bias
    energy = -logsumexp(logits, axis=1)
    predicted = logits.argmax(axis=1)
    seconds = time.perf_counter() - started
    assert energy.shape == predicted.shape == (rows,)
    return {"wall_s": seconds, "rows": rows}


THUMBNAIL_SIDE = 32


def write_sparse_thumbnails(root: Path, n: int, side: int = THUMBNAIL_SIDE) -> None:
    """Thumbnails of the production layout as a sparse file (black rows, real CRCs)."""
    import zlib

    from sender.embedding.thumbnails import (
        THUMBNAILS_CRC_FILE,
        THUMBNAILS_FILE,
        ThumbnailsMeta,
    )

    meta = ThumbnailsMeta(side, n, "00" * 32)
    with open(root / THUMBNAILS_FILE, "wb") as handle:
        handle.truncate(n * meta.row_bytes)
    crc = np.full(n, zlib.crc32(bytes(meta.row_bytes)), dtype="<u4")
    crc.tofile(root / THUMBNAILS_CRC_FILE)
    meta.write(root)


IMAGENET21K_FOLDERS = 21_841  # synsets of the fall 2011 release, one folder each


def folder_starts(n: int, folders: int = IMAGENET21K_FOLDERS, seed: int = 4) -> np.ndarray:
    """A reference layout of ``folders`` class folders (log-normal sizes, ~n/folders rows
    each) as a real store's manifest records it: each folder's first row, then ``n``. The
    payload coder tries it beside the largest fixed blocks, as for a real ImageFolder."""
    sizes = np.random.default_rng(seed).lognormal(0.0, 0.5, folders)
    ends = np.round(np.cumsum(sizes) / sizes.sum() * n).astype(np.int64)
    return np.unique(np.concatenate([[0], ends]))


def write_scored_work(store, work: Path, k: int, index_path: str) -> dict[str, object]:
    """The work directory ``score --embeddings`` would write for a k-class task, scored by
    a probe-like head; returns the task (embeddings, labels) the plan is given."""
    from sender.embedding.index import load_index
    from sender.scoring.embeddings import EmbeddedSplit, StreamScoring, score_store
    from sender.scoring.teacher_kinds import EMBEDDINGS
    from sender.scoring.work_dir import SCORES_FILE, ScoreReport, ScoresFile, TeacherSummary

    head = _head(k)
    queries, labels = task_queries(store, head, k)
    names = tuple(f"class-{c}" for c in range(k))
    task = EmbeddedSplit(queries, labels, names)
    scored = score_store(store, load_index(index_path), head, task, StreamScoring(progress=False))
    work.mkdir(parents=True, exist_ok=True)
    ScoresFile(
        scores=scored.scores,
        predicted=scored.predicted,
        class_names=names,
        reference_name=store.meta.reference_name,
        reference_fingerprint=bytes.fromhex(store.meta.reference_fingerprint),
        reference_size=store.n,
        task=f"synthetic-{k}",
        recommended_strategy="safety-net",
        reference_block_starts=folder_starts(store.n),
        excluded=np.zeros(0, np.int64),
        embeddings_dir=os.path.relpath(store.root.resolve(), work.resolve()),
        leakage=None,
    ).write(work / SCORES_FILE)
    teacher = TeacherSummary("probe", int(labels.size), None, {"temperature": 1.0, "knn_k": 5})
    ScoreReport(
        path=EMBEDDINGS,
        task=f"synthetic-{k}",
        classes=list(names),
        reference={"name": store.meta.reference_name, "size": store.n},
        embedder="synthetic",
        duplicate_check_embedder="synthetic",
        teacher=teacher,
        domain_gap=None,
        recommended_strategy="safety-net",
        predicted_histogram=[],
        scoring_seconds=scored.stream.seconds,
        scoring_images_per_second=scored.stream.rows_per_second,
        knn_relevance=scored.knn,
        total_seconds=scored.stream.seconds,
    ).write(work)
    return {"embeddings": queries, "labels": labels, "names": names}


PLAN_TASK_FILE = "plan-task.npz"  # the task the plan is given, beside its work directory


def plan_work_dir(store_dir: str, k: int) -> Path:
    """The k-class task's scored work directory, beside the store."""
    return Path(store_dir).parent / f"plan-work-k{k}"


def child_plan_work(store_dir: str, k: int, index_path: str) -> dict[str, float]:
    """The scored work directory and the task's embeddings, in a process of their own
    (as ``plada-send score`` runs before ``plada-send plan``), so that the plan's
    process holds nothing of the scoring pass before it starts."""
    from sender.embedding.store import EmbeddingStore

    started = time.perf_counter()
    work = plan_work_dir(store_dir, k)
    task = write_scored_work(EmbeddingStore(store_dir), work, k, index_path)
    names = np.asarray(task["names"], dtype=str)
    np.savez(
        work / PLAN_TASK_FILE, embeddings=task["embeddings"], labels=task["labels"], names=names
    )
    return {"score_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def child_plan(store_dir: str, k: int, index_path: str, max_bytes: int) -> dict[str, float]:
    """The plan on the scored work directory, timed, in this (fresh) process, measuring
    the candidates within ``max_bytes``."""
    import torch

    from sender.scoring.embeddings import EmbeddedSplit
    from sender.selection.embedding_plan import PlannedStore, plan_from_embeddings
    from sender.selection.plan import PlanSettings
    from sender.selection.plan_file import OVER_BUDGET

    torch.set_num_threads(os.cpu_count() or 1)
    work = plan_work_dir(store_dir, k)
    with np.load(work / PLAN_TASK_FILE) as task:
        embeddings, labels = task["embeddings"], task["labels"]
        names = tuple(str(name) for name in task["names"])
    thumbnails = np.random.default_rng(3).integers(
        0, 256, (labels.size, 3, THUMBNAIL_SIDE, THUMBNAIL_SIDE), dtype=np.uint8
    )
    split = EmbeddedSplit(embeddings, labels, names, thumbnails)
    baseline = peak_rss_mb()
    started = time.perf_counter()
    with TreeMemory() as memory:
        planned = PlannedStore.open(work)
        settings = PlanSettings(max_bytes=max_bytes)
        plan = plan_from_embeddings(planned, split, work / "plan", settings, progress=False)
    seconds = time.perf_counter() - started
    confirmed = sum(row.stage in ("confirm", "final") for row in plan.candidates)
    return {
        "wall_s": seconds,
        "candidates": len(plan.candidates),
        "over_budget": sum(row.stage == OVER_BUDGET for row in plan.candidates),
        "max_bytes": max_bytes,
        "confirmed": confirmed,
        "splits": 1 + len(plan.more_splits),
        "finalists": plan.noise.finalists if plan.noise is not None else 0,
        "peak_rss_mb": peak_rss_mb(),
        "peak_private_mb": memory.peak_mb,
        "rss_before_plan_mb": baseline,
        "chosen": plan.chosen,
    }


def build_scale_index(root: Path, nlist: int) -> Path:
    """The production IVF-PQ index over the store (built once, kept beside it)."""
    from sender.embedding.index import INDEX_FILE, build_store_index, save_index
    from sender.embedding.store import EmbeddingStore

    started = time.perf_counter()
    index, plan = build_store_index(EmbeddingStore(root), 2 << 30, kind="ivfpq", nlist=nlist)
    save_index(index, root / INDEX_FILE)
    print(f"index {plan} built in {time.perf_counter() - started:.0f}s")
    return root / INDEX_FILE


def _run_child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.sender_scale", "--child", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=14_200_000)
    parser.add_argument("--work", default="work/scale")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100, 365])
    parser.add_argument("--chunk-rows", type=int, default=8192)
    parser.add_argument("--source", choices=["f16", "i8"], default="f16")
    parser.add_argument("--naive-rows", type=int, default=500_000)
    parser.add_argument(
        "--knn", action="store_true", help="also kNN relevance through an IVF-PQ index"
    )
    parser.add_argument("--nlist", type=int, default=1024, help="the index's IVF lists")
    parser.add_argument(
        "--plan", action="store_true", help="time plada-send plan on the store (see above)"
    )
    parser.add_argument(
        "--plan-max-bytes",
        type=int,
        default=RECEIVER_DEFAULT_MAX_BYTES,
        help="the plan's byte budget (default: plada-send plan's, 1 MiB)",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, store, k, extra = args.child[0], args.child[1], int(args.child[2]), args.child[3]
        if kind == "plan":
            result = child_plan(store, k, extra, int(args.child[4]))
        elif kind == "plan-work":
            result = child_plan_work(store, k, extra)
        elif kind == "ours":
            index = args.child[4] if len(args.child) > 4 else None
            result = child_ours(store, k, args.chunk_rows, extra, index)
        else:
            result = child_naive(store, k, int(extra))
        print(json.dumps(result))
        return 0

    root = Path(args.work) / f"n{args.n}"
    if _store_is_ready(root, args.n):
        print(f"reusing {root}")
    else:
        print(f"writing {args.n} x {DIM} fp16 to {root} ({args.n * DIM * 2 / 1e9:.1f} GB) ...")
        print(f"  written in {write_synthetic_store(root, args.n):.1f}s")
    f16 = root / "embeddings.f16"
    if args.source == "i8" and not (root / "embeddings.i8").is_file():
        parser.error("--source i8 needs the int8 copy (not written for synthetic data)")
    bandwidth = measure_read_bandwidth(f16)
    file_bytes = f16.stat().st_size
    read_floor = file_bytes / bandwidth
    print(f"read bandwidth (warm): {bandwidth / 1e9:.2f} GB/s -> read floor {read_floor:.1f}s")
    index_path = root / "reference.faiss"
    if (args.knn or args.plan) and not index_path.is_file():
        index_path = build_scale_index(root, args.nlist)
    if args.plan:
        return plan_mode(root, args, str(index_path))
    rows = []
    for k in args.k:
        flops = measure_gemm_flops(k)
        gemm_floor = 2 * args.n * DIM * k / flops
        extra = [str(index_path)] if args.knn else []
        ours = _run_child(["ours", str(root), str(k), args.source, *extra])
        naive = _run_child(["naive", str(root), str(k), str(min(args.naive_rows, args.n))])
        naive_full = naive["wall_s"] * args.n / naive["rows"]
        floor = max(read_floor, gemm_floor)
        rows.append(
            {
                "k": k,
                "n": args.n,
                **ours,
                "rows_per_s": args.n / ours["score_s"],
                "gemm_gflops": flops / 1e9,
                "gemm_floor_s": gemm_floor,
                "read_floor_s": read_floor,
                "ratio_to_floor": ours["wall_s"] / floor,
                "naive_extrapolated_s": naive_full,
            }
        )
    header = (
        f"{'k':>4} {'score s':>8} {'kNN s':>6} {'select s':>8} {'total s':>8} {'Mrows/s':>8} "
        f"{'peak MB':>8} {'read fl.':>8} {'GEMM fl.':>8} {'x floor':>7} {'naive s':>8}"
    )
    print(f"\nn = {args.n:,} x {DIM} fp16, {os.cpu_count()} cores, keep 1% safety-net")
    print(header)
    for r in rows:
        print(
            f"{r['k']:>4} {r['score_s']:>8.1f} {r['knn_s']:>6.1f} {r['select_s']:>8.1f} "
            f"{r['wall_s']:>8.1f} "
            f"{r['rows_per_s'] / 1e6:>8.2f} {r['peak_rss_mb']:>8.0f} {r['read_floor_s']:>8.1f} "
            f"{r['gemm_floor_s']:>8.1f} {r['ratio_to_floor']:>7.2f} "
            f"{r['naive_extrapolated_s']:>8.0f}"
        )
    print("x floor = total / max(read floor, GEMM floor); naive = numpy/scipy, extrapolated")
    for r in rows:
        if "knn_depth" in r:
            print(
                f"k={r['k']}: kNN relevance from {r['knn_task_images']} task images x "
                f"{r['knn_depth']} neighbours (nprobe {r['knn_nprobe']}): "
                f"{r['knn_candidates']:,} candidates, search {r['knn_search_seconds']:.1f}s, "
                f"cover order {r['knn_cover_seconds']:.1f}s"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def plan_mode(root: Path, args: argparse.Namespace, index_path: str) -> int:
    """The plan's wall time and peak memory per k (budget: 10 minutes, 4 GB at k=365)."""
    from sender.embedding.thumbnails import THUMBNAILS_META_FILE

    if not (root / THUMBNAILS_META_FILE).is_file():
        write_sparse_thumbnails(root, args.n)
    rows = []
    for k in args.k:  # the work directory scored, then the plan in a fresh process
        scored = _run_child(["plan-work", str(root), str(k), index_path])
        plan = _run_child(["plan", str(root), str(k), index_path, str(args.plan_max_bytes)])
        rows.append({"k": k, **plan, "scoring_peak_rss_mb": scored["peak_rss_mb"]})
    print(
        f"\nplan on n = {args.n:,} x {DIM} fp16 + {THUMBNAIL_SIDE}px thumbnails, "
        f"{os.cpu_count()} cores, default grid, byte budget {args.plan_max_bytes:,}"
    )
    print(
        f"{'k':>4} {'candidates':>10} {'over budget':>11} {'confirmed':>9} {'splits':>6} "
        f"{'finalists':>9} {'plan s':>7} {'peak MB':>8} {'private MB':>10}  chosen"
    )
    for r in rows:
        print(
            f"{r['k']:>4} {r['candidates']:>10} {r['over_budget']:>11} {r['confirmed']:>9} "
            f"{r['splits']:>6} "
            f"{r['finalists']:>9} {r['wall_s']:>7.0f} {r['peak_rss_mb']:>8.0f} "
            f"{r['peak_private_mb']:>10.0f}  {r['chosen']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
