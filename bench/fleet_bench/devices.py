"""The client side of the fleet benchmark: many emulated devices in one process, on one
event loop, each the real device runtime (`dapdee.device.runtime.DeviceRuntime` with its real
edge link, shaped uplink, sensing, probes, plan source and re-planning) with
`EmulatedCompute`: the device part sleeps the profiled device time x K and sends real tensors
of the right shapes, so devices take no CPU for compute.

Each device is assembled from the runtime's parts as `dapdee.device.session` assembles one,
except that its compute is emulated and its profile is not measured per device: the runner
publishes the tier's profile once (with the `device_request_ms` a real session measured).
Every device senses its own link at start-up (round trips, probe pairs) and asks for its plans
at the conditions it senses.

**Camera.** A device's camera releases a frame every 1 / frame_rate s, from its own phase
(`release_phase`: uniform in one period, fixed by the device id). Independent cameras are not
phase-locked; cameras that all released at the same instants would queue each burst's frames
behind one another at the worker, a synchronisation no fleet of independent clocks has. A frame enters the
runtime when the pipeline has room: the device's compute is idle (no frame in its device
part) and fewer than `max_inflight` frames are in flight; otherwise it waits in a one-frame
buffer, and the next release replaces it (the waiting frame is dropped: it missed its budget).
A frame that finishes leaves the frames in flight before it wakes the camera, so a waiting frame
takes a freed slot at once. A frame's latency runs from its release to its answer, so a wait in
the buffer counts; on the device's clock (`DeviceStage`) a frame that waited for a slot enters
the device when the slot freed, not at its release.

**Protocol** (`python -m dapdee.bench.fleet_bench.devices`): one JSON job line on stdin
(`ClientJob`); the process opens its devices and prints `{"ready": n}`; the runner answers
with `{"go": EPOCH_S}`, the wall-clock start of the cameras; after warm-up + window (+ a drain
of the frames still in flight) it prints `{"devices": [...]}` (`device_result`) and exits.
Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dapdee.bench.fleet_bench.scenario import MODELS, DeviceSpec, base_profile, scaled_profile
from dapdee.bench.fleet_bench.systems import SYSTEMS, plan_source
from dapdee.client import AsyncPlannerClient
from dapdee.costgraph import CostGraph
from dapdee.device.compute import BoundaryValues, Computed, EmulatedCompute, Progressed
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.metrics import DeviceMetrics
from dapdee.device.plan_source import listed_workers
from dapdee.device.probe import LinkProber, Sensor
from dapdee.device.replanner import conditions
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import Frame, FrameRecord, Plan
from dapdee.netem import ShapedUplink
from dapdee.progressive_run import SidePart

log = logging.getLogger("dapdee.bench.fleet")

DRAIN_S = 3.0  # after the window, frames still in flight get this long to finish
# Devices sense their link once, at start-up (round trips and probe pairs, before any load), and
# keep that view: on this host a loaded worker's HTTP queueing (outside the queue and compute
# time it reports) is read by the runtime's estimator as a slow uplink (3G devices sensed at
# 0.05-0.09 Mbit/s instead of 1.1), which re-plans every few seconds. So frame uploads give no
# bandwidth samples and idle links are not probed again (see the report).
MIN_EXPECTED_MS = math.inf
NO_IDLE_PROBES_S = 1e9
STARTUP_CONCURRENCY = 1  # a device times its link at start-up alone on its process's event loop (LinkProber.startup)


@dataclass(frozen=True)
class ClientJob:
    """What one client process runs: its devices under `system` against the planner."""

    planner_url: str
    device_token: str
    system: str
    model: str
    k: float
    tier: str
    devices: list[DeviceSpec]
    frame_rate: float
    budget_ms: float
    warmup_s: float
    window_s: float
    max_inflight: int = 3
    probe_idle_s: float = NO_IDLE_PROBES_S
    device_request_ms: float | None = None  # what the tier's device profile prices per request
    min_accuracy: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientJob:
        raw = json.loads(text)
        raw["devices"] = [DeviceSpec(**d) for d in raw["devices"]]
        return cls(**raw)

    def runtime_config(self) -> RuntimeConfig:
        req = Requirements(self.budget_ms, self.min_accuracy, self.frame_rate, mode="auto")
        return RuntimeConfig(req, max_inflight=self.max_inflight, probe_idle_s=self.probe_idle_s)


RELEASED_AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("released_at", default=None)
"""When the frame whose task reads it entered the device (monotonic s): its release, or later
when it waited in the camera's buffer for a slot of `max_inflight`; until its first device part
has begun."""
CAMERA_FRAME: contextvars.ContextVar[Released | None] = contextvars.ContextVar("camera_frame", default=None)
"""The camera's record of the frame whose task reads it: its first planned device part notes
there when it began on the device's clock (`Released.device_start`)."""


class DeviceStage:
    """The device's compute as its camera sees it: the emulated compute, counting the device
    parts in progress (waiting for the device's one compute thread or running) and setting
    `changed` whenever one ends. A `ComputeBackend`.

    **The device's own clock.** A frame's first device part is handed its release time
    (`RELEASED_AT`), so it begins on the device when the frame is released or the previous part
    ends, whichever is later (`EmulatedCompute`'s `released_at`). Sixteen devices share this
    process's event loop, so the call arrives later than that (the camera's wake-up, the
    runtime's awaits behind other devices' HTTP work). The loop's delay still reaches a frame's
    latency through its timers, but no longer queues the frames after it: a device whose part
    fills 98 % of the camera period otherwise queued its frames behind the loop's delays, a
    queue a device with its own CPU would not have. Only a part of the frame's plan (the runtime
    names the plan's nodes as `allowed`) gets the release time; a fallback (a part outside the
    plan, after the edge failed) and any later part of the frame begin when called: they wait
    for the edge, not for the loop."""

    def __init__(self, inner: EmulatedCompute, changed: asyncio.Event) -> None:
        self.inner = inner
        self.changed = changed
        self.active = 0

    @staticmethod
    def _released_at(planned: bool) -> float | None:
        """The frame's release time if this is its first part and `planned`, else None; either
        way the frame has had its first part. O(1)."""
        released = RELEASED_AT.get()
        RELEASED_AT.set(None)
        return released if planned else None

    @staticmethod
    def _began(released: float | None, ms: float) -> None:
        """Note on the camera's frame (if any) when its first planned part began on the device's
        clock: `ms` (the part's wall time, from its begin on that clock) before now. O(1)."""
        frame = CAMERA_FRAME.get()
        if released is not None and frame is not None and frame.device_start is None:
            frame.device_start = time.monotonic() - ms / 1000.0

    async def run(
        self, given: Mapping[str, Any], targets: Sequence[str], allowed: Collection[str] | None = None
    ) -> Computed:
        released = self._released_at(allowed is not None)
        self.active += 1
        try:
            done = await self.inner.run(given, targets, allowed, released_at=released)
            self._began(released, done.ms)
            return done
        finally:
            self.active -= 1
            self.changed.set()

    async def progressive(
        self, given: Mapping[str, Any], part: SidePart, targets: Sequence[str], allowed: Collection[str] | None = None
    ) -> Progressed:
        released = self._released_at(allowed is not None)
        self.active += 1
        try:
            done = await self.inner.progressive(given, part, targets, allowed, released_at=released)
            self._began(released, done.ms)
            return done
        finally:
            self.active -= 1
            self.changed.set()

    def close(self) -> None:
        self.inner.close()


class PlanLog:
    """The planner client as a device's plan source sees it: every answer's predicted stages
    are kept by plan id (the runtime's plans carry only the total and the bottleneck)."""

    def __init__(self, client: AsyncPlannerClient) -> None:
        self.client = client
        self.base_url = client.base_url
        self.predicted: dict[str, dict[str, Any]] = {}

    async def plan(self, body: Any) -> Any:
        answer = await self.client.plan(body)
        self.predicted[answer.plan_id] = answer.predicted.model_dump(mode="json")
        return answer

    async def release(self, device_id: str) -> None:
        await self.client.release(device_id)


class PlanUse(DeviceMetrics):
    """A device runtime's metrics (`DeviceRuntime(metrics=...)`, in their own registry) that also
    keep when the runtime put each plan in use (monotonic s), in the order of use: the runtime
    reports its first plan and every plan its re-planner uses, the Device-Only plan a lapsed
    lease puts in use included. The runtime's `plans` keep the order but only the request
    times. O(1) per report."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[tuple[float, Plan]] = []

    def plan(self, plan: Plan) -> None:
        super().plan(plan)
        self.used.append((time.monotonic(), plan))


@dataclass
class Released:
    """One released frame: when (monotonic s); once admitted, when the camera handed it to the
    runtime (`admitted`), when it entered the device on the device's clock (`entered`: its
    release, or when a slot freed if it waited for one) and, if a device part of its plan ran,
    when the first began on that clock (`device_start`); once answered its record and answer
    time."""

    at: float
    record: FrameRecord | None = None
    done_at: float | None = None
    error: str | None = None
    admitted: float | None = None
    entered: float | None = None
    device_start: float | None = None

    def wait_s(self) -> float | None:
        """How long the frame waited before the device (or, with no device part, the runtime)
        took it: in the camera's buffer, and for the previous frame's device part. O(1)."""
        began = self.device_start if self.device_start is not None else self.admitted
        return None if began is None else max(0.0, began - self.at)


class Camera:
    """Releases frames at `rate` into `runtime` (see the module docstring)."""

    def __init__(self, runtime: DeviceRuntime, stage: DeviceStage, frame: Frame, rate: float, cap: int) -> None:
        self.runtime = runtime
        self.stage = stage
        self.frame = frame
        self.period = 1.0 / rate
        self.cap = cap
        self.wake = stage.changed
        self.frames: list[Released] = []
        self.inflight: set[asyncio.Task[None]] = set()
        self.slot_at = -math.inf  # when the frames in flight last fell below the cap (monotonic s)

    def _room(self) -> bool:
        return self.stage.active == 0 and len(self.inflight) < self.cap

    async def _one(self, rel: Released) -> None:
        # this task's context: its device part begins on the device's clock
        RELEASED_AT.set(rel.at if rel.entered is None else rel.entered)
        CAMERA_FRAME.set(rel)
        try:
            rel.record = await self.runtime.infer(self.frame)
        except Exception as exc:  # counted as a missed frame; the camera goes on
            rel.error = f"{type(exc).__name__}: {exc}"[:200]
        rel.done_at = time.monotonic()
        self._leave(asyncio.current_task(), rel.done_at)
        self.wake.set()  # after leaving: the camera it wakes sees the slot this frame freed

    def _leave(self, task: asyncio.Task[Any] | None, at: float) -> None:
        """`task` is no longer in flight (at `at`, monotonic s). Idempotent. O(1)."""
        if task in self.inflight:
            if len(self.inflight) >= self.cap:
                self.slot_at = at
            self.inflight.discard(task)

    def _admit(self, rel: Released) -> None:
        rel.admitted = time.monotonic()
        # the frame entered the device when released, or when a slot freed if it waited for one
        # (its compute being idle, the device's clock adds any wait for the previous part)
        rel.entered = max(rel.at, self.slot_at)
        task = asyncio.create_task(self._one(rel))
        self.inflight.add(task)
        task.add_done_callback(lambda t: self._leave(t, time.monotonic()))  # cancelled: never reached _leave

    async def run(self, start: float, end: float) -> None:
        """Release frames from `start` until `end` (monotonic s); then wait up to DRAIN_S for
        the frames in flight. O(frames)."""
        loop = asyncio.get_running_loop()
        next_at, waiting = start, None
        while True:
            now = time.monotonic()
            while next_at <= now and next_at < end:
                if waiting is not None:
                    self.frames.append(waiting)  # replaced in the buffer: dropped
                waiting, next_at = Released(next_at), next_at + self.period
            if waiting is not None and self._room():
                self.frames.append(waiting)
                self._admit(waiting)
                waiting = None
                await asyncio.sleep(0)  # let it reach its device part before the next check
                continue
            if next_at >= end and (waiting is None or now > end + DRAIN_S):
                break
            timer = loop.call_at(next_at if next_at < end else end + DRAIN_S, self.wake.set)
            await self.wake.wait()
            self.wake.clear()
            timer.cancel()
        if waiting is not None:
            self.frames.append(waiting)
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=max(0.1, end + DRAIN_S - time.monotonic()))
        for task in list(self.inflight):
            task.cancel()


def release_phase(device_id: str, period: float) -> float:
    """When a device's camera first releases a frame after the common start: uniform in
    [0, period), the same for the same id in every run (a seeded generator). O(1)."""
    return random.Random(device_id).random() * period


@dataclass
class Device:
    spec: DeviceSpec
    runtime: DeviceRuntime
    camera: Camera
    plans: PlanLog
    uses: PlanUse
    opened: list[str] = field(default_factory=list)  # notes from start-up


@dataclass
class Shared:
    """What a process's devices share: the model's graph at K, the boundary values, the frame,
    one planner client (device token), the job."""

    job: ClientJob
    graph: CostGraph
    values: BoundaryValues
    frame: Frame
    planner: AsyncPlannerClient

    @classmethod
    def open(cls, job: ClientJob) -> Shared:
        from dapdee.models import load_model

        loaded = load_model("", weights=str(MODELS[job.model]))
        graph = scaled_profile(base_profile(loaded, job.model), job.k)
        values = BoundaryValues(loaded)
        values.get([n.name for n in graph.nodes])  # every boundary value, computed once now
        planner = AsyncPlannerClient(job.planner_url, job.device_token, timeout=10.0)
        return cls(job, graph, values, Frame(values.x, source="emulated"), planner)


async def open_device(spec: DeviceSpec, shared: Shared) -> Device:
    """One emulated device, started: its link sensed, its plan source made, its first plan in
    hand. Raises what the runtime raises when it cannot start (DeviceError, ClientError)."""
    job, graph = shared.job, shared.graph
    cfg = job.runtime_config()
    sensing = Sensing(prior_mbps=spec.rate_mbps, fixed_load=0.0, min_expected_ms=MIN_EXPECTED_MS)
    trust = WorkerTrust(functools.partial(listed_workers, shared.planner), refresh_s=5.0)
    edge = EdgeLink(
        graph, trust, sensing, job.device_token, ShapedUplink(spec.rate_mbps, rtt_ms=spec.rtt_ms),
        backoff=Backoff(cfg.backoff_initial_s, cfg.backoff_max_s),
    )  # fmt: skip
    await trust.refresh(force=True, strict=True)
    prober = LinkProber(edge, graph, sensing)
    serving = trust.serving(graph.model)
    if serving:
        # no burst: the tier profile's figure (below) is what every device's round trip leaves
        # out, and 64 bursts at once would only load the worker during start-up
        await prober.startup(serving[0], rounds=2, burst=0)
    if job.device_request_ms is not None:
        # the planner adds the tier profile's value to every device of the tier, so that value
        # (not this device's own start-up reading of it) is what its round trip must leave out
        sensing.request_cpu_ms = job.device_request_ms
    plans = PlanLog(shared.planner)
    system = SYSTEMS[job.system]
    source = await plan_source(system, plans, graph, cfg.requirements, job.tier, spec.device_id, conditions(sensing))
    stage = DeviceStage(EmulatedCompute(graph, shared.values), asyncio.Event())
    uses = PlanUse()
    runtime = DeviceRuntime(
        graph, stage, source, config=cfg, sensing=sensing, edge=edge, slowdown=job.k, rate_mbps=spec.rate_mbps,
        metrics=uses,
    )  # fmt: skip
    if source.replans:

        def target() -> str | None:
            listed = trust.serving(graph.model)
            return runtime.plan.edge_worker or (listed[0] if listed else None)

        runtime.sensor = Sensor(prober, sensing, cfg, target)
    await runtime.start()
    camera = Camera(runtime, stage, shared.frame, job.frame_rate, cfg.max_inflight)
    return Device(spec, runtime, camera, plans, uses)


def device_part(nodes: Sequence[str]) -> str:
    """A plan's device part as JSON: `"<node count>:<digest of the node names>"`, so two parts
    of the same size but different nodes differ. O(nodes)."""
    digest = hashlib.sha1("\n".join(nodes).encode()).hexdigest()[:10]
    return f"{len(nodes)}:{digest}"


def plan_prediction(plan: Plan) -> dict[str, Any]:
    """What the runtime's own plan predicts (for plans the planner never priced, e.g. the
    Device-Only plan a lapsed lease puts in use): latency, bottleneck and throughput
    1000 / bottleneck (null when the bottleneck is not positive). O(1)."""
    fps = 1000.0 / plan.bottleneck_ms if plan.bottleneck_ms > 0 else None
    return {"latency_ms": plan.predicted_ms, "bottleneck_ms": plan.bottleneck_ms, "throughput_fps": fps,
            "origin": plan.origin}  # fmt: skip


def device_result(dev: Device, window: tuple[float, float]) -> dict[str, Any]:
    """One device's run as JSON: its spec; each frame released in the window as
    `[release s into the window, latency ms or null (dropped / unanswered), predicted ms,
    where, exit, device ms, edge queue + compute ms or null, plan id, error, wait ms or null]`
    (wait: from its release until its first device part began on the device's clock, or with
    none until the camera handed it to the runtime); every plan it put in use, in the order of
    use (`PlanUse`), as `[s into the window (negative: before) when it was requested, exit,
    device part (`device_part`), worker, plan id, s into the window when it was put in use]`;
    the predicted stages of those plans (the planner's answer; for a plan the planner never
    priced, the runtime's own prediction, `plan_prediction`); its last events. O(frames + plans)."""
    w0, w1 = window
    frames = []
    for rel in dev.camera.frames:
        if not w0 <= rel.at < w1:
            continue
        r = rel.record
        if r is None or rel.done_at is None:
            frames.append([rel.at - w0, None, None, None, None, None, None, None, rel.error, None])
            continue
        server = None if r.edge_compute_ms is None else (r.edge_queue_ms or 0.0) + r.edge_compute_ms
        wait = rel.wait_s()
        frames.append(
            [rel.at - w0, (rel.done_at - rel.at) * 1000.0, r.predicted_ms, r.where, r.exit, r.device_ms, server,
             r.plan_id, r.error, None if wait is None else wait * 1000.0]
        )  # fmt: skip
    runtime_plans = [p for _, p in dev.uses.used]
    plans = [[p.requested_at - w0, p.exit, device_part(p.device_nodes), p.edge_worker, p.plan_id, at - w0]
             for at, p in dev.uses.used]  # fmt: skip
    used = {p[4] for p in plans} | {f[7] for f in frames if f[7]}
    predicted = {pid: plan_prediction(p) for p in runtime_plans if (pid := p.plan_id) in used}
    predicted |= {pid: dev.plans.predicted[pid] for pid in used if pid in dev.plans.predicted}
    return {
        "spec": asdict(dev.spec),
        "frames": frames,
        "plans": plans,
        "predicted": predicted,
        "sensed": {
            "bandwidth_mbps": dev.runtime.sensing.bandwidth_mbps,
            "request_rtt_ms": dev.runtime.sensing.request_rtt_ms,
            "request_cpu_ms": dev.runtime.sensing.request_cpu_ms,
            "samples": [
                [b, round(ms, 2), sample and round(sample, 4)]
                for b, ms, _, _, sample in list(dev.runtime.sensing.bandwidth.history)[-8:]
            ],
        },
        "events": dev.runtime.events[-10:],
    }


async def _open_all(shared: Shared) -> tuple[list[Device], list[str]]:
    gate = asyncio.Semaphore(STARTUP_CONCURRENCY)

    async def one(spec: DeviceSpec) -> Device:
        async with gate:
            return await open_device(spec, shared)

    got = await asyncio.gather(*(one(s) for s in shared.job.devices), return_exceptions=True)
    devices = [d for d in got if isinstance(d, Device)]
    errors = [f"{s.device_id}: {type(e).__name__}: {e}" for s, e in zip(shared.job.devices, got, strict=True)
              if isinstance(e, BaseException)]  # fmt: skip
    return devices, errors


async def _close(devices: list[Device], shared: Shared) -> None:
    for dev in devices:
        with contextlib.suppress(Exception):
            await dev.runtime.aclose()
            if dev.runtime.edge is not None:
                await dev.runtime.edge.aclose()
    await shared.planner.aclose()


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve(job: ClientJob) -> None:
    """The protocol of the module docstring."""
    shared = Shared.open(job)
    devices, errors = await _open_all(shared)
    try:
        _say({"ready": len(devices), "errors": errors, "pid": os.getpid()})
        line = await asyncio.to_thread(sys.stdin.readline)
        go = float(json.loads(line)["go"])
        start = time.monotonic() + (go - time.time())
        window = (start + job.warmup_s, start + job.warmup_s + job.window_s)
        await asyncio.gather(
            *(d.camera.run(start + release_phase(d.spec.device_id, d.camera.period), window[1]) for d in devices)
        )
        _say({"devices": [device_result(d, window) for d in devices], "errors": errors})
    finally:
        await _close(devices, shared)


def main() -> int:
    import torch

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    job = ClientJob.from_json(sys.stdin.readline())
    asyncio.run(serve(job))
    return 0


if __name__ == "__main__":
    sys.exit(main())
