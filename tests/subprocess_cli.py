"""Running the real console scripts in subprocesses."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
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
    module = {"plada-send": "sender.cli", "plada-receive": "receiver.cli"}[name]
    return [sys.executable, "-m", module]


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
    forked from the test process's fork server when its environment allows
    (:mod:`tests.cli_forkserver`), else started from cold."""
    server = ForkServer.for_call(args, env)
    if server is not None:
        proc = server.run(args, env, timeout=900)
    else:
        proc = subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=900, check=False
        )
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


# read at import time (by Python, torch, OpenMP): a call whose value differs starts cold
IMPORT_TIME_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "TORCH", "CUDA", "LD_")


class ForkServer:
    """This test process's fork server (started at its first call, stopped at exit)."""

    _running: ForkServer | None = None

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_forkserver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            bufsize=0,  # replies are read byte by byte below, so select() sees them all
        )
        assert self._reply() == "ready"
        atexit.register(self.stop)

    @classmethod
    def for_call(cls, args: list[str], env: dict[str, str]) -> ForkServer | None:
        """The server for a call of an installed console script, or None: not one, the
        server is off (``PLADA_TEST_FORKSERVER=0``), or its import-time environment
        differs."""
        script = Path(args[0])
        if os.environ.get("PLADA_TEST_FORKSERVER") == "0" or len(args) < 2:
            return None
        if script.parent != Path(sys.executable).parent or script.name not in ENTRY_POINTS:
            return None
        if cls._running is None:
            cls._running = cls(env)
        if _import_time(env) != _import_time(cls._running.env):
            return None
        return cls._running

    def run(self, args: list[str], env: dict[str, str], timeout: float):
        """One call, as ``subprocess.run(..., capture_output=True, text=True)`` gives it."""
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"argv": args, "env": env, "cwd": os.getcwd()}
            request |= {"stdout": str(out), "stderr": str(err)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            pid = json.loads(self._reply())["pid"]
            try:
                reply = self._reply(timeout)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._reply()
                raise subprocess.TimeoutExpired(args, timeout) from None
            code = json.loads(reply)["returncode"]
            read = (p.read_text(errors="replace") for p in (out, err))
            return subprocess.CompletedProcess(args, code, *read)

    def _reply(self, timeout: float | None = None) -> str:
        """The server's next line (``TimeoutError`` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError
            byte = os.read(self.process.stdout.fileno(), 1)
            assert byte, "the CLI fork server stopped"
            line += byte
        return line.decode().strip()

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _import_time(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


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
