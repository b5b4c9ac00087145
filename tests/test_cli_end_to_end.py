"""The real CLIs in subprocesses: sender -> payload file -> receiver, on a reduced world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from receiver.ledger import SequenceLedger
from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, daemon_command, run


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import os

    from tests.conftest import ROOT

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    root = tmp_path_factory.mktemp("e2e")
    task, work = root / "task", root / "work"
    sender_cache, receiver_cache = root / "sender-cache", root / "receiver-cache"
    send, receive = cli("plada-send"), cli("plada-receive")
    run([*send, "task", "digits", "--out", str(task)], env)
    run(
        [
            *send,
            "score",
            "--reference",
            SMALL_SPEC,
            "--cache-dir",
            str(sender_cache),
            "--train",
            str(task / "train.npz"),
            "--test",
            str(task / "test.npz"),
            "--out",
            str(work),
            "--teacher-epochs",
            "15",
            "--quiet",
        ],
        env,
    )
    key, trust = root / "keys" / "station-1", root / "trust"
    run([*send, "keygen", "--sender-id", "station-1", "--out", str(key)], env)
    run([*receive, "trust", "add", f"{key}.pub", "--trust", str(trust)], env)
    payload = root / "task.plada"
    selected = run(
        [
            *send,
            "select",
            str(work),
            "--keep",
            "0.1",
            "--out",
            str(payload),
            "--json",
            str(root / "select.json"),
            "--signing-key",
            f"{key}.key",
        ],
        env,
    )
    trained = run(
        [
            *receive,
            "train",
            str(payload),
            "--reference",
            SMALL_SPEC,
            "--trust",
            str(trust),
            "--cache-dir",
            str(receiver_cache),
            "--holdout",
            str(task / "test.npz"),
            "--min-steps",
            "150",
            "--max-steps",
            "150",
            "--out",
            str(root / "student"),
            "--quiet",
        ],
        env,
    )
    return {
        "root": root,
        "payload": payload,
        "env": env,
        "select_out": selected.stdout,
        "train_out": trained.stdout,
        "receiver_cache": receiver_cache,
        "key": key,
        "trust": trust,
        "work": work,
    }


def _verify(
    flow,
    payload: Path,
    *extra: str,
    expect: int = 0,
    reference: str = SMALL_SPEC,
    own_ledger: bool = False,
):
    """`verify` against a ledger that has accepted nothing (`train` recorded the payload's
    sequence number in TRUST/ledger.sqlite, so there it would be a replay); with
    ``own_ledger``, against TRUST/ledger.sqlite itself."""
    if not own_ledger:
        extra = ("--ledger", str(flow["root"] / "empty-ledger.sqlite"), *extra)
    return run(
        [
            *cli("plada-receive"),
            "verify",
            str(payload),
            "--reference",
            reference,
            "--cache-dir",
            str(flow["receiver_cache"]),
            "--trust",
            str(flow["trust"]),
            *extra,
        ],
        flow["env"],
        expect=expect,
    )


def test_student_beats_chance_and_payload_is_small(flow) -> None:
    report = json.loads((flow["root"] / "student" / "report.json").read_text())
    assert report["accuracy_mean"] > 0.4, report  # 10 classes: chance is 0.1
    size = flow["payload"].stat().st_size
    assert size < 1_000_000 and report["payload_bytes"] == size
    assert (flow["root"] / "student" / "model-seed0.pt").is_file()
    summary = json.loads((flow["root"] / "select.json").read_text())
    assert summary["leakage"]["test_images_checked"] == 899
    assert "payload" in flow["select_out"] and "holdout accuracy" in flow["train_out"]


def test_receiver_verifies_good_payload(flow) -> None:
    out = _verify(flow, flow["payload"])
    assert out.stdout.startswith("ok:") and "signed by station-1" in out.stdout
    assert "accepted: signed by station-1" in flow["train_out"]


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda b: b[: len(b) // 2], "TruncatedPayloadError"),
        (lambda b: b"not a payload at all", "NotAPayloadError"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "BadSignatureError"),
        (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "BadSignatureError"),
    ],
)
def test_receiver_rejects_damaged_payloads(flow, damage, error) -> None:
    bad = flow["root"] / "bad.plada"
    bad.write_bytes(damage(flow["payload"].read_bytes()))
    out = _verify(flow, bad, expect=2)
    assert error in out.stderr and "Traceback" not in out.stderr


def test_receiver_rejects_payload_for_another_reference(flow) -> None:
    other = SMALL_SPEC.replace("glyphs:", "glyphs:seed=7,")
    out = _verify(flow, flow["payload"], expect=2, reference=other)
    assert "ReferenceMismatchError" in out.stderr and "sync the reference set" in out.stderr


def test_trust_replay_and_unsigned_through_the_clis(flow) -> None:
    """Without the sender's key the payload is refused; train records the payload, so
    verify knows it was accepted here, and an older payload never accepted is a rollback;
    an unsigned payload needs --allow-unsigned; trust list/remove work."""
    env, root = flow["env"], flow["root"]
    (root / "no-keys").mkdir(exist_ok=True)  # a trust store that trusts nobody
    empty = _verify(flow, flow["payload"], "--trust", str(root / "no-keys"), expect=2)
    assert "UnknownSenderError" in empty.stderr and "trust add" in empty.stderr
    assert "--home" in empty.stderr  # the hint also names a daemon's store
    recorded = str(flow["trust"] / "ledger.sqlite")
    seen = _verify(flow, flow["payload"], "--ledger", recorded).stdout
    assert "accepted before on this device" in seen
    # a payload older than one this device accepted, never accepted itself: a rollback
    older = root / "older.plada"
    older.write_bytes(flow["payload"].read_bytes())
    ledger = SequenceLedger(root / "rollback-ledger.sqlite")
    signed = json.loads((root / "select.json").read_text())["signed"]
    ledger.record(signed["sender"], signed["sequence"] + 1, "a newer payload's digest")
    ledger.close()
    rolled = _verify(flow, older, "--ledger", str(root / "rollback-ledger.sqlite"), expect=2)
    assert "RollbackError" in rolled.stderr and len(rolled.stderr.splitlines()) == 1
    assert "selects it again (`plada-send select`" in rolled.stderr  # the fix, named
    # select and verify say up front what accepting a payload means for older ones
    sequence = signed["sequence"]
    told = "refuses, as rollbacks, the payloads of station-1 signed before it (sequence < "
    assert f"{told}{sequence})" in flow["select_out"]
    fresh = _verify(flow, flow["payload"]).stdout
    said = "order: none accepted here yet; once this one is accepted, payloads of station-1 "
    assert f"{said}signed before it (sequence < {sequence}) are refused here" in fresh
    unsigned = root / "unsigned.plada"
    run(
        [
            *cli("plada-send"),
            "select",
            str(flow["work"]),
            "--keep",
            "0.1",
            "--unsigned",
            "--out",
            str(unsigned),
        ],
        env,
    )
    assert "UnsignedPayloadError" in _verify(flow, unsigned, expect=2).stderr
    assert "UNSIGNED" in _verify(flow, unsigned, "--allow-unsigned").stdout
    missing = run(
        [*cli("plada-send"), "select", str(flow["work"]), "--out", str(unsigned)], env, expect=2
    )
    assert "--signing-key" in missing.stderr
    trust = ["--trust", str(root / "trust-copy")]
    run([*cli("plada-receive"), "trust", "add", f"{flow['key']}.pub", *trust], env)
    listed = run([*cli("plada-receive"), "trust", "list", *trust], env)
    assert "station-1" in listed.stdout and "1 trusted key(s)" in listed.stdout
    run([*cli("plada-receive"), "trust", "remove", "station-1", *trust], env)
    assert "0 trusted key(s)" in run([*cli("plada-receive"), "trust", "list", *trust], env).stdout


def test_daemon_trains_the_senders_payload_to_the_same_accuracy(flow) -> None:
    """The sender's payload dropped in a daemon's inbox: same student as `train` gives."""
    home = flow["root"] / "daemon-home"
    (home / "inbox").mkdir(parents=True)
    (home / "inbox" / "task.plada").write_bytes(flow["payload"].read_bytes())
    run(
        [*cli("plada-receive"), "trust", "add", f"{flow['key']}.pub", "--home", str(home)],
        flow["env"],
    )
    run(
        daemon_command(
            home,
            SMALL_SPEC,
            flow["receiver_cache"],
            "--holdout",
            str(flow["root"] / "task" / "test.npz"),
            "--min-steps",
            "150",
            "--max-steps",
            "150",
            "--exit-when-idle",
        ),
        flow["env"],
    )
    (result,) = (home / "results").iterdir()
    daemon_report = json.loads((result / "report.json").read_text())
    train_report = json.loads((flow["root"] / "student" / "report.json").read_text())
    assert daemon_report["accuracy_mean"] == train_report["accuracy_mean"] > 0.4
    assert (result / "model-seed0.pt2").is_file() and (result / "training-curve.png").is_file()


# --- a newcomer's first hour: careless input never costs a payload or shows a traceback


def _cli(flow, name: str, *args: str, expect: int = 0):
    proc = run([*cli(name), *args], flow["env"], expect=expect)
    if expect == 2:  # one typed line, never a traceback
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"{name}: error: "), lines
    return proc


def _train(flow, out: Path, *extra: str, expect: int = 0, export: bool = False):
    steps = ["--min-steps", "12", "--max-steps", "12", *([] if export else ["--no-export"])]
    return _cli(
        flow,
        "plada-receive",
        "train",
        str(flow["payload"]),
        "--reference",
        SMALL_SPEC,
        "--cache-dir",
        str(flow["receiver_cache"]),
        "--trust",
        str(flow["trust"]),
        "--out",
        str(out),
        "--quiet",
        *steps,
        *extra,
        expect=expect,
    )


def test_local_mistakes_before_acceptance_cost_no_payload(flow) -> None:
    """A typo in --holdout, an empty or mismatched holdout, a .npy, an --out that cannot be
    written: each is a typed error, and the payload is not used up (it trains after)."""
    import shutil

    import numpy as np

    root = flow["root"]
    device = root / "another-device-trust"  # trusts the station; has accepted nothing yet
    device.mkdir()
    for key in flow["trust"].glob("*.pub"):
        shutil.copy(key, device)
    flow = {**flow, "trust": device}
    test = np.load(root / "task" / "test.npz")
    np.save(root / "holdout.npy", test["images"])
    np.savez(
        root / "empty.npz",
        images=test["images"][:0],
        labels=test["labels"][:0],
        class_names=test["class_names"],
    )
    renamed = np.array([f"class-{name}" for name in test["class_names"]])
    np.savez(
        root / "renamed.npz", images=test["images"], labels=test["labels"], class_names=renamed
    )
    (root / "a-file").write_text("in the way")
    cases = [
        (["--holdout", str(root / "task" / "tset.npz")], "TaskDataError", "does not exist"),
        (["--holdout", str(root / "holdout.npy")], "TaskDataError", "single .npy array"),
        (["--holdout", str(root / "empty.npz")], "TaskDataError", "holds no images"),
        (["--holdout", str(root / "renamed.npz")], "TaskDataError", "'class-0'"),
        (["--model", "resnet-9000"], "ConfigError", "unknown model"),
    ]
    for extra, error, detail in cases:
        out = _train(flow, root / "student-mistake", *extra, expect=2)
        assert error in out.stderr and detail in out.stderr, out.stderr
        assert not (root / "student-mistake").exists()  # no empty --out left behind
    unwritable = _train(flow, root / "a-file" / "student", expect=2)
    assert "StorageError" in unwritable.stderr and "--out" in unwritable.stderr
    good = _train(
        flow,
        str(root / "student-first") + "/",
        "--holdout",
        str(root / "task/test.npz"),
        export=True,
    )
    assert "accepted: signed by station-1" in good.stdout
    assert f"report: {root / 'student-first' / 'report.json'}" in good.stdout
    assert "No complete tensor" not in good.stderr  # the export's warning, fixed
    assert (root / "student-first" / "model-seed0.pt2").is_file()
    report = json.loads((root / "student-first" / "report.json").read_text())
    assert report["task"] == "digits"  # the task's own name, not the file's ("train")
    history = report["runs"][0]["history"]
    assert "holdout_accuracy" in history[-1] and history[-1]["step"] == 12


def test_an_accepted_payload_trains_again_but_never_into_a_used_out(flow) -> None:
    root = flow["root"]
    again = _train(flow, root / "student-seed1", "--seeds", "1")
    assert "accepted before on this device, training again" in again.stdout
    assert sorted(p.name for p in (root / "student-seed1").glob("model-*")) == ["model-seed1.pt"]
    mixed = _train(flow, root / "student-seed1", "--seeds", "2", expect=2)
    assert "other settings or seeds" in mixed.stderr and "--overwrite" in mixed.stderr
    _train(flow, root / "student-seed1", "--seeds", "2", "--overwrite")
    assert sorted(p.name for p in (root / "student-seed1").glob("model-*")) == ["model-seed2.pt"]


def test_sender_refuses_careless_task_files_and_tiny_selections(flow) -> None:
    import numpy as np
    from PIL import Image

    root = flow["root"]
    train = np.load(root / "task" / "train.npz")
    np.savez(
        root / "tiny.npz",
        images=train["images"][:, :, ::4, ::4],
        labels=train["labels"],
        class_names=train["class_names"],
    )
    np.savez(
        root / "float.npz",
        images=train["images"],
        labels=train["labels"] + 0.5,
        class_names=train["class_names"],
    )
    np.save(root / "train.npy", train["images"])
    score = [
        "score",
        "--reference",
        SMALL_SPEC,
        "--cache-dir",
        str(root / "sender-cache"),
        "--teacher-epochs",
        "1",
        "--quiet",
    ]
    for task, detail in [
        ("tiny.npz", "1x8x8"),
        ("float.npz", "whole class numbers"),
        ("train.npy", "single .npy array"),
    ]:
        out = _cli(
            flow,
            "plada-send",
            *score,
            "--train",
            str(root / task),
            "--out",
            str(root / "scored-bad"),
            expect=2,
        )
        assert "TaskDataError" in out.stderr and detail in out.stderr, out.stderr
    folder = root / "my-glyph-task" / "train"  # a user's ImageFolder of RGB 16x16 PNGs
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(train["labels"] == label)[:6]:
            rgb = np.repeat(train["images"][i, 0, ::2, ::2][..., None], 3, axis=2)[:20, :20]
            Image.fromarray(np.ascontiguousarray(rgb)).save(folder / str(label) / f"{i}.png")
    scored = _cli(
        flow, "plada-send", *score, "--train", str(folder), "--out", str(root / "scored-folder")
    )
    assert "converted 60 images" in scored.stdout and "grayscale 32x32" in scored.stdout
    summary = json.loads((root / "scored-folder" / "score_report.json").read_text())
    assert summary["task"] == "my-glyph-task"
    select = ["select", str(root / "scored-folder"), "--unsigned", "--no-sheet", "--out"]
    tiny = _cli(flow, "plada-send", *select, str(root / "tiny.plada"), "--keep", "1e-9", expect=2)
    assert "fewer than the task's 10 classes" in tiny.stderr
    assert not (root / "tiny.plada").exists()
    thin = _cli(flow, "plada-send", *select, str(root / "thin.plada"), "--keep", "0.02")
    assert "warning: only" in thin.stdout


def test_unwritable_outputs_and_a_missing_trust_store_are_typed_errors(flow) -> None:
    root = flow["root"]
    (root / "not-a-dir").write_text("a file")
    task = _cli(
        flow, "plada-send", "task", "digits", "--out", str(root / "not-a-dir" / "t"), expect=2
    )
    assert "StorageError" in task.stderr and "--out" in task.stderr
    key = _cli(
        flow,
        "plada-send",
        "keygen",
        "--sender-id",
        "s",
        "--out",
        str(root / "not-a-dir" / "k"),
        expect=2,
    )
    assert "StorageError" in key.stderr
    missing = root / "no-such-trust"
    verify = _verify(flow, flow["payload"], "--trust", str(missing), expect=2)
    assert "TrustStoreError" in verify.stderr and "does not exist" in verify.stderr
    assert not missing.exists()
    before = sorted(p.name for p in flow["trust"].iterdir())
    _verify(flow, flow["payload"], own_ledger=True)
    assert sorted(p.name for p in flow["trust"].iterdir()) == before  # verify writes nothing


def test_trust_add_takes_the_store_before_or_after_the_keys(flow) -> None:
    store = flow["root"] / "trust-either-order"
    _cli(flow, "plada-receive", "trust", "add", "--trust", str(store), f"{flow['key']}.pub")
    _cli(flow, "plada-receive", "trust", "add", f"{flow['key']}.pub", "--trust", str(store))
    listed = _cli(flow, "plada-receive", "trust", "list", "--trust", str(store))
    assert "1 trusted key(s)" in listed.stdout


def test_help_shows_defaults_and_a_mistyped_flag_its_own_usage(flow) -> None:
    helped = " ".join(_cli(flow, "plada-receive", "train", "--help").stdout.split())
    assert "default 250, or 0 with --epochs" in helped and "capped at --max-steps" in helped
    assert "``" not in _cli(flow, "plada-send", "--help").stdout
    assert (
        "as `plada-receive status` lists it"
        in _cli(flow, "plada-receive", "retry", "--help").stdout
    )
    wrong = run(
        [*cli("plada-send"), "select", "w", "--kepe", "0.1", "--out", "x"], flow["env"], expect=2
    )
    assert "usage: plada-send select" in wrong.stderr and "--kepe" in wrong.stderr


def test_status_into_a_closed_pipe_ends_quietly(flow) -> None:
    import subprocess

    from receiver.job_queue import JobQueue

    home = flow["root"] / "status-home"
    home.mkdir()
    JobQueue(home / "queue.sqlite").close()
    proc = subprocess.Popen(
        [*cli("plada-receive"), "status", "--home", str(home)],
        env=flow["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # like `| head` that has already exited
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and proc.returncode == 141, err


def test_the_contact_sheet_shows_what_the_payload_teaches(flow) -> None:
    from PIL import Image

    sheet = flow["payload"].with_name("task.selection.png")
    assert "contact sheet: " in flow["select_out"] and sheet.is_file()
    with Image.open(sheet) as image:
        width, height = image.size
    assert width > 600 and height > 10 * 60  # ten class rows of sample images


EMBED_WITHOUT_OUT = ["plada-send", "embed", "--clip-model", "m", "--clip-weights", "w"]


def test_path_mistakes_are_one_line_storage_errors(flow) -> None:
    """A missing or read-only parent, or a file where a directory belongs, given to any
    command's output or state path: exit 2, one line naming the path, no traceback."""
    root = flow["root"]
    blocker = root / "a-file"
    blocker.write_text("not a directory")
    pub = f"{flow['key']}.pub"
    cases = {
        "score --out /proc": ["plada-send", "score", "--train", "x.npz", "--out", "/proc/scored"],
        "score --out a file": ["plada-send", "score", "--train", "x.npz", "--out", str(blocker)],
        "embed --out a file": [*EMBED_WITHOUT_OUT, "--out", str(blocker)],
        "trust add /proc": ["plada-receive", "trust", "add", pub, "--trust", "/proc/trust"],
        "trust add a file": ["plada-receive", "trust", "add", pub, "--trust", str(blocker)],
        "daemon --home /proc": ["plada-receive", "daemon", "--home", "/proc/home"],
        "daemon --home a file": ["plada-receive", "daemon", "--home", str(blocker / "home")],
    }
    for case, (name, *args) in cases.items():
        failed = run([*cli(name), *args], flow["env"], expect=2)
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and "StorageError" in lines[0], (case, failed.stderr)
        assert "Traceback" not in failed.stderr, case
    assert blocker.read_text() == "not a directory"


def test_a_typo_in_a_store_or_a_key_prefix_is_an_error(flow) -> None:
    missing = flow["root"] / "no-such-store"
    listed = run(
        [*cli("plada-receive"), "trust", "list", "--trust", str(missing)], flow["env"], expect=2
    )
    assert "TrustStoreError: there is no trust store at" in listed.stderr
    assert not missing.exists()
    keys = flow["root"] / "keys-dir"
    keys.mkdir()
    for out in (f"{keys}/", str(keys)):
        made = run(
            [*cli("plada-send"), "keygen", "--sender-id", "s2", "--out", out], flow["env"], 2
        )
        assert f"give {keys / 's2'}" in made.stderr, made.stderr
    assert not list(keys.iterdir())  # no hidden .key / .pub


def test_train_stopped_by_a_signal_keeps_its_checkpoint_and_resumes(flow) -> None:
    """Ctrl-C (exit 130) or SIGTERM (143) to `train`: one line, a checkpoint kept; the
    same command resumes from it and finishes."""
    import signal
    import subprocess

    out = flow["root"] / "student-stopped"
    command = [
        *cli("plada-receive"), "train", str(flow["payload"]), "--reference", SMALL_SPEC,
        "--trust", str(flow["trust"]), "--cache-dir", str(flow["receiver_cache"]),
        "--ledger", str(flow["root"] / "stop-ledger.sqlite"),
        "--min-steps", "150", "--max-steps", "150", "--out", str(out), "--quiet",
    ]  # fmt: skip
    checkpoint = out / ".job" / "seed0.ckpt"
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = subprocess.Popen(
            command, env=flow["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        while not proc.stdout.readline().startswith("accepted"):  # signals stop it from here
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == status, stdout + stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "checkpoint is kept in" in lines[0], stderr
        assert checkpoint.is_file()
    from receiver.workers import OutputDirLock

    held = OutputDirLock(out)  # as a second `train` into the same --out would
    try:
        busy = run(command, flow["env"], expect=2)
    finally:
        held.release()
    assert "another `plada-receive train` is writing to --out" in busy.stderr
    finished = run(command, flow["env"])
    report = json.loads((out / "report.json").read_text())
    assert report["runs"][0]["resumed_from_step"] > 0, finished.stdout
    assert not checkpoint.exists() and "earlier result" not in finished.stdout
    again = run(command, flow["env"])
    assert "the report below is that earlier result" in again.stdout


def test_a_broken_image_in_an_imagefolder_holdout_is_skipped_and_counted(flow) -> None:
    """One damaged JPEG among a holdout's files: train skips it, says so and reports it."""
    from PIL import Image

    from protocol.task_data import load_labeled_images

    root = flow["root"]
    test = load_labeled_images(root / "task" / "test.npz")
    folder = root / "holdout-folder"
    for label, name in enumerate(test.class_names):  # four readable images per class
        (folder / name).mkdir(parents=True, exist_ok=True)
        for row in (test.labels == label).nonzero()[0][:4]:
            Image.fromarray(test.images[row, 0]).save(folder / name / f"{row}.png")
    (folder / test.class_names[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    trained = _train(flow, root / "student-broken-holdout", "--holdout", str(folder))
    assert "skipped 1 unreadable image(s)" in trained.stdout and "broken.jpg" in trained.stdout
    report = json.loads((root / "student-broken-holdout" / "report.json").read_text())
    assert report["holdout_unreadable"] == 1 and report["holdout_images"] == 4 * 10
    assert report["runs"][0]["holdout_accuracy"] is not None


def as_a_shell_starts_it() -> None:
    """In the child before exec: Ctrl-C delivered and at its default, as an interactive
    shell starts a foreground command, whatever this test process inherited or left
    blocked (in the full suite the CLI once started with SIGINT not delivered and ran to
    its end)."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_plan_is_one_line_and_exit_130(flow) -> None:
    """Ctrl-C while `plan` measures its candidates: one line saying what was kept, no
    traceback, nothing half-written in --out."""
    import signal
    import subprocess

    out = flow["root"] / "plan-stopped"
    command = [
        *cli("plada-send"), "plan", str(flow["work"]), "--reference", SMALL_SPEC,
        "--cache-dir", str(flow["root"] / "sender-cache"),
        "--train", str(flow["root"] / "task" / "train.npz"), "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command,
        env=flow["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_a_shell_starts_it,
    )
    seen = ""
    while "plan: screen" not in seen:  # its progress bar: the candidates are being measured
        seen += proc.stderr.read(1)
        assert proc.poll() is None or seen, "plan ended before its screen began"
    masks = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if "Sig" in ln]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, (masks, stderr[-2000:])
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("plada-send: interrupted (Ctrl-C): ") and "Traceback" not in stderr
    assert not (out / "plan.json").exists()
