"""Streaming scorer, linear-time selection, the embeddings store and the FAISS index."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ConfigError, ReferenceSetError
from sender.embedding.store import (
    EmbeddingStore,
    StoreMeta,
    create_store_meta,
    merge_parts,
    parse_shard,
    parts_of_shard,
    write_part,
)
from sender.scoring.embedding_teachers import KnnTeacher, train_probe
from sender.scoring.scores import energy, entropy, l2_normalize
from sender.scoring.stream import LinearHead, StreamOptions, score_chunks
from sender.selection.strategies import SelectionConfig, class_quotas, select


def make_store(root, embeddings: np.ndarray, part_rows: int = 64, int8: bool = False):
    """A merged store written through the production part writer and merge."""
    meta = StoreMeta("test", "none", embeddings.shape[1], embeddings.shape[0], part_rows, "r", "00")
    create_store_meta(root, meta)
    for part in range(meta.num_parts):
        start, stop = meta.part_range(part)
        write_part(root, part, embeddings[start:stop], np.ones(stop - start, bool))
    merge_parts(root, int8=int8)
    return EmbeddingStore(root)


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(8, dim))
    return l2_normalize(centers[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, dim)))


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_streamed_scores_match_in_memory(tmp_path, chunk_rows) -> None:
    x = clustered(500, 24)
    store = make_store(tmp_path, x)
    rng = np.random.default_rng(1)
    head = LinearHead(rng.normal(size=(13, 24)) * 20, rng.normal(size=13))  # 13: padded to 16
    out = score_chunks(
        store.iter_chunks(chunk_rows),
        store.n,
        head,
        StreamOptions(temperature=2.0, chunk_rows=chunk_rows, progress=False),
    )
    logits = head.logits(store.read_rows(np.arange(500)))
    assert np.array_equal(out.predicted, logits.argmax(1))
    assert np.allclose(out.energy, energy(logits, 2.0), atol=1e-4)
    assert np.allclose(out.entropy, entropy(logits / 2.0), atol=1e-4)


def test_int8_copy_scores_like_fp16(tmp_path) -> None:
    x = clustered(400, 32)
    store = make_store(tmp_path, x, int8=True)
    head = LinearHead(np.random.default_rng(2).normal(size=(5, 32)) * 10, np.zeros(5))
    quiet = StreamOptions(progress=False)
    f16 = score_chunks(store.iter_chunks(100), store.n, head, quiet)
    i8 = score_chunks(store.iter_chunks(100, "i8"), store.n, head, quiet)
    assert np.mean(f16.predicted == i8.predicted) > 0.97
    assert np.corrcoef(f16.energy, i8.energy)[0, 1] > 0.999


def test_knn_teacher_streams_like_its_in_memory_logits(tmp_path) -> None:
    x = clustered(300, 16)
    task = clustered(40, 16, seed=5)
    labels = np.arange(40) % 4
    teacher = KnnTeacher(task, labels, 4, k=3, max_block_floats=100)  # forces sub-blocks
    store = make_store(tmp_path, x)
    out = score_chunks(store.iter_chunks(64), store.n, teacher, StreamOptions(progress=False))
    sims = store.read_rows(np.arange(300)) @ task.T
    expected = (
        np.stack([np.sort(sims[:, labels == c], axis=1)[:, -3:].mean(1) for c in range(4)], axis=1)
        / 0.07
    )
    assert np.allclose(teacher.logits_numpy(store.read_rows(np.arange(300))), expected, atol=1e-4)
    assert np.array_equal(out.predicted, expected.argmax(1))


def test_probe_separates_separable_classes() -> None:
    rng = np.random.default_rng(3)
    centers = l2_normalize(rng.normal(size=(3, 16)))
    labels = np.repeat(np.arange(3), 30)
    x = l2_normalize(centers[labels] + 0.2 * rng.normal(size=(90, 16)))
    head = train_probe(x, labels, 3)
    assert np.mean(head.logits(x).argmax(1) == labels) > 0.95


def _stable_sort_select(scores, predicted, k, config):
    """The definition the linear-time selection must reproduce (full stable sort)."""
    n = scores.size
    budget = max(1, round(config.keep * n))
    order = np.argsort(scores, kind="stable")
    if config.strategy == "lowest":
        return np.sort(order[:budget])
    quotas = class_quotas(
        np.bincount(predicted, minlength=k), round(config.reserve * budget), config.alpha
    )
    kept = np.zeros(n, bool)
    for c in np.flatnonzero(quotas):
        kept[order[predicted[order] == c][: quotas[c]]] = True
    remaining = budget - kept.sum()
    if remaining > 0:
        kept[order[~kept[order]][:remaining]] = True
    return np.flatnonzero(kept)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 300),
    st.integers(2, 8),
    st.integers(0, 2**31),
    st.floats(0.005, 1.0),
    st.floats(-1, 1),
    st.floats(0, 1),
    st.sampled_from(["lowest", "safety-net"]),
)
def test_linear_selection_equals_stable_sort(n, k, seed, keep, alpha, reserve, strategy) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, n).astype(np.float32)  # many ties
    predicted = rng.integers(0, k, n).astype(np.int32)
    config = SelectionConfig(strategy, keep=keep, alpha=alpha, reserve=reserve)
    assert np.array_equal(
        select(scores, predicted, k, config), _stable_sort_select(scores, predicted, k, config)
    )


def test_excluded_images_are_never_kept() -> None:
    scores = np.arange(100, dtype=np.float32)
    predicted = np.zeros(100, np.int32)
    excluded = np.array([0, 1, 2, 97, 98, 99])
    for strategy in ("lowest", "inverse", "safety-net"):
        kept = select(scores, predicted, 1, SelectionConfig(strategy, keep=0.1), excluded)
        assert kept.size == 10 and not np.intersect1d(kept, excluded).size
    with pytest.raises(ConfigError, match="auto"):
        select(scores, predicted, 1, SelectionConfig("auto"))


def test_store_guards(tmp_path) -> None:
    store = make_store(tmp_path / "a", clustered(100, 8), part_rows=30)
    assert store.meta.num_parts == 4 and parse_shard("1/3") == (1, 3)
    slices = [p for i in range(3) for p in parts_of_shard(store.meta, (i, 3))]
    assert slices == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="i/N"):
        parse_shard("2")
    with pytest.raises(ConfigError, match="something else"):
        create_store_meta(tmp_path / "a", StoreMeta("other", "none", 8, 100, 30, "r", "00"))
    (tmp_path / "a" / "parts" / "part-000002.npz").unlink()
    with pytest.raises(ReferenceSetError, match="1 of 4 parts are missing"):
        merge_parts(tmp_path / "a")
    with open(tmp_path / "a" / "embeddings.f16", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ConfigError, match="merge again"):
        EmbeddingStore(tmp_path / "a")


def test_ivfpq_index_under_budget_finds_planted_duplicates(tmp_path) -> None:
    from sender.embedding.index import build_store_index, choose_index
    from sender.scoring.work_dir import LeakageCandidates

    x = clustered(6000, 32, seed=4)
    store = make_store(tmp_path, x, part_rows=2048)
    budget = 6000 * 32 * 4 // 3  # flat would not fit
    assert choose_index(6000, 32, budget)["kind"] == "ivfpq"
    index, plan = build_store_index(store, budget, progress=False)
    assert plan["kind"] == "ivfpq" and index.ntotal == 6000
    planted = np.array([17, 2500, 5999])
    queries = np.concatenate([store.read_rows(planted), clustered(5, 32, seed=9)])
    candidates = LeakageCandidates.find(index, queries, exact=store.read_rows)
    found, hits = candidates.duplicates(0.999)
    assert found.tolist() == planted.tolist() and hits == 3
    with pytest.raises(ReferenceSetError, match="memory-budget"):
        choose_index(10**9, 512, 10**6)


LOAD_AND_MEASURE = """
import sys
from pathlib import Path

from sender.embedding.index import load_index


def anon_mb():
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


before = anon_mb()
index = load_index(sys.argv[1])
print(anon_mb() - before, index.ntotal)
"""


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_loaded_index_is_memory_mapped_and_searches_alike(tmp_path, kind) -> None:
    """The store's index is searched from the file (the page cache), not copied into the
    process: loading it, in a fresh process, adds next to nothing to its own memory."""
    import subprocess
    import sys

    from sender.embedding.index import build_store_index, load_index, save_index

    # a file over 8 MB either way; IVF-PQ at 16 bytes a row (24 with its id), whose
    # sub-quantizers train in seconds, where the largest that fits (64) takes a minute
    n, dim, nlist = (150_000 if kind == "flat" else 400_000), 64, 64
    store = make_store(tmp_path / "store", clustered(n, dim, seed=5), part_rows=65_536)
    budget = n * dim * 8 if kind == "flat" else n * (16 + 8) + nlist * dim * 4
    index, plan = build_store_index(store, budget, progress=False, nlist=nlist)
    assert plan["kind"] == kind and plan.get("m", 16) == 16
    path = tmp_path / "reference.faiss"
    save_index(index, path)
    measured = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(path)], capture_output=True, text=True
    )
    assert measured.returncode == 0, measured.stderr
    grew, rows = measured.stdout.split()
    size_mb = path.stat().st_size / 2**20
    assert int(rows) == n and size_mb > 8 and float(grew) < size_mb / 4, (grew, size_mb)
    queries = store.read_rows(np.arange(0, n, 997)).astype(np.float32)
    assert np.array_equal(load_index(path).search(queries, 5)[1], index.search(queries, 5)[1])
    with open(path, "r+b") as handle:  # a copy cut short is a typed error naming the fix
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(ReferenceSetError, match=r"damaged or truncated.*plada-send index"):
        load_index(path)


def test_nearest_similarity_in_blocks_is_the_whole_product(monkeypatch) -> None:
    """The domain gap's nearest similarities, a bounded block of queries at a time, are
    those of the whole query x sample product (and none for no queries)."""
    from sender.scoring import domain_gap

    pool, queries = clustered(500, 16, seed=1), clustered(300, 16, seed=2)
    whole = (queries.astype(np.float32) @ pool.astype(np.float32).T).max(axis=1)
    monkeypatch.setattr(domain_gap, "SIMILARITY_BLOCK_ENTRIES", 500 * 7)  # blocks of 7
    blocked = domain_gap._nearest_similarity(queries, pool)
    assert blocked.shape == (300,) and np.allclose(blocked, whole, atol=1e-5)
    assert domain_gap._nearest_similarity(queries[:0], pool).shape == (0,)


def test_domain_gap_tells_far_from_near() -> None:
    from sender.scoring.domain_gap import measure_domain_gap

    reference = clustered(3000, 16)
    near = clustered(200, 16, seed=0)[::-1].copy()
    far = l2_normalize(np.random.default_rng(7).normal(size=(200, 16)))
    in_domain = measure_domain_gap(reference[:2500], reference[2500:], near)
    far_ood = measure_domain_gap(reference[:2500], reference[2500:], far)
    assert in_domain.strategy == "safety-net" and in_domain.outlier_fraction < 0.1
    assert far_ood.strategy == "inverse" and far_ood.outlier_fraction > 0.9
    assert "far out of domain" in far_ood.reason


def test_scoring_leaves_denormals_as_it_found_them(tmp_path) -> None:
    store = make_store(tmp_path, clustered(50, 8))
    head = LinearHead(np.ones((2, 8), np.float32), np.zeros(2, np.float32))
    score_chunks(store.iter_chunks(16), store.n, head, StreamOptions(progress=False))
    assert torch.tensor([1e-40], dtype=torch.float32).item() != 0.0  # not flushed to zero


def test_full_disk_is_a_storage_error_and_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    import errno

    from protocol.errors import StorageError
    from sender.embedding import store as embedding_store

    x = clustered(40, 8)
    meta = StoreMeta("test", "none", 8, 40, 20, "r", "00")
    create_store_meta(tmp_path, meta)
    write_part(tmp_path, 0, x[:20], np.ones(20, bool))

    def full(handle, **arrays):  # the atomic writer's temporary file
        handle.write(b"half a part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedding_store.np, "savez", full)
    with pytest.raises(StorageError, match=r"No space left on device.*rerun"):
        write_part(tmp_path, 1, x[20:], np.ones(20, bool))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-000000.npz"]
    assert embedding_store.read_part(tmp_path, 0, meta) is not None


def test_consensus_drops_planted_mislabels_only() -> None:
    from sender.selection.consensus import consensus_outliers

    rng = np.random.default_rng(11)
    centers = l2_normalize(rng.normal(size=(3, 16)))
    labels = np.repeat(np.arange(3), 40)
    x = l2_normalize(centers[labels] + 0.15 * rng.normal(size=(120, 16)))
    noisy = labels.copy()
    planted = np.array([3, 50, 97])
    noisy[planted] = (labels[planted] + 1) % 3
    assert np.flatnonzero(consensus_outliers(x, noisy, k=8)).tolist() == planted.tolist()
    assert not consensus_outliers(x, labels, k=8).any()
