"""Free TCP ports on a local address."""

from __future__ import annotations

import socket


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


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that was free a moment ago: for a subprocess that binds it itself, or a
    URL nothing should answer on. Another process may take it meanwhile (prefer
    `bind_free_socket` where the server can take a socket). O(1)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
