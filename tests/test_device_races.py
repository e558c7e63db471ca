"""The device runtime when things happen while a frame or a start waits: a close that overtakes
start() or frames in flight, a worker that begins a rest, a re-plan onto another worker, each
through real services (planner, edge worker under uvicorn on 127.0.0.1, real torch models),
the device's compute emulated so that a device part takes a known half second or so."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from dapdee.costmodel import Conditions
from dapdee.device.compute import BoundaryValues, EmulatedCompute
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.frame_path import BACKING_OFF, CLOSED, REPLANNED, REPLANNED_LOCAL
from dapdee.device.plans import device_only_plan
from dapdee.device.replanner import LEASE_EXPIRED
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import DeviceClosed
from dapdee.testing import ServerThread
from tests.device_stack import (
    ForwardingProxy,
    HangingProxy,
    MovingPlans,
    Stack,
    fixed_runtime,
    hanging_leases,
    running,
)


def _slow_compute(stack: Stack) -> EmulatedCompute:
    """The device's compute emulated at one second for the whole model (a mid cut: about half)."""
    whole_ms = sum(n.device_ms or 0.0 for n in stack.graph.nodes)
    return EmulatedCompute(stack.graph, BoundaryValues(stack.loaded), scale=1000.0 / whole_ms)


class InferCounter(ForwardingProxy):
    """Forwards to an edge worker and counts the infer requests that reach it; with `refuse`
    set, answers the first one itself with 503 and `Retry-After: 4` (a worker shedding load)."""

    def __init__(self, target: str, refuse: bool = False) -> None:
        super().__init__(target)
        self.refuse = refuse
        self.infers = 0

    async def answer(self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: Any) -> Any:
        if scope["path"].endswith("/infer"):
            self.infers += 1
            if self.refuse and self.infers == 1:
                return 503, {"retry-after": "4", "content-type": "application/json"}, b'{"error": "busy"}'
        return await super().answer(scope, headers, body, response)


class PlanHolder(HangingProxy):
    """A planner front that, while `hanging`, holds only POST /plan (a slow plan answer): the
    lease release (DELETE /devices/{id}) goes through."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/plan":
            return await ForwardingProxy.__call__(self, scope, receive, send)
        return await super().__call__(scope, receive, send)


def test_a_close_that_overtakes_start_releases_the_lease_its_first_plan_took(stack: Stack) -> None:
    """aclose() from another task while start() waits for its first (leased) plan: the close
    releases the device's lease at once, then the plan answer lands and its lease is stored.
    start() then releases that one too and raises DeviceClosed; no lease is left and no
    renewal follows (before, start() went on and renewed the lease for as long as the process
    lived)."""
    from dapdee.client import AsyncPlannerClient, PlannerClient
    from dapdee.client.errors import ApiError
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.profile import publish_profile

    cfg = RuntimeConfig(Requirements(mode="throughput", frame_rate=5.0))

    async def go(front: str) -> None:
        async with AsyncPlannerClient(front) as client:
            await publish_profile(client, client, stack.graph, "device-race", {"tier": "device-race"})
            source = PlannerPlanSource(client, stack.graph, cfg.requirements, "device-race", device_id="cam-race")
            rt = DeviceRuntime(stack.graph, _slow_compute(stack), source, config=cfg, sensing=Sensing(prior_mbps=5.0))
            proxy.hanging = True
            starting = asyncio.create_task(rt.start())
            while proxy.held < 1:  # the first POST /plan is held
                await asyncio.sleep(0.01)
            await rt.aclose()  # released: there is no lease yet
            proxy.hanging = False  # the plan answer lands, and with it a stored lease
            with pytest.raises(DeviceClosed, match="closed while it started"):
                await starting
            with pytest.raises(DeviceClosed):
                await rt.start()

    with hanging_leases(stack, "device-start-close", 30.0, PlanHolder) as (_, proxy, front):
        asyncio.run(go(front))
        time.sleep(0.7)  # a renewal (every 0.3 s) would have landed by now
        with PlannerClient(front) as planner, pytest.raises(ApiError) as gone:
            planner.device("cam-race")
        assert gone.value.status == 404, gone.value


def test_frames_are_refused_after_close_and_one_in_its_device_part_sends_nothing(stack: Stack) -> None:
    """A frame in its device part when the runtime closes is finished on the device ("runtime
    closed"), sending nothing (its lease is released at close); a frame after the close is
    refused with DeviceClosed, not run on a plan nobody holds."""
    counter = InferCounter(stack.edge.url)
    frame = stack.frames(1, seed=21)[0]

    async def go(url: str) -> Any:
        rt = fixed_runtime(stack, stack.mid_cut(url), url, compute=_slow_compute(stack))
        async with running(rt):
            in_flight = asyncio.create_task(rt.infer(frame))
            await asyncio.sleep(0.15)  # in its device part (about half a second)
            await rt.aclose()
            rec = await in_flight
            with pytest.raises(DeviceClosed):
                await rt.infer(frame)
        return rec

    front = ServerThread(counter, name="infer-counter").start()
    try:
        rec = asyncio.run(go(front.url))
    finally:
        front.stop()
    assert (rec.where, rec.error) == ("fallback", CLOSED), rec
    assert rec.pred_class == stack.local_class(frame.x, rec.exit)
    assert counter.infers == 0


def test_a_frame_whose_worker_begins_a_rest_during_its_device_part_sends_nothing(stack: Stack) -> None:
    """Pipelined frames on a mid cut; the worker answers the first upload with 503 and
    Retry-After 4 s. The frames whose device parts ran meanwhile (they passed the rest check
    before it began) are finished on the device when their tensors are ready ("edge backing
    off"): the worker, which asked for 4 s of quiet, sees no other request (before, up to
    max_inflight - 1 more)."""
    counter = InferCounter(stack.edge.url, refuse=True)
    frames = stack.frames(4, seed=22)
    cfg = RuntimeConfig(Requirements(mode="throughput", frame_rate=20.0), max_inflight=3, plan_max_age_s=1e6)

    async def go(url: str) -> Any:
        rt = fixed_runtime(stack, stack.mid_cut(url), url, config=cfg, compute=_slow_compute(stack))
        async with running(rt):
            return await rt.run(frames)

    front = ServerThread(counter, name="infer-counter").start()
    try:
        records = asyncio.run(go(front.url))
    finally:
        front.stop()
    assert counter.infers == 1, [(r.where, r.error) for r in records]
    assert records[0].where == "fallback" and all(r.error == BACKING_OFF for r in records[1:]), records
    assert all(r.pred_class == stack.local_class(f.x, r.exit) for f, r in zip(frames, records, strict=True))


def test_a_frame_whose_plan_moved_to_another_worker_during_its_device_part_sends_nothing(stack: Stack) -> None:
    """A re-plan moves the device to another worker (its booking with it) while a frame of the
    old plan runs its device part: that frame is finished on the device ("re-planned onto
    another worker") rather than sent to the old worker, where nothing is booked for it now;
    the next frame goes to the new worker."""
    old, new = InferCounter(stack.edge.url), InferCounter(stack.edge.url)
    frames = stack.frames(2, seed=23)
    cfg = RuntimeConfig(plan_max_age_s=0.2, min_replan_s=0.05)

    async def go(old_url: str, new_url: str) -> list[Any]:
        from dapdee.device.edge import EdgeLink, WorkerTrust

        first, then = stack.mid_cut(old_url), stack.mid_cut(new_url)
        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        edge = EdgeLink(stack.graph, WorkerTrust(None, [old_url, new_url]), sensing)
        rt = DeviceRuntime(stack.graph, _slow_compute(stack), MovingPlans(first, then), config=cfg, sensing=sensing,
                           edge=edge)  # fmt: skip
        async with running(rt):
            return [await rt.infer(f) for f in frames]

    fronts = [ServerThread(p, name="infer-counter").start() for p in (old, new)]
    try:
        records = asyncio.run(go(fronts[0].url, fronts[1].url))
    finally:
        for f in fronts:
            f.stop()
    assert (records[0].where, records[0].error) == ("fallback", REPLANNED), records[0]
    assert records[1].where == "edge" and (old.infers, new.infers) == (0, 1), records
    assert all(r.pred_class == stack.local_class(f.x, r.exit) for f, r in zip(frames, records, strict=True))


def test_a_frame_whose_new_plan_runs_on_the_device_is_not_called_a_lapsed_lease(stack: Stack) -> None:
    """A re-plan hands the device a Device-Only plan (the planner's answer, its lease live) while
    a frame of the old split runs its device part: that frame is finished on the device and its
    record says it was re-planned to run there, not that a lease lapsed; the next frame runs
    locally and nothing reaches the worker."""
    counter = InferCounter(stack.edge.url)
    frames = stack.frames(2, seed=24)
    cfg = RuntimeConfig(plan_max_age_s=0.2, min_replan_s=0.05)
    local = replace(device_only_plan(stack.graph, Conditions(5.0)), plan_id="planner-device-only", origin="planner")

    async def go(url: str) -> list[Any]:
        from dapdee.device.edge import EdgeLink, WorkerTrust

        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        edge = EdgeLink(stack.graph, WorkerTrust(None, [url]), sensing)
        rt = DeviceRuntime(stack.graph, _slow_compute(stack), MovingPlans(stack.mid_cut(url), local), config=cfg,
                           sensing=sensing, edge=edge)  # fmt: skip
        async with running(rt):
            return [await rt.infer(f) for f in frames]

    front = ServerThread(counter, name="infer-counter").start()
    try:
        records = asyncio.run(go(front.url))
    finally:
        front.stop()
    assert (records[0].where, records[0].error) == ("fallback", REPLANNED_LOCAL), records[0]
    assert records[0].error != LEASE_EXPIRED
    assert records[1].where == "local" and counter.infers == 0, records
    assert all(r.pred_class == stack.local_class(f.x, r.exit) for f, r in zip(frames, records, strict=True))


def test_a_close_stops_a_start_that_retries_a_planner_refusing_connections(stack: Stack) -> None:
    """aclose() from another task while start() retries its first plan (nothing listens at the
    planner's address, a transient refusal retried until `ready_timeout_s`): start() raises
    DeviceClosed at once, not after the ready timeout, and asks no more."""
    from dapdee.client import AsyncPlannerClient
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.testing import bind_free_socket

    sock = bind_free_socket()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there

    async def go() -> float:
        async with AsyncPlannerClient(f"http://127.0.0.1:{port}", None, timeout=5.0) as client:
            source = PlannerPlanSource(client, stack.graph, Requirements(), "device-k10", ready_timeout_s=60.0)
            rt = DeviceRuntime(stack.graph, _slow_compute(stack), source, sensing=Sensing(fixed_load=0.0))
            starting = asyncio.create_task(rt.start())
            await asyncio.sleep(0.3)
            assert not starting.done()
            t0 = time.monotonic()
            await rt.aclose()
            with pytest.raises(DeviceClosed, match="closed while it started"):
                await asyncio.wait_for(starting, 20.0)
            return time.monotonic() - t0

    assert asyncio.run(go()) < 10.0  # well before the 60 s ready timeout


def test_a_runtime_starts_once(stack: Stack) -> None:
    """A second start() is refused: it would leave the first background task running for ever."""

    async def go() -> None:
        async with running(fixed_runtime(stack, stack.mid_cut(stack.edge.url), stack.edge.url)) as rt:
            with pytest.raises(RuntimeError, match="started already"):
                await rt.start()

    asyncio.run(go())


def test_leaving_a_session_lets_a_frame_in_its_device_part_end_on_the_device(stack: Stack) -> None:
    """`open_device` closes its compute and edge clients on the way out: the runtime's close
    first lets a frame in flight end, so a frame in its device part finishes on the device
    ("runtime closed") instead of failing on a compute pool shut down under it."""
    from dapdee.device.session import DeviceSettings, open_device

    plan = stack.mid_cut(stack.edge.url)
    fixed = {
        "model": plan.model, "plan_id": "mid", "exit": {"name": plan.exit},
        "predicted": {"latency_ms": plan.predicted_ms, "bottleneck_ms": plan.bottleneck_ms},
        "device_nodes": list(plan.device_nodes), "edge_nodes": list(plan.edge_nodes),
        "transfer": [{"node": n, "bytes": b} for n, b in plan.transfer], "edge_worker": stack.edge.url,
    }  # fmt: skip
    settings = DeviceSettings(
        runtime=RuntimeConfig(Requirements(mode="latency")), planner=None, plan_json=fixed, edge_url=stack.edge.url,
        weights=str(stack.artifact), slowdown=60.0, device_load=0.0,
    )  # fmt: skip
    frame = stack.frames(1, seed=22)[0]

    async def go() -> Any:
        async with open_device(settings, stack.loaded, stack.graph) as rt:
            in_flight = asyncio.create_task(rt.infer(frame))
            await asyncio.sleep(0.05)  # in its device part (its compute stretched 60x: some 0.4 s)
            assert not in_flight.done()
        return await in_flight

    rec = asyncio.run(go())
    assert (rec.where, rec.error) == ("fallback", CLOSED), rec
    assert rec.pred_class == stack.local_class(frame.x, rec.exit)


class PlanCounter(HangingProxy):
    """A planner front that counts the POST /plan requests reaching it."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.plans_received = 0

    async def before_forward(self, scope: dict[str, Any]) -> None:
        if scope["path"] == "/plan":
            self.plans_received += 1


class SlowPlans(PlanCounter):
    """A planner front that forwards each POST /plan 1 s after its body arrived, whether or not
    its client is still there (a request on its way when the device gave up on it)."""

    async def before_forward(self, scope: dict[str, Any]) -> None:
        await super().before_forward(scope)
        if scope["path"] == "/plan":
            await asyncio.sleep(1.0)


def test_a_close_that_cuts_off_the_first_plan_request_releases_after_it_could_land(stack: Stack) -> None:
    """aclose() while start()'s first POST /plan is on its way (it reaches the planner 1 s
    later, after the device gave up on it, and stores a lease): the release waits for that
    request's deadline, so no lease is left. (Released at once, the late request stored a lease
    for a device that had gone, kept until its TTL.)"""
    from dapdee.client import AsyncPlannerClient, PlannerClient
    from dapdee.client.errors import ApiError
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.profile import publish_profile

    cfg = RuntimeConfig(Requirements(mode="throughput", frame_rate=5.0))

    async def go(front: str, proxy: SlowPlans) -> None:
        async with AsyncPlannerClient(front, timeout=3.0) as client:
            await publish_profile(client, client, stack.graph, "device-land", {"tier": "device-land"})
            source = PlannerPlanSource(client, stack.graph, cfg.requirements, "device-land", device_id="cam-land")
            rt = DeviceRuntime(stack.graph, _slow_compute(stack), source, config=cfg, sensing=Sensing(prior_mbps=5.0))
            starting = asyncio.create_task(rt.start())
            while proxy.plans_received < 1:  # the first POST /plan is on its way
                await asyncio.sleep(0.01)
            await rt.aclose()
            with pytest.raises(DeviceClosed):
                await starting

    with hanging_leases(stack, "device-close-landing", 30.0, SlowPlans) as (_, proxy, front):
        asyncio.run(go(front, proxy))
        time.sleep(1.2)  # the cut-off request has landed by now, whatever the close did
        with PlannerClient(front) as planner, pytest.raises(ApiError) as gone:
            planner.device("cam-land")
        assert gone.value.status == 404, gone.value


def test_closing_with_a_frame_in_flight_asks_for_no_new_plan(stack: Stack) -> None:
    """aclose() waits for a frame still on the device (about 0.5 s of emulated compute) while the
    lease's re-plan (every 0.3 s here) falls due: no POST /plan starts once the close has begun
    (one would renew a lease the close is about to release, and hold up the close)."""
    from dapdee.client import AsyncPlannerClient
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.profile import publish_profile

    cfg = RuntimeConfig(Requirements(mode="throughput", frame_rate=5.0))
    frame = stack.frames(1, seed=11)[0]

    async def go(front: str, proxy: PlanCounter) -> tuple[int, int, Any]:
        async with AsyncPlannerClient(front, timeout=5.0) as client:
            await publish_profile(client, client, stack.graph, "device-closing", {"tier": "device-closing"})
            source = PlannerPlanSource(client, stack.graph, cfg.requirements, "device-closing", device_id="cam-closing")
            rt = DeviceRuntime(stack.graph, _slow_compute(stack), source, config=cfg, sensing=Sensing(prior_mbps=5.0))
            await rt.start()
            in_flight = asyncio.create_task(rt.infer(frame))
            await asyncio.sleep(0.05)  # the frame is on the device now
            before = proxy.plans_received
            await rt.aclose()
            return before, proxy.plans_received, await in_flight

    with hanging_leases(stack, "device-closing", 30.0, PlanCounter) as (_, proxy, front):
        before, after, rec = asyncio.run(go(front, proxy))
    assert before >= 1 and after == before, (before, after)
    assert rec.pred_class == stack.local_class(frame.x, rec.exit), rec  # the frame in flight still ends
