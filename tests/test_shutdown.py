"""Graceful shutdown: SIGTERM to a `dapdee serve edge` or `dapdee serve planner` process with
requests in flight drains them (each completes with 200) before the process exits (uvicorn's
graceful shutdown, then the app's lifespan closes its resources); new connections are refused as
soon as it stops listening. Exit status: 0, or -SIGTERM when uvicorn re-raises the signal after
its graceful shutdown (so a supervisor sees why it stopped); both are clean exits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import torch

from dapdee import wire
from tests.conftest import edge_process
from tests.test_planner_api import planner_subprocess, read_answer
from tests.test_planner_service import toy_graph

SPEC = "zoo:alexnet?width=0.25"
IN_FLIGHT = 6
CLEAN_EXIT = (0, -signal.SIGTERM)


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


async def _drive(url: str, proc: subprocess.Popen) -> tuple[list[int], bool]:
    """Send IN_FLIGHT infer requests, SIGTERM the worker while some are being computed; the
    statuses, and whether the process was still running when the first answer came back (it
    must be: the others were still in flight)."""
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
        os.kill(proc.pid, signal.SIGTERM)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        alive_while_draining = proc.poll() is None
        results = await asyncio.gather(*tasks, return_exceptions=True)
    statuses = [r.status_code if isinstance(r, httpx.Response) else -1 for r in results]
    return statuses, alive_while_draining


def test_sigterm_drains_inflight_requests() -> None:
    # one compute thread, no batching, each request stretched to ~0.1-0.3 s: the six requests
    # take a second or more to drain, so SIGTERM certainly lands while they are in flight
    args = ["--models", SPEC, "--threads", "1", "--workers", "1", "--batch-max", "1", "--slowdown", "150"]
    with edge_process(args) as (url, proc):
        statuses, alive_while_draining = asyncio.run(_drive(url, proc))
        rc = proc.wait(30)
        assert statuses == [200] * IN_FLIGHT, statuses
        assert alive_while_draining, "the worker exited while requests were still in flight"
        assert rc in CLEAN_EXIT, f"exit code {rc} after SIGTERM"
        try:
            httpx.get(f"{url}/v2/health/live", timeout=2)
            raise AssertionError("still accepting connections after exit")
        except httpx.HTTPError:
            pass


def test_planner_sigterm_drains_a_request_in_flight() -> None:
    """A plan request whose body is still arriving at SIGTERM is answered (200, a plan) before the
    planner exits; meanwhile the process stays up and refuses new connections."""
    token = "shutdown-test-token"
    env = {"DAPDEE_REDIS_URL": "none", "DAPDEE_API_TOKEN": token}
    with planner_subprocess(env) as (url, proc):
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.put(f"{url}/models/toy", json=toy_graph(), headers=auth, timeout=30).status_code == 201
        body = json.dumps({"model": "toy", "bandwidth_mbps": 1.1, "rtt_ms": 20.0}).encode()
        head = (
            f"POST /plan HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head + body[:10])  # the request is in flight: the planner awaits its body
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None, "the planner exited with a request in flight"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                raise AssertionError("a new connection was accepted after SIGTERM")
            except ConnectionRefusedError:
                pass
            status, _, answer = read_answer(s, [body[10:]])
        assert status == 200, answer
        assert json.loads(answer)["model"] == "toy"
        rc = proc.wait(30)
        assert rc in CLEAN_EXIT, f"exit code {rc} after SIGTERM"


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (read from /proc, no signal sent)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_planner_leaves_no_plan_map_build_process_behind() -> None:
    """A plan map that takes seconds is built in a separate process. SIGKILL the planner while it
    builds (no shutdown runs): the build process ends within seconds instead of waiting forever
    on its task queue."""
    from tests.test_planner_store import wide_graph

    token = "orphan-test-token"
    env = {"DAPDEE_REDIS_URL": "none", "DAPDEE_API_TOKEN": token, "DAPDEE_PLANMAP_BUILD_BUDGET_S": "60"}
    auth = {"Authorization": f"Bearer {token}"}
    with planner_subprocess(env) as (url, proc):
        graph = json.loads(wide_graph().to_json())
        assert httpx.put(f"{url}/models/wide", json=graph, headers=auth, timeout=30).status_code == 201

        def ask() -> None:  # answered never: the planner dies while it builds the map
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/plan", json={"model": "wide", "bandwidth_mbps": 5.0}, headers=auth, timeout=30)

        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        deadline = time.monotonic() + 20
        while not (builders := _children(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert builders, "no build process started"
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in builders) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in builders if _alive(p)]
        for p in left:  # do not leave them behind either way
            os.kill(p, signal.SIGKILL)
        assert not left, f"build processes {left} outlived the planner"
        asking.join(5)
