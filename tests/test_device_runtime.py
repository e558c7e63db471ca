"""The device runtime through real services: a planner and edge workers under uvicorn on
127.0.0.1 (or as processes), real torch models, shaped loopback uplinks, an emulated K = 10
device. Every answer is checked against the device's own copy of the model at the exit the
frame left at. Nothing here asserts on wall-clock ratios: counts, classes and CPU time only."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dapdee.costmodel import Conditions
from dapdee.device.compute import BoundaryValues, EmulatedCompute, TorchCompute
from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig
from dapdee.device.frames import random_frames
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.probe import Sensor
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.session import DeviceSettings, open_device
from dapdee.device.types import Frame, FrameRecord, Plan
from dapdee.testing import ServerThread, ServiceProcess
from tests.conftest import SHARED_REDIS as REDIS
from tests.device_stack import (
    ForwardingProxy,
    HangingProxy,
    K,
    Stack,
    fixed_runtime,
    hanging_leases,
    running,
    start_edge,
)


def _check_answers(stack: Stack, frames: list[Any], records: list[FrameRecord]) -> None:
    """Every frame answered, in order, with the local model's class at the exit it left at."""
    assert [r.index for r in records] == sorted(r.index for r in records)
    assert len(records) == len(frames), f"{len(frames) - len(records)} frames lost"
    for frame, rec in zip(frames, records, strict=True):
        assert rec.pred_class == stack.local_class(frame.x, rec.exit), rec


def test_fixed_mid_cut_plan_answers_as_the_local_model(stack: Stack) -> None:
    frames = stack.frames(6, seed=1)
    plan = stack.mid_cut(stack.edge.url)

    async def go() -> list[FrameRecord]:
        async with running(fixed_runtime(stack, plan, stack.edge.url, rate_mbps=18.88)) as rt:
            return await rt.run(frames)

    records = asyncio.run(go())
    _check_answers(stack, frames, records)
    for rec in records:
        assert rec.where == "edge", rec.error
        assert rec.device_nodes == plan.cut > 0 and rec.bytes_sent > plan.transfer[0][1]  # the tensor + header
        assert rec.slowdown == K and rec.rate_mbps == 18.88 and rec.plan_id == "test-mid-cut"
        assert rec.edge_compute_ms is not None and rec.edge_compute_ms >= 0


def test_fp16_uplink_halves_bytes_and_keeps_answers(stack: Stack) -> None:
    frames = stack.frames(4, seed=2)
    plan = stack.mid_cut(stack.edge.url)

    async def go(fp16: bool) -> list[FrameRecord]:
        async with running(fixed_runtime(stack, plan, stack.edge.url, fp16=fp16)) as rt:
            return await rt.run(frames)

    full, half = asyncio.run(go(False)), asyncio.run(go(True))
    assert all(r.where == "edge" for r in full + half)
    assert half[0].bytes_sent < 0.6 * full[0].bytes_sent
    assert sum(a.pred_class == b.pred_class for a, b in zip(full, half, strict=True)) >= len(frames) - 1


def test_fp16_frame_beyond_its_range_goes_as_fp32_and_rests_no_worker(stack: Stack) -> None:
    """A boundary tensor FP16 cannot carry (scaled input: values past ±65504) is sent as FP32 and
    answered by the edge; the worker is not rested and the frames after it still use it."""
    normal = stack.frames(2, seed=4)
    huge = Frame(normal[1].x * 1e7, None)
    plan = stack.mid_cut(stack.edge.url)

    async def go() -> tuple[list[FrameRecord], bool]:
        async with running(fixed_runtime(stack, plan, stack.edge.url, fp16=True)) as rt:
            records = [await rt.infer(f) for f in (normal[0], huge, normal[1])]
            assert rt.edge is not None
            return records, rt.edge.resting(stack.edge.url)

    records, resting = asyncio.run(go())
    assert [r.where for r in records] == ["edge"] * 3, [r.error for r in records]
    assert not resting
    assert records[1].bytes_sent > 1.8 * records[0].bytes_sent  # FP32: twice the tensor's bytes
    assert records[1].pred_class == stack.local_class(huge.x, records[1].exit)


def _settings(stack: Stack, **kw: Any) -> DeviceSettings:
    runtime = kw.pop("runtime", RuntimeConfig(Requirements(mode="latency"), plan_max_age_s=100.0))
    planner = kw.pop("planner", PlannerConfig(stack.planner.url, "device-k10", ready_timeout_s=30.0))
    base: dict[str, Any] = {"runtime": runtime, "planner": planner, "model": "", "weights": str(stack.artifact)}
    return DeviceSettings(**{**base, "slowdown": K, "device_load": 0.0, "rate_mbps": 18.88, "rtt_ms": 0.0, **kw})


def test_planner_backed_device_publishes_its_profile_and_answers(stack: Stack) -> None:
    """The session measures the link and its per-request CPU cost before the first plan,
    publishes the device profile with `meta.device_request_ms`, and every frame is answered."""
    frames = stack.frames(5, seed=3)

    async def go() -> tuple[list[FrameRecord], Any, Sensing]:
        async with open_device(_settings(stack), stack.loaded, stack.graph) as rt:
            assert rt.plan.origin == "planner" and rt.sensing.rtt.samples > 0  # probed before the first plan
            return await rt.run(frames), rt.plan, rt.sensing

    records, plan, sensing = asyncio.run(go())
    _check_answers(stack, frames, records)
    assert {r.plan_id for r in records} == {plan.plan_id}
    profiles = httpx.get(f"{stack.planner.url}/models/{stack.loaded.name}/profiles", timeout=5).json()["profiles"]
    meta = profiles["device-k10"]["meta"]
    assert profiles["device-k10"]["kind"] == "device" and meta["slowdown"] == K
    assert 0 < meta["device_request_ms"] < 1000, meta  # CPU ms of one encode + request + decode
    # the round trip the device states leaves out the CPU cost the planner now prices for it
    fixed_wall_ms = sensing.rtt.estimate_ms + sensing.bandwidth.overhead_ms
    assert sensing.request_rtt_ms == pytest.approx(max(0.0, fixed_wall_ms - meta["device_request_ms"]), abs=1e-3)


def test_a_rate_drop_leads_to_a_plan_at_the_new_bandwidth(stack: Stack) -> None:
    """WiFi, then the shaped uplink drops ~145x to CAT1 mid-stream: the estimate follows (from
    the frames' own uploads and idle probes) and a plan asked at the low bandwidth is put in use."""
    frames = stack.frames(30, seed=4)
    cfg = RuntimeConfig(Requirements(mode="latency"), plan_max_age_s=100.0, probe_idle_s=0.3)

    async def go() -> tuple[list[FrameRecord], list[Any], float]:
        async with open_device(_settings(stack, runtime=cfg), stack.loaded, stack.graph) as rt:
            before = await rt.run(frames[:5])
            high = rt.plan.bandwidth_mbps
            assert rt.edge is not None and rt.edge.shaper is not None
            rt.edge.shaper.set_rate(0.13)
            after = []
            for frame in frames[5:]:
                after.append(await rt.infer(frame))
                if any(p.bandwidth_mbps < 0.3 * high for p in rt.plans):
                    break
                await asyncio.sleep(0.2)  # frame spacing: idle time for probes and the re-plan
            return before + after, rt.plans, high

    records, plans, high = asyncio.run(go())
    low = [p for p in plans if p.bandwidth_mbps < 0.3 * high]
    assert low, f"no plan at the lower bandwidth: {[(p.plan_id, round(p.bandwidth_mbps, 3)) for p in plans]}"
    _check_answers(stack, frames[: len(records)], records)


def test_edge_stopped_mid_stream_loses_no_frame(stack: Stack) -> None:
    """A private edge worker is stopped after 4 frames: every frame is answered (the rest on the
    device, from the values it had), with the local model's classes."""
    edge2 = start_edge(stack.artifact, None, stack.edge_loaded)
    frames = stack.frames(10, seed=5)
    cfg = RuntimeConfig(Requirements(mode="latency"), timeout_floor_ms=2000.0)

    async def go() -> tuple[list[FrameRecord], list[str]]:
        async with running(fixed_runtime(stack, stack.mid_cut(edge2.url), edge2.url, config=cfg)) as rt:
            records = []
            for i, frame in enumerate(frames):
                if i == 4:
                    await asyncio.to_thread(edge2.stop)
                records.append(await rt.infer(frame))
            return records, rt.events

    try:
        records, events = asyncio.run(go())
    finally:
        edge2.stop()
    _check_answers(stack, frames, records)
    assert [r.where for r in records[:4]] == ["edge"] * 4
    assert {r.where for r in records[4:]} == {"fallback"} and all(r.error for r in records[4:])
    assert any("edge failure" in e for e in events)


def _concurrency(records: list[FrameRecord]) -> tuple[int, int]:
    """(frames that began before the previous one was answered, most frames in flight at once),
    from the records' own start and end times."""
    spans = [(r.started_at, r.started_at + r.measured_ms / 1000.0) for r in records]
    overlaps = sum(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))
    return overlaps, max(sum(a <= t < b for a, b in spans) for t, _ in spans)


def test_pipelined_stream_overlaps_frames_within_max_inflight(stack: Stack) -> None:
    """Heavy load: the device part of frame i+1 overlaps the upload of frame i and the edge
    compute of frame i-1, never more than `max_inflight` frames at once; light load runs one
    frame at a time. Every answer is the local model's."""
    frames = stack.frames(9, seed=10)
    plan = stack.mid_cut(stack.edge.url)

    async def go(mode: str) -> list[FrameRecord]:
        cfg = RuntimeConfig(Requirements(mode=mode), max_inflight=3)
        async with running(fixed_runtime(stack, plan, stack.edge.url, rate_mbps=5.85, config=cfg)) as rt:
            return await rt.run(frames)

    piped, sequential = asyncio.run(go("throughput")), asyncio.run(go("latency"))
    _check_answers(stack, frames, piped)
    _check_answers(stack, frames, sequential)
    assert all(r.where == "edge" for r in piped + sequential)
    overlaps, most = _concurrency(piped)
    assert overlaps >= len(frames) // 2 and 2 <= most <= 3, (overlaps, most)
    assert _concurrency(sequential) == (0, 1)


@pytest.fixture
def edge_process(stack: Stack) -> Iterator[ServiceProcess]:
    """An edge worker as its own process serving the stack's artifact (no planner)."""
    proc = ServiceProcess(
        "edge", ["--models", f"@{stack.artifact}", "--threads", "1", "--profile-repeats", "2"], "/v2/health/ready"
    )
    proc.start(120.0)
    try:
        yield proc
    finally:
        proc.kill()


def test_pipelined_stream_edge_killed_mid_upload_loses_no_frame(stack: Stack, edge_process: ServiceProcess) -> None:
    """Throughput mode with up to 4 frames in flight over a slow shaped uplink: the edge worker is
    SIGKILLed while at least two uploads are on the way. No frame is lost, every answer is the
    local model's, the interrupted frames are finished on the device."""
    frames = stack.frames(16, seed=6)
    cfg = RuntimeConfig(Requirements(mode="throughput"), max_inflight=4, timeout_floor_ms=5000.0)
    url = edge_process.url
    seen: dict[str, int] = {}

    async def go() -> list[FrameRecord]:
        async with running(fixed_runtime(stack, stack.mid_cut(url), url, rate_mbps=0.5, config=cfg)) as rt:
            assert rt.edge is not None

            async def killer() -> None:
                while not (len(rt.records) >= 3 and rt.edge.uploads_active >= 2):
                    await asyncio.sleep(0.005)
                seen["inflight"] = rt.edge.uploads_active
                edge_process.kill()

            kill = asyncio.create_task(killer())
            records = await rt.run(frames)
            await kill
            return records

    records = asyncio.run(go())
    _check_answers(stack, frames, records)
    where = [r.where for r in records]
    print("pipelined kill: in flight", seen["inflight"], "where", "".join(w[0] for w in where))
    assert seen["inflight"] >= 2
    assert where[:3] == ["edge"] * 3 and where.count("fallback") >= seen["inflight"], where
    assert where[-1] == "fallback"  # nothing answers once the worker is gone


def test_emulated_devices_share_one_process_without_computing(stack: Stack) -> None:
    """Four emulated devices (sleeping their profiled device time, sending real tensors computed
    once per cut) stream to the real edge from one process: their answers are the model's answer
    for the one real input, and the thread that runs them uses far less CPU than they sleep."""
    values = BoundaryValues(stack.loaded)
    plan = stack.mid_cut(stack.edge.url)
    expected = stack.local_class(values.x, "final")
    n, scale = 4, 10.0  # each device 10x slower again than the profile (which is at K = 10)
    device_ms = scale * sum(stack.graph.node(v).device_ms or 0.0 for v in plan.device_nodes)
    asleep_ms = device_ms * n * 4
    values.get(list(plan.transfer_nodes))  # computed once, before the clock starts

    async def one(i: int) -> list[FrameRecord]:
        rt = fixed_runtime(stack, plan, stack.edge.url, compute=EmulatedCompute(stack.graph, values, scale))
        async with running(rt):
            return await rt.run(random_frames(stack.fmt, n, seed=i))

    async def go() -> list[list[FrameRecord]]:
        return list(await asyncio.gather(*(one(i) for i in range(4))))

    c0 = time.thread_time()
    results = asyncio.run(go())
    cpu_ms = (time.thread_time() - c0) * 1000.0
    records = [r for rs in results for r in rs]
    assert len(records) == 16 and all(r.where == "edge" and r.pred_class == expected for r in records)
    assert all(r.device_ms >= 0.99 * device_ms for r in records)  # each slept its emulated time
    assert cpu_ms < 0.5 * asleep_ms, f"{cpu_ms:.0f} ms of CPU for {asleep_ms:.0f} ms of emulated device time"


def test_device_only_session_needs_no_planner(stack: Stack) -> None:
    frames = stack.frames(3, seed=7)

    async def go() -> list[FrameRecord]:
        async with open_device(_settings(stack, planner=None, device_only=True), stack.loaded, stack.graph) as rt:
            return await rt.run(frames)

    records = asyncio.run(go())
    _check_answers(stack, frames, records)
    assert {r.where for r in records} == {"local"} and {r.exit for r in records} == {"final"}


def test_frames_are_refused_before_the_first_plan(stack: Stack, tmp_path: Path) -> None:
    rt = fixed_runtime(stack, stack.mid_cut(stack.edge.url), stack.edge.url)
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(rt.infer(stack.frames(1, seed=8)[0]))
    rt.compute.close()


class CountedChecks(FixedPlanSource):
    """A fixed plan whose lease checks are counted: `meanwhile` is asked by the re-planner's
    `in_force`, once per background tick (and per frame; here no frame runs)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        self.checks = 0

    def meanwhile(self, current: Plan, cond: Conditions, now: float) -> Plan:
        self.checks += 1
        return super().meanwhile(current, cond, now)


def test_a_load_reading_queued_behind_a_long_frame_holds_up_no_replan(stack: Stack) -> None:
    """Load measured on the compute thread (`load_source` compute): the sensing's calibration
    queues on the device's one compute thread, held here by a long job (a gate standing for a
    long frame). The background loop goes on ticking the re-planner (which renews leases)
    meanwhile, and the calibration still runs once the thread is free."""
    sensing = Sensing(prior_mbps=5.0, load_source="compute")
    mon = sensing.compute_observer()
    assert mon is not None
    compute = TorchCompute(stack.loaded, K, observer=mon)
    source = CountedChecks(stack.mid_cut(None))
    sensor = Sensor(None, sensing, RuntimeConfig(), lambda: None, compute.spin)
    gate = threading.Event()

    async def go() -> tuple[int, int, int]:
        runtime = DeviceRuntime(stack.graph, compute, source, sensing=sensing, sensor=sensor, slowdown=K)
        async with running(runtime):
            held = asyncio.ensure_future(compute.spin(gate.wait))
            await asyncio.sleep(0)  # the compute thread is busy before the first background tick
            try:
                deadline = time.monotonic() + 10.0
                while source.checks < 10:  # about 0.5 s of ticks; none while a tick waits for the thread
                    assert time.monotonic() < deadline, f"{source.checks} re-planner ticks in 10 s"
                    await asyncio.sleep(0.05)
                checks, queued = source.checks, mon.samples
            finally:
                gate.set()
            await held
            deadline = time.monotonic() + 10.0
            while mon.samples == queued:
                assert time.monotonic() < deadline, "no load reading after the compute thread was free"
                await asyncio.sleep(0.05)
            return checks, queued, mon.samples

    checks, queued, samples = asyncio.run(go())
    assert checks >= 10 and queued == 0 and samples >= 1, (checks, queued, samples)


def test_leases_renewed_at_replan_after_s_kept_through_an_outage_then_device_only(stack: Stack) -> None:
    """A device with an id holds a lease: it plans again at the lease's `replan_after_s`; when
    the planner goes away it keeps its leased plan until the lease expires, then runs
    Device-Only. No frame is lost on the way."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.testing import clear_prefix, unique_prefix, wait_registered

    prefix = unique_prefix("device-lease")  # leases live in Redis, shared by planner replicas
    # no fleet rebalancing: it would hand this device the fastest plan, exit1 on its own CPU
    settings = Settings(redis_url=REDIS, key_prefix=prefix, lease_ttl_s=2.0, replan_after_s=0.3, rebalance_s=0)
    planner = ServerThread(create_app(settings)).start()
    edge = start_edge(stack.artifact, planner.url, stack.edge_loaded)
    req = Requirements(mode="latency", frame_rate=5.0)
    cfg = RuntimeConfig(req, replan_threshold=1e6, plan_max_age_s=1e6)  # only the lease asks for plans
    pool = stack.frames(8, seed=9)
    # a device 10x slower than its K = 10 profile: the edge wins whatever the sensed round trip
    slow = stack.graph.with_timings("device", {n.name: 10 * (n.device_ms or 0.0) for n in stack.graph.nodes})
    used: list[Any] = []
    marks: dict[str, int] = {}

    async def frame(rt: Any) -> FrameRecord:
        used.append(pool[len(used) % len(pool)])
        return await rt.infer(used[-1])

    async def go() -> tuple[list[FrameRecord], list[Any]]:
        pc = PlannerConfig(planner.url, "device-k10", device_id="cam-1", ready_timeout_s=30.0)
        async with open_device(_settings(stack, runtime=cfg, planner=pc), stack.loaded, slow) as rt:
            records = [await frame(rt) for _ in range(3)]
            give_up = time.monotonic() + 30
            renewed = len(rt.plans) + 2
            # renewals at replan_after_s, until two more plans came and the one in use has the edge
            while not (len(rt.plans) >= renewed and rt.plan.uses_edge) and time.monotonic() < give_up:
                records.append(await frame(rt))
                await asyncio.sleep(0.05)
            assert rt.plan.uses_edge and rt.plan.lease is not None, [(p.cut, p.lease) for p in rt.plans]
            await asyncio.to_thread(planner.stop)
            marks["stop"] = len(records)
            while rt.plan.origin != "device-only" and time.monotonic() < give_up:
                records.append(await frame(rt))
                await asyncio.sleep(0.05)
            plans = [(p.plan_id, p.cut, p.uses_edge, p.bandwidth_mbps, p.lease) for p in rt.plans]
            assert rt.plan.origin == "device-only", (plans, rt.events)
            marks["switch"] = len(records)
            records += [await frame(rt) for _ in range(2)]
            return records, rt.plans

    try:
        wait_registered(planner.url, stack.loaded.name, [edge.url])
        records, plans = asyncio.run(go())
    finally:
        edge.stop()
        planner.stop()
        clear_prefix(REDIS, prefix)
    _check_answers(stack, used, records)
    first, only = plans[0], plans[-1]
    leased = plans[-2]  # the last plan the planner gave
    assert first.lease is not None and first.lease.replan_after_s == pytest.approx(0.3)
    assert leased.uses_edge and leased.lease is not None and leased.lease.received_at > first.lease.received_at
    assert only.origin == "device-only" and only.requested_at >= leased.lease.expires_at
    # between the outage and the lease's expiry the device kept its leased plan on the edge
    kept = records[marks["stop"] : marks["switch"]]
    assert kept and all(r.plan_id == leased.plan_id and r.where == "edge" for r in kept), kept
    assert [r.where for r in records[marks["switch"] :]] == ["local", "local"]


def test_lease_expiry_is_honoured_while_a_replan_hangs(stack: Stack) -> None:
    """The planner stops answering (accepts, never answers: a re-plan waits the SDK's 5 s
    timeout, far past the 2 s lease). Until the lease's expiry the device keeps its leased plan
    on the edge; no frame that starts after the expiry goes to the edge: it runs Device-Only at
    once, the re-plan still in flight."""
    cfg = RuntimeConfig(Requirements(mode="latency", frame_rate=5.0), replan_threshold=1e6, plan_max_age_s=1e6)
    pool = stack.frames(4, seed=11)
    slow = stack.graph.with_timings("device", {n.name: 10 * (n.device_ms or 0.0) for n in stack.graph.nodes})

    async def go(proxy: HangingProxy, front: str) -> tuple[Any, list[tuple[float, FrameRecord]]]:
        pc = PlannerConfig(front, "device-k10", device_id="cam-hang", ready_timeout_s=30.0)  # timeout_s 5
        async with open_device(_settings(stack, runtime=cfg, planner=pc), stack.loaded, slow) as rt:
            give_up = time.monotonic() + 30
            while not (rt.plan.uses_edge and rt.plan.lease) and time.monotonic() < give_up:
                await rt.infer(pool[0])
                await asyncio.sleep(0.05)
            renewals = len(rt.plans)
            while len(rt.plans) == renewals and time.monotonic() < give_up:
                await asyncio.sleep(0.01)  # a fresh renewal: the next re-plan is 0.3 s away
            leased = rt.plan
            assert leased.uses_edge and leased.lease is not None, [(p.cut, p.lease) for p in rt.plans]
            proxy.hanging = True
            frames: list[tuple[float, FrameRecord]] = []
            while time.monotonic() < leased.lease.expires_at + 1.5:
                t0 = time.monotonic()
                frames.append((t0, await rt.infer(pool[len(frames) % len(pool)])))
                await asyncio.sleep(0.05)
            proxy.hanging = False
            return leased, frames

    with hanging_leases(stack, "device-lease-hang", 2.0) as (_, proxy, front):
        leased, frames = asyncio.run(go(proxy, front))
    expires = leased.lease.expires_at
    assert proxy.held >= 1  # a re-plan was held unanswered when the lease lapsed
    before = [rec for t0, rec in frames if t0 < expires - 0.05]
    after = [(round(t0 - expires, 3), rec.where, rec.plan_id) for t0, rec in frames if t0 > expires + 0.02]
    assert before and all(r.plan_id == leased.plan_id and r.where == "edge" for r in before), before
    assert len(after) >= 5, after
    late = [a for a in after if a[1] != "local"]
    assert not late, f"frames started after the lease's expiry (s after, where, plan): {late}"


def test_a_frame_whose_lease_lapses_during_its_device_part_sends_nothing(stack: Stack) -> None:
    """The planner stops answering (accepts, never answers) right after the device got its
    leased split plan (3 s lease). The device part, emulated, takes about a second. A frame
    started at once goes to the edge; a frame started half its device part before the lease's
    expiry has its tensors ready after it: it sends nothing on the lapsed lease and is finished
    on the device ("lease expired"), and Device-Only is in force."""
    from dapdee.client import AsyncPlannerClient
    from dapdee.device.edge import EdgeLink, WorkerTrust
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.profile import publish_profile
    from dapdee.netem import ShapedUplink

    # throughput at 0.4 Mbit/s: the planner splits after the pool (a long device part, 512 bytes sent);
    # the 4 KB input alone takes 82 ms up, well past the device part on a slow host too
    cfg = RuntimeConfig(Requirements(mode="throughput", frame_rate=5.0), replan_threshold=1e6, plan_max_age_s=1e6)
    frame = stack.frames(1, seed=13)[0]
    whole_ms = sum(n.device_ms or 0.0 for n in stack.graph.nodes)
    compute = EmulatedCompute(stack.graph, BoundaryValues(stack.loaded), scale=1000.0 / whole_ms)  # model: 1 s

    async def go(
        edge: str, proxy: HangingProxy, front: str
    ) -> tuple[Plan, float, FrameRecord, float, FrameRecord, Plan]:
        async with AsyncPlannerClient(front) as client:
            await publish_profile(client, client, stack.graph, "device-k10", {"tier": "device-k10", "slowdown": K})
            source = PlannerPlanSource(client, stack.graph, cfg.requirements, "device-k10", device_id="cam-lapse")
            sensing = Sensing(prior_mbps=0.4, fixed_load=0.0)
            link = EdgeLink(stack.graph, WorkerTrust(None, [edge]), sensing, shaper=ShapedUplink(0.4))
            rt = DeviceRuntime(stack.graph, compute, source, config=cfg, sensing=sensing, edge=link, slowdown=K)
            async with running(rt):
                proxy.hanging = True  # the renewals (every 0.3 s) hang: the first lease is the last
                leased = rt.plan
                assert leased.cut > 0 and leased.edge_worker and leased.lease is not None, leased
                sent = [n for n in leased.transfer_nodes if n != stack.graph.input.name]
                part_s = compute.part_ms([stack.graph.input.name], sent) / 1000.0
                first = await rt.infer(frame)
                await asyncio.sleep(max(0.0, leased.lease.expires_at - part_s / 2 - time.monotonic()))
                t0 = time.monotonic()
                late = await rt.infer(frame)
                after = rt.plan
                proxy.hanging = False  # the lease's release on the way out gets through
                return leased, part_s, first, t0, late, after

    with hanging_leases(stack, "device-lease-upload", 3.0) as (edge, proxy, front):
        leased, part_s, first, t0, late, after = asyncio.run(go(edge.url, proxy, front))
    assert leased.lease is not None
    expires = leased.lease.expires_at
    assert 0.3 <= part_s <= 1.0, part_s
    assert (first.plan_id, first.where) == (leased.plan_id, "edge"), first.error
    # the late frame started on the lease; its device part ended after the expiry
    assert t0 < expires - 0.1 and t0 + part_s > expires + 0.1, (t0 - expires, part_s)
    assert late.plan_id == leased.plan_id and late.device_ms >= 0.9 * part_s * 1000, late
    assert (late.where, late.error, late.bytes_sent) == ("fallback", "lease expired", 0), late
    assert late.exit == leased.exit and after.origin == "device-only"
    assert proxy.held >= 1  # a renewal was held unanswered


class CountingProxy(ForwardingProxy):
    """Forwards to the planner and counts the POST /plan requests it sees."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.plans = 0

    async def answer(self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: Any) -> Any:
        self.plans += scope["method"] == "POST" and scope["path"] == "/plan"
        return await super().answer(scope, headers, body, response)


def test_a_plan_naming_no_worker_is_asked_again_with_a_back_off(stack: Stack) -> None:
    """A planner with the model's edge timings but no live worker answers an Edge-Only plan
    with `edge_worker: null`. The device finishes its frames locally and asks again, but spaced
    by its back-off (0.5 s doubling), not every `min_replan_s` (0.2 s) for as long as frames
    flow: about 4 plan requests in 4 s of frames, not 20."""
    from dapdee.client import AsyncPlannerClient
    from dapdee.device.compute import TorchCompute
    from dapdee.device.edge import EdgeLink, WorkerTrust
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.runtime import DeviceRuntime
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.testing import serve_app_in_thread

    graph = stack.graph.with_timings("edge", {n.name: 0.01 for n in stack.graph.nodes})
    frames = stack.frames(1, seed=5)

    async def go(url: str) -> tuple[int, list[FrameRecord]]:
        counting = CountingProxy(url)
        front = ServerThread(counting, name="counting")
        await asyncio.to_thread(front.start)
        try:
            async with AsyncPlannerClient(front.url) as client:
                await client.put_graph(graph)
                cfg = RuntimeConfig(Requirements(mode="latency"), replan_threshold=1e6, plan_max_age_s=1e6)
                sensing = Sensing(prior_mbps=8.0, fixed_load=0.0)
                source = PlannerPlanSource(client, stack.graph, cfg.requirements, worker_wait_s=0.1)
                edge = EdgeLink(stack.graph, WorkerTrust(None), sensing)
                rt = DeviceRuntime(stack.graph, TorchCompute(stack.loaded, K), source, config=cfg, sensing=sensing,
                                   edge=edge, slowdown=K)  # fmt: skip
                async with running(rt):
                    assert rt.plan.uses_edge and rt.plan.edge_worker is None
                    asked, t0, records = counting.plans, time.monotonic(), []
                    while time.monotonic() - t0 < 4.0:
                        records.append(await rt.infer(frames[0]))
                        await asyncio.sleep(0.05)
                    return counting.plans - asked, records
        finally:
            await asyncio.to_thread(front.stop)

    with serve_app_in_thread(create_app(Settings(redis_url=None))) as url:
        asked, records = asyncio.run(go(url))
    assert len(records) >= 10 and {(r.where, r.error) for r in records} == {("fallback", "no edge worker")}
    assert 2 <= asked <= 7, asked  # at 0, 0.5, 1.5 and 3.5 s; every 0.2 s would be about 20


def test_frames_in_flight_failing_in_one_outage_ask_for_one_plan(stack: Stack) -> None:
    """The worker stops answering (a proxy in front of it holds every request). Three pipelined
    frames, released 0.25 s apart, time out one after another (0.6 s each, so each failure
    comes more than `min_replan_s` after the one before). They are one outage: the device asks
    the planner for one new plan, not one per failed frame, and the frames after them (the
    worker rests 5 s) ask for none."""
    from dapdee.client import AsyncPlannerClient
    from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
    from dapdee.device.plan_source import PlannerPlanSource
    from dapdee.device.profile import publish_profile

    tier = "device-outage"
    cfg = RuntimeConfig(
        Requirements(mode="throughput", frame_rate=4.0), max_inflight=3, timeout_floor_ms=600.0, timeout_factor=0.001,
        backoff_initial_s=5.0, replan_threshold=1e6, plan_max_age_s=1e6,
    )  # fmt: skip
    held = HangingProxy(stack.edge.url)
    held.hanging = True
    counting = CountingProxy(stack.planner.url)
    frames = stack.frames(5, seed=14)

    async def go(worker: str, planner_url: str) -> tuple[int, list[FrameRecord], list[str]]:
        async with AsyncPlannerClient(planner_url) as client:
            await publish_profile(client, client, stack.graph, tier, {"tier": tier, "slowdown": K})
            source = PlannerPlanSource(client, stack.graph, cfg.requirements, tier)
            sensing = Sensing(prior_mbps=1.1, fixed_load=0.0)
            backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
            edge = EdgeLink(stack.graph, WorkerTrust(None, [worker]), sensing, backoff=backoff)
            rt = DeviceRuntime(stack.graph, TorchCompute(stack.loaded, K), source, config=cfg, sensing=sensing,
                               edge=edge, edge_url=worker, slowdown=K)  # fmt: skip
            async with running(rt):
                assert rt.plan.uses_edge, rt.plan
                asked = counting.plans
                records = await rt.run(frames)
                await asyncio.sleep(0.6)  # a re-plan asked for by the last failure has started and landed
                return counting.plans - asked, records, rt.events

    worker, front = ServerThread(held, name="held-edge").start(), ServerThread(counting, name="counting").start()
    try:
        asked, records, events = asyncio.run(go(worker.url, front.url))
    finally:
        held.hanging = False
        front.stop()
        worker.stop()
    _check_answers(stack, frames, records)
    timed_out = [r for r in records if r.error == "timeout after 600 ms"]
    assert len(timed_out) == 3 and all(r.index < 3 for r in timed_out), [(r.where, r.error) for r in records]
    failures = [e for e in events if e.startswith("edge failure")]
    assert len(failures) == 3 and "asking for a new plan" in failures[0], failures
    assert asked == 1, (asked, events)


def test_an_endless_pipelined_stream_ends_when_a_frame_fails(stack: Stack) -> None:
    """An endless source, records not kept (`keep=False`, as `dapdee device run` streams a
    camera), and a `progress` that fails at the third frame (stdout closed under it): the run
    raises that error within a few frames, instead of keeping the failed task and streaming on."""
    frame = stack.frames(1, seed=3)[0]
    cfg = RuntimeConfig(Requirements(mode="throughput"), max_inflight=2)
    shown: list[FrameRecord] = []

    def progress(rec: FrameRecord) -> None:
        if len(shown) == 2:
            raise BrokenPipeError("stdout closed")
        shown.append(rec)

    async def endless() -> AsyncIterator[Frame]:
        while True:
            yield frame

    async def go() -> int:
        async with running(fixed_runtime(stack, stack.mid_cut(stack.edge.url), stack.edge.url, config=cfg)) as rt:
            with pytest.raises(BrokenPipeError):
                await asyncio.wait_for(rt.run(endless(), progress, keep=False), 30.0)
            return len(rt.records)

    assert asyncio.run(go()) <= 2 + 2 * cfg.max_inflight


def _planner_with_a_dead_worker(stack: Stack, url: str) -> tuple[str, str]:
    """Into the planner at `url`: the stack's model and edge profile, plus a faster edge tier;
    the stack's worker heartbeats (idle) at its own tier, and a worker that nothing answers at
    (http://127.0.0.1:1, connection refused) at the faster one, busier by its heartbeat so that
    it is listed second (the device probes the first listed) but planned first (the leases, not
    the heartbeat load, price the edge). Returns (dead URL, live URL)."""
    from dapdee.client import PlannerClient

    dead, name = "http://127.0.0.1:1", stack.loaded.name
    with PlannerClient(stack.planner.url) as source, PlannerClient(url) as planner:
        planner.put_graph(source.get_model(name).graph)
        (live,) = [w for w in source.workers().workers if w.url == stack.edge.url]
        edge = source.list_profiles(name).profiles[live.tier]
        planner.put_profile(name, live.tier, "edge", edge.timings_ms, edge.meta)
        fast = {n: ms / 10 for n, ms in edge.timings_ms.items()}
        planner.put_profile(name, "fast", "edge", fast, edge.meta)
        for worker, tier, load in ((stack.edge.url, live.tier, 0.0), (dead, "fast", 0.5)):
            planner.heartbeat({"url": worker, "models": [name], "tier": tier, "load": load})
    return dead, stack.edge.url


def test_a_worker_the_device_cannot_reach_is_avoided_at_the_next_plan(stack: Stack) -> None:
    """The planner lists two workers: one that heartbeats but that nothing answers at (a wrong
    advertised URL), on a faster tier, so the first plan names it, and the stack's worker. The
    first frame sent there is refused and finished locally; the re-plan it asks for names that
    worker in `avoid_workers` (it rests for 30 s), the plan moves to the live worker, and the
    frames after it are answered by the edge. (Before, the planner handed the same worker back
    at every re-plan, and every frame fell back.)"""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings
    from dapdee.testing import serve_app_in_thread

    frame = stack.frames(1, seed=21)[0]
    cfg = RuntimeConfig(Requirements(mode="latency"), plan_max_age_s=100.0, backoff_initial_s=30.0)

    async def go(url: str) -> tuple[list[FrameRecord], Plan, Plan]:
        settings = _settings(stack, runtime=cfg, planner=PlannerConfig(url, "device-k10", ready_timeout_s=30.0))
        async with open_device(settings, stack.loaded, stack.graph) as rt:
            first, records = rt.plan, []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 10.0 and sum(r.where == "edge" for r in records) < 3:
                records.append(await rt.infer(frame))
                await asyncio.sleep(0.05)
            return records, first, rt.plan

    with serve_app_in_thread(create_app(Settings(redis_url=None, worker_ttl_s=120.0))) as url:
        dead, live = _planner_with_a_dead_worker(stack, url)
        records, first, last = asyncio.run(go(url))
    assert first.uses_edge and first.edge_worker == dead, first
    assert last.edge_worker == live, last
    assert records[0].where == "fallback", records[0]
    assert [r.where for r in records[-3:]] == ["edge"] * 3, [(r.where, r.error) for r in records]
    assert sum(r.where == "fallback" for r in records) <= 3, [(r.where, r.error) for r in records]
