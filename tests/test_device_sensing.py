"""Device sensing (dapdee.device.sensing): the bandwidth estimator on hand-worked upload timings
(lone uploads, a pipelined stream sharing the link, uploads finishing out of order), its refusal
of implausible server times, the round-trip filter, and both load monitors on scripted readings.
No wall clock enters any assertion."""

from __future__ import annotations

import math
import time

import pytest

from dapdee.device.sensing import (
    MAX_LOAD,
    BandwidthEstimator,
    ComputeLoadMonitor,
    LoadMonitor,
    RttEstimator,
    Sensing,
    drifted,
    load_drifted,
)


def lone(
    bw: BandwidthEstimator, nbytes: int, start: float, end: float, server_ms: float, rtt_ms: float
) -> float | None:
    return bw.upload_finished(bw.upload_started(start), nbytes, end, server_ms, rtt_ms)


def test_lone_uploads_net_of_server_time_and_round_trip() -> None:
    bw = BandwidthEstimator(prior_mbps=1.0)
    # 137,500 bytes in 1000 ms with no server time and no rtt: 1.1 Mbit/s
    assert lone(bw, 137_500, 0.0, 1.0, 0.0, 0.0) == pytest.approx(1.1)
    assert bw.estimate_mbps == pytest.approx(1.1)
    assert lone(bw, 137_500, 2.0, 3.03, 10.0, 20.0) == pytest.approx(1.1)  # 1030 ms - 10 - 20
    assert lone(bw, 100, 4.0, 4.05, 0.0, 0.0) is None  # too small to time
    assert bw.samples == 2


def test_pipelined_stream_is_sensed_as_busy_periods() -> None:
    """A 1 Mbit/s link shared by 4 uploads in flight (each 2,500 bytes: 20 ms alone, 80 ms
    shared); a new upload starts when a response arrives (server 5 ms, rtt 20 ms). No upload
    is ever alone on the link, yet the rate is sensed."""
    bw = BandwidthEstimator(prior_mbps=5.0)
    after = 0.025  # the response arrives this long after the upload's last byte
    tickets = [(bw.upload_started(10.0 + 0.020 * i), 10.0 + 0.020 * i) for i in range(4)]
    got = []
    for i in range(60):
        ticket, _ = tickets.pop(0)
        done = 10.080 + 0.020 * i  # one upload finishes every 20 ms: the link is never idle
        tickets.append((bw.upload_started(done + after), done + after))
        got.append(bw.upload_finished(ticket, 2500, done + after, 5.0, 20.0))
    samples = [x for x in got if x is not None]
    # the first busy period starts with the pipeline filling (its first upload spans 80 ms alone)
    assert len(samples) >= 4 and samples[1:] == pytest.approx([1.0] * (len(samples) - 1), rel=0.05)
    assert bw.estimate_mbps == pytest.approx(1.0, rel=0.1)


def test_out_of_order_failed_and_idle_uploads() -> None:
    bw = BandwidthEstimator(prior_mbps=1.0)
    a, b = bw.upload_started(0.0), bw.upload_started(0.0)
    assert bw.upload_finished(b, 25_000, 0.2, 0.0, 0.0) is None  # waits for `a`
    # the two shared the link: their busy period is timed whole once both are in (the link idle)
    assert bw.upload_finished(a, 25_000, 0.1, 0.0, 0.0) == pytest.approx(2.0)
    bw.upload_failed(bw.upload_started(1.0))  # failed alone on an idle link: no sample, nothing held back
    assert lone(bw, 25_000, 5.0, 5.1, 0.0, 0.0) == pytest.approx(2.0)
    assert [h[0] for h in bw.history] == [50_000, 25_000]  # 50 kB in 200 ms, then 25 kB in 100 ms
    assert [h[1] for h in bw.history] == pytest.approx([200.0, 100.0])
    assert lone(bw, 12_500, 9.0, 9.1, 0.0, 0.0) == pytest.approx(1.0)  # an idle gap: timed from its own start


@pytest.mark.parametrize("server_ms", [-1e9, math.nan, math.inf, 5000.0, "x"])
def test_an_implausible_server_time_gives_no_sample(server_ms: object) -> None:
    """A worker's queue/compute time that is negative, not finite, not a number, or longer than
    the whole upload must not move the estimate (it would skew it by orders of magnitude)."""
    bw = BandwidthEstimator(prior_mbps=3.0)
    assert lone(bw, 137_500, 0.0, 1.0, server_ms, 0.0) is None  # type: ignore[arg-type]
    assert bw.estimate_mbps == 3.0 and bw.samples == 0
    assert lone(bw, 137_500, 2.0, 3.0, 0.0, 0.0) == pytest.approx(1.1)  # the next good upload counts


def test_probe_pair_cancels_fixed_costs() -> None:
    bw = BandwidthEstimator(prior_mbps=1.0)
    # 1 Mbit/s, 20 ms round trip, 3 ms fixed per request: 1,000 bytes -> 8 + 20 + 3 ms; 11,000 -> 88 + 23
    sample = bw.observe_pair((1_000, 31.0), (11_000, 111.0), rtt_ms=20.0)
    assert sample == pytest.approx(1.0)
    assert bw.overhead_ms == pytest.approx(3.0)
    assert bw.observe_pair((1_000, 31.0), (1_200, 40.0), rtt_ms=20.0) is None  # sizes too close


def test_round_trip_is_a_windowed_minimum() -> None:
    rtt = RttEstimator(window=3)
    for v in (30.0, 21.0, 25.0, -5.0, math.nan):
        rtt.observe(v)
    assert rtt.estimate_ms == 21.0 and rtt.samples == 3  # negative and NaN ignored
    for v in (40.0, 41.0, 42.0):
        rtt.observe(v)
    assert rtt.estimate_ms == 40.0  # a lasting change is followed within the window


def test_proc_load_monitor_counts_only_other_processes() -> None:
    """Scripted /proc/stat readings: 1,000 jiffies pass, 600 busy, 200 of them this process's
    (2 s of CPU at 100 ticks/s): others used 40 %; then others 80 % (EWMA 0.5: 60 %)."""
    stats = iter([(0, 0), (600, 1000), (1600, 2000)])
    cpu = iter([0.0, 2.0, 4.0])
    mon = LoadMonitor(alpha=0.5, read_stat=lambda: next(stats), own_cpu_s=lambda: next(cpu), clk_tck=100)
    assert mon.sample() == pytest.approx(0.4)
    assert mon.sample() == pytest.approx(0.6)
    busy = iter([(0, 0), (1000, 1000)])
    pegged = LoadMonitor(read_stat=lambda: next(busy), own_cpu_s=lambda: 0.0, clk_tck=100)
    assert pegged.sample() == MAX_LOAD  # clamped: the cost model needs load < 1


def test_compute_load_monitor() -> None:
    cm = ComputeLoadMonitor()
    assert cm.observe(0.005, 0.010) == pytest.approx(0.5)  # half the wall time lost to others
    # emulation stretching CPU 5x: 10 ms CPU in 30 ms wall ran 50 + 20 ms instead of 50
    assert ComputeLoadMonitor(stretch=5).observe(0.01, 0.03) == pytest.approx(1 - 50 / 70)
    c0 = time.thread_time()
    cm.calibrate(busy_s=0.002)
    assert time.thread_time() - c0 >= 0.002 and cm.samples == 2  # it spun on this thread and took a reading


def test_drift_rules() -> None:
    assert drifted(1.0, 1.25, 0.2) and not drifted(1.0, 1.1, 0.2)
    assert drifted(0.0, 0.1, 0.2) and not drifted(0.0, 0.0, 0.2)
    assert load_drifted(0.0, 0.3, 0.2) and not load_drifted(0.0, 0.1, 0.2)
    # exactly 20 % is not "more than 20 %", whichever way the floats round (3 -> 2.4 and a load
    # 0.2 -> 0.36, i.e. 1 - load 0.8 -> 0.64, used to re-plan; 10 -> 12 did not)
    for old, new in ((10.0, 12.0), (10.0, 8.0), (3.0, 2.4), (3.0, 3.6)):
        assert not drifted(old, new, 0.2) and drifted(old, new * 1.001 if new > old else new * 0.999, 0.2)
    assert not load_drifted(0.2, 0.36, 0.2) and load_drifted(0.2, 0.37, 0.2)


def test_overlapping_uploads_are_timed_as_one_busy_period() -> None:
    """Pairs of 100 kB uploads 10 ms apart on an 8 Mbit/s link, one pair every 250 ms: the two
    share the link, so the first finishes at 190 ms and the second at 200 ms. Each pair is one
    busy period, 200 kB in 200 ms = 8 Mbit/s. The count of uploads sharing the link used to be
    taken at each start only: the first upload closed its period alone (100 kB in 190 ms,
    4.2 Mbit/s) and the second made one of its own (100 kB in 10 ms, 80 Mbit/s)."""
    bw = BandwidthEstimator(prior_mbps=8.0)
    for k in range(6):
        t = 0.25 * k
        a, b = bw.upload_started(t), bw.upload_started(t + 0.01)
        bw.upload_finished(a, 100_000, t + 0.19, 0.0, 0.0)
        bw.upload_finished(b, 100_000, t + 0.20, 0.0, 0.0)
    # each pair's period is folded in as its second upload ends (the link idle), the last one too
    assert len(bw.history) == 6 and all(h[0] == 200_000 for h in bw.history), list(bw.history)
    assert [h[4] for h in bw.history] == pytest.approx([8.0] * 6)
    assert bw.estimate_mbps == pytest.approx(8.0)


def test_a_failed_upload_that_shared_the_link_gives_its_busy_period_no_sample() -> None:
    """Two 100 kB uploads 1 ms apart on an 8 Mbit/s link; the first fails after its bytes went
    out (a worker error). The answered one's 100 kB over the shared 200 ms would read 4 Mbit/s:
    its period gives no sample. A later upload alone on the link is timed as ever."""
    bw = BandwidthEstimator(prior_mbps=8.0)
    a, b = bw.upload_started(0.0), bw.upload_started(0.001)
    bw.upload_failed(a)
    assert bw.upload_finished(b, 100_000, 0.2, 0.0, 0.0) is None
    assert lone(bw, 100_000, 1.0, 1.1, 0.0, 0.0) == pytest.approx(8.0)
    assert [h[4] for h in bw.history] == pytest.approx([8.0]) and bw.estimate_mbps == pytest.approx(8.0)


def test_sensing_states_plan_conditions() -> None:
    s = Sensing(prior_mbps=2.0, fixed_load=0.3)
    assert (s.bandwidth_mbps, s.device_load, s.monitor) == (2.0, 0.3, None)
    s.rtt.observe(12.0)
    s.bandwidth.overhead_ms = 3.0
    assert s.request_rtt_ms == 15.0
    # the device's own CPU per request is priced as device_request_ms, not stated again
    s.request_cpu_ms = 2.0
    assert s.request_rtt_ms == 13.0
    s.request_cpu_ms = 40.0
    assert s.request_rtt_ms == 0.0
    assert isinstance(Sensing(load_source="compute", stretch=4).compute_observer(), ComputeLoadMonitor)
    for bad in ({"fixed_load": 1.0}, {"load_source": "gpu"}, {"prior_mbps": math.inf}):
        with pytest.raises(ValueError):
            Sensing(**bad)  # type: ignore[arg-type]


def test_the_rest_of_a_busy_period_closed_mid_way_gives_no_sample_over_a_short_span() -> None:
    """Five uploads overlap on an 8 Mbit/s link that they share fairly: 115 kB from 4 to 119 ms,
    8 Mbit/s. The period is closed mid-way (75 kB over 99 ms); the uploads after that sent most
    of their bytes before it, so the rest, 40 kB over 16 ms, would read 20 Mbit/s: it gives no
    sample (before, it did, and the estimate rose to 12). A later lone upload is timed as ever."""
    bw = BandwidthEstimator(prior_mbps=8.0)
    ups = [(0.004, 10_000, 0.017), (0.011, 5_000, 0.020), (0.018, 20_000, 0.049), (0.029, 40_000, 0.103),
           (0.055, 40_000, 0.119)]  # fmt: skip
    starts = [(s, 0, i) for i, (s, _, _) in enumerate(ups)]
    ends = [(done, 1, i) for i, (_, _, done) in enumerate(ups)]
    tickets: dict[int, int] = {}
    for t, ended, i in sorted(starts + ends, key=lambda e: (e[0], -e[1])):
        if ended:
            bw.upload_finished(tickets[i], ups[i][1], t, 0.0, 0.0)
        else:
            tickets[i] = bw.upload_started(t)
    assert lone(bw, 10_000, 1.0, 1.01, 0.0, 0.0) == pytest.approx(8.0)
    assert [h[0] for h in bw.history] == [75_000, 10_000]
    assert max(h[4] for h in bw.history) <= 8.0 + 1e-9 and bw.estimate_mbps < 8.0


def test_a_short_lone_upload_is_folded_in_when_it_ends() -> None:
    """A 10 kB upload in 8 ms (10 Mbit/s, shorter than `full_weight_ms`) is a sample when it
    ends; three probe pairs at 1 Mbit/s follow, then a frame a minute later: the estimate ends at
    1, in the order the samples came. Before, the short upload waited for the next one to begin
    and was folded in after the pairs, as if new (the estimate ended at 1.86)."""
    bw = BandwidthEstimator(prior_mbps=1.0)
    assert lone(bw, 10_000, 0.0, 0.008, 0.0, 0.0) == pytest.approx(10.0)
    for _ in range(3):
        assert bw.observe_pair((1_000, 28.0), (11_000, 108.0), rtt_ms=20.0) == pytest.approx(1.0)
    assert lone(bw, 10_000, 60.0, 60.08, 0.0, 0.0) == pytest.approx(1.0)
    assert [h[4] for h in bw.history] == pytest.approx([10.0, 1.0, 1.0, 1.0, 1.0])
    assert bw.estimate_mbps == pytest.approx(1.0)


def test_proc_load_monitor_follows_counters_that_went_back() -> None:
    """The machine's counters went back (a counter reset, a restored /proc/stat): the readings
    after it are measured from the new counters, so the load follows the 80 % the others use.
    Before, every later reading was compared with the counters before the reset: frozen at 0.1."""
    stats = iter([(100_000, 1_000_000), (100_100, 1_001_000)] + [(800 * k, 1000 * k) for k in range(1, 12)])
    mon = LoadMonitor(alpha=0.5, read_stat=lambda: next(stats), own_cpu_s=lambda: 0.0, clk_tck=100)
    loads = [mon.sample() for _ in range(12)]
    assert loads[:2] == pytest.approx([0.1, 0.1])  # the reading that went back changes nothing
    assert loads[2] == pytest.approx(0.45) and loads[-1] == pytest.approx(0.8, abs=0.01)
