"""Decode once, train many epochs: the decoded cache, its batches, and exact resume,
in process and after a real SIGKILL of ``plada-receive train``."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.reference.image_folder import ImageFolderReference
from tests.subprocess_cli import cli, cli_env, run
from trainer import decoded_cache
from trainer.batches import CachedBatches
from trainer.decoded_cache import CacheOptions, build_cache, cache_side
from trainer.training import (
    CheckpointPolicy,
    StepHooks,
    TrainConfig,
    TrainingInterrupted,
    train_classifier,
)

CPU = torch.device("cpu")
SIDE = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, small_pool) -> tuple[Path, int]:
    from tests.worlds import write_reference_tree

    root = tmp_path_factory.mktemp("cache-reference") / "reference"
    write_reference_tree(small_pool, root, per_block=16, blocks=3)
    victim = 21
    path = Path(ImageFolderReference(root).describe(victim))
    path.write_bytes(path.read_bytes()[:150])  # truncated on the device's disk
    return root, victim


def _cache(tree, tmp_path: Path, where: str = "memory", decode: str = "pil"):
    root, _ = tree
    reference = ImageFolderReference(root, image_size=20)
    indices = np.arange(len(reference))
    path = tmp_path / "decoded.u8"
    options = CacheOptions(where, path, threads=2, decode=decode)
    return build_cache(reference, indices, SIDE, CPU, options)


def test_cache_side_leaves_room_for_the_crop() -> None:
    assert cache_side(224) == 256 and cache_side(32) == 37


def test_images_are_decoded_once_with_unreadable_ones_recorded(tree, tmp_path) -> None:
    _, victim = tree
    with_pil = _cache(tree, tmp_path)
    on_device = _cache(tree, tmp_path, decode="tensor")
    for cache in (with_pil, on_device):
        assert cache.images.shape == (48, 3, SIDE, SIDE) and cache.images.dtype == torch.uint8
        assert list(cache.problems) == [victim] and "not a readable image" in cache.problems[victim]
    readable = torch.ones(48, dtype=torch.bool)
    readable[victim] = False
    difference = (with_pil.images[readable].float() - on_device.images[readable].float()).abs()
    assert difference.mean() < 4.0, difference.mean()  # two resamplers, same pictures


def test_a_memory_mapped_cache_is_reopened_not_decoded_again(tree, tmp_path, monkeypatch) -> None:
    first = _cache(tree, tmp_path, "mmap")
    assert first.where == "mmap" and (tmp_path / "decoded.u8").stat().st_size == first.nbytes

    def no_decoding(*args, **kwargs):
        raise AssertionError("a complete cache must be reopened, not decoded")

    monkeypatch.setattr(decoded_cache, "_decode_with_pil", no_decoding)
    again = _cache(tree, tmp_path, "mmap")
    assert torch.equal(again.images, first.images) and again.problems == first.problems


def test_a_cache_killed_while_being_built_is_built_again(tree, tmp_path) -> None:
    complete = _cache(tree, tmp_path / "a", "mmap")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "decoded.u8.partial").write_bytes(b"\0" * 1000)  # a killed build
    rebuilt = _cache(tree, tmp_path / "b", "mmap")
    assert torch.equal(rebuilt.images, complete.images)
    assert not (tmp_path / "b" / "decoded.u8.partial").exists()


def test_cached_batches_crop_on_the_device_keyed_by_seed_and_step(tree, tmp_path) -> None:
    _, victim = tree
    cache = _cache(tree, tmp_path)
    labels = torch.arange(48) % 3
    source = CachedBatches(cache, labels, 20, "crop-flip", seed=5)
    plan = [(step, torch.arange(step * 16, step * 16 + 16)) for step in range(3)]
    batches = list(source.batches(iter(plan), CPU))
    shapes = [tuple(b.images.shape) for b in batches]
    assert shapes == [(16, 3, 20, 20), (15, 3, 20, 20), (16, 3, 20, 20)]
    assert len(batches[1].problems) == 1 and batches[0].problems == []
    expected = torch.cat([labels[16:victim], labels[victim + 1 : 32]])
    assert torch.equal(batches[1].labels, expected)
    again = list(CachedBatches(cache, labels, 20, "crop-flip", seed=5).batches(iter(plan[2:]), CPU))
    assert torch.equal(again[0].images, batches[2].images)  # the draws depend on (seed, step)
    other_seed = next(CachedBatches(cache, labels, 20, "crop-flip", 6).batches(iter(plan), CPU))
    assert not torch.equal(other_seed.images, batches[0].images)
    centre = next(CachedBatches(cache, labels, 20, "none").batches(iter(plan), CPU)).images
    assert centre.shape == (16, 3, 20, 20) and not torch.equal(centre, batches[0].images)


def test_an_interrupted_run_on_a_reopened_cache_resumes_to_identical_weights(
    tree, tmp_path
) -> None:
    labels = torch.arange(48) % 3
    config = TrainConfig(epochs=1, min_steps=12, max_steps=12, batch_size=8, augment="crop-flip")

    def source():
        return CachedBatches(_cache(tree, tmp_path, "mmap"), labels, 20, "crop-flip", seed=0)

    straight = train_classifier(source(), 3, config, in_channels=3, hooks=StepHooks(progress=False))
    policy = CheckpointPolicy(tmp_path / "run.ckpt", every_seconds=1e9)
    stops = iter([False] * 6 + [True])
    with pytest.raises(TrainingInterrupted):
        train_classifier(
            source(),
            3,
            config,
            in_channels=3,
            hooks=StepHooks(progress=False, checkpoint=policy, should_stop=lambda: next(stops)),
        )
    resumed = train_classifier(
        source(), 3, config, 3, hooks=StepHooks(progress=False, checkpoint=policy)
    )
    assert resumed.resumed_from == 7 and resumed.steps == 12
    same = straight.model.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in resumed.model.state_dict().items())


def test_receiver_killed_mid_training_reopens_its_cache_and_resumes_exactly(tree, tmp_path) -> None:
    from protocol.payload import Payload, encode_payload, write_payload

    root, _ = tree
    reference = ImageFolderReference(root, image_size=20)
    manifest = reference.manifest
    indices = np.arange(len(manifest))
    payload = Payload(
        "t",
        manifest.name,
        manifest.fingerprint,
        len(manifest),
        ("a", "b", "c"),
        indices,
        indices % 3,
    )
    path = tmp_path / "t.plada"
    write_payload(path, encode_payload(payload, reference=manifest))

    def train(out: Path, crash: str | None = None, expect: int = 0):
        env = cli_env() | ({"PLADA_CRASH_AT": crash} if crash else {})
        args = [
            *cli("plada-receive"),
            "train",
            str(path),
            "--reference",
            str(root),
            "--image-size",
            "20",
            "--allow-unsigned",
            "--cache",
            "mmap",
            "--min-steps",
            "12",
            "--max-steps",
            "12",
            "--batch-size",
            "8",
            "--checkpoint-steps",
            "3",
            "--no-export",
            "--quiet",
            "--out",
            str(out),
        ]
        return run(args, env, expect=expect)

    train(tmp_path / "straight")
    train(tmp_path / "killed", crash="training-step@8", expect=-signal.SIGKILL)
    state = tmp_path / "killed" / ".job"
    assert (state / "decoded-23px.u8").is_file() and (state / "decoded-23px.u8.json").is_file()
    resumed = train(tmp_path / "killed")
    assert "resumed at step 6" in resumed.stdout, resumed.stdout
    a = torch.load(tmp_path / "straight" / "model-seed0.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model-seed0.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state.exists()  # the finished job removes its cache with its state
