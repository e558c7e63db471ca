"""What the worker can take per second, in the profile's milliseconds, as it measures it.

Leases book a worker in *profiled* edge milliseconds (DESIGN.md §6): a lease of f frames/s at
e ms per frame reserves f·e of the worker's `capacity_ms_per_s`. Nominally that capacity is
1000 ms per compute thread. But the profile was measured on an idle machine; under a fleet's
load (the event loop's HTTP work, other processes on the host) a request's compute can take
longer than the profile says, and a worker booked to its nominal capacity then queues and
times out. So the worker compares, request by request, the compute time its slot really spent
(its share of the batch) with what its profile predicts for the same nodes, and advertises
`nominal / κ`, κ the ratio of the two over recent requests:

- κ is the ratio of sums over the requests of the last `window_s` seconds (one slow request does
  not move it much, a sustained slowdown does), and only once they hold at least `min_ms` of
  predicted compute (an idle worker advertises its nominal capacity);
- κ is clamped to [1, `max_factor`]: batching or a faster run never advertise more than the
  nominal capacity (the conservative side of admission), a pathological run not less than
  nominal / `max_factor`;
- the advertised κ changes only when the measured one moves more than `hysteresis` (relative)
  away from it: every change re-prices the worker's leases and may move devices, so the
  measurement's noise must not;
- it rises at once (capacity drops: leases must stop over-booking now) but falls back only once
  the measured κ has stayed below it for `raise_after_s` (capacity comes back slowly). A worker
  is often slower *because* of the load it carries (its own HTTP work, co-located processes);
  following the relief at once re-admits the devices that caused the slowdown, and capacity and
  plans oscillate together.

Cost: O(1) amortised per request; memory O(requests in the window).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class CapacityMeter:
    """Measured ratio of real to profiled compute over a sliding window (module docstring)."""

    def __init__(
        self,
        window_s: float = 20.0,
        min_ms: float = 200.0,
        max_factor: float = 4.0,
        hysteresis: float = 0.2,
        raise_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not window_s > 0 or not min_ms >= 0 or not max_factor >= 1 or not hysteresis >= 0 or not raise_after_s >= 0:
            raise ValueError(
                "window_s > 0, min_ms >= 0, max_factor >= 1, hysteresis >= 0 and raise_after_s >= 0 are required"
            )
        self.window_s = window_s
        self.min_ms = min_ms
        self.max_factor = max_factor
        self.hysteresis = hysteresis
        self.raise_after_s = raise_after_s
        self.clock = clock
        self._advertised = 1.0
        self._lower_since: float | None = None  # since when the measured κ is below the advertised one
        self._samples: deque[tuple[float, float, float]] = deque()  # (time, predicted ms, actual ms)
        self._predicted = 0.0
        self._actual = 0.0

    def record(self, predicted_ms: float, actual_ms: float) -> None:
        """One request: the profile's compute ms for its nodes and the slot's ms it took."""
        if not (predicted_ms >= 0 and actual_ms >= 0):  # NaN or negative: not a measurement
            return
        now = self.clock()
        self._samples.append((now, predicted_ms, actual_ms))
        self._predicted += predicted_ms
        self._actual += actual_ms
        self._expire(now)

    def factor(self) -> float:
        """κ: actual over predicted compute in the window, clamped to [1, max_factor]; 1 while
        the window holds less than `min_ms` of predicted compute."""
        self._expire(self.clock())
        if self._predicted < max(self.min_ms, 1e-9):
            return 1.0
        return min(self.max_factor, max(1.0, self._actual / self._predicted))

    def capacity(self, nominal_ms_per_s: float) -> float:
        """The capacity to advertise: `nominal_ms_per_s / κ`, κ the advertised factor. It follows
        a measured κ more than `hysteresis` above it at once, one more than `hysteresis` below
        it once that has held at every call for `raise_after_s`."""
        k, now = self.factor(), self.clock()
        band = self.hysteresis * self._advertised
        if k > self._advertised + band:
            self._advertised, self._lower_since = k, None
        elif k < self._advertised - band:
            if self._lower_since is None:
                self._lower_since = now
            if now - self._lower_since >= self.raise_after_s:
                self._advertised, self._lower_since = k, None
        else:
            self._lower_since = None
        return nominal_ms_per_s / self._advertised

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            _, p, a = self._samples.popleft()
            self._predicted -= p
            self._actual -= a
        if not self._samples:  # no drift from float subtraction once empty
            self._predicted = self._actual = 0.0
