"""The SDK's transport against raw HTTP servers on 127.0.0.1 that misbehave on cue, sync and
async alike: a call is repeated after a broken connection only when repeating it cannot apply it
twice (idempotent methods, `POST /plan`; never a rebalance, a heartbeat or an infer), and a
call's timeout bounds the whole exchange, so a server that drip-feeds its answer (headers or
body) or drips and then stalls cannot stretch a call past it."""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch

from dapdee.client import (
    ApiError,
    AsyncEdgeClient,
    AsyncPlannerClient,
    EdgeClient,
    PlannerClient,
    ProtocolError,
    RequestError,
    TransportError,
)
from dapdee.client.transport import Call, _repeatable
from dapdee.testing import bind_free_socket

Handler = Callable[[socket.socket], None]


def read_request(conn: socket.socket) -> bytes:
    """Read one request (head and `Content-Length` body) from `conn`; its request line (empty
    when the client closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.split(b"\r\n", 1)[0]


class RawServer:
    """A raw TCP server on 127.0.0.1 running `handler(conn)` for each connection in a thread of
    its own; `url` is its base URL."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def __enter__(self) -> str:
        self.sock = bind_free_socket()
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn)
            except OSError:  # the client gave up
                pass

    def __exit__(self, *exc: object) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


def run_both(
    make: Callable[[str], Any], amake: Callable[[str], Any], url: str, call: Callable[[Any], Any]
) -> list[Any]:
    """`call(client)` on a sync client `make(url)` and then on an async one `amake(url)` (its
    result awaited): what each returned or raised."""
    got: list[Any] = []
    with make(url) as client:
        try:
            got.append(call(client))
        except Exception as exc:  # noqa: BLE001 - the test judges it
            got.append(exc)

    async def aio() -> Any:
        async with amake(url) as client:
            result = call(client)
            return await result if inspect.isawaitable(result) else result

    try:
        got.append(asyncio.run(aio()))
    except Exception as exc:  # noqa: BLE001 - the test judges it
        got.append(exc)
    return got


# ---- repeating a call after a broken connection -----------------------------------------------------

PLANNER_CALLS: list[tuple[str, Callable[[Any], Any], int]] = [
    ("POST /fleet/rebalance", lambda c: c.rebalance(), 1),
    ("POST /workers/heartbeat", lambda c: c.heartbeat({"url": "http://e:1", "models": ["m"]}), 1),
    ("POST /plan", lambda c: c.plan({"model": "m", "bandwidth_mbps": 1.0, "device_id": "cam-1"}), 2),
    ("PUT /models/m", lambda c: c.put_graph({"model": "m", "nodes": []}), 2),
    ("PUT /models/m/profiles/p", lambda c: c.put_profile("m", "p", "device", {"a": 1.0}), 2),
    # conditional: a repeat of one that was applied would be refused (409) as a lost race
    ("PUT /models/m/profiles/q", lambda c: c.put_profile("m", "q", "device", {"a": 1.0}, if_version=3), 1),
    ("DELETE /models/m", lambda c: c.delete_model("m", if_version=3), 1),
    ("GET /models", lambda c: c.list_models(), 2),
    ("DELETE /devices/cam-1", lambda c: c.release("cam-1"), 2),
]


@pytest.mark.parametrize(("route", "call", "sent"), PLANNER_CALLS, ids=[c[0] for c in PLANNER_CALLS])
def test_only_calls_safe_to_repeat_are_repeated_after_a_broken_connection(
    route: str, call: Callable[[Any], Any], sent: int
) -> None:
    """Every connection is closed unanswered once a whole request has arrived (the server may
    have acted on it): a POST or a conditional write is sent once, an idempotent call (and
    `POST /plan`) twice; either way no answer is a TransportError."""
    seen: list[str] = []

    def drop(conn: socket.socket) -> None:
        seen.append(read_request(conn).decode())

    with RawServer(drop) as url:
        for got in run_both(PlannerClient, AsyncPlannerClient, url, call):
            assert isinstance(got, TransportError) and not got.timeout, got
            assert isinstance(got.cause, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError))
    method, path = route.split(" ")
    assert seen == [f"{method} {path} HTTP/1.1"] * (2 * sent)  # the sync client's, then the async one's


def test_a_repeat_that_cannot_connect_still_says_the_first_attempt_may_have_been_sent() -> None:
    """The server reads `POST /plan`, stops listening and drops the connection: the repeat is
    refused (nothing of it sent), but the first attempt reached the server, so the error says
    the request may have been sent (a device counts a lease the planner may have started)."""
    body = {"model": "m", "bandwidth_mbps": 1.0}

    def sync_plan(url: str) -> Any:
        with PlannerClient(url) as client:
            return client.plan(body)

    async def async_plan(url: str) -> Any:
        async with AsyncPlannerClient(url) as client:
            return await client.plan(body)

    for plan in (sync_plan, lambda url: asyncio.run(async_plan(url))):
        seen: list[bytes] = []
        server = RawServer(lambda conn: None)

        def drop_and_go(conn: socket.socket, server: RawServer = server, seen: list[bytes] = seen) -> None:
            seen.append(read_request(conn))
            server.sock.shutdown(socket.SHUT_RDWR)  # gone: the repeat's connection is refused
            server.sock.close()

        server.handler = drop_and_go
        with server as url, pytest.raises(TransportError) as got:
            plan(url)
        assert isinstance(got.value.cause, httpx.ConnectError), got.value
        assert got.value.may_have_been_sent and seen == [b"POST /plan HTTP/1.1"]


def test_an_infer_is_never_repeated() -> None:
    seen: list[bytes] = []

    def drop(conn: socket.socket) -> None:
        seen.append(read_request(conn))

    with RawServer(drop) as url:
        call = lambda c: c.infer("m", {"x": torch.zeros(1, 4)})  # noqa: E731
        for got in run_both(EdgeClient, AsyncEdgeClient, url, call):
            assert isinstance(got, TransportError), got
    assert seen == [b"POST /v2/models/m/infer HTTP/1.1"] * 2


def test_a_call_that_was_never_sent_may_be_repeated() -> None:
    """The rule itself: a connect error (nothing sent) allows a repeat of any call whose body
    was not streamed; a broken connection only of an idempotent one; never a second repeat."""
    post = Call("POST", "/fleet/rebalance", lambda a: None)
    plan = Call("POST", "/plan", lambda a: None, idempotent=True)
    get = Call("GET", "/models", lambda a: None)
    later = time.monotonic() + 60.0
    connect, broken = httpx.ConnectError("refused"), httpx.RemoteProtocolError("closed")
    assert _repeatable(post, None, 0, connect, later)
    assert not _repeatable(post, None, 0, broken, later)
    assert _repeatable(plan, None, 0, broken, later) and _repeatable(get, None, 0, broken, later)
    assert not _repeatable(get, None, 1, broken, later)  # once at most
    assert not _repeatable(get, [b"streamed"], 0, connect, later)  # a streamed body cannot be replayed
    assert not _repeatable(get, None, 0, broken, time.monotonic() - 1.0)  # no time left
    assert not Call("GET", "/x", lambda a: None, idempotent=False).is_idempotent


def test_a_transport_that_answers_with_read_responses_is_supported() -> None:
    """httpx.MockTransport's usual responses are read already (`httpx.Response(200, json=...)`):
    the SDK takes their content instead of streaming it (streaming raised httpx.StreamConsumed,
    no SDK error at all); the size limit still holds."""
    ok = httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok"}))
    big = httpx.MockTransport(lambda r: httpx.Response(200, json={"status": "ok", "pad": "x" * 4096}))

    async def aio(transport: httpx.MockTransport, limit: int | None = None) -> Any:
        kw = {} if limit is None else {"max_response_bytes": limit}
        async with AsyncPlannerClient("http://planner.test", transport=transport, **kw) as client:
            return await client.healthz()

    with PlannerClient("http://planner.test", transport=ok) as client:
        assert client.healthz().status == "ok"
    assert asyncio.run(aio(ok)).status == "ok"
    with PlannerClient("http://planner.test", transport=big, max_response_bytes=1024) as client:
        with pytest.raises(ProtocolError):
            client.healthz()
    with pytest.raises(ProtocolError):
        asyncio.run(aio(big, 1024))


class FirstAttemptFails:
    """An HTTP transport on which the first request fails with `first` (httpx's error for a
    connect that failed, or for a connection broken after the request left) and every later one
    is answered 404 "no live lease"; it counts the requests that reached "the server"."""

    def __init__(self, first: httpx.HTTPError) -> None:
        self.first: httpx.HTTPError | None = first
        self.reached = 0

    def answer(self, request: httpx.Request) -> httpx.Response:
        if self.first is not None:
            exc, self.first = self.first, None
            if not isinstance(exc, httpx.ConnectError):
                self.reached += 1  # the request went out before the connection broke
            raise exc
        self.reached += 1
        body = b'{"title": "Not Found", "status": 404, "detail": "no live lease"}'
        headers = {"content-type": "application/problem+json", "content-length": str(len(body))}
        return httpx.Response(404, headers=headers, stream=httpx.ByteStream(body))


def release_through(make: Callable[..., Any], server: FirstAttemptFails) -> Any:
    """`release("cam-1")` by a client `make` (sync or async) over `server`: its result or error."""
    client = make("http://planner.test", transport=httpx.MockTransport(server.answer))

    async def aio() -> Any:
        async with client:
            return await client.release("cam-1")

    try:
        if make is AsyncPlannerClient:
            return asyncio.run(aio())
        with client:
            return client.release("cam-1")
    except Exception as exc:  # noqa: BLE001 - the test judges it
        return exc


@pytest.mark.parametrize("broken", [False, True])
def test_a_delete_answered_404_is_success_only_after_an_attempt_that_may_have_reached_the_server(
    broken: bool,
) -> None:
    """A DELETE repeated after a connect error (nothing was sent) and answered 404 is a 404: the
    only attempt that reached the server says the lease is not there. Repeated after a
    connection broken once the request had gone out, the 404 is the first attempt's delete,
    whose answer was lost: success. Sync and async alike. Before, both were success."""
    for make in (PlannerClient, AsyncPlannerClient):
        server = FirstAttemptFails(httpx.RemoteProtocolError("closed") if broken else httpx.ConnectError("refused"))
        got = release_through(make, server)
        if broken:
            assert got is None and server.reached == 2, (make, got)
        else:
            assert isinstance(got, ApiError) and got.status == 404 and server.reached == 1, (make, got)


# ---- one deadline for the whole exchange ------------------------------------------------------------

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
GAP_S = 0.05


def health_answer(pad: int) -> tuple[bytes, bytes]:
    """A Health answer's head and body, the body padded with `pad` spaces."""
    body = b'{"status": "ok"' + b" " * pad + b"}"
    return HEAD % len(body), body


def dripping(part: str, stall_after_s: float | None = None) -> Handler:
    """A handler answering a Health one byte every GAP_S: from its first byte (`part`
    "headers") or after sending the head at once ("body"); with `stall_after_s`, it stops
    sending after that many seconds of dripping and holds the connection silent for 10 s."""

    def serve(conn: socket.socket) -> None:
        read_request(conn)
        head, body = health_answer(200)
        slow = head + body if part == "headers" else body
        if part == "body":
            conn.sendall(head)
        t0 = time.monotonic()
        for byte in slow:
            if stall_after_s is not None and time.monotonic() - t0 > stall_after_s:
                time.sleep(10.0)
                return
            time.sleep(GAP_S)
            conn.sendall(bytes([byte]))

    return serve


def call_timed(sync: bool, url: str, timeout: float) -> tuple[Any, float]:
    """`healthz` on a sync (`sync`) or async planner client with `timeout`: what it gave
    (result or exception) and the seconds it took."""

    async def aio() -> Any:
        async with AsyncPlannerClient(url, timeout=timeout) as ac:
            return await ac.healthz()

    t0 = time.monotonic()
    try:
        if sync:
            with PlannerClient(url, timeout=timeout) as c:
                result: Any = c.healthz()
        else:
            result = asyncio.run(aio())
    except TransportError as exc:
        result = exc
    return result, time.monotonic() - t0


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_drip_fed_answer_cannot_stretch_a_call_past_its_timeout(sync: bool, part: str) -> None:
    """The answer would take ~12 s at one byte per GAP_S, each byte well inside the per-read
    timeout: the call gives up at its timeout, headers or body alike."""
    with RawServer(dripping(part)) as url:
        got, took = call_timed(sync, url, timeout=0.6)
    assert isinstance(got, TransportError) and got.timeout, got
    assert 0.55 <= took < 1.5, took


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_a_stall_after_dripping_ends_at_the_deadline_not_a_read_timeout_later(sync: bool) -> None:
    """Bytes drip for 0.8 s, then nothing: the read waiting then is cut to the time the call
    has left (it would end at 0.8 + 1.0 s if each read had the whole timeout)."""
    with RawServer(dripping("body", stall_after_s=0.8)) as url:
        got, took = call_timed(sync, url, timeout=1.0)
    assert isinstance(got, TransportError) and got.timeout, got
    assert 0.95 <= took < 1.6, took


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_a_slow_answer_within_the_timeout_arrives_and_the_connection_is_reused(sync: bool) -> None:
    """Dripping for ~0.6 s inside a 3 s timeout is an answer; the kept-alive connection then
    serves a second call, under a deadline of its own."""
    connections: list[int] = []

    def serve(conn: socket.socket) -> None:
        connections.append(1)
        head, body = health_answer(10)
        while read_request(conn):
            conn.sendall(head)
            for byte in body:
                time.sleep(GAP_S / 2)
                conn.sendall(bytes([byte]))

    async def aio(url: str) -> list[Any]:
        async with AsyncPlannerClient(url, timeout=3.0) as ac:
            return [await ac.healthz(), await ac.healthz()]

    with RawServer(serve) as url:
        if sync:
            with PlannerClient(url, timeout=3.0) as c:
                answers = [c.healthz(), c.healthz()]
        else:
            answers = asyncio.run(aio(url))
    assert [a.status for a in answers] == ["ok", "ok"] and connections == [1]


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_more_calls_in_flight_than_httpx_keeps_by_default_reuse_their_connections(sync: bool) -> None:
    """Rounds of 30 concurrent calls on one client (a device's pipelined stream holds up to 32
    frames in flight) open at most 30 connections in all: each is kept alive for the next
    round, not closed when released and opened again (one TCP handshake and one new server
    connection per call)."""
    inflight, rounds = 30, 6
    connections: list[int] = []

    def serve(conn: socket.socket) -> None:
        connections.append(1)
        head, body = health_answer(10)
        while read_request(conn):
            time.sleep(0.02)  # the calls of a round overlap
            conn.sendall(head + body)

    async def aio(url: str) -> list[Any]:
        async with AsyncPlannerClient(url, timeout=10.0) as ac:
            answers = []
            for _ in range(rounds):
                answers += await asyncio.gather(*(ac.healthz() for _ in range(inflight)))
            return answers

    def threads(url: str) -> list[Any]:
        with PlannerClient(url, timeout=10.0) as c:
            answers: list[Any] = []
            for _ in range(rounds):
                workers = [threading.Thread(target=lambda: answers.append(c.healthz())) for _ in range(inflight)]
                for t in workers:
                    t.start()
                for t in workers:
                    t.join()
            return answers

    with RawServer(serve) as url:
        answers = threads(url) if sync else asyncio.run(aio(url))
    assert len(answers) == inflight * rounds and all(a.status == "ok" for a in answers)
    assert inflight // 2 < len(connections) <= inflight, len(connections)


def test_a_callers_transport_still_bounds_a_drip_fed_body() -> None:
    """With a transport of the caller's (no deadline on its reads), the time left is checked as
    each piece of the body arrives."""
    with RawServer(dripping("body")) as url:
        t0 = time.monotonic()
        with (
            PlannerClient(url, timeout=0.6, transport=httpx.HTTPTransport()) as c,
            pytest.raises(TransportError) as err,
        ):
            c.healthz()
    assert err.value.timeout and 0.55 <= time.monotonic() - t0 < 1.5


def test_both_clients_use_the_environments_proxy_under_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, sync and async clients alike send their calls to the proxy (a raw
    server on 127.0.0.1, standing in for one; the service's own port is closed), and a proxy
    that drip-feeds the answer still cannot stretch a sync call past its timeout."""
    lines: list[bytes] = []

    def proxy(conn: socket.socket) -> None:
        lines.append(read_request(conn))
        head, body = health_answer(0)
        conn.sendall(head + body)

    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    service = "http://127.0.0.1:9"  # the discard port: nothing listens there
    with RawServer(proxy) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        got = run_both(PlannerClient, AsyncPlannerClient, service, lambda c: c.healthz())
    assert [getattr(g, "status", g) for g in got] == ["ok", "ok"]
    assert lines == [b"GET http://127.0.0.1:9/healthz HTTP/1.1"] * 2
    with RawServer(dripping("body")) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        got_late, took = call_timed(True, service, timeout=0.6)
    assert isinstance(got_late, TransportError) and got_late.timeout and took < 1.5, (got_late, took)


# ---- content codings and closed clients ----------------------------------------------------------


def test_an_encoded_answer_is_refused_unread_and_identity_is_asked_for() -> None:
    """The client asks for `Accept-Encoding: identity`; a server that gzips anyway (here 64 MiB
    of JSON in 64 KB on the wire) is refused by its header alone, before a decompressor could
    blow it up past `max_response_bytes`: ProtocolError naming the coding, sync and async."""
    import gzip

    body = gzip.compress(b'{"status":"ok","pad":"' + b" " * (64 << 20) + b'"}', compresslevel=1)
    asked: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        asked.append(data.split(b"\r\n\r\n")[0])
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        conn.sendall(head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)

    with RawServer(serve) as url:
        got = run_both(PlannerClient, AsyncPlannerClient, url, lambda c: c.healthz())
    for err in got:
        assert isinstance(err, ProtocolError) and "Content-Encoding 'gzip'" in err.detail, err
    assert len(asked) == 2 and all(b"\r\naccept-encoding: identity" in h.lower() for h in asked), asked


def test_a_call_on_a_closed_client_is_a_request_error() -> None:
    """After `close()` / `aclose()` a call raises the SDK's RequestError (httpx's own is a bare
    RuntimeError, which no caller of the SDK catches)."""

    def closed_call(c: Any) -> Any:
        if isinstance(c, AsyncPlannerClient):

            async def go() -> Any:
                await c.aclose()
                return await c.healthz()

            return go()
        c.close()
        return c.healthz()

    got = run_both(PlannerClient, AsyncPlannerClient, "http://127.0.0.1:9", closed_call)
    for err in got:
        assert isinstance(err, RequestError) and "closed" in str(err), err


def slow_reader(conn: socket.socket) -> None:
    """Reads whatever comes in 16 KiB every 10 ms (about 1.6 MB/s), never answering."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    while conn.recv(16384):
        time.sleep(0.01)


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_a_large_body_read_slowly_cannot_stretch_a_call_past_its_timeout(sync: bool) -> None:
    """A 16 MiB infer body to a server reading about 1.6 MB/s (10 s for all of it): the call
    gives up at its timeout, sync as async (the sync one wrote the body as one buffer, each
    partial send with the whole timeout again: it ran until the upload ended)."""
    x = torch.zeros(1, 4 << 20)  # 16 MiB of FP32

    async def aio(url: str) -> Any:
        async with AsyncEdgeClient(url, timeout=1.5) as ac:
            return await ac.infer("m", {"x": x})

    with RawServer(slow_reader) as url:
        t0 = time.monotonic()
        try:
            if sync:
                with EdgeClient(url, timeout=1.5) as c:
                    got: Any = c.infer("m", {"x": x})
            else:
                got = asyncio.run(aio(url))
        except TransportError as exc:
            got = exc
        took = time.monotonic() - t0
    assert isinstance(got, TransportError) and got.timeout, got
    assert 1.4 <= took < 2.5, took


def test_a_repeated_delete_answered_404_succeeds_and_a_first_404_does_not() -> None:
    """The first DELETE's connection breaks once the request is in (the planner may have acted
    on it); the repeat is answered 404 (the lease or model is gone: that first attempt ended
    it): the call succeeds, sync and async. A DELETE answered 404 at its first attempt is still
    an ApiError 404."""
    from dapdee.client import ApiError

    problem = b'{"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no live lease"}'
    gone = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/problem+json\r\nContent-Length: %d\r\n\r\n%s"
    seen: list[bytes] = []

    def drop_then_404(conn: socket.socket) -> None:
        seen.append(read_request(conn))
        if len(seen) % 2 == 0:  # each client's repeat
            conn.sendall(gone % (len(problem), problem))

    with RawServer(drop_then_404) as url:
        assert run_both(PlannerClient, AsyncPlannerClient, url, lambda c: c.release("cam-1")) == [None, None]
        assert run_both(PlannerClient, AsyncPlannerClient, url, lambda c: c.delete_model("m")) == [None, None]
    assert len(seen) == 8

    def answer_404(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(gone % (len(problem), problem))

    with RawServer(answer_404) as url:
        for got in run_both(PlannerClient, AsyncPlannerClient, url, lambda c: c.release("cam-1")):
            assert isinstance(got, ApiError) and got.status == 404, got


def test_a_cancelled_async_call_never_returns_an_answer() -> None:
    """Calls to a real planner cancelled at random instants around the time an answer takes: a
    call cancelled before it ended raises CancelledError, every time. (`asyncio.wait_for`, on
    Python before 3.12, returned the answer of a call cancelled as it arrived: about a quarter
    of these cancellations were lost, and a device's SIGTERM with them.)"""
    import random

    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.testing import serve_app_in_thread

    async def go(url: str) -> tuple[int, int]:
        rng, lost, landed = random.Random(5), 0, 0
        async with AsyncPlannerClient(url) as client:
            times = []
            for _ in range(16):  # the median: one slow sample would put every cancel after the answer
                t0 = time.perf_counter()
                await client.healthz()
                times.append(time.perf_counter() - t0)
            took = sorted(times)[len(times) // 2]
            for _ in range(600):
                call = asyncio.create_task(client.healthz())
                await asyncio.sleep(rng.uniform(0.3, 1.2) * took)
                if not call.cancel():  # it had ended
                    await call
                    continue
                landed += 1
                try:
                    await call
                    lost += 1
                except asyncio.CancelledError:
                    pass
        return lost, landed

    with serve_app_in_thread(create_app(Settings(redis_url=None))) as url:
        lost, landed = asyncio.run(go(url))
    assert landed >= 50 and lost == 0, (lost, landed)


def test_an_async_client_used_in_a_second_event_loop_is_a_request_error() -> None:
    """An async client's pooled connections belong to the event loop that opened them: a call
    from another loop (a second `asyncio.run`) raises the SDK's RequestError naming the cause
    (httpx's own is a bare RuntimeError once the first loop has closed), and sends nothing."""
    asked: list[bytes] = []

    def keep_alive(conn: socket.socket) -> None:
        body = b'{"status":"ok"}'
        while head := read_request(conn):
            asked.append(head)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    with RawServer(keep_alive) as url:
        client = AsyncPlannerClient(url)
        first = asyncio.run(client.healthz())
        with pytest.raises(RequestError, match="event loop") as err:
            asyncio.run(client.healthz())
    assert first is not None and len(asked) == 1, asked
    assert "one client per event loop" in str(err.value), err.value
