"""Helpers for tests and benchmarks: free ports, ASGI apps under uvicorn in a thread,
`dapdee serve ...` subprocesses with a readiness wait, Redis helpers (key prefixes, a private
redis-server) and waiting for edge workers to register with a planner. One copy of each, shared
by the tests, the benchmarks and `dapdee up`. Nothing here imports pytest."""

from dapdee.testing.ports import bind_free_socket, free_port
from dapdee.testing.processes import ServiceProcess, end_process, wait_until_ready
from dapdee.testing.redis_tools import RedisProcess, clear_prefix, unique_prefix
from dapdee.testing.registration import registered, wait_registered
from dapdee.testing.servers import ServerThread, serve_app_in_thread

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
