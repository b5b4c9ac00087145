"""The tests' CLI fork server (:mod:`tests.cli_forkserver`): a forked call behaves as a
cold one, signals reach it, a killed caller takes it along, and a call with another
import-time environment starts cold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from protocol.signing import SigningKey
from receiver.trust_store import add_key
from tests.conftest import SMALL_SPEC
from tests.subprocess_cli import cli, cli_env, daemon_command, forkserved, wait_for

pytestmark = pytest.mark.skipif(
    os.environ.get("PLADA_TEST_FORKSERVER") == "0", reason="the fork server is off"
)


def _daemon_pid(home: Path, not_pid: int | None = None) -> int | None:
    """The pid in the daemon's health file, once one other than ``not_pid`` is there."""
    try:
        pid = json.loads((home / "health.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if pid != not_pid else None


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def start_daemon(cache_dir: Path):
    """Start a daemon on a home through the fork server; every one still running at the
    end (a failed assertion) is killed, and a killed caller takes its forked daemon along."""
    started: list[subprocess.Popen] = []

    def start(home: Path, env: dict[str, str]) -> subprocess.Popen:
        add_key(home / "trust", SigningKey.generate("station-f").public)
        command = forkserved(daemon_command(home, SMALL_SPEC, cache_dir))
        daemon = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=60)


def test_a_forked_call_prints_and_exits_as_a_cold_one(tmp_path) -> None:
    missing = str(tmp_path / "missing.plada")
    args = [*cli("plada-receive"), "verify", missing, "--reference", SMALL_SPEC]
    args += ["--trust", str(tmp_path / "trust")]
    cold = subprocess.run(args, env=cli_env(), capture_output=True, text=True)
    assert forkserved(args)[0] != args[0]
    forked = subprocess.run(forkserved(args), env=cli_env(), capture_output=True, text=True)
    assert cold.returncode == 2 and "PayloadError" in cold.stderr
    assert (forked.returncode, forked.stdout, forked.stderr) == (2, cold.stdout, cold.stderr)


def test_signals_reach_the_forked_process_and_a_killed_caller_takes_it_along(
    tmp_path, start_daemon
) -> None:
    home = tmp_path / "home"
    first = start_daemon(home, cli_env())
    pid = wait_for(lambda: _daemon_pid(home), what="the daemon's health file")
    assert pid != first.pid  # a process forked from the server, not the caller itself
    first.send_signal(signal.SIGINT)  # the daemon's clean stop: "daemon stopped", exit 0
    assert first.wait(timeout=120) == 0
    stopped = first.stderr.read()
    assert "daemon stopped" in stopped and "Traceback" not in stopped, stopped
    wait_for(lambda: _gone(pid), what="the interrupted daemon to end")
    second = start_daemon(home, cli_env())
    pid = wait_for(lambda: _daemon_pid(home, not_pid=pid), what="the second daemon")
    second.kill()
    assert second.wait(timeout=60) == -signal.SIGKILL
    wait_for(lambda: _gone(pid), what="the daemon to die with its killed caller")


def test_another_import_time_environment_starts_cold(tmp_path, start_daemon) -> None:
    home = tmp_path / "home"
    threads = str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 1)
    daemon = start_daemon(home, cli_env() | {"OMP_NUM_THREADS": threads})
    assert wait_for(lambda: _daemon_pid(home), what="the daemon's health file") == daemon.pid
