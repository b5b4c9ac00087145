"""The daemon's localhost HTTP endpoint under hostile clients: idle and slow
connections, short and oversized bodies, missing tokens, web pages, concurrent
identical uploads. The real server code runs in this process, on a free port."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import stat
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from receiver.http_upload import HttpLimits, start_http
from receiver.job_queue import JobQueue
from tests.hostile import signed_payload

CAP = 1 << 20


@pytest.fixture
def server(tmp_path: Path):
    home = tmp_path / "home"
    (home / "inbox").mkdir(parents=True)
    JobQueue(home / "queue.sqlite").close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = HttpLimits(
        max_connections=4, timeout_seconds=1.0, request_seconds=3.0, header_seconds=2.0
    )
    served = start_http(port, home / "inbox", home, CAP, lambda: {"ok": True}, limits)
    served.home = home  # type: ignore[attr-defined]
    yield served
    served.shutdown()
    served.server_close()


def _token(server) -> str:
    return (server.home / "http.token").read_text().strip()


def _post(server, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    sent = {"Authorization": f"Bearer {_token(server)}"} if headers is None else headers
    connection.request("POST", "/payloads", body=data, headers=sent)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, json.loads(body) if body else {}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _inbox(server) -> list[str]:
    return sorted(p.name for p in (server.home / "inbox").iterdir())


def test_idle_connections_are_bounded_and_time_out(server) -> None:
    before_fds, before_threads = _open_fds(), threading.active_count()
    idle = [socket.create_connection(server.server_address) for _ in range(24)]
    busiest = 0
    deadline = time.monotonic() + 1.5  # longer than one socket timeout
    while time.monotonic() < deadline:
        busiest = max(busiest, threading.active_count() - before_threads)
        time.sleep(0.02)
    # beyond the 4 slots each newcomer takes the slot of the oldest connection still
    # without its headers (or gets 503 when none can be cut in time)
    assert server.cut_in_headers > 0
    assert busiest <= 4  # never more handlers than slots
    for sock in idle:  # every one ends: cut, 503, or closed when its silence timed out
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            answer = sock.recv(64)
            assert answer == b"" or answer.startswith(b"HTTP/1.0 503"), answer
        sock.close()
    assert _post(server, signed_payload(sequence=1))[0] == 202  # and uploads go on
    time.sleep(0.3)
    assert _open_fds() <= before_fds + 2  # nothing of the 24 is left open


def test_slow_clients_and_short_bodies_are_cut_off_and_leave_nothing(server) -> None:
    slow = socket.create_connection(server.server_address)
    token = _token(server)
    slow.sendall(
        f"POST /payloads HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
    )
    started = time.monotonic()
    answer = b""
    with contextlib.suppress(OSError):  # one byte every 0.3 s: the socket never times out
        while time.monotonic() - started < 8:
            slow.sendall(b"x")
            time.sleep(0.3)
            slow.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                answer += slow.recv(200)
                if answer:
                    break
            slow.settimeout(None)
    assert b" 408 " in answer, answer  # the request deadline (3 s here) ended it
    assert time.monotonic() - started < 6
    short = socket.create_connection(server.server_address)
    short.sendall(
        f"POST /payloads HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b"y" * 999
    )
    short.shutdown(socket.SHUT_WR)  # one byte short
    assert b" 400 " in short.recv(200)
    short.close()
    slow.close()
    assert _inbox(server) == []  # no temp file, no partial upload


def test_bodies_stream_to_disk_under_a_cap(server) -> None:
    oversized = socket.create_connection(server.server_address)  # refused from its headers
    oversized.sendall(
        f"POST /payloads HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {_token(server)}"
        f"\r\nContent-Length: {CAP + 1}\r\n\r\n".encode()
    )
    assert b" 413 " in oversized.recv(200)
    oversized.close()
    body = os.urandom(CAP)
    tracemalloc.start()
    status, answer = _post(server, body)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert status == 202
    assert peak < CAP // 2  # the server never held the body: chunks of 64 KiB to disk
    assert (server.home / "inbox" / answer["file"]).read_bytes() == body


def test_uploads_need_the_token_and_web_pages_are_refused(server) -> None:
    data = signed_payload(sequence=2)
    token_file = server.home / "http.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert _post(server, data, headers={})[0] == 401
    assert _post(server, data, headers={"Authorization": "Bearer wrong"})[0] == 401
    good = {"Authorization": f"Bearer {_token(server)}"}
    assert _post(server, data, headers=good | {"Origin": "http://evil.example"})[0] == 403
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    connection.request("GET", "/status", headers={"Host": "rebound.example:80"})
    assert connection.getresponse().status == 403  # DNS rebinding
    connection.close()
    assert _inbox(server) == []
    assert _post(server, data)[0] == 202


def test_concurrent_identical_uploads_all_succeed(server) -> None:
    data = signed_payload(sequence=3)
    results: list[int] = []
    barrier = threading.Barrier(4)

    def upload() -> None:
        barrier.wait()
        results.append(_post(server, data)[0])

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [202] * 4
    assert len(_inbox(server)) == 1  # one file, and no temp file left


def test_frames_are_posted_as_a_stream_for_the_frames_inbox(server) -> None:
    from protocol.frames import FrameEncoder, pack_stream
    from receiver.frames_inbox import FramesInbox

    payload = signed_payload(sequence=9)
    frames = FrameEncoder(payload, 115).frames(repair=3)
    body = pack_stream(frames)
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request(
        "POST", "/frames", body=body, headers={"Authorization": f"Bearer {_token(server)}"}
    )
    response = connection.getresponse()
    assert response.status == 202 and json.loads(response.read())["file"].endswith(".frames")
    connection.close()
    inbox = FramesInbox(server.home, server.home / "inbox")
    assert inbox.poll() == 1
    assert [p.read_bytes() for p in (server.home / "inbox").glob("frames-*.plada")] == [payload]


def _trickle(server, stop: threading.Event, cut: list[float]) -> None:
    """A client without a token that sends its request headers one byte at a time,
    each byte within the socket timeout; ``cut`` gets the seconds until it was cut."""
    sock = socket.create_connection(server.server_address)
    started = time.monotonic()
    header = b"POST /payloads HTTP/1.0\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 400
    try:
        for byte in header:
            if stop.is_set():
                return
            sock.sendall(bytes([byte]))
            stop.wait(0.3)
    except OSError:
        cut.append(time.monotonic() - started)
    finally:
        sock.close()


def test_header_tricklers_never_starve_a_token_holders_upload(server) -> None:
    """Eight clients trickle their headers into the four slots, again and again; a
    token holder's uploads still go through, and each trickler is cut off by the
    header deadline (2 s here) at the latest."""
    stop, cut = threading.Event(), []
    tricklers = [
        threading.Thread(target=_trickle, args=(server, stop, cut), daemon=True) for _ in range(8)
    ]
    for thread in tricklers:
        thread.start()
    try:
        wait_until = time.monotonic() + 30
        while len(cut) < 4 and time.monotonic() < wait_until:  # the slots are contested
            time.sleep(0.05)
        answers = [_post(server, signed_payload(sequence=20 + n))[0] for n in range(5)]
    finally:
        stop.set()
        for thread in tricklers:
            thread.join(timeout=10)
    assert answers == [202] * 5
    assert len(cut) >= 4 and max(cut) < 2.0 + 2.0  # the header deadline, and the watch's beat


def test_reads_need_the_token_too(server) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    for path in ("/status", "/jobs/" + "0" * 64):
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 401 and b'"ok": true' not in response.read()
        connection.close()
    token = {"Authorization": f"Bearer {_token(server)}"}
    connection.request("GET", "/status", headers=token)
    assert json.loads(connection.getresponse().read()) == {"ok": True}
    connection.close()


def test_uploads_wait_while_the_files_waiting_for_intake_are_over_their_limit(server) -> None:
    backlog = server.home / "inbox" / "backlog.plada"
    with open(backlog, "wb") as handle:  # sparse: 300 MiB waiting, nothing written
        handle.truncate(300 << 20)
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
    connection.request(
        "POST", "/payloads", body=b"x" * 100, headers={"Authorization": f"Bearer {_token(server)}"}
    )
    response = connection.getresponse()
    assert response.status == 429 and response.getheader("Retry-After") == "30"
    connection.close()
    backlog.unlink()
    assert _post(server, signed_payload(sequence=40))[0] == 202
