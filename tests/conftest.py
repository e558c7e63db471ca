"""Shared fixtures. Servers, ports, Redis helpers and service processes live once in
`dapdee.testing`; the names test modules import from here are re-exported."""

import contextlib as _contextlib
import os as _os
from collections.abc import Iterator as _Iterator
from typing import Any as _Any

import pytest as _pytest

from dapdee.testing import (  # noqa: F401 (re-exported for the test modules)
    RedisProcess,
    ServiceProcess,
    clear_prefix,
    free_port,
    serve_app_in_thread,
    unique_prefix,
    wait_until_ready,
)

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@_pytest.fixture(scope="module")
def stack(tmp_path_factory: _pytest.TempPathFactory) -> _Iterator[_Any]:
    """The device tests' stack (`tests.device_stack.open_stack`: an artifact, a planner and a
    registered edge worker under uvicorn), one per test module."""
    from tests.device_stack import open_stack

    with open_stack(tmp_path_factory.mktemp("artifact")) as s:
        yield s


@_pytest.fixture
def planner_prefix() -> _Iterator[str]:
    """A unique DAPDEE_KEY_PREFIX; its keys on the shared Redis (127.0.0.1:6379) are removed after."""
    prefix = unique_prefix("test")
    yield prefix
    clear_prefix(SHARED_REDIS, prefix)


@_pytest.fixture
def redis_process() -> _Iterator[RedisProcess]:
    """A private Redis server (started); killed after the test."""
    if not RedisProcess.available():
        _pytest.skip("redis-server not installed")
    rp = RedisProcess().start()
    try:
        yield rp
    finally:
        rp.stop()


@_contextlib.contextmanager
def planner_process(env: dict[str, str] | None = None, timeout: float = 60.0) -> _Iterator[str]:
    """Run `dapdee serve planner` as its own process on a free port (settings from `env`, which
    is added to DAPDEE_* variables); yields its base URL, terminates it afterwards."""
    with ServiceProcess("planner", [], "/readyz", env).start(timeout) as svc:
        yield svc.url


# `slow` variants (heavy hardening tests) run only with DAPDEE_SLOW=1 -----------------------------


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
) -> _Iterator[tuple[str, _Any]]:
    """Run `dapdee serve edge` as its own process on a free 127.0.0.1 port (`args` added to the
    command line, `env` to a DAPDEE_*-free environment); yields (base URL, process) once
    /v2/health/ready answers 200, and terminates (then kills) it afterwards."""
    with ServiceProcess("edge", list(args or []), "/v2/health/ready", env).start(timeout) as svc:
        yield svc.url, svc.proc


def proc_rss_kib(pid: int) -> int:
    """Resident set size (VmRSS, KiB) of process `pid`, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
