"""Planner settings (pydantic-settings, environment prefix `DAPDEE_`; the role tokens and
`DAPDEE_INSECURE` from the shared `SecuritySettings`, the request guard's limits from
`GuardSettings`)."""

from __future__ import annotations

import re

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from dapdee.costgraph import GraphLimits
from dapdee.web.settings import GuardSettings

LOOPBACK_WORKER_URLS = r"http://(127\.0\.0\.1|localhost|\[::1\]):[0-9]{1,5}"


class Settings(GuardSettings):
    """Everything the planner reads from its environment; `DAPDEE_REDIS_URL=none` (or empty) runs
    in-process only."""

    # no infinite settings: `inf` seconds or ms/s pass every lower bound, then break at run time
    model_config = SettingsConfigDict(env_prefix="DAPDEE_", extra="ignore", allow_inf_nan=False)

    # ---- planning budget (the HTTP limits, checked before a body is parsed: GuardSettings) ----
    plan_budget_s: float = Field(1.0, gt=0, description="time for a plan that needs min-cuts; 503 past it")
    plan_threads: int = Field(2, ge=1, le=64, description="plans needing min-cuts computed at once")
    # ---- cost-graph caps (422 at PUT past them) ----
    max_nodes: int = Field(4096, ge=1)
    max_exits: int = Field(64, ge=1)
    max_in_degree: int = Field(256, ge=1)
    # ---- worker registry: heartbeat URLs must fullmatch this (default: loopback only) ----
    worker_url_pattern: str = LOOPBACK_WORKER_URLS

    # ---- store ----
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    key_prefix: str = Field("dapdee", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    worker_ttl_s: float = Field(10.0, gt=0)
    # Redis client behaviour: a timeout so a hung Redis stalls a request at most this long (a
    # stopped one refuses at once), and a back-off between reconnect attempts. Not much shorter:
    # under a burst the event loop may take a few hundred ms to get round to a finished connect.
    redis_timeout_s: float = Field(1.0, gt=0)
    redis_backoff_s: float = Field(1.0, gt=0)
    # How often a replica re-reads the shared generation counter and the worker registry.
    refresh_s: float = Field(1.0, gt=0)
    # Count caps of what the planner stores (409 past them; a known worker may always refresh).
    # Redis runs `maxmemory-policy noeviction`: these caps, not evictions, bound its memory.
    max_models: int = Field(256, ge=1, description="stored models; also the in-process model cache size")
    max_profiles_per_model: int = Field(32, ge=1)
    max_workers: int = Field(256, ge=1, description="live edge workers")
    max_pending_writes: int = Field(1024, ge=1, description="writes queued while Redis is unavailable")
    # Plan maps: in-process LRU, and in Redis a count cap (oldest dropped), a byte cap per map
    # (larger maps stay in process memory) and a TTL. Builds run in threads, at most
    # `planmap_build_threads` at once (a map not exact within 0.25 s in a thread is built in one of as
    # many build processes), each within `planmap_build_budget_s` (then approximate).
    planmap_cache_size: int = Field(64, ge=1)
    # the in-process maps' estimated bytes (`planmaps.approx_bytes`); the newest map is kept even alone past it
    planmap_cache_bytes: int = Field(512 * 1024 * 1024, ge=1)
    planmap_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    planmap_max_bytes: int = Field(8 * 1024 * 1024, ge=1)
    planmap_redis_max: int = Field(256, ge=1)
    planmap_memory_share: float = Field(
        0.5, gt=0, le=1, description="stored maps' bytes stay within this share of Redis's maxmemory (when set)"
    )
    planmap_build_budget_s: float = Field(2.0, gt=0)
    planmap_build_threads: int = Field(2, ge=1, le=64)
    planmap_cap: int | None = Field(None, ge=1)  # enumeration cap handed to PlanMap.build (None: its default)

    @field_validator("redis_url", mode="before")
    @classmethod
    def _none_url(cls, v: object) -> object:
        """None for "", "none" or null; else a URL redis-py takes (redis://, rediss:// or
        unix://), refused here rather than when the store first connects (the value is not
        repeated: a URL may hold a password)."""
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none")):
            return None
        if isinstance(v, str) and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a URL starting redis://, rediss:// or unix:// (or none)")
        return v

    # ---- end store ----

    # ---- fleet: leases on the shared edge, admission, rebalancing ----
    fleet_planning: bool = Field(
        True,
        description="plan against the other devices' leases (edge load, admission, worker choice); "
        "false: each device against the worker's heartbeat load, no leases (the behaviour before fleets)",
    )
    rho_max: float = Field(0.9, gt=0, le=1, description="admission: leases may book this share of a worker")
    lease_ttl_s: float = Field(30.0, gt=0, le=3600)
    max_leases: int = Field(4096, ge=1, description="live leases (409 past it)")
    replan_after_s: float = Field(5.0, gt=0, description="leased devices come back this often (<= lease_ttl_s / 2)")
    lease_drift: float = Field(
        0.2,
        gt=0,
        description="an assigned plan is handed back while bandwidth and rtt moved less than this "
        "(relative) and device load less than half of it (absolute)",
    )
    rebalance_s: float = Field(10.0, ge=0, description="period of the fleet rebalance (0: only on request)")
    rebalance_budget_s: float = Field(
        10.0,
        gt=0,
        description="time for the solve of one worker's leases in a rebalance: past it the worker is left as "
        "it was (named in the answer's over_budget), or answered with the best share solved by then",
    )
    switch_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="a leased device keeps the plan it holds (re-plans and rebalances) unless "
        "another meets more requirements, is more accurate, or takes less than (1 - this) x the held plan's time",
    )

    @field_validator("replan_after_s")
    @classmethod
    def _before_expiry(cls, v: float, info: ValidationInfo) -> float:
        ttl = info.data.get("lease_ttl_s")
        if ttl is not None and v > ttl / 2:
            raise ValueError(f"must be at most lease_ttl_s / 2 = {ttl / 2:g} s, so leases are renewed in time")
        return v

    @field_validator("worker_url_pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return v

    def graph_limits(self) -> GraphLimits:
        """The cost-graph caps as `GraphLimits`. O(1)."""
        return GraphLimits(self.max_nodes, self.max_exits, self.max_in_degree)
