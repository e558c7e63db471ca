"""The device runtime and the async SDK against real servers and real torch models: a connect that
hangs is a connect timeout that sent nothing (no bytes counted, no bandwidth bound); a blocking
frame source is read off the event loop; a pipelined stream checks only its frames in flight for
failures; a summary of a stream that keeps no records counts every frame; and a lease released
at close is not revived by a renewal cut off in flight."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from dapdee.client import AsyncEdgeClient, AsyncPlannerClient, TransportError
from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.device.compute import TorchCompute
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import EdgeLink, WorkerTrust
from dapdee.device.frames import FrameFormat, random_frames
from dapdee.device.plan_source import FixedPlanSource, PlannerPlanSource
from dapdee.device.plans import device_only_plan
from dapdee.device.replanner import Replanner
from dapdee.device.report import summarize
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import EdgeFailure, Frame, FrameRecord
from dapdee.models import LoadedModel, load_model
from dapdee.profiler import profile_model
from dapdee.testing import ServerThread, bind_free_socket
from tests.device_stack import ForwardingProxy, write_artifact
from tests.test_device_plans import G
from tests.test_planner_service import TOKEN, planner

COND = Conditions(8.0, 5.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, CostGraph]:
    """The device's copy of a seeded model (ResNet-18, width 0.25, 1 channel) and its profile."""
    loaded = load_model("", weights=write_artifact(tmp_path_factory.mktemp("artifact")))
    return loaded, profile_model(loaded, "device", slowdown=1.0, threads=1, repeats=1, warmup=0)


def frames_of(loaded: LoadedModel, n: int) -> list[Frame]:
    return list(random_frames(FrameFormat.of(loaded), n, 0))


def runtime_of(device: tuple[LoadedModel, CostGraph], req: Requirements, **kw: Any) -> DeviceRuntime:
    """A runtime running every frame on the device with real torch compute (K = 1)."""
    loaded, graph = device
    plans = FixedPlanSource(device_only_plan(graph, Conditions(5.0)))
    return DeviceRuntime(graph, TorchCompute(loaded), plans, config=RuntimeConfig(req), **kw)


async def run_closed(rt: DeviceRuntime, frames: Any, keep: bool = True) -> tuple[list[FrameRecord], float]:
    """Start `rt`, run `frames`, close it: (the records, the run's wall time in s)."""
    await rt.start()
    try:
        t0 = time.monotonic()
        records = await rt.run(frames, keep=keep)
        return records, time.monotonic() - t0
    finally:
        await rt.aclose()
        rt.compute.close()


# ---- a connect that hangs -----------------------------------------------------------------------


@contextlib.contextmanager
def unconnectable() -> Iterator[str]:
    """The URL of a listener that never completes a TCP handshake: backlog 0, never accepted,
    its accept queue filled first, so further SYNs are dropped (as behind a full backlog or a
    firewall that drops them)."""
    srv = bind_free_socket()
    srv.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(srv.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        for s in fillers:
            s.close()
        srv.close()


@contextlib.contextmanager
def silent_worker() -> Iterator[str]:
    """The URL of a server that accepts each connection, reads what comes and never answers."""
    srv = bind_free_socket()
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=drain, args=(conn,), daemon=True).start()

    def drain(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()


async def timed_out_upload(graph: CostGraph, url: str, x: torch.Tensor) -> tuple[EdgeFailure, Sensing]:
    """One infer upload to `url` that must fail within 0.8 s: (its failure, the sensing after)."""
    sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
    edge = EdgeLink(graph, WorkerTrust(None, [url]), sensing)
    try:
        with pytest.raises(EdgeFailure) as failed:
            await edge.infer(url, {graph.input.name: x}, "final", 0.8)
        return failed.value, sensing
    finally:
        await edge.aclose()


def test_a_connect_that_hangs_is_a_connect_timeout_that_sent_nothing(device: tuple[LoadedModel, CostGraph]) -> None:
    """A worker whose TCP handshake never completes: the async SDK's timeout reports
    `httpx.ConnectTimeout` as the cause, and the device counts no bytes sent and leaves its
    bandwidth estimate alone (the link carried nothing). A worker that takes the request and
    never answers still counts the whole body and bounds the estimate (the upload was on the
    link for the whole wait)."""
    loaded, graph = device
    x = frames_of(loaded, 1)[0].x

    async def sdk(url: str) -> TransportError:
        async with AsyncEdgeClient(url) as client:
            with pytest.raises(TransportError) as err:
                await client.infer(loaded.name, {graph.input.name: x}, exit="final", timeout=0.8)
            return err.value

    with unconnectable() as url:
        err = asyncio.run(sdk(url))
        hung, hung_sensing = asyncio.run(timed_out_upload(graph, url, x))
    assert err.timeout and isinstance(err.cause, httpx.ConnectTimeout), (err, type(err.cause))
    assert hung.reason.startswith("timeout") and hung.bytes_sent == 0, (hung.reason, hung.bytes_sent)
    assert hung_sensing.bandwidth.estimate_mbps == 5.0 and not hung_sensing.bandwidth.history

    with silent_worker() as url:
        held, held_sensing = asyncio.run(timed_out_upload(graph, url, x))
    assert held.reason.startswith("timeout") and held.bytes_sent > x.numel() * 4, held.bytes_sent
    assert held_sensing.bandwidth.estimate_mbps < 1.0, held_sensing.bandwidth.estimate_mbps


# ---- a blocking frame source --------------------------------------------------------------------

READ_S = 0.15  # each frame's blocking read (a decode, a camera's wait)


def test_a_blocking_frame_source_does_not_hold_up_the_frames_in_flight(device: tuple[LoadedModel, CostGraph]) -> None:
    """A pipelined run over a source whose every read blocks its thread for 0.15 s: the
    frames in flight finish while the next one is read, so a frame's measured latency is its
    device compute plus little, not plus the read. The frames come in order and the source is
    closed when the run ends early (a failing `progress`)."""
    loaded, _ = device
    frames = frames_of(loaded, 8)
    state = {"closed": False}

    def source() -> Iterator[Frame]:
        try:
            for f in frames:
                time.sleep(READ_S)
                yield f
        finally:
            state["closed"] = True

    records, _ = asyncio.run(run_closed(runtime_of(device, Requirements(frame_rate=20.0)), source()))
    assert [r.index for r in records] == list(range(len(frames)))
    lag_ms = statistics.median(r.measured_ms - r.device_ms for r in records)
    assert lag_ms < 0.5 * READ_S * 1000.0, [(round(r.measured_ms), round(r.device_ms)) for r in records]

    def stop_at_third(rec: FrameRecord) -> None:
        if rec.index == 2:
            raise BrokenPipeError("the consumer went away")

    async def stopped() -> None:
        rt = runtime_of(device, Requirements(frame_rate=20.0))
        await rt.start()
        try:
            with pytest.raises(BrokenPipeError):
                await rt.run(source(), progress=stop_at_third)
        finally:
            await rt.aclose()
            rt.compute.close()
        deadline = time.monotonic() + 5.0
        while not state["closed"] and time.monotonic() < deadline:  # a read under way ends first
            await asyncio.sleep(0.02)

    state["closed"] = False
    asyncio.run(stopped())
    assert state["closed"]


# ---- the failure check of a pipelined stream ----------------------------------------------------


class CountingTask(asyncio.Task):  # type: ignore[type-arg]
    """An asyncio task that counts how often anyone asks whether a task is done."""

    checks = 0

    def done(self) -> bool:
        CountingTask.checks += 1
        return super().done()


def test_a_pipelined_stream_checks_only_its_frames_in_flight(device: tuple[LoadedModel, CostGraph]) -> None:
    """A pipelined run that keeps its records (every finite `--frame-rate` run) looks for a
    failed frame before each release: among the frames in flight (at most `max_inflight`), not
    among every frame it ever started, so the checks grow with the frames, not their square
    (400 frames: about 80,000 checks when every task is scanned)."""
    n = 400

    async def go() -> list[FrameRecord]:
        asyncio.get_running_loop().set_task_factory(lambda loop, coro, **kw: CountingTask(coro, loop=loop, **kw))
        CountingTask.checks = 0
        records, _ = await run_closed(runtime_of(device, Requirements(mode="throughput")), frames_of(device[0], n))
        return records

    records = asyncio.run(go())
    assert len(records) == n and [r.index for r in records] == list(range(n))
    assert CountingTask.checks < 20 * n, CountingTask.checks


# ---- the summary of a stream that keeps no records ----------------------------------------------


def test_a_stream_keeping_no_records_is_summarised_over_all_its_frames(device: tuple[LoadedModel, CostGraph]) -> None:
    """An endless stream (`keep=False`) keeps only the last `max_records` records: the
    summary `dapdee device run` prints counts every frame of the run (`frames_done`) in its
    frame count and throughput, and says how many records its latencies cover."""
    n, kept = 150, 50

    async def go() -> tuple[DeviceRuntime, list[FrameRecord], float]:
        rt = runtime_of(device, Requirements(frame_rate=1000.0), max_records=kept)
        records, wall = await run_closed(rt, frames_of(device[0], n), keep=False)
        return rt, records, wall

    rt, records, wall = asyncio.run(go())
    assert records == [] and len(rt.records) == kept and rt.frames_done == n
    s = summarize(list(rt.records), wall, frames=rt.frames_done)
    assert s["frames"] == n and s["frames_summarised"] == kept
    assert s["throughput_fps"] == pytest.approx(n / wall)
    assert summarize(list(rt.records), wall)["frames"] == kept  # without the count: the records only


# ---- releasing the lease while a renewal is in flight -------------------------------------------


class HeldRenewals(ForwardingProxy):
    """A ForwardingProxy that, while `hold_s` > 0, holds each POST /plan that far after its body
    arrived (a slow planner, or a queue before it), then forwards it, whether or not the device
    is still there; `forwarded` counts the held ones forwarded."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.hold_s = 0.0
        self.forwarded = 0

    async def before_forward(self, scope: dict[str, Any]) -> None:
        if scope["method"] == "POST" and scope["path"] == "/plan" and self.hold_s > 0:
            scope["held"] = True
            await asyncio.sleep(self.hold_s)

    async def answer(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: httpx.Response
    ) -> tuple[int, dict[str, str], bytes]:
        self.forwarded += bool(scope.get("held"))
        return await super().answer(scope, headers, body, response)


def test_a_replan_that_fails_unexpectedly_is_told_and_waits_before_the_next(planner_prefix: str) -> None:
    """The planner client is closed under a leased device's re-planner, so its renewals fail
    with the SDK's RequestError, which the plan source does not expect. Each failure is told in
    `events` and the next re-plan waits the quiet time (min(plan_max_age_s, 2 s) = 1 s), as
    after a planner outage; before, each failed task ended silently ("Task exception was never
    retrieved") and the renewal was started again every `min_replan_s`."""

    async def go(url: str) -> list[str]:
        async with AsyncPlannerClient(url, TOKEN, timeout=4.0) as client:
            await client.put_graph(G)
            cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6, plan_max_age_s=1.0,
                                min_replan_s=0.05)  # fmt: skip
            source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-broken", worker_wait_s=0.1)
            first = await source.first(COND)
        sensing = Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0)
        rp = Replanner(source, sensing, cfg, first, lambda plan: None)
        end = time.monotonic() + 1.6
        while time.monotonic() < end:  # renewals due from replan_after_s (0.1 s) on
            rp.tick()
            await asyncio.sleep(0.02)
        await rp.aclose(wait_s=0.3)
        return list(rp.events)

    with planner(planner_prefix, lease_ttl_s=30.0, replan_after_s=0.1) as c:
        events = asyncio.run(go(str(c.base_url).rstrip("/")))
    failed = [e for e in events if e.startswith("re-plan failed (lease replan_after_s)")]
    assert 1 <= len(failed) <= 2, events  # at 0.1 s, then not before 1.1 s
    assert all("closed" in e for e in failed), failed


def test_a_renewal_cut_off_at_close_does_not_revive_the_released_lease(planner_prefix: str) -> None:
    """The device closes while its lease renewal is held 1.5 s on the way to the planner: the
    re-planner gives it 0.3 s and cancels it, but the planner still gets it later. The release
    (DELETE /devices/{id}) waits until that request's deadline (the planner client's 4 s
    timeout), so it comes after the renewal landed: no lease is left for a device that has
    gone. Closing takes about that deadline, not longer."""

    async def go(url: str) -> tuple[bool, float, int]:
        proxy = HeldRenewals(url)
        front = ServerThread(proxy, name="held-renewals")
        await asyncio.to_thread(front.start)
        try:
            async with AsyncPlannerClient(front.url, TOKEN, timeout=4.0) as client:
                await client.put_graph(G)
                cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6, plan_max_age_s=1e6)
                source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-gone", worker_wait_s=0.1)
                first = await source.first(COND)
                sensing = Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0)
                rp = Replanner(source, sensing, cfg, first, lambda plan: None)
                proxy.hold_s = 1.5
                while not rp.busy:  # the renewal due at replan_after_s (0.3 s) starts
                    rp.tick()
                    await asyncio.sleep(0.02)
                t0 = time.monotonic()
                await rp.aclose(wait_s=0.3)  # as DeviceRuntime.aclose: the re-planner, then the source
                await source.aclose()
                closed_s = time.monotonic() - t0
                deadline = time.monotonic() + 10.0
                while proxy.forwarded < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                stored = first.lease is not None and first.lease.stored
                return stored, closed_s, proxy.forwarded
        finally:
            await asyncio.to_thread(front.stop)

    with planner(planner_prefix, lease_ttl_s=30.0, replan_after_s=0.3) as c:
        stored, closed_s, forwarded = asyncio.run(go(str(c.base_url).rstrip("/")))
        gone = c.get("/devices/cam-gone")
    assert stored and forwarded == 1
    assert gone.status_code == 404, gone.text  # the late renewal stored no lease after the release
    assert closed_s < 4.0 + 3.0, closed_s  # the renewal's deadline, then one DELETE
