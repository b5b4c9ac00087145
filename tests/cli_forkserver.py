"""A fork server for the tests' CLI calls: the CLIs' heavy imports once, a child per call.

Each test CLI process spent ~94% of its CPU importing torch, ``torch._dynamo`` and
open_clip before a second of work (benchmarks/RESULTS.md, "Where the suite's time goes").
This process imports them once and listens on a Unix socket. A call is made by
:mod:`tests.cli_forkclient` (the ``plada-send`` / ``plada-receive`` shims of
:func:`tests.subprocess_cli.forkserved_bin`): one message with its argv, environment and
working directory, and its standard streams passed as file descriptors. For each call
the server forks a waiter, which forks the CLI process: that takes the caller's
environment, working directory and streams and runs the console script's own entry
point, ``sys.exit(main())``, as the installed script does. It is a real process: its exit
status, signals, files and threads are its own. The waiter replies with its pid, then its
exit status (negative for a signal), and kills it if the caller goes away first (the
caller was SIGKILLed). A call whose environment differs from the server's in anything
read at import time is answered "cold": the client then starts the installed script.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from pathlib import Path

ENTRY_POINTS = {"plada-send": "sender.cli", "plada-receive": "receiver.cli"}
# read at import time (by Python, torch, OpenMP, oneDNN): a call whose value differs from
# the server's starts cold
IMPORT_TIME_PREFIXES = (
    "PYTHON",
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "TORCH",
    "CUDA",
    "LD_",
    "ATEN_",
    "ONEDNN_",
    "DNNL_",
    "OPENBLAS_",
    "MALLOC",
)
# what the CLIs import on their heavy paths; none of these starts a thread on import
PRELOAD = (
    "torch",
    "torch._dynamo",
    "torchvision",
    "open_clip",
    "faiss",
    "matplotlib.pyplot",
    "scipy.stats",
    "PIL.Image",
    "sklearn",  # sets KMP_* variables on import: a caller that imported it passes them on
    "sender.cli",
    "receiver.cli",
    "sender.embedding.local",
    "sender.scoring.images",
    "sender.scoring.embeddings",
    "sender.selection.embedding_plan",
    "sender.selection.payloads",
    "receiver.daemon",
    "receiver.job",
    "trainer.training",
)
MESSAGE_BYTES = 1 << 20  # one request: argv, environment, working directory
# the server's environment when it started, and what its imports then set in it (torch
# and open_clip set a few variables, as they would in each cold process)
_started_with: dict[str, str] = {}
_set_by_imports: dict[str, str] = {}


def import_time_environment(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that Python, torch or OpenMP read when they start."""
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def _as_imports_leave_it(env: dict[str, str]) -> dict[str, str]:
    """``env``'s import-time variables, less those the preload's imports set to the same
    value (a caller that imported torch passes on what torch set)."""
    read = import_time_environment(env)
    return {k: v for k, v in read.items() if _set_by_imports.get(k) != v}


def _cli_process(request: dict, streams: list[int]) -> None:
    """Become the CLI process the request describes; never returns."""
    code: object = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(_set_by_imports | request["env"])
        for fd, stream in enumerate(streams):
            os.dup2(stream, fd)
            os.close(stream)
        sys.argv = list(request["argv"])
        entry = importlib.import_module(ENTRY_POINTS[Path(sys.argv[0]).name])
        code = entry.main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # as the interpreter would: the traceback, then status 1
        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own exit: flushes, atexit handlers, finalizers


def _wait(caller: socket.socket, pid: int) -> int:
    """The CLI process's exit status; it is killed if ``caller`` goes away first."""
    ended = os.pidfd_open(pid)
    while ended not in (readable := select.select([caller, ended], [], [])[0]):
        if caller in readable and not caller.recv(1):
            os.kill(pid, signal.SIGKILL)  # the caller was killed: so is its process
            break
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _serve_one(caller: socket.socket) -> None:
    """The waiter: fork the call's CLI process, report its pid and exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the CLI's own children are waited for
    message, streams, _, _ = socket.recv_fds(caller, MESSAGE_BYTES, 3)
    request = json.loads(message)
    given, served = _as_imports_leave_it(request["env"]), _as_imports_leave_it(_started_with)
    if given != served:
        differing = sorted(k for k in given.keys() | served.keys() if given.get(k) != served.get(k))
        caller.send(json.dumps({"cold": differing}).encode())  # named for whoever debugs it
        return
    pid = os.fork()
    if pid == 0:
        caller.close()
        _cli_process(request, streams)
    for stream in streams:
        os.close(stream)
    caller.send(json.dumps({"pid": pid}).encode())
    caller.send(json.dumps({"returncode": _wait(caller, pid)}).encode())


def serve(path: str) -> None:
    """Preload, listen on ``path``, say "ready" on stdout, then serve until stdin closes."""
    _started_with.update(os.environ)
    import matplotlib

    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    _set_by_imports.update((k, v) for k, v in os.environ.items() if _started_with.get(k) != v)
    gc.collect()
    gc.freeze()  # the children's collections skip the preloaded objects: no copy-on-write
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    while True:
        ready = select.select([listener, sys.stdin], [], [])[0]
        if sys.stdin in ready and not sys.stdin.readline():
            return  # the test process ended
        if listener in ready:
            caller, _ = listener.accept()
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                listener.close()
                try:
                    _serve_one(caller)
                except SystemExit:
                    raise  # the CLI process's own exit: the interpreter's, as in a cold one
                except BaseException:  # the waiter's: the caller sees its connection close
                    traceback.print_exc()
                os._exit(0)
            caller.close()


if __name__ == "__main__":
    serve(sys.argv[1])
