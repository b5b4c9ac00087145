"""A fleet whose reference copies differ, through the real CLIs: a copy with missing or
damaged files, another release, and a canonical manifest of another reference set."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from receiver.ledger import SequenceLedger
from tests.subprocess_cli import cli, cli_env, run
from tests.worlds import write_reference_tree, write_task_tree

BLOCKS, PER_BLOCK = 12, 20
SHORT_TRAINING = ["--epochs", "1", "--max-steps", "5", "--no-export", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, small_pool) -> dict[str, Path]:
    """A reference tree, its canonical manifest, a task scored on it, a signing key."""
    from protocol.world.digits import load_digits_split

    root = tmp_path_factory.mktemp("fleet")
    write_reference_tree(small_pool, root / "tree", PER_BLOCK, BLOCKS)
    train, _ = load_digits_split()
    write_task_tree(train, root / "task", limit_per_class=15)
    send, env = cli("plada-send"), cli_env()
    cache = ["--cache-dir", str(root / "cache")]
    manifest = root / "canonical.manifest"
    run(
        [*send, "reference", "--reference", str(root / "tree"), "--manifest-out", str(manifest)],
        env,
    )
    score = [
        *send,
        "score",
        "--reference",
        str(root / "tree"),
        *cache,
        "--train",
        str(root / "task"),
    ]
    run([*score, "--out", str(root / "work"), "--quiet"], env)
    run([*send, "keygen", "--sender-id", "station", "--out", str(root / "station")], env)
    trust = ["--trust", str(root / "trust")]
    run([*cli("plada-receive"), "trust", "add", str(root / "station.pub"), *trust], env)
    return {"root": root, "manifest": manifest}


def _select(world, name: str, *extra: str) -> tuple[Path, dict]:
    root = world["root"]
    payload, summary = root / f"{name}.plada", root / f"{name}.json"
    select = [*cli("plada-send"), "select", str(root / "work"), "--no-sheet"]
    select += ["--signing-key", str(root / "station.key"), "--out", str(payload)]
    run([*select, "--json", str(summary), *extra], cli_env())
    return payload, json.loads(summary.read_text())


def _device(world, copy: Path, ledger: Path) -> list[str]:
    """The options of a device holding ``copy`` with the canonical manifest."""
    root = world["root"]
    return [
        "--reference",
        str(copy),
        "--canonical",
        str(world["manifest"]),
        "--cache-dir",
        str(root / "device-cache"),
        "--trust",
        str(root / "trust"),
        "--ledger",
        str(ledger),
    ]


def _train(world, payload: Path, device: list[str], out: Path, expect: int = 0, *extra: str):
    train = [*cli("plada-receive"), "train", str(payload), *device, "--out", str(out)]
    return run([*train, *SHORT_TRAINING, *extra], cli_env(), expect=expect)


def _copy_without(world, name: str, keys: list[str]) -> Path:
    copy = world["root"] / name
    shutil.copytree(world["root"] / "tree", copy)
    for key in keys:
        (copy / f"{key}.JPEG").unlink()
    return copy


def _kept_keys(world, payload: Path) -> list[str]:
    from protocol.manifest import ReferenceManifest
    from protocol.payload import decode_payload

    manifest = ReferenceManifest.load(world["manifest"])
    decoded = decode_payload(payload.read_bytes(), reference=manifest, trust=None)
    return [manifest.keys[i] for i in decoded.indices]


def test_missing_files_are_skipped_above_the_threshold_and_refused_below_it(world) -> None:
    payload, summary = _select(world, "half", "--keep", "0.5")
    kept = _kept_keys(world, payload)
    assert summary["kept"] == len(kept) == 120
    ledger = world["root"] / "missing-ledger.sqlite"
    # six of the 120 kept images missing (95%): refused before anything is recorded
    copy = _copy_without(world, "copy-missing", kept[:6])
    device = _device(world, copy, ledger)
    refused = _train(world, payload, device, world["root"] / "refused", expect=2)
    assert "CoverageError" in refused.stderr and "114 of the payload's 120" in refused.stderr
    assert "restore the missing reference images" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (world["root"] / "refused").exists()
    assert SequenceLedger(ledger, read_only=True).last("station") is None  # not burnt
    # five of them back: one of 120 missing (99.2%, its class 90%+) trains, and says so
    for key in kept[1:6]:
        shutil.copy(world["root"] / "tree" / f"{key}.JPEG", copy / f"{key}.JPEG")
    listed = run([*cli("plada-receive"), "reference", *device[:6], "--quiet"], cli_env())
    assert (
        "239 of 240 rows" in listed.stdout and f"{kept[0].split('/')[0]}: 19 of 20" in listed.stdout
    )
    trained = _train(world, payload, device, world["root"] / "trained")
    assert "trained on the 119 of 120 kept images" in trained.stdout
    report = json.loads((world["root"] / "trained" / "report.json").read_text())
    assert report["coverage"]["present"] == 119 and report["coverage"]["kept"] == 120
    assert report["kept"] == 119
    assert SequenceLedger(ledger, read_only=True).last("station") is not None


@pytest.fixture(scope="module")
def release(world) -> dict:
    """Another release: two folders and one more file fewer; its availability listed
    on the device and registered at the station as release ``winter``."""
    from protocol.manifest import ReferenceManifest

    keys = ReferenceManifest.load(world["manifest"]).keys
    dropped = [k for k in keys if k.split("/")[0] in ("n00000002", "n00000005")] + [keys[3]]
    copy = _copy_without(world, "release-b", dropped)
    avail = world["root"] / "release-b.avail"
    device = _device(world, copy, world["root"] / "release-ledger.sqlite")
    out = ["--availability-out", str(avail), "--quiet"]
    built = run(
        [*cli("plada-receive"), "reference", *device[:6], "--check", "exists", *out], cli_env()
    )
    fleet = str(world["root"] / "fleet")
    added = run(
        [*cli("plada-send"), "fleet", "add", "winter", str(avail), "--fleet", fleet], cli_env()
    )
    return {
        "copy": copy,
        "dropped": dropped,
        "device": device,
        "fleet": fleet,
        "built": built.stdout,
        "added": added.stdout,
    }


def test_another_release_trains_a_payload_restricted_to_what_it_holds(world, release) -> None:
    assert "199 of 240 rows" in release["built"] and "2 absent" in release["built"]
    assert "registered release winter: 199 of 240" in release["added"]
    dropped, device, fleet = release["dropped"], release["device"], release["fleet"]
    full, _ = _select(world, "for-all", "--keep", "0.25")
    assert set(_kept_keys(world, full)) & set(dropped)  # made for the whole set
    restricted, summary = _select(world, "for-winter", "--keep", "0.25", "--fleet", fleet)
    assert not set(_kept_keys(world, restricted)) & set(dropped)
    assert summary["kept"] == 60 and summary["fleet"]["releases"] == ["winter"]
    refused = _train(world, full, device, world["root"] / "winter-full", expect=2)
    assert "CoverageError" in refused.stderr and "plada-send fleet add" in refused.stderr
    trained = _train(world, restricted, device, world["root"] / "winter-restricted")
    assert "coverage" not in trained.stdout  # every kept image is here
    report = json.loads((world["root"] / "winter-restricted" / "report.json").read_text())
    assert report["coverage"]["present"] == report["coverage"]["kept"] == 60


def test_a_canonical_manifest_of_another_reference_set_is_refused(world, tmp_path) -> None:
    from protocol.manifest import ReferenceManifest

    payload, _ = _select(world, "any", "--keep", "0.1")
    other = ReferenceManifest.load(world["manifest"])
    ReferenceManifest("other", other.keys[1:]).save(tmp_path / "other.manifest")
    device = _device(world, world["root"] / "tree", tmp_path / "ledger.sqlite")
    device[3] = str(tmp_path / "other.manifest")
    verify = [*cli("plada-receive"), "verify", str(payload), *device]
    refused = run(verify, cli_env(), expect=2)
    assert "ReferenceMismatchError" in refused.stderr
    (tmp_path / "torn.manifest").write_bytes(world["manifest"].read_bytes()[:-30])
    device[3] = str(tmp_path / "torn.manifest")
    torn = run([*cli("plada-receive"), "verify", str(payload), *device], cli_env(), expect=2)
    assert "ManifestError" in torn.stderr and "truncated" in torn.stderr


def test_damaged_files_count_as_missing_when_decoded(world) -> None:
    from protocol.manifest import ReferenceManifest

    keys = ReferenceManifest.load(world["manifest"]).keys
    copy = _copy_without(world, "copy-damaged", [])
    for key in keys[:2]:  # torn in half: the key is there, the image is not
        file = copy / f"{key}.JPEG"
        file.write_bytes(file.read_bytes()[:100])
    device = _device(world, copy, world["root"] / "damaged-ledger.sqlite")
    intact = _device(world, world["root"] / "tree", world["root"] / "intact-ledger.sqlite")
    whole = run([*cli("plada-receive"), "reference", *intact[:6], "--quiet"], cli_env())
    assert "240 of 240 rows" in whole.stdout  # the same keys elsewhere: cached apart
    report = world["root"] / "damaged.json"
    args = [*cli("plada-receive"), "reference", *device[:6], "--json", str(report), "--quiet"]
    decoded = run(args, cli_env())
    assert "238 of 240 rows" in decoded.stdout and "(decoded)" in decoded.stdout
    folders = json.loads(report.read_text())["folders"]
    assert folders[keys[0].split("/")[0]] == [18, 20]
    listed = run([*args, "--check", "exists"], cli_env())
    assert "240 of 240 rows" in listed.stdout  # listing alone cannot see the damage


def test_the_daemon_refuses_a_payload_its_release_lacks_without_burning_it(
    world, release, tmp_path
) -> None:
    from tests.subprocess_cli import daemon_command

    home = tmp_path / "home"
    run(
        [
            *cli("plada-receive"),
            "trust",
            "add",
            str(world["root"] / "station.pub"),
            "--trust",
            str(home / "trust"),
        ],
        cli_env(),
    )
    restricted, _ = _select(world, "daemon-winter", "--keep", "0.25", "--fleet", release["fleet"])
    full, _ = _select(world, "daemon-all", "--keep", "0.25")  # signed after: a newer sequence
    (home / "inbox").mkdir()
    for payload in (restricted, full):
        shutil.copy(payload, home / "inbox" / payload.name)
    args = daemon_command(home, str(release["copy"]), world["root"] / "device-cache")
    args += ["--canonical", str(world["manifest"]), "--exit-when-idle", *SHORT_TRAINING[:4]]
    done = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reasons = [json.loads(p.read_text()) for p in (home / "quarantine").glob("*.reason.json")]
    assert [(r["file"], r["error"]) for r in reasons] == [("daemon-all.plada", "CoverageError")]
    status = run([*cli("plada-receive"), "status", "--home", str(home)], cli_env()).stdout
    assert "reference copy: 199 of 240 canonical images present" in status
    assert "1 done" in status
    from protocol.payload import decode_payload

    stamp = decode_payload(restricted.read_bytes(), trust=None).sender
    ledger = SequenceLedger(home / "ledger.sqlite", read_only=True)
    assert ledger.last("station") == stamp.sequence  # the refused newer one is not recorded


def test_plan_for_the_fleet_sends_for_the_fleet_it_planned_for(world, release) -> None:
    root, send = world["root"], cli("plada-send")
    plan = root / "work" / "fleet-plan"
    args = [*send, "plan", str(root / "work"), "--reference", str(root / "tree")]
    args += ["--cache-dir", str(root / "cache"), "--train", str(root / "task")]
    args += ["--keeps", "25%", "--screen-steps", "4", "--confirm-steps", "8"]
    args += ["--teacher-splits", "1"]  # the splits are tested in test_plan.py
    args += ["--teacher-epochs", "2", "--fleet", release["fleet"], "--out", str(plan), "--quiet"]
    run(args, cli_env())
    planned = json.loads((plan / "plan.json").read_text())
    assert planned["fleet"]["releases"] == ["winter"] and planned["fleet"]["rows_excluded"] == 41
    payload, summary = _select(world, "planned-winter", "--plan", str(plan))
    assert summary["fleet"]["releases"] == ["winter"]
    assert not set(_kept_keys(world, payload)) & set(release["dropped"])
    # release winter registered again since the plan, from another copy: plan again
    fleet = Path(release["fleet"])
    changed = fleet.with_name("fleet-changed")
    shutil.copytree(fleet, changed)
    whole = root / "whole.avail"
    device = _device(world, root / "tree", root / "whole-ledger.sqlite")
    out = ["--check", "exists", "--availability-out", str(whole), "--quiet"]
    run([*cli("plada-receive"), "reference", *device[:6], *out], cli_env())
    shutil.copy(whole, changed / "winter.avail")
    moved = root / "work" / "fleet-plan-moved"
    shutil.copytree(plan, moved)
    json_plan = json.loads((moved / "plan.json").read_text())
    assert json_plan["settings"]["fleet"]["folder"] == release["fleet"]
    json_plan["settings"]["fleet"]["folder"] = str(changed)
    (moved / "plan.json").write_text(json.dumps(json_plan))
    select = [*send, "select", str(root / "work"), "--plan", str(moved), "--no-sheet"]
    select += ["--signing-key", str(root / "station.key"), "--out", str(root / "stale.plada")]
    refused = run(select, cli_env(), expect=2)
    assert "changed since the plan was made" in refused.stderr
    assert not (root / "stale.plada").exists()
