"""The planner's Redis key layout (`P` = DAPDEE_KEY_PREFIX, schema `v1`).

Models (never evicted: the planner's Redis runs `maxmemory-policy noeviction`; count cap
DAPDEE_MAX_MODELS, profiles per model DAPDEE_MAX_PROFILES_PER_MODEL):

- `P:v1:models`              hash  model -> content hash of its cost graph (the model list)
- `P:v1:versions`            hash  model -> version (1 when created, +1 per change; a model
                                   stored before versions existed counts as version 1)
- `P:v1:lastop`              hash  model -> ids of the last 16 writes applied to it, newest
                                   first, space-separated (lets a replica whose reply was lost
                                   tell its own write from another's)
- `P:v1:deleted-ops:{model}` string a deleted model's last write ids, for a day (TTL): a model
                                   created again meanwhile is not deleted by a replay
- `P:v1:graph:{model}`       string cost graph JSON (as PUT)
- `P:v1:profiles:{model}`    hash  tier -> profile JSON {"kind", "timings_ms", "meta"}
- `P:v1:gen`                 counter bumped by every model or profile change; replicas poll it
- `P:v1:epoch`               string a random token, set by the first replica to find none: a
                                   Redis that lost the planner's state (restarted without
                                   persistence, flushed) holds none or another, and every replica
                                   then writes back the models it holds and its live
                                   workers (until their last heartbeat's TTL ends)

Workers (count cap DAPDEE_MAX_WORKERS; expiry by Redis's own clock, `TIME` inside the scripts):

- `P:v1:workers:exp`         zset  worker URL -> expiry, ms since the epoch by Redis's clock
- `P:v1:workers:info`        hash  worker URL -> worker JSON (its last heartbeat)
- `P:v1:workers:refused`     hash  worker URL -> {"at", "capacity"}: Redis's time (ms) and the
                                   capacity of its last heartbeat refused for stating less
                                   capacity than its leases hold, while that heartbeat's
                                   re-solve is pending (removed when one is registered)

Plan maps (a cache: count cap DAPDEE_PLANMAP_REDIS_MAX, byte cap DAPDEE_PLANMAP_MAX_BYTES per
map, TTL DAPDEE_PLANMAP_TTL_S):

- `P:v1:planmap:{g}:{d}:{e}` PlanMap.to_bytes() for graph hash g, device profile hash d and edge
                             profile hash e (`graph` where the graph's own timings are used);
                             `:cap{N}` appended when DAPDEE_PLANMAP_CAP is set; expires (PX)
- `P:v1:planmaps`            zset  plan-map key -> when stored (µs, Redis's clock); the oldest
                             beyond the count cap are deleted with their maps
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA = "v1"
GRAPH_TIMINGS = "graph"  # plan-map key part when the cost graph's own timings are used


@dataclass(frozen=True)
class Keys:
    """Every key of one planner deployment (one key prefix)."""

    base: str  # "<prefix>:v1"

    @classmethod
    def for_prefix(cls, prefix: str) -> Keys:
        return cls(f"{prefix}:{SCHEMA}")

    @property
    def models(self) -> str:
        return f"{self.base}:models"

    @property
    def versions(self) -> str:
        return f"{self.base}:versions"

    @property
    def lastop(self) -> str:
        return f"{self.base}:lastop"

    @property
    def gen(self) -> str:
        return f"{self.base}:gen"

    @property
    def epoch(self) -> str:
        return f"{self.base}:epoch"

    def graph(self, model: str) -> str:
        return f"{self.base}:graph:{model}"

    def profiles(self, model: str) -> str:
        return f"{self.base}:profiles:{model}"

    def deleted_ops(self, model: str) -> str:
        return f"{self.base}:deleted-ops:{model}"

    @property
    def workers_exp(self) -> str:
        return f"{self.base}:workers:exp"

    @property
    def workers_info(self) -> str:
        return f"{self.base}:workers:info"

    @property
    def workers_refused(self) -> str:
        return f"{self.base}:workers:refused"

    @property
    def planmaps(self) -> str:
        return f"{self.base}:planmaps"

    def planmap(self, key: tuple[str, str, str], cap: int | None) -> str:
        """The key of one plan map. The enumeration cap decides which parts of a map are exact,
        so replicas with other caps never share one."""
        tail = f":cap{cap}" if cap is not None else ""
        return f"{self.base}:planmap:{key[0]}:{key[1]}:{key[2]}{tail}"
