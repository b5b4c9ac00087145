"""Soak: one daemon home for hundreds of intake passes, fed a random mix of valid
payloads from three senders (some delivered out of order), junk, symlinks, long and
non-UTF-8 names, uploads and slow HTTP clients, and a carousel of tagged frames (30%
lost) with an attacker's forged frames (genuine headers) and junk frames beside it,
with SIGKILLs at random moments.

Every valid payload must end trained exactly once, or refused for a reason that is
right (a rollback: an older payload that arrived after a newer one of its sender was
accepted); junk never becomes a job; descriptors, memory and disk stay bounded.

``make test`` runs a short soak; ``make soak`` (``PLADA_SOAK=full``) the full one:
200 passes, 3 kills. Its figures are printed and recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from protocol.frames import FrameEncoder
from protocol.payload import BODY_CODING, Payload, SenderStamp, encode_payload
from protocol.shared_keys import key_text
from receiver.trust_store import add_key
from tests.conftest import SMALL_SPEC
from tests.hostile import SENDERS
from tests.subprocess_cli import cli_env, daemon_command

pytestmark = pytest.mark.slow
FULL = os.environ.get("PLADA_SOAK") == "full"
PASSES, KILLS, VALID = (200, 3, 18) if FULL else (45, 1, 4)
FRAMED = 6 if FULL else 2  # payloads sent as frames, beside the VALID files and uploads
QUOTA_FILES, QUOTA_MB = 40, 1.0
TRAIN = ["--min-steps", "2", "--max-steps", "2", "--batch-size", "16", "--no-export"]
LINK_KEY = bytes(range(32))
FRAME_BYTES, FRAME_LOSS, FORGED = 64, 0.3, 0.2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Feeder:
    """Makes the traffic and remembers what each valid payload was."""

    def __init__(self, home: Path, manifest, rng: random.Random) -> None:
        self.home, self.manifest, self.rng = home, manifest, rng
        self.inbox = home / "inbox"
        self.sequence = {name: int(time.time() * 1000) for name in SENDERS}
        self.valid: dict[str, tuple[str, int]] = {}  # sha256 -> (sender, sequence)
        self.junk = 0
        self.count = 0
        self.carousel: list[bytes] = []  # the frames still to send of the framed payload
        self.frames = {"genuine": 0, "forged": 0, "junk": 0, "payloads": 0}

    def payload(self, sender: str | None = None) -> bytes:
        sender = sender or self.rng.choice(sorted(SENDERS))
        self.sequence[sender] += self.rng.randint(1, 1000)
        rng = np.random.default_rng(self.count)
        self.count += 1
        indices = np.sort(rng.choice(len(self.manifest), 60, replace=False))
        payload = Payload(
            f"soak-{self.count}",
            self.manifest.name,
            self.manifest.fingerprint,
            len(self.manifest),
            ("a", "b", "c", "d"),
            indices,
            rng.integers(0, 4, 60),
            created=int(time.time()),
            sender=SenderStamp(sender, self.sequence[sender], int(time.time()) + 3600),
        )
        data = encode_payload(payload, codings=(BODY_CODING,), signer=SENDERS[sender])
        self.valid[hashlib.sha256(data).hexdigest()] = (sender, self.sequence[sender])
        return data

    def drop(self, name: str | bytes, data: bytes) -> None:
        """Write like a link does: a hidden temp file, then a rename."""
        final = os.path.join(os.fsencode(self.inbox), os.fsencode(name))
        temporary = os.path.join(os.fsencode(self.inbox), b".incoming.part")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, final)

    def valid_file(self) -> None:
        if self.rng.random() < 0.3:  # two of one sender, the newer delivered first
            sender = self.rng.choice(sorted(SENDERS))
            older, newer = self.payload(sender), self.payload(sender)
            self.drop(f"newer-{self.count}.plada", newer)
            self.drop(f"older-{self.count}.plada", older)
            return
        self.drop(f"payload-{self.count}.plada", self.payload())

    def frames_burst(self) -> None:
        """A few frames on the link: the carousel's next ones (some lost), a forgery
        with a genuine header before some, and junk frames of made-up transfers."""
        if not self.carousel:
            encoder = FrameEncoder(self.payload(), FRAME_BYTES, key=LINK_KEY)
            self.carousel = encoder.frames(repair=2 * encoder.source_count)  # 3K in all
            self.frames["payloads"] += 1
        burst = [self.carousel.pop(0) for _ in range(min(6, len(self.carousel)))]
        for frame in burst:
            if self.rng.random() < FORGED:
                head = len(frame) // 2
                self._frame(frame[:head] + os.urandom(len(frame) - head), "forged")
            if self.rng.random() >= FRAME_LOSS:
                self._frame(frame, "genuine")
        for _ in range(3):  # made-up transfers, with a CRC and with a guessed tag
            junk = FrameEncoder(os.urandom(self.rng.randint(100, 5000)), FRAME_BYTES)
            frame = junk.frames()[0]
            self._frame(frame if self.rng.random() < 0.5 else frame[:-8] + os.urandom(8), "junk")

    def finish_carousel(self) -> None:
        while self.carousel:
            self.frames_burst()

    def _frame(self, frame: bytes, kind: str) -> None:
        self.frames[kind] += 1
        name = f"{kind}-{sum(self.frames.values())}.frame"
        temporary = self.home / "frames" / ".incoming.part"
        temporary.write_bytes(frame)
        os.replace(temporary, self.home / "frames" / name)

    def junk_entry(self) -> None:
        self.junk += 1
        kind = self.rng.choice(["bytes", "long", "odd", "link", "loop", "truncated"])
        if kind == "bytes":
            self.drop(f"junk-{self.junk}.plada", os.urandom(self.rng.randint(1, 20000)))
        elif kind == "long":
            self.drop("L" * 250 + str(self.junk)[:4], b"long name")
        elif kind == "odd":
            self.drop(b"odd-\xff\xfe-" + str(self.junk).encode(), b"odd name")
        elif kind == "link":
            os.symlink("/etc/hostname", self.inbox / f"link-{self.junk}.plada")
        elif kind == "loop":
            os.symlink(f"loop-{self.junk}", self.inbox / f"loop-{self.junk}")
        else:
            self.drop(f"cut-{self.junk}.plada", self.payload()[:100])
            self.valid.popitem()  # never delivered whole: not a valid payload


class Probe:
    """Descriptors, memory and the home's disk use of the running daemon: at their
    peaks, and as first and last seen."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.fds = self.rss_mb = 0
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def sample(self, pid: int) -> None:
        """Peaks always; first and last once the daemon has finished an intake pass."""
        with contextlib.suppress(OSError):
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            rss = 0
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) // 1024
            self.fds, self.rss_mb = max(self.fds, fds), max(self.rss_mb, rss)
            if _passes(self.home) < 1:  # still starting: its imports are not its load
                return
            self.last = {"fds": fds, "rss_mb": rss, "disk_mb": _disk_mb(self.home)}
            self.first = self.first or dict(self.last)


def _disk_mb(home: Path) -> float:
    total = 0
    for path in home.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.lstat().st_size
    return round(total / 2**20, 2)


def _upload(port: int, token: str, data: bytes) -> bool:
    """Whether the daemon took the upload (202); busy (503) or down, it did not."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/payloads", data=data, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 202
    except OSError:
        return False


def _passes(home: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(json.loads((home / "health.json").read_text()).get("intake_passes", 0))
    return 0


def test_soak(tmp_path, small_pool, cache_dir) -> None:
    rng = random.Random(1234)
    home = tmp_path / "home"
    (home / "inbox").mkdir(parents=True)
    (home / "frames").mkdir()
    for key in SENDERS.values():
        add_key(home / "trust", key.public)
    link_key = tmp_path / "link.key"
    link_key.write_text(key_text(LINK_KEY))
    link_key.chmod(0o600)
    port = _free_port()
    args = daemon_command(
        home,
        SMALL_SPEC,
        cache_dir,
        "--reorder-seconds",  # a window for the payloads delivered out of order
        "0.5",
        "--http-port",
        str(port),
        "--http-timeout-seconds",
        "2",
        "--quarantine-max-files",
        str(QUOTA_FILES),
        "--quarantine-max-mb",
        str(QUOTA_MB),
        "--link-key",
        str(link_key),
        *TRAIN,
    )
    feeder, probe = Feeder(home, small_pool.manifest, rng), Probe(home)
    slow: list[socket.socket] = []
    started = time.monotonic()
    kills, passes_done, busy = 0, 0, 0
    kill_at = sorted(rng.sample(range(10, PASSES - 10), KILLS))  # passes to kill at
    daemon = subprocess.Popen(args, env=cli_env(), stderr=subprocess.DEVNULL)
    try:
        while passes_done + _passes(home) < PASSES:
            time.sleep(0.15)
            probe.sample(daemon.pid)
            action = rng.random()
            if action < 0.25 and len(feeder.valid) < VALID:
                feeder.valid_file()
            elif action < 0.55:
                feeder.junk_entry()
            elif action < 0.65 and (home / "http.token").is_file():
                token = (home / "http.token").read_text().strip()
                data = feeder.payload() if len(feeder.valid) < VALID else os.urandom(500)
                if not _upload(port, token, data):  # not delivered: not counted
                    feeder.valid.pop(hashlib.sha256(data).hexdigest(), None)
                    busy += 1
            elif action < 0.8 and (feeder.frames["payloads"] < FRAMED or feeder.carousel):
                feeder.frames_burst()
            elif action < 0.87:  # a slow client that opens, says little and stays
                with contextlib.suppress(OSError):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                    sock.sendall(b"POST /payloads HTTP/1.0\r\nContent-Le")
                    slow.append(sock)
                while len(slow) > 30:
                    slow.pop(0).close()
            if kill_at and passes_done + _passes(home) >= kill_at[0]:
                kill_at.pop(0)
                passes_done += _passes(home)
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                kills += 1
                (home / "health.json").unlink(missing_ok=True)  # count the next one's passes
                daemon = subprocess.Popen(args, env=cli_env(), stderr=subprocess.DEVNULL)
        feeder.finish_carousel()  # its payload must get through before the end
        wait_until = time.monotonic() + 60
        while list((home / "frames").glob("*.frame")) and time.monotonic() < wait_until:
            time.sleep(0.2)
        probe.sample(daemon.pid)
        passes_done += _passes(home)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
        for sock in slow:
            sock.close()
    drain = subprocess.run(
        [*args, "--exit-when-idle"], env=cli_env(), capture_output=True, text=True
    )
    assert drain.returncode == 0, drain.stderr[-2000:]

    with sqlite3.connect(home / "queue.sqlite") as db:
        jobs = {
            row[0]: row[1:]
            for row in db.execute("SELECT sha256, state, sender, sequence FROM jobs")
        }
    records = [json.loads(p.read_text()) for p in (home / "quarantine").glob("*.reason.json")]
    events = [
        json.loads(line) for line in (home / "logs" / "daemon.jsonl").read_text().splitlines()
    ]
    refused = {  # from the log: the quota may have purged the reason file since
        e["sha256"]: e["error"] for e in events if e.get("event") == "payload-quarantined"
    }
    accepted_max: dict[str, int] = {}
    for _, sender, sequence in jobs.values():
        accepted_max[sender] = max(sequence, accepted_max.get(sender, 0))
    trained = rollbacks = 0
    for sha256, (sender, sequence) in feeder.valid.items():
        if sha256 in jobs:
            assert jobs[sha256][0] == "done", jobs[sha256]
            trained += 1
        else:  # refused only as a rollback, behind a newer accepted payload of its sender
            assert refused.get(sha256) == "RollbackError", (sha256, refused.get(sha256))
            assert accepted_max[sender] > sequence
            rollbacks += 1
    assert set(jobs) <= set(feeder.valid)  # junk never became a job
    assert not list((home / "intake").rglob("*.origin"))  # nothing left half-claimed
    quarantine_bytes = sum(p.lstat().st_size for p in (home / "quarantine").iterdir())
    disk_mb = sum(p.lstat().st_size for p in home.rglob("*")) / 2**20
    assert len(records) <= QUOTA_FILES and quarantine_bytes <= QUOTA_MB * 2**20
    assert probe.fds < 120, probe.fds
    assert probe.rss_mb < 2000, probe.rss_mb
    assert probe.last["fds"] <= probe.first["fds"] + 20, (probe.first, probe.last)
    # the first job adds the trainer's own memory (torch, the model); frames add none
    assert probe.last["rss_mb"] <= probe.first["rss_mb"] + 400, (probe.first, probe.last)
    assert not list((home / "transfers").glob("*.log"))  # every genuine transfer finished
    assert not [e for e in events if e.get("event") == "transfer-polluted"]  # no forgery decoded
    assert disk_mb < 64, disk_mb  # quarantine quota, results and logs: nothing grows unbounded
    summary = {
        "passes": passes_done,
        "kills": kills,
        "valid_payloads": len(feeder.valid),
        "trained": trained,
        "refused_rollbacks": rollbacks,
        "junk_entries": feeder.junk,
        "uploads_not_taken": busy,
        "quarantined_now": len(records),
        "frames": feeder.frames,
        "peak_fds": probe.fds,
        "peak_rss_mb": probe.rss_mb,
        "start": probe.first,
        "end": probe.last,
        "home_disk_mb": round(disk_mb, 1),
        "quarantine_kb": round(quarantine_bytes / 1024, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    print("soak:", json.dumps(summary))
    (tmp_path / "soak.json").write_text(json.dumps(summary, indent=2))
    assert trained >= len(feeder.valid) - rollbacks > 0
