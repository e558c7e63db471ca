"""Prometheus metrics of one worker app, on its own registry (several apps may share a process),
with the standard `process_*`, `python_gc_*` and `python_info` collectors registered to it.

One process per pod: the worker holds its models in memory and computes in a thread pool
(`--workers` sizes the pool), so it never runs as several server processes and never uses
prometheus_client's multiprocess mode; `dapdee serve edge` refuses to start when
`PROMETHEUS_MULTIPROC_DIR` is set. Scale out with more worker pods.

Labels are bounded: model names and exits come only from the loaded models; anything else
is counted under `_unknown` (an infer to a served model at a version it does not serve is that
model's 404, counted under its name: the version never becomes a label value). `model` is the
model's name as in Triton's metrics (every model has the one version "1", so there is no
`version` label); `status` is the HTTP status code, or 499
(`CANCELLED_STATUS`, nginx's "client closed request") for a request whose handler was cancelled
before it answered (the server shut down past its grace period): nothing was answered, and
counted as 500 it would read as a server error in every error-rate alert.

**Buckets**, fitted to what was measured on this project's 2-core CPU machine with the shipped
FMNIST artifacts (one torch thread): compute of a whole model takes 3-10 ms at batch 1 and
20-110 ms for a batch of 16 concurrent requests, while a cut near the exit leaves 0.15 ms; the
queue wait is ~0.1 ms without batching, the batch window (`batch_wait_ms`, 2 ms by default,
so ~2.3 ms) with it, and up to 0.2 s when requests pile up; `--slowdown K` stretches compute K
times. `TIME_BUCKETS` therefore run from 0.1 ms to 10 s in 1-2-5 steps (the earlier layout began
at 1 ms, so deep cuts and unbatched queue waits all fell in its first bucket).
`BATCH_BUCKETS` cover `batch_max` up to its limit, 1024.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from dapdee.web.prometheus import add_runtime_collectors

UNKNOWN = "_unknown"
CANCELLED_STATUS = 499  # a handler cancelled before it answered (module docstring)
# the `reason` label of dapdee_edge_rejected_total: the request guard's refusals
REJECT_REASONS = (
    "unauthenticated",
    "forbidden",
    "not_found",
    "too_large",
    "timeout",
    "bad_request",
    "disconnected",
    "overloaded",
)
TIME_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class EdgeMetrics:
    """The worker's collectors on a private `CollectorRegistry` (module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        add_runtime_collectors(r)
        self.requests = Counter(
            "dapdee_edge_requests",
            "Infer requests by model, exit and HTTP status",
            ["model", "exit", "status"],
            registry=r,
        )
        self._add_histograms(r)
        self.received_bytes = Counter(
            "dapdee_edge_received_bytes", "Infer request body bytes received", ["model"], registry=r
        )
        self.inflight = Gauge("dapdee_edge_inflight_requests", "Infer requests being served", registry=r)
        self.model_info = Info("dapdee_edge_model", "Loaded models", ["model"], registry=r)
        self.rejected = Counter(
            "dapdee_edge_rejected",
            "Requests refused before decoding (auth, size, overload)",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)  # shown as 0 from the start
        self.expired = Counter(
            "dapdee_edge_expired",
            "Infer requests not computed: their timeout parameter passed before their batch started",
            ["model"],
            registry=r,
        )
        self.compute_busy = Counter(
            "dapdee_edge_compute_busy_seconds",
            "Seconds the compute slots spent computing batches (rate / slots = measured utilisation)",
            registry=r,
        )
        self.compute_slots = Gauge("dapdee_edge_compute_slots", "Compute slots (batches computed at once)", registry=r)

    def _add_histograms(self, r: CollectorRegistry) -> None:
        """The per-model time histograms (request, queue, compute) and the batch sizes."""
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
        self.batch_size = Histogram(
            "dapdee_edge_batch_size",
            "Requests per executed batch",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
