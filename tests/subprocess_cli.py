"""Running the real console scripts in subprocesses."""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.cli_forkserver import ENTRY_POINTS

ROOT = Path(__file__).resolve().parents[1]


def cli(name: str) -> list[str]:
    """The installed console script, else ``python -m`` its module."""
    script = Path(sys.executable).parent / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", ENTRY_POINTS[name]]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def embed_args(
    world: dict[str, Path], reference: str, out: Path, *extra: str, workers: int = 0
) -> list[str]:
    """``plada-send embed`` of a test world (its tiny CLIP at ``world["config"]`` and
    ``world["weights"]``, its cache under ``world["root"]``): batches of 8, parts of 16."""
    return [
        *cli("plada-send"),
        "embed",
        "--reference",
        reference,
        "--cache-dir",
        str(world["root"] / "cache"),
        "--clip-model",
        str(world["config"]),
        "--clip-weights",
        str(world["weights"]),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--workers",
        str(workers),
        "--part-rows",
        "16",
        "--quiet",
        *extra,
    ]


def run(args: list[str], env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    """Run to completion; the exit status must be ``expect``. A console script's call is
    forked from the test process's fork server (:func:`forkserved`)."""
    proc = subprocess.run(
        forkserved(args), capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


def forkserved(args: list[str]) -> list[str]:
    """``args`` with an installed console script (:func:`cli`) replaced by its fork
    server shim: the same call, forked from a process that has imported the CLIs
    (:mod:`tests.cli_forkserver`). Unchanged when the server is off
    (``PLADA_TEST_FORKSERVER=0``) or ``args`` is not such a call."""
    script = Path(args[0]) if args else Path()
    if script.parent != Path(sys.executable).parent or script.name not in ENTRY_POINTS:
        return args
    shims = forkserved_bin()
    return args if shims is None else [str(shims / script.name), *args[1:]]


def forkserved_bin() -> Path | None:
    """A folder whose ``plada-send`` and ``plada-receive`` run through this test
    process's fork server (started at the first call, stopped at exit); None when
    ``PLADA_TEST_FORKSERVER=0``. A call it cannot serve (another import-time
    environment) starts the installed script instead."""
    if os.environ.get("PLADA_TEST_FORKSERVER") == "0":
        return None
    if ForkServer.running is None:
        ForkServer.running = ForkServer()
    return ForkServer.running.bin


class ForkServer:
    """This test process's fork server and the shims that call it."""

    running: ForkServer | None = None

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="plada-forkserver-"))
        address = self.folder / "socket"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_forkserver", str(address)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=cli_env(),
            cwd=ROOT,
        )
        assert self.process.stdout.readline() == b"ready\n", "the CLI fork server did not start"
        self.bin = self.folder / "bin"
        self.bin.mkdir()
        client = ROOT / "tests" / "cli_forkclient.py"
        for name in ENTRY_POINTS:
            script = Path(sys.executable).parent / name
            call = [sys.executable, "-I", "-S", str(client), str(address), str(script)]
            shim = self.bin / name
            shim.write_text(f'#!/bin/sh\nexec {shlex.join(call)} "$@"\n')
            shim.chmod(0o755)
        atexit.register(self.stop)

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def daemon_command(home: Path, reference: str, cache_dir: Path, *extra: str) -> list[str]:
    """``plada-receive daemon`` over ``home`` for tests: files are taken at once (no
    settle time, no reorder window) and the inbox is polled ten times a second."""
    return [
        *cli("plada-receive"),
        "daemon",
        "--home",
        str(home),
        "--reference",
        reference,
        "--cache-dir",
        str(cache_dir),
        "--settle-seconds",
        "0",
        "--poll-seconds",
        "0.1",
        "--reorder-seconds",
        "0",
        *extra,
    ]


def wait_for(predicate: Callable[[], object], timeout: float = 120.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned), or fail after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
