# ---- edge worker (issue 6): run an ASGI app under a real uvicorn server in a thread ----------
import contextlib as _contextlib  # noqa: E402
import socket as _socket  # noqa: E402
import time as _time  # noqa: E402
from collections.abc import Iterator as _Iterator  # noqa: E402
from typing import Any as _Any  # noqa: E402


@_contextlib.contextmanager
def serve_app_in_thread(app: _Any, host: str = "127.0.0.1", timeout: float = 30.0) -> _Iterator[str]:
    """Serve `app` with uvicorn on a free port of `host` in a daemon thread (lifespan on);
    yields the base URL and shuts the server down (running the lifespan's exit) afterwards.
    The same runner `dapdee up` uses (dapdee.device.servers.ServerThread)."""
    from dapdee.device.servers import ServerThread, bind_free_socket

    server = ServerThread(app, sock=bind_free_socket(host)).start(timeout)
    try:
        yield server.url
    finally:
        server.stop(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for URLs nothing should answer on)."""
    with _socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- planner service (issue 5): key prefixes, private Redis servers, planner processes ----------
import os as _os  # noqa: E402
import shutil as _shutil  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import uuid as _uuid  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

import pytest as _pytest  # noqa: E402

_REPO = _Path(__file__).resolve().parent.parent


def wait_until_ready(url: str, proc: _subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; fail if `proc` exits or `timeout` s pass."""
    import httpx

    deadline = _time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or _time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit code {proc.poll()})")
        _time.sleep(0.1)


def _redis_clear(url: str, prefix: str) -> None:
    """Delete every key under `prefix:` on the Redis at `url` (best effort)."""
    import redis

    try:
        r = redis.Redis.from_url(url, socket_timeout=2)
        keys = list(r.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            r.delete(*keys)
        r.close()
    except redis.RedisError:
        pass


@_pytest.fixture
def planner_prefix() -> _Iterator[str]:
    """A unique DAPDEE_KEY_PREFIX; its keys on the shared Redis (127.0.0.1:6379) are removed after."""
    prefix = f"test-{_uuid.uuid4().hex[:12]}"
    yield prefix
    _redis_clear("redis://127.0.0.1:6379/0", prefix)


class RedisProcess:
    """A private `redis-server --save ''` on a fixed free port that a test can stop and restart."""

    def __init__(self) -> None:
        if _shutil.which("redis-server") is None:
            _pytest.skip("redis-server not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: _subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        self.proc = _subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no"],
            stdout=_subprocess.DEVNULL,
            stderr=_subprocess.DEVNULL,
        )
        deadline = _time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.5).ping()
                return
            except redis.RedisError:
                if _time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                _time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@_pytest.fixture
def redis_process() -> _Iterator[RedisProcess]:
    """A private Redis server (started); killed after the test."""
    rp = RedisProcess()
    rp.start()
    try:
        yield rp
    finally:
        rp.stop()


@_contextlib.contextmanager
def planner_process(env: dict[str, str] | None = None, timeout: float = 60.0) -> _Iterator[str]:
    """Run `dapdee serve planner` as its own process on a free port (settings from `env`, which
    is added to DAPDEE_* variables); yields its base URL, terminates it afterwards."""

    port = free_port()
    full_env = {k: v for k, v in _os.environ.items() if not k.startswith("DAPDEE_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(_REPO)
    proc = _subprocess.Popen(
        [_sys.executable, "-m", "dapdee.cli", "serve", "planner", "--port", str(port)]
        + ["--log-level", "warning"],
        cwd=_REPO,
        env=full_env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", proc, timeout, "planner process")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except _subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- hardening (issue 10): `slow` variants run only with DAPDEE_SLOW=1 ---------------------------


def pytest_collection_modifyitems(config: _Any, items: list[_Any]) -> None:
    """Skip tests marked `slow` (heavy variants of the hardening tests) unless DAPDEE_SLOW=1 or
    the run selects them explicitly with `-m slow`."""
    if _os.environ.get("DAPDEE_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = _pytest.mark.skip(reason="heavy variant: set DAPDEE_SLOW=1 (or -m slow) to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@_contextlib.contextmanager
def edge_process(
    args: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 90.0
) -> _Iterator[tuple[str, _subprocess.Popen]]:
    """Run `dapdee serve edge` as its own process on a free 127.0.0.1 port (`args` added to the
    command line, `env` to a DAPDEE_*-free environment); yields (base URL, process) once
    /v2/health/ready answers 200, and terminates (then kills) it afterwards."""

    port = free_port()
    full_env = {k: v for k, v in _os.environ.items() if not k.startswith("DAPDEE_")}
    full_env.update(env or {})
    full_env["PYTHONPATH"] = str(_REPO)
    proc = _subprocess.Popen(
        [_sys.executable, "-m", "dapdee.cli", "serve", "edge", "--port", str(port), "--log-level", "warning"]
        + list(args or []),
        cwd=_REPO,
        env=full_env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/v2/health/ready", proc, timeout, "edge worker process")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except _subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def proc_rss_kib(pid: int) -> int:
    """Resident set size (VmRSS, KiB) of process `pid`, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
