"""The device runtime: the frame loop.

`DeviceRuntime` runs each frame with the current plan, through its `FramePath`
(`dapdee.device.frame_path`): the plan's device part on the compute backend, the `transfer`
tensors to the plan's worker (`EdgeLink`), the exit's logits back; a plan without edge nodes
runs wholly on the device. When the edge fails, times out, answers something off contract,
rests after a failure, or no trusted worker is named, the frame is finished on the device from
the values it already has (`fallback`): no frame is lost. The edge failure bookkeeping (one new
plan per outage of a worker, a frame that may no longer send when its tensors are ready, the
back-off on asking for a worker while none is named) is `EdgeGate`'s, in the same module; the
`FramePath` also runs a plan made with confidence exits (`Plan.progressive`). The runtime itself keeps the
life cycle, the plan in use, the records and the streams. Under heavy load (a frame rate, or
throughput mode) frames are pipelined: the device part of frame i+1 overlaps the upload of
frame i and the edge compute of frame i−1, with at most `max_inflight` in flight.

Readiness: `start()` returns once the first plan is in hand (the profile and link probes come
before it, from whoever built the parts); `infer` and `run` refuse to run before, and after
`aclose()` (a start that `aclose` overtakes releases the lease its plan took and raises
`DeviceClosed`; a frame still running when the runtime closed is finished on the device, its
lease released then). In the
background (`Sensor`, `Replanner`) the runtime keeps its conditions and its plan fresh; frames
never wait for that. Each frame is one trace (with `--otel`): `device.frame` with
`device.compute` and `uplink` spans, the edge's spans joined through the `traceparent` sent
with the infer request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import torch

from dapdee import timebox
from dapdee.costgraph import CostGraph
from dapdee.device.compute import ComputeBackend
from dapdee.device.config import RuntimeConfig
from dapdee.device.edge import EdgeLink
from dapdee.device.frame_path import EdgeGate, FramePath, Outcome
from dapdee.device.metrics import DeviceMetrics
from dapdee.device.plan_source import PlanSource
from dapdee.device.probe import Sensor
from dapdee.device.replanner import Replanner, conditions
from dapdee.device.report import log_frame
from dapdee.device.sensing import Sensing
from dapdee.device.types import DeviceClosed, Frame, FrameRecord, Plan
from dapdee.web import otel
from dapdee.web.otel import NO_TRACING, Tracing
from dapdee.web.tasks import stop_task

log = logging.getLogger("dapdee.device")

TICK_S = 0.05  # background sensing and re-planning period
MAX_RECORDS = 10_000  # frames kept in `records` (a camera stream runs for ever)
CLOSE_FRAMES_S = 5.0  # how long a close waits for the frames in flight to end


_END = object()  # what `next` answers once a frame source is exhausted


async def _aiter(frames: Iterable[Frame] | AsyncIterable[Frame]) -> AsyncIterator[Frame]:
    """The frames of `frames`, in order, without blocking the event loop: an async source as it
    is; a list or tuple on the loop (indexing never blocks); any other iterable (an image
    folder decoding JPEGs, a video, a camera's blocking read) one `next` at a time on a worker
    thread (`_read_off_loop`), so frames in flight finish while the next one is read. O(1) per
    frame beyond the source's own read."""
    if isinstance(frames, AsyncIterable):
        async for f in frames:
            yield f
    elif isinstance(frames, (list, tuple)):
        for f in frames:
            yield f
            await asyncio.sleep(0)
    else:
        async for f in _read_off_loop(iter(frames)):
            yield f


async def _read_off_loop(it: Iterator[Frame]) -> AsyncIterator[Frame]:
    """The items of `it`, each read by `next` on the loop's default executor (one read at a
    time, so in order). When the stream stops early, `it` is closed (a generator's `close`,
    which releases a camera or a file): at once, or, when a read is still under way on its
    thread (the consumer was cancelled meanwhile), as soon as that read ends."""
    loop = asyncio.get_running_loop()
    read: asyncio.Future[Any] | None = None
    try:
        while True:
            read = loop.run_in_executor(None, next, it, _END)
            frame = await asyncio.shield(read)
            read = None
            if frame is _END:
                return
            yield frame
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            if read is None or read.done():
                close()
            else:  # a generator cannot be closed while it runs on another thread
                read.add_done_callback(lambda _: close())


class DeviceRuntime:
    """The frame loop (see the module docstring). Parts are given, not built: `graph` is the
    device's cost graph (device timings; it checks plans and prices fallbacks), `compute` the
    backend, `plans` the plan source, `edge` the edge access (None: no edge at all), `sensor`
    the background sensing (None: none). `slowdown` and `rate_mbps` are stated in every record.
    `records` keeps the last `max_records` frames; `frames_done` counts every frame answered.
    Use `async with runtime:` or `start()` / `aclose()`. A frame runs through the `FramePath`
    built here from the same parts (`EdgeGate` its edge failure bookkeeping, wired to the
    re-planner by `start`), which hold the parts: `graph`, `compute`, `edge`, `edge_url`,
    `sensing`, `config`, `tracing` and `replanner` are read-only here."""

    def __init__(
        self,
        graph: CostGraph,
        compute: ComputeBackend,
        plans: PlanSource,
        *,
        config: RuntimeConfig | None = None,
        sensing: Sensing | None = None,
        edge: EdgeLink | None = None,
        sensor: Sensor | None = None,
        edge_url: str | None = None,
        metrics: DeviceMetrics | None = None,
        tracing: Tracing = NO_TRACING,
        slowdown: float = 1.0,
        rate_mbps: float | None = None,
        max_records: int = MAX_RECORDS,
    ) -> None:
        self.source = plans
        self.sensor = sensor
        self.metrics = metrics
        self.slowdown = slowdown
        self.rate_mbps = rate_mbps
        self.records: deque[FrameRecord] = deque(maxlen=max_records)  # the most recent frames
        self.frames_done = 0  # frames answered since the runtime was made (`records` keeps the last)
        self.started_at = time.perf_counter()  # reset by start(); records' `started_at` count from it
        self._counter = itertools.count()
        self._bg: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[Plan] | None = None  # the first plan, while start() waits for it
        self._inflight = 0  # frames `infer` has begun and not ended
        self._idle = asyncio.Event()  # set while no frame is in flight
        self._idle.set()
        self._closed = False
        # one frame under a plan; the gate rests failed workers and asks `replanner` for plans.
        # Each part is held once, by them: the properties below read it there.
        config = config or RuntimeConfig()
        self._gate = EdgeGate(edge, edge_url.rstrip("/") if edge_url else None, config, lambda: self._closed)
        sensing = sensing or Sensing(fixed_load=0.0)
        self._frame_path = FramePath(graph, compute, config, sensing, self._gate, tracing)

    # ---- the parts, as given (read-only: the frame path and the gate hold them) -----------------
    @property
    def graph(self) -> CostGraph:
        return self._frame_path.graph

    @property
    def compute(self) -> ComputeBackend:
        return self._frame_path.compute

    @property
    def config(self) -> RuntimeConfig:
        return self._frame_path.config

    @property
    def sensing(self) -> Sensing:
        return self._frame_path.sensing

    @property
    def tracing(self) -> Tracing:
        return self._frame_path.tracing

    @property
    def edge(self) -> EdgeLink | None:
        return self._gate.edge

    @property
    def edge_url(self) -> str | None:
        """The worker that overrides the plans' own (None: the plan's)."""
        return self._gate.edge_url

    @property
    def replanner(self) -> Replanner | None:
        """The re-planner, made by `start` with the first plan (None before)."""
        return self._gate.replanner

    # ---- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> DeviceRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Get the first plan (frames are refused until then) and start the background.
        DeviceClosed when `aclose` came first, or while the first plan was asked for (`aclose`
        stops the asking; a lease that plan took after `aclose` released the device's is
        released again). RuntimeError when started already."""
        if self._closed:
            raise DeviceClosed("the device runtime is closed")
        if self._starting is not None or self.replanner is not None:
            raise RuntimeError("the device runtime is started already")
        self._starting = asyncio.create_task(self.source.first(conditions(self.sensing)))
        try:
            plan = await self._starting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():  # aclose stopped the asking
                raise DeviceClosed("the device runtime was closed while it started") from None
            raise
        finally:
            self._starting = None
        if self._closed:
            await self.source.aclose()
            raise DeviceClosed("the device runtime was closed while it started")
        self._gate.replanner = Replanner(self.source, self.sensing, self.config, plan, self._on_plan)
        self._on_plan(plan)
        self.started_at = time.perf_counter()
        self._bg = asyncio.create_task(self._background())

    async def aclose(self) -> None:
        """Refuse new frames, stop asking for a first plan, stop the background (no re-plan
        or probe starts now: a renewal would only hold up the release), let the frames in flight
        end (at most CLOSE_FRAMES_S: a device part ends on the device, an upload under way gets
        its answer), stop the re-planner, release the lease. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None:
            self._starting.cancel()
            # let it end first: a request it cut off is noted, so the release below waits for it
            await asyncio.wait([self._starting])
        if self._bg is not None:
            await stop_task(self._bg)
        if not self._idle.is_set():
            try:
                await timebox.within(self._idle.wait(), CLOSE_FRAMES_S)
            except TimeoutError:
                log.warning("closing with %d frame(s) still in flight after %g s", self._inflight, CLOSE_FRAMES_S)
        if self.sensor is not None:
            await self.sensor.aclose()
        if self.replanner is not None:
            await self.replanner.aclose()
        await self.source.aclose()

    @property
    def plan(self) -> Plan:
        """The plan in use now: Device-Only once the current plan's lease has lapsed
        (`Replanner.in_force`), even while a re-plan is in flight."""
        if self.replanner is None:
            raise RuntimeError("the runtime has no plan yet: await start() first")
        return self.replanner.in_force()

    @property
    def plans(self) -> list[Plan]:
        """The plans put in use, oldest first (the most recent ones)."""
        return list(self.replanner.plans) if self.replanner is not None else []

    @property
    def events(self) -> list[str]:
        return list(self.replanner.events) if self.replanner is not None else []

    def _on_plan(self, plan: Plan) -> None:
        if plan.edge_worker is not None:
            self._gate.worker_named()
        if self.metrics is not None:
            self.metrics.plan(plan)

    async def _background(self) -> None:
        """Every TICK_S: sensing (which starts its probes and load readings as tasks of their
        own, so a reading queued behind a long frame holds up no lease renewal), then a re-plan
        when one is due. Never stops on an error."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                if self.sensor is not None:
                    await self.sensor.tick()
                if self.replanner is not None:
                    self.replanner.tick()
                if self.metrics is not None:
                    self.metrics.conditions(self.sensing.bandwidth_mbps, self.sensing.device_load)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # sensing must never stop the frames; it is logged and retried
                log.warning("device background task: %s: %s", type(exc).__name__, exc)

    # ---- frames ---------------------------------------------------------------------------------

    async def infer(self, frame: Frame) -> FrameRecord:
        """Classify one frame with the current plan. Never raises for edge trouble; DeviceClosed
        after `aclose`."""
        if self._closed:
            raise DeviceClosed("the device runtime is closed")
        plan = self.plan
        index = next(self._counter)
        t_start = time.perf_counter()
        attrs = {otel.ATTR_MODEL: self.graph.model, otel.ATTR_CUT: plan.cut, otel.ATTR_PREDICTED_MS: plan.predicted_ms}
        with self.tracing.span(otel.FRAME, attrs) as span:
            out = await self._tracked(self._frame_path.execute(plan, frame.x, index, t_start))
            rec = self._record(plan, frame, index, t_start, out, span.context)
            span.set_attributes(
                {
                    otel.ATTR_EXIT: rec.exit,
                    otel.ATTR_WHERE: rec.where,
                    otel.ATTR_BYTES_SENT: rec.bytes_sent,
                    otel.ATTR_MEASURED_MS: rec.measured_ms,
                }
            )
        self.records.append(rec)
        self.frames_done += 1
        if self.metrics is not None:
            self.metrics.frame(rec)
        log_frame(rec)
        return rec

    async def _tracked(self, work: Awaitable[Outcome]) -> Outcome:
        """`work` (a frame's execution) counted in flight, so that `aclose` lets it end. O(1)."""
        self._inflight += 1
        self._idle.clear()
        try:
            return await work
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    def _record(self, plan: Plan, frame: Frame, index: int, t_start: float, out: Outcome, ctx: Any) -> FrameRecord:
        pred_class = int(torch.as_tensor(out.logits).reshape(1, -1).argmax(dim=1)[0])
        return FrameRecord(
            index=index,
            plan_id=plan.plan_id,
            exit=out.exit,
            device_nodes=out.device_nodes,
            bytes_sent=out.bytes_sent,
            where=out.where,
            predicted_ms=plan.predicted_ms,
            measured_ms=(time.perf_counter() - t_start) * 1000.0,
            device_ms=out.device_ms,
            pred_class=pred_class,
            label=frame.label,
            correct=None if frame.label is None else pred_class == int(frame.label),
            edge_queue_ms=out.edge_queue_ms,
            edge_compute_ms=out.edge_compute_ms,
            error=out.error,
            rate_mbps=self.rate_mbps,
            slowdown=self.slowdown,
            bandwidth_est_mbps=round(self.sensing.bandwidth_mbps, 4),
            device_load=round(self.sensing.device_load, 3),
            started_at=t_start - self.started_at,
            source=frame.source,
            trace_id=ctx.trace_id if self.tracing.enabled and ctx is not None else None,
            plan_exit=plan.exit,
        )

    # ---- streams --------------------------------------------------------------------------------

    async def run(
        self,
        frames: Iterable[Frame] | AsyncIterable[Frame],
        progress: Callable[[FrameRecord], None] | None = None,
        keep: bool = True,
    ) -> list[FrameRecord]:
        """Classify a stream of frames; the records in frame order (none with `keep` false,
        for endless sources: `progress`, `records`, metrics and logs still see each frame).
        Sequential under light load; pipelined under heavy load (at most `max_inflight` in
        flight, released at the frame rate when one is required)."""
        self.plan  # noqa: B018 -- refuses before start()
        if self.config.requirements.pipelined:
            return await self._pipelined(frames, progress, keep)
        out = []
        async for frame in _aiter(frames):
            rec = await self.infer(frame)
            if keep:
                out.append(rec)
            if progress is not None:
                progress(rec)
        return out

    async def _pipelined(
        self,
        frames: Iterable[Frame] | AsyncIterable[Frame],
        progress: Callable[[FrameRecord], None] | None,
        keep: bool,
    ) -> list[FrameRecord]:
        """Frames released at the frame rate (none: as fast as slots free up), at most
        `max_inflight` in flight; the records in frame order (with `keep`). A frame that failed
        ends the stream at the next release (`_raise_failed` over the frames in flight, so each
        release costs O(max_inflight), however long the stream)."""
        slots = asyncio.Semaphore(self.config.max_inflight)
        rate = self.config.requirements.frame_rate
        period = 1.0 / rate if rate else 0.0
        kept: list[asyncio.Task[FrameRecord]] = []  # every frame's task, in order (keep only)
        inflight: set[asyncio.Task[FrameRecord]] = set()  # running, or failed and not yet raised
        t0 = time.monotonic()

        async def one(frame: Frame) -> FrameRecord:
            try:
                rec = await self.infer(frame)
            finally:
                slots.release()
            if progress is not None:
                progress(rec)
            return rec

        def answered(task: asyncio.Task[FrameRecord]) -> None:
            if task.cancelled() or task.exception() is None:  # a failed one stays for `_raise_failed`
                inflight.discard(task)

        try:
            async for i, frame in _enumerate(_aiter(frames)):
                delay = t0 + i * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                _raise_failed(inflight)  # a failed frame (e.g. `progress` writing to a closed pipe) ends the stream now
                task = asyncio.create_task(one(frame))
                task.add_done_callback(answered)
                inflight.add(task)
                if keep:
                    kept.append(task)
            if not keep:
                await asyncio.gather(*inflight)
                return []
            return list(await asyncio.gather(*kept))
        finally:
            for t in list(inflight):
                t.cancel()


def _raise_failed(tasks: Iterable[asyncio.Task[FrameRecord]]) -> None:
    """Raise the error of a frame task that failed (an endless stream would otherwise never
    reach the `gather` that reports it). O(tasks)."""
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


async def _enumerate(items: AsyncIterator[Frame]) -> AsyncIterator[tuple[int, Frame]]:
    i = 0
    async for item in items:
        yield i, item
        i += 1
