"""Adaptation: the device runtime's own loop (its bandwidth sensing, probes and re-planning,
`open_device` against the services) on a stream while the shaped uplink changes phase by phase,
compared per phase with that phase's optimum plan measured as a fixed plan.

In throughput mode the optimum plan is measured twice: with the live runtime's frames in flight
(`runtime_inflight`, what the target compares against: the experiment asks whether the loop
finds and switches to the right plans, and the window is a setting both then share), and with
the pipeline filled (`measure.inflight_for`, up to `MAX_INFLIGHT` in flight; reported for information). The
live runtime keeps a fixed window: one as deep as a fast plan's pipeline leaves that many
frames queued on the link when it slows down (an A/B in the results: medians of 600-690 ms
after a fall to CAT1, against 175 ms with 8)."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from tqdm import tqdm

from dapdee.bench.paperbench.experiments import Bench, measure_one
from dapdee.bench.paperbench.measure import Run
from dapdee.bench.paperbench.options import Options
from dapdee.bench.paperbench.plans import plan_key, plan_summary
from dapdee.bench.paperbench.stats import med
from dapdee.bench.paperbench.systems import Device, System
from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.session import DeviceSettings, open_device
from dapdee.device.types import Frame, FrameRecord
from dapdee.netem import parse_network

Phase = tuple[str, float, float]  # network, Mbit/s, seconds


async def choose(s: System, candidates: list[str], rates: list[Phase], mode: str) -> tuple[int, str, str, dict]:
    """The model and mode whose optimal plans differ most across the phases (latency mode
    preferred; throughput mode when no model's latency optimum changes): (distinct plans,
    model, mode, the optimum plan per phase)."""
    best: tuple[int, str, str, dict] | None = None
    for md in ("latency", "throughput") if mode == "auto" else (mode,):
        for m in candidates:
            dev = await s.device(m)
            plans = {n: await s.plan(s.request(dev, r, mode=md)) for n, r, _ in rates}
            distinct = len({plan_key(p) for p in plans.values()})
            if best is None or distinct > best[0]:
                best = (distinct, m, md, plans)
        if best is not None and best[0] > 1:
            break
    assert best is not None
    return best


def runtime_inflight(o: Options) -> int:
    """Frames the live runtime keeps in flight under heavy load."""
    return 2 * o.max_inflight


async def optima(s: System, dev: Device, plans: dict[str, dict], rates: list[Phase], pipelined: bool) -> dict:
    """Each phase's optimum plan measured as a fixed plan: with the runtime's frames in flight,
    and (pipelined) again with the pipeline filled (`filled_*`; module docstring)."""
    out = {}
    for n, r, _ in rates:
        frames = max(s.o.fig_frames, 8 if pipelined else 1)
        run = Run(r, frames, s.o.plan_cap_s, frame_rate=1e4 if pipelined else None, desc=f"adapt opt {n}",
                  inflight=runtime_inflight(s.o) if pipelined else None)  # fmt: skip
        meas = await measure_one(s, dev, plans[n], run)
        filled = await measure_one(s, dev, plans[n], replace(run, inflight=None)) if pipelined else None
        out[n] = {"plan": plan_summary(plans[n], s.graphs[dev.model]), "median_ms": meas["median_ms"],
                  "p90_ms": meas["p90_ms"], "throughput_fps": meas["throughput_fps"],
                  "filled_median_ms": filled and filled["median_ms"],
                  "filled_throughput_fps": filled and filled["throughput_fps"]}  # fmt: skip
    return out


def settings(s: System, dev: Device, mode: str, rate: float) -> DeviceSettings:
    """A live device of the services: planner-backed, re-planning every 2 s at most, probing an
    idle link after 0.5 s, its uplink shaped at `rate` to begin with."""
    o, svc = s.o, s.services
    runtime = RuntimeConfig(Requirements(mode=mode), runtime_inflight(o), plan_max_age_s=2.0, probe_idle_s=0.5)
    return DeviceSettings(
        runtime=runtime, planner=PlannerConfig(svc.planner_url, dev.tier, svc.token, svc.token),
        model=dev.model, slowdown=dev.slowdown, rate_mbps=rate, rtt_ms=o.rtt_ms, device_load=0.0,
        bandwidth_prior_mbps=rate, probe_rounds=o.probe_rounds,
    )  # fmt: skip


async def _phased(rt: DeviceRuntime, frames: list[Frame], rates: list[Phase], switches: list) -> AsyncIterator[Frame]:
    """Frames for the phases' total length, switching the shaped rate at each phase's start."""
    ends = list(itertools.accumulate(t for _, _, t in rates))
    assert rt.edge is not None and rt.edge.shaper is not None
    t0, phase, i = time.monotonic(), 0, 0
    while (el := time.monotonic() - t0) < ends[-1]:
        j = next(k for k, end in enumerate(ends) if el < end)
        if j != phase:
            phase = j
            rt.edge.shaper.set_rate(rates[j][1])
            switches.append({"t_s": el, "network": rates[j][0], "rate_mbps": rates[j][1]})
        yield frames[i % len(frames)]
        i += 1


def frame_row(r: FrameRecord, t0: float) -> dict[str, Any]:
    """What the adaptation plot and tables use of one frame (`t_s` from the stream's start)."""
    return {"t_s": r.started_at - t0, "measured_ms": r.measured_ms, "predicted_ms": r.predicted_ms,
            "rate_mbps": r.rate_mbps, "bandwidth_est_mbps": r.bandwidth_est_mbps, "exit": r.exit,
            "where": r.where, "device_nodes": r.device_nodes, "bytes": r.bytes_sent, "plan_id": r.plan_id}  # fmt: skip


async def stream(s: System, dev: Device, mode: str, rates: list[Phase]) -> dict[str, Any]:
    """The live device's stream through the phases: per-frame rows, rate switches, plans, events."""
    switches: list[dict[str, Any]] = []
    async with open_device(settings(s, dev, mode, rates[0][1]), dev.loaded, dev.graph) as rt:
        t0 = time.perf_counter() - rt.started_at  # records' started_at count from rt.started_at
        with tqdm(desc=f"adapt {dev.model} ({mode})", file=sys.stderr, leave=False, disable=s.o.quiet) as bar:
            records = await rt.run(_phased(rt, s.frames[dev.model], rates, switches), lambda r: bar.update(1))
        plans, events = len(rt.plans), rt.events[-50:]
    rows = [frame_row(r, t0) for r in records]
    return {"frames": rows, "switches": switches, "plans": plans, "events": events}


def per_phase(rows: list[dict[str, Any]], rates: list[Phase], optimum: dict[str, Any]) -> dict[str, Any]:
    """Per phase: frames, the second half's median latency and completed frames per second, the
    plans used then, and the phase's optimum plan with its measured numbers."""
    out, start = {}, 0.0
    for (n, _, t), end in zip(rates, itertools.accumulate(t for _, _, t in rates), strict=True):
        half = start + t / 2
        late = [f for f in rows if half <= f["t_s"] < end]
        done = [f for f in rows if start <= f["t_s"] < end and half <= f["t_s"] + f["measured_ms"] / 1000 < end]
        opt = optimum[n]
        out[n] = {
            "frames": sum(start <= f["t_s"] < end for f in rows),
            "median_ms_second_half": med([f["measured_ms"] for f in late]),
            "throughput_fps_second_half": len(done) / (t / 2) if t else None,
            "optimum_median_ms": opt["median_ms"],
            "optimum_throughput_fps": opt["throughput_fps"],
            "optimum_filled_median_ms": opt.get("filled_median_ms"),
            "optimum_filled_throughput_fps": opt.get("filled_throughput_fps"),
            "optimum_predicted_ms": opt["plan"]["predicted"]["latency_ms"],
            "optimum_plan": f"{opt['plan']['exit']} {opt['plan']['device_nodes']}/{opt['plan']['exit_nodes']}",
            "plans_used": sorted({f"{f['exit']} {f['device_nodes']}" for f in late}),
        }
        start = end
    return out


async def adaptation(b: Bench, candidates: list[str]) -> dict[str, Any]:
    """The adaptation cell (see the module docstring). Its key holds everything it measures
    with beyond `Bench.key`'s: the phases, the frames each phase's optimum plan is measured with
    (`fig_frames`), the live device's frames in flight and the mode."""
    o, phases = b.o, b.o.adapt_phases
    key = b.key("adapt", ",".join(candidates), ",".join(f"{n}:{t:g}" for n, t in phases), f"n{o.fig_frames}")
    key += f"|inflight{runtime_inflight(o)}+filled" + ("" if o.adapt_mode == "auto" else f"|{o.adapt_mode}")

    async def fn(s: System) -> dict[str, Any]:
        rates = [(n, parse_network(n).rate_mbps, t) for n, t in phases]
        distinct, m, mode, plans = await choose(s, candidates, rates, o.adapt_mode)
        dev = await s.device(m)
        optimum = await optima(s, dev, plans, rates, mode == "throughput")
        run = await stream(s, dev, mode, rates)
        return {"model": m, "mode": mode, "distinct_optimal_plans": distinct,
                "phases": [{"network": n, "rate_mbps": r, "seconds": t} for n, r, t in rates],
                "optimum": optimum, "per_phase": per_phase(run["frames"], rates, optimum), **run}  # fmt: skip

    return await b.cell(key, fn)
