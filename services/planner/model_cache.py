"""Reading models: Redis is the truth, shared by every replica; each replica keeps a bounded
LRU of the models it uses (at most DAPDEE_MAX_MODELS) and reads a model on first use.

A model with writes queued in the outbox (`model_writes`) is never evicted, and is answered
from the cache only: Redis does not hold its queued changes yet.

A read that was on its way while the models changed (a write through this replica, or a refresh
that saw another replica's) is answered but not cached: it may be older than what changed.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from dapdee.costgraph import CostGraphError
from dapdee.planner.config import Settings
from dapdee.planner.errors import ModelUnreachable, RedisUnavailable
from dapdee.planner.keys import Keys
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.modelstate import ModelState, decode_profiles, parse_graph
from dapdee.planner.redis_link import RedisLink

log = logging.getLogger("dapdee.planner")

SNAPSHOT_TRIES = 3  # reads of one model that concurrent writes spoiled before one MULTI settles it


class ModelCache:
    """The models one replica has read from Redis, in a bounded LRU (module docstring).

    `queued(name)` tells whether the model has writes queued while Redis is unavailable (the
    outbox's `has`): such a model is answered from the cache only and never evicted."""

    def __init__(
        self,
        settings: Settings,
        metrics: PlannerMetrics,
        link: RedisLink,
        keys: Keys,
        queued: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self.queued = queued
        self.models: OrderedDict[str, ModelState] = OrderedDict()
        self._changes = 0  # counts changes to the models seen here (reads in flight check it)
        # models Redis lists but this replica cannot read (graph missing or unreadable, e.g. over
        # lowered graph limits): (version, hash), so a PUT can replace and a DELETE remove them
        self.unreadable: dict[str, tuple[int, str]] = {}

    # ---- the cache ---------------------------------------------------------------------------
    def changed(self) -> None:
        """A model changed (a write here, or one another replica made, seen by a refresh): a read
        in flight may be older, so it is not cached (`get`, `refresh`)."""
        self._changes += 1

    def remember(self, name: str, st: ModelState) -> None:
        """Cache `st`, evicting the least recently used models with nothing queued. O(1) amortised."""
        self.models[name] = st
        self.models.move_to_end(name)
        if len(self.models) > self.settings.max_models:
            for old in list(self.models):
                if len(self.models) <= self.settings.max_models:
                    break
                if old != name and not self.queued(old):
                    del self.models[old]

    def forget(self, name: str) -> None:
        """Drop a model from the cache (if cached). O(1)."""
        self.models.pop(name, None)

    # ---- reads -------------------------------------------------------------------------------
    async def fetch(self, name: str) -> ModelState | None:
        """The model as Redis holds it now (None: absent or unreadable), a consistent snapshot
        (`_snapshot`); reuses the cached parsed graph when its hash is unchanged. Raises
        RedisUnavailable. One round trip (rarely up to SNAPSHOT_TRIES) plus O(size) decoding."""
        h_b, v_b, op_b, raw_graph, raw_profiles = await self._snapshot(name)
        self.unreadable.pop(name, None)
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
                self.unreadable[name] = (version, h)
                return None
        profiles, bad = decode_profiles(name, raw_profiles)
        if bad:
            self.metrics.cache_errors.labels("decode_profile").inc(bad)
        return ModelState(graph, h, profiles, version, last_op(op_b))

    async def _snapshot(self, name: str) -> list[Any]:
        """[hash, version, last write ids, graph, profiles] of `name` as Redis holds them at one
        moment. The five keys are read in a plain pipeline (a MULTI is refused while Redis is out
        of memory, though reads alone are served) between two reads of the shared generation
        counter, which every change of a model increments (`WRITE_MODEL`): equal counters mean
        no change landed among the reads. Else it reads again, the last try in one MULTI. Raises
        RedisUnavailable. One round trip; another per try a concurrent write spoiled."""
        k = self.keys

        def reads(pipe: Any) -> None:
            pipe.hget(k.models, name)
            pipe.hget(k.versions, name)
            pipe.hget(k.lastop, name)
            pipe.get(k.graph(name))
            pipe.hgetall(k.profiles(name))

        async def bracketed(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.get(k.gen)
            reads(pipe)
            pipe.get(k.gen)
            return await pipe.execute()

        async def atomic(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            reads(pipe)
            return await pipe.execute()

        for _ in range(SNAPSHOT_TRIES - 1):
            got = await self.link.call("load_model", bracketed)
            if got[0] == got[-1]:
                return got[1:-1]
        return await self.link.call("load_model", atomic)

    async def get(self, name: str) -> ModelState | None:
        """The cached model, else the stored one (cached from then on), else None. Raises
        ModelUnreachable when it is not cached and Redis cannot be read. O(1) when cached, else
        one round trip."""
        st = self.models.get(name)
        if st is not None:
            self.models.move_to_end(name)
            return st
        if not self.link.enabled or self.queued(name):
            return None
        seen = self._changes
        try:
            st = await self.fetch(name)
        except RedisUnavailable:
            raise ModelUnreachable(name) from None
        if self._changes != seen or name in self.models:  # the models changed during the read
            return self.models.get(name, st)
        if st is not None:
            self.remember(name, st)
        return st

    async def refresh(self, name: str) -> ModelState | None:
        """Re-read one model from Redis now (None if Redis cannot say or the model is gone
        there). Models with queued changes answer from the cache. One round trip at most."""
        if self.queued(name) or not self.link.enabled:
            return self.models.get(name)
        seen = self._changes
        try:
            st = await self.fetch(name)
        except RedisUnavailable:
            return None
        if self.queued(name) or self._changes != seen:  # a write or a refresh during the read
            return self.models.get(name)
        if st is None:
            self.forget(name)
        else:
            self.remember(name, st)
        return st

    async def list_all(self) -> dict[str, ModelState]:
        """Every model: Redis's list when reachable (other replicas' models too; each read and
        cached on first use), else the cache. O(models) round trips at most."""
        try:
            stored = await self.link.call("list_models", lambda r: r.hkeys(self.keys.models))
        except RedisUnavailable:
            return dict(sorted(self.models.items()))
        names = {n.decode() for n in stored} | {n for n in self.models if self.queued(n)}
        out = {}
        for name in sorted(names):
            with contextlib.suppress(ModelUnreachable):  # Redis went away mid-listing
                st = await self.get(name)
                if st is not None:
                    out[name] = st
        return out

    async def reload_changed(self) -> None:
        """Re-read the cached models (nothing queued) whose stored version, hash or last write
        differs from the cached one (a model deleted and created again restarts at version 1,
        maybe with the same graph); drop those gone from Redis. Raises RedisUnavailable. One
        round trip plus one per changed model.

        The three lists are read without MULTI (refused while Redis is out of memory): a write
        landing among them makes the model's triple mixed, so unequal to the cached one (each
        write stores a new write id) and the model is re-read in one snapshot (`fetch`); one
        landing after them moved the generation counter past what the refresh read, so the next
        refresh looks again."""
        names = [n for n in self.models if not self.queued(n)]
        if not names:
            return
        k = self.keys

        async def f(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.hmget(k.models, names)
            pipe.hmget(k.versions, names)
            pipe.hmget(k.lastop, names)
            return await pipe.execute()

        hashes, versions, ops = await self.link.call("versions", f)
        for name, h, v, op in zip(names, hashes, versions, ops, strict=True):
            st = self.models.get(name)
            if st is None:
                continue
            if h is None:
                self.forget(name)
            elif ((int(v) if v else 1), h.decode(), last_op(op)) != (
                st.version,
                st.graph_hash,
                st.last_op,
            ):
                new = await self.fetch(name)
                self.forget(name) if new is None else self.remember(name, new)


def last_op(raw: bytes | None) -> str:
    """The id of the last write applied to a model, from its stored recent op ids (newest
    first, space-separated; `writes.WRITE_MODEL`). O(len(raw))."""
    return raw.decode().split(" ", 1)[0] if raw else ""
