"""The edge-worker registry: heartbeats in, live workers out, expiry by Redis's own clock.

In Redis a worker is a member of a sorted set scored with its expiry in ms by Redis's clock
(`TIME` inside the scripts: now + DAPDEE_WORKER_TTL_S at each heartbeat) plus its last heartbeat
in a hash; both scripts first drop the expired ones. So expiry never compares the wall clocks of
replicas. A replica keeps a copy for `serving` (process memory, no I/O) in which each worker
expires on this replica's monotonic clock at the time left that Redis reported at the last sync.
A heartbeat made while Redis is unavailable is kept here (until it expires by the monotonic
clock) and merged with Redis's registry at each sync.

Redis restarted empty (or flushed): a sync that finds the epoch of Redis's state (`Keys.epoch`,
set by the model refresh, `dapdee.planner.model_sync`) changed since its last one writes back
every worker this replica holds as live that Redis lacks (RESTORE_WORKERS: its last heartbeat,
live for the time this copy has left, none past the cap), so every replica sees it again until
its last heartbeat's TTL ends, and no longer: a worker Redis already holds (a newer heartbeat, or
another replica's write back) is left as it is, whichever replica writes first.

Cap: DAPDEE_MAX_WORKERS live workers; a new worker past it is refused (CapacityExceeded), a
known one may always refresh.

Capacity and leases: asked to (`rho_max`), the heartbeat script refuses a known worker's
heartbeat whose `capacity_ms_per_s` its live lease reservations book past ρ_max of
(CapacityBelowLeases), so the registry never states less capacity than the leases hold. The
caller re-solves the leases for it and registers the heartbeat with them in one step
(`dapdee.planner.leases.LeaseBook.apply`), or registers it as it is. A refused heartbeat still
keeps its worker live (the worker is there: a re-solve may outlast the TTL of its last
registered heartbeat, and the worker must not drop out of the registry meanwhile) and leaves the
capacity it states pending (`P:workers:refused`): until a heartbeat of the worker is registered,
admission books within ρ_max of that capacity, and only that heartbeat's re-solve may apply.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace

from dapdee.planner.config import Settings
from dapdee.planner.errors import CapacityExceeded, RedisUnavailable
from dapdee.planner.keys import Keys
from dapdee.planner.leases import LEASE_FUNCTIONS
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.redis_link import RedisLink

log = logging.getLogger("dapdee.planner")

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, u in ipairs(dead) do
  redis.call('HDEL', KEYS[2], u)
  redis.call('HDEL', KEYS[3], u)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"""
# Register heartbeat `info` of `url` live until `exp` (Redis ms), its pending refusal (if any)
# ended. KEYS: workers:exp, workers:info, workers:refused.
_REGISTER = """
local function register(url, info, exp)
  redis.call('ZADD', KEYS[1], exp, url)
  redis.call('HSET', KEYS[2], url, info)
  redis.call('HDEL', KEYS[3], url)
end
"""
# KEYS: workers:exp, workers:info, workers:refused. ARGV: url, worker JSON, ttl ms, max workers,
# then optionally the lease key prefix, rho_max and the heartbeat's capacity. Returns {1}, or {0}
# when a new worker would pass the cap, or {2, now ms} when the worker is live and its lease
# reservations book more than rho_max x that capacity: then only the worker's expiry moves (to
# now + ttl) and the capacity is left pending in workers:refused.
HEARTBEAT = (
    LEASE_FUNCTIONS
    + _REGISTER
    + _NOW_MS
    + """
local url, ttl = ARGV[1], tonumber(ARGV[3])
local known = redis.call('ZSCORE', KEYS[1], url)
if not known and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return {0}
end
if known and #ARGV >= 7 then
  local limit = tonumber(ARGV[6]) * tonumber(ARGV[7])
  if over(booked(ARGV[5], url, now), limit) then
    if tonumber(known) < now + ttl then redis.call('ZADD', KEYS[1], now + ttl, url) end
    redis.call('HSET', KEYS[3], url, cjson.encode({at = now, capacity = tonumber(ARGV[7])}))
    return {2, now}
  end
end
register(url, ARGV[2], now + ttl)
return {1}
"""
)
# KEYS: workers:exp, workers:info, workers:refused. ARGV: url, worker JSON, ttl ms, the time (ms)
# of the refusal that left the heartbeat's capacity pending, the key prefix. Registers that
# heartbeat as it is (`register_refused`, as a re-solve's apply does), only while its refusal is
# still the one pending (a heartbeat registered or refused since is newer, and stays) and its
# worker is live (one that expired meanwhile is not revived). Returns {1} registered, else {0}.
REGISTER_REFUSED = (
    LEASE_FUNCTIONS
    + _NOW_MS
    + """
local url, at = ARGV[1], tonumber(ARGV[4])
local pending = refusal(ARGV[5], url)
if pending == nil or pending.at ~= at or not redis.call('ZSCORE', KEYS[1], url) then return {0} end
register_refused(ARGV[5], KEYS[1], url, ARGV[2], at, tonumber(ARGV[3]))
return {1}
"""
)
# KEYS: workers:exp, workers:info, workers:refused, epoch. Returns {now ms, epoch ('' if none),
# url, expiry ms, JSON, url, expiry ms, JSON, ...}.
LIVE_WORKERS = (
    _NOW_MS
    + """
local out = {now, redis.call('GET', KEYS[4]) or ''}
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], live[i]) or ''
end
return out
"""
)
# Write back workers into a Redis that lost its state. KEYS: workers:exp, workers:info,
# workers:refused. ARGV: max workers, then url, worker JSON, ms left, per worker. A worker Redis
# holds live is left as it is (a newer heartbeat, or another replica's write back); another is
# registered live for the ms left, unless the registry is full. Returns a flag per worker: 1 if
# Redis holds it live now, 0 if it was left out for the cap. O(workers).
RESTORE_WORKERS = (
    _REGISTER
    + _NOW_MS
    + """
local out, cap = {}, tonumber(ARGV[1])
for i = 2, #ARGV - 2, 3 do
  local url = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], url) then
    out[#out + 1] = 1
  elseif redis.call('ZCARD', KEYS[1]) < cap then
    register(url, ARGV[i + 1], now + tonumber(ARGV[i + 2]))
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)


class CapacityBelowLeases(Exception):
    """A heartbeat refused because the worker's live leases book more than ρ_max of the capacity
    it states (`WorkerRegistry.heartbeat` with `rho_max`); its capacity was not registered, only
    left pending, and the worker kept live (module docstring). `refused_at_ms`: Redis's time
    then, which names the pending refusal (a heartbeat registered or refused later is newer)."""

    def __init__(self, url: str, capacity_ms_per_s: float, refused_at_ms: int) -> None:
        super().__init__(f"worker {url}: its leases book more than rho_max of {capacity_ms_per_s:g} ms/s")
        self.refused_at_ms = refused_at_ms


@dataclass(frozen=True)
class Worker:
    """One edge worker as its last heartbeat described it. `expires_in_s`: the seconds it stays
    live without another heartbeat, as of the answer that carries it (`WorkerRegistry.live`,
    `serving`): by Redis's clock at the last sync, counted down on this replica's monotonic
    clock since; 0 in a heartbeat being recorded. Never a wall-clock time."""

    url: str
    models: tuple[str, ...]
    tier: str
    load: float
    inflight: int
    queue_depth: int
    capacity_ms_per_s: float = 1000.0
    expires_in_s: float = 0.0
    nominal_ms_per_s: float | None = None  # None: a heartbeat without it (then capacity_ms_per_s)

    @property
    def nominal(self) -> float:
        """The nominal capacity ℓe is taken over (ms/s): the heartbeat's, else its capacity."""
        return self.nominal_ms_per_s or self.capacity_ms_per_s

    def info_json(self) -> str:
        """The stored form: the heartbeat without expiry. O(models)."""
        d = {
            "url": self.url,
            "models": list(self.models),
            "tier": self.tier,
            "load": self.load,
            "inflight": self.inflight,
            "queue_depth": self.queue_depth,
            "capacity_ms_per_s": self.capacity_ms_per_s,
            "nominal_ms_per_s": self.nominal_ms_per_s,
        }
        return json.dumps(d)

    @classmethod
    def from_info(cls, raw: bytes | str, expires_in_s: float) -> Worker:
        """Parse `info_json` output (ValueError, KeyError or TypeError if it is not one)."""
        d = json.loads(raw)
        return cls(
            url=str(d["url"]),
            models=tuple(str(m) for m in d["models"]),
            tier=str(d["tier"]),
            load=float(d["load"]),
            inflight=int(d["inflight"]),
            queue_depth=int(d["queue_depth"]),
            capacity_ms_per_s=float(d.get("capacity_ms_per_s", 1000.0)),
            expires_in_s=expires_in_s,
            nominal_ms_per_s=None if d.get("nominal_ms_per_s") is None else float(d["nominal_ms_per_s"]),
        )


@dataclass(frozen=True)
class _Seen:
    worker: Worker
    deadline: float  # time.monotonic() of this replica
    shared: bool  # Redis has this heartbeat
    at: float  # time.monotonic() when recorded


def _order(w: Worker) -> tuple[float, int, str]:
    return (w.load, w.inflight + w.queue_depth, w.url)


class WorkerRegistry:
    """Live edge workers of the deployment, as this replica last saw them (module docstring)."""

    def __init__(self, settings: Settings, metrics: PlannerMetrics, link: RedisLink, keys: Keys) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self._seen: dict[str, _Seen] = {}
        self._epoch: bytes | str | None = None  # the epoch of Redis's state at the last sync
        self._synced = False  # a sync has read Redis's registry

    async def heartbeat(self, w: Worker, rho_max: float | None = None) -> bool:
        """Record a heartbeat here and in Redis. True if Redis has it; CapacityExceeded for a new
        worker past DAPDEE_MAX_WORKERS; with `rho_max`, CapacityBelowLeases when Redis holds lease
        reservations on the worker past `rho_max` × its capacity (the capacity left pending, the
        worker kept live with the heartbeat registered before, here too). One round trip,
        O(1) inside Redis (O(reservations on the worker) when one has expired: its total is
        summed again)."""
        limit = self.settings.max_workers
        try:
            args: list[object] = [w.url, w.info_json(), self.ttl_ms, limit]
            if rho_max is not None:
                args += [self.keys.base, repr(float(rho_max)), repr(float(w.capacity_ms_per_s))]
            answer = await self.link.script("heartbeat", HEARTBEAT, self._script_keys(), args)
            if int(answer[0]) == 2:
                self._kept_live(w.url)
                raise CapacityBelowLeases(w.url, w.capacity_ms_per_s, int(answer[1]))
            shared = bool(int(answer[0]))
            if not shared:
                raise self._refused()
        except RedisUnavailable:
            now = time.monotonic()
            known = w.url in self._seen and self._seen[w.url].deadline > now
            if not known and self.count() >= limit:
                raise self._refused() from None
            shared = False
        self.noted(w, shared)
        return shared

    async def register_refused(self, w: Worker, refused_at_ms: int) -> bool:
        """Register heartbeat `w`, refused at `refused_at_ms` for its capacity, as it is: only
        while that refusal is still pending and the worker live (REGISTER_REFUSED). True if
        registered (here too); False when a newer heartbeat stands or the worker has expired.
        Raises RedisUnavailable. One round trip."""
        args = [w.url, w.info_json(), self.ttl_ms, refused_at_ms, self.keys.base]
        answer = await self.link.script("register_refused", REGISTER_REFUSED, self._script_keys(), args)
        if not int(answer[0]):
            return False
        self.noted(w, shared=True)
        return True

    @property
    def ttl_ms(self) -> int:
        """How long a heartbeat keeps its worker live, in ms (DAPDEE_WORKER_TTL_S)."""
        return max(1, round(self.settings.worker_ttl_s * 1000))

    def noted(self, w: Worker, shared: bool) -> None:
        """Keep heartbeat `w` in this replica's copy (`shared`: Redis has it too; recorded there
        by `heartbeat` or with a rebalance of its leases). O(1)."""
        now = time.monotonic()
        self._seen[w.url] = _Seen(replace(w, expires_in_s=0.0), now + self.settings.worker_ttl_s, shared, now)

    def _kept_live(self, url: str) -> None:
        """A heartbeat of `url` was refused for its capacity: Redis kept the worker live with the
        heartbeat registered before; so does this copy. O(1)."""
        seen = self._seen.get(url)
        if seen is not None:
            self._seen[url] = replace(seen, deadline=time.monotonic() + self.settings.worker_ttl_s)

    def _refused(self) -> CapacityExceeded:
        self.metrics.capacity_refusals.labels("workers").inc()
        limit = self.settings.max_workers
        return CapacityExceeded(
            "workers",
            limit,
            f"the planner tracks the maximum of {limit} live edge workers; a new worker is admitted "
            "when one expires (DAPDEE_MAX_WORKERS)",
        )

    def _script_keys(self) -> list[str]:
        return [self.keys.workers_exp, self.keys.workers_info, self.keys.workers_refused]

    async def sync(self) -> None:
        """Replace this replica's view with Redis's live workers, keeping heartbeats that Redis
        has not seen (made while it was unavailable) until they expire here, and those noted
        since this sync began whatever Redis's answer says (it may have been read before them).
        If Redis lost its state since the last sync (its epoch changed, or is gone), first writes
        back the workers this replica holds as live that Redis lacks (`_restore`). Raises
        RedisUnavailable. One round trip (two after a loss), O(workers)."""
        began = time.monotonic()
        keys = [*self._script_keys(), self.keys.epoch]
        raw = await self.link.script("workers", LIVE_WORKERS, keys, [])
        now = time.monotonic()
        redis_now, epoch = int(raw[0]), raw[1] or None
        fresh: dict[str, _Seen] = {}
        for i in range(2, len(raw) - 2, 3):
            left_s = (float(raw[i + 1]) - redis_now) / 1000.0
            try:
                w = Worker.from_info(raw[i + 2], 0.0)
            except (ValueError, KeyError, TypeError):
                self.metrics.cache_errors.labels("decode_worker").inc()
                continue
            fresh[w.url] = _Seen(w, now + left_s, True, now)
        if self._synced and (epoch is None or epoch != self._epoch):
            fresh.update(await self._restore(fresh))
        for url, seen in self._seen.items():
            if seen.deadline > now and (seen.at >= began or (url not in fresh and not seen.shared)):
                fresh[url] = seen
        self._seen = fresh
        self._epoch, self._synced = epoch, True

    async def _restore(self, held: dict[str, _Seen]) -> dict[str, _Seen]:
        """Redis lost its state: write back each worker this replica holds as live that is not in
        `held` (what Redis holds), with its last heartbeat, live for the time it has left here
        (RESTORE_WORKERS). Returns them as this replica keeps them: shared where Redis holds
        them now, kept here only (until their expiry) where the cap left them out. Raises
        RedisUnavailable. One round trip when there are any, O(workers)."""
        now = time.monotonic()
        lost = [s for url, s in self._seen.items() if url not in held and s.deadline > now]
        if not lost:
            return {}
        log.warning("redis lost the planner's state; writing back the %d live workers this replica holds", len(lost))
        args: list[object] = [self.settings.max_workers]
        for s in lost:
            args += [s.worker.url, s.worker.info_json(), max(1, int((s.deadline - now) * 1000))]
        flags = await self.link.script("restore_workers", RESTORE_WORKERS, self._script_keys(), args)
        out = {s.worker.url: replace(s, shared=bool(int(f))) for s, f in zip(lost, flags, strict=True)}
        if left := [u for u, s in out.items() if not s.shared]:
            cap = self.settings.max_workers
            log.warning("workers %s not written back: the cap of %d workers is reached", left, cap)
        return out

    def _alive(self) -> list[_Seen]:
        now = time.monotonic()
        if any(s.deadline <= now for s in self._seen.values()):
            self._seen = {u: s for u, s in self._seen.items() if s.deadline > now}
        return list(self._seen.values())

    async def live(self) -> list[Worker]:
        """Live workers (fresh from Redis when reachable), least loaded first, each with its
        `expires_in_s`. One round trip, O(workers log workers)."""
        try:
            await self.sync()
        except RedisUnavailable:
            pass
        now = time.monotonic()
        out = [replace(s.worker, expires_in_s=round(s.deadline - now, 3)) for s in self._alive()]
        return sorted(out, key=_order)

    def serving(self, model: str) -> list[Worker]:
        """Every live worker serving `model`, least loaded first. Process memory only. O(workers)."""
        now = time.monotonic()
        live = [
            replace(s.worker, expires_in_s=round(s.deadline - now, 3))
            for s in self._seen.values()
            if s.deadline > now and model in s.worker.models
        ]
        return sorted(live, key=_order)

    def lower_capacity(self, url: str, capacity_ms_per_s: float) -> None:
        """Redis holds a heartbeat of `url` that states less capacity than this replica's copy
        (a lease script said so): keep that until the next sync. O(1)."""
        seen = self._seen.get(url)
        if seen is not None and capacity_ms_per_s < seen.worker.capacity_ms_per_s:
            self._seen[url] = replace(seen, worker=replace(seen.worker, capacity_ms_per_s=capacity_ms_per_s))

    def count(self) -> int:
        """Live workers known here. O(workers)."""
        return len(self._alive())
