"""Optional localhost HTTP endpoint: upload payloads, read status.

- ``POST /payloads`` (body: the payload bytes, with ``Content-Length``, and the
  header ``Authorization: Bearer <token>``): streamed to disk in chunks under a
  hidden unique name in the inbox, then renamed to ``upload-<sha256 prefix>.plada``
  and verified and queued like any inbox file; answers ``202`` with the file name,
  the SHA-256 and where to follow it.
- ``POST /frames`` (body: frames, each a u16 length then the frame, as
  ``plada-send frames --stream`` writes them; same token): stored in
  ``HOME/frames/`` for the frames inbox (:mod:`receiver.frames_inbox`).
- ``GET /jobs/<sha256>``: the job of that payload, its quarantine reason, or
  ``pending`` while intake has not reached it; 404 for a payload never received.
- ``GET /status``: what ``plada-receive status --json`` prints.

Every request needs the token, reads included (the status shows the home, the
senders, their sequence numbers and the quarantine).

It listens on 127.0.0.1 only: local link software hands payloads over; it is not a
network service. The token is in ``HOME/http.token`` (mode 0600, made at the first
start), so only the daemon's user (and root) can upload. Requests from web pages
are refused: any request with an ``Origin`` header, or a ``Host`` header other
than the loopback address, gets 403 (no cross-origin upload, no DNS rebinding).

Bounded resources: at most ``max_connections`` requests at once, a socket timeout
and deadlines that cover the whole request: its headers must have come within
``header_seconds`` of the connection (a client that trickles them is cut off) and
the rest within ``request_seconds``. When every slot is taken, a new connection
takes the slot of the oldest one still sending its headers (a local client sends
them at once; a slow one is an attacker's), and gets 503 only when every slot is
past its headers, which only token holders reach. Bodies over the byte cap are
refused before they are read (413), uploads that would take the files waiting for
intake past ``max_waiting_bytes`` get 429 with a Retry-After, and never more than
one chunk of a body is in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from protocol.atomic_files import create_secret_file, fsync_directory
from protocol.errors import ConfigError, StorageError
from receiver.claims import ORIGIN_SUFFIX
from receiver.status import open_home_queue

log = logging.getLogger("plada.receiver")
TOKEN_FILE = "http.token"
CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class HttpLimits:
    """What one client may hold of the daemon."""

    max_connections: int = 16
    timeout_seconds: float = 10.0  # per read or write on the socket
    request_seconds: float = 120.0  # a whole request, however slow its client
    header_seconds: float = 10.0  # its request line and headers
    max_waiting_bytes: int = 256 << 20  # files not yet taken in: inbox and frames


def http_token(home: Path) -> str:
    """The upload token of the daemon home ``home`` (created, mode 0600, if missing)."""
    path = Path(home) / TOKEN_FILE
    token = secrets.token_hex(32)
    try:
        create_secret_file(path, token + "\n")
    except FileExistsError:
        token = path.read_text().strip()
        if len(token) < 32:
            raise ConfigError(f"{path} holds no valid token: delete it to make a new one") from None
    return token


@dataclass(frozen=True)
class UploadSite:
    """What the endpoint serves: the inbox it writes to, the daemon's home, the byte cap
    and the status it reports."""

    inbox: Path
    home: Path
    max_bytes: int
    status: Callable[[], dict[str, object]]

    @property
    def frames_folder(self) -> Path:
        return self.home / "frames"

    def waiting_bytes(self) -> int:
        """Bytes of the files that wait for intake, in the inbox and the frames folder."""
        total = 0
        for folder in (self.inbox, self.frames_folder):
            with contextlib.suppress(OSError), os.scandir(folder) as scan:
                for entry in scan:
                    with contextlib.suppress(OSError):
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
        return total


class _Connection:
    """One accepted connection and its deadline: once it passes, the server's watch
    shuts the socket down, so that whatever read or write the handler is blocked in
    ends."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.socket, self.opened, self.in_headers = sock, time.monotonic(), True
        self.deadline = self.opened + seconds
        self.cut_off = False

    def cut(self) -> None:
        self.cut_off = True
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)


class UploadServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``limits.max_connections`` at once."""

    daemon_threads = True

    def __init__(self, port: int, site: UploadSite, limits: HttpLimits, token: bytes) -> None:
        self.site, self.limits, self.token = site, limits, token
        self.token_file = site.home / TOKEN_FILE
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", "localhost"}
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.refused = 0
        self.cut_in_headers = 0  # connections cut off while still sending their headers
        self._connections: dict[socket.socket, _Connection] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(("127.0.0.1", port), UploadHandler)
        threading.Thread(target=self._watch, name="plada-http-deadlines", daemon=True).start()

    def _watch(self) -> None:
        """Cut every connection whose deadline has passed, four times a second."""
        while not self._closing.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._connections.values() if c.deadline < now]
            for connection in late:
                if not connection.cut_off:
                    connection.cut()

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self._cut_oldest_in_headers()
            if not self.slots.acquire(timeout=1.0):
                self._refuse(request)
                return
        with self._lock:
            self._connections[request] = _Connection(request, self.limits.header_seconds)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def headers_read(self, request: socket.socket) -> None:
        """The request's headers are in: from now on it is bounded by the request's
        deadline, counted from its connection, and never cut for a newcomer (the
        handler answers 408 at the deadline; the cut, one socket timeout later, ends
        whatever it may be blocked in)."""
        with self._lock:
            connection = self._connections.get(request)
            if connection is None:
                return
            connection.in_headers = False
            limits = self.limits
            connection.deadline = (
                connection.opened + limits.request_seconds + limits.timeout_seconds
            )

    def _cut_oldest_in_headers(self) -> None:
        with self._lock:
            waiting = [c for c in self._connections.values() if c.in_headers]
            oldest = min(waiting, key=lambda c: c.opened, default=None)
            if oldest is None:
                return
            oldest.in_headers = False  # cut once
        self.cut_in_headers += 1
        oldest.cut()

    def _forget(self, request: socket.socket) -> None:
        with self._lock:
            self._connections.pop(request, None)
        self.slots.release()

    def _refuse(self, request: socket.socket) -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            request.settimeout(1.0)
            request.sendall(
                b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n"
                b"Retry-After: 5\r\nConnection: close\r\n\r\n"
            )
        self.shutdown_request(request)


class UploadHandler(BaseHTTPRequestHandler):
    """One request: an upload of a payload or of frames, a job's state, the status."""

    server: UploadServer
    server_version = "plada-receive"

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout_seconds  # per read or write
        super().setup()

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # the request line was read; this reads headers
        self.server.headers_read(self.request)
        return parsed

    def _authorized(self) -> bool:
        """Whether the request carries the token; else answered 401."""
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), self.server.token):
            return True
        self._reply(
            401, {"error": f"send the token of {TOKEN_FILE} as 'Authorization: Bearer TOKEN'"}
        )
        return False

    def _reply(self, code: int, body: dict[str, object], retry_after: int = 0) -> None:
        data = (json.dumps(body, default=str) + "\n").encode()
        self.send_response(code)
        if retry_after:
            self.send_header("Retry-After", str(retry_after))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        """403 for requests a web page could make (cross-origin, DNS rebinding)."""
        host = self.headers.get("Host")
        if self.headers.get("Origin") is not None or host not in (None, *self.server.hosts):
            self._reply(403, {"error": "requests from web pages are refused"})
            return True
        return False

    def do_POST(self) -> None:
        if self._refused():
            return None
        target = self.path.rstrip("/")
        if target not in ("/payloads", "/frames"):
            return self._reply(404, {"error": "POST payloads to /payloads, frames to /frames"})
        if not self._authorized():
            return None
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._reply(411, {"error": "send the payload with a Content-Length"})
        cap = self.server.site.max_bytes
        if int(length) > cap:
            return self._reply(413, {"error": f"payload over the cap of {cap} bytes"})
        waiting, limit = self.server.site.waiting_bytes(), self.server.limits.max_waiting_bytes
        if waiting + int(length) > limit:
            return self._reply(
                429,
                {"error": f"{waiting} bytes wait for intake (the limit is {limit}); retry later"},
                retry_after=30,
            )
        return self._receive(int(length), target == "/frames")

    def _receive(self, length: int, frames: bool = False) -> None:
        """Stream the body to a hidden unique file, then rename it into the inbox (a
        payload) or into HOME/frames (a stream of length-prefixed frames)."""
        site = self.server.site
        folder = site.frames_folder if frames else site.inbox
        temporary = folder / f".upload-{secrets.token_hex(8)}.tmp"
        try:
            sha256 = self._store_body(temporary, length)
            if sha256 is None:
                temporary.unlink(missing_ok=True)
                return self._reply(400, {"error": "the upload ended early; send it again"})
            name = f"http-{sha256[:16]}.frames" if frames else upload_name(sha256)
            os.replace(temporary, folder / name)
            fsync_directory(folder)
        except TimeoutError:
            temporary.unlink(missing_ok=True)
            return self._reply(408, {"error": "the upload was too slow; send it again"})
        except (OSError, StorageError) as exc:
            temporary.unlink(missing_ok=True)
            reason = getattr(exc, "strerror", None) or str(exc)
            return self._reply(507, {"error": f"cannot store the upload: {reason}"})
        log.info(
            f"received {name} over HTTP ({length} bytes)",
            extra={"event": "http-upload", "file": name, "sha256": sha256},
        )
        if frames:  # frames name no payload yet: `status` shows their transfer
            return self._reply(202, {"file": name, "bytes": length})
        return self._reply(202, {"file": name, "sha256": sha256, "follow": f"/jobs/{sha256}"})

    def _store_body(self, path: Path, length: int) -> str | None:
        """Write the body to ``path`` chunk by chunk, within the request's deadline; its
        SHA-256, or None if it ended early."""
        deadline = time.monotonic() + self.server.limits.request_seconds
        digest = hashlib.sha256()
        with open(path, "wb") as handle:
            left = length
            while left:
                if time.monotonic() > deadline:
                    raise TimeoutError("request deadline")
                chunk = self.rfile.read1(min(CHUNK_BYTES, left))  # what has come
                if not chunk:
                    return None
                digest.update(chunk)
                handle.write(chunk)
                left -= len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        return digest.hexdigest()

    def do_GET(self) -> None:
        if self._refused() or not self._authorized():
            return None
        site = self.server.site
        if self.path.rstrip("/") == "/status":
            return self._reply(200, site.status())
        if self.path.startswith("/jobs/"):
            return self._reply(*job_state(site.home, site.inbox, self.path[len("/jobs/") :]))
        return self._reply(404, {"error": "GET /status or /jobs/<sha256>"})

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format % args)


def start_http(
    port: int,
    inbox: Path,
    home: Path,
    max_bytes: int,
    status: Callable[[], dict[str, object]],
    limits: HttpLimits | None = None,
) -> UploadServer:
    """Serve on 127.0.0.1:``port`` from a background thread; returns the server."""
    site = UploadSite(Path(inbox), Path(home), max_bytes, status)
    token = http_token(site.home).encode()
    site.frames_folder.mkdir(parents=True, exist_ok=True)
    try:
        server = UploadServer(port, site, limits or HttpLimits(), token)
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


def _claimed_under(home: Path, name: str) -> bool:
    """Whether an intake folder holds a claimed file that arrived as ``name``."""
    for origin in (home / "intake").glob(f"*/*{ORIGIN_SUFFIX}"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(origin.read_text()).get("name") == name:
                return True
    return False


def job_state(home: Path, inbox: Path, sha256: str) -> tuple[int, dict[str, object]]:
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
    if (inbox / name).exists() or _claimed_under(home, name):
        return 200, {"state": "pending"}
    return 404, {"state": "unknown", "error": "no payload with this SHA-256 was received"}
