"""Whether a service can listen where it is told to, checked before it loads or serves anything."""

from __future__ import annotations

import socket


def check_listen(host: str, port: int) -> None:
    """ValueError naming --port when `host`:`port` cannot be bound now (taken by another process,
    or an address this machine does not have), so the service exits with one line instead of
    starting up and shutting down again. Binds and closes a TCP socket (SO_REUSEADDR, as uvicorn
    binds): another process may still take the port in between. O(1)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ValueError(f"--host {host!r}: cannot listen there ({exc.strerror or exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise ValueError(f"--port {port}: cannot listen on {host} ({exc.strerror or exc})") from None
