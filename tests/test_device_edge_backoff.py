"""The device's rest after edge failures, against a real edge worker under uvicorn on 127.0.0.1
serving a seeded width-0.25 ResNet-18 artifact, with a one-second batch window (a lone request
is held ~1 s before it runs), and the device runtime on an Edge-Only plan:

- a worker at its concurrency limit answers 503 with `Retry-After: 1`: the device rests that
  second (its own back-off would rest 50 ms), bounded by its back-off maximum;
- three frames in flight time out together (one outage; a proxy holds them, since the worker
  does not hold a request in its batch window past the timeout the request carries): the rest
  doubles once, not three times;
- a frame under way when a rest began, answered late, leaves the doubling that rest set;
- each worker rests on its own: a plan moved to a healthy worker does not wait out the rest of
  the one that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.device.compute import TorchCompute
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.plans import fixed_plan
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import Frame, FrameRecord
from dapdee.models import LoadedModel, load_model
from dapdee.profiler import profile_model
from dapdee.testing import ServerThread, bind_free_socket, serve_app_in_thread
from tests.device_stack import ForwardingProxy, K, MovingPlans, start_edge, write_artifact

BATCH_WAIT_MS = 1000.0  # the worker holds a lone request this long (its batch window)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_artifact(tmp_path_factory.mktemp("artifact"))


@pytest.fixture(scope="module")
def device(artifact: Path) -> tuple[LoadedModel, CostGraph]:
    """The device's copy of the model and its profile at K."""
    loaded = load_model("", weights=artifact)
    return loaded, profile_model(loaded, "device", slowdown=K, threads=1, repeats=1, warmup=0)


@contextlib.contextmanager
def edge_worker(artifact: Path, max_concurrency: int) -> Iterator[str]:
    """A real edge worker (no planner) for `artifact` with the one-second batch window and at
    most `max_concurrency` requests handled at once (503 + Retry-After beyond); yields its URL."""
    from dapdee.edge_worker.app import create_app
    from dapdee.edge_worker.config import Settings

    sock = bind_free_socket()
    settings = Settings(
        models=f"@{artifact}", port=sock.getsockname()[1], workers=1, batch_wait_ms=BATCH_WAIT_MS,
        max_concurrency=max_concurrency,
    )  # fmt: skip
    server = ServerThread(create_app(settings, [load_model("", weights=artifact)]), sock=sock, name="edge").start()
    try:
        yield server.url
    finally:
        server.stop()


def edge_only(device: tuple[LoadedModel, CostGraph], url: str, config: RuntimeConfig) -> DeviceRuntime:
    """A runtime on the Edge-Only plan to `url` (trusted), with real torch compute at K for
    its fallbacks and the back-off `config` states."""
    loaded, graph = device
    sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    edge = EdgeLink(graph, WorkerTrust(None, [url]), sensing, backoff=backoff)
    plan = fixed_plan(graph, "final", [], url, Conditions(5.0), "test-edge-only")
    return DeviceRuntime(graph, TorchCompute(loaded, K), FixedPlanSource(plan), config=config, sensing=sensing,
                         edge=edge, edge_url=url, slowdown=K)  # fmt: skip


async def close(rt: DeviceRuntime) -> None:
    await rt.aclose()
    assert rt.edge is not None
    await rt.edge.aclose()
    rt.compute.close()


def frames(loaded: LoadedModel, n: int) -> list[Frame]:
    return [Frame(loaded.example_input(torch.Generator().manual_seed(i))) for i in range(n)]


def ended(rec: FrameRecord) -> float:
    """When the frame was answered (s since the runtime started)."""
    return rec.started_at + rec.measured_ms / 1000.0


@pytest.mark.parametrize(("max_s", "rest_s"), [(8.0, 1.0), (0.5, 0.5)])
def test_a_busy_worker_s_retry_after_sets_the_rest(
    artifact: Path, device: tuple[LoadedModel, CostGraph], max_s: float, rest_s: float
) -> None:
    """A request of another device holds the worker's one slot for ~1 s; the device's frame
    gets 503 + Retry-After: 1 and rests `rest_s` (the second, or the back-off's maximum
    below it), not its own 50 ms: a frame right after falls back without asking."""
    loaded, graph = device
    cfg = RuntimeConfig(Requirements(mode="latency"), backoff_initial_s=0.05, backoff_max_s=max_s)
    x = {graph.input.name: loaded.example_input()}

    async def go(url: str) -> tuple[list[FrameRecord], list[str]]:
        other = EdgeLink(graph, WorkerTrust(None, [url]), Sensing(fixed_load=0.0))
        holder = asyncio.create_task(other.infer(url, x, "final", 10.0, observe=False))
        await asyncio.sleep(0.3)  # the other request is in the worker's batch window
        rt = edge_only(device, url, cfg)
        try:
            await rt.start()
            assert rt.edge is not None
            first = await rt.infer(frames(loaded, 1)[0])
            second = await rt.infer(frames(loaded, 1)[0])  # its fallback takes far less than 300 ms
            assert not holder.done()  # the slot was held throughout
            await holder
            return [first, second], rt.events
        finally:
            await close(rt)
            await other.aclose()

    with edge_worker(artifact, max_concurrency=1) as url:
        (first, second), events = asyncio.run(go(url))
    assert first.where == "fallback" and first.error and first.error.startswith("HTTP 503"), first.error
    assert second.where == "fallback" and second.error == "edge backing off", second.error
    failures = [e for e in events if e.startswith("edge failure")]
    assert len(failures) == 1 and f"local for {rest_s:.1f} s" in failures[0], failures
    assert first.pred_class == int(loaded.run_exit(frames(loaded, 1)[0].x, "final").argmax(dim=1)[0])


class HeldOneSecond(ForwardingProxy):
    """A ForwardingProxy that holds each request 1 s before forwarding it."""

    async def before_forward(self, scope: dict[str, Any]) -> None:
        await asyncio.sleep(1.0)


def test_frames_in_flight_failing_in_one_outage_double_the_rest_once(
    artifact: Path, device: tuple[LoadedModel, CostGraph]
) -> None:
    """Three pipelined frames reach the worker together and all time out at 300 ms (a proxy
    in front of it holds each 1 s: the worker itself would not hold a request past the timeout
    it carries): one outage, so the device rests 0.2 s and the next rest is 0.4 s; counted per
    frame it would rest 0.8 s with 1.6 s next."""
    loaded, _ = device
    cfg = RuntimeConfig(
        Requirements(mode="throughput"), max_inflight=3, timeout_floor_ms=300.0, timeout_factor=0.001,
        backoff_initial_s=0.2, backoff_max_s=8.0,
    )  # fmt: skip

    async def go(url: str) -> tuple[list[FrameRecord], Backoff, list[str]]:
        rt = edge_only(device, url, cfg)
        try:
            await rt.start()
            assert rt.edge is not None
            records = await rt.run(frames(loaded, 3))
            return records, rt.edge.backoff_of(url), rt.events
        finally:
            await close(rt)

    with edge_worker(artifact, max_concurrency=8) as url, serve_app_in_thread(HeldOneSecond(url)) as held:
        records, backoff, events = asyncio.run(go(held))
    assert [r.where for r in records] == ["fallback"] * 3
    assert all(r.error == "timeout after 300 ms" for r in records), [r.error for r in records]
    assert max(r.started_at for r in records) < min(r.started_at + r.measured_ms / 1000 for r in records)
    failures = [e for e in events if e.startswith("edge failure")]
    assert len(failures) == 3 and "local for 0.2 s" in failures[0], failures
    assert backoff.rest_s == pytest.approx(0.4), (backoff.rest_s, failures)
    assert backoff.rests == 1


def test_a_late_answer_of_a_frame_under_way_keeps_the_outage_s_doubling(
    artifact: Path, device: tuple[LoadedModel, CostGraph]
) -> None:
    """Two pipelined Edge-Only frames reach a worker with one slot together: the one in the
    slot waits out the one-second batch window, the other is refused (503 + Retry-After) and
    begins a rest, doubling the next one (0.2 s to 0.4 s). The answer of the first comes after
    that rest began, from a frame started before it: the doubling stays. A frame started once
    the rest is over, and answered, resets it to 0.2 s."""
    loaded, _ = device
    cfg = RuntimeConfig(
        Requirements(mode="throughput"), max_inflight=2, timeout_floor_ms=5000.0, backoff_initial_s=0.2,
        backoff_max_s=8.0,
    )  # fmt: skip

    async def go(url: str) -> tuple[list[FrameRecord], float, int, FrameRecord, float]:
        rt = edge_only(device, url, cfg)
        try:
            await rt.start()
            assert rt.edge is not None
            records = await rt.run(frames(loaded, 2))
            backoff = rt.edge.backoff_of(url)
            after_outage, rests = backoff.rest_s, backoff.rests
            while rt.edge.resting(url):
                await asyncio.sleep(0.05)
            later = await rt.infer(frames(loaded, 1)[0])
            return records, after_outage, rests, later, backoff.rest_s
        finally:
            await close(rt)

    with edge_worker(artifact, max_concurrency=1) as url:
        records, after_outage, rests, later, reset = asyncio.run(go(url))
    answered = [r for r in records if r.where == "edge"]
    refused = [r for r in records if r.where == "fallback"]
    assert len(answered) == 1 and len(refused) == 1, [(r.where, r.error) for r in records]
    assert refused[0].error and refused[0].error.startswith("HTTP 503"), refused[0].error
    assert ended(answered[0]) > ended(refused[0])  # the batch window held the answer ~1 s
    assert rests == 1 and after_outage == pytest.approx(0.4), (rests, after_outage)
    assert later.where == "edge" and reset == pytest.approx(0.2), (later.where, later.error, reset)


def test_a_plan_moving_to_another_worker_does_not_wait_out_the_failed_one_s_rest(
    artifact: Path, device: tuple[LoadedModel, CostGraph]
) -> None:
    """Worker A refuses connections: the device rests A for 5 s and asks for a new plan, which
    names the healthy worker B. B's frames go to B at once: A's rest is A's alone."""
    loaded, graph = device
    cfg = RuntimeConfig(Requirements(mode="latency"), backoff_initial_s=5.0, backoff_max_s=8.0)
    dead = bind_free_socket()  # bound, never listening: connection refused
    a = f"http://127.0.0.1:{dead.getsockname()[1]}"
    worker_b = start_edge(artifact, None, load_model("", weights=artifact))
    b = worker_b.url

    async def go() -> tuple[FrameRecord, FrameRecord, list[str]]:
        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
        edge = EdgeLink(graph, WorkerTrust(None, [a, b]), sensing, backoff=backoff)
        plans = MovingPlans(*(fixed_plan(graph, "final", [], u, Conditions(5.0), f"edge-only-{u}") for u in (a, b)))
        rt = DeviceRuntime(graph, TorchCompute(loaded, K), plans, config=cfg, sensing=sensing, edge=edge, slowdown=K)
        x = frames(loaded, 1)[0]
        try:
            await rt.start()
            on_a = await rt.infer(x)
            for _ in range(100):  # the re-plan the failure asked for (background, every 50 ms)
                if rt.plan.edge_worker == b:
                    break
                await asyncio.sleep(0.05)
            return on_a, await rt.infer(x), rt.events
        finally:
            await close(rt)

    try:
        on_a, on_b, events = asyncio.run(go())
    finally:
        worker_b.stop()
        dead.close()
    assert on_a.where == "fallback" and "Connect" in (on_a.error or ""), on_a.error
    assert any(e.startswith("edge failure") and "local for 5.0 s" in e for e in events), events
    assert (on_b.where, on_b.error, on_b.plan_id) == ("edge", None, f"edge-only-{b}")


def test_only_the_most_recently_used_workers_back_offs_are_kept(device: tuple[LoadedModel, CostGraph]) -> None:
    """Workers come and go: a device keeps at most MAX_BACKOFFS back-offs, forgetting the least
    recently used first (a forgotten worker is contacted again as a fresh one)."""
    from dapdee.device.edge import MAX_BACKOFFS

    _, graph = device
    edge = EdgeLink(graph, WorkerTrust(None), Sensing(fixed_load=0.0), backoff=Backoff(60.0, 60.0))
    urls = [f"http://10.0.0.{i}:8000" for i in range(MAX_BACKOFFS + 1)]
    edge.backoff_of(urls[0]).failed(0)
    edge.backoff_of(urls[1]).failed(0)
    edge.backoff_of(urls[0])  # used again: now the most recent of the two
    for url in urls[2:]:
        edge.backoff_of(url)
    assert edge.resting(urls[0]) and not edge.resting(urls[1])


def test_the_workers_a_plan_request_avoids_are_those_resting_the_most_recently_used_first(
    device: tuple[LoadedModel, CostGraph],
) -> None:
    """`resting_urls` (a plan request's `avoid_workers`): the workers resting now, the most
    recently used first, at most MAX_AVOIDED_WORKERS (the planner's limit); a worker whose rest
    ended, or that never failed, is not named."""
    from dapdee.api.planner import MAX_AVOIDED_WORKERS

    _, graph = device
    edge = EdgeLink(graph, WorkerTrust(None), Sensing(fixed_load=0.0), backoff=Backoff(60.0, 60.0))
    urls = [f"http://10.0.0.{i}:8000/" for i in range(MAX_AVOIDED_WORKERS + 2)]
    for url in urls:
        edge.backoff_of(url).failed(0)
    edge.backoff_of("http://10.0.0.200:8000")  # seen, never failed
    edge.backoff_of(urls[0])  # used again: the most recent
    expected = [urls[0].rstrip("/")] + [u.rstrip("/") for u in reversed(urls[1:])]
    assert edge.resting_urls() == expected[:MAX_AVOIDED_WORKERS]
    later = edge.backoff_of(urls[0]).until + 1.0
    assert edge.resting_urls(now=later) == []
