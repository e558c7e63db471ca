"""The shared request guard (dapdee.web) on a small real app under a real uvicorn server:
roles before parsing, body size and time limits, the concurrency limit, the exposure rule."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from dapdee.testing import ServerThread
from dapdee.web.guard import RequestGuard
from dapdee.web.security import ADMIN, ANY_ROLE, DEVICE, PUBLIC, TokenSet, check_exposure, require

TOKENS = {"admin": "a" * 24, "device": "d" * 24, "worker": "w" * 24}


def _render(status: int, message: str) -> tuple[bytes, str]:
    return json.dumps({"error": message}).encode(), "application/json"


def make_app(tokens: TokenSet, guarded: bool = True, **limits: Any) -> FastAPI:
    app = FastAPI()
    app.state.tokens = tokens
    app.state.parsed = 0
    app.state.rejected = []  # reasons, in order
    app.state.refused_routes = []  # their routes' path templates
    app.state.entered = threading.Event()
    app.state.release = threading.Event()

    @app.get("/health", dependencies=[require(PUBLIC)])
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/things", dependencies=[require(ANY_ROLE)])
    async def things() -> dict[str, int]:
        return {"n": 1}

    @app.post("/echo", dependencies=[require(DEVICE)])
    async def echo(request: Request) -> dict[str, int]:
        body = await request.json()  # parsed only after the guard let it in
        app.state.parsed += 1
        return {"len": len(body)}

    @app.post("/slow", dependencies=[require(DEVICE)])
    async def slow() -> dict[str, bool]:
        app.state.entered.set()
        await asyncio.to_thread(app.state.release.wait, 10)
        return {"done": True}

    @app.delete("/things/{name}", dependencies=[require(ADMIN)])
    async def delete(name: str) -> dict[str, str]:
        return {"deleted": name}

    @app.put("/undeclared")
    async def undeclared() -> dict[str, bool]:
        return {"ok": True}

    if guarded:
        options = {"max_body_bytes": 1000, "body_timeout_s": 0.5, "max_concurrency": 4} | limits
        app.add_middleware(
            RequestGuard,
            routes_app=app,
            tokens=tokens,
            render=_render,
            on_reject=lambda reason, route: (app.state.rejected.append(reason), app.state.refused_routes.append(route)),
            **options,
        )
    return app


@pytest.fixture
def served() -> Iterator[tuple[str, FastAPI]]:
    app = make_app(TokenSet.of(TOKENS["admin"], TOKENS["device"], TOKENS["worker"]), max_concurrency=1)
    with ServerThread(app) as server:
        yield server.url, app


def _auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def test_roles_are_checked_before_the_body_is_parsed(served: tuple[str, FastAPI]) -> None:
    url, app = served
    bad_json = b"{not json"
    r = httpx.post(f"{url}/echo", content=bad_json)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{url}/echo", content=bad_json, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.post(f"{url}/echo", content=bad_json, headers=_auth("worker"))
    assert r.status_code == 403 and "device" in r.json()["error"]
    assert app.state.parsed == 0
    assert httpx.post(f"{url}/echo", json=[1, 2, 3], headers=_auth("device")).json() == {"len": 3}
    assert app.state.parsed == 1
    assert app.state.rejected == ["unauthenticated", "unauthenticated", "forbidden"]
    assert app.state.refused_routes == ["/echo"] * 3


def test_each_route_admits_only_its_roles(served: tuple[str, FastAPI]) -> None:
    url, _ = served
    assert httpx.get(f"{url}/health").status_code == 200
    for role in ("admin", "device", "worker"):
        assert httpx.get(f"{url}/things", headers=_auth(role)).status_code == 200
    assert httpx.get(f"{url}/things").status_code == 401
    assert httpx.delete(f"{url}/things/x", headers=_auth("admin")).status_code == 200
    assert httpx.delete(f"{url}/things/x", headers=_auth("device")).status_code == 403
    # a route that declares nothing is admin-only
    assert httpx.put(f"{url}/undeclared", headers=_auth("device")).status_code == 403
    assert httpx.put(f"{url}/undeclared", headers=_auth("admin")).status_code == 200
    # the docs stay public; unknown routes get the app's own 404
    assert httpx.get(f"{url}/openapi.json").status_code == 200
    assert httpx.get(f"{url}/nowhere", headers=_auth("device")).status_code == 404


def test_body_limits_from_content_length_and_while_streaming(served: tuple[str, FastAPI]) -> None:
    url, app = served
    r = httpx.post(f"{url}/echo", content=b"[" + b"1," * 600 + b"1]", headers=_auth("device"))
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b"["
        for _ in range(100):
            yield b"1," * 10
        yield b"1]"

    r = httpx.post(f"{url}/echo", content=chunks(), headers=_auth("device"))
    assert r.status_code == 413
    assert app.state.parsed == 0


def test_a_slow_body_gets_408_and_holds_no_slot(served: tuple[str, FastAPI]) -> None:
    url, app = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKENS['device']}\r\nContent-Length: 100\r\n\r\n[1,".encode()
        )
        reply = s.recv(4096).decode()  # the guard answers after body_timeout_s (0.5 s)
    assert reply.startswith("HTTP/1.1 408"), reply
    # the one slot (max_concurrency=1) is free again
    assert httpx.post(f"{url}/echo", json=[1], headers=_auth("device")).status_code == 200
    assert app.state.rejected == ["timeout"]


def test_past_the_concurrency_limit_503_with_retry_after_but_health_answers(served: tuple[str, FastAPI]) -> None:
    url, app = served

    async def scenario() -> tuple[int, int, int, dict[str, str]]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            first = asyncio.create_task(client.post("/slow", headers=_auth("device")))
            await asyncio.to_thread(app.state.entered.wait, 5)
            second = await client.post("/echo", json=[1], headers=_auth("device"))
            health = await client.get("/health")
            app.state.release.set()
            done = await first
            return second.status_code, health.status_code, done.status_code, dict(second.headers)

    busy, health, done, headers = asyncio.run(scenario())
    assert (busy, health, done) == (503, 200, 200)
    assert headers["retry-after"] == "1"
    assert httpx.post(f"{url}/echo", json=[1], headers=_auth("device")).status_code == 200


def test_without_the_guard_the_route_dependency_still_checks() -> None:
    app = make_app(TokenSet.of(TOKENS["admin"], TOKENS["device"]), guarded=False)
    with ServerThread(app) as server:
        assert httpx.post(f"{server.url}/echo", json=[1]).status_code == 401
        assert httpx.post(f"{server.url}/echo", json=[1], headers=_auth("admin")).status_code == 403
        assert httpx.post(f"{server.url}/echo", json=[1], headers=_auth("device")).status_code == 200
        spec = httpx.get(f"{server.url}/openapi.json").json()
    assert spec["paths"]["/echo"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_an_open_service_admits_everyone_on_loopback_only() -> None:
    open_tokens = TokenSet.of()
    assert "OPEN" in (check_exposure("planner", "127.0.0.1", open_tokens, insecure=False) or "")
    assert "OPEN" in (check_exposure("planner", "::1", open_tokens, insecure=False) or "")
    with pytest.raises(ValueError, match="--insecure"):
        check_exposure("planner", "0.0.0.0", open_tokens, insecure=False)
    with pytest.raises(ValueError, match="not a loopback"):
        check_exposure("edge", "edge-1.example", open_tokens, insecure=False)
    assert "--insecure" in (check_exposure("edge", "0.0.0.0", open_tokens, insecure=True) or "")
    assert check_exposure("edge", "0.0.0.0", TokenSet.of(admin="x"), insecure=False) is None
    with ServerThread(make_app(open_tokens)) as server:
        assert httpx.delete(f"{server.url}/things/x").status_code == 200


def test_the_fallback_token_grants_every_role_and_comparison_needs_an_exact_match() -> None:
    tokens = TokenSet.of(all_roles="s" * 20, device="d" * 20)
    assert tokens.roles_of("s" * 20) == frozenset({"admin", "device", "worker"})
    assert tokens.roles_of("d" * 20) == frozenset({"device"})
    assert tokens.roles_of("s" * 19) is None and tokens.roles_of("s" * 21) is None


def _streamed(
    http: str, request: str, role: str | None, first: bytes, wait_s: float
) -> tuple[FastAPI, str, float | None]:
    """`request` ("METHOD /path") with `role`'s token and an endless chunked body (`first`, then
    `_closed_within`'s chunks) to a guarded app (body_timeout_s 0.5) on a real server speaking
    `http`: (the app, the answer's head in lower case, the seconds until the server closed the
    connection, None when it was still open after `wait_s`)."""
    app = make_app(TokenSet.of(TOKENS["admin"], TOKENS["device"], TOKENS["worker"]), body_timeout_s=0.5)
    server = ServerThread(app)
    server.server.config.http = http
    auth = f"Authorization: Bearer {TOKENS[role]}\r\n" if role else ""
    with server, socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(f"{request} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode() + first)
        head = s.recv(4096).decode("latin-1").lower()
        return app, head, _closed_within(s, wait_s)


def _closed_within(s: socket.socket, seconds: float) -> float | None:
    """Keep streaming chunks of an endless chunked body on `s` and watch for the server closing
    the connection: the seconds it took (None: still open after `seconds`)."""
    s.setblocking(False)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            s.sendall(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            if s.recv(4096) == b"":
                return time.monotonic() - start
        except BlockingIOError:
            pass  # nothing to read yet (or the send buffer is full): still open
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("http", ["httptools", "h11"])
@pytest.mark.parametrize(("role", "status"), [(None, 401), ("worker", 403)])
def test_an_auth_refusal_closes_the_connection_while_the_client_streams(
    http: str, role: str | None, status: int
) -> None:
    """401/403 are answered before the body is read: with `Connection: close` the server drops
    the connection at once, instead of keeping it and discarding an endless body with no time
    limit (body_timeout_s covers only a body the guard reads)."""
    app, head, took = _streamed(http, "POST /echo", role, b"", 2.0)  # 4x body_timeout_s
    assert head.startswith(f"http/1.1 {status}"), head
    assert took is not None and took < 1.0, f"the connection stayed open ({took} s; None: past 2 s) while streaming"
    assert "connection: close" in head, head
    assert app.state.parsed == 0


@pytest.mark.parametrize("http", ["httptools", "h11"])
@pytest.mark.parametrize(
    ("method", "path", "role"),
    [("GET", "/health", None), ("GET", "/things", "device"), ("DELETE", "/things/x", "admin")],
)
def test_a_chunked_body_the_guard_does_not_read_closes_the_connection(
    http: str, method: str, path: str, role: str | None
) -> None:
    """A GET or DELETE (no body read by the guard) that declares a chunked body is passed on
    unread, so no body_timeout_s bounds it: its answer carries `Connection: close` and the server
    drops the connection, instead of discarding an endless body on a kept-alive connection (on a
    public route, without any token)."""
    app, head, took = _streamed(http, f"{method} {path}", role, b"10\r\n" + b"x" * 16 + b"\r\n", 3.0)
    assert head.startswith("http/1.1 200"), head
    assert "connection: close" in head, head
    assert took is not None and took < 1.5, f"the connection stayed open ({took} s; None: past 3 s) while streaming"
    assert app.state.rejected == []


def test_a_503_after_the_body_was_read_keeps_the_connection(served: tuple[str, FastAPI]) -> None:
    """Only refusals sent before the body was read close the connection: the 503 (the body was
    read first) does not, and an auth refusal of a fully sent body still does."""
    url, app = served

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            first = asyncio.create_task(client.post("/slow", headers=_auth("device")))
            await asyncio.to_thread(app.state.entered.wait, 5)
            busy = await client.post("/echo", json=[1], headers=_auth("device"))
            refused = await client.post("/echo", json=[1])
            app.state.release.set()
            await first
            return busy, refused

    busy, refused = asyncio.run(scenario())
    assert busy.status_code == 503 and "connection" not in busy.headers
    assert refused.status_code == 401 and refused.headers["connection"] == "close"


def test_a_non_ascii_digit_content_length_is_a_400_not_a_crash() -> None:
    """'²' (latin-1 0xB2) passes str.isdigit() but not int(): refused as a bad request at the ASGI
    level (uvicorn rejects it before the app; other servers and transports may not)."""
    app = make_app(TokenSet.of(TOKENS["admin"], TOKENS["device"], TOKENS["worker"]))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"[1]", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for declared in (b"\xb2", b"1\xb9", b"\xb3\xb2"):  # latin-1 superscript digits: ², 1¹, ³²
        sent.clear()
        headers = [(b"authorization", f"Bearer {TOKENS['device']}".encode()), (b"content-length", declared)]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/echo", "raw_path": b"/echo", "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        asyncio.run(app(scope, receive, send))
        start = sent[0]
        assert start["type"] == "http.response.start" and start["status"] == 400, (declared, start)
        assert (b"connection", b"close") in start["headers"]
        assert "Content-Length" in json.loads(sent[1]["body"])["error"]
    assert app.state.parsed == 0 and app.state.rejected == ["bad_request"] * 3


def test_the_route_cache_holds_a_bounded_number_of_path_bytes() -> None:
    """4096 requests name distinct paths of 60 KB each (any client may, before any token
    check): the guard's route cache keeps what fits its byte budget, about 1 MiB, and still
    answers each path's route. Before, it kept 4096 paths whatever their length: about 250 MB
    held by a process that unauthenticated requests had filled."""
    import tracemalloc

    app = make_app(TokenSet.of(TOKENS["admin"], TOKENS["device"], TOKENS["worker"]), guarded=False)
    guard = RequestGuard(app, app, app.state.tokens, _render, max_body_bytes=1000, body_timeout_s=0.5,
                         max_concurrency=4)  # fmt: skip

    def scope(path: str, method: str = "GET") -> dict[str, Any]:
        return {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}

    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(4096):
            assert guard.route_for(scope(f"/x{i:06d}" + "a" * 60_000)).access is None
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held - before < 2 << 20, held - before
    assert guard.route_for(scope("/things")).route == "/things"
    assert guard.route_for(scope("/things/x" + "b" * 60_000, "DELETE")).route == "/things/{name}"


def test_an_open_service_answers_only_requests_for_a_loopback_host() -> None:
    """A service run open (no token) on loopback refuses, before anything else, a request whose
    Host is not a loopback name: a web page that rebinds its own domain to 127.0.0.1 cannot call
    it from a browser (DNS rebinding). Loopback names (127.0.0.1, localhost, [::1]) are served;
    so is any Host where tokens are configured."""
    open_app = make_app(TokenSet.of(), guarded=False)
    open_app.add_middleware(RequestGuard, routes_app=open_app, tokens=TokenSet.of(), render=_render,
                            max_body_bytes=1000, body_timeout_s=0.5, max_concurrency=4,
                            loopback_hosts_only=True)  # fmt: skip
    closed = make_app(TokenSet.of(TOKENS["admin"], TOKENS["device"], TOKENS["worker"]))
    with ServerThread(open_app) as served_open, ServerThread(closed) as served_closed:
        port = served_open.url.rsplit(":", 1)[1]
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", "127.0.0.1.evil:80", ""):
            r = httpx.post(f"{served_open.url}/echo", json=[1], headers={"Host": host})
            assert r.status_code == 403 and "loopback" in r.json()["error"], (host, r.text)
        assert open_app.state.parsed == 0
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "LOCALHOST"):
            assert httpx.post(f"{served_open.url}/echo", json=[1], headers={"Host": host}).json() == {"len": 1}
        r = httpx.get(f"{served_closed.url}/things", headers={"Host": "rebind.attacker.example", **_auth("device")})
        assert r.status_code == 200
