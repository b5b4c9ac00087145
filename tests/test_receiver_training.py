"""The receiver's training machinery in-process: exact resume, checkpoints, batch sources,
the job queue and its crash recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import load_checkpoint, previous_path, save_checkpoint
from trainer.training import (
    CheckpointPolicy,
    EpochOrder,
    StepHooks,
    TrainConfig,
    TrainingInterrupted,
    train_classifier,
)


def _data(n: int = 150, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 24, 24), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, classes, (n,), generator=g)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CONFIG = dict(epochs=1, min_steps=17, max_steps=17, batch_size=32, label_smoothing=0.1, seed=3)


@pytest.mark.parametrize("balanced", [False, True])
def test_interrupted_runs_resume_to_identical_weights(tmp_path: Path, balanced: bool) -> None:
    data = _data()
    config = TrainConfig(**CONFIG, balanced=balanced)
    straight = train_classifier(data, 4, config, hooks=StepHooks(progress=False))
    policy = CheckpointPolicy(tmp_path / "run.ckpt", every_seconds=1e9)
    stops = iter([False] * 3 + [True] + [False] * 5 + [True])  # stop after steps 4 and 10
    for expected_step in (4, 10):
        with pytest.raises(TrainingInterrupted) as stopped:
            train_classifier(
                data,
                4,
                config,
                hooks=StepHooks(progress=False, checkpoint=policy, should_stop=lambda: next(stops)),
            )
        assert stopped.value.step == expected_step
    resumed = train_classifier(data, 4, config, hooks=StepHooks(progress=False, checkpoint=policy))
    assert resumed.resumed_from == 10 and resumed.steps == 17
    assert _same_weights(straight.model, resumed.model)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    # a finished run leaves its final state; resuming it again trains nothing
    again = train_classifier(data, 4, config, hooks=StepHooks(progress=False, checkpoint=policy))
    assert again.resumed_from == 17 and _same_weights(straight.model, again.model)


def test_checkpoint_of_another_run_or_damaged_is_not_used(tmp_path: Path) -> None:
    data = _data()
    policy = CheckpointPolicy(tmp_path / "run.ckpt", every_seconds=1e9, every_steps=5)
    with pytest.raises(TrainingInterrupted):
        train_classifier(
            data,
            4,
            TrainConfig(**CONFIG),
            hooks=StepHooks(
                progress=False, checkpoint=policy, should_stop=iter([False] * 11 + [True]).__next__
            ),
        )
    assert policy.path.is_file() and previous_path(policy.path).is_file()
    other = TrainConfig(**{**CONFIG, "lr": 1e-3})
    assert (
        train_classifier(
            data, 4, other, hooks=StepHooks(progress=False, checkpoint=policy)
        ).resumed_from
        == 0
    )

    save_checkpoint(tmp_path / "a.ckpt", {"identity": {"run": 1}, "step": 5})
    save_checkpoint(tmp_path / "a.ckpt", {"identity": {"run": 1}, "step": 9})
    assert load_checkpoint(tmp_path / "a.ckpt", {"run": 1})["step"] == 9
    (tmp_path / "a.ckpt").write_bytes(b"\0" * 100)  # damaged on disk: the previous one is used
    assert load_checkpoint(tmp_path / "a.ckpt", {"run": 1})["step"] == 5
    assert load_checkpoint(tmp_path / "a.ckpt", {"run": 2}) is None


def test_epoch_order_uniform_permutes_and_balanced_evens_classes() -> None:
    labels = torch.tensor([0] * 90 + [1] * 10)
    uniform = EpochOrder(labels, seed=1, balanced=False)
    first, second = uniform(0).clone(), uniform(1).clone()
    assert sorted(first.tolist()) == list(range(100)) and not torch.equal(first, second)
    assert torch.equal(EpochOrder(labels, 1, False)(1), second)  # reproducible by epoch alone
    balanced = EpochOrder(labels, seed=1, balanced=True)
    drawn = torch.cat([balanced(e) for e in range(20)])
    share = float((labels[drawn] == 1).float().mean())
    assert 0.45 < share < 0.55, share


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory: pytest.TempPathFactory, small_pool):
    from protocol.reference.image_folder import ImageFolderReference
    from tests.worlds import write_reference_tree

    root = tmp_path_factory.mktemp("jpeg-reference") / "reference"
    write_reference_tree(small_pool, root, per_block=12, blocks=3)
    victim = Path(ImageFolderReference(root).describe(17))  # position 5 of the second batch
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated file on the device's disk
    return root, victim


@pytest.mark.parametrize("decode", ["pil", "tensor", "torchcodec"])
def test_encoded_batches_decode_crop_and_report_unreadable(jpeg_tree, decode: str) -> None:
    from protocol.reference.image_folder import ImageFolderReference
    from trainer.batches import EncodedBatches, Loading

    root, victim = jpeg_tree
    reference = ImageFolderReference(root, image_size=40)
    indices = np.arange(len(reference))
    labels = torch.arange(len(reference)) % 3
    source = EncodedBatches(
        reference, indices, labels, 40, "crop-flip", seed=7, loading=Loading(decode, 2, 1)
    )
    plan = [(step, torch.arange(step * 12, step * 12 + 12)) for step in range(3)]
    batches = list(source.batches(iter(plan), torch.device("cpu")))
    assert [tuple(b.images.shape) for b in batches] == [
        (12, 3, 40, 40),
        (11, 3, 40, 40),
        (12, 3, 40, 40),
    ]
    assert len(batches[1].problems) == 1 and victim.name in batches[1].problems[0]
    assert torch.equal(batches[1].labels, torch.cat([labels[12:17], labels[18:24]]))
    again = list(source.batches(iter(plan[2:]), torch.device("cpu")))
    assert torch.equal(again[0].images, batches[2].images)  # crops depend on (seed, step) only
    plain = EncodedBatches(reference, indices, labels, 40, "none", loading=Loading(decode))
    centre = next(plain.batches(iter(plan[:1]), torch.device("cpu"))).images
    assert not torch.equal(centre, batches[0].images)


def test_training_from_image_files_runs_and_counts_unreadable(jpeg_tree) -> None:
    from protocol.reference.image_folder import ImageFolderReference
    from trainer.batches import EncodedBatches

    root, _ = jpeg_tree
    reference = ImageFolderReference(root, image_size=32)
    labels = torch.arange(len(reference)) % 3
    source = EncodedBatches(reference, np.arange(len(reference)), labels, 32, "crop-flip")
    config = TrainConfig(model="resnet18", epochs=2, batch_size=8, augment="crop-flip")
    result = train_classifier(source, 3, config, in_channels=3, hooks=StepHooks(progress=False))
    assert result.steps == 10 and result.unreadable_images == 2  # one bad file, two epochs
    assert result.history[-1]["images"] == 35


def test_job_queue_claims_once_and_recovers_dead_owners(tmp_path: Path) -> None:
    from receiver.job_queue import JobQueue, QueuedPayload

    queue = JobQueue(tmp_path / "queue.sqlite")
    first, created = queue.add(QueuedPayload("a" * 64, "spool/a", "a.plada", "t", 10, 2, 100))
    copy = QueuedPayload("a" * 64, "spool/a", "copy.plada", "t", 10, 2, 100)
    duplicate, again = queue.add(copy)
    assert created and not again and duplicate.id == first.id
    queue.add(QueuedPayload("b" * 64, "spool/b", "b.plada", "t", 10, 2, 100))
    other = JobQueue(tmp_path / "queue.sqlite")  # a second daemon on the same queue
    taken = [queue.claim("w1"), other.claim("w2"), queue.claim("w1")]
    assert [j.id if j else None for j in taken] == [1, 2, None]
    queue.progress(1, "w1", 50)
    assert queue.recover(lambda owner: owner == "w2", max_restarts=2)[0].state == "queued"
    assert queue.get(1).restarts == 0  # it trained further before dying: not counted
    for expected in ("queued", "failed"):  # then dies twice without progress
        queue.claim("w3")
        assert queue.recover(lambda owner: owner == "w2", max_restarts=2)[0].state == expected
    assert "died 2 times" in queue.get(1).error and queue.counts()["failed"] == 1
    assert queue.retry(1).state == "queued"
    other.finish(2, "w2", "results/2")
    assert queue.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 0}


def test_worker_locks_tell_live_from_dead(tmp_path: Path) -> None:
    import subprocess
    import sys

    from receiver.workers import WorkerLock, live_owners, owner_alive

    mine = WorkerLock(tmp_path)
    root, home = str(Path(__file__).parents[1]), str(tmp_path)
    code = (
        f"import sys, time; sys.path.insert(0, {root!r}); from pathlib import Path; "
        f"from receiver.workers import WorkerLock; w = WorkerLock(Path({home!r})); "
        "print(w.owner, flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    owner = child.stdout.readline().strip()
    assert owner_alive(mine.directory, owner) and set(live_owners(mine.directory)) == {
        owner,
        mine.owner,
    }
    child.kill()
    child.wait()
    assert not owner_alive(mine.directory, owner) and live_owners(mine.directory) == [mine.owner]
    mine.release()


def test_job_rerun_returns_its_report_and_new_settings_train_again(tmp_path, small_pool) -> None:
    from protocol.payload import Payload, encode_payload
    from protocol.trust import TrustStore
    from receiver.acceptance import Acceptance, AcceptanceRules, Received
    from receiver.job import JobSettings, run_job
    from receiver.trust_store import TrustOptions

    manifest = small_pool.manifest
    indices = np.arange(0, len(manifest), 20)
    payload = Payload(
        "t", manifest.name, manifest.fingerprint, len(manifest), ("a", "b"), indices, indices % 2
    )
    received = Received.of(encode_payload(payload, reference=manifest), "t.plada")
    rules = AcceptanceRules(TrustOptions(allow_unsigned=True))
    accepted = Acceptance(TrustStore(), rules, None, manifest).examine(received)
    config = TrainConfig(min_steps=4, max_steps=4, batch_size=16)
    out = tmp_path / "out"
    first = run_job(accepted, small_pool, out, JobSettings(config, export=False), progress=False)
    again = run_job(accepted, small_pool, out, JobSettings(config, export=False), progress=False)
    assert again == first and not (tmp_path / "out" / ".job").exists()
    other = run_job(
        accepted, small_pool, out, JobSettings(config, seeds=(1,), export=False), progress=False
    )
    assert [r.seed for r in other.runs] == [1]
    # trained anew, not the earlier report: its own identity, and its weights on disk
    assert other.job_identity != first.job_identity
    assert (tmp_path / "out" / "model-seed1.pt").is_file()


def test_progressive_resizing_grows_to_full_size_and_resumes_exactly(tmp_path: Path) -> None:
    from protocol.errors import ConfigError
    from trainer.training import progressive_side

    assert [progressive_side(32, 0.5, s, 100) for s in (0, 30, 74, 75, 99)] == [16, 20, 28, 32, 32]
    assert progressive_side(224, 0.5, 0, 100) == 112 and progressive_side(224, 0.0, 0, 100) == 224
    for bad in (0.1, 1.0):
        with pytest.raises(ConfigError, match="progressive"):
            TrainConfig(progressive=bad)
    data = _data()
    config = TrainConfig(**CONFIG, progressive=0.5)
    straight = train_classifier(data, 4, config, hooks=StepHooks(progress=False))
    plain = train_classifier(data, 4, TrainConfig(**CONFIG), hooks=StepHooks(progress=False))
    assert not _same_weights(straight.model, plain.model)  # smaller images early on
    policy = CheckpointPolicy(tmp_path / "run.ckpt", every_seconds=1e9)
    stops = iter([False] * 5 + [True])
    with pytest.raises(TrainingInterrupted):
        train_classifier(
            data,
            4,
            config,
            hooks=StepHooks(progress=False, checkpoint=policy, should_stop=lambda: next(stops)),
        )
    resumed = train_classifier(data, 4, config, hooks=StepHooks(progress=False, checkpoint=policy))
    assert resumed.resumed_from == 6 and _same_weights(straight.model, resumed.model)


def test_the_device_path_decodes_one_batch_ahead(jpeg_tree, monkeypatch) -> None:
    from protocol.reference.image_folder import ImageFolderReference
    from trainer.batches import EncodedBatches, Loading

    root, _ = jpeg_tree
    reference = ImageFolderReference(root, image_size=32)
    labels = torch.arange(len(reference)) % 3
    rows = np.arange(len(reference))
    source = EncodedBatches(reference, rows, labels, 32, loading=Loading("tensor"))
    decoded_steps = []
    original = EncodedBatches._tensor_batch

    def recording(self, encoded, refs, step, device):
        decoded_steps.append(step)
        return original(self, encoded, refs, step, device)

    monkeypatch.setattr(EncodedBatches, "_tensor_batch", recording)
    plan = [(step, torch.arange(step * 12, step * 12 + 12)) for step in range(3)]
    batches = source.batches(iter(plan), torch.device("cpu"))
    next(batches)
    assert decoded_steps == [0, 1]  # batch 1 decodes before batch 0 is trained on
    assert len(list(batches)) == 2 and decoded_steps == [0, 1, 2]
