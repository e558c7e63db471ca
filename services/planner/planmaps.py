"""Plan maps of (graph, device timings, edge timings): an in-process LRU, then Redis, then built.

A build runs in a worker thread (never on the event loop), at most DAPDEE_PLANMAP_BUILD_THREADS
at once, within DAPDEE_PLANMAP_BUILD_BUDGET_S: `PlanMap.build(..., deadline_s=budget)` falls
back per exit to the min-cut path when enumeration runs out of time (the map is then not exact,
and throughput plans say `"approximate": true`). Concurrent requests for one map share one build.

In process memory the LRU holds at most DAPDEE_PLANMAP_CACHE_SIZE maps and about
DAPDEE_PLANMAP_CACHE_BYTES of them (`approx_bytes`). What reaches Redis is bounded: a map cut
short by the budget, or whose `to_bytes()` exceeds DAPDEE_PLANMAP_MAX_BYTES, stays in process
memory only (counted in
`dapdee_planner_planmaps_not_stored_total{reason}`); a stored map expires after
DAPDEE_PLANMAP_TTL_S, and the `PUT_PLANMAP` script keeps at most DAPDEE_PLANMAP_REDIS_MAX of them
(the oldest are deleted) and, under a Redis `maxmemory`, within DAPDEE_PLANMAP_MEMORY_SHARE of
it in bytes (the oldest deleted to make room; a map larger than the share alone is not stored,
reason `redis_memory`), so maps never take the room of the models, profiles, workers and leases. The
script deletes keys it learns from its index, which a single Redis (not a cluster) allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.planner.config import Settings
from dapdee.planner.errors import MapBuildPending, MissingTimings, RedisUnavailable
from dapdee.planner.keys import GRAPH_TIMINGS, Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.modelstate import ModelState, Profile
from dapdee.planner.redis_link import RedisLink
from dapdee.planning import DEFAULT_CAP, PlanMap
from dapdee.planning.builder import build_serialised, exit_with_parent
from dapdee.planning.enumerate import ExitStructure
from dapdee.planning.progressive import ProgressiveMap

log = logging.getLogger("dapdee.planner")

# KEYS: the map's key, the plan-map index. ARGV: map bytes, ttl ms, count cap, memory share.
# Returns how many of the oldest maps were deleted (to keep the count cap, or to make room), or
# -1 when the map was not stored. Under Redis's `maxmemory` (when set) the stored maps' bytes
# stay within `share` of it: the oldest maps are deleted to make room, and a map larger than
# that share alone is not stored (nothing deleted). Plan maps are a cache (rebuilt on demand);
# the rest of maxmemory stays for models, profiles, workers and leases, whose writes
# `noeviction` would otherwise refuse once maps filled it. O(stored maps) under a maxmemory.
# Scores are Redis's clock in microseconds, made strictly increasing (two maps stored in the same
# microsecond would otherwise be ordered by name).
PUT_PLANMAP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local newest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if newest[2] and tonumber(newest[2]) >= now then now = tonumber(newest[2]) + 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]) * 1000)
local dropped = 0
local size = #ARGV[1]
local maxmemory = tonumber(string.match(redis.call('INFO', 'memory'), 'maxmemory:(%d+)')) or 0
if maxmemory > 0 then
  local budget = maxmemory * tonumber(ARGV[4])
  if size > budget then return -1 end
  local maps = redis.call('ZRANGE', KEYS[2], 0, -1)
  local total = size
  for _, k in ipairs(maps) do if k ~= KEYS[1] then total = total + redis.call('STRLEN', k) end end
  for _, k in ipairs(maps) do
    if total <= budget then break end
    if k ~= KEYS[1] then
      total = total - redis.call('STRLEN', k)
      redis.call('DEL', k)
      redis.call('ZREM', KEYS[2], k)
      dropped = dropped + 1
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, KEYS[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  for _, k in ipairs(old) do redis.call('DEL', k) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
  return dropped + extra
end
return dropped
"""

MapKey = tuple[str, str, str]


class NoConfidenceExits(ValueError):
    """A confidence-exit plan asked for a model whose graph carries no calibrated exits."""


PROGRESSIVE = ":progressive"  # appended to a key's edge part for a ProgressiveMap
FAST_BUILD_S = 0.25  # a build's time in a thread before the rest goes to a build process


def approx_bytes(pm: PlanMap | ProgressiveMap) -> int:
    """An estimate of the memory a plan map holds, the part that grows with a large graph. Per
    exit, its indexed sub-graph (`_indexed_bytes`) and per candidate device set its bit mask
    (the device-only set, always a candidate, is the widest) and ~150 bytes of sums and
    references. A confidence-exit map's exit also indexes its heads (~250 bytes per extra
    node, 16 per consumer entry, 24 per column of times and sizes), and each candidate carries
    eight sums (~100 bytes with its references). Within ~15 % of what tracemalloc counts for
    either kind of map of random DAGs of 100-3,000 nodes. O(V + E + candidates) per exit."""
    total = 0
    if isinstance(pm, ProgressiveMap):
        for c in pm.cands:
            hs = c.hs
            total += _indexed_bytes(hs.st) + 250 * (len(hs.names) - hs.st.m)
            total += 16 * sum(len(x) for x in hs.cons) + 24 * len(hs.names)
            total += len(c.masks) * (max(c.masks).bit_length() // 8 + 100)
        return total
    for c in pm.cands:
        total += _indexed_bytes(c.st) + len(c.masks) * (max(c.masks).bit_length() // 8 + 150)
    return total


def _indexed_bytes(st: ExitStructure) -> int:
    """An exit's indexed sub-graph: the producer and consumer bit masks of each node (a bit per
    node of the exit), 16 bytes per edge of the two adjacency tuples and ~250 bytes per node of
    per-node tuples. O(V + E) of the exit."""
    masks = sum(x.bit_length() // 8 + 28 for x in (*st.preds_mask, *st.cons_mask))
    return masks + 16 * sum(len(p) for p in st.preds) + 250 * st.m


class PlanMapCache:
    """The plan maps one replica uses (module docstring)."""

    def __init__(self, settings: Settings, metrics: PlannerMetrics, link: RedisLink, keys: Keys) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self.maps: OrderedDict[MapKey, PlanMap] = OrderedDict()
        self._bytes: dict[MapKey, int] = {}  # approx_bytes of each map in `maps`
        self._held_bytes = 0  # their sum
        self._building: dict[MapKey, asyncio.Task[PlanMap]] = {}
        self._slots = asyncio.Semaphore(settings.planmap_build_threads)
        self._pool: ProcessPoolExecutor | None = None  # created at the first slow build
        self._hit_memory = metrics.cache_hits.labels("memory")

    def redis_key(self, key: MapKey) -> str:
        return self.keys.planmap(key, self.settings.planmap_cap)

    async def get(
        self,
        name: str,
        st: ModelState,
        dev: Profile | None,
        edge: Profile | None,
        edge_hint: str = "",
        progressive: bool = False,
        until: float | None = None,
    ) -> PlanMap:
        """The plan map of (graph, device timings, edge timings): from the LRU (O(1)), else Redis,
        else built (once, shared by concurrent callers). `progressive`: the `ProgressiveMap` for
        confidence exits instead (same caching; its key's edge part ends in `:progressive`).
        `until` (a `time.monotonic()` value): wait for a map not in memory no longer than that
        (MapBuildPending; the build goes on). Raises MissingTimings when the merged graph lacks a
        timing, ValueError when a progressive map is asked for a graph without calibrated
        confidence exits."""
        edge_part = (edge.hash if edge else GRAPH_TIMINGS) + (PROGRESSIVE if progressive else "")
        key = (st.graph_hash, dev.hash if dev else GRAPH_TIMINGS, edge_part)
        pm = self.maps.get(key)
        if pm is not None:
            self.maps.move_to_end(key)
            self._hit_memory.inc()
            return pm
        task = self._building.get(key)
        if task is None:
            graph = merged_graph(name, st, dev, edge, edge_hint)
            if progressive and graph.progressive is None:
                raise NoConfidenceExits(
                    f"confidence_exits: model {name!r} has no calibrated confidence exits (its cost graph "
                    "carries no `progressive`; calibrate the artifact with `dapdee calibrate` and upload it again)"
                )
            kind = ProgressiveMap if progressive else PlanMap
            task = asyncio.create_task(self._load_or_build(key, graph, kind), name=f"dapdee-planmap-{name}")
            self._building[key] = task
            task.add_done_callback(lambda t: self._built(key, t))
        # the build is the cache's, not the request's: a request that goes away (a client gone, a
        # timeout) leaves it running, so its map is still cached and its slot held until it ends
        if until is None:
            return await asyncio.shield(task)
        try:
            return await asyncio.wait_for(asyncio.shield(task), max(0.0, until - time.monotonic()))
        except asyncio.TimeoutError:
            raise MapBuildPending(f"the plan map of model {name!r} is still being built; retry") from None

    def _built(self, key: MapKey, task: asyncio.Task[PlanMap]) -> None:
        """A build task ended: keep its map in the LRU, evicting the least recently used past
        DAPDEE_PLANMAP_CACHE_SIZE maps or DAPDEE_PLANMAP_CACHE_BYTES estimated bytes (the newest
        map stays, even alone past it). O(1) amortised, plus `approx_bytes` of the new map."""
        if self._building.get(key) is task:
            del self._building[key]
        if task.cancelled() or task.exception() is not None:  # its callers got the exception
            return
        size = approx_bytes(task.result())
        self.maps[key] = task.result()
        self._held_bytes += size - self._bytes.get(key, 0)
        self._bytes[key] = size
        while len(self.maps) > 1 and (
            len(self.maps) > self.settings.planmap_cache_size or self._held_bytes > self.settings.planmap_cache_bytes
        ):
            oldest, _ = self.maps.popitem(last=False)
            self._held_bytes -= self._bytes.pop(oldest)

    async def _load_or_build(self, key: MapKey, graph: CostGraph, kind: Any) -> PlanMap:
        rkey = self.redis_key(key)
        try:
            raw = await self.link.call("get_planmap", lambda r: r.get(rkey))
        except RedisUnavailable:
            raw = None
        if raw is not None:
            try:
                pm = await asyncio.to_thread(kind.from_bytes, raw, self.settings.graph_limits())
                self.metrics.cache_hits.labels("redis").inc()
                return pm
            except Exception as exc:  # a blob from another version, or damaged: rebuild it
                self.metrics.cache_errors.labels("decode_planmap").inc()
                log.warning("stored plan map %s unreadable (%s); rebuilding", rkey, exc)
        self.metrics.cache_misses.inc()
        pm = await self._build(graph, kind)
        await self._store(rkey, pm)
        return pm

    async def _build(self, graph: CostGraph, kind: Any) -> PlanMap:
        """The map, built off the event loop within the build budget, at most
        planmap_build_threads at once (the build is a task of the cache, `get`: a slot is freed
        when its build ends, whoever still waits for it). First in a thread for at most FAST_BUILD_S (most
        models' maps are exact within milliseconds); a map that is not exact by then is built
        again in a separate process with what is left of the budget (the process's start-up
        counts against it), so seconds of enumeration and min-cuts never hold this process's
        interpreter lock (nor trigger its garbage collector)."""
        cap = self.settings.planmap_cap or DEFAULT_CAP
        budget = self.settings.planmap_build_budget_s
        await self._slots.acquire()
        t0 = time.perf_counter()
        end = time.time() + budget
        try:
            pm = await self._in_thread(kind, graph, cap, min(budget, FAST_BUILD_S))
            if not pm.exact and budget > FAST_BUILD_S:
                pm = await self._in_process_or_cut(kind, graph, cap, end, pm)
        finally:
            self._slots.release()
        self.metrics.planmap_build_duration.observe(time.perf_counter() - t0)
        result = "over_budget" if pm.over_budget else ("exact" if pm.exact else "capped")
        self.metrics.planmap_builds.labels(result).inc()
        if pm.over_budget:
            log.warning(
                "plan map of model %r cut short by the build budget (DAPDEE_PLANMAP_BUILD_BUDGET_S=%g): "
                "not exact, not stored in redis",
                graph.model,
                budget,
            )
        return pm

    async def _in_thread(self, kind: Any, graph: CostGraph, cap: int, budget: float) -> PlanMap:
        return await asyncio.get_running_loop().run_in_executor(None, kind.build, graph, cap, budget)

    async def _in_process_or_cut(self, kind: Any, graph: CostGraph, cap: int, end: float, cut: PlanMap) -> PlanMap:
        """`_in_process`'s map; if a build process died (the OOM killer, most likely), `cut` (the
        thread's map) as a build cut short by its budget (approximate, not stored in Redis), and
        the broken pool is dropped, so the next build starts a new one."""
        try:
            return await self._in_process(kind, graph, cap, end)
        except BrokenProcessPool as exc:
            log.error("plan map of model %r: a build process died (%s); serving the map cut short", graph.model, exc)
            self._drop_pool()
            cut.over_budget = True
            return cut

    def _drop_pool(self) -> None:
        """Stop the build processes (running builds are abandoned); a later build starts new ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _in_process(self, kind: Any, graph: CostGraph, cap: int, end: float) -> PlanMap:
        """The map built in the build pool by `end` (a `time.time()` value)."""
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded server
            n, end_with_us = self.settings.planmap_build_threads, (os.getpid(),)
            self._pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=exit_with_parent, initargs=end_with_us)
        progressive = kind is not PlanMap
        loop = asyncio.get_running_loop()
        lim = self.settings.graph_limits()
        limits = (lim.max_nodes, lim.max_exits, lim.max_in_degree)
        blob, short = await loop.run_in_executor(
            self._pool, build_serialised, graph.to_json(indent=None), cap, end, progressive, limits
        )
        pm = await asyncio.to_thread(kind.from_bytes, blob, lim)
        pm.over_budget = short
        return pm

    def close(self) -> None:
        """Stop the build processes and tasks (running builds are abandoned)."""
        for task in self._building.values():
            task.cancel()
        self._drop_pool()

    async def _store(self, rkey: str, pm: PlanMap) -> None:
        """Store a built map in Redis unless it was cut short by the budget or is over the byte
        cap (kept in process memory only, counted); best effort."""
        if not self.link.enabled:
            return
        if pm.over_budget:
            self.metrics.planmaps_not_stored.labels("over_budget").inc()
            return
        blob = await asyncio.to_thread(pm.to_bytes)
        limit = self.settings.planmap_max_bytes
        if len(blob) > limit:
            self.metrics.planmaps_not_stored.labels("too_large").inc()
            log.info("plan map %s: %d bytes, over DAPDEE_PLANMAP_MAX_BYTES=%d; in memory only", rkey, len(blob), limit)
            return
        ttl_ms = self.settings.planmap_ttl_s * 1000
        args = [blob, ttl_ms, self.settings.planmap_redis_max, repr(self.settings.planmap_memory_share)]
        with contextlib.suppress(RedisUnavailable):
            dropped = await self.link.script("put_planmap", PUT_PLANMAP, [rkey, self.keys.planmaps], args)
            if int(dropped) < 0:
                self.metrics.planmaps_not_stored.labels("redis_memory").inc()
                log.info(
                    "plan map %s: %d bytes, over DAPDEE_PLANMAP_MEMORY_SHARE of Redis's maxmemory; in memory only",
                    rkey,
                    len(blob),
                )


def _meta_ms(profile: Profile, key: str) -> float | None:
    """A profile's measured per-request cost (cost model v2) from its `meta`: None when absent
    (the graph's own `overheads` hold); CostGraphError when it is not a number."""
    v = profile.meta.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise CostGraphError(f"profile {profile.tier!r}: meta.{key} must be a number of ms, got {v!r}")
    return float(v)


def merged_graph(
    name: str, st: ModelState, dev: Profile | None, edge: Profile | None, edge_hint: str = ""
) -> CostGraph:
    """The model's cost graph with the device and edge profiles' timings applied (device first),
    checked to have every timing a plan needs; MissingTimings says what to upload (`edge_hint`
    adds why no edge profile was used). O(V)."""
    graph = st.graph
    try:
        if dev is not None:
            graph = graph.with_timings("device", dev.timings_ms, dev.meta or None)
            graph = graph.with_overheads(device_request_ms=_meta_ms(dev, "device_request_ms"))
        if edge is not None:
            graph = graph.with_timings("edge", edge.timings_ms, edge.meta or None)
            graph = graph.with_overheads(edge_request_ms=_meta_ms(edge, "edge_request_ms"))
    except CostGraphError as exc:
        raise MissingTimings(f"model {name!r}: a profile does not fit its cost graph ({exc}); re-upload it") from None
    for i, n in enumerate(graph.nodes):
        for kind, prof in (("device", dev), ("edge", edge)):
            if getattr(n, f"{kind}_ms") is None:
                src = f"{kind} profile {prof.tier!r}" if prof is not None else "the cost graph"
                hint = edge_hint if kind == "edge" and prof is None and edge_hint else ""
                raise MissingTimings(
                    f"model {name!r}: {src} has no {kind}_ms for node {n.name!r} (nodes[{i}]){hint}; "
                    f"upload a {kind} profile covering every node: PUT /models/{name}/profiles/{{tier}} "
                    f'with {{"kind": "{kind}", "timings_ms": {{...}}}}'
                )
    return graph
