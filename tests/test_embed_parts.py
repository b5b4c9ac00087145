"""The embedding plan and part collector every engine shares: batches cut at part starts,
parts written once all their rows are in, whatever order batches arrive in."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ReferenceSetError
from sender.embedding.engine import EmbedPlan, PartCollector
from sender.embedding.store import StoreMeta, read_part
from sender.embedding.thumbnails import read_thumbnail_part, thumbnail_part_size


def plan_of(
    root, n: int, part_rows: int, pending: list[int] | None = None, thumbnails: int = 0
) -> EmbedPlan:
    meta = StoreMeta("m", "w", 4, n, part_rows, "ref", "00" * 32)
    parts = list(range(meta.num_parts))
    return EmbedPlan(root, meta, parts, parts if pending is None else pending, thumbnails)


def embeddings_of(rows: np.ndarray) -> np.ndarray:
    return np.stack([rows * 0.5, rows + 1.0, -rows * 0.25, np.ones(rows.size)], 1)


def thumbnails_of(rows: np.ndarray, size: int) -> np.ndarray:
    """A thumbnail per row whose every pixel names the row (mod 256) and the channel."""
    pixels = (rows[:, None, None, None] * 3 + np.arange(3)[None, :, None, None]) % 256
    return np.broadcast_to(pixels, (rows.size, 3, size, size)).astype(np.uint8)


def batch_of(rows: np.ndarray, size: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    return embeddings_of(rows), (thumbnails_of(rows, size) if size else None)


@given(
    n=st.integers(1, 60),
    part_rows=st.integers(1, 17),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    thumbnails=st.sampled_from([0, 2]),
)
@settings(max_examples=60, deadline=None)
def test_batches_cover_the_pending_parts_once_and_never_straddle_a_part(
    tmp_path_factory, n, part_rows, batch_size, seed, thumbnails
) -> None:
    root = tmp_path_factory.mktemp("parts")
    (root / "parts").mkdir()
    total = -(-n // part_rows)
    rng = np.random.default_rng(seed)
    pending = sorted(rng.choice(total, size=rng.integers(1, total + 1), replace=False).tolist())
    plan = plan_of(root, n, part_rows, pending, thumbnails)
    batches = plan.batches(batch_size)
    rows = np.concatenate([np.arange(a, b) for a, b in batches])
    assert rows.tolist() == plan.rows.tolist()
    for start, stop in batches:
        assert 0 < stop - start <= batch_size
        assert start // part_rows == (stop - 1) // part_rows
        assert (start % part_rows) % batch_size == 0  # same cuts in every run
    collector = PartCollector(plan)
    for index in rng.permutation(len(batches)):
        start, stop = batches[index]
        rows = np.arange(start, stop)
        problems = ["bad" if r % 7 == 3 else "" for r in rows]
        collector.add(rows, batch_of(rows, thumbnails), problems, ["baseline-jpeg"] * rows.size)
    summary = collector.summary()
    assert collector.written == summary.parts_written == len(pending)
    assert summary.images_embedded == plan.rows.size == summary.formats["baseline-jpeg"]
    for part in pending:
        found = read_part(root, part, plan.meta)
        start, stop = plan.meta.part_range(part)
        rows = np.arange(start, stop)
        expected = embeddings_of(rows).astype(np.float16)
        expected[rows % 7 == 3] = 0
        assert found is not None and np.array_equal(found.embeddings, expected)
        assert found.valid.tolist() == (rows % 7 != 3).tolist()
        assert found.skipped == {int(r): "bad" for r in rows if r % 7 == 3}
        stored = thumbnail_part_size(root, part, rows.size)
        assert stored == (thumbnails or None)
        if thumbnails:
            kept = read_thumbnail_part(root, part)
            assert np.array_equal(kept, thumbnails_of(rows, thumbnails))


def test_missing_repeated_and_foreign_rows_are_refused(tmp_path) -> None:
    (tmp_path / "parts").mkdir()
    plan = plan_of(tmp_path, 20, 8, pending=[0, 2])
    collector = PartCollector(plan)
    rows = np.arange(0, 4)
    collector.add(rows, batch_of(rows), [""] * 4, ["png"] * 4)
    with pytest.raises(ReferenceSetError, match="embedded twice"):
        collector.add(rows, batch_of(rows), [""] * 4, ["png"] * 4)
    with pytest.raises(ReferenceSetError, match="not pending"):
        collector.add(np.arange(8, 12), batch_of(np.arange(8, 12)), [""] * 4, ["png"] * 4)
    with pytest.raises(ReferenceSetError, match="2 parts unfinished"):
        collector.finish()
    rest = np.arange(4, 8)
    collector.add(rest, batch_of(rest), [""] * 4, ["png"] * 4)
    collector.add(rest, batch_of(rest), [""] * 4, ["png"] * 4)  # a retry's second delivery: on disk
    assert collector.written == 1
