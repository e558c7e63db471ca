"""Helpers for tests and benchmarks: free ports, `dapdee serve ...` subprocesses with a
readiness wait, Redis helpers (key prefixes, a private redis-server) and waiting for edge workers
to register with a planner; and, re-exported from the web layer where `dapdee up` takes them
(`dapdee.web.server_thread`), ASGI apps under uvicorn in a thread on a pre-bound free socket.
One copy of each, shared by the tests and the benchmarks (the only importers of this package:
`dapdee up` takes its servers from the web layer). Nothing here imports pytest."""

from dapdee.testing.ports import free_port
from dapdee.testing.processes import ServiceProcess, end_process, wait_until_ready
from dapdee.testing.redis_tools import RedisProcess, clear_prefix, unique_prefix
from dapdee.testing.registration import registered, wait_registered
from dapdee.web.server_thread import ServerThread, bind_free_socket, serve_app_in_thread

__all__ = [
    "RedisProcess",
    "ServerThread",
    "ServiceProcess",
    "bind_free_socket",
    "clear_prefix",
    "end_process",
    "free_port",
    "registered",
    "serve_app_in_thread",
    "unique_prefix",
    "wait_registered",
    "wait_until_ready",
]
