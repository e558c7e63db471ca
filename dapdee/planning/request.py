"""A planning request: run-time conditions plus the user's requirements (DESIGN.md, "Planning semantics")."""

from __future__ import annotations

from dataclasses import dataclass

from dapdee.costgraph import is_finite_number
from dapdee.costmodel import Conditions, check_conditions

MODES = ("auto", "latency", "throughput")
# what a request may state (the planner's API and the command line check these; the cost model
# itself takes any finite numbers): beyond them a number is a typo, and a plan priced on it
# holds no meaning (an uplink of 1e-320 Mbit/s makes every transfer infinite)
MIN_BANDWIDTH_MBPS = 1e-3
MAX_BANDWIDTH_MBPS = 1e6
MAX_RTT_MS = 1e6
MAX_BUDGET_MS = 1e7
MAX_FRAME_RATE = 1e5


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class PlanRequest:
    """What a device asks for: uplink `bandwidth_mbps`, `rtt_ms`, device and edge load in [0, 1),
    optional `latency_budget_ms`, `min_accuracy`, `frame_rate`, `mode` (auto|latency|throughput),
    and `confidence_exits`: price the plan by its expected cost under the graph's calibrated
    confidence exits (`dapdee.planning.progressive`).

    An exit whose accuracy is unknown (null) never meets a `min_accuracy` requirement."""

    bandwidth_mbps: float
    rtt_ms: float = 0.0
    device_load: float = 0.0
    edge_load: float = 0.0
    latency_budget_ms: float | None = None
    min_accuracy: float | None = None
    frame_rate: float | None = None
    mode: str = "auto"
    confidence_exits: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field. O(1)."""
        check_conditions(self.bandwidth_mbps, self.rtt_ms, self.device_load, self.edge_load)
        self.check_requirements()

    def check_requirements(self) -> None:
        """Validate the fields other than the run-time conditions (ValueError naming the field)."""
        b = self.latency_budget_ms
        if b is not None and (not is_finite_number(b) or b <= 0):
            raise ValueError(f"latency_budget_ms: must be a finite number > 0, got {b!r}")
        a = self.min_accuracy
        if a is not None and (not _is_num(a) or not 0.0 <= a <= 1.0):
            raise ValueError(f"min_accuracy: must be a number in [0, 1], got {a!r}")
        f = self.frame_rate
        if f is not None and (not is_finite_number(f) or f <= 0):
            raise ValueError(f"frame_rate: must be a finite number > 0, got {f!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {'|'.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.confidence_exits, bool):
            raise ValueError(f"confidence_exits: expected true or false, got {self.confidence_exits!r}")

    def conditions(self) -> Conditions:
        """The cost model's run-time conditions of this request (validated)."""
        return Conditions(self.bandwidth_mbps, self.rtt_ms, self.device_load, self.edge_load)

    def key(self) -> tuple:
        """All fields, in declaration order (for plan ids and caches), numbers as floats (so `8`
        and `8.0` give one plan id, as the service's parsed floats always did); `confidence_exits`
        only when true, so the keys (and plan ids) of ordinary requests are those they always had."""
        numbers = (
            self.bandwidth_mbps,
            self.rtt_ms,
            self.device_load,
            self.edge_load,
            self.latency_budget_ms,
            self.min_accuracy,
            self.frame_rate,
        )
        key = (*(None if v is None else float(v) for v in numbers), self.mode)
        return (*key, "confidence_exits") if self.confidence_exits else key
