"""Run an ASGI app under uvicorn in a background thread, on a pre-bound 127.0.0.1 socket (a
free port with no race). Used by `dapdee up` and the device-client tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def bind_free_socket(host: str = "127.0.0.1") -> socket.socket:
    """A listening-ready TCP socket bound to a free port of `host`. The protocol is given
    explicitly (IPPROTO_TCP): asyncio sets TCP_NODELAY on accepted sockets only when the
    listening socket's proto says TCP; with proto 0, Nagle + delayed ACK add ~40 ms to every
    keep-alive response."""
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
    ) -> None:
        import uvicorn

        self.sock = sock or bind_free_socket()
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{name}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # surfaced by start()
            self.error = exc

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"server {self.url} exited during start-up: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
