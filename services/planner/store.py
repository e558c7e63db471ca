"""The planner's state, shared by every replica through Redis (key layout: `dapdee.planner.keys`),
behind per-replica caches. `Store` wires the parts together, runs their life cycle and the
refresh loop, and deletes models (the write, then the end of the model's leases); callers use
the parts themselves:

- `model_cache` (`model_cache.ModelCache`): models and profiles, read lazily (start-up loads
  none), a bounded LRU.
- `model_writer` (`model_writes.ModelWriter`): versioned writes (a Lua compare-and-set on each
  model's version); those made while Redis is unavailable are queued.
- `model_sync` (`model_sync.ModelSync`): the refresh's model part: follows Redis's state (other
  replicas' writes; the models written back if Redis lost them) and replays the queued writes,
  each only where its base version is still current.
- `registry` (`workers.WorkerRegistry`): heartbeats and live workers; expiry by Redis's clock.
- `heartbeats` (`heartbeats.HeartbeatIntake`): a heartbeat registered, with the worker's leases
  re-solved for it when its capacity drops below them.
- `planmaps` (`planmaps.PlanMapCache`): plan maps, built off the event loop under a time budget,
  bounded in Redis by count, bytes and TTL.
- `candidates` (`candidates.CandidateFinder`): the workers a device may plan with, each with its
  plan map.
- `fleet` (`fleet.Fleet`) and `rebalancer` (`rebalancing.Rebalancer`): leases and their
  rebalancing.
- `link` (`redis_link.RedisLink`): the Redis client and whether Redis is up (`link.state`).

Caps (DAPDEE_MAX_MODELS, _MAX_PROFILES_PER_MODEL, _MAX_WORKERS, _MAX_PENDING_WRITES) raise
`CapacityExceeded`; a write based on another version raises `VersionConflict`. Redis failures
never reach a client: reads answer from process memory and writes are queued (`stored:
"pending"`); they are counted in `dapdee_planner_cache_errors_total{op}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from dapdee.planner.candidates import CandidateFinder
from dapdee.planner.config import Settings
from dapdee.planner.errors import CapacityExceeded, MissingTimings, RedisUnavailable, VersionConflict
from dapdee.planner.fleet import Fleet
from dapdee.planner.heartbeats import HeartbeatIntake
from dapdee.planner.keys import GRAPH_TIMINGS, Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.model_sync import ModelSync
from dapdee.planner.model_writes import ModelWriter
from dapdee.planner.modelstate import ModelState, Profile, PutResult
from dapdee.planner.plan_runner import PlanRunner
from dapdee.planner.planmaps import PlanMapCache, merged_graph
from dapdee.planner.rebalancing import Rebalancer
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.workers import Worker, WorkerRegistry
from dapdee.planner.writes import Outbox
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
    """Models, profiles, plan maps, workers and leases of one planner replica: the parts, wired
    (module docstring).

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
        lock, send = self.model_writer.lock, self.model_writer.send  # a refresh and a write never interleave
        self.model_sync = ModelSync(settings, metrics, self.link, self.keys, self.model_cache, outbox, lock, send)
        self.registry = WorkerRegistry(settings, metrics, self.link, self.keys)
        self.planmaps = PlanMapCache(settings, metrics, self.link, self.keys)
        self.candidates = CandidateFinder(self.model_cache, self.planmaps)
        by_name, live, lower = self.candidates.by_name, self.registry.live, self.registry.lower_capacity
        self.fleet = Fleet(settings, metrics, self.link, self.keys, by_name, live, lower, outbox.has, runner)
        self.rebalancer = Rebalancer(self.fleet, self.keys)
        self.heartbeats = HeartbeatIntake(settings, metrics, self.registry, self.rebalancer)
        self.started = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        metrics.pending_writes.set_function(lambda: self.model_sync.pending_count)

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
        await self.model_sync.drain(CLOSE_DRAIN_S)
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
            await self.model_sync.sync()
        with contextlib.suppress(RedisUnavailable):
            await self.registry.sync()

    # ---- models (see model_cache, model_writes) -----------------------------------------------
    async def delete_model(self, name: str, expect_version: int | None = None) -> bool:
        """Forget a model and its profiles, and end its leases (`Fleet.end_model`; with Redis
        away they run out at their expiry); False if unknown (VersionConflict)."""
        if not await self.model_writer.delete_model(name, expect_version):
            return False
        with contextlib.suppress(RedisUnavailable):
            if ended := await self.fleet.end_model(name):
                log.info("model %r deleted: %d lease(s) of it ended", name, ended)
        return True
