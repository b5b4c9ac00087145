"""A CLI call through the tests' fork server (:mod:`tests.cli_forkserver`), as a process.

    python cli_forkclient.py SOCKET SCRIPT [ARG ...]

runs the installed console script SCRIPT with ARGs in a process forked from the server
at SOCKET, with this process's environment, working directory and standard streams,
and exits as that process does: with its status, or by the same signal. The signals a
test sends to this process (SIGINT, SIGTERM, ...) are passed on to it; if this process
is SIGKILLed, the server kills it. Without a server, or for an environment the server
cannot serve, SCRIPT itself is started in this process's place. Standard library only:
this process must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)


def _start_cold(script: str, args: list[str]) -> None:
    os.execv(script, [script, *args])


def main() -> None:
    path, script, *args = sys.argv[1:]
    caller = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        caller.connect(path)
    except OSError:
        _start_cold(script, args)
    request = {"argv": [script, *args], "env": dict(os.environ), "cwd": os.getcwd()}
    socket.send_fds(caller, [json.dumps(request).encode()], [0, 1, 2])
    reply = json.loads(caller.recv(4096) or b'{"cold": true}')
    if reply.get("cold"):
        caller.close()
        _start_cold(script, args)
    pid = reply["pid"]

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            os.kill(pid, signum)

    for forwarded in FORWARDED:
        signal.signal(forwarded, forward)
    ended = caller.recv(4096)
    if not ended:
        sys.exit(f"cli_forkclient: the fork server lost process {pid}")
    code = json.loads(ended)["returncode"]
    if code < 0:  # ended by a signal: so does this process
        if -code in FORWARDED:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
