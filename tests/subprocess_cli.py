"""Running the real console scripts in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
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


def run(args: list[str], env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    """Run to completion; the exit status must be ``expect``."""
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return proc
