"""What the worker can take per second, in the profile's milliseconds, as it measures it.

Leases book a worker in *profiled* milliseconds (DESIGN.md §6): a lease of f frames/s at
e = Σ edge_ms + edge_request_ms per frame reserves f·e of the worker's `capacity_ms_per_s`.
Nominally that capacity is 1000 ms per compute thread. But the profile was measured on an idle
machine; under a fleet's load (the event loop's HTTP work, other processes on the host) a
request can take longer than it is priced, and a worker booked to its nominal capacity then
queues and times out. So the worker compares what its requests really took with what they are
priced at, and advertises `nominal / κ`, κ the ratio of the two over recent requests:

- **Priced** (what the leases book): per answered request, the profile's Σ edge_ms of the nodes
  it ran plus the model's `edge_request_ms` (a confidence request: per row, the nodes the walk
  ran while the row was in it).
- **Taken**: the compute slot's time for the request (its share of the batch, wall clock, so a
  slot starved of the CPU or the GIL counts), plus the CPU time of the event-loop thread, where
  everything outside the slot happens (HTTP, decoding, dispatch, encoding): read from that
  thread's CPU clock (`outside`) each time κ is read, since it cannot be split per request;
  plus the CPU time of a big body's decoding, which runs in a thread of its own
  (`record_outside`).
  Comparing like with like matters: a deep cut runs little compute but pays the whole request
  cost, and a slot-only κ (its fixed per-call time against a few microseconds of profiled
  nodes) read 4-8 at idle and booked the request cost that many times over. Where the platform
  has no per-thread CPU clock (`outside` None), the event loop is not timed and κ compares the
  slot with the profiled compute alone.
- κ is the ratio of sums over the last `window_s` seconds (one slow request does not move it
  much, a sustained slowdown does), and only once they hold at least `min_ms` of priced time
  (an idle worker advertises its nominal capacity). The worker's default is a tenth of one
  slot over the window: a lighter window is mostly the devices' start-up traffic (bandwidth
  probes: large bodies, next to no compute, fresh connections), whose event-loop CPU per
  priced ms is far above a loaded worker's; counted, it read κ ≈ 2.3-2.6 where frames at
  load read ≈ 1.7, and the slow way back (below) held that for a minute. The event loop's
  CPU between requests (heartbeats, metrics scrapes, refused requests) counts as taken: it
  is capacity the leases cannot have.
- κ is clamped to [1, `max_factor`]: batching or a faster run never advertise more than the
  nominal capacity (the conservative side of admission), a pathological run not less than
  nominal / `max_factor`;
- the advertised κ changes only when the measured one moves more than `hysteresis` (relative)
  away from it: every change re-prices the worker's leases and may move devices, so the
  measurement's noise must not;
- it rises at once (capacity drops: leases must stop over-booking now) but falls back only once
  the measured κ has stayed below it for `raise_after_s` (capacity comes back slowly); a
  measured κ of 1 counts as below it whatever the band (an advertised κ under 1 + `hysteresis`
  would otherwise never come back to 1, and the worker would advertise less than its nominal
  capacity for good). A worker
  is often slower *because* of the load it carries (its own HTTP work, co-located processes);
  following the relief at once re-admits the devices that caused the slowdown, and capacity and
  plans oscillate together.

Cost: O(1) amortised per request; memory O(requests in the window).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


def thread_cpu_clock() -> Callable[[], float] | None:
    """The calling thread's CPU clock, readable from any thread: a function returning the CPU
    seconds that thread has used; None where the platform has no per-thread CPU clocks. O(1)."""
    try:
        clock_id = time.pthread_getcpuclockid(threading.get_ident())
        time.clock_gettime(clock_id)
    except (AttributeError, OSError):
        return None
    return lambda: time.clock_gettime(clock_id)


class CapacityMeter:
    """Measured ratio of taken to priced time over a sliding window (module docstring).
    `outside`: the event-loop thread's CPU clock in seconds (`thread_cpu_clock()` called on
    that thread), None to time the compute slots only."""

    def __init__(
        self,
        window_s: float = 20.0,
        min_ms: float = 2000.0,
        max_factor: float = 4.0,
        hysteresis: float = 0.2,
        raise_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        outside: Callable[[], float] | None = None,
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
        self.outside = outside
        self._outside_at, self._outside_s = clock(), (outside() if outside is not None else 0.0)  # last reading
        self._advertised = 1.0
        self._lower_since: float | None = None  # since when the measured κ is below the advertised one
        self._samples: deque[tuple[float, float, float]] = deque()  # (time, priced ms, taken ms)
        self._priced = 0.0
        self._taken = 0.0

    def record(self, compute_ms: float, request_ms: float, slot_ms: float) -> None:
        """One answered request: the profile's compute ms for its nodes, its share of the
        per-request cost (`edge_request_ms`), and the slot's ms it took. The request cost is
        priced only when the event loop is timed (`outside`)."""
        if not (compute_ms >= 0 and request_ms >= 0 and slot_ms >= 0):  # NaN or negative: not a measurement
            return
        priced = compute_ms + (request_ms if self.outside is not None else 0.0)
        self._add(self.clock(), priced, slot_ms)

    def record_outside(self, cpu_ms: float) -> None:
        """CPU ms the worker spent on requests in a thread of its own (a big body decoded off
        the event loop), which neither the slot's time nor the event loop's clock sees: counted
        as taken, like the event loop's CPU, when the event loop is timed (`outside`). O(1)."""
        if self.outside is not None and cpu_ms > 0:
            self._add(self.clock(), 0.0, cpu_ms)

    def factor(self) -> float:
        """κ: taken over priced time in the window, clamped to [1, max_factor]; 1 while the
        window holds less than `min_ms` of priced time. Reads the event loop's CPU clock."""
        now = self.clock()
        if self.outside is not None:
            cpu_s, elapsed = self.outside(), now - self._outside_at
            # what fell before the window (a long gap between readings) is left out pro rata
            inside = 1.0 if elapsed <= self.window_s else self.window_s / elapsed
            self._add(now, 0.0, max(0.0, cpu_s - self._outside_s) * 1000.0 * inside)
            self._outside_at, self._outside_s = now, cpu_s
        self._expire(now)
        if self._priced < max(self.min_ms, 1e-9):
            return 1.0
        return min(self.max_factor, max(1.0, self._taken / self._priced))

    @property
    def priced_ms(self) -> float:
        """The priced ms the window holds as of the last reading. O(1)."""
        return self._priced

    def reset(self) -> None:
        """Forget every measurement and advertise the nominal capacity (the worker's own
        start-up requests, priced before it knew its request cost, must not count)."""
        self._samples.clear()
        self._priced = self._taken = 0.0
        self._advertised, self._lower_since = 1.0, None
        if self.outside is not None:
            self._outside_at, self._outside_s = self.clock(), self.outside()

    def _add(self, now: float, priced_ms: float, taken_ms: float) -> None:
        self._samples.append((now, priced_ms, taken_ms))
        self._priced += priced_ms
        self._taken += taken_ms
        self._expire(now)

    def capacity(self, nominal_ms_per_s: float) -> float:
        """The capacity to advertise: `nominal_ms_per_s / κ`, κ the advertised factor. It follows
        a measured κ more than `hysteresis` above it at once, one more than `hysteresis` below
        it (or at 1, the floor) once that has held at every call for `raise_after_s`."""
        k, now = self.factor(), self.clock()
        band = self.hysteresis * self._advertised
        if k > self._advertised + band:
            self._advertised, self._lower_since = k, None
        elif k < self._advertised - band or k <= 1.0 < self._advertised:
            # κ at its floor counts as below the band, which under 1 + hysteresis reaches below 1:
            # a worker back at its nominal speed gets its nominal capacity back
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
            self._priced -= p
            self._taken -= a
        if not self._samples:  # no drift from float subtraction once empty
            self._priced = self._taken = 0.0
