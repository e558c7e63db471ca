"""Prometheus metrics of one worker app, on its own registry (several apps may share a process).

Labels are bounded: model names and exits come only from the loaded models; anything else
is counted under `_unknown`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

UNKNOWN = "_unknown"
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EdgeMetrics:
    """The worker's collectors on a private `CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dapdee_edge_requests",
            "Infer requests by model, exit and HTTP status",
            ["model", "exit", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "dapdee_edge_request_duration_seconds",
            "Infer request time in the worker (receive to reply)",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "dapdee_edge_queue_duration_seconds",
            "Time a request waited for its batch to start computing",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "dapdee_edge_compute_duration_seconds",
            "Compute time of one batch",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.received_bytes = Counter(
            "dapdee_edge_received_bytes", "Infer request body bytes received", ["model"], registry=r
        )
        self.inflight = Gauge("dapdee_edge_inflight_requests", "Infer requests being served", registry=r)
        self.batch_size = Histogram(
            "dapdee_edge_batch_size",
            "Requests per executed batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Info("dapdee_edge_model", "Loaded models", ["model"], registry=r)
        self.rejected = Counter(
            "dapdee_edge_rejected",
            "Requests refused before decoding (auth, size, overload)",
            ["reason"],
            registry=r,
        )
        self.compute_busy = Counter(
            "dapdee_edge_compute_busy_seconds",
            "Seconds the compute slots spent computing batches (rate / slots = measured utilisation)",
            registry=r,
        )
        self.compute_slots = Gauge(
            "dapdee_edge_compute_slots", "Compute slots (batches computed at once)", registry=r
        )
