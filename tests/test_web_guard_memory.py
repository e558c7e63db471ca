"""The guard's bound on the body bytes held at once across requests, under a real uvicorn server
with real concurrent uploads that send part of their body and pause: past the bound a new upload
gets 503 (Retry-After, Connection: close) before its body is read, and every request gives its
bytes back however it ends (answered, disconnected, timed out, failed in the app)."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI, Request
from pydantic import ValidationError

from dapdee.testing import ServerThread
from dapdee.web.security import DEVICE, TokenSet, require
from tests.test_web_guard import TOKENS, make_app

MAX_BODY = 1000
SLOTS = 4  # default buffer: MAX_BODY x min(SLOTS + 1, 4) = 4000 bytes, four whole bodies
BODY_TIMEOUT_S = 3.0
BODY = b"[" + b" " * (MAX_BODY - 3) + b"0]"  # valid JSON of exactly MAX_BODY bytes
UPLOADS = 6  # at once: four fit the buffer, two are refused


@pytest.fixture
def served() -> Iterator[tuple[ServerThread, FastAPI]]:
    app = make_app(
        TokenSet.of(TOKENS["admin"], TOKENS["device"], TOKENS["worker"]),
        max_body_bytes=MAX_BODY,
        max_concurrency=SLOTS,
        body_timeout_s=BODY_TIMEOUT_S,
    )

    @app.post("/boom", dependencies=[require(DEVICE)])
    async def boom(request: Request) -> None:
        await request.body()
        raise RuntimeError("the handler failed after the body was read")

    with ServerThread(app) as server:
        yield server, app


def _frame(part: bytes, chunked: bool, last: bool) -> bytes:
    """`part` as sent on the wire: raw with Content-Length, else one chunk (and the end chunk)."""
    if not chunked:
        return part
    return f"{len(part):x}\r\n".encode() + part + b"\r\n" + (b"0\r\n\r\n" if last else b"")


def _start_upload(port: int, path: str, chunked: bool) -> socket.socket:
    """A POST of `BODY` that sends its headers and the first 900 bytes, then pauses."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(BODY)}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['device']}\r\n"
        f"Content-Type: application/json\r\n{length}\r\n\r\n"
    )
    s.sendall(head.encode() + _frame(BODY[:900], chunked, last=False))
    return s


def _read_response(s: socket.socket) -> tuple[int, dict[str, str]]:
    """Status and headers of the next response on `s` (its body read and dropped)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = s.recv(65536)
        assert more, f"connection closed mid-response: {data!r}"
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        more = s.recv(65536)
        assert more, "connection closed mid-body"
        rest += more
    return int(lines[0].split()[1]), headers


def _refused_among(socks: list[socket.socket], expect: int, settle_s: float = 0.3) -> list[socket.socket]:
    """The sockets answered while all of them are mid-body: waits up to 2 s (less than
    BODY_TIMEOUT_S, so no 408 counts) for `expect` answers, then `settle_s` more for late ones."""
    answered: list[socket.socket] = []
    deadline = time.monotonic() + 2.0
    while True:
        now = time.monotonic()
        if len(answered) >= expect:
            deadline = min(deadline, now + settle_s)
        pending = [s for s in socks if s not in answered]
        if now >= deadline or not pending:
            return answered
        readable, _, _ = select.select(pending, [], [], deadline - now)
        answered += readable


def _fill(port: int, path: str, chunked: bool) -> list[socket.socket]:
    """Start `UPLOADS` paused uploads at once and check that exactly the ones past the buffer
    are refused (503, Retry-After, Connection: close) while the others wait for their body;
    returns those others. Retries for up to 5 s while bytes of earlier requests are still being
    given back (the server sees a disconnect asynchronously)."""
    deadline = time.monotonic() + 5.0
    while True:
        socks = [_start_upload(port, path, chunked) for _ in range(UPLOADS)]
        refused = _refused_among(socks, UPLOADS - 4)
        if len(refused) == UPLOADS - 4 or time.monotonic() > deadline:
            break
        for s in socks:
            s.close()
        time.sleep(0.1)
    assert len(refused) == UPLOADS - 4, f"{len(refused)} of {UPLOADS} paused uploads refused, expected 2"
    for s in refused:
        status, headers = _read_response(s)
        assert status == 503 and headers["retry-after"] == "1", (status, headers)
        assert headers["connection"] == "close", headers
        s.close()
    return [s for s in socks if s not in refused]


def _finish(socks: list[socket.socket], chunked: bool) -> list[int]:
    """Send the rest of each paused upload; the statuses answered."""
    for s in socks:
        s.sendall(_frame(BODY[900:], chunked, last=True))
    statuses = [_read_response(s)[0] for s in socks]
    for s in socks:
        s.close()
    return statuses


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_paused_uploads_at_once_hold_at_most_the_buffer(served: tuple[ServerThread, FastAPI], chunked: bool) -> None:
    """Six uploads pause mid-body, none holding a slot yet: the four that fit the 4000-byte
    buffer wait for their bodies, the other two get 503 at once (from Content-Length before a
    body byte is read, or when their first chunk would pass the bound); then the four finish."""
    server, app = served
    held = _fill(server.port, "/echo", chunked)
    assert _finish(held, chunked) == [200] * 4
    assert app.state.parsed == 4
    assert app.state.rejected == ["overloaded"] * 2
    # the finished requests gave their bytes back: four whole bodies fit again
    assert _finish(_fill(server.port, "/echo", chunked), chunked) == [200] * 4


def test_the_buffer_is_released_however_a_request_ends(served: tuple[ServerThread, FastAPI]) -> None:
    """Each way a request can end gives its bytes back: after it, four whole bodies fit the
    buffer again (a leaked byte would let only three in)."""
    server, app = served
    port = server.port
    for s in _fill(port, "/echo", chunked=False):  # the client disconnects mid-body
        s.close()
    timed_out = _fill(port, "/echo", chunked=True)  # the body takes longer than body_timeout_s
    assert [_read_response(s)[0] for s in timed_out] == [408] * 4
    for s in timed_out:
        s.close()
    assert _finish(_fill(port, "/boom", chunked=False), chunked=False) == [500] * 4  # the app raises
    assert _finish(_fill(port, "/echo", chunked=True), chunked=True) == [200] * 4
    assert httpx.post(f"{server.url}/echo", content=BODY, headers=_bearer()).json() == {"len": 1}
    assert app.state.rejected.count("timeout") == 4


def test_the_buffer_setting_defaults_to_a_few_bodies_and_holds_at_least_one() -> None:
    """Default: one largest body per slot plus one, at most four; a configured bound below one
    body is refused at settings load (such a body could never be received)."""
    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.planner.config import Settings as PlannerSettings
    from dapdee.web.guard import default_buffered_bytes

    assert default_buffered_bytes(1000, 1) == 2000
    assert default_buffered_bytes(1000, 256) == 4000
    assert PlannerSettings(redis_url=None, max_buffered_bytes=5 << 20).max_buffered_bytes == 5 << 20
    with pytest.raises(ValidationError, match="max_buffered_bytes .* must be at least max_body_bytes"):
        PlannerSettings(redis_url=None, max_body_bytes=4096, max_buffered_bytes=4095)
    with pytest.raises(ValidationError, match="must be at least max_body_bytes"):
        EdgeSettings(max_body_bytes=1 << 20, max_buffered_bytes=1 << 19)


@pytest.mark.parametrize("service", ["planner", "edge"])
def test_both_services_read_the_guards_limits_with_the_same_bounds(service: str) -> None:
    """Both services take the guard's limits from one GuardSettings: the body timeout within
    (0, 3600] s, the buffer at least one body, each refusal naming its field."""
    from dapdee.edge_worker.config import Settings as EdgeSettings
    from dapdee.planner.config import Settings as PlannerSettings

    make = (lambda **kw: PlannerSettings(redis_url=None, **kw)) if service == "planner" else EdgeSettings
    assert make(body_timeout_s=3600).body_timeout_s == 3600
    for bad in (0, 3600.5):
        with pytest.raises(ValidationError, match="body_timeout_s"):
            make(body_timeout_s=bad)
    with pytest.raises(ValidationError, match="max_buffered_bytes"):
        make(max_body_bytes=8192, max_buffered_bytes=4096)


def _bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS['device']}"}
