"""Sensing on the device: uplink bandwidth, round trip and compute load.

- `BandwidthEstimator`: EWMA of the uplink rate seen by the device's own uploads
  (`upload_started` / `upload_finished`). A lone upload's sample is
  `bytes · 8 / (elapsed − server queue_ms − server compute_ms − rtt − overhead)`; overlapping
  uploads (a pipelined stream) are grouped into busy periods of the link, each one sample, so
  a stream senses its link too. Samples too short to time (under `min_upload_ms`) are ignored.
  An upload that timed out alone on the link bounds the rate (`censor`). Idle probes are pairs
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
- `Sensing`: the three together, as the conditions a plan request states.

Timings that come from the network (a worker's reported server time) are checked before they
are used: a value that is not a finite number within the upload's own elapsed time drops the
sample instead of skewing the estimate. All O(1) per sample; no web imports.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dapdee.costmodel import uplink_ms

MAX_LOAD = 0.95
STEP_FACTOR = 2.0


@dataclass
class BandwidthEstimator:
    """EWMA of uplink Mbit/s from upload timings: weight `alpha` on the newest sample, scaled
    down for uploads shorter than `full_weight_ms` (see `_fold`). A busy period whose bytes
    would take less than `min_expected_ms` at the current estimate gives no sample: too small
    to time against per-request noise, which would be read as a slower link (0: all are used)."""

    prior_mbps: float = 1.0
    alpha: float = 0.4
    min_upload_ms: float = 1.0
    min_bytes: int = 512
    full_weight_ms: float = 20.0
    min_expected_ms: float = 0.0
    estimate_mbps: float = field(init=False)
    overhead_ms: float = field(default=0.0, init=False)  # fixed per-request cost beyond the rtt
    pairs: int = field(default=0, init=False)
    overhead_pairs: int = field(default=0, init=False)  # pairs that measured `overhead_ms` (an rtt known)
    weight_sum: float = field(default=0.0, init=False)
    step_dir: int = field(default=0, init=False)  # direction of the last sample's big deviation
    suspect_at: float = field(default=float("-inf"), init=False)  # when a sample or bound was last far off
    samples: int = field(default=0, init=False)
    last_sample_at: float = field(default=0.0, init=False)
    last_sample_mbps: float | None = field(default=None, init=False)
    history: deque[tuple[int, float, float, float, float | None]] = field(
        default_factory=lambda: deque(maxlen=64), init=False
    )  # (bytes, elapsed_ms, server_ms, rtt_ms, sample or None), newest last
    # the busy period being timed: [link start s, bytes, uploads, most uploads open at once,
    # 1 when a failed upload shared the link with it (no sample), 1 when it continues a busy
    # period closed mid-way]
    _train: list[float] | None = field(default=None, init=False, repr=False)
    # uploads not yet folded in: ticket -> [start s, done s or None, bytes, most uploads open with it]
    _open: dict[int, list] = field(default_factory=dict, init=False, repr=False)
    _next_ticket: int = field(default=0, init=False, repr=False)
    _tainted_through: int = field(default=-1, init=False, repr=False)  # uploads up to it shared a failed one's link
    _link_free: float = field(default=float("-inf"), init=False, repr=False)  # when the link went idle

    def __post_init__(self) -> None:
        self.estimate_mbps = self.prior_mbps

    def upload_started(self, start_s: float) -> int:
        """Register an upload beginning at `start_s` (seconds, any monotonic clock); returns the
        ticket to pass to `upload_finished` or `upload_failed`. O(1)."""
        ticket = self._next_ticket
        self._next_ticket += 1
        self._open[ticket] = [start_s, None, 0, 1]
        # every upload open now shares the link with this one: each counts it (a count taken only
        # at an upload's start missed the uploads that began after it, and closed its busy period
        # as if it had been alone: half the rate, then a tiny period of a huge one)
        n = len(self._open)
        for entry in self._open.values():
            entry[3] = max(entry[3], n)
        return ticket

    @property
    def open_uploads(self) -> int:
        """Uploads started and not yet folded in or dropped."""
        return len(self._open)

    def upload_failed(self, ticket: int) -> None:
        """The upload gave no timing (error, timeout): drop it. Its bytes may have been on the
        link all the same: when it shared the link (other uploads open, or a busy period still
        on the link at its start), the busy periods of the uploads it shared it with give no
        sample (their bytes over their span would read a slower link). O(uploads open)."""
        entry = self._open.pop(ticket, None)
        if entry is not None:
            if self._open:
                self._tainted_through = max(self._tainted_through, max(self._open))
            if self._train is not None and entry[0] < self._link_free:
                self._train[4] = 1
        self._drain()

    def upload_finished(self, ticket: int, nbytes: int, end_s: float, server_ms: float, rtt_ms: float) -> float | None:
        """The upload's response came at `end_s`, of which the server reported `server_ms` (queue
        + compute) and the round trip is `rtt_ms`: its bytes had left the link by
        `done = end − (server + rtt + overhead)`. Uploads are then taken in the order they
        started, once every earlier one has finished, and grouped into busy periods of the
        link ("trains"): an upload that began while an earlier one was still on the link
        (start < the latest earlier `done`) joins that train, one that began on an idle link
        starts a new one. A train's bytes over its span is the rate even when uploads overlap
        (a pipelined stream) and share the link; a lone upload is a train of one, whose sample
        is `bytes · 8 / (elapsed − server − rtt − overhead)`. A train becomes a sample when the
        link goes idle, or once it spans `full_weight_ms` and holds twice as many uploads as were
        ever open at once during it: uploads sharing the link finish unevenly, and a window
        that short of whole busy periods is off by at most the bytes then in flight (the rest
        of such a period, the train after it, gives no sample unless it spans `full_weight_ms`:
        the same bytes over a short span would read far too fast). The link is idle once no
        upload is open, so a train closes then, not when the next upload starts (a sample
        folded in minutes later would count as new). Returns the last sample folded in
        (Mbit/s), or None. O(1) amortised."""
        entry = self._open.get(ticket)
        if entry is None:
            return None
        elapsed_ms = (end_s - entry[0]) * 1000.0
        if not (_finite(server_ms) and _finite(rtt_ms) and 0.0 <= server_ms <= elapsed_ms and rtt_ms >= 0.0):
            self.upload_failed(ticket)  # an implausible server time: no sample from this upload
            return None
        entry[1] = end_s - (server_ms + rtt_ms + self.overhead_ms) / 1000.0
        entry[2] = nbytes
        return self._drain()

    def _drain(self) -> float | None:
        sample = None
        while self._open:
            ticket = min(self._open)
            start_s, done, nbytes, concurrent = self._open[ticket]
            if done is None:
                break  # an earlier upload is still open: later ones wait, to be taken in order
            del self._open[ticket]
            if self._train is not None and start_s >= self._link_free:
                sample = self._close_train() or sample
            if self._train is None:  # on a busy link (a train just closed) its bytes queued from `link_free`
                self._train = [max(start_s, self._link_free), 0, 0, 1, 0, int(start_s < self._link_free)]
            train = self._train
            train[1] += nbytes
            train[2] += 1
            train[3] = max(train[3], concurrent)
            if ticket <= self._tainted_through:
                train[4] = 1
            self._link_free = max(self._link_free, done)
            long_enough = (self._link_free - train[0]) * 1000.0 >= self.full_weight_ms
            if long_enough and train[2] >= (2 * train[3] if train[3] > 1 else 1):
                sample = self._close_train() or sample
        if not self._open and self._train is not None:
            # every upload drained has ended, so the link is idle: a later one starts a new train
            sample = self._close_train() or sample
        return sample

    def _close_train(self) -> float | None:
        assert self._train is not None
        (t0, nbytes, _, _, tainted, continued), self._train = self._train, None
        span_ms = (self._link_free - t0) * 1000.0
        expected_ms = uplink_ms(nbytes, self.estimate_mbps)
        too_small = nbytes < self.min_bytes or span_ms < self.min_upload_ms or expected_ms < self.min_expected_ms
        # the rest of a busy period closed mid-way holds bytes partly sent before it began: over
        # a short span they would read a link far faster than it is
        if tainted or too_small or (continued and span_ms < self.full_weight_ms):
            return None
        sample = nbytes * 8.0 / (span_ms * 1000.0)
        self.history.append((nbytes, span_ms, 0.0, 0.0, sample))
        return self._fold(sample, span_ms)

    def _fold(self, sample: float, upload_ms: float) -> float:
        """Fold one sample in. Short uploads are dominated by timing noise (RTT jitter, HTTP
        overhead), so a sample weighs w = min(1, upload_ms / full_weight_ms); the newest gets
        max(alpha·w, w / (Σw + w)): a weighted mean while little is known, then the EWMA."""
        w = min(1.0, upload_ms / self.full_weight_ms)
        a = max(self.alpha * w, w / (self.weight_sum + w))
        # a step change: two samples in a row off by more than STEP_FACTOR the same way, each
        # against the estimate as it came, are believed at once (one alone may be a timing
        # spike; `suspect_change` asks for a probe). The first moves the estimate, so a drop of
        # 2-2.67x is followed at the EWMA's pace instead: judging the second against the
        # estimate before the first also believed pairs of slow samples from a busy worker, and
        # measured ~1 % less goodput in bench/fleet.py (N = 64, K = 30)
        ratio = sample / self.estimate_mbps if self.estimate_mbps > 0 else 1.0
        step = 1 if ratio > STEP_FACTOR else -1 if ratio < 1.0 / STEP_FACTOR else 0
        if step and step == self.step_dir:
            a = max(a, w)
        self.step_dir = step
        self.estimate_mbps = a * sample + (1 - a) * self.estimate_mbps
        self.weight_sum = min(self.weight_sum + w, 1e6)
        self.samples += 1
        self.last_sample_at = time.monotonic()
        if step:
            self.suspect_at = self.last_sample_at
        self.last_sample_mbps = sample
        return sample

    def censor(self, nbytes: int, waited_ms: float, rtt_ms: float) -> float | None:
        """An upload of `nbytes`, alone on the link, got no answer within `waited_ms`: its bytes
        took longer than what is left after the round trip and the fixed per-request cost, so
        the link is at most bytes · 8 / (waited − rtt − overhead) Mbit/s. The estimate is
        lowered to that bound, never raised; a bound below 1/STEP_FACTOR of the estimate marks
        a step down (`suspect_change`: a probe soon). Returns the bound, or None when it says
        nothing new (no time left after the fixed costs, too few bytes, not below the
        estimate: the worker, not the link, may have been slow). O(1)."""
        left_ms = waited_ms - max(rtt_ms, 0.0) - self.overhead_ms
        if not (_finite(left_ms) and left_ms > 0.0) or nbytes < self.min_bytes:
            return None
        bound = nbytes * 8.0 / (left_ms * 1000.0)
        if bound >= self.estimate_mbps:
            return None
        if bound * STEP_FACTOR < self.estimate_mbps:
            self.step_dir, self.suspect_at = -1, time.monotonic()
        self.estimate_mbps = bound
        self.history.append((nbytes, waited_ms, 0.0, rtt_ms, bound))
        return bound

    def observe_pair(self, small: tuple[int, float], large: tuple[int, float], rtt_ms: float | None) -> float | None:
        """Fold in two back-to-back uploads, each (bytes, elapsed − server ms): the rate is
        Δbytes / Δtime (the round trip and any fixed per-request cost cancel), and the fixed
        cost beyond `rtt_ms` — small's time minus its bytes at that rate minus the round trip —
        updates `overhead_ms` (the first such pair sets it, later ones move it halfway), which
        single-upload samples then also subtract. `rtt_ms` None: no round trip is known yet, so
        the pair gives the rate only (its fixed cost holds the round trip: taken as overhead, the
        round trip would be counted twice once it is known). Returns the rate sample or None
        when the pair cannot be used (sizes too close, times not increasing)."""
        (n1, t1), (n2, t2) = small, large
        dt = t2 - t1
        if n2 < 1.5 * n1 or dt < self.min_upload_ms:
            return None
        sample = (n2 - n1) * 8.0 / (dt * 1000.0)
        if rtt_ms is not None:
            fixed = t1 - rtt_ms - n1 * 8.0 / (sample * 1000.0)
            self.overhead_ms = max(0.0, fixed if not self.overhead_pairs else 0.5 * fixed + 0.5 * self.overhead_ms)
            self.overhead_pairs += 1
        self.pairs += 1
        self.history.append((n2 - n1, dt, 0.0, 0.0, sample))
        return self._fold(sample, dt)

    @property
    def suspect_change(self) -> bool:
        """The last sample was far off the estimate: a probe soon would confirm or refute it
        (`suspect_at`: when the last sample or bound far off it came)."""
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
        """Fold in one round trip (ms); negative or non-finite values are ignored. O(window)."""
        if not _finite(rtt_ms) or rtt_ms < 0:
            return
        self.recent.append(rtt_ms)
        while len(self.recent) > self.window:
            self.recent.popleft()
        self.estimate_ms = min(self.recent)
        self.samples += 1
        self.last_sample_at = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self.last_sample_at if self.samples else float("inf")


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    smoothed by an EWMA, clamped to [0, MAX_LOAD]. Call `sample()` now and then (≥ 0.2 s apart).
    `read_stat` gives (busy, total) jiffies of the machine (default: /proc/stat) and `own_cpu_s`
    this process's CPU seconds (default: os.times)."""

    def __init__(
        self,
        alpha: float = 0.5,
        read_stat: Callable[[], tuple[int, int] | None] = _read_proc_stat,
        own_cpu_s: Callable[[], float] = _own_cpu_s,
        clk_tck: int | None = None,
    ) -> None:
        self.alpha = alpha
        self.read_stat = read_stat
        self.own_cpu_s = own_cpu_s
        self.clk_tck = clk_tck or (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)
        self.load = 0.0
        self.samples = 0
        self._prev = read_stat()
        self._prev_own = own_cpu_s()

    def sample(self) -> float:
        """Update and return the load estimate."""
        cur = self.read_stat()
        own = self.own_cpu_s()
        if cur is None or self._prev is None:
            self._prev, self._prev_own = cur, own
            return self.load
        d_busy = cur[0] - self._prev[0]
        d_total = cur[1] - self._prev[1]
        d_own = (own - self._prev_own) * self.clk_tck
        if d_total <= 0:
            if d_total < 0:  # the counters went back (reset or restored): measure from the new ones
                self._prev, self._prev_own = cur, own
            return self.load
        self._prev, self._prev_own = cur, own
        other = min(MAX_LOAD, max(0.0, (d_busy - d_own) / d_total))
        self.load = other if self.samples == 0 else self.alpha * other + (1 - self.alpha) * self.load
        self.load = min(MAX_LOAD, max(0.0, self.load))
        self.samples += 1
        return self.load


class ComputeLoadMonitor:
    """Compute load seen by the device's own compute: the share of the emulated device's time
    lost to other threads and processes, EWMA-smoothed and clamped to [0, MAX_LOAD]. This is
    exactly the slowdown factor 1/(1 − load) of the cost model, for a device emulated on a
    shared host. With `stretch` = 1 (emulation stretches wall time) it is 1 − CPU time / wall
    time of the device thread; with `stretch` = K (emulation stretches only CPU time, waits are
    added once) the device ran K·cpu + (wall − cpu) instead of K·cpu, so it is
    1 − K·cpu / (K·cpu + wall − cpu). Feed it with `observe(cpu_s, wall_s)`; `calibrate()` runs
    a short busy loop to take a reading when the device has been idle."""

    def __init__(self, alpha: float = 0.3, min_wall_s: float = 0.0005, stretch: float = 1.0) -> None:
        self.alpha = alpha
        self.min_wall_s = min_wall_s
        self.stretch = stretch
        self.load = 0.0
        self.samples = 0
        self.last_sample_at = 0.0

    def observe(self, cpu_s: float, wall_s: float) -> float:
        if wall_s >= self.min_wall_s:
            busy = self.stretch * cpu_s
            lost = min(MAX_LOAD, max(0.0, 1.0 - busy / max(busy + wall_s - cpu_s, 1e-12)))
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
    """Relative change |new − old| > threshold · old (old ≤ 0 counts as drifted when new > 0);
    a change of exactly `threshold` is not drifted whatever the float rounding of the two values
    (a relative 1e-9 of slack: 3 -> 2.4 and 10 -> 12 are both 20 %, and both stay)."""
    if old <= 0:
        return new > 0
    return abs(new - old) > threshold * old * (1.0 + 1e-9)


def load_drifted(old: float, new: float, threshold: float) -> bool:
    """Device speed 1/(1 − load) changed by more than `threshold` (relative): the cost model
    scales device time by that factor, so this is the drift that matters for a plan."""
    return drifted(1.0 - old, 1.0 - new, threshold)


class Sensing:
    """The device's live view of its conditions: the uplink estimate, the round trip and the
    compute load (`fixed_load` when given, else the monitor's reading: `proc` = other
    processes' CPU share, `compute` = the share of the device thread's time lost to other
    work). `stretch` is the K by which an emulation stretches CPU time (see
    `ComputeLoadMonitor`). `min_expected_ms`: uploads whose bytes would take less than this at
    the current estimate give no bandwidth sample (`BandwidthEstimator.min_expected_ms`).
    Reading the conditions is O(1)."""

    def __init__(
        self,
        prior_mbps: float = 1.0,
        fixed_load: float | None = None,
        load_source: str = "proc",
        stretch: float = 1.0,
        min_expected_ms: float = 0.0,
    ) -> None:
        if load_source not in ("proc", "compute"):
            raise ValueError(f"load source: expected proc or compute, got {load_source!r}")
        if fixed_load is not None and not (_finite(fixed_load) and 0.0 <= fixed_load < 1.0):
            raise ValueError(f"device load: expected a number in [0, 1), got {fixed_load!r}")
        if not (_finite(prior_mbps) and prior_mbps > 0):
            raise ValueError(f"bandwidth prior: expected a finite number of Mbit/s > 0, got {prior_mbps!r}")
        self.bandwidth = BandwidthEstimator(prior_mbps=prior_mbps, min_expected_ms=min_expected_ms)
        self.rtt = RttEstimator()
        self.fixed_load = fixed_load
        # the device's own CPU per request (encode, send, decode): the planner prices it as the
        # profile's device_request_ms, so it is not part of the round trip the device states
        self.request_cpu_ms = 0.0
        self.monitor: LoadMonitor | ComputeLoadMonitor | None = None
        if fixed_load is None:
            self.monitor = LoadMonitor() if load_source == "proc" else ComputeLoadMonitor(stretch=stretch)

    @property
    def device_load(self) -> float:
        """The device's compute load in [0, MAX_LOAD]."""
        if self.fixed_load is not None:
            return min(self.fixed_load, MAX_LOAD)
        assert self.monitor is not None
        return min(max(self.monitor.load, 0.0), MAX_LOAD)

    @property
    def bandwidth_mbps(self) -> float:
        """The uplink estimate (Mbit/s), at least 1e-3 (the smallest a plan request accepts)."""
        return max(self.bandwidth.estimate_mbps, 1e-3)

    def observe_pair(self, small: tuple[int, float], large: tuple[int, float]) -> float | None:
        """Fold in a probe pair, each (bytes, elapsed − server ms), against the round trip
        estimate when there is one (`BandwidthEstimator.observe_pair`; before the first round
        trip sample the pair gives the rate only). Returns the rate sample, or None."""
        rtt_ms = self.rtt.estimate_ms if self.rtt.samples else None
        return self.bandwidth.observe_pair(small, large, rtt_ms)

    @property
    def request_rtt_ms(self) -> float:
        """The round trip an upload pays per request, as a plan request states it: the network
        round trip plus the fixed per-request cost (HTTP, codec, scheduling) the probe pairs
        measure, less the device's own CPU in it (`request_cpu_ms`), which cost model v2 adds
        as `device_request_ms`: stated here too, it would be paid twice. At least 0."""
        return max(0.0, self.rtt.estimate_ms + self.bandwidth.overhead_ms - self.request_cpu_ms)

    def compute_observer(self) -> ComputeLoadMonitor | None:
        """The monitor the device's own compute must feed (`observe(cpu_s, wall_s)`), if any."""
        return self.monitor if isinstance(self.monitor, ComputeLoadMonitor) else None
