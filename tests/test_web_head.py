"""The request head's limits (dapdee.web.http_head) on a real uvicorn server with the planner app,
over raw sockets on 127.0.0.1: a head over the byte limit is 431 and closed, a head not complete
in time is 408 and closed, both as the planner's problem documents; an idle new connection is
closed, a head just under the limit and a slow body after a complete head are served;
`dapdee serve planner` and `dapdee serve edge` run with the limits, each answering in its own
error format."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from dapdee.planner.problems import ProblemHeadProtocol
from dapdee.testing import ServerThread
from dapdee.web.http_head import MAX_HEAD_BYTES
from tests.conftest import edge_process
from tests.test_planner_api import planner_subprocess


class QuickHead(ProblemHeadProtocol):
    """The protocol with limits a test can reach quickly."""

    max_head_bytes = 4096
    head_timeout_s = 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    with ServerThread(create_app(Settings(redis_url=None)), http=QuickHead) as srv:
        yield srv.host, srv.port


def exchange(addr: tuple[str, int], data: bytes, wait_s: float = 0.0, timeout_s: float = 5.0) -> tuple[bytes, bool]:
    """Send `data`, wait `wait_s`, then read until the server closes the connection or
    `timeout_s` passes: (what came back, whether the server closed it)."""
    with socket.create_connection(addr, timeout=timeout_s) as s:
        if data:
            s.sendall(data)
        time.sleep(wait_s)
        got, deadline = b"", time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return got, True
            if not chunk:
                return got, True
            got += chunk
        return got, False


def head(extra: bytes = b"", path: bytes = b"/healthz") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra


def read_answer(s: socket.socket) -> bytes:
    """One whole answer from `s`: its head, then its Content-Length body (they may arrive apart)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head_part, _, body = got.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head_part.lower().split(b"\r\n") if line.startswith(b"content-length:"))
    )
    while len(body) < length:
        body += s.recv(65536)
    return head_part + b"\r\n\r\n" + body


def error_body(answer: bytes, content_type: str) -> dict[str, object]:
    """The JSON body of a raw answer whose head names `content_type` (AssertionError otherwise)."""
    got_head, _, body = answer.partition(b"\r\n\r\n")
    assert f"content-type: {content_type}".encode() in got_head.lower(), got_head
    return json.loads(body)


def test_a_head_over_the_limit_is_431_and_closed(server: tuple[str, int]) -> None:
    got, closed = exchange(server, head(b"X-Pad: " + b"a" * 5000 + b"\r\n\r\n"))
    assert got.startswith(b"HTTP/1.1 431 ") and closed
    problem = error_body(got, "application/problem+json")
    assert problem["status"] == 431 and problem["detail"] == "request head over 4096 bytes", problem
    got, closed = exchange(server, head(b"".join(b"X-%d: b\r\n" % i for i in range(600)) + b"\r\n"))  # many small
    assert got.startswith(b"HTTP/1.1 431 ") and closed


def test_one_endless_header_line_is_431_before_the_head_timeout(server: tuple[str, int]) -> None:
    """The parser hands over a header only once its line ends: a line that never ends is refused
    by the bytes read, not held until the head timeout (which would answer 408)."""
    got, closed = exchange(server, head(b"X-Big: " + b"a" * 20000))
    assert got.startswith(b"HTTP/1.1 431 ") and closed, got[:80]
    got, closed = exchange(server, b"GET /" + b"a" * 20000)  # an endless request line too
    assert got.startswith(b"HTTP/1.1 431 ") and closed, got[:80]


def test_bodies_read_in_parts_do_not_count_toward_the_next_head(server: tuple[str, int]) -> None:
    """On a kept-alive connection a body over the head limit, read in parts, is the body's: the
    next request's small head is served."""
    body = b'{"model": "none", "bandwidth_mbps": 5' + b" " * 6000 + b"}"
    start = b"POST /plan HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(start + b"Content-Length: %d\r\n\r\n" % len(body))
        for part in (body[:3000], body[3000:]):
            time.sleep(0.1)
            s.sendall(part)
        first = read_answer(s)
        s.sendall(head(b"Connection: close\r\n\r\n"))
        second = read_answer(s)
    assert first.startswith(b"HTTP/1.1 404 "), first[:80]  # the route's answer: no such model
    assert second.startswith(b"HTTP/1.1 200 "), second[:80]


def test_a_head_under_the_limit_is_served(server: tuple[str, int]) -> None:
    got, _ = exchange(server, head(b"X-Pad: " + b"a" * 3000 + b"\r\nConnection: close\r\n\r\n"))
    assert got.startswith(b"HTTP/1.1 200 ")


def test_a_head_not_complete_in_time_is_408_and_closed(server: tuple[str, int]) -> None:
    t0 = time.monotonic()
    got, closed = exchange(server, head(b"X-Slow: 1\r\n"), timeout_s=5.0)  # no blank line: never complete
    assert got.startswith(b"HTTP/1.1 408 ") and closed and time.monotonic() - t0 < 4.0
    assert error_body(got, "application/problem+json")["status"] == 408


def test_an_idle_new_connection_is_closed(server: tuple[str, int]) -> None:
    got, closed = exchange(server, b"", timeout_s=5.0)
    assert got == b"" and closed


def test_a_slow_body_after_a_complete_head_is_not_cut_by_the_head_timeout(server: tuple[str, int]) -> None:
    """The head timer stops at the end of the head: a body 1 s later (twice the head timeout,
    well inside the guard's body timeout) is read and answered."""
    body = b'{"model": "none", "bandwidth_mbps": 5}'
    start = b"POST /plan HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(start + b"Content-Length: %d\r\n\r\n" % len(body))
        time.sleep(1.0)
        s.sendall(body)
        got = s.recv(65536)
    assert got.startswith(b"HTTP/1.1 404 "), got[:80]  # the route's answer: no such model


def test_the_planner_cli_serves_with_the_head_limit() -> None:
    with planner_subprocess({}) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        got, closed = exchange((host, int(port)), head(b"X-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"))
    assert got.startswith(b"HTTP/1.1 431 ") and closed
    assert error_body(got, "application/problem+json")["status"] == 431


def test_the_edge_cli_serves_with_the_head_limit_answering_oip_errors() -> None:
    """The edge worker's 431 is OIP's `{"error": ...}`, as every other edge error."""
    with edge_process(["--models", "zoo:alexnet?width=0.25"]) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        big = head(b"X-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", path=b"/v2/health/live")
        got, closed = exchange((host, int(port)), big)
    assert got.startswith(b"HTTP/1.1 431 ") and closed
    assert error_body(got, "application/json") == {"error": f"request head over {MAX_HEAD_BYTES} bytes"}
