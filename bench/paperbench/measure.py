"""Measuring one fixed plan through the device runtime.

A plan under test (any planner's plan JSON) runs on a `DeviceRuntime` built from its public
parts: the plan checked against the device's own graph and pinned (`FixedPlanSource`, so the
runtime never re-plans), the real device compute stretched K x (`TorchCompute`), the edge link
to the bench's edge worker over a token-bucket uplink (`EdgeLink` with a `ShapedUplink`), and
fixed zero load with no background probes. Sequential frames measure latency (light load); a
pipelined stream offered at a frame rate measures throughput (heavy load).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from dapdee.bench.edge_worker import proc_cpu_s
from dapdee.bench.paperbench.options import MAX_INFLIGHT
from dapdee.bench.paperbench.stats import med, pct, steady_throughput
from dapdee.bench.paperbench.systems import Device, System
from dapdee.costmodel import Conditions
from dapdee.device.compute import TorchCompute
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import EdgeLink, WorkerTrust
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.plans import plan_from_json
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import Frame, FrameRecord
from dapdee.netem import ShapedUplink


@dataclass(frozen=True)
class Run:
    """One measurement of a plan: `n` frames at uplink `rate` Mbit/s, stopping after `cap_s`
    seconds. `frame_rate` given: a pipelined stream offered at that rate (heavy load), else
    sequential frames. `min_s`: keep streaming past `n` frames until that many seconds passed
    (a round of a fast plan then spans enough time to average out scheduler hiccups). `offset`
    picks the first test frame; `warmup` runs one unrecorded frame first; `inflight` fixes the
    frames in flight (None: `inflight_for`)."""

    rate: float
    n: int
    cap_s: float
    frame_rate: float | None = None
    offset: int = 0
    warmup: bool = True
    min_s: float = 0.0
    desc: str = ""
    inflight: int | None = None


def inflight_for(plan: dict[str, Any], run: Run, base: int) -> int:
    """Frames in flight: `base`, or under a frame rate enough to keep the three-stage pipeline
    full: twice its predicted depth (Little's law: latency / bottleneck; a frame's latency in a
    saturated stream is longer than alone, as the edge batches and frames queue for the link),
    + 2, at most MAX_INFLIGHT."""
    if not run.frame_rate:
        return base
    pred = plan["predicted"]
    fill = 2 * math.ceil(pred["latency_ms"] / max(pred["bottleneck_ms"], 1e-6)) + 2
    return min(MAX_INFLIGHT, max(base, fill))


@contextlib.asynccontextmanager
async def fixed_runtime(
    system: System, dev: Device, plan: dict[str, Any], run: Run, inflight: int
) -> AsyncIterator[DeviceRuntime]:
    """A started runtime that runs `plan` and nothing else (see the module docstring)."""
    svc, o = system.services, system.o
    sensing = Sensing(run.rate, fixed_load=0.0)
    shaper = ShapedUplink(run.rate, rtt_ms=o.rtt_ms)
    edge = EdgeLink(dev.graph, WorkerTrust(None, [svc.edge_url]), sensing, svc.token, shaper)
    compute = TorchCompute(dev.loaded, dev.slowdown)
    pinned = plan_from_json(plan, dev.graph, Conditions(run.rate, dev.request_rtt_ms), svc.edge_url)
    floor = max(5000.0, 3 * run.cap_s * 1000.0)
    mode = "throughput" if run.frame_rate else "latency"
    config = RuntimeConfig(Requirements(mode=mode, frame_rate=run.frame_rate), inflight,
                           timeout_floor_ms=floor, timeout_max_ms=max(floor, 60000.0))  # fmt: skip
    runtime = DeviceRuntime(dev.graph, compute, FixedPlanSource(pinned), config=config, sensing=sensing,
                            edge=edge, edge_url=svc.edge_url, slowdown=dev.slowdown, rate_mbps=run.rate)  # fmt: skip
    try:
        async with runtime:
            yield runtime
    finally:
        compute.close()
        await edge.aclose()


def frame_budget(plan: dict[str, Any], run: Run, inflight: int) -> tuple[int, bool]:
    """(frames to run, capped): `run.n`, at least two pipeline-fulls under a frame rate, cut to
    what the predicted per-frame time fits into the cap (so a stream leaves no long tail in
    flight), at least 3 frames in a stream and 1 otherwise."""
    pred = plan["predicted"]
    per_frame_ms = pred["bottleneck_ms"] if run.frame_rate else pred["latency_ms"]
    fit = int(run.cap_s * 1000 / max(per_frame_ms, 1e-6))
    n = max(run.n, 2 * inflight) if run.frame_rate else run.n
    return max(min(n, fit), 3 if run.frame_rate else 1), fit < n


async def _frames(frames: list[Frame], run: Run, n: int, state: dict[str, bool]) -> AsyncIterator[Frame]:
    """`n` test frames from `run.offset` (more until `run.min_s`), stopping at the cap."""
    t0 = time.monotonic()
    i = 0
    while i < n or time.monotonic() - t0 < run.min_s:
        if i > 0 and time.monotonic() - t0 > run.cap_s:
            state["capped"] = i < n
            return
        yield frames[(run.offset + i) % len(frames)]
        i += 1


def summarize(
    records: list[FrameRecord], n: int, capped: bool, inflight: int, wall_s: float, cpu_s: tuple[float, float]
) -> dict[str, Any]:
    """One round's numbers: per-frame latencies, median, p90, steady-state throughput, where
    frames finished, errors, accuracy on labelled frames, exits taken, and the CPU ms per frame
    of the device's and the edge worker's processes over the round (`cpu_s`: their CPU seconds).
    O(frames)."""
    meas = [r.measured_ms for r in records]
    starts = [r.started_at for r in records]
    ends = [r.started_at + r.measured_ms / 1000.0 for r in records]
    labelled = [r for r in records if r.correct is not None]
    edge = [r for r in records if r.where == "edge"]
    return {
        "frames": len(records),
        "requested": n,
        "capped": capped,
        "measured_ms": [round(x, 3) for x in meas],
        "median_ms": med(meas),
        "p90_ms": pct(meas, 0.9),
        "throughput_fps": steady_throughput(starts, ends, inflight),
        "wall_s": wall_s,
        "where": {w: sum(r.where == w for r in records) for w in ("edge", "local", "fallback")},
        "errors": sorted({r.error for r in records if r.error}),
        "correct": sum(bool(r.correct) for r in labelled),
        "labelled": len(labelled),
        "exits": sorted({r.exit for r in records}),
        "max_inflight": inflight,
        # the terms of one frame, for checking the cost model's stages one by one
        "device_ms": med([r.device_ms for r in records]),
        "edge_compute_ms": med([r.edge_compute_ms for r in edge if r.edge_compute_ms is not None]),
        "edge_queue_ms": med([r.edge_queue_ms for r in edge if r.edge_queue_ms is not None]),
        # what a frame took of each process's CPU: the cost model's per-request costs at work
        "device_cpu_ms": 1000.0 * cpu_s[0] / len(records) if records else None,
        "edge_cpu_ms": 1000.0 * cpu_s[1] / len(records) if records and math.isfinite(cpu_s[1]) else None,
    }


async def run_fixed_plan(system: System, dev: Device, plan: dict[str, Any], run: Run) -> dict[str, Any]:
    """Run `plan` as `run` says on a fresh runtime of device `dev`; the round's numbers
    (`summarize`). O(frames)."""
    frames = system.frames[dev.model]
    inflight = run.inflight or inflight_for(plan, run, system.o.max_inflight)
    n, capped = frame_budget(plan, run, inflight)
    state = {"capped": capped}
    async with fixed_runtime(system, dev, plan, run, inflight) as rt:
        if run.warmup and plan["predicted"]["latency_ms"] < run.cap_s * 1000 / 5:
            await rt.infer(frames[(run.offset + len(frames) - 1) % len(frames)])
        edge_pid = system.services.edge_pid
        t0, device0, edge0 = time.monotonic(), time.process_time(), proc_cpu_s(edge_pid)
        with tqdm(total=n, desc=run.desc[:40], file=sys.stderr, leave=False, disable=system.o.quiet) as bar:
            records = await rt.run(_frames(frames, run, n, state), progress=lambda r: bar.update(1))
        wall = time.monotonic() - t0
        cpu_s = (time.process_time() - device0, proc_cpu_s(edge_pid) - edge0)
    return summarize(records, n, state["capped"], inflight, wall, cpu_s)
