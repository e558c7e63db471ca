"""Prometheus metrics of one planner app, in its own CollectorRegistry (so several apps can live
in one process, as the tests run them)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PLAN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
BUILD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class PlannerMetrics:
    """The planner's counters, histogram and gauges. Base units, `_total` counters, low cardinality:
    `mode` is auto|latency|throughput, `outcome` a handful of fixed words, `op` a store operation."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.plans = Counter(
            "dapdee_planner_plans",
            "Plan requests answered, by mode used (or asked for, on errors) and outcome.",
            ["mode", "outcome"],
            registry=self.registry,
        )
        self.plan_duration = Histogram(
            "dapdee_planner_plan_duration_seconds",
            "Time to answer POST /plan inside the app (seconds).",
            buckets=PLAN_BUCKETS,
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "dapdee_planner_cache_hits",
            "Plan map look-ups answered from a cache (layer: memory or redis).",
            ["layer"],
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "dapdee_planner_cache_misses",
            "Plan map look-ups that had to build the plan map.",
            registry=self.registry,
        )
        self.cache_errors = Counter(
            "dapdee_planner_cache_errors",
            "Redis operations that failed (the planner went on from its in-process cache).",
            ["op"],
            registry=self.registry,
        )
        self.workers = Gauge("dapdee_planner_workers", "Live edge workers known.", registry=self.registry)
        self.models = Gauge(
            "dapdee_planner_models", "Models cached by this replica (each read on first use).", registry=self.registry
        )
        self._store_metrics()
        # pre-create the common label sets so they show as 0 from the start
        for mode in ("latency", "throughput"):
            self.plans.labels(mode, "ok")
        for layer in ("memory", "redis"):
            self.cache_hits.labels(layer)
        for reason in ("version", "capacity"):
            self.write_conflicts.labels(reason)

    def _store_metrics(self) -> None:
        """The store's consistency, capacity and plan-map build metrics."""
        self.write_conflicts = Counter(
            "dapdee_planner_write_conflicts",
            "Writes queued during a Redis outage and not applied on replay (reason: version, Redis "
            "held a newer version of the model; capacity, its cap was reached meanwhile).",
            ["reason"],
            registry=self.registry,
        )
        self.writes_lost = Counter(
            "dapdee_planner_writes_lost",
            "Writes queued during a Redis outage that were still unwritten at shutdown (logged).",
            registry=self.registry,
        )
        self.capacity_refusals = Counter(
            "dapdee_planner_capacity_refusals",
            "New models, profiles, workers or queued writes refused at their cap (what).",
            ["what"],
            registry=self.registry,
        )
        self.planmap_builds = Counter(
            "dapdee_planner_planmap_builds",
            "Plan maps built, by result: exact, capped (an exit over the enumeration cap) or "
            "over_budget (the build time budget cut an enumeration or the min-cut grid short).",
            ["result"],
            registry=self.registry,
        )
        self.planmap_build_duration = Histogram(
            "dapdee_planner_planmap_build_seconds",
            "Time to build one plan map, in a worker thread (seconds).",
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )
        self.planmaps_not_stored = Counter(
            "dapdee_planner_planmaps_not_stored",
            "Plan maps kept in process memory only (reason: too_large, over DAPDEE_PLANMAP_MAX_BYTES; "
            "over_budget, cut short by the build budget).",
            ["reason"],
            registry=self.registry,
        )
        self.pending_writes = Gauge(
            "dapdee_planner_pending_writes",
            "Writes queued while Redis is unavailable, not yet replayed.",
            registry=self.registry,
        )

        # ---- the shared edge (fleet) ----
        self.admissions = Counter(
            "dapdee_planner_admissions",
            "Plan requests by lease outcome: reserved (on a worker), device_only (a lease reserving "
            "nothing), refused (another replica took the room; re-planned), full (the lease cap), "
            "unleased (no device_id).",
            ["result"],
            registry=self.registry,
        )
        self.rebalances = Counter(
            "dapdee_planner_rebalances",
            "Fleet rebalances: per worker applied or refused (leases changed meanwhile); per run done or noop.",
            ["result"],
            registry=self.registry,
        )
        self.leases = Gauge("dapdee_planner_leases", "Live leases (every replica's).", registry=self.registry)
        self.worker_capacity = Gauge(
            "dapdee_planner_worker_capacity_ms_per_second",
            "A live worker's capacity C_w (ms of compute per second) from its heartbeat.",
            ["worker"],
            registry=self.registry,
        )
        self.worker_leased = Gauge(
            "dapdee_planner_worker_leased_ms_per_second",
            "Σ f_j·e_j the live leases reserve on a worker (ms per second).",
            ["worker"],
            registry=self.registry,
        )
        self.worker_leases = Gauge(
            "dapdee_planner_worker_leases", "Live leases reserving on a worker.", ["worker"], registry=self.registry
        )
        self.redis_up: Gauge | None = None  # only where Redis is configured (see bind_redis)
        for result in ("reserved", "device_only", "refused", "full", "unleased"):
            self.admissions.labels(result)  # shown as 0 from the start
        for result in ("applied", "refused", "done", "noop"):
            self.rebalances.labels(result)

    def bind(self, workers: Callable[[], float], models: Callable[[], float]) -> None:
        """Make the gauges read live values at scrape time. O(1)."""
        self.workers.set_function(workers)
        self.models.set_function(models)

    def bind_redis(self, up: Callable[[], float]) -> None:
        """`dapdee_planner_redis_up` (1 when the last Redis call worked), exported only by a planner
        configured with Redis, so one running without it does not look like a Redis outage."""
        self.redis_up = Gauge(
            "dapdee_planner_redis_up", "1 while Redis answers, 0 while it is away.", registry=self.registry
        )
        self.redis_up.set_function(up)

    def set_fleet(self, leases: int, workers: dict[str, tuple[float, float, int]]) -> None:
        """Set the fleet gauges: the lease count and, per live worker URL, (capacity, leased ms/s,
        lease count); workers no longer live are dropped. O(workers)."""
        self.leases.set(leases)
        for gauge in (self.worker_capacity, self.worker_leased, self.worker_leases):
            gauge.clear()
        for url, (capacity, leased, count) in workers.items():
            self.worker_capacity.labels(url).set(capacity)
            self.worker_leased.labels(url).set(leased)
            self.worker_leases.labels(url).set(count)
