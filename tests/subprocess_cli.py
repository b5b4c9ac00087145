"""Running the real console scripts in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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
    """Run to completion; the exit status must be ``expect``."""
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc


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
