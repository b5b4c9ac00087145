"""Put on PYTHONPATH (with PLADA_CONNECT_LOG naming a file), it records every inet
socket connect and every name lookup of each Python process started with it: Ray's
driver, dashboard, agents and workers alike. An audit hook sees each one as it
happens, where sampling a process's sockets sees only those open at that moment."""

import os
import socket
import sys

_LOG = os.environ.get("PLADA_CONNECT_LOG")


def _hook(event, args):
    if _LOG is None:
        return
    if event == "socket.connect":
        sock, address = args
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        kind, host = "connect", str(address[0])
    elif event == "socket.getaddrinfo":
        kind, host = "lookup", str(args[0])
    else:
        return
    program = os.path.basename(sys.argv[0]) if sys.argv else "?"
    with open(_LOG, "a") as handle:
        handle.write(f"{os.getpid()}\t{program}\t{kind}\t{host}\n")


sys.addaudithook(_hook)
