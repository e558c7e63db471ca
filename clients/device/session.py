"""Assembling a live device: the way in of `dapdee device run` and `dapdee up`.

`open_device(settings)` is an async context manager yielding a started `DeviceRuntime`. In
order, so no frame starts before the profile and the first plan are ready:

1. the planner answers (`GET /healthz`), unless the plan is fixed;
2. the model is loaded (a spec, an artifact, or a name whose spec the planner's graph records —
   only `zoo:` specs, so the planner never picks code this device imports);
3. the device profile is loaded or measured (`profile.device_profile`);
4. the planner's worker list is read (it decides where the token may go);
5. the link is probed (round trips, probe pairs) and the per-request CPU cost measured;
6. the profile is published (`profile.publish_profile`, with `meta.device_request_ms`);
7. the runtime gets its first plan and starts.

Everything it opened is closed on the way out. Benchmarks and tests may build a
`DeviceRuntime` directly from parts (a fixed plan, emulated compute) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dapdee.client import AsyncPlannerClient, ClientError, RequestError
from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.device.compute import TorchCompute, emulation_clock
from dapdee.device.config import PlannerConfig, RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.metrics import DeviceMetrics
from dapdee.device.plan_source import FixedPlanSource, PlannerPlanSource, PlanSource, listed_workers
from dapdee.device.plans import device_only_plan, plan_from_json
from dapdee.device.probe import LinkProber, Sensor
from dapdee.device.profile import device_profile, publish_profile
from dapdee.device.progressive import confidence_graph, require_thresholds, with_heads
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import ComputeLoadMonitor, Sensing
from dapdee.device.types import DeviceError
from dapdee.models import LoadedModel, ModelError, load_model
from dapdee.netem import ShapedUplink
from dapdee.web.otel import NO_TRACING, Tracing

log = logging.getLogger("dapdee.device")


@dataclass(frozen=True)
class DeviceSettings:
    """What a live device needs. `planner` None: no planner (a fixed `plan_json` with `edge_url`,
    or Device-Only). `model` is a spec or a name the planner knows; `weights` an artifact.
    `rate_mbps` shapes the uplink (None: a real network) with `rtt_ms` added per request;
    `slowdown` is the emulated K. `device_load` fixes the load (None: measured, `load_source`
    proc | compute). `profile_path` caches the device profile. `device_only`: the Device-Only
    baseline (no planner, no edge). `token`: the device token the edge workers get (None: the
    planner's `token`, if any), with or without a planner."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    planner: PlannerConfig | None = None
    model: str = ""
    weights: str | None = None
    slowdown: float = 1.0
    rate_mbps: float | None = None
    rtt_ms: float = 0.0
    device_load: float | None = None
    load_source: str = "proc"
    profile_path: str | None = None
    profile_repeats: int = 10
    edge_url: str | None = None
    plan_json: Any = None
    device_only: bool = False
    bandwidth_prior_mbps: float = 1.0
    probe_rounds: int = 3
    token: str | None = None


async def _model_from_planner(planner: AsyncPlannerClient, name: str) -> LoadedModel:
    """The model a bare name stands for: the planner's stored graph's `zoo:` spec and input."""
    try:
        stored = await planner.get_model(name)
    except ClientError as exc:
        if getattr(exc, "status", None) == 404:
            raise DeviceError(
                f"planner {planner.base_url} has no model {name!r}; give a spec "
                "(zoo:NAME?opt=v, package.module:factory) or --weights ARTIFACT"
            ) from None
        raise DeviceError(f"planner: {exc}") from None
    spec = stored.graph.meta.get("spec")
    if not isinstance(spec, str) or not spec:
        raise ModelError(f"model {name!r}: the planner's graph does not record its spec; give --model SPEC")
    if not spec.startswith("zoo:"):
        raise ModelError(
            f"model {name!r}: the planner's graph names spec {spec!r}, which would import code on this device; "
            "give --model SPEC yourself if you trust it"
        )
    if stored.graph.input.dtype == "uint8":
        raise ModelError(
            f"model {name!r} takes raw uint8 frames (an artifact's graph): give --weights ARTIFACT, "
            "the artifact the edge serves"
        )
    log.warning("model %s: built from the planner's spec %s without --weights: untrained weights", name, spec)
    return await asyncio.to_thread(load_model, spec, tuple(stored.graph.input.shape), None, name)


async def load_device_model(planner: AsyncPlannerClient | None, model: str, weights: str | None) -> LoadedModel:
    """Load the model: an artifact (its manifest pins the spec; `model` may name it), a spec
    (`zoo:…`, `pkg.mod:fn`), or a bare name the planner knows."""
    if weights and ":" not in model:
        return await asyncio.to_thread(load_model, "", None, weights, model or None)
    if ":" in model:
        return await asyncio.to_thread(load_model, model, None, weights)
    if not model:
        raise ModelError("give --model (zoo:NAME?…, package.module:factory or a model name) or --weights")
    if planner is None:
        raise ModelError(f"model {model!r}: a bare name needs a planner that knows it; give a spec or --weights")
    return await _model_from_planner(planner, model)


async def _check_planner(planner: AsyncPlannerClient) -> None:
    try:
        await planner.healthz()
    except ClientError as exc:
        raise DeviceError(f"cannot reach the planner at {planner.base_url} ({exc})") from None


async def _wait_for_worker(trust: WorkerTrust, model: str, wait_s: float) -> str | None:
    """A worker serving `model` (the user's, else one the planner lists), waiting up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            await trust.refresh(force=True, strict=True)
        except ClientError as exc:
            raise DeviceError(f"planner: {exc}") from None
        urls = trust.serving(model)
        if urls or time.monotonic() >= deadline:
            return urls[0] if urls else None
        await asyncio.sleep(0.3)


@dataclass
class _Parts:
    """What a session opened, to close on the way out."""

    planner: AsyncPlannerClient | None = None
    admin: AsyncPlannerClient | None = None
    edge: EdgeLink | None = None
    compute: TorchCompute | None = None

    async def aclose(self) -> None:
        if self.compute is not None:
            self.compute.close()
        if self.edge is not None:
            await self.edge.aclose()
        for client in {id(c): c for c in (self.admin, self.planner) if c is not None}.values():
            await client.aclose()


def _clients(cfg: PlannerConfig, parts: _Parts) -> AsyncPlannerClient:
    """The planner client (device token) and, with admin rights, the admin client: the admin
    token's, or the same client when no token is configured at all (an open planner)."""
    try:
        parts.planner = AsyncPlannerClient(cfg.url, cfg.token, timeout=cfg.timeout_s)
        if cfg.admin_token:
            parts.admin = AsyncPlannerClient(cfg.url, cfg.admin_token, timeout=cfg.timeout_s)
        elif cfg.token is None:
            parts.admin = parts.planner
    except RequestError as exc:
        raise DeviceError(f"planner URL {cfg.url!r} is not valid ({exc})") from None
    return parts.planner


def _edge(s: DeviceSettings, graph: CostGraph, trust: WorkerTrust, sensing: Sensing) -> EdgeLink:
    shaper = ShapedUplink(s.rate_mbps, rtt_ms=s.rtt_ms) if s.rate_mbps is not None else None
    # a fixed plan (--plan) has no planner, yet its worker may still ask for the device token
    token = s.token if s.token is not None else s.planner.token if s.planner is not None else None
    backoff = Backoff(s.runtime.backoff_initial_s, s.runtime.backoff_max_s)
    return EdgeLink(graph, trust, sensing, token, shaper, s.runtime.fp16, backoff)


async def _source(
    s: DeviceSettings, parts: _Parts, graph: CostGraph, sensing: Sensing, tracing: Tracing
) -> tuple[PlanSource, float | None]:
    """The plan source, after probing the link and publishing the profile (planner sources)."""
    cond = Conditions(sensing.bandwidth_mbps, sensing.request_rtt_ms, sensing.device_load, 0.0)
    if s.device_only or s.planner is None:
        if s.device_only or s.plan_json is None:
            plan = device_only_plan(graph, cond)
        else:
            plan = plan_from_json(s.plan_json, graph, cond, s.edge_url)
        if s.runtime.requirements.confidence_exits and plan.progressive is None:
            plan = with_heads(plan, graph, cond)  # the flag asks for confidence exits: the pinned cut gets them
        return FixedPlanSource(plan), None
    assert parts.planner is not None and parts.edge is not None
    cfg = s.planner
    url = await _wait_for_worker(parts.edge.trust, graph.model, cfg.worker_wait_s)
    request_ms = await LinkProber(parts.edge, graph, sensing).startup(url, s.probe_rounds) if url else None
    meta: dict[str, Any] = {"tier": cfg.tier, "slowdown": s.slowdown}
    if request_ms is not None:
        meta["device_request_ms"] = round(request_ms, 4)

    async def publish() -> None:
        await publish_profile(parts.planner, parts.admin, graph, cfg.tier, meta)  # type: ignore[arg-type]

    await publish()
    source = PlannerPlanSource(
        parts.planner, graph, s.runtime.requirements, cfg.tier, cfg.device_id, cfg.ready_timeout_s,
        cfg.worker_wait_s, reregister=publish, tracing=tracing, avoid=parts.edge.resting_urls,
    )  # fmt: skip
    return source, request_ms


@contextlib.asynccontextmanager
async def open_device(
    s: DeviceSettings,
    loaded: LoadedModel | None = None,
    graph: CostGraph | None = None,
    metrics: DeviceMetrics | None = None,
    tracing: Tracing = NO_TRACING,
) -> AsyncIterator[DeviceRuntime]:
    """A started runtime for `s` (see the module docstring); `loaded` and `graph` (the device
    profile) skip loading and profiling when given. Raises DeviceError / ModelError (one-line
    ValueErrors) for what the user must fix."""
    parts = _Parts()
    runtime: DeviceRuntime | None = None
    try:
        planner = _clients(s.planner, parts) if s.planner is not None and not s.device_only else None
        if planner is not None:
            await _check_planner(planner)
        loaded = loaded or await load_device_model(planner, s.model, s.weights)
        if s.runtime.requirements.confidence_exits:
            require_thresholds(loaded.graph)  # before any profiling
        if graph is None:
            graph = await asyncio.to_thread(device_profile, loaded, s.slowdown, s.profile_path, s.profile_repeats)
        if s.runtime.requirements.confidence_exits:
            graph = confidence_graph(loaded, graph)
        runtime = await _start(s, parts, loaded, graph, metrics, tracing)
        yield runtime
    finally:
        if runtime is not None:
            await runtime.aclose()
        await parts.aclose()


async def _start(
    s: DeviceSettings,
    parts: _Parts,
    loaded: LoadedModel,
    graph: CostGraph,
    metrics: DeviceMetrics | None,
    tracing: Tracing,
) -> DeviceRuntime:
    stretch = s.slowdown if emulation_clock() is time.thread_time else 1.0
    sensing = Sensing(s.bandwidth_prior_mbps, s.device_load, s.load_source, stretch)
    explicit = [s.edge_url] if s.edge_url else []
    fetch = functools.partial(listed_workers, parts.planner) if parts.planner is not None else None
    refresh_s = s.planner.workers_refresh_s if s.planner is not None else 5.0
    trust = WorkerTrust(fetch, explicit, refresh_s)
    if not s.device_only:
        parts.edge = _edge(s, graph, trust, sensing)
    source, _ = await _source(s, parts, graph, sensing, tracing)
    parts.compute = TorchCompute(loaded, s.slowdown, observer=sensing.compute_observer())
    runtime = DeviceRuntime(
        graph, parts.compute, source, config=s.runtime, sensing=sensing, edge=parts.edge, edge_url=s.edge_url,
        metrics=metrics, tracing=tracing, slowdown=s.slowdown, rate_mbps=s.rate_mbps,
    )  # fmt: skip
    if parts.edge is not None and source.replans:
        prober = LinkProber(parts.edge, graph, sensing)
        runtime.sensor = Sensor(prober, sensing, s.runtime, lambda: _probe_target(runtime, trust), parts.compute.spin)
    elif sensing.monitor is not None:
        runtime.sensor = Sensor(None, sensing, s.runtime, lambda: None, parts.compute.spin)
    await _first_load_reading(sensing, parts.compute)
    try:
        await runtime.start()
    except BaseException:  # cut short (Ctrl-C, SIGTERM, no plan): the lease a first plan took ends now
        await runtime.aclose()
        raise
    return runtime


def _probe_target(runtime: DeviceRuntime, trust: WorkerTrust) -> str | None:
    """The worker to probe: the one in use, else one serving the model."""
    url = runtime.edge_url or runtime.plan.edge_worker
    if url:
        return url
    serving = trust.serving(runtime.graph.model)
    return serving[0] if serving else None


async def _first_load_reading(sensing: Sensing, compute: TorchCompute) -> None:
    """A load reading before the first plan (0.3 s of /proc/stat, or a few calibration spins
    on the compute thread)."""
    mon = sensing.monitor
    if mon is None:
        return
    if isinstance(mon, ComputeLoadMonitor):
        for _ in range(5):
            await compute.spin(mon.calibrate)
            await asyncio.sleep(0.01)
    else:
        await asyncio.sleep(0.3)
        mon.sample()
