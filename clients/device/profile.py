"""The device's own profile: measured (and calibrated) or loaded, and made known to the planner.

- `measure_device_profile`: `dapdee.profiler.profile_model(loaded, "device", slowdown=K)`
  (medians of isolated node runs), calibrated to how the device really runs a frame (whole
  device parts run through the K x emulation; the emulated device idles between frames, so
  caches are cold and isolated medians alone under-predict a frame, most at its first nodes:
  `dapdee.calibration`); with several passes spread in time, the median one.
- `device_profile`: the profile cached at a path when it matches the model, else measured and
  written there (`dapdee.profiler.load_or_measure`).
- `publish_profile`: make sure the planner has the model and this tier's device profile. The
  profile (with `meta.device_request_ms`, the device's measured per-request CPU cost, cost
  model v2) is uploaded only with admin rights; otherwise it must already be there.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dapdee.calibration import calibrated_timings, checkpoints, fit_monotone, part_sums
from dapdee.client import ApiError, AsyncPlannerClient, ClientError, StoredGraph
from dapdee.costgraph import CostGraph
from dapdee.device.compute import emulation_clock
from dapdee.device.plan_source import retry_delay
from dapdee.device.types import DeviceError
from dapdee.models import LoadedModel
from dapdee.netem import emulate_slowdown
from dapdee.profiler import load_or_measure, profile_model

log = logging.getLogger("dapdee.device.profile")

MODEL_WAIT_S = 30.0  # how long a device waits for a planner that cannot read its model now


def _part_runs_ms(loaded: LoadedModel, nodes: list[str], slowdown: float, runs: int) -> dict[str, list[float]]:
    """`runs` times (ms) of each node's whole device part (the node and every node it needs)
    through the K x emulation, the parts interleaved round by round (so a drifting host load
    touches them alike), after 2 unrecorded rounds. O((runs + 2) x one forward per node)."""
    x = loaded.example_input().zero_()
    samples: dict[str, list[float]] = {node: [] for node in nodes}

    def run(node: str) -> Any:
        with torch.inference_mode():
            return loaded.executor.compute({loaded.input_name: x}, [node])

    for i in range(runs + 2):
        for node in nodes:
            t0 = time.perf_counter()
            emulate_slowdown(lambda n=node: run(n), slowdown, emulation_clock())
            if i >= 2:  # the first rounds pay for lazy initialisation
                samples[node].append((time.perf_counter() - t0) * 1000.0)
    return samples


def measure_device_profile(
    loaded: LoadedModel,
    slowdown: float,
    repeats: int = 10,
    runs: int = 11,
    max_cuts: int = 8,
    passes: int = 1,
    pause_s: float = 1.0,
) -> CostGraph:
    """This device's profile at slowdown K: `passes` whole profiles (`_measure_pass`), `pause_s`
    apart, of which the one whose node timings sum to the median is kept (meta `passes` and
    `pass_totals_ms`, every pass's sum, when more than one). On a host whose speed drifts (a
    shared VM here moved a third within seconds) one pass may be caught in a slow or a fast
    spell; the median pass is the host's typical speed, and stays one real measurement,
    consistent with its calibration meta. O(passes x one pass + (passes − 1) x pause_s)."""
    if passes < 1:
        raise ValueError(f"passes: must be >= 1, got {passes!r}")
    graphs = []
    for i in range(passes):
        if i:
            time.sleep(pause_s)
        graphs.append(_measure_pass(loaded, slowdown, repeats, runs, max_cuts))
    if passes == 1:
        return graphs[0]
    totals = [sum(n.device_ms or 0.0 for n in g.nodes) for g in graphs]
    kept = graphs[sorted(range(passes), key=totals.__getitem__)[passes // 2]]
    meta = {**kept.meta.get("device", {}), "passes": passes, "pass_totals_ms": [round(t, 4) for t in totals]}
    return replace(kept, meta={**kept.meta, "device": meta})


def _measure_pass(loaded: LoadedModel, slowdown: float, repeats: int, runs: int, max_cuts: int) -> CostGraph:
    """One pass of the profile at slowdown K: per-node medians (`profile_model`), calibrated to
    how the device really runs a frame (`dapdee.calibration`): the whole device parts of every
    exit and of up to `max_cuts` single-tensor cuts, each run through the K x emulation (median
    of `runs`), fitted as a non-decreasing piecewise-linear F of their summed node medians, and
    every node re-priced through F. Recorded as meta `calibration` (F's knots, [S, T] in ms) and
    `calibration_points` (each measured part: node, S, T). Uses the torch threads as they are
    set. O(repeats x one forward pass + runs x one forward per measured part)."""
    g = profile_model(loaded, "device", slowdown=slowdown, repeats=repeats, warmup=2)
    nodes = checkpoints(g, max_cuts)
    runs_ms = _part_runs_ms(loaded, nodes, slowdown, runs)
    sums = part_sums(g)
    points = [(sums[v], statistics.median(runs_ms[v])) for v in nodes]
    fit = fit_monotone(points)
    meta = {
        **g.meta.get("device", {}),
        "calibration": fit.to_list(),
        "calibration_points": [[v, round(s, 4), round(t, 4)] for v, (s, t) in zip(nodes, points, strict=True)],
        "calibration_method": f"median of {runs} runs through the K x emulation of the device part of every "
        "exit and single-tensor cut, fitted as a non-decreasing piecewise-linear F of the part's sum of "
        "isolated node medians; each node priced F(S) - F(S - t) (dapdee.calibration)",
    }
    return g.with_timings("device", calibrated_timings(g, fit, sums=sums), meta)


def device_profile(
    loaded: LoadedModel, slowdown: float, path: str | Path | None, repeats: int = 10, passes: int = 1
) -> CostGraph:
    """The profile cached at `path` when it matches the model (ValueError naming the file when
    it does not) and was measured at this slowdown and torch's thread count now, else measured
    (`measure_device_profile`, `passes` of it) and written there."""
    measure = lambda: measure_device_profile(loaded, slowdown, repeats, passes=passes)  # noqa: E731
    threads = torch.get_num_threads()
    return load_or_measure(loaded, "device", path, measure, strict=True, slowdown=slowdown, threads=threads)


async def _stored_model(planner: AsyncPlannerClient, name: str, wait_s: float = MODEL_WAIT_S) -> StoredGraph:
    """GET /models/{name}, asked again while the planner answers 404 with `Retry-After` (a
    replica that cannot read the model while its Redis is away: the model may exist, so it must
    not be uploaded), waiting as the first plan does (`retry_delay`) up to `wait_s` in all;
    ApiError otherwise, or once `wait_s` is spent."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await planner.get_model(name)
        except ApiError as exc:
            left = deadline - time.monotonic()
            if exc.status != 404 or exc.retry_after_s is None or left <= 0:
                raise
            log.info("planner cannot read model %r now (%s); asking again", name, exc.detail)
            await asyncio.sleep(retry_delay(exc.retry_after_s, left))


async def _ensure_model(planner: AsyncPlannerClient, admin: AsyncPlannerClient | None, graph: CostGraph) -> None:
    """The planner holds `graph`'s model with the same structure (uploaded with admin rights
    when it has none; a 404 with `Retry-After` is waited out, `_stored_model`)."""
    try:
        stored = await _stored_model(planner, graph.model)
    except ApiError as exc:
        if exc.status == 404 and exc.retry_after_s is not None:
            raise DeviceError(
                f"planner: GET /models/{graph.model}: it could not read the model for {MODEL_WAIT_S:g} s "
                f"(HTTP 404 with Retry-After: {exc.detail})"
            ) from None
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
