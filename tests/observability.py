"""The metric names the dashboards and alerts may use, and reading PromQL for the tests
(tests/test_dashboard.py, tests/test_alert_rules.py).

`CATALOGUE` is the metric contract of the services: each metric as Prometheus sees it (counters
with `_total`, histograms by their base name) with its type and label names. `exported_by_code()`
reads what the services' metric classes really register, label names read from the collectors
themselves (not from the samples they hold, which a labelled metric has none of until first
used); `known_metrics()` is that, the code's view: what Prometheus will scrape.
`test_catalogue_matches_the_code` (in test_dashboard) fails when a catalogue entry is not
exported by the code (renamed or removed) or when the two disagree on its type or labels.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase


@dataclass(frozen=True)
class Metric:
    kind: str  # counter | gauge | histogram | info
    labels: frozenset[str]


def _m(kind: str, *labels: str) -> Metric:
    return Metric(kind, frozenset(labels))


CATALOGUE: dict[str, Metric] = {
    # planner
    "dapdee_planner_plans_total": _m("counter", "mode", "outcome"),
    "dapdee_planner_plan_duration_seconds": _m("histogram"),
    "dapdee_planner_cache_hits_total": _m("counter", "layer"),
    "dapdee_planner_cache_misses_total": _m("counter"),
    "dapdee_planner_cache_errors_total": _m("counter", "op"),
    "dapdee_planner_offloaded_plans_total": _m("counter"),
    "dapdee_planner_workers": _m("gauge"),
    "dapdee_planner_models": _m("gauge"),
    "dapdee_planner_redis_up": _m("gauge"),
    "dapdee_planner_leases": _m("gauge"),
    "dapdee_planner_worker_capacity_ms_per_second": _m("gauge", "worker"),
    "dapdee_planner_worker_leased_ms_per_second": _m("gauge", "worker"),
    "dapdee_planner_worker_leases": _m("gauge", "worker"),
    "dapdee_planner_rebalances_total": _m("counter", "result"),
    "dapdee_planner_admissions_total": _m("counter", "result"),
    "dapdee_planner_rejected_total": _m("counter", "route", "reason"),
    # edge worker
    "dapdee_edge_requests_total": _m("counter", "model", "exit", "status"),
    "dapdee_edge_request_duration_seconds": _m("histogram", "model"),
    "dapdee_edge_queue_duration_seconds": _m("histogram", "model"),
    "dapdee_edge_compute_duration_seconds": _m("histogram", "model"),
    "dapdee_edge_received_bytes_total": _m("counter", "model"),
    "dapdee_edge_inflight_requests": _m("gauge"),
    "dapdee_edge_batch_size": _m("histogram", "model"),
    "dapdee_edge_rejected_total": _m("counter", "reason"),
    "dapdee_edge_expired_total": _m("counter", "model"),
    "dapdee_edge_compute_busy_seconds_total": _m("counter"),
    "dapdee_edge_compute_slots": _m("gauge"),
    # device runtime (`dapdee device run --metrics-port`)
    "dapdee_device_frames_total": _m("counter", "where"),
    "dapdee_device_frame_latency_seconds": _m("histogram"),
    "dapdee_device_bandwidth_estimate_mbps": _m("gauge"),
    "dapdee_device_load": _m("gauge"),
    "dapdee_device_plan_info": _m("gauge", "exit", "cut"),
    "dapdee_device_prediction_error_ratio": _m("histogram"),
}
# labels Prometheus adds to every scraped series (the compose config's `service` target label too)
TARGET_LABELS = frozenset({"job", "instance", "service"})
# each metric module -> the service that serves it on /metrics (the `service` label its scrape
# job gives its targets in deploy/prometheus/prometheus.yml)
SERVICE_OF_MODULE = {
    "dapdee.planner.metrics": "planner",
    "dapdee.edge_worker.metrics": "edge",
    "dapdee.device.metrics": "device",
}
METRIC_MODULES = tuple(SERVICE_OF_MODULE)
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",), "info": ("",)}


@dataclass(frozen=True)
class LazyMetrics:
    """Metrics a `*Metrics` class registers only when one of its methods is called, not in its
    constructor: `exported_by_code()` calls `method(*args)` on the fresh instance so that they are
    read from the code too. `names` are what the call registers; `test_lazy_metrics_are_what_their_
    call_registers` checks that they are absent before the call and present after it."""

    module: str
    cls: str
    method: str
    args: tuple[Any, ...]
    names: frozenset[str]


LAZY: tuple[LazyMetrics, ...] = (
    # dapdee_planner_redis_up: registered by `PlannerMetrics.bind_redis`, which the planner's
    # store (services/planner/store.py) calls only when Redis is configured, so that a planner
    # running without Redis does not look like one whose Redis is down. Verified: the only
    # metric of the three services registered outside a constructor.
    LazyMetrics(
        "dapdee.planner.metrics", "PlannerMetrics", "bind_redis", (lambda: 1.0,), frozenset({"dapdee_planner_redis_up"})
    ),
)


def _collectors(registry: CollectorRegistry) -> list[Any]:
    """The collectors registered to `registry` (prometheus_client has no public way to list them)."""
    return list(registry._collector_to_names)  # noqa: SLF001


def _families(collector: Any) -> Iterator[tuple[str, str, frozenset[str]]]:
    """(family name, type, label names) of what `collector` exports, the label names read from
    the collector, not from samples: a labelled metric wrapper's `_labelnames`; a custom
    collector's families as its `describe()` builds them (`GaugeMetricFamily(..., labels=[...])`
    keeps them), or, for a family built without `labels=`, the labels of its samples."""
    if isinstance(collector, MetricWrapperBase):
        labels = frozenset(collector._labelnames)  # noqa: SLF001
        for family in collector.describe():
            if family.type == "info":  # an info metric's own keys are labels of its one sample
                labels |= {k for fam in collector.collect() for s in fam.samples for k in s.labels}
            yield family.name, family.type, labels
        return
    describe: Callable[[], Any] | None = getattr(collector, "describe", None)
    for family in describe() if describe is not None else collector.collect():
        names = getattr(family, "_labelnames", None)
        if names is None:
            names = {k for s in family.samples for k in s.labels} - {"le", "quantile"}
        yield family.name, family.type, frozenset(names)


def exported_by_service(lazy: bool = True) -> dict[str, dict[str, Metric]]:
    """service -> the metrics its metric classes register (each `*Metrics` class of the metric
    modules that exist, built with no arguments; with `lazy`, the `LAZY` calls made too)."""
    out: dict[str, dict[str, Metric]] = {}
    for module_name, service in SERVICE_OF_MODULE.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        metrics = out.setdefault(service, {})
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module_name or not cls.__name__.endswith("Metrics"):
                continue
            instance = cls()
            registry = getattr(instance, "registry", None)
            if registry is None:
                continue
            if lazy:
                for entry in LAZY:
                    if (entry.module, entry.cls) == (module_name, cls.__name__):
                        getattr(instance, entry.method)(*entry.args)
            for collector in _collectors(registry):
                for family, kind, labels in _families(collector):
                    name = family + ("_total" if kind == "counter" else "") + ("_info" if kind == "info" else "")
                    metrics[name] = Metric(kind, labels)
    return out


def exported_by_code(lazy: bool = True) -> dict[str, Metric]:
    """Every service's metrics (`exported_by_service`) in one mapping."""
    return {name: m for metrics in exported_by_service(lazy).values() for name, m in metrics.items()}


def known_metrics() -> dict[str, Metric]:
    """The metrics a query may read: what the code exports (the catalogue must agree with it:
    `test_catalogue_matches_the_code`), never a catalogue entry the code has lost."""
    return exported_by_code()


def series_names(metrics: dict[str, Metric]) -> dict[str, str]:
    """Each series name a query may use -> the metric it belongs to (`x_bucket` -> `x`)."""
    out: dict[str, str] = {}
    for name, m in metrics.items():
        for suffix in _SUFFIXES.get(m.kind, ("",)):
            out[name + suffix] = name
    return out


_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
)


def metric_names(expr: str) -> set[str]:
    """The `dapdee_*` series an expression reads. O(len)."""
    return set(re.findall(r"\bdapdee_[A-Za-z0-9_]+", expr))


def labels_used(expr: str) -> set[str]:
    """Label names an expression groups, matches or joins on: `by (...)`, `without (...)`,
    `on (...)`, `ignoring (...)`, `group_left (...)` and `{name op "value"}` matchers. O(len)."""
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return labels - _PROMQL_WORDS


def legend_labels(legend: str) -> set[str]:
    """Label names a Grafana legend template (`{{worker}}`) or an alert template uses."""
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) | set(re.findall(r"\$labels\.(\w+)", legend))


def allowed_labels(expr: str, metrics: dict[str, Metric]) -> set[str]:
    """The labels the series of `expr` can carry: their own, the target labels, `le` on buckets."""
    series = series_names(metrics)
    allowed = set(TARGET_LABELS)
    for name in metric_names(expr):
        if name in series:
            allowed |= metrics[series[name]].labels
        if name.endswith("_bucket"):
            allowed.add("le")
    return allowed


def promtool() -> str:
    """The promtool binary; a failure (not a skip) without it: CI and `make test` install it."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run `make test` (it installs Debian's `prometheus` package, "
            "which has promtool) or `apt-get install prometheus`"
        )
    return path
