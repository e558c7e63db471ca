"""The metric names the dashboards and alerts may use, and reading PromQL for the tests
(tests/test_dashboard.py, tests/test_alert_rules.py).

`CATALOGUE` is the metric contract of the services: each metric as Prometheus sees it (counters
with `_total`, histograms by their base name) with its type and label names. `exported_by_code()`
reads what the services' metric classes really register; `known_metrics()` is the union, and
`test_catalogue_matches_the_code` (in test_dashboard) fails when the code and the contract
disagree on a metric both name.
"""

from __future__ import annotations

import importlib
import inspect
import re
import shutil
from dataclasses import dataclass

import pytest


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
    # edge worker
    "dapdee_edge_requests_total": _m("counter", "model", "exit", "status"),
    "dapdee_edge_request_duration_seconds": _m("histogram", "model"),
    "dapdee_edge_queue_duration_seconds": _m("histogram", "model"),
    "dapdee_edge_compute_duration_seconds": _m("histogram", "model"),
    "dapdee_edge_received_bytes_total": _m("counter", "model"),
    "dapdee_edge_inflight_requests": _m("gauge"),
    "dapdee_edge_batch_size": _m("histogram", "model"),
    "dapdee_edge_rejected_total": _m("counter", "reason"),
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
METRIC_MODULES = ("dapdee.planner.metrics", "dapdee.edge_worker.metrics", "dapdee.device.metrics")
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",), "info": ("",)}


def exported_by_code() -> dict[str, Metric]:
    """The metrics the services' metric classes register (each `*Metrics` class of the metric
    modules that exist, built with no arguments), labels read from the samples they hold."""
    out: dict[str, Metric] = {}
    for module_name in METRIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module_name or not cls.__name__.endswith("Metrics"):
                continue
            registry = getattr(cls(), "registry", None)
            if registry is None:
                continue
            for family in registry.collect():
                name = family.name + ("_total" if family.type == "counter" else "")
                name = name + ("_info" if family.type == "info" else "")
                labels = {k for s in family.samples for k in s.labels} - {"le", "quantile"}
                out[name] = Metric(family.type, frozenset(labels))
    return out


def known_metrics() -> dict[str, Metric]:
    """The catalogue, and what the code registers beyond it."""
    return {**exported_by_code(), **CATALOGUE}


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
