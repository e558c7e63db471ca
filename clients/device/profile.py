"""The device's own profile: measured (and calibrated) or loaded, and made known to the planner.

- `measure_device_profile`: `dapdee.profiler.profile_model(loaded, "device", slowdown=K)`
  (medians of isolated node runs), calibrated to how the device really runs a frame (whole
  frames through the K x emulation; the emulated device idles between frames, so caches are
  cold and isolated medians alone under-predict a frame).
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


def _whole_frame_ms(loaded: LoadedModel, slowdown: float, runs: int) -> list[float]:
    """`runs` whole-frame (final exit) times through the K x emulation, after 2 unrecorded runs."""
    node = loaded.exit_node(None)
    x = loaded.example_input().zero_()

    def fn() -> Any:
        with torch.inference_mode():
            return loaded.executor.compute({loaded.input_name: x}, [node])

    samples = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        emulate_slowdown(fn, slowdown, emulation_clock())
        if i >= 2:  # the first runs pay for lazy initialisation
            samples.append((time.perf_counter() - t0) * 1000.0)
    return samples


def measure_device_profile(loaded: LoadedModel, slowdown: float, repeats: int = 10, runs: int = 15) -> CostGraph:
    """This device's profile at slowdown K: per-node medians (`profile_model`), every node then
    scaled by the median of `runs` whole-frame runs over the summed node medians of the final
    exit (clamped to [0.5, 4]; recorded as meta `calibration`). Uses the torch threads as they
    are set. O((repeats + runs) x one forward pass)."""
    g = profile_model(loaded, "device", slowdown=slowdown, repeats=repeats, warmup=2)
    summed = sum(g.node(n).device_ms or 0.0 for n in g.ancestors(loaded.exit_node(None)))
    if summed <= 0:
        return g
    ratio = statistics.median(_whole_frame_ms(loaded, slowdown, runs)) / summed
    ratio = min(CALIBRATION_CLAMP[1], max(CALIBRATION_CLAMP[0], ratio))
    meta = {
        **g.meta.get("device", {}),
        "calibration": round(ratio, 4),
        "calibration_method": f"median of {runs} whole-frame runs (final exit) through the K x emulation "
        "/ sum of isolated node medians; every node scaled by it",
    }
    return g.with_timings("device", {n.name: (n.device_ms or 0.0) * ratio for n in g.nodes}, meta)


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
