"""A whole-call deadline for the blocking transport: every wait on the network is cut to the
time left before it.

httpx's timeouts bound each phase and each read on its own, so a server that sends one byte
just before every read would run out would hold a blocking call for as long as it likes. The
async transport cancels the exchange at its deadline (`asyncio.wait_for`); a blocking read
cannot be cancelled, so the sync transport gives each one no longer than the call has left:
`DeadlineBackend` wraps httpcore's network backend, and its streams cut the timeout of every
connect, TLS handshake, read and write (a large body in 64 KiB slices) to the deadline
`within` holds for the current call (a context variable: per thread, so one client may serve
several threads). A wait that would
start at or after the deadline raises httpcore's timeout of that phase at once, which httpx
reports as its own (`httpx.ReadTimeout`, ...).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

_DEADLINE: ContextVar[float | None] = ContextVar("dapdee_client_deadline", default=None)
WRITE_SLICE = 64 << 10  # a body is written in slices of this many bytes, each cut to the time left


@contextlib.contextmanager
def within(deadline: float) -> Iterator[None]:
    """Make `deadline` (a `time.monotonic()` instant) the current call's for the block. O(1)."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def cut(timeout: float | None, expired: type[Exception]) -> float | None:
    """`timeout` cut to the current call's time left (unchanged outside a call); `expired`
    raised when none is left. O(1)."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the call's timeout ran out")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every wait is cut to the current call's deadline."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, cut(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """`buffer` written in slices, each with the time left: httpcore's stream gives every
        partial send of one write the whole timeout, so a reader slow enough kept a large body
        going long past the deadline."""
        view = memoryview(buffer)
        for start in range(0, max(len(view), 1), WRITE_SLICE):
            self._stream.write(bytes(view[start : start + WRITE_SLICE]), cut(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, cut(timeout, httpcore.ConnectTimeout))
        return DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's network backend with `DeadlineStream`s, connects cut to the deadline too."""

    def __init__(self, backend: httpcore.NetworkBackend) -> None:
        self._backend = backend

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        wait = cut(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._backend.connect_tcp(host, port, wait, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        wait = cut(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._backend.connect_unix_socket(path, wait, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def with_deadlines(client: httpx.Client) -> httpx.Client:
    """`client` with every connection pool it made on a `DeadlineBackend`: its default transport's
    and those of the proxies it mounted from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY,
    NO_PROXY, as httpx reads them for a client given no transport). httpx takes no network
    backend, so this sets each pool's (httpx and httpcore attributes); where a later httpx or
    httpcore has none, the pool is left as it is and the deadline is only checked as answer bytes
    arrive (`transport._Body`). O(mounts)."""
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if isinstance(backend, httpcore.NetworkBackend) and not isinstance(backend, DeadlineBackend):
            pool._network_backend = DeadlineBackend(backend)  # type: ignore[union-attr]
    return client
