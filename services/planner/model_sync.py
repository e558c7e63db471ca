"""Keeping one replica's models in step with Redis at each refresh: following Redis's state (its
epoch and the shared generation counter), writing the models back after Redis lost them, and
replaying the writes `model_writes` queued while Redis was unavailable.

The refresh loop replays queued writes in order once Redis is back; each is applied only if its
base version is still the stored one. A queued write that is not applied (another replica
changed the model meanwhile, or a cap was reached) is a conflict: counted in
`dapdee_planner_write_conflicts_total`, logged at WARNING with the model and both versions, and
the model is reloaded from Redis — a newer write is never overwritten. Later queued writes of
that model are conflicts too (they built on the one not applied).

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
from typing import Any

from dapdee.planner.config import Settings
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.keys import Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.model_writes import Send
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.writes import Op, Outbox

log = logging.getLogger("dapdee.planner")


class ModelSync:
    """The refresh loop's model part for one replica (module docstring): `sync` follows Redis's
    state, writes back after its loss, replays `outbox` and has `cache` follow other replicas'
    writes; `drain` replays at shutdown. `lock` is the model writer's (`ModelWriter.lock`): a
    refresh and a write never interleave. `send` runs one operation through the write script
    (`ModelWriter.send`)."""

    def __init__(
        self,
        settings: Settings,
        metrics: PlannerMetrics,
        link: RedisLink,
        keys: Keys,
        cache: ModelCache,
        outbox: Outbox,
        lock: asyncio.Lock,
        send: Send,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self.cache = cache
        self.outbox = outbox
        self._lock = lock
        self._send = send
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
        (another replica wrote it back, or it was created anew) and no delete since ended it
        (another replica wrote it back and an admin deleted it). One round trip per model."""
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
            elif status == "deleted":
                log.warning("model %r not written back: it was deleted since redis lost its state", name)

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
