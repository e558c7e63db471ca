"""Registration with the planner: the cost graph, this tier's edge timings, and heartbeats.

Profiles come from a cache file when one matches the model's structure, else from
`dapdee.profiler.profile_model` (then cached): `dapdee.profiler.load_or_measure`; the worker
answers ready only once that is done. The planner being away never stops the worker: every
call is retried with backoff and failures are only logged, and a round that fails in any other
way is logged with its traceback and retried the same. Planner calls go through the SDK
(`dapdee.client.AsyncPlannerClient`), without a `traceparent` (the loop runs outside any
request: the planner starts each call's trace, and its sampler decides whether to record it).

Tokens: registering graphs and profiles is an admin action (`DAPDEE_ADMIN_TOKEN`), heartbeats
are the worker role's (`DAPDEE_WORKER_TOKEN`); `DAPDEE_API_TOKEN` stands in for either. With
only a worker token the worker heartbeats and logs that registration needs the admin token;
with no token at all it talks to an open planner without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import statistics
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from dapdee.client import ApiError, AsyncPlannerClient, ClientError
from dapdee.costgraph import CostGraph
from dapdee.edge_worker.deps import ModelEntry, WorkerState
from dapdee.edge_worker.request_cost import calibrated, measure_frame_ms, measure_request_ms
from dapdee.profiler import load_or_measure, profile_model

log = logging.getLogger("dapdee.edge.registration")
T = TypeVar("T")
RETRY_FIRST_S = 0.5  # first back-off after a failed round (doubling up to heartbeat_s)
LEAVE_TIMEOUT_S = 2.0  # the departing heartbeat at shutdown waits at most this


def profile_path(cache_dir: str, model: str, tier: str) -> Path:
    """`{cache_dir}/{model}.{tier}.edge.json` (model and tier are validated names, not paths)."""
    return Path(cache_dir) / f"{model}.{tier}.edge.json"


def profile_entry(state: WorkerState, entry: ModelEntry, stop: threading.Event | None = None) -> CostGraph:
    """The model's graph with `edge_ms` filled: from the cache when it was measured for this
    model at the worker's slowdown and thread count (`settings.threads`, which `dapdee serve
    edge` sets for the process, else torch's current one), else measured at those (and cached). Setting `stop`
    ends a measurement with ProfileStopped before its next node run. Runs in a worker thread
    (blocking). O(repeats x one forward pass) when measuring."""
    s = state.settings
    path = profile_path(s.profile_cache, entry.name, s.tier) if s.profile_cache else None
    threads = s.threads or torch.get_num_threads()

    def measure() -> CostGraph:
        log.info("model %s: profiling edge timings (%d repeats, %d threads)", entry.name, s.profile_repeats, threads)
        return profile_model(
            entry.loaded,
            tier="edge",
            slowdown=s.slowdown,
            threads=threads,
            repeats=s.profile_repeats,
            warmup=s.profile_warmup,
            stop=stop,
        )

    return load_or_measure(entry.loaded, "edge", path, measure, slowdown=s.slowdown, threads=threads)


def heartbeat_body(state: WorkerState, public_url: str) -> dict[str, Any]:
    """The worker's heartbeat: URL, models, tier, load, queue and its capacities:
    `nominal_ms_per_s` (1000 per pool thread) and `capacity_ms_per_s` (profiled milliseconds
    the leases may book per second: the nominal one divided by the measured ratio of what its
    requests take to what they are priced at, `capacity`)."""
    nominal = 1000.0 * state.settings.workers
    return {
        "url": public_url,
        "models": sorted(state.models),
        "tier": state.settings.tier,
        "load": state.batcher.load(),
        "inflight": state.inflight,
        "queue_depth": state.batcher.queued,
        "capacity_ms_per_s": round(state.capacity.capacity(nominal), 3),
        "nominal_ms_per_s": nominal,
    }


@dataclass(frozen=True)
class PlannerAuth:
    """The token of each kind of planner call: `admin` for graphs and profiles, `worker` for
    heartbeats and the reads that check registration (None: no token sent). `register` is false
    when graphs and profiles must not be uploaded (tokens configured, but no admin one)."""

    register: bool
    admin: str | None
    worker: str | None

    @classmethod
    def of(cls, admin: str | None, worker: str | None, any_role: str | None) -> PlannerAuth:
        """From the configured tokens; an open setup (no token at all) sends none."""
        admin, worker = admin or any_role, worker or any_role
        if not admin and not worker:
            return cls(True, None, None)
        return cls(bool(admin), admin, worker or admin)


def planner_auth(state: WorkerState) -> PlannerAuth:
    s = state.settings

    def raw(secret: Any) -> str | None:
        return secret.get_secret_value() if secret is not None else None

    return PlannerAuth.of(raw(s.admin_token), raw(s.worker_token), raw(s.api_token))


async def _call(what: str, op: Awaitable[T]) -> T | None:
    """`op`'s result, or None (logged) when the planner refused it or could not be reached."""
    try:
        return await op
    except ApiError as exc:
        hint = ""
        if exc.status == 422 and "capacity_ms_per_s" in exc.body:
            hint = " (this planner does not know the heartbeat field capacity_ms_per_s yet)"
        log.warning("planner %s answered %d: %s%s", what, exc.status, exc.detail[:200], hint)
    except ClientError as exc:
        log.warning("planner %s failed: %s", what, exc)
    return None


async def _still_registered(planner: AsyncPlannerClient, model: str, tier: str, with_profile: bool) -> bool:
    """False only when the planner answers that it lacks the model (or this tier's edge
    profile); errors count as registered (the next heartbeat asks again)."""
    try:
        profiles = await planner.list_profiles(model)
    except ApiError as exc:
        return exc.status != 404
    except ClientError:
        return True
    return not with_profile or tier in profiles.profiles


async def stoppable(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args, stop)` in a worker thread, `stop` a fresh threading.Event set as soon as the
    await ends, however: when the awaiting task is cancelled (shutdown), `fn` sees it at its next
    check and returns, so the thread does not run on (the event loop's shutdown waits for it).
    O(1) plus `fn`."""
    stop = threading.Event()
    try:
        return await asyncio.to_thread(fn, *args, stop)
    finally:
        stop.set()


async def _edge_graphs(state: WorkerState) -> dict[str, CostGraph]:
    """Each model's graph with this tier's edge timings (profiled or cached) and its measured
    per-request cost (`meta.edge.edge_request_ms`) when profiling is on; a profiling failure
    registers the graph without timings rather than stopping. Cancelling it stops the
    measurement in progress (`stoppable`)."""
    graphs: dict[str, CostGraph] = {}
    for name, entry in state.models.items():
        graphs[name] = entry.graph
        if not state.settings.profile:
            continue
        try:
            graphs[name] = entry.graph = await stoppable(profile_entry, state, entry)
            state.registration["profiled"].append(name)
        except Exception as exc:  # a profiling failure must not take the worker down
            why = f"{type(exc).__name__}: {exc}"
            log.error("model %s: profiling failed (%s); registering without edge timings", name, why)
            continue
        if state.settings.request_samples and state.settings.self_url:
            try:
                graphs[name] = entry.graph = await _with_request_cost(state, entry, state.settings.self_url)
            except Exception:  # nor may measuring its request cost: the profile goes uncalibrated
                log.exception("model %s: measuring the per-request cost failed; registering the profile as is", name)
    return graphs


async def _with_request_cost(state: WorkerState, entry: ModelEntry, self_url: str) -> CostGraph:
    """The entry's graph with its edge timings calibrated to the whole frames this worker
    computes (`calibrated`) and `meta.edge.edge_request_ms` measured on this worker, each the
    median of `request_passes` bursts (`median_of_passes`; each left as it was when its measurement
    fails: the planner then uses the graph's own overheads)."""
    s = state.settings
    token = next((t.get_secret_value() for t in (s.device_token, s.api_token) if t is not None), None)
    frame = functools.partial(measure_frame_ms, self_url, token, entry, s.request_samples)
    frame_ms, frame_passes = await median_of_passes(frame, s.request_passes, s.request_pass_pause_s)
    if frame_ms is not None:
        entry.graph = calibrated(entry.graph, frame_ms)
        log.info("model %s: %.3f ms of compute per whole frame (passes %s); profile calibrated",
                 entry.name, frame_ms, frame_passes)  # fmt: skip
    # after the calibration: it subtracts the exit node's calibrated time from each request's
    request = functools.partial(measure_request_ms, self_url, token, entry, s.request_samples, slowdown=s.slowdown)
    ms, request_passes = await median_of_passes(request, s.request_passes, s.request_pass_pause_s)
    if ms is None:
        return entry.graph
    log.info("model %s: %.3f ms per request outside node compute (cost model v2; passes %s)",
             entry.name, ms, request_passes)  # fmt: skip
    edge_meta = {**entry.graph.meta.get("edge", {}), "edge_request_ms": round(ms, 4)}
    if s.request_passes > 1:
        edge_meta |= {"request_passes": s.request_passes, "frame_ms_passes": frame_passes,
                      "edge_request_ms_passes": request_passes}  # fmt: skip
    return replace(entry.graph, meta={**entry.graph.meta, "edge": edge_meta})


async def median_of_passes(
    measure: Callable[..., float | None], passes: int, pause_s: float
) -> tuple[float | None, list[float]]:
    """The median (the lower of two middles: a value one pass measured) of `passes` runs of
    `measure(stop)` in a worker thread, `pause_s` apart, over those that measured something,
    and those values rounded (in pass order); None when none did. A pass that fails (None) is
    not repeated. O(passes x one measurement + (passes − 1) x pause_s)."""
    found: list[float] = []
    for i in range(passes):
        if i:
            await asyncio.sleep(pause_s)
        value = await stoppable(measure)
        if value is not None:
            found.append(value)
    return (statistics.median_low(found) if found else None), [round(v, 4) for v in found]


async def _register(planner: AsyncPlannerClient, tier: str, graph: CostGraph, public_url: str) -> bool:
    """PUT the model's graph, then this tier's edge profile (when timed). True when both took."""
    name = graph.model
    ok = await _call(f"PUT /models/{name}", planner.put_graph(graph)) is not None
    if ok and graph.has_timings("edge"):
        upload = planner.upload_profile(graph, tier, "edge", {"tier": tier, "worker": public_url})
        ok = await _call(f"PUT /models/{name}/profiles/{tier}", upload) is not None
    if ok:
        log.info("model %s registered with planner %s (tier %s)", name, planner.base_url, tier)
    return ok


async def run_registration(state: WorkerState, public_url: str) -> None:
    """Profile (or load) each model's edge timings (the worker is not ready until then), then
    register graph and profile with the planner until it accepts them (admin token) and
    heartbeat every `heartbeat_s` seconds (worker token), until cancelled. Nothing else ends
    it: a round that fails, whatever the error, is logged and retried with back-off."""
    s = state.settings
    assert s.planner_url is not None
    state.registration.update({"planner": s.planner_url, "registered": [], "heartbeats": 0, "profiled": []})
    try:
        graphs = await _edge_graphs(state)
    finally:
        state.profiling = False  # profiled, or registering without timings: ready either way
    state.capacity.reset()  # its own measuring requests were priced before it knew their cost
    state.batcher.reset_load()  # ... and are no load: the first heartbeat's `load` starts now
    async with _Registrar(state, public_url, graphs) as registrar:
        await _rounds(registrar.round, s.heartbeat_s, f"planner {s.planner_url}: registration round")


async def announce_departure(state: WorkerState, public_url: str) -> bool:
    """At shutdown, one last heartbeat that lists no model: the planner then plans no device onto
    this worker, and devices leasing it move off at their next plan, where it would otherwise
    keep sending them here until its last heartbeat's TTL ran out. A heartbeat, not a call of
    its own: a planner of any version takes it, and a worker that starts again under the same
    URL is back with its next heartbeat. Sent only once the worker has heartbeated; it waits at
    most LEAVE_TIMEOUT_S (the planner timeout when shorter), and a failure is logged and leaves
    the TTL to end the worker. True when the planner took it. One request."""
    s = state.settings
    if s.planner_url is None or not state.registration.get("heartbeats"):
        return False
    beat = {**heartbeat_body(state, public_url), "models": []}
    timeout = min(s.planner_timeout_s, LEAVE_TIMEOUT_S)
    async with AsyncPlannerClient(s.planner_url, planner_auth(state).worker, timeout=timeout) as planner:
        took = await _call("POST /workers/heartbeat (leaving)", planner.heartbeat(beat)) is not None
    if took:
        log.info("planner %s: told it this worker is leaving", s.planner_url)
    return took


async def _rounds(step: Callable[[], Awaitable[bool]], period_s: float, what: str) -> None:
    """Await `step()` until cancelled: `period_s` after a round that succeeded (True), else after
    a back-off of RETRY_FIRST_S doubling up to `period_s`. A round that raises is logged as
    "`what` failed", with its traceback, and counts as failed: the loop must outlive any
    surprise (as `dapdee.web.tasks.run_every` does, with back-off instead of a fixed period).
    O(1) per round plus the step."""
    delay = RETRY_FIRST_S
    while True:
        try:
            ok = await step()
        except Exception:
            log.exception("%s failed; retrying in %.1f s", what, min(delay, period_s))
            ok = False
        if ok:
            delay = RETRY_FIRST_S
            await asyncio.sleep(period_s)
        else:
            await asyncio.sleep(min(delay, period_s))
            delay = min(delay * 2, period_s)


class _Registrar:
    """The planner side of `run_registration`: its SDK clients (opened by the first round that
    gets that far, closed on exit) and the graphs the planner does not hold yet."""

    def __init__(self, state: WorkerState, public_url: str, graphs: dict[str, CostGraph]) -> None:
        self.state, self.public_url, self.graphs = state, public_url, graphs
        self.auth = planner_auth(state)
        self.pending = dict(graphs) if self.auth.register else {}
        self.worker: AsyncPlannerClient | None = None  # heartbeats and registration checks
        self.admin: AsyncPlannerClient | None = None  # graphs and profiles
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> _Registrar:
        if not self.auth.register:
            log.warning(
                "planner %s: registering models and edge profiles needs DAPDEE_ADMIN_TOKEN; "
                "heartbeating only (the models must already be on the planner)",
                self.state.settings.planner_url,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _open(self) -> AsyncPlannerClient:
        """The worker-token client, and the admin one when registering; each opened once.
        Raises RequestError for a token or setting the SDK refuses."""
        s = self.state.settings
        assert s.planner_url is not None
        if self.worker is None:
            client = AsyncPlannerClient(s.planner_url, self.auth.worker, timeout=s.planner_timeout_s)
            self.worker = await self._stack.enter_async_context(client)
        if self.auth.register and self.admin is None:
            client = AsyncPlannerClient(s.planner_url, self.auth.admin, timeout=s.planner_timeout_s)
            self.admin = await self._stack.enter_async_context(client)
        return self.worker

    async def round(self) -> bool:
        """Register the pending graphs, heartbeat, and once the heartbeat is taken with nothing
        pending, check that the planner still holds every model (a restarted planner without
        Redis forgot them: they are pending again). True when all of that took; planner
        refusals and outages are logged by `_call`, anything else raises."""
        worker = await self._open()
        s, reg = self.state.settings, self.state.registration
        for name, graph in list(self.pending.items()):
            if self.admin is not None and await _register(self.admin, s.tier, graph, self.public_url):
                self.pending.pop(name)
                if name not in reg["registered"]:  # registered again: a planner lost it
                    reg["registered"].append(name)
        beat = heartbeat_body(self.state, self.public_url)
        hb_ok = await _call("POST /workers/heartbeat", worker.heartbeat(beat)) is not None
        if hb_ok:
            reg["heartbeats"] += 1
        if hb_ok and not self.pending and self.admin is not None:
            for name, graph in self.graphs.items():
                if not await _still_registered(worker, name, s.tier, graph.has_timings("edge")):
                    log.warning("planner %s lost model %s; registering it again", worker.base_url, name)
                    self.pending[name] = graph
        return hb_ok and not self.pending
