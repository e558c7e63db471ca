"""A proxy that accepts the connection but never answers the `CONNECT` of its tunnel (an https
URL through a proxy): nothing of the request went out, so the SDK reports a connect timeout
(`httpx.ConnectTimeout` as the `TransportError`'s cause), sync and async alike, for a proxy
given as a transport and one taken from the environment. A caller that repeats only what
cannot have been applied can tell it from a read timeout. The proxy is a real socket server on
127.0.0.1 that stays silent."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from dapdee.client import AsyncPlannerClient, PlannerClient, TransportError
from tests.test_sdk_transport import RawServer, read_request

TIMEOUT_S = 0.5
SERVICE_HTTPS = "https://127.0.0.1:9"  # reached only through the proxy (nothing listens there)
SERVICE_HTTP = "http://127.0.0.1:9"


class SilentProxy:
    """A proxy on 127.0.0.1 (`RawServer`) that reads each connection's request, keeps its
    request line in `lines`, and then answers nothing until the client hangs up; `url` is its
    address."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.server = RawServer(self._hold)

    def __enter__(self) -> SilentProxy:
        self.url = self.server.__enter__()
        return self

    def _hold(self, conn: socket.socket) -> None:
        line = read_request(conn)
        if line:
            self.lines.append(line)
            while conn.recv(65536):
                pass

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)


def healthz_through(proxy_url: str, service: str) -> list[tuple[TransportError, float]]:
    """`healthz` of `service` through the proxy at `proxy_url` (given as httpx's transport) on a
    sync and then an async client: the TransportError each raised and the seconds it took."""
    got: list[tuple[TransportError, float]] = []
    t0 = time.monotonic()
    try:
        with PlannerClient(service, timeout=TIMEOUT_S, transport=httpx.HTTPTransport(proxy=proxy_url)) as c:
            c.healthz()
    except TransportError as exc:
        got.append((exc, time.monotonic() - t0))

    async def aio() -> None:
        async with AsyncPlannerClient(
            service, timeout=TIMEOUT_S, transport=httpx.AsyncHTTPTransport(proxy=proxy_url)
        ) as c:
            await c.healthz()

    t0 = time.monotonic()
    try:
        asyncio.run(aio())
    except TransportError as exc:
        got.append((exc, time.monotonic() - t0))
    return got


def test_a_proxy_silent_on_connect_is_a_connect_timeout_sync_and_async() -> None:
    """An https URL through a proxy that never answers the CONNECT: sync and async calls end at
    their timeout with `.timeout` true and `httpx.ConnectTimeout` as the cause (the proxy got the
    CONNECT and nothing else). An http URL through a plain-HTTP proxy is the contrast: there the
    request itself went to the proxy, which may have passed it on, so it is no connect timeout."""
    with SilentProxy() as proxy:
        tunnelled = healthz_through(proxy.url, SERVICE_HTTPS)
    assert len(tunnelled) == 2, tunnelled
    for exc, took in tunnelled:
        assert exc.timeout and took < TIMEOUT_S + 1.0, (exc, took)
        assert isinstance(exc.cause, httpx.ConnectTimeout), repr(exc.cause)
    assert proxy.lines == [b"CONNECT 127.0.0.1:9 HTTP/1.1"] * 2, proxy.lines

    with SilentProxy() as proxy:
        forwarded = healthz_through(proxy.url, SERVICE_HTTP)
    assert len(forwarded) == 2 and all(exc.timeout for exc, _ in forwarded), forwarded
    assert not any(isinstance(exc.cause, httpx.ConnectTimeout) for exc, _ in forwarded), forwarded
    assert proxy.lines == [b"GET http://127.0.0.1:9/healthz HTTP/1.1"] * 2, proxy.lines


ENV_PROXY_SCRIPT = """
import asyncio, json, sys
from dapdee.client import AsyncPlannerClient, PlannerClient, TransportError

service, timeout = sys.argv[1], float(sys.argv[2])
causes = []
try:
    with PlannerClient(service, timeout=timeout) as c:
        c.healthz()
except TransportError as exc:
    causes.append([type(exc.cause).__name__, exc.timeout])

async def aio():
    async with AsyncPlannerClient(service, timeout=timeout) as c:
        await c.healthz()

try:
    asyncio.run(aio())
except TransportError as exc:
    causes.append([type(exc.cause).__name__, exc.timeout])
print(json.dumps(causes))
"""


def test_the_environments_proxy_silent_on_connect_is_a_connect_timeout() -> None:
    """The same with the proxy taken from `HTTPS_PROXY`, as httpx reads it for a client given no
    transport (the sync client's pools then cut every wait to the call's deadline): a sync and an
    async call in a process whose environment names the silent proxy both report a connect
    timeout."""
    proxies = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    env = {k: v for k, v in os.environ.items() if k.upper() not in proxies}
    with SilentProxy() as proxy:
        run = subprocess.run(
            [sys.executable, "-c", ENV_PROXY_SCRIPT, SERVICE_HTTPS, str(TIMEOUT_S)],
            env={**env, "HTTPS_PROXY": proxy.url},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert run.returncode == 0, run.stderr
    causes: list[Any] = json.loads(run.stdout)
    assert causes == [["ConnectTimeout", True], ["ConnectTimeout", True]], causes
    assert proxy.lines == [b"CONNECT 127.0.0.1:9 HTTP/1.1"] * 2, proxy.lines
