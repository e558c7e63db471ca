"""The device's own profile: measured (and calibrated) or loaded, and made known to the planner.

- `measure_device_profile`: `dapdee.profiler.profile_model(loaded, "device", slowdown=K)`
  (medians of isolated node runs), calibrated to how the device really runs a frame (each
  exit's whole run through the K x emulation; the emulated device idles between frames, so
  caches are cold and isolated medians alone under-predict a frame, by a per-frame constant
  as well as a factor).
- `device_profile`: the profile cached at a path when it matches the model, else measured and
  written there (`dapdee.profiler.load_or_measure`).
- `publish_profile`: make sure the planner has the model and this tier's device profile. The
  profile (with `meta.device_request_ms`, the device's measured per-request CPU cost, cost
  model v2) is uploaded only with admin rights; otherwise it must already be there.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dapdee.client import ApiError, AsyncPlannerClient, ClientError
from dapdee.costgraph import CostGraph
from dapdee.device.compute import emulation_clock
from dapdee.device.types import DeviceError
from dapdee.models import LoadedModel
from dapdee.netem import emulate_slowdown
from dapdee.profiler import load_or_measure, profile_model

log = logging.getLogger("dapdee.device.profile")

CALIBRATION_CLAMP = (0.5, 4.0)


def _exit_runs_ms(loaded: LoadedModel, slowdown: float, runs: int) -> dict[str, list[float]]:
    """`runs` times (ms) of each exit's whole device run (every node it needs) through the K x
    emulation, the exits interleaved round by round (so a drifting host load touches them
    alike), after 2 unrecorded rounds. O((runs + 2) x one forward per exit)."""
    x = loaded.example_input().zero_()
    nodes = {e.name: e.node for e in loaded.graph.exits}
    samples: dict[str, list[float]] = {name: [] for name in nodes}

    def run(node: str) -> Any:
        with torch.inference_mode():
            return loaded.executor.compute({loaded.input_name: x}, [node])

    for i in range(runs + 2):
        for name, node in nodes.items():
            t0 = time.perf_counter()
            emulate_slowdown(lambda n=node: run(n), slowdown, emulation_clock())
            if i >= 2:  # the first rounds pay for lazy initialisation
                samples[name].append((time.perf_counter() - t0) * 1000.0)
    return samples


def fit_calibration(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(r, c) of the line T = r·S + c through (summed node medians S, measured run T) points:
    least squares with c >= 0 (else the line through the origin), one distinct S giving c = 0;
    an r outside CALIBRATION_CLAMP is clamped and c refitted (>= 0). O(len(points))."""
    pts = [(s, t) for s, t in points if s > 0]
    if not pts:
        return 1.0, 0.0
    ms, mt = statistics.fmean(s for s, _ in pts), statistics.fmean(t for _, t in pts)
    var = sum((s - ms) ** 2 for s, _ in pts)
    if var > 0:
        r = sum((s - ms) * (t - mt) for s, t in pts) / var
        c = mt - r * ms
        if c < 0:  # through the origin
            r, c = sum(s * t for s, t in pts) / sum(s * s for s, _ in pts), 0.0
    else:
        r, c = mt / ms, 0.0
    lo, hi = CALIBRATION_CLAMP
    if not lo <= r <= hi:
        r = min(hi, max(lo, r))
        c = max(0.0, mt - r * ms)
    return r, c


def measure_device_profile(loaded: LoadedModel, slowdown: float, repeats: int = 10, runs: int = 11) -> CostGraph:
    """This device's profile at slowdown K: per-node medians (`profile_model`), calibrated to
    how the device really runs: each exit's whole run through the K x emulation (median of
    `runs`) against its summed node medians gives a line T = r·S + c (`fit_calibration`);
    every node is scaled by r and the per-frame constant c (the emulated device idles between
    frames and starts each one cold) goes to the nodes that read the input (split evenly: every
    non-empty device part runs them). Recorded as meta `calibration` (r) and
    `calibration_constant_ms` (c). Uses the torch threads as they are set. O(repeats x one
    forward pass + runs x one forward per exit)."""
    g = profile_model(loaded, "device", slowdown=slowdown, repeats=repeats, warmup=2)
    runs_ms = _exit_runs_ms(loaded, slowdown, runs)
    points = [
        (sum(g.node(n).device_ms or 0.0 for n in g.ancestors(e.node)), statistics.median(runs_ms[e.name]))
        for e in g.exits
    ]
    r, c = fit_calibration(points)
    sources = [n.name for n in g.nodes if all(u == g.input.name for u in n.inputs)]
    extra = c / len(sources) if sources else 0.0
    meta = {
        **g.meta.get("device", {}),
        "calibration": round(r, 4),
        "calibration_constant_ms": round(c, 4),
        "calibration_method": f"median of {runs} runs of each exit through the K x emulation against its sum "
        "of isolated node medians, fitted as r x sum + c: every node scaled by r, c added to the input's "
        "consumers",
    }
    timings = {n.name: (n.device_ms or 0.0) * r + (extra if n.name in sources else 0.0) for n in g.nodes}
    return g.with_timings("device", timings, meta)


def device_profile(loaded: LoadedModel, slowdown: float, path: str | Path | None, repeats: int = 10) -> CostGraph:
    """The profile cached at `path` when it matches the model (ValueError naming the file when
    it does not), else measured (`measure_device_profile`) and written there."""
    return load_or_measure(
        loaded, "device", path, lambda: measure_device_profile(loaded, slowdown, repeats), strict=True
    )


async def _ensure_model(planner: AsyncPlannerClient, admin: AsyncPlannerClient | None, graph: CostGraph) -> None:
    """The planner holds `graph`'s model with the same structure (uploaded with admin rights
    when it has none)."""
    try:
        stored = await planner.get_model(graph.model)
    except ApiError as exc:
        if exc.status != 404:
            raise DeviceError(f"planner: GET /models/{graph.model}: HTTP {exc.status}: {exc.detail}") from None
        if admin is None:
            raise DeviceError(
                f"the planner has no model {graph.model!r}: start an edge worker serving it (it registers the "
                "model) or give the admin token (--admin-token, DAPDEE_ADMIN_TOKEN) to upload it"
            ) from None
        await admin.put_graph(graph)
        return
    if stored.graph.structure_key() != graph.structure_key():
        raise DeviceError(
            f"the planner's model {graph.model!r} has another structure than the local one "
            "(different spec, input shape or artifact?)"
        )


async def publish_profile(
    planner: AsyncPlannerClient,
    admin: AsyncPlannerClient | None,
    graph: CostGraph,
    tier: str,
    meta: dict[str, Any],
) -> None:
    """Make sure the planner holds `graph`'s model and the device profile `tier`: uploaded
    (timings of `graph`, its profiler meta updated with `meta`) with `admin`; without it the
    profile must exist already. DeviceError naming the fix otherwise."""
    try:
        await _ensure_model(planner, admin, graph)
        if admin is not None:
            await admin.upload_profile(graph, tier, "device", meta)
            return
        profiles = await planner.list_profiles(graph.model)
    except ClientError as exc:
        raise DeviceError(f"planner: {exc}") from None
    stored = profiles.profiles.get(tier)
    if stored is None or stored.kind != "device":
        raise DeviceError(
            f"the planner has no device profile {tier!r} for model {graph.model!r} and this device has no admin "
            "token to upload it: give --admin-token (DAPDEE_ADMIN_TOKEN), or upload it with "
            f"`dapdee profile ... --tier device` and PUT /models/{graph.model}/profiles/{tier}"
        )
    if "device_request_ms" in meta:
        log.info("device_request_ms %.3f measured, not published (no admin token)", meta["device_request_ms"])
