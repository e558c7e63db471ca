"""Free TCP ports on a local address. A socket bound to one, for a server to take, is
`dapdee.web.server_thread.bind_free_socket`."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that was free a moment ago: for a subprocess that binds it itself, or a
    URL nothing should answer on. Another process may take it meanwhile (prefer
    `bind_free_socket` where the server can take a socket). O(1)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
