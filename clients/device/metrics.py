"""Prometheus metrics of one device runtime, in its own CollectorRegistry (several runtimes can
live in one process), served by `dapdee device run --metrics-port P` on 127.0.0.1 unless told
otherwise. Names follow the project's metric contract; no high-cardinality labels (no device
or plan ids)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dapdee.device.types import WHERE, FrameRecord, Plan

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ERROR_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)


class DeviceMetrics:
    """Frames by where they finished (`where`: edge | local | fallback), the per-frame latency
    histogram, the bandwidth estimate and device load gauges, the current plan (`exit`, `cut` =
    number of device nodes; one series at a time) and the prediction error |pred − meas| / meas.
    Each update is O(1)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.frames = Counter(
            "dapdee_device_frames",
            "Frames finished, by where: edge (the edge answered), local (the plan ran on the device), "
            "fallback (the edge part was planned; the device finished the frame).",
            ["where"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dapdee_device_frame_latency_seconds",
            "Time from a frame's start to its answer (seconds).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.bandwidth = Gauge(
            "dapdee_device_bandwidth_estimate_mbps", "The uplink estimate (Mbit/s).", registry=self.registry
        )
        self.load = Gauge("dapdee_device_load", "The device's compute load in [0, 1).", registry=self.registry)
        self.plan_info = Gauge(
            "dapdee_device_plan_info",
            "The plan in use: exit name and cut (number of device nodes); value 1.",
            ["exit", "cut"],
            registry=self.registry,
        )
        self.prediction_error = Histogram(
            "dapdee_device_prediction_error_ratio",
            "Per frame |predicted - measured| / measured latency.",
            buckets=ERROR_BUCKETS,
            registry=self.registry,
        )
        for where in WHERE:
            self.frames.labels(where)
        self._plan_labels: tuple[str, str] | None = None

    def frame(self, rec: FrameRecord) -> None:
        """Count one finished frame."""
        self.frames.labels(rec.where).inc()
        self.latency.observe(rec.measured_ms / 1000.0)
        if rec.predicted_ms is not None and rec.measured_ms > 0:
            self.prediction_error.observe(abs(rec.predicted_ms - rec.measured_ms) / rec.measured_ms)

    def conditions(self, bandwidth_mbps: float, device_load: float) -> None:
        self.bandwidth.set(bandwidth_mbps)
        self.load.set(device_load)

    def plan(self, plan: Plan) -> None:
        """Show `plan` as the current one (the previous plan's series is removed)."""
        labels = (plan.exit, str(plan.cut))
        if labels == self._plan_labels:
            return
        if self._plan_labels is not None:
            self.plan_info.remove(*self._plan_labels)
        self.plan_info.labels(*labels).set(1)
        self._plan_labels = labels


def serve_metrics(metrics: DeviceMetrics, port: int, host: str = "127.0.0.1") -> Any:
    """Serve `metrics` on http://host:port/metrics in a daemon thread (prometheus_client's
    `start_http_server`); returns (server, thread). OSError when the port is taken."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host, registry=metrics.registry)
