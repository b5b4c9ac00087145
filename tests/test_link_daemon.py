"""The link with the real daemon: the sender's carousel through a lossy channel into a
running `plada-receive daemon`, replies back, and the faults a link brings (kills
while frames arrive, bit flips, interleaved transfers, a forged payload)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from protocol.frames import (
    PROFILES,
    STREAM_LENGTH,
    FrameEncoder,
    pack_stream,
    split_stream,
    transfer_id,
)
from protocol.replies import ReplyState, decode_reply, parse_reply_key
from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, cli_env, daemon_command, forkserved, wait_for

TRAIN_STEPS = ("--min-steps", "4", "--max-steps", "4", "--no-export")


def _payload(manifest, task: str, seed: int, sender: str = "station-a") -> bytes:
    """A signed payload of 300 images of ``manifest`` (labels by index parity)."""
    from protocol.payload import BODY_CODING, Payload, SenderStamp, encode_payload
    from tests.hostile import SENDERS

    rng = random.Random(seed)
    now = int(time.time())
    indices = sorted(rng.sample(range(len(manifest)), 300))
    return encode_payload(
        Payload(
            task,
            manifest.name,
            manifest.fingerprint,
            len(manifest),
            ("a", "b"),
            indices,
            [i % 2 for i in indices],
            created=now,
            sender=SenderStamp(sender, now * 1000 + seed, now + 3600),
        ),
        codings=(BODY_CODING,),
        signer=SENDERS[sender],
    )


def _status(home: Path) -> dict:
    """The daemon's health file (frames and intake counters)."""
    return json.loads((home / "health.json").read_text())


def _rejected(home: Path) -> int:
    """Frames the daemon dropped for their trailer (a tag, or a magic byte hit)."""
    frames = _status(home)["frames"]
    return frames.get("tag_rejected", 0) + frames["crc_rejected"]


def _home(tmp_path: Path) -> Path:
    from receiver.trust_store import add_key
    from tests.hostile import SENDERS

    home = tmp_path / "home"
    (home / "frames").mkdir(parents=True)
    add_key(home / "trust", SENDERS["station-a"].public)
    return home


def _drop(home: Path, frames: list[bytes], start: int) -> None:
    """Frame files as link software writes them (whole, then renamed into place)."""
    for number, frame in enumerate(frames, start):
        temporary = home / "frames" / f".f{number:06d}.part"
        temporary.write_bytes(frame)
        temporary.rename(home / "frames" / f"f{number:06d}.frame")


def _forged(frame: bytes, rng: random.Random) -> bytes:
    """An attacker's frame: ``frame``'s header, other symbol bytes, a guessed trailer."""
    head = len(frame) - len(frame) // 2
    return frame[:head] + rng.randbytes(len(frame) - head)


FORGED_BURST = 10


def _bridge(pipe: Path, home: Path, loss: float, flips: float, seed: int, forge: float = 0.0):
    """The link: frames from the sender's pipe into the daemon's frames inbox, ``loss``
    of them lost and ``flips`` of the rest with one bit flipped, and (with ``forge``)
    before each of the first ``FORGED_BURST`` frames and ``forge`` of the later ones an
    attacker's forgery with the same header; returns the thread and the counts of
    flipped and forged frames delivered. The burst makes the forgeries' number not
    depend on how fast the daemon decodes (the carousel stops when it has)."""
    counts = {"flipped": 0, "forged": 0}

    def carry() -> None:
        rng = random.Random(seed)
        number = 0
        with open(pipe, "rb") as stream:
            while len(head := stream.read(STREAM_LENGTH.size)) == STREAM_LENGTH.size:
                frame = stream.read(STREAM_LENGTH.unpack(head)[0])
                number += 2
                if rng.random() < forge or (forge and number <= 2 * FORGED_BURST):
                    _drop(home, [_forged(frame, rng)], number - 1)
                    counts["forged"] += 1
                if rng.random() < loss:
                    continue
                if rng.random() < flips:
                    damaged = bytearray(frame)
                    damaged[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
                    frame = bytes(damaged)
                    counts["flipped"] += 1
                _drop(home, [frame], number)

    thread = threading.Thread(target=carry, daemon=True)
    thread.start()
    return thread, counts


def _holdout(small_pool, path: Path) -> Path:
    indices = np.arange(0, len(small_pool.manifest), 97)[:24]
    np.savez(
        path,
        images=small_pool.load(indices),
        labels=indices % 2,
        class_names=np.array(["a", "b"]),
    )
    return path


def test_carousel_over_a_lossy_link_trains_what_the_file_trains(tmp_path, small_pool, cache_dir):
    """payload -> `plada-send frames --carousel --link-key` -> 30% loss and a forgery with a
    genuine header before a fifth of the frames -> the daemon with the link key -> a
    student with the accuracy of the file path; the device's reply stops the carousel."""
    payload = _payload(small_pool.manifest, "framed", 11)
    (tmp_path / "task.plada").write_bytes(payload)
    home, outbox = _home(tmp_path), tmp_path / "uplink"
    holdout = str(_holdout(small_pool, tmp_path / "holdout.npz"))
    env = cli_env()
    key = subprocess.run(
        [*cli("plada-receive"), "reply-key", "--home", str(home)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "device.key").write_text(key)
    link_key = tmp_path / "link.key"
    made = subprocess.run(
        [*cli("plada-send"), "link-key", "--out", str(link_key)], env=env, capture_output=True
    )
    assert made.returncode == 0 and link_key.stat().st_mode & 0o777 == 0o600
    pipe = tmp_path / "modem"
    os.mkfifo(pipe)
    daemon = subprocess.Popen(
        daemon_command(
            home,
            SMALL_SPEC,
            cache_dir,
            "--holdout",
            holdout,
            "--reply-outbox",
            str(outbox),
            "--reply-progress-seconds",
            "0",
            "--link-key",
            str(link_key),
            *TRAIN_STEPS,
        ),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        bridge, counts = _bridge(pipe, home, loss=0.3, flips=0.05, seed=5, forge=0.2)
        sent = subprocess.run(
            [
                *cli("plada-send"),
                "frames",
                str(tmp_path / "task.plada"),
                "--link",
                "lora-sf9",
                "--carousel",
                "--out",
                str(pipe),
                "--rate",
                "40000",
                "--until-done",
                str(outbox),
                "--reply-key",
                str(tmp_path / "device.key"),
                "--link-key",
                str(link_key),
                "--max-frames",
                "20000",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert "carousel stopped (done)" in sent.stderr, sent.stderr[-2000:]
        assert "done, job queued" in sent.stderr
        bridge.join(timeout=30)
        report_file = wait_for(
            lambda: next((home / "results").glob("*/report.json"), None), 300, "the job"
        )
        # every frame delivered is read; the damaged and forged ones are all refused
        wait_for(lambda: not list((home / "frames").glob("*.frame")), 60, "the frames")
        dropped = counts["flipped"] + counts["forged"]
        rejected = wait_for(lambda: _rejected(home) == dropped or None, 30, "health")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    assert daemon.returncode == 0, daemon.stderr.read()[-2000:]
    assert rejected and counts["flipped"] >= 1 and counts["forged"] >= 10
    assert "polluted" not in _status(home)["frames"]
    assert _status(home)["intake_pass_at"] > 0  # what status judges a stuck intake by
    (reply_file,) = outbox.glob("*.reply")
    reply = decode_reply(reply_file.read_bytes(), parse_reply_key(key))
    assert reply.transfer == transfer_id(payload) and reply.state is ReplyState.QUEUED
    framed = json.loads(report_file.read_text())
    assert framed["task"] == "framed" and framed["kept"] == 300
    assert framed["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    trained = subprocess.run(  # the same payload as a file, trained the same way
        [
            *cli("plada-receive"),
            "train",
            str(tmp_path / "task.plada"),
            "--reference",
            SMALL_SPEC,
            "--cache-dir",
            str(cache_dir),
            "--trust",
            str(home / "trust"),
            "--holdout",
            holdout,
            "--out",
            str(tmp_path / "from-file"),
            "--quiet",
            *TRAIN_STEPS,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    from_file = json.loads((tmp_path / "from-file" / "report.json").read_text())
    assert framed["accuracy_mean"] is not None
    assert framed["accuracy_mean"] == from_file["accuracy_mean"]
    assert framed["runs"][0]["final_loss"] == from_file["runs"][0]["final_loss"]


def _logged(home: Path) -> set[bytes]:
    """Every frame held in the transfer logs."""
    return {f for log in (home / "transfers").glob("*.log") for f in split_stream(log.read_bytes())}


def _waiting(home: Path) -> set[bytes]:
    """Every frame still in the frames inbox's files."""
    waiting = set()
    for path in (home / "frames").iterdir():
        data = path.read_bytes()
        waiting |= set(split_stream(data)) if path.suffix == ".frames" else {data}
    return waiting


def test_frames_survive_kills_interleave_and_forgeries_are_quarantined(
    tmp_path, small_pool, cache_dir
):
    """SIGKILL at three points while frames arrive (a frame appended but not synced, a
    frame file synced but not removed, a payload rebuilt but its transfer not closed)
    loses no fsynced frame, and after a restart two interleaved transfers both complete:
    one is trained, the other (signed by a key the device does not trust) rebuilds and
    is quarantined like any bad payload."""
    manifest = small_pool.manifest
    good = _payload(manifest, "good", 21)
    forged = _payload(manifest, "forged", 22, sender="station-b")  # not trusted by _home
    encoders = [FrameEncoder(p, PROFILES["acoustic-64"].frame_bytes) for p in (good, forged)]
    frames = [e.frames(repair=e.source_count // 2) for e in encoders]
    interleaved = [f for pair in zip(*frames, strict=False) for f in pair]
    rng = random.Random(7)
    arriving = []
    for frame in interleaved:  # 5% damaged on the link: never held
        if rng.random() < 0.05:
            damaged = bytearray(frame)
            damaged[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            frame = bytes(damaged)
        arriving.append(frame)
    home = _home(tmp_path)
    half = len(arriving) // 2
    _drop(home, arriving[:half], 0)  # one frame per file, then the rest as one stream
    (home / "frames" / "z-burst.frames").write_bytes(pack_stream(arriving[half:]))
    env = cli_env()
    command = forkserved(daemon_command(home, SMALL_SPEC, cache_dir, *TRAIN_STEPS))
    intact = set(interleaved)
    done = home / "transfers"
    for point in ("frames-appended@15", "frames-synced@5", "frames-decoded@1"):
        killed = subprocess.run(
            command, env=env | {"PLADA_CRASH_AT": point}, capture_output=True, timeout=120
        )
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-1000:])
        consumed = set(arriving) - _waiting(home)
        finished = {
            f
            for e, group in zip(encoders, frames, strict=True)
            for f in group
            if (done / f"{e.transfer.hex()}.done").exists()
        }
        assert consumed & intact <= _logged(home) | finished, f"a synced frame lost at {point}"
        assert not _logged(home) - intact, "a damaged frame was held"
    # the last kill came as the first transfer decoded: its payload is in the inbox
    # (the intake runs after the frames pass), and no transfer is closed yet
    assert len(list((home / "inbox").glob("frames-*.plada"))) == 1
    assert not list(done.glob("*.done"))
    finished = subprocess.run(
        [*command, "--exit-when-idle"], env=env, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not list((home / "frames").iterdir()) and not _logged(home)
    for encoder in encoders:
        assert (done / f"{encoder.transfer.hex()}.done").exists()
    (report,) = (json.loads(p.read_text()) for p in (home / "results").glob("*/report.json"))
    assert report["task"] == "good"
    assert report["payload_sha256"] == hashlib.sha256(good).hexdigest()
    reasons = [json.loads(p.read_text()) for p in (home / "quarantine").glob("*.reason.json")]
    assert [r["error"] for r in reasons] == ["UnknownSenderError"]
    assert reasons[0]["file"] == f"frames-{transfer_id(forged).hex()}.plada"
