"""Writing models and profiles, and the outbox of writes made while Redis is unavailable.

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
raises, and the route answers 503 with Retry-After. The refresh loop replays queued writes in
order once Redis is back; each is applied only if its base version is still the stored one. A
queued write that is not applied (another replica changed the model meanwhile, or a cap was
reached) is a conflict: counted in `dapdee_planner_write_conflicts_total`, logged at WARNING
with the model and both versions, and the model is reloaded from Redis — a newer write is never
overwritten. Later queued writes of that model are conflicts too (they built on the one not
applied).

If Redis comes back empty (restarted without persistence, or flushed), the replica writes back
every model it holds (queued changes included) where no other replica did so first. Redis's loss
is told by the epoch key (`Keys.epoch`), not by the model list being empty: another replica's
write back, or any PUT, may land first. A write back cut short is taken up again at the next
refresh until every model has been sent.

`drain` (at close) replays what it can within a bounded time; a queued write still unwritten
then is logged at ERROR and counted in `dapdee_planner_writes_lost_total`, never dropped
silently. Queued writes of a replica that dies during an outage are lost (they lived in its
memory only).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
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

log = logging.getLogger("dapdee.planner")

WRITE_ATTEMPTS = 5  # a write that keeps losing races to other replicas gives up (409)
INLINE_GRAPH_SIZE = 2048  # nodes + edges: a larger graph is hashed and encoded in a worker thread


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
    """Versioned writes of one replica's models and profiles, and the outbox of those made while
    Redis is unavailable: queued, replayed, or written back after Redis lost its state (module
    docstring). Keeps `cache` up to date with what it writes; `sync` also has `cache` follow
    other replicas' writes."""

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
        self._lock = asyncio.Lock()
        self._gen: bytes | None = None
        self._epoch: bytes | None = None  # the epoch of Redis's state this replica last synced with
        # replay state that survives a replay cut short: models a queued write of which was not
        # applied (their later queued writes are conflicts too), models to re-read from Redis
        self._failed: set[str] = set()
        self._to_reload: set[str] = set()

    @property
    def pending_count(self) -> int:
        """Queued writes, plus models whose replayed writes still wait to be re-read."""
        return len(self.outbox) + len(self._to_reload)

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
        async with self._lock:
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
                    status, version, h, prev, added = await self._send(op)
                except RedisRefused:  # Redis answered: not applied, and a replay would be refused too
                    raise
                except RedisUnavailable:  # maybe applied: the op id tells on replay
                    return planned, self._queue(replace(planned, op=op))  # decided on a fresh read: same check
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

    def _queue(self, planned: Planned) -> str:
        """Apply a write to the cache; queue it when Redis is configured. Returns the stored word."""
        assert planned.op is not None
        self.cache.changed()
        stored = "memory"
        if self.link.enabled:
            try:
                self.outbox.add(planned.op)
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

    async def _send(self, op: Op) -> tuple[str, int, str, str, bool]:
        """Run `op` through WRITE_MODEL: (status, version, graph hash, the id of the write it
        went onto: '' unless it changed the model, whether it created a profile's tier). Raises
        RedisUnavailable. One round trip."""
        args = op.script_args(self.settings.max_models, self.settings.max_profiles_per_model)
        res = await self.link.script(op.kind, WRITE_MODEL, op.script_keys(self.keys), args)
        status, version, h = res[:3]
        prev = _text(res[3]) if len(res) > 3 else ""
        return _text(status), int(version), _text(h), prev, len(res) > 4 and int(res[4]) == 1

    # ---- the refresh loop's part ------------------------------------------------------------
    async def sync(self) -> None:
        """One refresh: write this replica's models back if Redis lost its state (its epoch is not
        the one this replica last synced with), replay queued writes, re-read the models a replay
        touched, and re-read cached models that changed in Redis (when the shared generation
        counter moved, or Redis lost its state: the counter restarts then, and may come back to
        the value last seen). Raises RedisUnavailable (queued writes stay queued, models still to
        re-read stay pending; a write back cut short is done again). O(cached models) plus one
        round trip per queued write and per changed model."""
        async with self._lock:
            epoch = await self._epoch_now()
            gen = await self.link.call("gen", lambda r: r.get(self.keys.gen))
            # before the first sync: only an empty Redis tells
            lost = epoch != self._epoch if self._epoch is not None else gen is None
            if lost and self.cache.models:
                await self._restore_all()
                gen = await self.link.call("gen", lambda r: r.get(self.keys.gen))
            self._epoch = epoch
            if self.outbox:
                await self._replay()
                gen = await self.link.call("gen", lambda r: r.get(self.keys.gen))
            if self._to_reload:
                await self._reread_replayed()
            if lost or gen != self._gen:
                self.cache.changed()
                await self.cache.reload_changed()
                self._gen = gen

    async def _epoch_now(self) -> bytes:
        """The epoch of Redis's state, set to a new random token where there is none. Read first,
        written only where missing (a write, refused while Redis is out of memory, at every
        refresh would fail the refresh of a Redis that serves reads); the SET NX and GET in one
        MULTI then make every replica that finds it missing agree on the first one set. One
        round trip; two for an empty Redis."""
        got = await self.link.call("epoch", lambda r: r.get(self.keys.epoch))
        if got is not None:
            return got
        token = secrets.token_hex(16)

        async def f(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            pipe.set(self.keys.epoch, token, nx=True)
            pipe.get(self.keys.epoch)
            return await pipe.execute()

        return (await self.link.call("epoch", f))[1]

    async def _restore_all(self) -> None:
        """Redis lost the planner's state (restarted without persistence, or flushed): write back
        each model this replica holds, queued changes included, where Redis does not hold it
        (another replica wrote it back, or it was created anew). One round trip per model."""
        models = self.cache.models
        log.warning("redis lost the planner's state; writing back the %d models this replica holds", len(models))
        for name, st in list(models.items()):
            op = Op(
                "restore",
                name,
                0,
                "",
                st.graph_hash,
                st.graph.to_json(indent=None),
                restore_version=st.version,
                restore_profiles=tuple((t, p.to_json()) for t, p in sorted(st.profiles.items())),
            )
            status, *_ = await self._send(op)
            if status == "ok":
                self.outbox.drop_model(name)  # its queued changes are part of what was written
            elif status == "capacity":
                cap = self.settings.max_models
                log.warning("model %r not written back: the cap of %d models is reached", name, cap)

    async def _replay(self) -> None:
        """Replay queued writes oldest first; a write whose base is no longer stored (or that hits
        a cap) is a conflict, and so is every later queued write of that model. The models
        touched are to be re-read from Redis (`_reread_replayed`; until then they count as
        pending). Raises RedisUnavailable (the rest stays queued, and the next replay goes on
        where this stopped). One round trip per queued write."""
        n = conflicts = 0
        while self.outbox:
            op = self.outbox.first()
            assert op is not None
            if op.model in self._failed:
                self.outbox.pop_first()
                self._conflict(op, "version", None)
                conflicts += 1
                continue
            status, version, *_ = await self._send(op)
            self.outbox.pop_first()
            self._to_reload.add(op.model)
            n += 1
            if status in ("conflict", "capacity"):
                self._failed.add(op.model)
                self._conflict(op, "version" if status == "conflict" else "capacity", version)
                conflicts += 1
        level = logging.WARNING if conflicts else logging.INFO
        log.log(level, "replayed %d queued writes to redis (%d not applied)", n, conflicts)

    async def _reread_replayed(self) -> None:
        """Re-read from Redis each model a replay touched (none of its writes queued any more):
        what Redis holds replaces what this replica applied to its cache. Raises
        RedisUnavailable (the rest are re-read at the next refresh). One round trip per model."""
        for name in sorted(self._to_reload):
            if not self.outbox.has(name):
                st = await self.cache.fetch(name)
                self.cache.forget(name) if st is None else self.cache.remember(name, st)
                self._to_reload.discard(name)
                self._failed.discard(name)

    def _conflict(self, op: Op, reason: str, stored_version: int | None) -> None:
        """Count and log (WARNING) a queued write not applied: `reason` is "version" or
        "capacity"; `stored_version` None means an earlier queued write of the model failed."""
        self.metrics.write_conflicts.labels(reason).inc()
        if reason == "capacity":
            why = "its cap was reached meanwhile"
        elif stored_version is None:
            why = "an earlier queued write of this model was not applied"
        elif op.base_version == 0:  # queued as a create of a model this replica could not read
            why = f"Redis holds version {stored_version} (stored before the outage, or by another replica meanwhile)"
        else:
            why = f"Redis holds version {stored_version} (written by another replica meanwhile)"
        log.warning(
            "queued write not applied: %s of model %r was based on version %d, but %s; the model is "
            "reloaded from Redis",
            op.describe(),
            op.model,
            op.base_version,
            why,
        )

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: one last refresh (replaying queued writes) within `timeout_s`; every queued
        write still unwritten is logged at ERROR and counted as lost."""
        if not self.outbox:
            return
        self.link.retry_now()
        try:
            await asyncio.wait_for(self.sync(), timeout_s)
        except (RedisUnavailable, asyncio.TimeoutError):
            pass
        for op in self.outbox:
            self.metrics.writes_lost.inc()
            log.error(
                "queued write lost at shutdown: %s of model %r (based on version %d) was answered with "
                '"stored": "pending" but Redis was unavailable until the end',
                op.describe(),
                op.model,
                op.base_version,
            )
        self.outbox.clear()


def _text(v: Any) -> str:
    """A Redis reply value (bytes or other) as text."""
    return v.decode() if isinstance(v, bytes) else str(v)
