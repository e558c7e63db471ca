"""The planner's state, shared by every replica through Redis (key layout: `dapdee.planner.keys`),
behind per-replica caches. `Store` wires the parts together and runs the refresh loop:

- `model_cache.ModelCache`: models and profiles, read lazily (start-up loads none), a bounded LRU.
- `model_writes.ModelWriter`: versioned writes (a Lua compare-and-set on each model's version),
  and the queue of writes made while Redis is unavailable, replayed only where their base
  version is still current.
- `workers.WorkerRegistry`: heartbeats and live workers; expiry by Redis's clock.
- `planmaps.PlanMapCache`: plan maps, built off the event loop under a time budget, bounded in
  Redis by count, bytes and TTL.

Caps (DAPDEE_MAX_MODELS, _MAX_PROFILES_PER_MODEL, _MAX_WORKERS, _MAX_PENDING_WRITES) raise
`CapacityExceeded`; a write based on another version raises `VersionConflict`. Redis failures
never reach a client: reads answer from process memory and writes are queued (`stored:
"pending"`); they are counted in `dapdee_planner_cache_errors_total{op}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from dapdee.costgraph import CostGraph
from dapdee.planner.config import Settings
from dapdee.planner.errors import (
    CapacityExceeded,
    MissingTimings,
    ModelUnreachable,
    RedisUnavailable,
    VersionConflict,
)
from dapdee.planner.fleet import Fleet
from dapdee.planner.keys import GRAPH_TIMINGS, Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.model_writes import ModelWriter
from dapdee.planner.modelstate import ModelState, Profile, PutResult
from dapdee.planner.plan_choice import Candidate
from dapdee.planner.plan_runner import PlanRunner
from dapdee.planner.planmaps import PlanMapCache, merged_graph
from dapdee.planner.rebalancing import Rebalancer
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.workers import CapacityBelowLeases, Worker, WorkerRegistry
from dapdee.planner.writes import Outbox
from dapdee.planning import PlanMap
from dapdee.web.tasks import finish_or_stop, run_every

__all__ = [
    "GRAPH_TIMINGS",
    "CapacityExceeded",
    "MissingTimings",
    "ModelState",
    "Profile",
    "PutResult",
    "RedisUnavailable",
    "Store",
    "VersionConflict",
    "Worker",
    "merged_graph",
]

log = logging.getLogger("dapdee.planner")

CLOSE_LOOP_S = 3.0  # close(): a refresh in progress may finish within this
CLOSE_DRAIN_S = 3.0  # close(): queued writes are replayed within this, then logged as lost


class Store:
    """Models, profiles, plan maps and workers of one planner replica (module docstring).

    Life cycle: `await start()` (creates the Redis client, warns unless Redis evicts nothing,
    reads the worker registry, starts the refresh loop; loads no models), `await close()` (stops
    the loop, replays queued writes within a bounded time, logging any it could not write,
    closes the client)."""

    def __init__(self, settings: Settings, metrics: PlannerMetrics, runner: PlanRunner | None = None) -> None:
        """`runner` computes fleet plan choices over capped plan maps off the event loop (None:
        inline)."""
        self.settings = settings
        self.metrics = metrics
        self.keys = Keys.for_prefix(settings.key_prefix)
        self.link = RedisLink(settings, metrics)
        outbox = Outbox(settings.max_pending_writes)  # writes made while Redis is unavailable
        self.model_cache = ModelCache(settings, metrics, self.link, self.keys, outbox.has)
        self.model_writer = ModelWriter(settings, metrics, self.link, self.keys, self.model_cache, outbox)
        self.registry = WorkerRegistry(settings, metrics, self.link, self.keys)
        self.planmaps = PlanMapCache(settings, metrics, self.link, self.keys)
        lower = self.registry.lower_capacity
        self.fleet = Fleet(
            settings, metrics, self.link, self.keys, self.candidates_for, self.live_workers, lower, outbox.has, runner
        )
        self.rebalancer = Rebalancer(self.fleet, self.keys)
        self.started = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        metrics.pending_writes.set_function(lambda: self.model_writer.pending_count)

    # ---- state the HTTP layer reads ------------------------------------------------------------
    @property
    def redis_state(self) -> str:
        """disabled | up | down."""
        return self.link.state

    @property
    def pending_count(self) -> int:
        """Writes queued while Redis is unavailable (a model whose replayed writes are not yet
        re-read from Redis counts as one more)."""
        return self.model_writer.pending_count

    @property
    def models(self) -> dict[str, ModelState]:
        """The models cached in this replica (an LRU; not every stored model)."""
        return self.model_cache.models

    def k_planmap(self, key: tuple[str, str, str]) -> str:
        """The Redis key of the plan map of (graph hash, device hash, edge hash)."""
        return self.planmaps.redis_key(key)

    # ---- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the Redis client (if a URL is set), read the worker registry and the epoch of
        Redis's state, start the refresh loop. Reads no model: each is read on first use."""
        self.link.connect()
        if self.link.enabled:
            self.metrics.bind_redis(lambda: 1.0 if self.link.state == "up" else 0.0)
        await self.link.check_eviction_policy()
        await self.sync()
        await self.fleet.start()
        await self.rebalancer.start()
        self._task = asyncio.create_task(self._loop(), name="dapdee-planner-refresh")
        self.started = True

    async def close(self) -> None:
        """Stop the refresh loop (a refresh in progress may finish, bounded), replay queued writes
        (bounded; the rest logged at ERROR and counted as lost), close the client."""
        self._stop.set()
        await self.rebalancer.close()
        await self.fleet.close()
        if self._task is not None:
            await finish_or_stop(self._task, CLOSE_LOOP_S)
            self._task = None
        await self.model_writer.drain(CLOSE_DRAIN_S)
        self.planmaps.close()
        await self.link.close()

    async def _loop(self) -> None:
        await run_every(self.settings.refresh_s, self._stop, self.sync, "planner refresh", log)

    async def sync(self) -> None:
        """One refresh: replay queued writes, follow other replicas' model changes, merge the
        worker registry. O(cached models + workers) plus a round trip per changed model."""
        if not self.link.enabled:
            return
        with contextlib.suppress(RedisUnavailable):
            await self.model_writer.sync()
        with contextlib.suppress(RedisUnavailable):
            await self.registry.sync()

    # ---- models and profiles (see model_cache, model_writes) -----------------------------------
    async def get_model(self, name: str) -> ModelState | None:
        """The model (cached, else read from Redis and cached), or None (ModelUnreachable: not
        cached and Redis is away)."""
        return await self.model_cache.get(name)

    async def refresh_model(self, name: str) -> ModelState | None:
        """The model re-read from Redis now (None if Redis cannot say or it is gone there)."""
        return await self.model_cache.refresh(name)

    async def list_models(self) -> dict[str, ModelState]:
        """Every stored model (at most DAPDEE_MAX_MODELS), or the cached ones while Redis is away."""
        return await self.model_cache.list_all()

    async def put_graph(self, graph: CostGraph, expect_version: int | None = None) -> PutResult:
        """Store a model's cost graph (VersionConflict, CapacityExceeded)."""
        return await self.model_writer.put_graph(graph, expect_version)

    async def delete_model(self, name: str, expect_version: int | None = None) -> bool:
        """Forget a model and its profiles, and end its leases (`Fleet.end_model`; with Redis
        away they run out at their expiry); False if unknown (VersionConflict)."""
        if not await self.model_writer.delete_model(name, expect_version):
            return False
        with contextlib.suppress(RedisUnavailable):
            if ended := await self.fleet.end_model(name):
                log.info("model %r deleted: %d lease(s) of it ended", name, ended)
        return True

    async def put_profile(self, name: str, profile: Profile, expect_version: int | None = None) -> PutResult | None:
        """Store one tier's profile; None if the model is unknown (VersionConflict, CapacityExceeded,
        UnknownNodes)."""
        return await self.model_writer.put_profile(name, profile, expect_version)

    async def delete_profile(self, name: str, tier: str, expect_version: int | None = None) -> bool | None:
        """Forget one profile: None if the model is unknown, False if the tier is (VersionConflict)."""
        return await self.model_writer.delete_profile(name, tier, expect_version)

    # ---- plan maps ------------------------------------------------------------------------------
    async def planmap(
        self,
        name: str,
        st: ModelState,
        dev: Profile | None,
        edge: Profile | None,
        edge_hint: str = "",
        progressive: bool = False,
        until: float | None = None,
    ) -> PlanMap:
        """The plan map for these timings (`progressive`: the confidence-exit map): cached, stored,
        or built off the event loop within DAPDEE_PLANMAP_BUILD_BUDGET_S (then possibly not
        exact), waited for until `until` (monotonic; MapBuildPending past it). Raises
        MissingTimings, or ValueError for a progressive map of an uncalibrated model."""
        return await self.planmaps.get(name, st, dev, edge, edge_hint, progressive, until)

    # ---- workers ----------------------------------------------------------------------------------
    async def heartbeat(self, worker: Worker) -> bool:
        """Record a heartbeat; True if Redis has it (CapacityExceeded for a new worker past the cap).
        Where rebalancing is periodic, a heartbeat whose capacity the worker's leases book past
        ρ_max of is recorded together with those leases re-solved for it (`Rebalancer.shed`);
        failing that, as it is (counted as `forced`) unless a newer heartbeat stands by then
        (`_register_refused`), and the rebalance after a capacity drop follows
        (`Rebalancer.note_capacity`, called by the route)."""
        rho = self.settings.rho_max if self.settings.fleet_planning and self.settings.rebalance_s else None
        for _ in range(2):  # again once after waiting for another re-solve of this worker
            try:
                return await self.registry.heartbeat(worker, rho)
            except CapacityBelowLeases as refused:
                refused_at_ms = refused.refused_at_ms
            shed = await self._shed(worker, refused_at_ms)
            if shed:  # registered with its leases, or kept out by a newer heartbeat: read which
                try:
                    await self.registry.sync()
                except RedisUnavailable:
                    self.registry.noted(worker, shared=True)
                return True
            if shed is False:
                break
        return await self._register_refused(worker, refused_at_ms)

    async def _register_refused(self, worker: Worker, refused_at_ms: int) -> bool:
        """The refused heartbeat registered as it is, over its leases (counted as `forced`),
        unless a heartbeat registered or refused since is newer or the worker expired meanwhile:
        then this replica reads what the registry holds instead. True if Redis holds the outcome
        (without Redis the heartbeat is kept here, as any heartbeat then is)."""
        try:
            registered = await self.registry.register_refused(worker, refused_at_ms)
            if not registered:
                log.info("worker %s: a newer heartbeat stands; the refused one is not registered", worker.url)
                await self.registry.sync()
                return True
        except RedisUnavailable:
            self.registry.noted(worker, shared=False)
            return False
        self.metrics.rebalances.labels("forced").inc()
        log.warning("worker %s: %.1f ms/s registered over its leases (not re-solved with it)", worker.url,
                    worker.capacity_ms_per_s)  # fmt: skip
        return True

    async def _shed(self, worker: Worker, refused_at_ms: int) -> bool | None:
        """`Rebalancer.shed`, with any failure a False (the heartbeat is still recorded)."""
        try:
            return await self.rebalancer.shed(worker, self.registry.ttl_ms, refused_at_ms)
        except RedisUnavailable:
            return False
        except Exception:
            log.exception("worker %s: re-solving its leases for the capacity it states failed", worker.url)
            return False

    async def live_workers(self) -> list[Worker]:
        """Live workers, least loaded first, each with `expires_in_s`."""
        return await self.registry.live()

    def pick_worker(self, model: str) -> Worker | None:
        """The least-loaded live worker serving `model`; process memory only."""
        return self.registry.pick(model)

    def serving(self, model: str) -> list[Worker]:
        """Every live worker serving `model`, least loaded first; process memory only."""
        return self.registry.serving(model)

    async def candidates(
        self, name: str, st: ModelState, dev: Profile | None, workers: list[Worker], until: float | None = None
    ) -> list[Candidate]:
        """The workers a device of this model may use, each with its plan map (`timed`).
        MissingTimings when none has its timings. O(workers) map look-ups."""
        return [c async for c in self.timed(name, st, dev, workers, until=until)]

    async def timed(
        self,
        name: str,
        st: ModelState,
        dev: Profile | None,
        workers: list[Worker],
        progressive: bool = False,
        until: float | None = None,
    ) -> AsyncIterator[Candidate]:
        """Those of `workers`, in their order, whose timings are complete, each with its plan map
        (its tier's edge profile; the graph's own edge timings where the tier has none; the
        confidence-exit map with `progressive`), maps waited for until `until` (`planmap`); a
        worker whose timings are missing is left out. Raises the first one's MissingTimings
        when none is left. A map look-up per worker taken."""
        missing: MissingTimings | None = None
        found = False
        for w in workers:
            edge = st.profiles.get(w.tier)
            edge = edge if edge is not None and edge.kind == "edge" else None
            hint = "" if edge is not None else f" and there is no edge profile for tier {w.tier!r} of worker {w.url}"
            try:
                pm = await self.planmap(name, st, dev, edge, hint, progressive=progressive, until=until)
            except MissingTimings as exc:
                missing = missing or exc
                continue
            found = True
            yield Candidate(w, pm)
        if not found and missing is not None:
            raise missing

    async def candidates_for(self, name: str, device_tier: str | None, workers: list[Worker]) -> list[Candidate]:
        """`candidates` by model name and device tier ([] when either is gone: a lease outlived them)."""
        try:
            st = await self.get_model(name)
        except ModelUnreachable:
            return []
        if st is None:
            return []
        dev = st.profiles.get(device_tier) if device_tier is not None else None
        if device_tier is not None and (dev is None or dev.kind != "device"):
            return []
        try:
            return await self.candidates(name, st, dev, list(workers))
        except MissingTimings:
            return []

    def live_worker_count(self) -> int:
        return self.registry.count()
