"""The planner's state: cost graphs, profiles, plan maps and the edge-worker registry, kept in
Redis (shared by every replica, survives restarts) behind an in-process cache.

Redis keys (`P` = settings.key_prefix, schema version `v1`):

- `P:v1:models`                 hash  model -> content hash of its cost graph
- `P:v1:graph:{model}`          cost graph JSON (as PUT)
- `P:v1:profiles:{model}`       hash  tier -> profile JSON {"kind", "timings_ms", "meta"}
- `P:v1:planmap:{g}:{d}:{e}`    PlanMap.to_bytes() for graph hash g, device profile hash d and
                                edge profile hash e (`graph` where the graph's own timings are used);
                                `…:cap{N}` appended when DAPDEE_PLANMAP_CAP is set
- `P:v1:workers`                hash  url -> worker JSON with its wall-clock `expires_at`
- `P:v1:gen`                    counter bumped by every model/profile change; replicas poll it
                                and reload their cached models when it moves

The plan path reads only process memory once a model and its plan map are cached. Redis
failures never reach a client: every Redis call goes through `_r`, which counts the error,
marks Redis down for a back-off period (no call is even tried meanwhile), and raises
`RedisUnavailable`, which callers swallow. Model and profile changes made while Redis is
away are kept in `pending` and written through by the refresh loop when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.planner.config import Settings
from dapdee.planner.metrics import PlannerMetrics

log = logging.getLogger("dapdee.planner")

SCHEMA = "v1"
GRAPH_TIMINGS = "graph"  # plan-map key part when the cost graph's own timings are used


class RedisUnavailable(Exception):
    """Redis is disabled, backing off after a failure, or just failed."""


class MissingTimings(Exception):
    """A plan needs timings nobody uploaded; the message says what to upload (HTTP 409)."""


def _hash_json(obj: Any) -> str:
    """Short sha256 of canonical JSON (32 hex digits). O(size)."""
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Profile:
    """Measured timings of one hardware tier for one model's nodes."""

    tier: str
    kind: str  # "device" | "edge"
    timings_ms: dict[str, float]
    meta: dict[str, Any]
    hash: str

    @classmethod
    def make(cls, tier: str, kind: str, timings_ms: dict[str, float], meta: dict[str, Any]) -> Profile:
        body = {"kind": kind, "timings_ms": timings_ms, "meta": meta}
        return cls(tier=tier, kind=kind, timings_ms=timings_ms, meta=meta, hash=_hash_json(body))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "timings_ms": self.timings_ms, "meta": self.meta}

    @classmethod
    def from_json(cls, tier: str, raw: bytes | str) -> Profile:
        """Parse a stored profile; ValueError when it is not one. O(size)."""
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("kind") not in ("device", "edge"):
            raise ValueError(f"profile {tier!r}: bad kind")
        t = d.get("timings_ms")
        if not isinstance(t, dict) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in t.values()
        ):
            raise ValueError(f"profile {tier!r}: bad timings_ms")
        meta = d.get("meta") or {}
        return cls.make(tier, d["kind"], {str(k): float(v) for k, v in t.items()}, meta)


@dataclass(frozen=True)
class ModelState:
    """A model's cost graph (as PUT), its content hash and its uploaded profiles by tier."""

    graph: CostGraph
    graph_hash: str
    profiles: dict[str, Profile]


@dataclass(frozen=True)
class Worker:
    """One edge worker as its last heartbeat described it; `expires_at` is wall-clock seconds."""

    url: str
    models: tuple[str, ...]
    tier: str
    load: float
    inflight: int
    queue_depth: int
    expires_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "models": list(self.models),
            "tier": self.tier,
            "load": self.load,
            "inflight": self.inflight,
            "queue_depth": self.queue_depth,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_json(cls, raw: bytes | str) -> Worker:
        d = json.loads(raw)
        return cls(
            url=str(d["url"]),
            models=tuple(str(m) for m in d["models"]),
            tier=str(d["tier"]),
            load=float(d["load"]),
            inflight=int(d["inflight"]),
            queue_depth=int(d["queue_depth"]),
            expires_at=float(d["expires_at"]),
        )


class Store:
    """Models, profiles, plan maps and workers: Redis-backed, with an in-process cache in front.

    Life cycle: `await start()` (connects, loads every stored model, starts the refresh loop),
    `await close()` (stops the loop, writes pending changes if it can, closes the client)."""

    def __init__(self, settings: Settings, metrics: PlannerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        p = f"{settings.key_prefix}:{SCHEMA}"
        self._p = p
        self.k_models = f"{p}:models"
        self.k_gen = f"{p}:gen"
        self.k_workers = f"{p}:workers"
        self.redis: Any = None
        self.redis_state = "disabled"  # disabled | up | down
        self.models: dict[str, ModelState] = {}
        self.pending: dict[str, None] = {}  # ordered set of model names to write through
        self.workers: dict[str, Worker] = {}
        self.planmaps: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._building: dict[tuple[str, str, str], asyncio.Future[Any]] = {}
        self._down_until = 0.0
        self._gen: bytes | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.started = False
        self._hit_memory = metrics.cache_hits.labels("memory")

    # ---- keys --------------------------------------------------------------------------
    def k_graph(self, model: str) -> str:
        return f"{self._p}:graph:{model}"

    def k_profiles(self, model: str) -> str:
        return f"{self._p}:profiles:{model}"

    def k_planmap(self, key: tuple[str, str, str]) -> str:
        # the enumeration cap decides which parts of a plan map are exact: replicas with other
        # caps must not share one
        cap = self.settings.planmap_cap
        return f"{self._p}:planmap:{key[0]}:{key[1]}:{key[2]}" + (f":cap{cap}" if cap is not None else "")

    # ---- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (if a URL is set), load what Redis holds, start the refresh loop."""
        if self.settings.redis_url:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            t = self.settings.redis_timeout_s
            self.redis = Redis.from_url(
                self.settings.redis_url,
                socket_timeout=t,
                socket_connect_timeout=t,
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
            )
            self.redis_state = "up"
            with contextlib.suppress(RedisUnavailable):
                await self._reload_models(all_stored=True)
                await self._sync_workers()
        self._task = asyncio.create_task(self._loop(), name="dapdee-planner-refresh")
        self.started = True

    async def close(self) -> None:
        """Stop the refresh loop (letting a refresh in progress finish, bounded), write pending
        changes through if Redis is there, close the client. Bounded by a few seconds in all."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 3.0)
            except (asyncio.TimeoutError, Exception):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(self._task, 1.0)
            self._task = None
        if self.redis is not None:
            if self.pending:
                self._down_until = 0.0
                with contextlib.suppress(RedisUnavailable, asyncio.TimeoutError):
                    await asyncio.wait_for(self._flush(), 3.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.aclose(), 2.0)
            self.redis = None

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.settings.refresh_s)
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self.sync()
            except Exception:  # the loop must outlive any surprise
                log.exception("planner refresh failed")

    async def sync(self) -> None:
        """One refresh: write pending changes through, reload models if another replica changed
        any (the shared generation counter moved), merge the worker registry. O(models + workers)."""
        if self.redis is not None:
            try:
                gen = await self._r("gen", lambda r: r.get(self.k_gen))
                if gen is None and self.models:
                    # Redis lost its data (restarted without persistence, flushed): write back
                    # everything this replica knows.
                    log.warning("redis holds no planner state; writing back %d models", len(self.models))
                    for name in self.models:
                        self.pending.setdefault(name, None)
                if self.pending:
                    await self._flush()
                    gen = await self._r("gen", lambda r: r.get(self.k_gen))
                if gen != self._gen:
                    await self._reload_models(all_stored=False)
                    self._gen = gen
                await self._sync_workers()
            except RedisUnavailable:
                pass
        self._prune_workers()

    # ---- Redis access --------------------------------------------------------------------
    async def _r(self, op: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one Redis operation, or raise RedisUnavailable (disabled, backing off, or failed
        now: the failure is counted under `op` and starts a back-off). O(1) plus the operation."""
        if self.redis is None:
            raise RedisUnavailable("redis disabled")
        now = time.monotonic()
        if now < self._down_until:
            raise RedisUnavailable("redis down (backing off)")
        from redis.exceptions import RedisError

        try:
            res = await fn(self.redis)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.metrics.cache_errors.labels(op).inc()
            if self.redis_state != "down":
                log.warning("redis unavailable (%s: %s); serving from the in-process cache", op, exc)
            self.redis_state = "down"
            self._down_until = time.monotonic() + self.settings.redis_backoff_s
            raise RedisUnavailable(str(exc)) from None
        if self.redis_state == "down":
            log.warning("redis is back")
            self.redis_state = "up"
        return res

    async def _fetch_model(self, name: str) -> ModelState | None:
        """The model as Redis holds it (None if absent or unreadable). Reuses the cached parsed
        graph when its hash is unchanged. One round trip."""

        async def f(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.hget(self.k_models, name)
            pipe.get(self.k_graph(name))
            pipe.hgetall(self.k_profiles(name))
            return await pipe.execute()

        h, raw_graph, raw_profiles = await self._r("load_model", f)
        if h is None or raw_graph is None:
            return None
        h = h.decode()
        old = self.models.get(name)
        if old is not None and old.graph_hash == h:
            graph = old.graph
        else:
            try:
                graph = CostGraph.from_json(raw_graph)
            except CostGraphError as exc:
                self.metrics.cache_errors.labels("decode_graph").inc()
                log.warning("stored cost graph %r unreadable: %s", name, exc)
                return None
            h = graph.content_hash()
        profiles = {}
        for tier_b, raw in raw_profiles.items():
            tier = tier_b.decode()
            try:
                profiles[tier] = Profile.from_json(tier, raw)
            except (ValueError, TypeError):
                self.metrics.cache_errors.labels("decode_profile").inc()
        return ModelState(graph=graph, graph_hash=h, profiles=profiles)

    async def _reload_models(self, all_stored: bool) -> None:
        """Re-read cached models (and, with all_stored, every stored model) from Redis; models
        with changes still pending here keep their local state. O(models) round trips."""
        async with self._lock:
            names = list(self.models)
            if all_stored:
                stored = await self._r("list_models", lambda r: r.hkeys(self.k_models))
                names = sorted(set(names) | {n.decode() for n in stored})
            for name in names:
                if name in self.pending:
                    continue
                st = await self._fetch_model(name)
                if st is None:
                    self.models.pop(name, None)
                else:
                    self.models[name] = st

    async def _write_model(self, name: str) -> None:
        """Write this replica's whole view of a model (or its absence) to Redis. One round trip."""
        st = self.models.get(name)

        async def f(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.delete(self.k_profiles(name))
            if st is None:
                pipe.delete(self.k_graph(name))
                pipe.hdel(self.k_models, name)
            else:
                pipe.set(self.k_graph(name), st.graph.to_json(indent=None))
                pipe.hset(self.k_models, name, st.graph_hash)
                if st.profiles:
                    pipe.hset(
                        self.k_profiles(name),
                        mapping={t: json.dumps(p.to_dict()) for t, p in st.profiles.items()},
                    )
            pipe.incr(self.k_gen)
            await pipe.execute()

        await self._r("write_model", f)

    async def _flush(self) -> None:
        """Write every pending model through, oldest first; stops at the first failure."""
        async with self._lock:
            for name in list(self.pending):
                await self._write_model(name)
                self.pending.pop(name, None)
        log.warning("wrote pending model changes through to redis")

    async def _write(self, name: str, op: str, fn: Callable[[Any], Awaitable[Any]]) -> bool:
        """Apply a change to Redis, or queue the model for write-through. True if written now."""
        if name in self.pending or self.redis is None:
            if self.redis is not None:
                self.pending[name] = None
            return False
        try:
            await self._r(op, fn)
            return True
        except RedisUnavailable:
            self.pending[name] = None
            return False

    # ---- models and profiles ---------------------------------------------------------------
    async def get_model(self, name: str) -> ModelState | None:
        """The cached model, else the stored one (cached from then on), else None."""
        st = self.models.get(name)
        if st is not None:
            return st
        try:
            st = await self._fetch_model(name)
        except RedisUnavailable:
            return None
        if st is not None and name not in self.models:
            self.models[name] = st
        return self.models.get(name)

    async def refresh_model(self, name: str) -> ModelState | None:
        """Re-read one model from Redis now (None if Redis cannot say or the model is gone there)."""
        if name in self.pending:
            return self.models.get(name)
        try:
            st = await self._fetch_model(name)
        except RedisUnavailable:
            return None
        if st is not None:
            self.models[name] = st
        return st

    async def _fresh(self, name: str) -> ModelState | None:
        """The model as freshly as Redis can tell (used before changing it)."""
        if name not in self.pending:
            try:
                st = await self._fetch_model(name)
            except RedisUnavailable:
                return self.models.get(name)
            if st is None:
                self.models.pop(name, None)
            else:
                self.models[name] = st
        return self.models.get(name)

    async def put_graph(self, graph: CostGraph) -> dict[str, Any]:
        """Store a model's cost graph. Profiles survive when the structure (nodes, exits) is
        unchanged, else they are dropped (they describe other nodes). O(graph size)."""
        name = graph.model
        async with self._lock:
            old = await self._fresh(name)
            h = graph.content_hash()
            keep = old is not None and old.graph.structure_key() == graph.structure_key()
            profiles = dict(old.profiles) if (old is not None and keep) else {}
            dropped = sorted(old.profiles) if (old is not None and not keep) else []
            self.models[name] = ModelState(graph=graph, graph_hash=h, profiles=profiles)
            text = graph.to_json(indent=None)

            async def f(r: Any) -> None:
                pipe = r.pipeline(transaction=True)
                pipe.set(self.k_graph(name), text)
                pipe.hset(self.k_models, name, h)
                if dropped:
                    pipe.delete(self.k_profiles(name))
                pipe.incr(self.k_gen)
                await pipe.execute()

            written = await self._write(name, "put_graph", f)
        return {
            "model": name,
            "graph_hash": h,
            "created": old is None,
            "dropped_profiles": dropped,
            "stored": "redis" if written else ("pending" if self.redis is not None else "memory"),
        }

    async def delete_model(self, name: str) -> bool:
        """Forget a model and its profiles. False if it was unknown."""
        async with self._lock:
            old = await self._fresh(name)
            if old is None:
                return False
            self.models.pop(name, None)

            async def f(r: Any) -> None:
                pipe = r.pipeline(transaction=True)
                pipe.delete(self.k_graph(name), self.k_profiles(name))
                pipe.hdel(self.k_models, name)
                pipe.incr(self.k_gen)
                await pipe.execute()

            await self._write(name, "delete_model", f)
        return True

    async def put_profile(self, name: str, prof: Profile) -> ModelState | None:
        """Store one tier's profile of a model (None if the model is unknown)."""
        async with self._lock:
            st = await self._fresh(name)
            if st is None:
                return None
            self.models[name] = ModelState(st.graph, st.graph_hash, {**st.profiles, prof.tier: prof})
            text = json.dumps(prof.to_dict())

            async def f(r: Any) -> None:
                pipe = r.pipeline(transaction=True)
                pipe.hset(self.k_profiles(name), prof.tier, text)
                pipe.incr(self.k_gen)
                await pipe.execute()

            await self._write(name, "put_profile", f)
            return self.models[name]

    async def delete_profile(self, name: str, tier: str) -> bool | None:
        """Forget one profile: None if the model is unknown, False if the tier is."""
        async with self._lock:
            st = await self._fresh(name)
            if st is None:
                return None
            if tier not in st.profiles:
                return False
            self.models[name] = ModelState(
                st.graph, st.graph_hash, {t: p for t, p in st.profiles.items() if t != tier}
            )

            async def f(r: Any) -> None:
                pipe = r.pipeline(transaction=True)
                pipe.hdel(self.k_profiles(name), tier)
                pipe.incr(self.k_gen)
                await pipe.execute()

            await self._write(name, "delete_profile", f)
            return True

    async def list_models(self) -> dict[str, ModelState]:
        """Every model: Redis's list when reachable (other replicas' models too), else the cache."""
        try:
            stored = await self._r("list_models", lambda r: r.hkeys(self.k_models))
        except RedisUnavailable:
            return dict(sorted(self.models.items()))
        names = {n.decode() for n in stored} | set(self.pending)
        out = {}
        for name in sorted(names):
            st = await self.get_model(name)
            if st is not None:
                out[name] = st
        return out

    # ---- plan maps ---------------------------------------------------------------------------
    async def planmap(
        self, name: str, st: ModelState, dev: Profile | None, edge: Profile | None, edge_hint: str = ""
    ) -> Any:
        """The plan map of (graph, device timings, edge timings): from the in-process LRU, else
        Redis, else built (once, in a thread, shared by concurrent callers) and stored.
        Raises MissingTimings when the merged graph lacks a timing."""
        key = (st.graph_hash, dev.hash if dev else GRAPH_TIMINGS, edge.hash if edge else GRAPH_TIMINGS)
        pm = self.planmaps.get(key)
        if pm is not None:
            self.planmaps.move_to_end(key)
            self._hit_memory.inc()
            return pm
        fut = self._building.get(key)
        if fut is not None:
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                if not fut.cancelled():
                    raise  # this request itself was cancelled
                # the request that was building it went away: build it here
                return await self.planmap(name, st, dev, edge, edge_hint)
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._building[key] = fut
        try:
            pm = await self._load_or_build(key, name, st, dev, edge, edge_hint)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
            raise
        finally:
            self._building.pop(key, None)
        fut.set_result(pm)
        self.planmaps[key] = pm
        while len(self.planmaps) > self.settings.planmap_cache_size:
            self.planmaps.popitem(last=False)
        return pm

    async def _load_or_build(
        self,
        key: tuple[str, str, str],
        name: str,
        st: ModelState,
        dev: Profile | None,
        edge: Profile | None,
        edge_hint: str,
    ) -> Any:
        from dapdee.planning import PlanMap

        rkey = self.k_planmap(key)
        try:
            raw = await self._r("get_planmap", lambda r: r.get(rkey))
        except RedisUnavailable:
            raw = None
        if raw is not None:
            try:
                pm = await asyncio.to_thread(PlanMap.from_bytes, raw)
                self.metrics.cache_hits.labels("redis").inc()
                return pm
            except Exception as exc:  # a blob from another version, or damaged: rebuild it
                self.metrics.cache_errors.labels("decode_planmap").inc()
                log.warning("stored plan map %s unreadable (%s); rebuilding", rkey, exc)
        self.metrics.cache_misses.inc()
        graph = merged_graph(name, st, dev, edge, edge_hint)
        cap = self.settings.planmap_cap
        pm = (
            await asyncio.to_thread(PlanMap.build, graph)
            if cap is None
            else await asyncio.to_thread(PlanMap.build, graph, cap=cap)
        )
        blob = await asyncio.to_thread(pm.to_bytes)
        with contextlib.suppress(RedisUnavailable):
            await self._r("put_planmap", lambda r: r.set(rkey, blob, ex=self.settings.planmap_ttl_s))
        return pm

    # ---- workers -----------------------------------------------------------------------------
    async def heartbeat(self, w: Worker) -> bool:
        """Record a heartbeat here and in Redis (best effort). True if Redis has it."""
        self.workers[w.url] = w
        try:
            await self._r("heartbeat", lambda r: r.hset(self.k_workers, w.url, json.dumps(w.to_dict())))
            return True
        except RedisUnavailable:
            return False

    async def _sync_workers(self) -> None:
        """Merge Redis's registry into ours (latest expiry wins) and drop long-expired entries
        from Redis. O(workers)."""
        raw = await self._r("workers", lambda r: r.hgetall(self.k_workers))
        now = time.time()
        merged: dict[str, Worker] = {}
        stale = []
        for url_b, js in raw.items():
            try:
                w = Worker.from_json(js)
            except (ValueError, KeyError, TypeError):
                stale.append(url_b)
                continue
            if w.expires_at > now:
                merged[w.url] = w
            elif w.expires_at + self.settings.worker_ttl_s < now:
                stale.append(url_b)
        for url, w in self.workers.items():
            if w.expires_at > now and (url not in merged or merged[url].expires_at < w.expires_at):
                merged[url] = w
        self.workers = merged
        if stale:
            with contextlib.suppress(RedisUnavailable):
                await self._r("workers_prune", lambda r: r.hdel(self.k_workers, *stale))

    def _prune_workers(self) -> None:
        now = time.time()
        if any(w.expires_at <= now for w in self.workers.values()):
            self.workers = {u: w for u, w in self.workers.items() if w.expires_at > now}

    async def live_workers(self) -> list[Worker]:
        """Live workers (fresh from Redis when reachable), least loaded first."""
        with contextlib.suppress(RedisUnavailable):
            await self._sync_workers()
        self._prune_workers()
        return sorted(self.workers.values(), key=_worker_order)

    def pick_worker(self, model: str) -> Worker | None:
        """The least-loaded live worker serving `model` (ties: fewer in flight and queued, then URL).
        Process memory only. O(workers)."""
        now = time.time()
        best = None
        best_k: tuple[float, int, str] | None = None
        for w in self.workers.values():
            if w.expires_at > now and model in w.models:
                k = _worker_order(w)
                if best_k is None or k < best_k:
                    best, best_k = w, k
        return best

    def live_worker_count(self) -> int:
        now = time.time()
        return sum(1 for w in self.workers.values() if w.expires_at > now)


def _worker_order(w: Worker) -> tuple[float, int, str]:
    return (w.load, w.inflight + w.queue_depth, w.url)


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
        if edge is not None:
            graph = graph.with_timings("edge", edge.timings_ms, edge.meta or None)
    except CostGraphError as exc:
        raise MissingTimings(
            f"model {name!r}: a profile does not fit its cost graph ({exc}); re-upload it"
        ) from None
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
