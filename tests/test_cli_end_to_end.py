"""The real CLIs in subprocesses: sender -> payload file -> receiver, on a reduced world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, run


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


def _verify(flow, payload: Path, *extra: str, expect: int = 0, reference: str = SMALL_SPEC):
    """`verify` against a ledger that has accepted nothing (`train` recorded the payload's
    sequence number in TRUST/ledger.sqlite, so there it would be a replay)."""
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
    """Without the sender's key the payload is refused; train records its sequence number,
    so training the same payload again elsewhere is a replay; an unsigned payload needs
    --allow-unsigned; trust list/remove work."""
    env, root = flow["env"], flow["root"]
    empty = _verify(flow, flow["payload"], "--trust", str(root / "no-keys"), expect=2)
    assert "UnknownSenderError" in empty.stderr and "trust add" in empty.stderr
    again = run(
        [
            *cli("plada-receive"),
            "train",
            str(flow["payload"]),
            "--reference",
            SMALL_SPEC,
            "--cache-dir",
            str(flow["receiver_cache"]),
            "--trust",
            str(flow["trust"]),
            "--out",
            str(root / "student-again"),
            "--quiet",
        ],
        env,
        expect=2,
    )
    assert "ReplayError" in again.stderr and not (root / "student-again" / "report.json").exists()
    recorded = str(flow["trust"] / "ledger.sqlite")
    assert "ReplayError" in _verify(flow, flow["payload"], "--ledger", recorded, expect=2).stderr
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
        [
            *cli("plada-receive"),
            "daemon",
            "--home",
            str(home),
            "--reference",
            SMALL_SPEC,
            "--cache-dir",
            str(flow["receiver_cache"]),
            "--holdout",
            str(flow["root"] / "task" / "test.npz"),
            "--min-steps",
            "150",
            "--max-steps",
            "150",
            "--settle-seconds",
            "0",
            "--exit-when-idle",
        ],
        flow["env"],
    )
    (result,) = (home / "results").iterdir()
    daemon_report = json.loads((result / "report.json").read_text())
    train_report = json.loads((flow["root"] / "student" / "report.json").read_text())
    assert daemon_report["accuracy_mean"] == train_report["accuracy_mean"] > 0.4
    assert (result / "model-seed0.pt2").is_file() and (result / "training-curve.png").is_file()
