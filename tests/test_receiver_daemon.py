"""The receiver daemon as a real process: intake, quarantine, SIGKILL at every stage,
SIGTERM, two daemons on one inbox, HTTP uploads, status."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from protocol.payload import BODY_CODING, Payload, SenderStamp, encode_payload
from protocol.signing import SigningKey
from receiver.trust_store import add_key
from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, cli_env, daemon_command, forkserved, wait_for

pytestmark = pytest.mark.slow
STATION_A, STATION_B = SigningKey.generate("station-a"), SigningKey.generate("station-b")
TRAIN = ["--min-steps", "24", "--max-steps", "24", "--batch-size", "32", "--checkpoint-steps", "5"]


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory, small_pool) -> dict[str, bytes]:
    """Two valid payloads for the small world and three bad ones."""
    manifest = small_pool.manifest
    rng = np.random.default_rng(0)

    def make(
        task: str,
        fingerprint: bytes = manifest.fingerprint,
        key: SigningKey = STATION_A,
        sequence: int = 5,
    ) -> bytes:
        indices = np.sort(rng.choice(len(manifest), 200, replace=False))
        labels = rng.integers(0, 4, indices.size)
        payload = Payload(
            task,
            manifest.name,
            fingerprint,
            len(manifest),
            tuple(f"class-{c}" for c in range(4)),
            indices,
            labels,
            created=int(time.time()),
            sender=SenderStamp(key.sender, sequence, int(time.time()) + 86400),
        )
        layout = manifest if fingerprint == manifest.fingerprint else None
        return encode_payload(payload, reference=layout, codings=(BODY_CODING,), signer=key)

    # two senders, so that daemons racing over one inbox never see one sender out of order
    first, second = make("task-a"), make("task-b", key=STATION_B)
    corrupt = bytearray(first)
    corrupt[100] ^= 0x40  # inside the body: the signature no longer verifies
    return {
        "a.plada": first,
        "b.plada": second,
        "corrupt.plada": bytes(corrupt),
        "truncated.plada": second[: len(second) // 2],
        "other-reference.plada": make("task-c", fingerprint=bytes(range(32)), sequence=6),
        "a-older.plada": make("task-a-old", sequence=4),
        "a-newer.plada": make("task-a-new", sequence=7),
    }


BASIC = ("a.plada", "b.plada", "corrupt.plada", "truncated.plada", "other-reference.plada")


def _home(tmp_path: Path, payloads: dict[str, bytes], names=BASIC) -> Path:
    home = tmp_path / "home"
    (home / "inbox").mkdir(parents=True)
    for name in names:
        (home / "inbox" / name).write_bytes(payloads[name])
    return home


def _daemon_args(home: Path, cache_dir: Path, *extra: str) -> list[str]:
    for key in (STATION_A, STATION_B):  # the daemon's trust store: HOME/trust
        add_key(home / "trust", key.public)
    return daemon_command(home, SMALL_SPEC, cache_dir, *TRAIN, *extra)


def _run_daemon(home: Path, cache_dir: Path, *extra: str, crash: str | None = None):
    env = cli_env()
    if crash:
        env["PLADA_CRASH_AT"] = crash
    args = forkserved(_daemon_args(home, cache_dir, "--exit-when-idle", "--no-export", *extra))
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)


def _jobs(home: Path) -> list[dict]:
    with sqlite3.connect(home / "queue.sqlite") as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY id")]


def _events(home: Path) -> list[dict]:
    lines = (home / "logs" / "daemon.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _quarantine_records(home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (home / "quarantine").glob("*.reason.json")]


def _quarantine_reasons(home: Path) -> dict[str, str]:
    """Quarantined file name -> the error type its reason file records."""
    return {record["file"]: record["error"] for record in _quarantine_records(home)}


def _check_everything_served(home: Path, payloads: dict[str, bytes]) -> list[dict]:
    """Both valid payloads trained exactly once; the three bad ones quarantined with reasons."""
    jobs = _jobs(home)
    assert sorted(j["source_name"] for j in jobs) == ["a.plada", "b.plada"], jobs
    assert all(j["state"] == "done" for j in jobs), jobs
    for job in jobs:
        report = json.loads((home / job["result_dir"] / "report.json").read_text())
        assert report["kept"] == 200 and report["runs"][0]["steps"] == 24
        assert (home / job["result_dir"] / "model-seed0.pt").is_file()
        assert not (home / job["result_dir"] / ".job").exists()
    reasons = _quarantine_reasons(home)
    assert reasons == {
        "corrupt.plada": "BadSignatureError",
        "truncated.plada": "TruncatedPayloadError",
        "other-reference.plada": "ReferenceMismatchError",
    }, reasons
    for record in _quarantine_records(home):  # stored under a name of the daemon's own
        assert (home / "quarantine" / record["stored"]).read_bytes() == payloads[record["file"]]
    assert not list((home / "inbox").iterdir())
    assert not [p for p in (home / "intake").rglob("*") if p.is_file()]
    assert len(list((home / "spool").glob("*.plada"))) == 2
    return jobs


def test_daemon_serves_inbox_and_quarantines_bad_payloads(tmp_path, payloads, cache_dir) -> None:
    home = _home(tmp_path, payloads)
    args = forkserved(_daemon_args(home, cache_dir, "--exit-when-idle"))
    proc = subprocess.run(
        args, env=cli_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    jobs = _check_everything_served(home, payloads)
    result = home / jobs[0]["result_dir"]
    assert (result / "training-curve.png").stat().st_size > 1000
    program = torch.export.load(result / "model-seed0.pt2").module()
    assert program(torch.rand(5, 1, 32, 32) * 255).shape == (5, 4)
    events = [e["event"] for e in _events(home)]
    assert events.count("payload-queued") == 2 and events.count("payload-quarantined") == 3
    assert events.count("job-done") == 2 and events[-1] == "daemon-stop"
    health = json.loads((home / "health.json").read_text())
    assert health["state"] == "stopped" and health["intake"]["quarantined"] == 3
    status = subprocess.run(
        [*cli("plada-receive"), "status", "--home", str(home)],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "daemon NOT running" in status.stdout and "0 queued, 0 running, 2 done" in status.stdout
    assert "ReferenceMismatchError" in status.stdout
    assert "sender station-a: last accepted sequence 5" in status.stdout


def test_daemon_refuses_replays_and_rollbacks(tmp_path, payloads, cache_dir) -> None:
    """Sender station-a's payload 5 is accepted; then, in one pass, a copy of it (replay),
    its payload 4 (rollback) and a payload of an untrusted sender are quarantined and its
    payload 7 is taken."""
    home = _home(tmp_path, payloads, ["a.plada"])
    assert _run_daemon(home, cache_dir).returncode == 0
    stranger = SigningKey.generate("station-x")
    blob = payloads["a.plada"]
    forged = encode_payload(
        Payload(
            "task-x",
            "ref",
            bytes(32),
            10,
            ("p", "q"),
            [1, 2],
            [0, 1],
            sender=SenderStamp("station-x", 1, int(time.time()) + 60),
        ),
        signer=stranger,
    )
    for name, data in {  # in one pass: queued in sequence order, whatever their names
        "a-again.plada": blob,
        "a-older.plada": payloads["a-older.plada"],
        "a-newer.plada": payloads["a-newer.plada"],
        "stranger.plada": forged,
    }.items():
        (home / "inbox" / name).write_bytes(data)
    assert _run_daemon(home, cache_dir).returncode == 0
    reasons = _quarantine_reasons(home)
    assert reasons == {
        "a-again.plada": "ReplayError",
        "a-older.plada": "RollbackError",
        "stranger.plada": "UnknownSenderError",
    }, reasons
    jobs = _jobs(home)
    assert [(j["source_name"], j["sequence"], j["state"]) for j in jobs] == [
        ("a.plada", 5, "done"),
        ("a-newer.plada", 7, "done"),
    ]


CRASH_POINTS = [
    "intake-spooled",
    "intake-recorded",
    "intake-queued",
    "job-claimed",
    "training-step@12",
    "checkpoint-written@2",
    "outputs-saving",
    "outputs-saved",
    "job-published",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, payloads, cache_dir) -> dict[str, dict]:
    """Weights of both jobs from a daemon that was never killed."""
    home = _home(tmp_path_factory.mktemp("clean"), payloads, ["a.plada", "b.plada"])
    assert _run_daemon(home, cache_dir).returncode == 0
    return {
        j["source_name"]: torch.load(home / j["result_dir"] / "model-seed0.pt") for j in _jobs(home)
    }


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_any_point_loses_nothing(
    tmp_path, payloads, cache_dir, uninterrupted, point
) -> None:
    home = _home(tmp_path, payloads)
    killed = _run_daemon(home, cache_dir, crash=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    restarted = _run_daemon(home, cache_dir)
    assert restarted.returncode == 0, restarted.stderr
    jobs = _check_everything_served(home, payloads)
    for job in jobs:  # resumed or retrained, the student is the one an unbroken run trains
        weights = torch.load(home / job["result_dir"] / "model-seed0.pt")
        expected = uninterrupted[job["source_name"]]
        assert all(torch.equal(weights[k], expected[k]) for k in expected), job
    if point in ("training-step@12", "checkpoint-written@2"):
        report = json.loads((home / jobs[0]["result_dir"] / "report.json").read_text())
        assert report["runs"][0]["resumed_from_step"] in (5, 10), report["runs"][0]
        assert jobs[0]["claims"] == 2


def test_job_that_keeps_killing_the_daemon_is_failed_and_queue_moves_on(
    tmp_path, payloads, cache_dir
) -> None:
    home = _home(tmp_path, payloads, ["a.plada", "b.plada"])
    for _ in range(3):
        assert _run_daemon(home, cache_dir, crash="job-claimed").returncode == -signal.SIGKILL
    assert _run_daemon(home, cache_dir).returncode == 0
    first, second = _jobs(home)
    assert first["state"] == "failed" and "died 3 times" in first["error"]
    assert second["state"] == "done"
    retry = [*cli("plada-receive"), "retry", "--home", str(home)]
    refused = subprocess.run([*retry, "2"], env=cli_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "is done, not failed" in refused.stderr
    subprocess.run([*retry, "1"], env=cli_env(), capture_output=True, text=True, check=True)
    assert _run_daemon(home, cache_dir).returncode == 0
    assert [j["state"] for j in _jobs(home)] == ["done", "done"]


# long enough to be stopped mid-run (the wait, `status` and the signal take ~2-3 s, under
# 100 steps even on a loaded machine), short enough that finishing it after the restart
# costs seconds
LONG_RUN_STEPS = 450  # the signal lands by ~step 250 even on a loaded machine


def _training_step(home: Path) -> int:
    try:
        current = json.loads((home / "health.json").read_text()).get("current") or {}
    except (OSError, ValueError):
        return 0
    return int(current.get("step", 0))


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM])
def test_daemon_stopped_mid_training_resumes(tmp_path, payloads, cache_dir, stop_signal) -> None:
    home = _home(tmp_path, payloads, ["a.plada"])
    steps = str(LONG_RUN_STEPS)
    long_run = [
        "--min-steps",
        steps,
        "--max-steps",
        steps,
        "--checkpoint-steps",
        "0",
        "--checkpoint-seconds",
        "0.5",
        "--no-export",
    ]
    daemon = subprocess.Popen(
        _daemon_args(home, cache_dir, *long_run),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _training_step(home) >= 150, what="training to reach step 150")
        status = subprocess.run(
            [*cli("plada-receive"), "status", "--home", str(home), "--json"],
            env=cli_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        shown = json.loads(status.stdout)
        assert shown["daemons_running"] and shown["queue"]["running"] == 1
        assert shown["health"]["current"]["total_steps"] == LONG_RUN_STEPS
        assert shown["health"]["current"]["images_per_second"] > 0
        daemon.send_signal(stop_signal)
        assert daemon.wait(timeout=60) == (0 if stop_signal == signal.SIGTERM else -stop_signal)
    finally:
        daemon.kill()
    state = _jobs(home)[0]["state"]
    assert state == ("queued" if stop_signal == signal.SIGTERM else "running")
    if stop_signal == signal.SIGKILL:  # status tells the truth about the dead daemon's job
        shown = subprocess.run(
            [*cli("plada-receive"), "status", "--home", str(home), "--json"],
            env=cli_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(shown.stdout)["jobs"][0]["state"] == "interrupted"
    finish = ["--min-steps", steps, "--max-steps", steps, "--checkpoint-steps", "0"]
    assert _run_daemon(home, cache_dir, *finish).returncode == 0
    job = _jobs(home)[0]
    report = json.loads((home / job["result_dir"] / "report.json").read_text())
    assert job["state"] == "done" and report["runs"][0]["steps"] == LONG_RUN_STEPS
    assert job["progress_step"] == LONG_RUN_STEPS  # a finished job's progress is complete
    assert report["runs"][0]["resumed_from_step"] >= 100, report["runs"][0]


def test_two_daemons_on_one_inbox_take_each_payload_once(tmp_path, payloads, cache_dir) -> None:
    inbox = tmp_path / "shared-inbox"
    inbox.mkdir()
    many = {f"p{i}.plada": payloads["a.plada" if i % 2 else "b.plada"] for i in range(2)}
    for name, data in {**many, "corrupt.plada": payloads["corrupt.plada"]}.items():
        (inbox / name).write_bytes(data)
    homes = [tmp_path / "shared-home", tmp_path / "shared-home", tmp_path / "own-home"]
    procs = [
        subprocess.Popen(
            forkserved(
                _daemon_args(
                    home, cache_dir, "--inbox", str(inbox), "--exit-when-idle", "--no-export"
                )
            ),
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for home in homes
    ]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()
    jobs = [
        j for home in sorted(set(homes)) if (home / "queue.sqlite").exists() for j in _jobs(home)
    ]
    assert sorted(j["source_name"] for j in jobs) == ["p0.plada", "p1.plada"], jobs
    assert all(j["state"] == "done" and j["claims"] == 1 for j in jobs), jobs
    quarantined = [p for home in set(homes) for p in (home / "quarantine").glob("*.reason.json")]
    assert len(quarantined) == 1
    starts = [e for home in set(homes) for e in _events(home) if e["event"] == "job-started"]
    assert len(starts) == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_http_upload_is_verified_queued_and_followed(tmp_path, payloads, cache_dir) -> None:
    import urllib.error
    import urllib.request

    home = tmp_path / "home"
    port = _free_port()
    daemon = subprocess.Popen(
        _daemon_args(home, cache_dir, "--http-port", str(port), "--no-export"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def call(path: str, data: bytes | None = None) -> tuple[int, dict]:
        token = (home / "http.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        wait_for(lambda: (home / "health.json").is_file() and _port_open(port), what="http")
        code, answer = call("/payloads", payloads["a.plada"])
        assert code == 202 and answer["file"].startswith("upload-")
        bad_code, bad = call("/payloads", payloads["truncated.plada"])
        assert bad_code == 202
        done = wait_for(lambda: call(answer["follow"])[1].get("state") == "done", what="job")
        assert done
        assert call(bad["follow"])[1]["error"] == "TruncatedPayloadError"
        assert call("/status")[1]["queue"]["done"] == 1
        assert call("/nowhere")[0] == 404
        assert call("/jobs/" + "0" * 64)[0] == 404  # never received
        assert call("/jobs/not-a-digest")[0] == 400
        # a second daemon on the same port ends at once, typed
        busy = _refused_start(tmp_path / "home-2", cache_dir, "--http-port", str(port))
        assert "--http-port" in busy
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_env_is_clean() -> None:
    assert "PLADA_CRASH_AT" not in os.environ


def test_daemon_with_a_npy_holdout_stops_with_a_typed_error(tmp_path, cache_dir) -> None:
    import numpy as np

    np.save(tmp_path / "holdout.npy", np.zeros((4, 1, 32, 32), np.uint8))
    holdout = str(tmp_path / "holdout.npy")
    assert "TaskDataError" in _refused_start(tmp_path / "home", cache_dir, "--holdout", holdout)


def _refused_start(home: Path, cache_dir: Path, *extra: str) -> str:
    """Start a daemon that must stop at once with a typed error (exit 2, no traceback);
    returns its stderr."""
    started = subprocess.run(
        forkserved(_daemon_args(home, cache_dir, *extra)),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 2 and "Traceback" not in started.stderr, started.stderr
    return started.stderr
