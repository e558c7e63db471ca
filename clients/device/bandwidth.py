"""Sensing on the device: uplink bandwidth, round trip and compute load.

- `BandwidthEstimator`: EWMA of the uplink rate seen by the device's own uploads. A sample is
  `bytes · 8 / (elapsed − server queue_ms − server compute_ms − rtt − overhead)`; samples whose
  upload part is too small to time (under `min_upload_ms`) are ignored. Idle probes are pairs
  (small, large) whose differences give the rate with the RTT and the fixed per-request cost
  (HTTP, codec, scheduling) cancelled, and measure that fixed `overhead`.
- `RttEstimator`: windowed minimum of cheap `GET /v2/health/live` round trips (these include the HTTP
  overhead of one request on top of the network round trip, which the bandwidth samples
  then also net out).
- `LoadMonitor`: compute load = the share of all CPUs used by *other* processes, from
  `/proc/stat` (machine busy jiffies) minus this process's own CPU time, clamped to
  [0, 0.95]. Off Linux it reports 0.
- `ComputeLoadMonitor`: the alternative for an emulated device on a shared host: the share of
  wall time the device's own compute thread loses (1 − CPU time / wall time).

All O(1) per sample; no web imports.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

MAX_LOAD = 0.95
STEP_FACTOR = 2.0


@dataclass
class BandwidthEstimator:
    """EWMA of uplink Mbit/s from upload timings: weight `alpha` on the newest sample, scaled
    down for uploads shorter than `full_weight_ms` (see `_fold`)."""

    prior_mbps: float = 1.0
    alpha: float = 0.4
    min_upload_ms: float = 1.0
    min_bytes: int = 512
    full_weight_ms: float = 20.0
    estimate_mbps: float = field(init=False)
    overhead_ms: float = field(default=0.0, init=False)  # fixed per-request cost beyond the rtt
    pairs: int = field(default=0, init=False)
    weight_sum: float = field(default=0.0, init=False)
    step_dir: int = field(default=0, init=False)  # direction of the last sample's big deviation
    samples: int = field(default=0, init=False)
    last_sample_at: float = field(default=0.0, init=False)
    last_sample_mbps: float | None = field(default=None, init=False)
    history: deque[tuple[int, float, float, float, float | None]] = field(
        default_factory=lambda: deque(maxlen=64), init=False
    )  # (bytes, elapsed_ms, server_ms, rtt_ms, sample or None), newest last

    def __post_init__(self) -> None:
        self.estimate_mbps = self.prior_mbps

    def observe(self, nbytes: int, elapsed_ms: float, server_ms: float, rtt_ms: float) -> float | None:
        """Fold in one upload of `nbytes` that took `elapsed_ms` end to end, of which the server
        reported `server_ms` (queue + compute) and the round trip is `rtt_ms`. Returns the
        sample (Mbit/s) or None when it was too small to use."""
        upload_ms = elapsed_ms - server_ms - rtt_ms - self.overhead_ms
        if nbytes < self.min_bytes or upload_ms < self.min_upload_ms:
            self.history.append((nbytes, elapsed_ms, server_ms, rtt_ms, None))
            return None
        sample = nbytes * 8.0 / (upload_ms * 1000.0)
        self.history.append((nbytes, elapsed_ms, server_ms, rtt_ms, sample))
        return self._fold(sample, upload_ms)

    def _fold(self, sample: float, upload_ms: float) -> float:
        """Fold one sample in. Short uploads are dominated by timing noise (RTT jitter, HTTP
        overhead), so a sample weighs w = min(1, upload_ms / full_weight_ms); the newest gets
        max(alpha·w, w / (Σw + w)): a weighted mean while little is known, then the EWMA."""
        w = min(1.0, upload_ms / self.full_weight_ms)
        a = max(self.alpha * w, w / (self.weight_sum + w))
        # a step change: two samples in a row off by more than STEP_FACTOR the same way are
        # believed at once (one alone may be a timing spike; `suspect_change` asks for a probe)
        ratio = sample / self.estimate_mbps if self.estimate_mbps > 0 else 1.0
        step = 1 if ratio > STEP_FACTOR else -1 if ratio < 1.0 / STEP_FACTOR else 0
        if step and step == self.step_dir:
            a = max(a, w)
        self.step_dir = step
        self.estimate_mbps = a * sample + (1 - a) * self.estimate_mbps
        self.weight_sum = min(self.weight_sum + w, 1e6)
        self.samples += 1
        self.last_sample_at = time.monotonic()
        self.last_sample_mbps = sample
        return sample

    def observe_pair(self, small: tuple[int, float], large: tuple[int, float], rtt_ms: float) -> float | None:
        """Fold in two back-to-back uploads, each (bytes, elapsed − server ms): the rate is
        Δbytes / Δtime (the round trip and any fixed per-request cost cancel), and the fixed
        cost beyond `rtt_ms` — small's time minus its bytes at that rate minus the round trip —
        updates `overhead_ms`, which single-upload samples then also subtract. Returns the rate
        sample or None when the pair cannot be used (sizes too close, times not increasing)."""
        (n1, t1), (n2, t2) = small, large
        dt = t2 - t1
        if n2 < 1.5 * n1 or dt < self.min_upload_ms:
            return None
        sample = (n2 - n1) * 8.0 / (dt * 1000.0)
        fixed = t1 - rtt_ms - n1 * 8.0 / (sample * 1000.0)
        self.overhead_ms = max(0.0, fixed if self.pairs == 0 else 0.5 * fixed + 0.5 * self.overhead_ms)
        self.pairs += 1
        self.history.append((n2 - n1, dt, 0.0, 0.0, sample))
        return self._fold(sample, dt)

    @property
    def suspect_change(self) -> bool:
        """The last sample was far off the estimate: a probe soon would confirm or refute it."""
        return self.step_dir != 0

    def age_s(self) -> float:
        """Seconds since the last sample (inf before the first)."""
        return time.monotonic() - self.last_sample_at if self.samples else float("inf")


@dataclass
class RttEstimator:
    """Round trip (ms): the minimum of the last `window` measurements. Queueing and scheduler
    spikes only ever add delay, so the windowed minimum tracks the path's base round trip
    (as TCP's min-RTT filters do) while still following a lasting change within `window`."""

    window: int = 8
    estimate_ms: float = 0.0
    samples: int = 0
    last_sample_at: float = 0.0
    recent: deque[float] = field(default_factory=deque)

    def observe(self, rtt_ms: float) -> None:
        if rtt_ms < 0:
            return
        self.recent.append(rtt_ms)
        while len(self.recent) > self.window:
            self.recent.popleft()
        self.estimate_ms = min(self.recent)
        self.samples += 1
        self.last_sample_at = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self.last_sample_at if self.samples else float("inf")


def _read_proc_stat() -> tuple[int, int] | None:
    """(busy jiffies, total jiffies) over all CPUs, or None where /proc/stat is absent."""
    try:
        with open("/proc/stat") as f:
            line = f.readline()
    except OSError:
        return None
    parts = line.split()
    if not parts or parts[0] != "cpu":
        return None
    vals = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
    vals += [0] * (8 - len(vals))
    total = sum(vals)
    idle = vals[3] + vals[4]
    return total - idle, total


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoadMonitor:
    """Compute load from other processes: Δ(machine busy − own CPU) / Δ(machine total),
    smoothed by an EWMA, clamped to [0, MAX_LOAD]. Call `sample()` now and then (≥ 0.2 s apart)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha
        self.clk_tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.load = 0.0
        self.samples = 0
        self._prev = _read_proc_stat()
        self._prev_own = _own_cpu_s()

    def sample(self) -> float:
        """Update and return the load estimate."""
        cur = _read_proc_stat()
        own = _own_cpu_s()
        if cur is None or self._prev is None:
            self._prev, self._prev_own = cur, own
            return self.load
        d_busy = cur[0] - self._prev[0]
        d_total = cur[1] - self._prev[1]
        d_own = (own - self._prev_own) * self.clk_tck
        if d_total <= 0:
            return self.load
        self._prev, self._prev_own = cur, own
        other = min(MAX_LOAD, max(0.0, (d_busy - d_own) / d_total))
        self.load = other if self.samples == 0 else self.alpha * other + (1 - self.alpha) * self.load
        self.load = min(MAX_LOAD, max(0.0, self.load))
        self.samples += 1
        return self.load


class ComputeLoadMonitor:
    """Compute load seen by the device's own compute: 1 − CPU time / wall time of the device
    thread while it computes (time lost to other threads and processes), EWMA-smoothed and
    clamped to [0, MAX_LOAD]. This is exactly the slowdown factor 1/(1 − load) of the cost
    model, for a device emulated on a shared host. Feed it with `observe(cpu_s, wall_s)`;
    `calibrate()` runs a short busy loop to take a reading when the device has been idle."""

    def __init__(self, alpha: float = 0.3, min_wall_s: float = 0.0005) -> None:
        self.alpha = alpha
        self.min_wall_s = min_wall_s
        self.load = 0.0
        self.samples = 0
        self.last_sample_at = 0.0

    def observe(self, cpu_s: float, wall_s: float) -> float:
        if wall_s >= self.min_wall_s:
            lost = min(MAX_LOAD, max(0.0, 1.0 - cpu_s / wall_s))
            self.load = lost if self.samples == 0 else self.alpha * lost + (1 - self.alpha) * self.load
            self.samples += 1
            self.last_sample_at = time.monotonic()
        return self.load

    def calibrate(self, busy_s: float = 0.003) -> float:
        """Spin `busy_s` of CPU in this thread and fold in the CPU/wall ratio. Blocking."""
        t0, c0 = time.perf_counter(), time.thread_time()
        x = 0
        while time.thread_time() - c0 < busy_s:
            x += 1
        return self.observe(time.thread_time() - c0, time.perf_counter() - t0)

    def sample(self) -> float:
        return self.load


def drifted(old: float, new: float, threshold: float) -> bool:
    """Relative change |new/old − 1| > threshold (old ≤ 0 counts as drifted when new > 0)."""
    if old <= 0:
        return new > 0
    return abs(new / old - 1.0) > threshold


def load_drifted(old: float, new: float, threshold: float) -> bool:
    """Device speed 1/(1 − load) changed by more than `threshold` (relative): the cost model
    scales device time by that factor, so this is the drift that matters for a plan."""
    return drifted(1.0 - old, 1.0 - new, threshold)
