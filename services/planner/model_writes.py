"""Writing models and profiles, and queueing the writes made while Redis is unavailable.

Writes (put_graph, delete_model, put_profile, delete_profile) read the model fresh from Redis,
check `expect_version` (If-Match), and apply one `writes.Op` through the `WRITE_MODEL` script,
which applies it only if Redis still holds the version the replica read; a race lost to another
replica is retried on the new state (or is a VersionConflict when the caller named a version).

While Redis is unavailable a write to a model this replica holds (or has writes queued for) is
applied to this replica's cache and queued in the outbox (answer: `"stored": "pending"`). A
write to any other model, a create included, is refused with ModelUnreachable: the replica
cannot tell whether Redis holds it (another replica's, or one it evicted), and a create queued
on a guess would be dropped as a conflict on replay after it was acknowledged. A write Redis
refuses (`RedisRefused`: out of memory, read-only, busy) is neither applied nor queued: it
raises, and the route answers 503 with Retry-After. The refresh loop replays queued writes once
Redis is back, and writes the models back if Redis lost them (`model_sync`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from dapdee.costgraph import CostGraph
from dapdee.planner.config import Settings
from dapdee.planner.errors import (
    CapacityExceeded,
    ModelUnreachable,
    RedisRefused,
    RedisUnavailable,
    UnknownNodes,
    VersionConflict,
)
from dapdee.planner.keys import Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.modelstate import ModelState, Profile, PutResult
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.writes import WRITE_MODEL, Op, Outbox

WRITE_ATTEMPTS = 5  # a write that keeps losing races to other replicas gives up (409)
INLINE_GRAPH_SIZE = 2048  # nodes + edges: a larger graph is hashed and encoded in a worker thread

# `ModelWriter.send`, handed to `model_sync.ModelSync`: one operation through WRITE_MODEL, answered
# with (status, version, graph hash, the id of the write it went onto, whether it created a tier)
Send = Callable[[Op], Awaitable[tuple[str, int, str, str, bool]]]


def _digests(graph: CostGraph) -> tuple[str, str, str]:
    """(content hash, stored JSON text, structure key) of `graph`; the hash and key stay cached
    on it, so the state written keeps them. O(V + E)."""
    return graph.content_hash(), graph.to_json(indent=None), graph.structure_key()


@dataclass(frozen=True)
class Planned:
    """A write decided against the current state: the operation (None: nothing changes), the
    state after it (None: the model is gone), and what the answer reports."""

    op: Op | None
    after: ModelState | None
    created: bool = False
    dropped: tuple[str, ...] = ()


class ModelWriter:
    """Versioned writes of one replica's models and profiles; those made while Redis is
    unavailable are applied to `cache` and queued in `outbox` (module docstring; their replay:
    `model_sync.ModelSync`). Keeps `cache` up to date with what it writes. `lock` is held by each
    write, and by each refresh (`ModelSync.sync`): a write and a replay never interleave."""

    def __init__(
        self,
        settings: Settings,
        metrics: PlannerMetrics,
        link: RedisLink,
        keys: Keys,
        cache: ModelCache,
        outbox: Outbox,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self.cache = cache
        self.outbox = outbox
        self.lock = asyncio.Lock()

    # ---- writes ------------------------------------------------------------------------------
    async def put_graph(self, graph: CostGraph, expect_version: int | None = None) -> PutResult:
        """Store a model's cost graph. Profiles survive when the structure (nodes, exits) is
        unchanged, else they are dropped (they describe other nodes). An identical graph changes
        nothing (same version). O(graph size) (in a worker thread past INLINE_GRAPH_SIZE) plus
        one or two round trips."""
        name = graph.model
        if len(graph.nodes) + sum(len(n.inputs) for n in graph.nodes) > INLINE_GRAPH_SIZE:
            h, text, skey = await asyncio.to_thread(_digests, graph)
        else:
            h, text, skey = _digests(graph)
        unreadable = self.cache.unreadable

        def plan(cur: ModelState | None) -> Planned:
            if cur is None and name in unreadable:  # replace what cannot be read
                v, old_h = unreadable[name]
                op = Op("put_graph", name, v, old_h, h, text, drop_profiles=True)
                return Planned(op, ModelState(graph, h, {}, v + 1))
            if cur is None:
                return Planned(Op("put_graph", name, 0, "", h, text), ModelState(graph, h, {}, 1), created=True)
            keep = cur.graph.structure_key() == skey
            if keep and cur.graph_hash == h:
                return Planned(None, cur)
            after = ModelState(graph, h, dict(cur.profiles) if keep else {}, cur.version + 1)
            op = Op("put_graph", name, cur.version, cur.graph_hash, h, text, drop_profiles=not keep)
            return Planned(op, after, dropped=() if keep else tuple(sorted(cur.profiles)))

        planned, stored = await self._write(name, expect_version, plan, creates=True)
        assert planned is not None and planned.after is not None
        return PutResult(planned.after, planned.created, list(planned.dropped), stored)

    async def delete_model(self, name: str, expect_version: int | None = None) -> bool:
        """Forget a model and its profiles. False if it was unknown. One or two round trips."""
        unreadable = self.cache.unreadable

        def plan(cur: ModelState | None) -> Planned | None:
            if cur is None and name in unreadable:
                return Planned(Op("delete_model", name, *unreadable[name]), None)
            if cur is None:
                return None
            return Planned(Op("delete_model", name, cur.version, cur.graph_hash), None)

        planned, _ = await self._write(name, expect_version, plan)
        return planned is not None

    async def put_profile(self, name: str, prof: Profile, expect_version: int | None = None) -> PutResult | None:
        """Store one tier's profile of a model (None if the model is unknown; UnknownNodes when
        it times nodes the graph, as stored now, lacks). Only that field of the profiles hash is
        written. O(profile size) plus one or two round trips."""
        text = prof.to_json()

        def plan(cur: ModelState | None) -> Planned | None:
            if cur is None:
                return None
            old = cur.profiles.get(prof.tier)
            if old is not None and old.hash == prof.hash:
                return Planned(None, cur)
            unknown = sorted(set(prof.timings_ms) - {n.name for n in cur.graph.nodes})
            if unknown:  # checked here, on the state written over: another replica may have changed the graph
                raise UnknownNodes(name, unknown)
            if old is None and len(cur.profiles) >= self.settings.max_profiles_per_model:
                raise self._refused("profiles", name)
            after = ModelState(cur.graph, cur.graph_hash, {**cur.profiles, prof.tier: prof}, cur.version + 1)
            op = Op("put_profile", name, cur.version, cur.graph_hash, payload=text, tier=prof.tier)
            return Planned(op, after, created=old is None)

        planned, stored = await self._write(name, expect_version, plan)
        if planned is None or planned.after is None:
            return None
        return PutResult(planned.after, planned.created, [], stored)

    async def delete_profile(self, name: str, tier: str, expect_version: int | None = None) -> bool | None:
        """Forget one profile: None if the model is unknown, False if the tier is. One or two
        round trips."""
        absent = Planned(None, None)

        def plan(cur: ModelState | None) -> Planned | None:
            if cur is None:
                return None
            if tier not in cur.profiles:
                return absent
            rest = {t: p for t, p in cur.profiles.items() if t != tier}
            op = Op("delete_profile", name, cur.version, cur.graph_hash, tier=tier)
            return Planned(op, ModelState(cur.graph, cur.graph_hash, rest, cur.version + 1))

        planned, _ = await self._write(name, expect_version, plan)
        if planned is None:
            return None
        return planned is not absent

    def _refused(self, what: str, model: str) -> CapacityExceeded:
        """The CapacityExceeded for a write refused at the cap `what` ("models" or "profiles"),
        counted in `capacity_refusals`."""
        self.metrics.capacity_refusals.labels(what).inc()
        if what == "profiles":
            limit = self.settings.max_profiles_per_model
            return CapacityExceeded(
                what, limit, f"model {model!r} holds the maximum of {limit} profiles; delete one first"
            )
        return CapacityExceeded(what, self.settings.max_models)

    async def _write(
        self,
        name: str,
        expect: int | None,
        plan: Callable[[ModelState | None], Planned | None],
        creates: bool = False,
    ) -> tuple[Planned | None, str]:
        """Decide a write with `plan` on the freshest state this replica can read and apply it:
        through the script when Redis is up (retried on a lost race), else to the cache and the
        outbox. Returns (planned, stored) with planned None when `plan` says the model is
        unknown. Raises VersionConflict, CapacityExceeded, ModelUnreachable for a write (a create
        too) to a model this replica neither holds nor can read (Redis away: it may exist), and
        RedisRefused for a write Redis refused (nothing applied, nothing queued)."""
        version = 0
        async with self.lock:
            for _ in range(WRITE_ATTEMPTS):
                cur, online = await self._current(name)
                if not online and cur is None and self.link.enabled and not self.outbox.has(name):
                    raise ModelUnreachable(name)  # Redis may hold it: "unknown" or "new" would be a guess
                unreadable = self.cache.unreadable.get(name) if cur is None else None
                if expect is not None and (cur is not None or creates or unreadable is not None):
                    # a model stored but unreadable here has a version too: If-Match holds for it
                    actual = cur.version if cur is not None else (unreadable[0] if unreadable else None)
                    if actual != expect:
                        raise VersionConflict(name, expect, actual)
                planned = plan(cur)
                if planned is None or planned.op is None:
                    return planned, self._mode(online)
                if not online:
                    if planned.created and creates and len(self.cache.models) >= self.settings.max_models:
                        raise self._refused("models", name)  # without Redis: the models held here
                    return planned, self._queue(planned)
                op = planned.op if expect is not None else replace(planned.op, check="graph")
                try:
                    status, version, h, prev, added = await self.send(op)
                except RedisRefused:  # Redis answered: not applied, and a replay would be refused too
                    raise
                except RedisUnavailable as exc:  # maybe applied (when sent): the op id tells on replay
                    return planned, self._queue(replace(planned, op=op), in_doubt=exc.tried)  # same check: a fresh read
                if status == "ok" and op.kind == "put_profile":  # created here, or over another replica's
                    planned = replace(planned, created=added)
                if status in ("ok", "applied", "gone"):
                    based_on_read = prev == (cur.last_op if cur is not None else "")
                    return await self._settle(name, planned, version, h, based_on_read), "redis"
                if status == "capacity":
                    raise self._refused("models" if planned.op.kind == "put_graph" else "profiles", name)
                if expect is not None:
                    raise VersionConflict(name, expect, version or None)
            raise VersionConflict(name, None, version or None)

    async def _current(self, name: str) -> tuple[ModelState | None, bool]:
        """(state, online): fresh from Redis when it is reachable and nothing of `name` is
        queued, else the cached state (offline). Raises RedisRefused (Redis busy: a write now
        would be refused too). One round trip at most."""
        if self.link.enabled and not self.outbox.has(name):
            try:
                return await self.cache.fetch(name), True
            except RedisRefused:
                raise
            except RedisUnavailable:
                pass
        return self.cache.models.get(name), False

    def _mode(self, online: bool) -> str:
        """The stored word of a write that changed nothing: redis, pending or memory."""
        return "redis" if online else ("pending" if self.link.enabled else "memory")

    def _queue(self, planned: Planned, in_doubt: bool = False) -> str:
        """Apply a write to the cache; queue it when Redis is configured (`in_doubt`: Redis may
        have applied it, so it is queued past the cap, `Outbox.add`). Returns the stored word."""
        assert planned.op is not None
        self.cache.changed()
        stored = "memory"
        if self.link.enabled:
            try:
                self.outbox.add(planned.op, in_doubt)
            except CapacityExceeded:
                self.metrics.capacity_refusals.labels("pending writes").inc()
                raise
            stored = "pending"
        if planned.after is None:
            self.cache.forget(planned.op.model)
        else:
            self.cache.remember(planned.op.model, planned.after)
        return stored

    async def _settle(self, name: str, planned: Planned, version: int, h: str, based_on_read: bool) -> Planned:
        """Cache the state Redis holds after an applied write: the planned state when Redis
        reports the version it implies and the write went onto the state it was planned on
        (`based_on_read`: the last write before it is the one read), else (another replica's
        writes landed in between: a write without If-Match checks only the graph, and a model
        deleted and created again can be back at the same version) the model read again. O(1),
        or one round trip."""
        self.cache.changed()
        if planned.after is None or version == 0:
            self.cache.forget(name)
            return planned
        assert planned.op is not None
        after = replace(
            planned.after, version=version, graph_hash=h or planned.after.graph_hash, last_op=planned.op.op_id
        )
        if version != planned.after.version or not based_on_read:
            try:
                after = await self.cache.fetch(name) or after
            except RedisUnavailable:
                self.cache.forget(name)
                return replace(planned, after=after)
        self.cache.remember(name, after)
        return replace(planned, after=after)

    async def send(self, op: Op) -> tuple[str, int, str, str, bool]:
        """Run `op` through WRITE_MODEL: (status, version, graph hash, the id of the write it
        went onto: '' unless it changed the model, whether it created a profile's tier). Raises
        RedisUnavailable. One round trip."""
        args = op.script_args(self.settings.max_models, self.settings.max_profiles_per_model)
        res = await self.link.script(op.kind, WRITE_MODEL, op.script_keys(self.keys), args)
        status, version, h = res[:3]
        prev = _text(res[3]) if len(res) > 3 else ""
        return _text(status), int(version), _text(h), prev, len(res) > 4 and int(res[4]) == 1


def _text(v: Any) -> str:
    """A Redis reply value (bytes or other) as text."""
    return v.decode() if isinstance(v, bytes) else str(v)
