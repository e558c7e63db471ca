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

    def bind(self, workers: Callable[[], float], models: Callable[[], float]) -> None:
        """Make the gauges read live values at scrape time. O(1)."""
        self.workers.set_function(workers)
        self.models.set_function(models)
