"""Models and profiles: Redis is the truth, shared by every replica; each replica keeps a bounded
LRU of the models it uses (at most DAPDEE_MAX_MODELS) and reads a model on first use.

Writes (put_graph, delete_model, put_profile, delete_profile) read the model fresh from Redis,
check `expect_version` (If-Match), and apply one `writes.Op` through the `WRITE_MODEL` script,
which applies it only if Redis still holds the version the replica read; a race lost to another
replica is retried on the new state (or is a VersionConflict when the caller named a version).

While Redis is unavailable a write is applied to this replica's cache and queued in the outbox
(answer: `"stored": "pending"`). The refresh loop replays queued writes in order once Redis is
back; each is applied only if its base version is still the stored one. A queued write that is
not applied (another replica changed the model meanwhile, or a cap was reached) is a conflict:
counted in `dapdee_planner_write_conflicts_total`, logged at WARNING with the model and both
versions, and the model is reloaded from Redis — a newer write is never overwritten. Later
queued writes of that model are conflicts too (they built on the one not applied).

If Redis comes back empty (restarted without persistence, or flushed), the replica writes back
every model it holds (queued changes included) where no other replica did so first. Redis's loss
is told by the epoch key (`Keys.epoch`), not by the model list being empty: another replica's
write back, or any PUT, may land first. A write back cut short is taken up again at the next
refresh until every model has been sent.

A read that was on its way while the models changed (a write through this replica, or a refresh
that saw another replica's) is answered but not cached: it may be older than what changed.

`close` replays what it can within a bounded time; a queued write still unwritten then is
logged at ERROR and counted in `dapdee_planner_writes_lost_total`, never dropped silently. Queued
writes of a replica that dies during an outage are lost (they lived in its memory only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.planner.config import Settings
from dapdee.planner.errors import CapacityExceeded, ModelUnreachable, RedisUnavailable, VersionConflict
from dapdee.planner.keys import Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.modelstate import ModelState, Profile, PutResult, decode_profiles, parse_graph
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.writes import WRITE_MODEL, Op, Outbox

log = logging.getLogger("dapdee.planner")

WRITE_ATTEMPTS = 5  # a write that keeps losing races to other replicas gives up (409)


@dataclass(frozen=True)
class Planned:
    """A write decided against the current state: the operation (None: nothing changes), the
    state after it (None: the model is gone), and what the answer reports."""

    op: Op | None
    after: ModelState | None
    created: bool = False
    dropped: tuple[str, ...] = ()


class Catalog:
    """The models of one replica: LRU cache, versioned writes, outage queue (module docstring)."""

    def __init__(self, settings: Settings, metrics: PlannerMetrics, link: RedisLink, keys: Keys) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self.models: OrderedDict[str, ModelState] = OrderedDict()
        self.outbox = Outbox(settings.max_pending_writes)
        self._lock = asyncio.Lock()
        self._gen: bytes | None = None
        self._epoch: bytes | None = None  # the epoch of Redis's state this replica last synced with
        self._changes = 0  # counts changes to the models seen here (reads in flight check it)
        # models Redis lists but this replica cannot read (graph missing or unreadable, e.g. over
        # lowered graph limits): (version, hash), so a PUT can replace and a DELETE remove them
        self._broken: dict[str, tuple[int, str]] = {}
        # replay state that survives a replay cut short: models a queued write of which was not
        # applied (their later queued writes are conflicts too), models to re-read from Redis
        self._failed: set[str] = set()
        self._to_reload: set[str] = set()

    @property
    def pending_count(self) -> int:
        """Queued writes, plus models whose replayed writes still wait to be re-read."""
        return len(self.outbox) + len(self._to_reload)

    # ---- the cache ---------------------------------------------------------------------------
    def _changed(self) -> None:
        """A model changed (a write here, or one another replica made, seen by a refresh): a read
        in flight may be older, so it is not cached (`get`, `refresh`)."""
        self._changes += 1

    def _remember(self, name: str, st: ModelState) -> None:
        """Cache `st`, evicting the least recently used models with nothing queued. O(1) amortised."""
        self.models[name] = st
        self.models.move_to_end(name)
        if len(self.models) > self.settings.max_models:
            for old in list(self.models):
                if len(self.models) <= self.settings.max_models:
                    break
                if old != name and not self.outbox.has(old):
                    del self.models[old]

    def _forget(self, name: str) -> None:
        self.models.pop(name, None)

    # ---- reads -------------------------------------------------------------------------------
    async def fetch(self, name: str) -> ModelState | None:
        """The model as Redis holds it now (None: absent or unreadable), read in one MULTI (a
        consistent snapshot); reuses the cached parsed graph when its hash is unchanged. Raises
        RedisUnavailable. One round trip plus O(size) decoding."""
        k = self.keys

        async def f(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            pipe.hget(k.models, name)
            pipe.hget(k.versions, name)
            pipe.get(k.graph(name))
            pipe.hgetall(k.profiles(name))
            return await pipe.execute()

        h_b, v_b, raw_graph, raw_profiles = await self.link.call("load_model", f)
        self._broken.pop(name, None)
        if h_b is None:
            return None
        h = h_b.decode()
        version = int(v_b) if v_b else 1
        old = self.models.get(name)
        if old is not None and old.graph_hash == h:
            graph = old.graph
        else:
            try:
                if raw_graph is None:
                    raise CostGraphError("the graph key is missing")
                graph = await parse_graph(raw_graph, self.settings.graph_limits())
            except CostGraphError as exc:
                self.metrics.cache_errors.labels("decode_graph").inc()
                log.warning("stored cost graph %r unreadable (%s): a PUT replaces it, a DELETE removes it", name, exc)
                self._broken[name] = (version, h)
                return None
        profiles, bad = decode_profiles(name, raw_profiles)
        if bad:
            self.metrics.cache_errors.labels("decode_profile").inc(bad)
        return ModelState(graph, h, profiles, version)

    async def get(self, name: str) -> ModelState | None:
        """The cached model, else the stored one (cached from then on), else None. Raises
        ModelUnreachable when it is not cached and Redis cannot be read. O(1) when cached, else
        one round trip."""
        st = self.models.get(name)
        if st is not None:
            self.models.move_to_end(name)
            return st
        if not self.link.enabled or self.outbox.has(name):
            return None
        seen = self._changes
        try:
            st = await self.fetch(name)
        except RedisUnavailable:
            raise ModelUnreachable(name) from None
        if self._changes != seen or name in self.models:  # the models changed during the read
            return self.models.get(name, st)
        if st is not None:
            self._remember(name, st)
        return st

    async def refresh(self, name: str) -> ModelState | None:
        """Re-read one model from Redis now (None if Redis cannot say or the model is gone
        there). Models with queued changes answer from the cache."""
        if self.outbox.has(name) or not self.link.enabled:
            return self.models.get(name)
        seen = self._changes
        try:
            st = await self.fetch(name)
        except RedisUnavailable:
            return None
        if self.outbox.has(name) or self._changes != seen:  # a write or a refresh during the read
            return self.models.get(name)
        if st is None:
            self._forget(name)
        else:
            self._remember(name, st)
        return st

    async def list_all(self) -> dict[str, ModelState]:
        """Every model: Redis's list when reachable (other replicas' models too; each read and
        cached on first use), else the cache. O(models) round trips at most."""
        try:
            stored = await self.link.call("list_models", lambda r: r.hkeys(self.keys.models))
        except RedisUnavailable:
            return dict(sorted(self.models.items()))
        names = {n.decode() for n in stored} | {n for n in self.models if self.outbox.has(n)}
        out = {}
        for name in sorted(names):
            with contextlib.suppress(ModelUnreachable):  # Redis went away mid-listing
                st = await self.get(name)
                if st is not None:
                    out[name] = st
        return out

    # ---- writes ------------------------------------------------------------------------------
    async def put_graph(self, graph: CostGraph, expect_version: int | None = None) -> PutResult:
        """Store a model's cost graph. Profiles survive when the structure (nodes, exits) is
        unchanged, else they are dropped (they describe other nodes). An identical graph changes
        nothing (same version). O(graph size) plus one or two round trips."""
        name = graph.model
        h = graph.content_hash()
        text = graph.to_json(indent=None)
        skey = graph.structure_key()

        def plan(cur: ModelState | None) -> Planned:
            if cur is None and name in self._broken:  # replace what cannot be read
                v, old_h = self._broken[name]
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
        """Forget a model and its profiles. False if it was unknown."""

        def plan(cur: ModelState | None) -> Planned | None:
            if cur is None and name in self._broken:
                return Planned(Op("delete_model", name, *self._broken[name]), None)
            if cur is None:
                return None
            return Planned(Op("delete_model", name, cur.version, cur.graph_hash), None)

        planned, _ = await self._write(name, expect_version, plan)
        return planned is not None

    async def put_profile(self, name: str, prof: Profile, expect_version: int | None = None) -> PutResult | None:
        """Store one tier's profile of a model (None if the model is unknown). Only that field
        of the profiles hash is written. O(profile size) plus one or two round trips."""
        text = prof.to_json()

        def plan(cur: ModelState | None) -> Planned | None:
            if cur is None:
                return None
            old = cur.profiles.get(prof.tier)
            if old is not None and old.hash == prof.hash:
                return Planned(None, cur)
            if not set(prof.timings_ms) <= {n.name for n in cur.graph.nodes}:
                raise VersionConflict(name, expect_version, cur.version)  # the graph changed under it
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
        """Forget one profile: None if the model is unknown, False if the tier is."""
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
        unknown. Raises VersionConflict, CapacityExceeded, and ModelUnreachable for a change to a
        model this replica neither holds nor can read (Redis away)."""
        version = 0
        async with self._lock:
            for _ in range(WRITE_ATTEMPTS):
                cur, online = await self._current(name)
                if not online and cur is None and not creates and self.link.enabled and not self.outbox.has(name):
                    raise ModelUnreachable(name)  # Redis may hold it: "unknown" would be a guess
                if expect is not None and (cur is not None or creates):
                    actual = cur.version if cur is not None else None
                    if actual != expect:
                        raise VersionConflict(name, expect, actual)
                planned = plan(cur)
                if planned is None or planned.op is None:
                    return planned, self._mode(online)
                if not online:
                    if planned.created and creates and len(self.models) >= self.settings.max_models:
                        raise self._refused("models", name)  # without Redis: the models held here
                    return planned, self._queue(planned)
                op = planned.op if expect is not None else replace(planned.op, check="graph")
                try:
                    status, version, h = await self._send(op)
                except RedisUnavailable:  # maybe applied: the op id tells on replay
                    return planned, self._queue(planned)
                if status in ("ok", "applied", "gone"):
                    return await self._settle(name, planned, version, h), "redis"
                if status == "capacity":
                    raise self._refused("models" if planned.op.kind == "put_graph" else "profiles", name)
                if expect is not None:
                    raise VersionConflict(name, expect, version or None)
            raise VersionConflict(name, None, version or None)

    async def _current(self, name: str) -> tuple[ModelState | None, bool]:
        """(state, online): fresh from Redis when it is reachable and nothing of `name` is
        queued, else the cached state (offline)."""
        if self.link.enabled and not self.outbox.has(name):
            try:
                return await self.fetch(name), True
            except RedisUnavailable:
                pass
        return self.models.get(name), False

    def _mode(self, online: bool) -> str:
        return "redis" if online else ("pending" if self.link.enabled else "memory")

    def _queue(self, planned: Planned) -> str:
        """Apply a write to the cache; queue it when Redis is configured. Returns the stored word."""
        assert planned.op is not None
        self._changed()
        stored = "memory"
        if self.link.enabled:
            try:
                self.outbox.add(planned.op)
            except CapacityExceeded:
                self.metrics.capacity_refusals.labels("pending writes").inc()
                raise
            stored = "pending"
        if planned.after is None:
            self._forget(planned.op.model)
        else:
            self._remember(planned.op.model, planned.after)
        return stored

    async def _settle(self, name: str, planned: Planned, version: int, h: str) -> Planned:
        """Cache the state Redis holds after an applied write: the planned state when Redis
        reports the version it implies, else (another replica's write landed in between) the
        model read again. O(1), or one round trip."""
        self._changed()
        if planned.after is None or version == 0:
            self._forget(name)
            return planned
        after = replace(planned.after, version=version, graph_hash=h or planned.after.graph_hash)
        if version != planned.after.version:
            try:
                after = await self.fetch(name) or after
            except RedisUnavailable:
                self._forget(name)
                return replace(planned, after=after)
        self._remember(name, after)
        return replace(planned, after=after)

    async def _send(self, op: Op) -> tuple[str, int, str]:
        """Run `op` through WRITE_MODEL: (status, version, graph hash). Raises RedisUnavailable."""
        args = op.script_args(self.settings.max_models, self.settings.max_profiles_per_model)
        res = await self.link.script(op.kind, WRITE_MODEL, op.script_keys(self.keys), args)
        status, version, h = res
        return _text(status), int(version), _text(h)

    # ---- the refresh loop's part ------------------------------------------------------------
    async def sync(self) -> None:
        """One refresh: write this replica's models back if Redis lost its state (its epoch is not
        the one this replica last synced with), replay queued writes, and re-read cached models
        whose version moved (the shared generation counter moved). Raises RedisUnavailable
        (queued writes stay queued; a write back cut short is done again). O(cached models) plus
        one round trip per queued write and per changed model."""
        async with self._lock:
            epoch = await self._epoch_now()
            gen = await self.link.call("gen", lambda r: r.get(self.keys.gen))
            # before the first sync: only an empty Redis tells
            lost = epoch != self._epoch if self._epoch is not None else gen is None
            if lost and self.models:
                await self._restore_all()
                gen = await self.link.call("gen", lambda r: r.get(self.keys.gen))
            self._epoch = epoch
            if self.outbox:
                await self._replay()
                gen = await self.link.call("gen", lambda r: r.get(self.keys.gen))
            if gen != self._gen:
                self._changed()
                await self._reload_changed()
                self._gen = gen

    async def _epoch_now(self) -> bytes:
        """The epoch of Redis's state, set to a new random token where there is none. One round
        trip (SET NX and GET in one MULTI)."""
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
        log.warning("redis lost the planner's state; writing back the %d models this replica holds", len(self.models))
        for name, st in list(self.models.items()):
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
            status, _, _ = await self._send(op)
            if status == "ok":
                self.outbox.drop_model(name)  # its queued changes are part of what was written
            elif status == "capacity":
                cap = self.settings.max_models
                log.warning("model %r not written back: the cap of %d models is reached", name, cap)

    async def _replay(self) -> None:
        """Replay queued writes oldest first; a write whose base is no longer stored (or that hits
        a cap) is a conflict, and so is every later queued write of that model. Then the models
        touched are reloaded from Redis (until then they count as pending). Raises
        RedisUnavailable (the rest stays queued, and the next replay goes on where this stopped)."""
        n = conflicts = 0
        while self.outbox:
            op = self.outbox.first()
            assert op is not None
            if op.model in self._failed:
                self.outbox.pop_first()
                self._conflict(op, "version", None)
                conflicts += 1
                continue
            status, version, _ = await self._send(op)
            self.outbox.pop_first()
            self._to_reload.add(op.model)
            n += 1
            if status in ("conflict", "capacity"):
                self._failed.add(op.model)
                self._conflict(op, "version" if status == "conflict" else "capacity", version)
                conflicts += 1
        for name in sorted(self._to_reload):
            if not self.outbox.has(name):
                st = await self.fetch(name)
                self._forget(name) if st is None else self._remember(name, st)
                self._to_reload.discard(name)
                self._failed.discard(name)
        level = logging.WARNING if conflicts else logging.INFO
        log.log(level, "replayed %d queued writes to redis (%d not applied)", n, conflicts)

    def _conflict(self, op: Op, reason: str, stored_version: int | None) -> None:
        self.metrics.write_conflicts.labels(reason).inc()
        if reason == "capacity":
            why = "its cap was reached meanwhile"
        elif stored_version is None:
            why = "an earlier queued write of this model was not applied"
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

    async def _reload_changed(self) -> None:
        """Re-read the cached models (nothing queued) whose stored version or hash differs from
        the cached one; drop those gone from Redis. One round trip plus one per changed model."""
        names = [n for n in self.models if not self.outbox.has(n)]
        if not names:
            return
        k = self.keys

        async def f(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            pipe.hmget(k.models, names)
            pipe.hmget(k.versions, names)
            return await pipe.execute()

        hashes, versions = await self.link.call("versions", f)
        for name, h, v in zip(names, hashes, versions, strict=True):
            st = self.models.get(name)
            if st is None:
                continue
            if h is None:
                self._forget(name)
            elif (int(v) if v else 1) != st.version or h.decode() != st.graph_hash:
                new = await self.fetch(name)
                self._forget(name) if new is None else self._remember(name, new)

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
    return v.decode() if isinstance(v, bytes) else str(v)
