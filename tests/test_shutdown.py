"""Graceful shutdown (issue 10): SIGTERM to a `dapdee serve edge` process with infer requests
in flight drains them — every one completes with 200 — before the process exits (uvicorn's
graceful shutdown, then the app's lifespan closes the batcher). New connections are refused
once it stops listening."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import torch

from dapdee import wire
from tests.conftest import edge_process

SPEC = "zoo:alexnet?width=0.25"
IN_FLIGHT = 6


def _arrived_and_inflight(url: str) -> tuple[float, float]:
    """(infer requests the worker has received, of which still in flight), from its metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    inflight = done = 0.0
    for line in text.splitlines():
        if line.startswith("dapdee_edge_inflight_requests"):
            inflight = float(line.split()[-1])
        elif line.startswith("dapdee_edge_requests_total{"):
            done += float(line.split()[-1])
    return done + inflight, inflight


async def _drive(url: str, proc_pid: int) -> tuple[list[int], float, float]:
    body, headers = wire.encode_request({"x": torch.randn(1, 3, 32, 32)}, parameters={"exit": "final"})
    async with httpx.AsyncClient(timeout=60) as client:
        warm, _ = await asyncio.to_thread(_arrived_and_inflight, url)
        tasks = [
            asyncio.create_task(client.post(f"{url}/v2/models/alexnet/infer", content=body, headers=headers))
            for _ in range(IN_FLIGHT)
        ]
        deadline = time.monotonic() + 20
        while True:  # every request has reached the worker, and some are still being computed
            arrived, inflight = await asyncio.to_thread(_arrived_and_inflight, url)
            if arrived >= warm + IN_FLIGHT:
                break
            assert time.monotonic() < deadline, "requests never reached the worker"
            await asyncio.sleep(0.02)
        assert inflight >= 2, f"only {inflight:g} requests in flight at SIGTERM"
        t_term = time.monotonic()
        import os

        os.kill(proc_pid, signal.SIGTERM)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        t_done = time.monotonic()
    statuses = [r.status_code if isinstance(r, httpx.Response) else -1 for r in results]
    return statuses, t_term, t_done


def test_sigterm_drains_inflight_requests() -> None:
    # one compute thread, no batching, each request stretched to ~0.1-0.3 s: the six requests
    # take a second or more to drain, so SIGTERM certainly lands while they are in flight
    args = ["--models", SPEC, "--threads", "1", "--workers", "1", "--batch-max", "1", "--slowdown", "150"]
    with edge_process(args) as (url, proc):
        statuses, t_term, t_done = asyncio.run(_drive(url, proc.pid))
        rc = proc.wait(30)
        t_exit = time.monotonic()
        assert statuses == [200] * IN_FLIGHT, statuses
        # uvicorn re-raises the signal after its graceful shutdown (so a supervisor sees why it
        # stopped): -SIGTERM is a clean exit here, like 0
        assert rc in (0, -signal.SIGTERM), f"exit code {rc} after SIGTERM"
        assert t_exit >= t_done - 0.5  # it exited after answering, not before
        try:
            httpx.get(f"{url}/v2/health/live", timeout=2)
            raise AssertionError("still accepting connections after exit")
        except httpx.HTTPError:
            pass
