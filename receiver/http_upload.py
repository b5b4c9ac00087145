"""Optional localhost HTTP endpoint: upload payloads, read status.

- ``POST /payloads`` (body: the payload bytes): stored in the inbox under
  ``upload-<sha256 prefix>.plada`` (temp file + rename), then verified and queued
  like any inbox file; answers ``202`` with the file name, the SHA-256 and where to
  follow it.
- ``GET /jobs/<sha256>``: the job of that payload, its quarantine reason, or
  ``pending`` while intake has not reached it; 404 for a payload never received.
- ``GET /status``: what ``plada-receive status --json`` prints.

It listens on 127.0.0.1 only: local link software hands payloads over; it is not a
network service.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from protocol.atomic_files import write_bytes_atomic
from protocol.errors import ConfigError, StorageError
from receiver.status import open_home_queue

log = logging.getLogger("plada.receiver")


def start_http(
    port: int, inbox: Path, home: Path, max_bytes: int, status: Callable[[], dict[str, Any]]
) -> ThreadingHTTPServer:
    """Serve on 127.0.0.1:``port`` from a background thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "plada-receive"

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = (json.dumps(body, default=str) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/payloads":
                return self._reply(404, {"error": "POST payloads to /payloads"})
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                return self._reply(411, {"error": "send the payload with a Content-Length"})
            if int(length) > max_bytes:
                return self._reply(413, {"error": f"payload over the cap of {max_bytes} bytes"})
            data = self.rfile.read(int(length))
            if len(data) != int(length):
                return self._reply(400, {"error": "the upload ended early; send it again"})
            sha256 = hashlib.sha256(data).hexdigest()
            name = upload_name(sha256)
            try:
                write_bytes_atomic(inbox / name, data, durable=True)
            except StorageError as exc:
                return self._reply(507, {"error": str(exc)})
            log.info(
                f"received {name} over HTTP ({len(data)} bytes)",
                extra={"event": "http-upload", "file": name, "sha256": sha256},
            )
            return self._reply(202, {"file": name, "sha256": sha256, "follow": f"/jobs/{sha256}"})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/status":
                return self._reply(200, status())
            if self.path.startswith("/jobs/"):
                return self._reply(*job_state(home, inbox, self.path[len("/jobs/") :]))
            return self._reply(404, {"error": "GET /status or /jobs/<sha256>"})

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format % args)

    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}): stop the process that "
            "holds the port or choose another --http-port"
        ) from exc
    threading.Thread(target=server.serve_forever, name="plada-http", daemon=True).start()
    return server


def upload_name(sha256: str) -> str:
    """The inbox file name of an upload."""
    return f"upload-{sha256[:16]}.plada"


def job_state(home: Path, inbox: Path, sha256: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status, where the payload with this SHA-256 stands): its job, its
    quarantine reason, ``pending`` while its upload waits for intake; 404 if this
    device has never received it."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        return 400, {"state": "unknown", "error": "give the full lowercase hex SHA-256"}
    queue = open_home_queue(home)
    try:
        job = queue.find(sha256)
    finally:
        queue.close()
    if job is not None:
        return 200, job.as_dict()
    for reason in sorted((home / "quarantine").glob(f"{sha256[:12]}-*.reason.json")):
        return 200, {"state": "quarantined", **json.loads(reason.read_text())}
    name = upload_name(sha256)
    if (inbox / name).exists() or any((home / "intake").glob(f"*/{name}")):
        return 200, {"state": "pending"}
    return 404, {"state": "unknown", "error": "no payload with this SHA-256 was received"}
