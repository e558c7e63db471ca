"""The values the device runtime passes between its parts: frames, plans, leases, per-frame
records and the errors that stay inside the runtime. Frozen dataclasses, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dapdee.progressive_run import Sides

WHERE = ("edge", "local", "fallback")  # where a frame finished


@dataclass(frozen=True)
class Frame:
    """One input: `x` of the model's input shape (batch 1), its `label` when known, and where it
    came from (a file name, `video:17`, …) for logs."""

    x: torch.Tensor
    label: int | None = None
    source: str | None = None


@dataclass(frozen=True)
class Lease:
    """A device's reservation of edge compute as its plan states it (DESIGN §3.4). It lapses at
    `expires_at` and should be renewed by a new plan request at `replan_at`.

    `received_at` is the monotonic time the lease is counted from: when the plan request was
    sent, not when its answer was read. The planner starts the lease's TTL when it stores the
    lease, before it answers, so counting from the answer would make the device believe its
    lease lasts longer than it does by the answer's latency; counting from the request is the
    safe bound (the device may give up the edge a little early, never late).

    `stored` is False when the planner could not store the lease (`expires_in_s` 0: it runs
    without Redis, or Redis is away or timed out, when a reservation may still land and lapse
    at its TTL; the device releases on leaving either way): the device takes it to hold no
    reservation, so nothing lapses
    (`expires_at` is infinite and the plan is kept as a plan without a lease is), but it still
    asks again after `replan_after_s`, so it holds a stored lease soon after Redis is back.

    `replan_after_s` 0 (the schema allows it) asks for a plan again at once: the re-planner
    then re-plans at its minimum interval, `RuntimeConfig.min_replan_s`."""

    worker: str | None
    frames_per_s: float
    edge_ms_per_frame: float
    expires_in_s: float
    replan_after_s: float
    received_at: float
    stored: bool = True

    @property
    def expires_at(self) -> float:
        """When the reservation lapses (monotonic s); infinite when none was stored. O(1)."""
        return self.received_at + self.expires_in_s if self.stored else math.inf

    @property
    def replan_at(self) -> float:
        """When to ask for a plan again (monotonic s): after `replan_after_s`, and for a stored
        lease no later than its expiry. O(1)."""
        if not self.stored:
            return self.received_at + self.replan_after_s
        return self.received_at + min(self.replan_after_s, self.expires_in_s)


@dataclass(frozen=True)
class Plan:
    """A plan the runtime can execute: the exit, the device part D (topological order), the edge
    part E, the tensors sent (`transfer`: node, bytes), the predicted latency and bottleneck, the
    worker to use, the lease, and the conditions it was asked for. `origin` is `planner`,
    `fixed` or `device-only`. `progressive`: the plan's sides when it was made with confidence
    exits (the device checks its heads; the edge is asked to check its own)."""

    plan_id: str
    model: str
    mode: str
    exit: str
    accuracy: float | None
    device_nodes: tuple[str, ...]
    edge_nodes: tuple[str, ...]
    transfer: tuple[tuple[str, int], ...]
    predicted_ms: float
    bottleneck_ms: float
    edge_worker: str | None
    origin: str
    requested_at: float
    bandwidth_mbps: float
    device_load: float
    lease: Lease | None = None
    progressive: Sides | None = None
    expected_ms: float | None = None  # with confidence exits: the planner's expected latency

    @property
    def uses_edge(self) -> bool:
        return bool(self.edge_nodes)

    @property
    def edge_confidence(self) -> bool:
        """Whether the edge has confidence heads to check (infer with `confidence: true`)."""
        return self.progressive is not None and bool(self.progressive.edge.heads)

    @property
    def transfer_nodes(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.transfer)

    @property
    def cut(self) -> int:
        """The number of device nodes (the metrics' `cut` label)."""
        return len(self.device_nodes)


@dataclass(frozen=True)
class EdgeAnswer:
    """A validated edge answer: the exit's logits [1, classes], the worker's queue and compute
    time, the request's size, the time from sending to the decoded answer, the device thread's
    CPU time meanwhile (encode, send, decode: the per-request cost when nothing else runs),
    whether another upload shared the link, and the bandwidth sample it gave (if any)."""

    logits: torch.Tensor
    queue_ms: float
    compute_ms: float
    request_bytes: int
    elapsed_ms: float
    cpu_ms: float = 0.0
    overlapped: bool = False
    sample_mbps: float | None = None
    exits_taken: tuple[str, ...] | None = None  # asked with confidence: the exit that answered


@dataclass(frozen=True)
class FrameRecord:
    """One frame: what was planned and what happened. `where` is `edge` (the edge answered),
    `local` (the plan ran wholly on the device) or `fallback` (the edge part was planned but the
    device finished the frame); `exit` is where the frame left. `started_at` is seconds since
    the runtime started. `plan_exit` is the exit the frame's plan targets (with confidence exits
    a head may answer before it: then `exit` is that head's). `bytes_sent` counts the request
    bytes the frame put on the uplink: the whole request when the edge answered, the part that
    left before a failed upload ended (`EdgeFailure.bytes_sent`), 0 when none was sent."""

    index: int
    plan_id: str | None
    exit: str
    device_nodes: int
    bytes_sent: int
    where: str
    predicted_ms: float | None
    measured_ms: float
    device_ms: float
    pred_class: int
    label: int | None = None
    correct: bool | None = None
    edge_queue_ms: float | None = None
    edge_compute_ms: float | None = None
    error: str | None = None
    rate_mbps: float | None = None
    slowdown: float = 1.0
    bandwidth_est_mbps: float | None = None
    device_load: float | None = None
    started_at: float = 0.0
    source: str | None = None
    trace_id: str | None = None
    plan_exit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class EdgeFailure(Exception):
    """One edge request failed (refused, unreachable, timed out, or answered something the
    device does not accept); `reason` is short and names the problem, `retry_after_s` is the
    numeric `Retry-After` of an HTTP error answer (None: none), which the back-off honours.
    `worker_fault` is False when the worker was never contacted, because the planner does not
    list it or the device could not make the request (a tensor no wire datatype carries): the
    worker did not fail, so it is not rested for it.
    `bytes_sent` counts the request's bytes that left the device before it failed (0 when it
    never left: refused, not contacted, not made), recorded as the frame's `bytes_sent`."""

    def __init__(
        self, reason: str, retry_after_s: float | None = None, worker_fault: bool = True, bytes_sent: int = 0
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.worker_fault = worker_fault
        self.bytes_sent = bytes_sent


class PlanError(ValueError):
    """A plan the device cannot accept (a field of the wrong type, a non-finite or negative
    number, nodes that are not the model's, a cut that is not downward closed); the message
    names the field."""


class PlannerUnavailable(Exception):
    """The planner could not be asked or gave no plan (unreachable, timed out, an error status);
    `reason` says which, `status` is the HTTP status (None: no answer) and `retry_after_s` the
    answer's `Retry-After` in seconds (None when it had none): a planner marks an answer it
    expects to change soon with it, e.g. a 404 while Redis is away (DESIGN §9)."""

    def __init__(self, reason: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


class DeviceClosed(RuntimeError):
    """The device runtime was closed (`aclose`): it starts nothing and takes no more frames."""


class DeviceError(ValueError):
    """A start-up problem the user must fix (a planner that refuses, a missing profile, a bad
    source); the message is one line naming it."""
