"""An ASGI app under a real uvicorn server in a background thread, on a pre-bound socket of a
free port (no race): `ServerThread`, `serve_app_in_thread` and `bind_free_socket`. `dapdee up`
serves its planner and edge worker this way; the tests and the benchmarks use it through
`dapdee.testing`. uvicorn is imported when a server is made."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any


def bind_free_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready TCP socket bound to a free port of `host` (no race: the caller keeps
    it). The protocol is given explicitly (IPPROTO_TCP): asyncio sets TCP_NODELAY on accepted
    sockets only when the listening socket's proto says TCP; with proto 0, Nagle + delayed ACK
    add ~40 ms to every keep-alive response. O(1)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """`uvicorn.Server` for `app` in a daemon thread. `start()` waits until it serves (lifespan
    done); `stop()` shuts it down (lifespan shutdown runs) and joins the thread."""

    def __init__(
        self,
        app: Any,
        sock: socket.socket | None = None,
        log_level: str = "warning",
        name: str = "server",
        http: Any = "auto",
        stop_timeout_s: float = 10.0,
    ) -> None:
        """`http`: uvicorn's HTTP protocol (a name, or a class such as the services'
        `dapdee.web.http_head.BoundedHeadProtocol`); `stop_timeout_s`: how long `stop()` waits
        by default."""
        import uvicorn

        self.sock = sock or bind_free_socket()
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(
            app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=2, http=http
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{name}", daemon=True)
        self.error: BaseException | None = None
        self.stop_timeout_s = stop_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # surfaced by start()
            self.error = exc

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        """Start serving; returns once the lifespan's start-up is done (RuntimeError if the
        server exits first, TimeoutError after `timeout_s`)."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"server {self.url} exited during start-up: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Shut the server down and join its thread; RuntimeError if it is still running after
        `timeout_s` (None: `stop_timeout_s`; a lifespan that does not end would otherwise keep serving, and its
        background tasks running, behind the caller's back)."""
        self.server.should_exit = True
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        self.thread.join(timeout_s)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.thread.is_alive():
            raise RuntimeError(f"server {self.url} still running {timeout_s:g} s after it was told to stop")

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_app_in_thread(app: Any, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of `host` in a daemon thread (lifespan on);
    yields the base URL and shuts the server down (running the lifespan's exit) afterwards."""
    server = ServerThread(app, sock=bind_free_socket(host)).start(timeout)
    try:
        yield server.url
    finally:
        server.stop(timeout)
