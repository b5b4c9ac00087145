"""The files the sender's stages hand each other: the work directory's schema, and the
all-or-nothing writer every such file goes through."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from protocol.atomic_files import atomic_outputs
from protocol.errors import ConfigError, StorageError
from sender.scoring.work_dir import SCORES_SCHEMA, LeakageCandidates, ScoresFile


def _scores(**changes) -> ScoresFile:
    rng = np.random.default_rng(0)
    fields = {
        "scores": {"energy": rng.normal(size=50).astype(np.float32)},
        "predicted": rng.integers(0, 3, 50),
        "class_names": ("cat", "dog", "axolotl"),
        "reference_name": "pool",
        "reference_fingerprint": bytes(range(32)),
        "reference_size": 50,
        "task": "pets",
    }
    return ScoresFile(**(fields | changes))


def test_scores_file_round_trips_every_field(tmp_path) -> None:
    written = _scores(
        scores={"energy": np.arange(50, dtype=np.float32), "knn": -np.ones(50, np.float32)},
        recommended_strategy="inverse",
        reference_block_starts=np.array([0, 20, 50]),
        excluded=np.array([3, 7]),
        embeddings_dir="/data/emb",
        leakage=LeakageCandidates(
            np.array([[4, 9, -1], [2, 4, 8]]),
            np.array([[0.99, 0.5, -np.inf], [0.98, 0.97, 0.1]], np.float32),
        ),
    )
    written.write(tmp_path / "scores.npz")
    read = ScoresFile.read(tmp_path / "scores.npz")
    assert read.available_scores == ["energy", "knn"]
    for name in ("energy", "knn"):
        assert np.array_equal(read.scores[name], written.scores[name])
    assert np.array_equal(read.predicted, written.predicted)
    assert np.array_equal(read.excluded, [3, 7])
    assert (read.class_names, read.reference_fingerprint, read.reference_size) == (
        ("cat", "dog", "axolotl"),
        bytes(range(32)),
        50,
    )
    assert (read.task, read.recommended_strategy, read.embeddings_dir) == (
        "pets",
        "inverse",
        "/data/emb",
    )
    layout = read.block_layout()
    assert layout is not None and layout.block_starts.tolist() == [0, 20, 50]
    assert read.leakage is not None
    found, hit_queries = read.leakage.duplicates(0.97)
    assert found.tolist() == [2, 4] and hit_queries == 2


def test_scores_file_defaults_mean_nothing_excluded_and_no_folders(tmp_path) -> None:
    _scores().write(tmp_path / "scores.npz")
    read = ScoresFile.read(tmp_path / "scores.npz")
    assert read.excluded.size == 0 and read.block_layout() is None
    assert read.embeddings_dir is None and read.recommended_strategy == "safety-net"
    assert read.leakage is None


def test_a_work_directory_of_another_schema_is_refused_with_the_fix(tmp_path) -> None:
    old = tmp_path / "scores.npz"
    np.savez(old, energy=np.zeros(3, np.float32), predicted=np.zeros(3, np.int64))  # unversioned
    with pytest.raises(ConfigError, match=rf"schema 1, this plada reads {SCORES_SCHEMA}.*score"):
        ScoresFile.read(old)
    with pytest.raises(ConfigError, match=r"not found: run 'plada-send score' first"):
        ScoresFile.read(tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match="unknown scores"):
        _scores(scores={"energy": np.zeros(50), "loudness": np.zeros(50)})


def test_atomic_outputs_replace_every_file_or_none(tmp_path) -> None:
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"old a")
    with atomic_outputs(first, second, durable=True) as (a, b):
        a.write(b"new a")
        b.write(b"new b")
    assert (first.read_bytes(), second.read_bytes()) == (b"new a", b"new b")

    with (
        pytest.raises(StorageError, match="No space left"),
        atomic_outputs(first, second) as (a, b),
    ):
        a.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ValueError, match="a bug"), atomic_outputs(first, second) as (a, _):
        a.write(b"half")
        raise ValueError("a bug")  # not a storage problem: raised as it is
    assert (first.read_bytes(), second.read_bytes()) == (b"new a", b"new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]  # no temporaries
