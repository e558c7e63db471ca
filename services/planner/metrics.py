"""Prometheus metrics of one planner app.

**Registries.** One process (the default, `--workers 1`, and the tests, which run several apps
in one interpreter): each app keeps its metrics in its own `CollectorRegistry`, with the
standard `process_*`, `python_gc_*` and `python_info` collectors registered to it. Several
processes (`dapdee serve planner --workers N`, which sets `PROMETHEUS_MULTIPROC_DIR`):
prometheus_client's multiprocess mode (`dapdee.web.prometheus`): every process writes its
values to files in that directory and /metrics merges them, whichever process answers:

- counters and histograms: summed over the processes (those that exited too);
- `dapdee_planner_models` (models this process caches): `livemax`, the most any live process
  caches; `dapdee_planner_pending_writes` (writes this process queued while Redis was away):
  `livesum`. Each process writes both on every fleet refresh (`refresh_s`, 1 s by default) and
  before it answers a scrape, so they are at most that old;
- *view* gauges (`VIEW_GAUGES`): state every process reads from Redis (live workers, leases,
  the per-worker fleet gauges, whether Redis answers), taken from the answering process;
- `process_*` and `python_gc_*`: every process's own, summed (see `dapdee.web.prometheus`).

**Buckets**, fitted to what was measured on this project's 2-core CPU machine:

- `PLAN_BUCKETS` (POST /plan inside the app): `PlanMap.plan` on the shipped models' merged
  profiles (AlexNet, VGG-16, ResNet-18 at 32 and 224 px, Inception; 3,000 random requests each)
  takes 17-33 µs at the median and 70-160 µs at p99; the whole route (body parsing, store
  look-ups, the answer's JSON), measured through this histogram over 2,000 requests for the
  ResNet-18 profile, took 100-200 µs for 84 % of them, under 500 µs for 99 %; a plan that needs
  min-cuts, or a plan map built on a cache miss, takes milliseconds up to the plan budget (1 s)
  and the build budget (2 s). So the buckets run from 5 µs (room for the route to get as fast
  as the plan itself) to 10 s in 1-2-5 steps: p50 and p99 fall between bounds a factor 2-2.5
  apart instead of inside the one 0-100 µs or 100-250 µs bucket of the earlier layout.
- `BUILD_BUCKETS` (one plan-map build): 3-11 ms for the 44-88-node models, 86 ms for the
  234-node Inception, up to the 2 s build budget (and beyond it for a build that ignores it):
  1 ms to 30 s.

**Labels** follow Prometheus conventions (snake_case names, bounded values): `mode`
(auto|latency|throughput), `outcome`, `layer`, `op`, `reason`, `what`, `result` are fixed
words; `worker` is a live worker's URL (bounded by the planner's worker cap).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from dapdee.web.prometheus import RuntimeMirror, SharedExposition, add_runtime_collectors, multiprocess_dir

PLAN_BUCKETS = (
    0.000005, 0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005,
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BUILD_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# gauges of state read from Redis: under --workers N, the answering process's values
# the `outcome` label of dapdee_planner_plans_total: an answer (ok, constraints_unmet) or an error
PLAN_ANSWERS = ("ok", "constraints_unmet")
PLAN_ERRORS = ("invalid", "unknown_model", "missing_timings", "over_budget", "lease_cap", "unavailable", "error")
# the `reason` label of dapdee_planner_rejected_total: the request guard's refusals (the planner
# has no check of its own before the body, so no `not_found`, unlike the edge)
REJECT_REASONS = ("unauthenticated", "forbidden", "too_large", "timeout", "bad_request", "disconnected", "overloaded")
# the `result` label of dapdee_planner_admissions_total
ADMISSION_RESULTS = ("reserved", "device_only", "refused", "stale", "departed", "full", "unleased", "unstored")
VIEW_GAUGES = frozenset(
    {
        "dapdee_planner_workers",
        "dapdee_planner_leases",
        "dapdee_planner_worker_capacity_ms_per_second",
        "dapdee_planner_worker_leased_ms_per_second",
        "dapdee_planner_worker_leases",
        "dapdee_planner_redis_up",
    }
)

# the per-worker fleet gauges (name, help), exported by `WorkerGauges`
WORKER_GAUGES = (
    (
        "dapdee_planner_worker_capacity_ms_per_second",
        "A live worker's capacity C_w (ms of compute per second) from its heartbeat.",
    ),
    ("dapdee_planner_worker_leased_ms_per_second", "Σ f_j·e_j the live leases reserve on a worker (ms per second)."),
    ("dapdee_planner_worker_leases", "Live leases reserving on a worker."),
)


class PlannerMetrics:
    """The planner's counters, histograms and gauges (module docstring). Base units, `_total`
    counters, low cardinality. `exposition()` is what GET /metrics answers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared_dir = multiprocess_dir()  # None: one process
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
        self.offloaded_plans = Counter(
            "dapdee_planner_offloaded_plans",
            "Plans that needed min-cuts (their plan map is not exact) and so ran in a plan thread, off "
            "the event loop; counted as each starts (one refused past the plan budget once started, too).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "dapdee_planner_rejected",
            "Requests the request guard refused before any route ran (401, 403, 400, 408, 413, 415, 503), "
            "by route (its path template: /plan, /workers/heartbeat, /models/{model}, ...) and reason.",
            ["route", "reason"],
            registry=self.registry,
        )
        self.workers = Gauge("dapdee_planner_workers", "Live edge workers known.", registry=self.registry)
        self.models = Gauge(
            "dapdee_planner_models",
            "Models cached by this replica (each read on first use; several processes: the most any caches).",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self._store_metrics()
        self._zero_series()
        self._runtime_metrics()

    def _runtime_metrics(self) -> None:
        """The process's own metrics (CPU, memory, GC): collected from this process, or, with
        several processes (`shared_dir`), mirrored into the shared files with every process's
        series merged at exposition."""
        self._mirror: RuntimeMirror | None = None
        self._shared: SharedExposition | None = None
        if self.shared_dir is None:
            add_runtime_collectors(self.registry)
        else:
            self._mirror = RuntimeMirror()
            self._shared = SharedExposition(self.shared_dir, self.registry, VIEW_GAUGES)

    def exposition(self) -> bytes:
        """The Prometheus text of GET /metrics: this app's registry, or, with several processes,
        every process's metrics merged (after writing this process's own). O(series)."""
        if self._shared is None:
            return generate_latest(self.registry)
        self.sync()
        return self._shared.render()

    def sync(self) -> None:
        """With several processes, write this process's own gauges (models cached, pending writes)
        and runtime metrics to the shared files; nothing with one. O(1) plus ~0.1 ms of /proc."""
        if self._mirror is None:
            return
        for gauge in (self.models, self.pending_writes):
            (family,) = gauge.collect()  # the bound function's value (see `bind`, the store)
            gauge.set(family.samples[0].value)
        self._mirror.sync()

    def _zero_series(self) -> None:
        """Create the known label sets so they show as 0 from the start (an error rate's first
        error is then a step of `rate`, not a series appearing): answers name the mode used,
        errors the mode asked for; the guard's refusals by reason. O(modes × outcomes)."""
        for mode in ("latency", "throughput"):
            for outcome in PLAN_ANSWERS:
                self.plans.labels(mode, outcome)
        for mode in ("auto", "latency", "throughput"):
            for outcome in PLAN_ERRORS:
                self.plans.labels(mode, outcome)
        for layer in ("memory", "redis"):
            self.cache_hits.labels(layer)
        for reason in ("version", "capacity"):
            self.write_conflicts.labels(reason)
        for reason in REJECT_REASONS:  # the plan route's, which the plan error alert reads
            self.rejected.labels("/plan", reason)

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
            "over_budget, cut short by the build budget; redis_memory, larger than "
            "DAPDEE_PLANMAP_MEMORY_SHARE of Redis's maxmemory).",
            ["reason"],
            registry=self.registry,
        )
        self.pending_writes = Gauge(
            "dapdee_planner_pending_writes",
            "Writes queued while Redis is unavailable, not yet replayed (several processes: summed).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._fleet_metrics()

    def _fleet_metrics(self) -> None:
        """The shared edge's metrics: lease admissions, rebalances, per-worker capacity and leases."""
        self.admissions = Counter(
            "dapdee_planner_admissions",
            "Plan requests by lease outcome: reserved (on a worker), device_only (a lease reserving "
            "nothing), refused (another replica took the room; re-planned), stale (this replica's view of "
            "the leases was out of date; re-planned against Redis's), departed (the worker's last heartbeat no longer "
            "lists the model; re-planned without it), full (the lease cap), unleased (no device_id), unstored (a named "
            "device answered expires_in_s 0: no Redis, or Redis away or timed out).",
            ["result"],
            registry=self.registry,
        )
        self.rebalances = Counter(
            "dapdee_planner_rebalances",
            "Fleet rebalances: per worker applied or refused (leases changed meanwhile); per run done or noop; "
            "per heartbeat whose capacity the leases overbook, shed (re-solved and registered with it), "
            "shed_refused (a try refused: leases changed meanwhile) or forced (registered over its leases); "
            "over_budget: a worker's solve ran past DAPDEE_REBALANCE_BUDGET_S (left as it was).",
            ["result"],
            registry=self.registry,
        )
        self.leases = Gauge("dapdee_planner_leases", "Live leases (every replica's).", registry=self.registry)
        # the per-worker gauges: one snapshot, replaced whole by `set_fleet`
        self.worker_gauges = WorkerGauges()
        self.registry.register(self.worker_gauges)
        self.redis_up: Gauge | None = None  # only where Redis is configured (see bind_redis)
        for result in ADMISSION_RESULTS:
            self.admissions.labels(result)  # shown as 0 from the start
        for result in ("applied", "refused", "done", "noop", "shed", "shed_refused", "forced", "over_budget"):
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
        lease count); workers no longer live are dropped. A scrape at the same time (under
        --workers N /metrics renders in a thread) sees the worker series before or after, never a
        mix or a gap. O(workers). Called on every fleet refresh, in every process, which is also
        when a process writes its own gauges (`sync`)."""
        self.sync()
        self.leases.set(leases)
        self.worker_gauges.set(workers)


class WorkerGauges:
    """The per-worker fleet gauges (`WORKER_GAUGES`, label `worker`), exported from one snapshot
    of {worker URL: (capacity, leased ms/s, lease count)} that `set` replaces whole (one reference
    assignment: atomic for a scrape in another thread). A custom collector rather than labelled
    `Gauge`s: dropping a worker needs no `clear()` or `remove()` (both warn on stderr in
    prometheus_client's multiprocess mode, and clear-then-set leaves a gap a scrape can fall
    into), and, these being view gauges, nothing is written to the shared files."""

    def __init__(self) -> None:
        self._workers: dict[str, tuple[float, float, int]] = {}

    def set(self, workers: dict[str, tuple[float, float, int]]) -> None:
        """Export `workers` from now on (a copy); workers not in it are no longer exported. O(workers)."""
        self._workers = dict(workers)

    def describe(self) -> list[GaugeMetricFamily]:
        """The three families, without samples (for the registry's name check)."""
        return [GaugeMetricFamily(name, doc, labels=["worker"]) for name, doc in WORKER_GAUGES]

    def collect(self) -> list[GaugeMetricFamily]:
        """The three families with one sample per worker of the current snapshot. O(workers)."""
        workers = self._workers  # one snapshot for all three families
        families = self.describe()
        for url, row in workers.items():
            for family, sample in zip(families, row, strict=True):
                family.add_metric([url], float(sample))
        return families
