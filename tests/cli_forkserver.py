"""A fork server for the tests' CLI calls: the CLIs' heavy imports once, a child per call.

Each test CLI process spent ~94% of its CPU importing torch, ``torch._dynamo`` and
open_clip before a second of work (benchmarks/RESULTS.md, "Where the suite's time goes").
This process imports them once; for each request (one JSON line on stdin: argv, env,
cwd and the files for stdout and stderr) it forks a child that takes that environment,
working directory and standard streams and runs the console script's own entry point,
``sys.exit(main())``, as the installed script does. The child is a real process: its
exit status, signals, files and threads are its own. The reply is one JSON line: the
child's pid when it starts, then its exit status (negative for a signal).

Only :func:`tests.subprocess_cli.run` uses it, for calls whose environment matches the
server's in everything read at import time; every other call, and every test that
signals, watches or races a process, starts the installed script from cold.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
from pathlib import Path

ENTRY_POINTS = {"plada-send": "sender.cli", "plada-receive": "receiver.cli"}
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


def _child(request: dict) -> None:
    """Become the CLI process the request describes; never returns."""
    code: object = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), *_outputs(request)):
            opened = os.open(path, mode, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdout = sys.__stdout__  # the server's replies went elsewhere; this is fd 1
        sys.argv = list(request["argv"])
        entry = importlib.import_module(ENTRY_POINTS[Path(sys.argv[0]).name])
        code = entry.main()
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # as the interpreter would: the traceback, then status 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.exit(code)  # the interpreter's own exit: flushes, atexit handlers, finalizers


def _outputs(request: dict) -> tuple[tuple[int, str, int], ...]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    return ((1, request["stdout"], flags), (2, request["stderr"], flags))


def serve() -> None:
    """Preload, then serve requests until stdin closes."""
    import matplotlib

    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the children's collections skip the preloaded objects: no copy-on-write
    reply = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # nothing but replies on the reply stream
    reply.write("ready\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reply.close()
            _child(request)
        reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()
        _, status = os.waitpid(pid, 0)
        reply.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        reply.flush()


if __name__ == "__main__":
    serve()
