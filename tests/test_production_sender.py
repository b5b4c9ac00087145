"""The production sender on a generated JPEG world: readers, embed (resume, shards), index,
embedding teachers, leakage exclusion and the receiver accepting the payloads."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import ReferenceSetError
from protocol.reference.factory import open_reference
from protocol.reference.image_folder import ImageFolderReference
from protocol.reference.webdataset import WebDatasetReference
from tests.subprocess_cli import cli, cli_env, embed_args, run
from tests.worlds import save_tiny_clip, write_reference_tree, write_shards, write_task_tree

BLOCKS, PER_BLOCK = 24, 20


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, small_pool) -> dict[str, Path]:
    from protocol.world.digits import load_digits_split

    root = tmp_path_factory.mktemp("world")
    write_reference_tree(small_pool, root / "tree", PER_BLOCK, BLOCKS)
    write_shards(root / "tree", root / "shards", per_shard=70)
    train, test = load_digits_split()
    write_task_tree(train, root / "task" / "train", limit_per_class=15)
    write_task_tree(test, root / "task" / "test", limit_per_class=10)
    model, weights = save_tiny_clip(root)
    return {"root": root, "config": root / f"{model}.json", "weights": Path(weights)}


@pytest.fixture(scope="module")
def embedded(world) -> Path:
    """The tree embedded, merged and indexed through the CLI."""
    out = world["root"] / "emb"
    env = cli_env()
    run(embed_args(world, str(world["root"] / "tree"), out), env)
    run([*cli("plada-send"), "merge", str(out), "--int8"], env)
    run([*cli("plada-send"), "index", str(out), "--quiet"], env)
    return out


def test_tree_and_shards_give_one_manifest(world) -> None:
    tree = ImageFolderReference(world["root"] / "tree")
    shards = open_reference("wds:" + str(world["root"] / "shards"), world["root"] / "cache")
    assert isinstance(shards, WebDatasetReference) and not shards.problems
    assert len(tree) == BLOCKS * PER_BLOCK and tree.manifest.keys == shards.manifest.keys
    assert tree.manifest.fingerprint == shards.manifest.fingerprint
    assert tree.manifest.keys[0] == "n00000001/n00000001_0"
    for index in (0, 123, len(tree) - 1):
        assert tree.read_bytes(index) == shards.read_bytes(index)
    assert len(tree.manifest.block_names()) == BLOCKS


def test_tree_and_shards_give_the_same_embeddings(world, embedded) -> None:
    out = world["root"] / "emb-wds"
    run(embed_args(world, "wds:" + str(world["root"] / "shards"), out), cli_env())
    run([*cli("plada-send"), "merge", str(out)], cli_env())
    assert (out / "embeddings.f16").read_bytes() == (embedded / "embeddings.f16").read_bytes()
    assert (out / "thumbnails.u8").read_bytes() == (embedded / "thumbnails.u8").read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["reference_fingerprint"]
        == json.loads((embedded / "meta.json").read_text())["reference_fingerprint"]
    )


def test_embed_resumes_after_sigkill(world, embedded) -> None:
    out = world["root"] / "emb-killed"
    proc = subprocess.Popen(
        embed_args(world, str(world["root"] / "tree"), out),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(list((out / "parts").glob("part-*.npz"))) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, "embed finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("part-*.npz")))
    total = BLOCKS * PER_BLOCK // 16
    assert 2 <= done < total, done
    merged = run([*cli("plada-send"), "merge", str(out)], cli_env(), expect=2)
    assert "parts are missing" in merged.stderr and "Traceback" not in merged.stderr
    resumed = run(embed_args(world, str(world["root"] / "tree"), out), cli_env())
    assert f"{done} already done, {total - done} written" in resumed.stdout
    run([*cli("plada-send"), "merge", str(out)], cli_env())
    assert (out / "embeddings.f16").read_bytes() == (embedded / "embeddings.f16").read_bytes()


def test_shards_on_two_machines_merge_to_the_same_file(world, embedded) -> None:
    first, second = world["root"] / "emb-0of2", world["root"] / "emb-1of2"
    machines = [  # both at once, as two machines would run them
        subprocess.Popen(
            embed_args(world, str(world["root"] / "tree"), out, "--shard", shard),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for shard, out in (("0/2", first), ("1/2", second))
    ]
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=600)
        assert machine.returncode == 0, stdout + stderr
    merged = run([*cli("plada-send"), "merge", str(first), "--from", str(second)], cli_env())
    assert "480 readable" in merged.stdout and "32x32 thumbnails" in merged.stdout
    assert (first / "embeddings.f16").read_bytes() == (embedded / "embeddings.f16").read_bytes()
    assert (first / "thumbnails.u8").read_bytes() == (embedded / "thumbnails.u8").read_bytes()


def test_thumbnails_are_added_to_a_store_made_without_them(world, embedded) -> None:
    """A store embedded with --thumbnails 0 merges without them; the same command with
    --thumbnails 32 redoes its parts, and the merge then has the thumbnails a store made
    with them from the start has. The thumbnails are CLIP's view of each image, shrunk."""
    out = world["root"] / "emb-thumbless"
    tree = str(world["root"] / "tree")
    run(embed_args(world, tree, out, "--thumbnails", "0"), cli_env())
    merged = run([*cli("plada-send"), "merge", str(out)], cli_env())
    assert "no thumbnails" in merged.stdout and not (out / "thumbnails.u8").exists()
    total = BLOCKS * PER_BLOCK // 16
    added = run(embed_args(world, tree, out, "--thumbnails", "32"), cli_env())
    assert f"0 already done, {total} written" in added.stdout
    again = run(embed_args(world, tree, out, "--thumbnails", "32"), cli_env())
    assert f"{total} already done, 0 written" in again.stdout
    run([*cli("plada-send"), "merge", str(out)], cli_env())
    assert (out / "thumbnails.u8").read_bytes() == (embedded / "thumbnails.u8").read_bytes()
    assert (out / "embeddings.f16").read_bytes() == (embedded / "embeddings.f16").read_bytes()
    from PIL import Image

    from sender.embedding.store import EmbeddingStore

    thumbnails = EmbeddingStore(out).thumbnails().read_rows(np.array([0, 5]))
    original = np.asarray(Image.open(world["root"] / "tree/n00000001/n00000001_0.JPEG"))
    shrunk = np.asarray(Image.fromarray(original).convert("RGB").resize((32, 32), Image.BOX))
    assert np.abs(thumbnails[0].transpose(1, 2, 0).astype(int) - shrunk).mean() < 12


def test_corrupt_images_and_truncated_shards_are_reported_and_skipped(world, tmp_path) -> None:
    from sender.embedding.engine import EmbedSettings
    from sender.embedding.local import embed_reference
    from sender.embedding.store import merge_embeddings

    tree = tmp_path / "tree"
    shutil.copytree(world["root"] / "tree", tree)
    truncated = tree / "n00000003" / "n00000003_245.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (tree / "n00000005" / "n00000005_485.JPEG").write_bytes(b"this is not a JPEG")
    reference = ImageFolderReference(tree)
    settings = EmbedSettings(
        str(world["config"]), str(world["weights"]), workers=0, part_rows=100, progress=False
    )
    summary = embed_reference(reference, tmp_path / "emb", settings)
    assert summary.images_skipped == 2 and summary.images_embedded == 480
    merge_embeddings(tmp_path / "emb")
    skipped = json.loads((tmp_path / "emb" / "skipped.json").read_text())
    assert [s["key"] for s in skipped] == ["n00000003/n00000003_245", "n00000005/n00000005_485"]
    valid = np.load(tmp_path / "emb" / "valid.npy")
    assert valid.sum() == 478 and not valid[reference.manifest.keys.index(skipped[0]["key"])]
    with pytest.raises(ReferenceSetError, match="not a readable image"):
        reference.load(np.array([skipped[1]["index"]]))

    shards = tmp_path / "shards"
    shutil.copytree(world["root"] / "shards", shards)
    victim = sorted(shards.glob("*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    partial = WebDatasetReference(str(shards), cache_dir=tmp_path / "cache")
    assert len(partial.problems) == 1 and "truncated" in partial.problems[0]
    assert 400 < len(partial) < 480  # the readable half of the shard is kept


def _score(world, embedded, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        [
            *cli("plada-send"),
            "score",
            "--embeddings",
            str(embedded),
            "--clip-model",
            str(world["config"]),
            "--clip-weights",
            str(world["weights"]),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ],
        cli_env(),
    )


@pytest.fixture(scope="module")
def scored_by(world, embedded):
    """The task scored once per teacher, on demand (``scored_by("probe")``): the tests
    that select or plan from one write their outputs beside each other in it. The
    zero-shot teacher gets the class names only, no labeled images at all."""
    done: dict[str, Path] = {}

    def scored(teacher: str) -> Path:
        if teacher not in done:
            work = world["root"] / f"work-{teacher}"
            task = ["--task", str(world["root"] / "task")]
            if teacher == "zeroshot":
                names = ",".join(f"digit {d}" for d in range(10))
                task = ["--classes", names, "--task-id", "digits-by-name"]
            out = _score(world, embedded, work, "--teacher", teacher, *task)
            assert "recommended strategy:" in out.stdout
            done[teacher] = work
        return done[teacher]

    return scored


@pytest.fixture(scope="module")
def probe_work(scored_by) -> Path:
    """The task scored with the probe teacher, the embeddings path's default."""
    return scored_by("probe")


@pytest.mark.parametrize("teacher", ["probe", "zeroshot", "knn"])
def test_embedding_teachers_make_payloads_the_receiver_accepts(world, scored_by, teacher) -> None:
    work = scored_by(teacher)
    payload = work / "task.plada"
    key = work / "keys" / "station"
    run([*cli("plada-send"), "keygen", "--sender-id", "station", "--out", str(key)], cli_env())
    selected = run(
        [
            *cli("plada-send"),
            "select",
            str(work),
            "--strategy",
            "auto",
            "--keep",
            "0.05",
            "--out",
            str(payload),
            "--json",
            str(work / "select.json"),
            "--signing-key",
            f"{key}.key",
        ],
        cli_env(),
    )
    summary = json.loads((work / "select.json").read_text())
    assert summary["kept"] == 24 and "payload" in selected.stdout
    knn = json.loads((work / "score_report.json").read_text())["knn_relevance"]
    if teacher == "zeroshot":  # no labeled task images to search the index with
        assert "no labeled task images" in knn["skipped"]
        assert summary["selection"]["score"] == "energy"
    else:  # the task's images searched the store's index: kNN relevance is the default score
        assert knn["candidates"] > 0 and knn["task_images"] > 0
        assert summary["selection"]["score"] == "knn"
    assert summary["signed"]["sender"] == "station" and "signed by station" in selected.stdout
    trust = ["--trust", str(work / "trust")]
    run([*cli("plada-receive"), "trust", "add", f"{key}.pub", *trust], cli_env())
    for reference in (str(world["root"] / "tree"), "wds:" + str(world["root"] / "shards")):
        verified = run(
            [
                *cli("plada-receive"),
                "verify",
                str(payload),
                "--reference",
                reference,
                "--cache-dir",
                str(world["root"] / "cache"),
                *trust,
            ],
            cli_env(),
        )
        assert verified.stdout.startswith("ok:") and "signed by station" in verified.stdout


def test_far_out_of_domain_task_gets_inverse_selection(
    world, embedded, probe_work, tmp_path
) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, photo in zip(("china", "flower"), load_sample_images().images, strict=True):
            folder = tmp_path / "photos" / split / name
            folder.mkdir(parents=True)
            for i in range(15):
                y, x = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 96)
                Image.fromarray(photo[y : y + 96, x : x + 96]).save(folder / f"{i}.png")
    out = _score(world, embedded, tmp_path / "work", "--task", str(tmp_path / "photos"))
    assert "recommended strategy: inverse" in out.stdout and "far out of domain" in out.stdout
    digits = json.loads((probe_work / "score_report.json").read_text())
    assert digits["recommended_strategy"] == "safety-net"


def test_planted_test_duplicates_are_found_and_excluded(world, tmp_path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(world["root"] / "tree", tree)
    planted = tree / "n00000099"
    planted.mkdir()
    test_images = sorted((world["root"] / "task" / "test" / "3").glob("*.png"))[:3]
    for i, image in enumerate(test_images):
        shutil.copyfile(image, planted / f"n00000099_{i}.png")
    emb, work = tmp_path / "emb", tmp_path / "work"
    run(embed_args(world, str(tree), emb), cli_env())
    run([*cli("plada-send"), "merge", str(emb)], cli_env())
    run([*cli("plada-send"), "index", str(emb), "--kind", "flat", "--quiet"], cli_env())
    _score(world, emb, work, "--task", str(world["root"] / "task"))
    select = [
        *cli("plada-send"),
        "select",
        str(work),
        "--strategy",
        "lowest",
        "--keep",
        "1.0",
        "--leak-threshold",
        "0.9999",
        "--unsigned",
    ]
    run(
        [*select, "--out", str(tmp_path / "a.plada"), "--json", str(tmp_path / "a.json")], cli_env()
    )
    report = json.loads((tmp_path / "a.json").read_text())["leakage"]
    assert report["test_images_with_near_duplicates"] == 3, report
    assert report["near_duplicate_reference_images"] == 3 and report["kept_near_duplicates"] == 0
    assert json.loads((tmp_path / "a.json").read_text())["kept"] == BLOCKS * PER_BLOCK
    run(
        [
            *select,
            "--keep-leaks",
            "--out",
            str(tmp_path / "b.plada"),
            "--json",
            str(tmp_path / "b.json"),
        ],
        cli_env(),
    )
    kept_anyway = json.loads((tmp_path / "b.json").read_text())["leakage"]
    assert kept_anyway["kept_near_duplicates"] == 3 and kept_anyway["excluded"] is False


def test_missing_weights_fail_with_a_clear_error(world, tmp_path) -> None:
    def embed_with(model: str, weights: str) -> subprocess.CompletedProcess:
        args = [
            *cli("plada-send"),
            "embed",
            "--reference",
            str(world["root"] / "tree"),
            "--clip-model",
            model,
            "--clip-weights",
            weights,
            "--out",
            str(tmp_path / "e"),
        ]
        return run(args, cli_env(), expect=2)

    missing = embed_with(str(world["config"]), str(tmp_path / "absent.pt"))
    assert "WeightsError" in missing.stderr and "never downloads" in missing.stderr
    tag = embed_with("ViT-B-32", "no-such-tag")
    assert "neither a weights file nor a pretrained tag" in tag.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    unreadable = embed_with(str(world["config"]), str(junk))
    assert "WeightsError" in unreadable.stderr and "Traceback" not in unreadable.stderr


def test_select_with_consensus_refills_what_it_drops(probe_work, tmp_path) -> None:
    run(
        [
            *cli("plada-send"),
            "select",
            str(probe_work),
            "--keep",
            "0.1",
            "--consensus",
            "5",
            "--unsigned",
            "--out",
            str(tmp_path / "c.plada"),
            "--json",
            str(tmp_path / "c.json"),
        ],
        cli_env(),
    )
    summary = json.loads((tmp_path / "c.json").read_text())
    assert summary["consensus"]["k"] == 5 and summary["consensus"]["dropped"] > 0
    assert summary["kept"] == 48  # dropped images were replaced


def test_batched_decoders_match_pil_and_handle_png_and_garbage(world, tmp_path) -> None:
    from PIL import Image

    from sender.embedding.engine import EmbedSettings
    from sender.embedding.local import embed_reference
    from sender.embedding.store import merge_parts

    tree = tmp_path / "tree"
    shutil.copytree(world["root"] / "tree", tree)
    png = tree / "n00000002" / "n00000002_120.JPEG"  # a PNG under a .JPEG name: PIL fallback
    with Image.open(png) as img:
        img.save(png, format="PNG")
    progressive = tree / "n00000003" / "n00000003_240.JPEG"
    with Image.open(progressive) as img:
        img.load()
        img.save(progressive, format="JPEG", quality=90, progressive=True)
    (tree / "n00000004" / "n00000004_360.JPEG").write_bytes(b"\xff\xd8 not really a JPEG")
    reference = ImageFolderReference(tree)
    stores = {}
    for decode in ("pil", "torchvision", "torchcodec"):
        out = tmp_path / decode
        settings = EmbedSettings(
            str(world["config"]),
            str(world["weights"]),
            workers=0,
            part_rows=100,
            progress=False,
            decode=decode,
        )
        summary = embed_reference(reference, out, settings)
        assert summary.images_skipped == 1
        assert summary.formats == {
            "baseline-jpeg": len(reference) - 3,
            "other": 2,  # the PNG and the garbage
            "progressive-jpeg": 1,
        }, summary.formats
        merge_parts(out)
        stores[decode] = np.fromfile(out / "embeddings.f16", "<f2").astype(np.float32)
        stores[decode] = stores[decode].reshape(len(reference), -1)
    valid = np.load(tmp_path / "torchvision" / "valid.npy")
    bad = reference.manifest.keys.index("n00000004/n00000004_360")
    assert not valid[bad] and valid.sum() == len(reference) - 1
    for decoder in ("torchvision", "torchcodec"):
        pil, other = stores["pil"][valid], stores[decoder][valid]
        cosine = (pil * other).sum(1) / np.linalg.norm(pil, axis=1) / np.linalg.norm(other, axis=1)
        assert cosine.min() > 0.999, (decoder, cosine.min())


@pytest.fixture
def toy_score():
    """A selection score registered once, as a maintainer would add one."""
    from sender.scoring.scores import ROW_SCORES, ScoreRows, row_score

    @row_score("toy")
    def toy(rows: ScoreRows) -> np.ndarray:
        return -rows.embeddings[:, 0]  # rows far along the first axis first

    yield "toy"
    del ROW_SCORES["toy"]


def _lowest(values: np.ndarray, keep: float) -> list[int]:
    """The rows ``lowest`` keeps: the smallest values, ties to the lower row."""
    count = max(1, round(keep * values.size))
    return sorted(np.argsort(values, kind="stable")[:count].tolist())


def test_a_score_registered_once_is_scored_and_selected_on_both_paths(
    world, embedded, small_pool, tmp_path, toy_score
) -> None:
    from protocol.payload import decode_payload, read_payload_bytes
    from protocol.world.digits import load_digits_split
    from sender.embedding.embedders import OpenClipEmbedder
    from sender.embedding.store import EmbeddingStore
    from sender.scoring.embeddings import EmbeddingTask, StreamScoring, score_embeddings
    from sender.scoring.images import TeacherSettings, score_reference
    from sender.scoring.work_dir import ScoresFile
    from sender.selection.payloads import Selection, make_payload
    from sender.selection.plan import candidate_grid
    from sender.selection.scored_work import LeakageRule
    from sender.selection.strategies import SelectionConfig

    assert {c.score for c in candidate_grid((0.01,))} >= {toy_score}  # the plan tries it too
    train, test = load_digits_split()
    in_memory, stored = tmp_path / "in-memory", tmp_path / "stored"
    score_reference(small_pool, train, test, in_memory, TeacherSettings(epochs=1), False)
    embedder = OpenClipEmbedder(str(world["config"]), str(world["weights"]))
    task = EmbeddingTask.from_folders(str(world["root"] / "task"))
    score_embeddings(embedded, stored, embedder, task, StreamScoring(progress=False))
    store = EmbeddingStore(embedded)
    toy_of_store = -store.read_rows(np.arange(store.n))[:, 0]
    tree = ImageFolderReference(world["root"] / "tree").manifest
    for work, manifest in ((in_memory, small_pool.manifest), (stored, tree)):
        scored = ScoresFile.read(work / "scores.npz")
        values = scored.scores[toy_score]
        assert values.shape == (scored.reference_size,) and np.isfinite(values).all()
        if work == stored:  # the streamed pass computed it from the stored rows
            assert np.array_equal(values, toy_of_store)
        out = work / "toy.plada"
        config = SelectionConfig("lowest", keep=0.05)
        selection = Selection(config, toy_score, LeakageRule(exclude=False))
        made = make_payload(work, selection, out)
        payload = decode_payload(read_payload_bytes(out), reference=manifest, trust=None)
        assert made.selection["score"] == toy_score
        assert payload.indices.tolist() == _lowest(values, 0.05)
        assert payload.indices.tolist() != _lowest(scored.scores["energy"], 0.05)


def test_a_copied_work_directory_selects_with_its_embeddings_store_moved(
    world, embedded, tmp_path
) -> None:
    """A work directory holds what select needs (the leakage candidates found when
    scoring; the store recorded relative to itself): copied elsewhere, with the store it
    was scored from moved away, it selects the same payload. Only the consensus filter
    reads the store, and then says where it looked."""
    from protocol.payload import decode_payload, read_payload_bytes

    store, work = tmp_path / "site" / "emb", tmp_path / "site" / "work"
    shutil.copytree(embedded, store)
    _score(world, store, work, "--task", str(world["root"] / "task"))

    def select(folder: Path, name: str, *extra: str, expect: int = 0):
        args = [*cli("plada-send"), "select", str(folder), "--keep", "0.05", "--unsigned"]
        out = tmp_path / f"{name}.plada"
        args += ["--out", str(out), "--json", str(out.with_suffix(".json")), *extra]
        return run(args, cli_env(), expect=expect), out

    _, before = select(work, "before")
    copied = tmp_path / "elsewhere" / "work"
    shutil.copytree(work, copied)
    store.rename(tmp_path / "site" / "emb-moved")
    _, after = select(copied, "after")
    manifest = ImageFolderReference(world["root"] / "tree").manifest
    first, second = (
        decode_payload(read_payload_bytes(p), reference=manifest, trust=None)
        for p in (before, after)
    )
    assert first.indices.tolist() == second.indices.tolist()
    assert first.labels.tolist() == second.labels.tolist()
    leaks = [json.loads(p.with_suffix(".json").read_text())["leakage"] for p in (before, after)]
    assert leaks[0] == leaks[1] and leaks[0]["test_images_checked"] == 100
    refused, out = select(copied, "consensus", "--consensus", "5", expect=2)
    assert "ConfigError" in refused.stderr and "without --consensus" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()


def _plan(world, work: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    clip = ["--clip-model", str(world["config"]), "--clip-weights", str(world["weights"])]
    quick = ["--keeps", "5%,20%", "--screen-steps", "3", "--confirm-steps", "3", "--quiet"]
    args = [*cli("plada-send"), "plan", str(work), *clip, *quick, *extra]
    return run(args, cli_env(), expect=expect)


def test_plan_on_stored_embeddings_picks_a_payload_the_receiver_trains(world, probe_work) -> None:
    """score --embeddings (probe) -> plan (split probe streamed over the store, proxies on
    its thumbnails) -> select --plan -> plada-receive train, all through the CLIs."""
    work = probe_work
    task = ["--task", str(world["root"] / "task")]
    scenery = ["--deployment", str(world["root"] / "task" / "test")]  # its labels unread
    planned = _plan(world, work, *task, *scenery)
    assert "chosen:" in planned.stdout and "deployment: 100 images" in planned.stdout
    plan = json.loads((work / "plan" / "plan.json").read_text())
    assert plan["split"]["validation"] > 0 and "thumbnails (32 px)" in plan["proxy"]
    assert plan["deployment"]["deployment_images"] == 100
    assert plan["deployment"]["feature"] == "CLIP embeddings"  # not the thumbnails' pixels
    assert {row["candidate"]["keep"] for row in plan["candidates"]} == {0.05, 0.2}
    predictions = [row["predicted_accuracy"] for row in plan["candidates"]]
    assert all(0.0 <= p <= 1.0 for p in predictions) and len(set(predictions)) > 1
    payload = work / "plan.plada"
    run(
        [
            *cli("plada-send"),
            "select",
            str(work),
            "--plan",
            str(work / "plan"),
            "--unsigned",
            "--out",
            str(payload),
        ],
        cli_env(),
    )
    trained = run(
        [
            *cli("plada-receive"),
            "train",
            str(payload),
            "--reference",
            str(world["root"] / "tree"),
            "--cache-dir",
            str(world["root"] / "cache"),
            "--allow-unsigned",
            "--min-steps",
            "3",
            "--max-steps",
            "3",
            "--no-export",
            "--quiet",
            "--out",
            str(work / "student"),
        ],
        cli_env(),
    )
    assert (work / "student" / "report.json").is_file(), trained.stdout


def test_plan_refuses_stores_it_cannot_plan_on_with_the_fix(
    world, embedded, scored_by, tmp_path
) -> None:
    """No thumbnails, damaged or truncated ones, another size, a zero-shot work directory
    without labeled images: each a one-line typed error naming the fix, exit 2, no plan."""
    store = tmp_path / "emb"
    shutil.copytree(embedded, store)
    work = tmp_path / "work"
    task = ["--task", str(world["root"] / "task")]
    _score(world, store, work, "--teacher", "probe", *task)
    pixels = store / "thumbnails.u8"
    original = pixels.read_bytes()

    def refused(*extra: str) -> str:
        proc = _plan(world, work, *task, *extra, expect=2)
        assert "Traceback" not in proc.stderr and not (work / "plan").exists()
        return proc.stderr.strip().splitlines()[-1]

    assert "holds 32x32 thumbnails, the plan asks for 16x16" in refused("--proxy-size", "16")
    damaged = bytearray(original)
    damaged[len(damaged) // 2 :] = bytes(len(damaged) - len(damaged) // 2)
    pixels.write_bytes(bytes(damaged))
    error = refused()
    assert "ThumbnailError" in error and "fail their checksum" in error
    assert "--thumbnails 32" in error
    pixels.write_bytes(original[:-100])
    error = refused()
    assert "is damaged (" in error and "expected" in error
    pixels.write_bytes(original)
    (store / "thumbnails.json").unlink()
    error = refused()
    assert "has no thumbnails" in error and "--thumbnails 32" in error and "merge" in error
    zero_shot = scored_by("zeroshot")
    proc = _plan(world, zero_shot, expect=2)
    assert "TaskDataError" in proc.stderr and "no labeled task images" in proc.stderr
    assert "--task DIR" in proc.stderr and not (zero_shot / "plan").exists()
