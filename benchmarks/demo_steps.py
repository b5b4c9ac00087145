"""The embedded world's sender and receiver steps, through the real CLIs.

`make demo` (``benchmarks.demo``) runs the main job once; `make compare`
(``benchmarks.compare``) runs every scheme on the same steps. Sender and receiver run
as separate processes with separate caches: each regenerates the glyph reference pool
from its seed and they must agree on its fingerprint. Payloads are signed with the
station's key (made once in WORK/keys) and the receiver trusts only that key.

Each step's progress bars (its stderr) are shown as it runs and kept, with what it
printed, in WORK/logs/STEP.log, written as the step goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI_DIR = "PLADA_DEMO_CLI_DIR"


def cli_command(script: str, module: str) -> list[str]:
    """How a step starts a CLI: ``$PLADA_DEMO_CLI_DIR/SCRIPT`` when that is set (a wrapper:
    a profiler, or the test suite's fork server), else this interpreter's ``-m MODULE``."""
    folder = os.environ.get(CLI_DIR)
    return [str(Path(folder) / script)] if folder else [sys.executable, "-m", module]


SEND = cli_command("plada-send", "sender.cli")
RECEIVE = cli_command("plada-receive", "receiver.cli")
STATION = "demo-station"


def run(cmd: list[str], log: Path, show_progress: bool = False) -> str:
    """Run a CLI with its output kept in ``log`` as it comes; stop the caller with it if it
    fails. ``show_progress``: its stderr (progress bars) also goes to this terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as kept:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout = _tee(proc, kept, show_progress)
    if proc.wait() != 0:
        sys.stderr.write("\n" + log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return stdout


def _tee(proc: subprocess.Popen[bytes], kept: Any, show_progress: bool) -> str:
    """Copy the child's stderr to ``kept`` (and the terminal) while it runs; its stdout,
    read beside it, goes to ``kept`` at the end and is returned."""
    assert proc.stderr is not None and proc.stdout is not None
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    while chunk := proc.stderr.read1(4096):
        kept.write(chunk)
        kept.flush()
        if show_progress:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    reader.join()
    kept.write(stdout[0])
    return stdout[0].decode(errors="replace")


class Steps:
    """Commands run one after another, each with a numbered line and its time."""

    def __init__(self, total: int, show_progress: bool = True) -> None:
        self.total, self.done = total, 0
        self.show_progress = show_progress
        self.started = time.perf_counter()
        self.timings: dict[str, float] = {}  # seconds per step, by its log's name

    def run(self, cmd: list[str], log: Path, what: str) -> str:
        """Run a CLI, keep its output in ``log``; stop the caller with it if it fails."""
        self.done += 1
        started = time.perf_counter()
        end = "\n" if self.show_progress else ""
        print(f"  [{self.done:2d}/{self.total}] {what} ...", end=end, flush=True)
        stdout = run(cmd, log, self.show_progress)
        seconds = time.perf_counter() - started
        self.timings[log.stem] = round(seconds, 1)
        total = (time.perf_counter() - self.started) / 60
        lead = f"  [{self.done:2d}/{self.total}] done in" if self.show_progress else ""
        print(f"{lead} {seconds:5.1f}s (total {total:4.1f} min)", flush=True)
        return stdout


@dataclass
class Station:
    """The sender's side: its commands, folders and what they printed."""

    work: Path
    steps: Steps
    reference: list[str]  # --reference R --cache-dir C
    clip_samples: int | None = None
    clip: list[str] = field(default_factory=list)  # --clip-model M --clip-weights W

    @property
    def key(self) -> Path:
        return station_key(self.work)

    @property
    def task(self) -> list[str]:
        return ["--train", str(self.work / "task/train.npz")]

    def _run(self, args: list[str], log: str, what: str) -> str:
        return self.steps.run([*SEND, *args], self.work / "logs" / f"{log}.log", what)

    def prepare(self) -> str:
        """task, reference, the world's CLIP, its embeddings; the pool's fingerprint."""
        self._run(["task", "digits", "--out", str(self.work / "task")], "task", "task digits")
        fingerprint = self._run(
            ["reference", *self.reference],
            "sender-reference",
            "sender reference (renders the pool once per cache)",
        ).split()[-1]
        self.embed()
        return fingerprint

    def embed(self) -> None:
        """world-clip, embed (with thumbnails), merge, index."""
        samples = [] if self.clip_samples is None else ["--samples", str(self.clip_samples)]
        trained = self._run(
            ["world-clip", *self.reference, *samples],
            "world-clip",
            "sender world-clip (the world's own CLIP, trained once per cache)",
        )
        self.clip = trained.strip().splitlines()[-1].split()
        store = str(self.work / "embeddings")
        self._run(
            ["embed", *self.reference, *self.clip, "--workers", "1", "--out", store],
            "embed",
            "sender embed (CLIP embeddings and 32x32 thumbnails of every reference image)",
        )
        self._run(["merge", store], "merge", "sender merge")
        self._run(["index", store], "index", "sender index (FAISS)")

    def score(self) -> None:
        """The probe teacher on the stored CLIP embeddings scores every stored row."""
        work = self.work
        self._run(
            [
                "score",
                "--embeddings",
                str(work / "embeddings"),
                *self.clip,
                *self.task,
                "--test",
                str(work / "task/test.npz"),
                "--teacher",
                "probe",
                "--out",
                str(work / "sender"),
            ],
            "score",
            "sender score --embeddings (probe on CLIP embeddings, every stored row scored)",
        )

    def keygen(self) -> None:
        """The station's signing key, made once."""
        if key_missing(self.work):
            self._run(
                ["keygen", "--sender-id", STATION, "--out", str(self.key)],
                "keygen",
                "sender keygen (the station's signing key)",
            )

    def plan(self, plan_flags: list[str], name: str = "plan") -> dict[str, Any]:
        """The plan over the embeddings work directory into WORK/NAME, and the payload it
        chooses (payloads/NAME.plada); its summary."""
        work = self.work
        cmd = ["plan", str(work / "sender"), *self.clip, *self.task, *plan_flags]
        cmd += ["--out", str(work / name), "--sender-id", STATION]
        self._run(cmd, name, "sender plan (every candidate measured on thumbnails)")
        return self.select(name, ["--plan", str(work / name)])

    def select(self, name: str, flags: list[str], work_dir: str = "sender") -> dict[str, Any]:
        """Select and sign payload ``name`` (its contact sheet drawn from the station's
        pool); its summary."""
        out = self.work / "payloads" / f"{name}.plada"
        summary = self.work / "payloads" / f"{name}.json"
        self._run(
            [
                "select",
                str(self.work / work_dir),
                *flags,
                *self.reference,
                "--signing-key",
                str(self.key.with_suffix(".key")),
                "--out",
                str(out),
                "--json",
                str(summary),
            ],
            f"select-{name}",
            f"sender select {name}",
        )
        return json.loads(summary.read_text())


@dataclass
class Device:
    """The receiver's side: its own pool, its trust store, its students."""

    work: Path
    steps: Steps
    reference: list[str]

    @property
    def trust(self) -> list[str]:
        return ["--trust", str(self.work / "receiver-trust")]

    def _run(self, args: list[str], log: str, what: str) -> str:
        return self.steps.run([*RECEIVE, *args], self.work / "logs" / f"{log}.log", what)

    def prepare(self) -> str:
        """Its own copy of the pool, and the station's key trusted; the pool's fingerprint."""
        fingerprint = self._run(
            ["reference", *self.reference],
            "receiver-reference",
            "receiver reference (its own copy of the pool)",
        ).split()[-1]
        public = self.work / "keys" / f"{STATION}.pub"
        self._run(["trust", "add", str(public), *self.trust], "trust", "receiver trust add")
        return fingerprint

    def verify(self, name: str) -> str:
        payload = str(self.work / "payloads" / f"{name}.plada")
        return self._run(
            ["verify", payload, *self.reference, *self.trust],
            f"verify-{name}",
            f"receiver verify {name}",
        )

    def train(self, name: str, args: argparse.Namespace) -> dict[str, Any]:
        """Train the students of payload ``name`` (one per seed); their report."""
        out = self.work / "students" / name
        steps = ["--min-steps", str(args.steps), "--max-steps", str(args.steps)]
        self._run(
            ["train", str(self.work / "payloads" / f"{name}.plada"), *self.reference]
            + [*self.trust, "--holdout", str(self.work / "task/test.npz")]
            + ["--seeds", *map(str, args.seeds), *steps, "--out", str(out), "--overwrite"]
            + (["--no-export"] if args.no_export else []),
            f"train-{name}",
            f"receiver train {name}",
        )
        return json.loads((out / "report.json").read_text())


def station_key(work: Path) -> Path:
    """The station's key files, without their suffix (.key, .pub)."""
    return work / "keys" / STATION


def key_missing(work: Path) -> bool:
    """Whether the station's signing key is still to be made (one more step)."""
    return not station_key(work).with_suffix(".key").is_file()


def references(work: Path, reference: str) -> tuple[list[str], list[str]]:
    """The sender's and the receiver's reference options: one pool, two caches."""
    return (
        ["--reference", reference, "--cache-dir", str(work / "sender-cache")],
        ["--reference", reference, "--cache-dir", str(work / "receiver-cache")],
    )


def show_progress() -> bool:
    """Progress bars on the terminal unless PLADA_DEMO_QUIET is set (tests)."""
    return not os.environ.get("PLADA_DEMO_QUIET")
