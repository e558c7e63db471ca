"""The device runtime's settings, as frozen dataclasses checked when they are made.

- `Requirements`: what the user asks of every frame (latency budget, accuracy floor, frame
  rate, planning mode, confidence exits); they go into every plan request and choose the fallback exit.
- `RuntimeConfig`: how the runtime behaves (frames in flight, edge timeouts and back-off,
  re-plan rules, probing).
- `PlannerConfig`: how to reach the planner and what to tell it about this device.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dapdee.client import RequestError
from dapdee.client.transport import check_base_url
from dapdee.planning.request import PlanRequest


def _positive(name: str, v: float | None, allow_none: bool = True) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")


def check_url(what: str, url: str) -> None:
    """ValueError naming `what` unless `url` is a base URL the SDK takes
    (http(s)://HOST[:PORT][/PATH], no query, fragment or credentials: `check_base_url`)."""
    try:
        check_base_url(url)
    except RequestError as exc:
        raise ValueError(f"{what}: {exc}") from None


def check_profile_path(what: str, path: str) -> None:
    """ValueError naming `what` unless `path` can hold the device profile: an existing regular
    file this process can read (it is loaded, or measured again and replaced), or a new file
    whose nearest existing folder is a directory this process can create files in (the missing
    folders are made when the profile is written). That is tried with a temporary file there,
    removed at once: permission bits do not tell what root or a read-only file system may do.
    O(path depth)."""
    if not path.strip():
        raise ValueError(f"{what}: empty; give the profile's file path")
    target = Path(path)
    if target.exists() or target.is_symlink():
        if target.is_dir():
            raise ValueError(f"{what} {path!r}: is a directory; give the profile's file path")
        if not target.is_file():
            raise ValueError(f"{what} {path!r}: not a regular file")
        if not os.access(target, os.R_OK):
            raise ValueError(f"{what} {path!r}: cannot read it")
        return
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what} {path!r}: cannot write it ({str(folder)!r} is not a directory)")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".dapdee-profile-check-")
    except OSError as exc:
        raise ValueError(f"{what} {path!r}: cannot write it in {str(folder)!r} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


@dataclass(frozen=True)
class Requirements:
    """Per-frame requirements: `latency_budget_ms` (latency mode, and the fallback's deadline),
    `min_accuracy` in [0, 1], `frame_rate` (frames/s offered; also turns on pipelining and is
    the lease's rate), `mode` auto | latency | throughput, `confidence_exits` (plans priced for
    calibrated confidence exits, and run with them)."""

    latency_budget_ms: float | None = None
    min_accuracy: float | None = None
    frame_rate: float | None = None
    mode: str = "auto"
    confidence_exits: bool = False

    def __post_init__(self) -> None:
        """The planner's own rules for these fields (ValueError naming the field)."""
        PlanRequest(
            1.0, 0.0, 0.0, 0.0, self.latency_budget_ms, self.min_accuracy, self.frame_rate, self.mode
        ).check_requirements()

    @property
    def pipelined(self) -> bool:
        """Heavy load: frames are pipelined (throughput mode, or a frame rate to sustain)."""
        return self.mode == "throughput" or self.frame_rate is not None

    def plan_fields(self) -> dict[str, object]:
        """The requirement fields of a plan request (those that are set)."""
        out: dict[str, object] = {"mode": self.mode}
        for key in ("latency_budget_ms", "min_accuracy", "frame_rate"):
            v = getattr(self, key)
            if v is not None:
                out[key] = v
        if self.confidence_exits:
            out["confidence_exits"] = True
        return out


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime behaves. Edge timeouts are `timeout_factor` x the plan's predicted
    latency, at least `timeout_floor_ms` and at most `timeout_max_ms` (always finite). After an
    edge failure the worker rests `backoff_initial_s`, doubling up to `backoff_max_s`, and at
    least the worker's `Retry-After` (`dapdee.device.edge.Backoff`). A
    re-plan is asked for when the bandwidth or the device speed 1/(1 − load) drifts by more
    than `replan_threshold` (relative), after `plan_max_age_s`, after edge trouble, and at the
    lease's `replan_after_s`; never more often than every `min_replan_s`. Idle links are probed
    once the last sample is `probe_idle_s` old."""

    requirements: Requirements = field(default_factory=Requirements)
    max_inflight: int = 3
    fp16: bool = False
    timeout_factor: float = 3.0
    timeout_floor_ms: float = 1000.0
    timeout_max_ms: float = 60000.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    replan_threshold: float = 0.2
    plan_max_age_s: float = 10.0
    min_replan_s: float = 0.2
    probe_idle_s: float = 1.0
    rtt_probe_every_s: float = 5.0

    def __post_init__(self) -> None:
        if isinstance(self.max_inflight, bool) or not isinstance(self.max_inflight, int) or self.max_inflight < 1:
            raise ValueError(f"max in flight: expected an integer >= 1, got {self.max_inflight!r}")
        for name in (
            "timeout_factor",
            "timeout_floor_ms",
            "timeout_max_ms",
            "backoff_initial_s",
            "backoff_max_s",
            "replan_threshold",
            "plan_max_age_s",
            "min_replan_s",
            "probe_idle_s",
            "rtt_probe_every_s",
        ):
            _positive(name.replace("_", " "), getattr(self, name), allow_none=False)
        if self.timeout_floor_ms > self.timeout_max_ms:
            raise ValueError("timeout floor: must not exceed the timeout maximum")

    def edge_timeout_s(self, predicted_ms: float | None) -> float:
        """Seconds to wait for an edge answer: factor x prediction within [floor, max]; a
        missing or non-finite prediction gets the floor. Always finite. O(1)."""
        pred = predicted_ms if predicted_ms is not None and math.isfinite(predicted_ms) else 0.0
        return min(max(self.timeout_factor * pred, self.timeout_floor_ms), self.timeout_max_ms) / 1000.0


@dataclass(frozen=True)
class PlannerConfig:
    """The planner: base `url`, the device `token` (plans, infer), the `admin_token` (only to
    upload this device's profile or the model's graph), the device profile's `tier` name, the
    `device_id` whose lease plans create (None: no lease), and timeouts: `timeout_s` per call,
    `ready_timeout_s` to wait for a model the edge is still registering, `worker_wait_s` to
    wait for a worker to appear, `workers_refresh_s` between reads of the worker list."""

    url: str
    tier: str
    token: str | None = None
    admin_token: str | None = None
    device_id: str | None = None
    timeout_s: float = 5.0
    ready_timeout_s: float = 60.0
    worker_wait_s: float = 5.0
    workers_refresh_s: float = 5.0

    def __post_init__(self) -> None:
        check_url("planner URL", self.url)
        for name in ("timeout_s", "ready_timeout_s", "worker_wait_s", "workers_refresh_s"):
            _positive(f"planner {name.replace('_', ' ')}", getattr(self, name), allow_none=False)


DEFAULT_THREADS = 1  # torch CPU threads of the device unless `--threads` says otherwise


def default_tier(slowdown: float, threads: int = DEFAULT_THREADS) -> str:
    """The device profile's default tier name for an emulated slowdown K and `threads` torch
    CPU threads: `device-k10`, `device-k2_5` at the default thread count, `device-k10-t2` at
    any other (the device then computes at another speed, so it is another profile at the
    planner; the default count keeps the names profiles were published and committed under)."""
    name = f"device-k{slowdown:g}".replace(".", "_")
    return name if threads == DEFAULT_THREADS else f"{name}-t{threads}"
