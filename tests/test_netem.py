"""Network / device emulation: the token bucket never lets bytes out faster than its rate, books
the link exactly, serialises senders; the slowdown stretches the clock it is given."""

from __future__ import annotations

import asyncio
import time

import pytest

from dapdee.bench.netem_timing import loopback, shared
from dapdee.netem import NETWORKS, ShapedUplink, emulate_slowdown, parse_network


def test_parse_network_names_and_numbers() -> None:
    assert parse_network("3G").rate_mbps == 1.1
    assert parse_network("cat1").rate_mbps == NETWORKS["CAT1"]
    assert parse_network("wifi").name == "WiFi"
    assert parse_network("4.5").rate_mbps == 4.5
    for bad in ("5G", "-1", "0", "nan", ""):
        with pytest.raises(ValueError, match="network"):
            parse_network(bad)


# Wall-clock time only ever enters as a lower bound that holds on any machine (a shaper that lets
# bytes out early, or a slowdown that sleeps too little, is wrong however loaded the host is), or
# as the measured interval around a few calls, which can only widen a bound. How close to the
# targets things finish on this machine is measured by bench/netem_timing.py, whose runs the
# loopback and shared-link tests reuse.
CLOCK_SLACK_S = 1e-6  # asyncio may wake a timer up to its clock resolution (1 ns here) early


def _drain_timed(shaper: ShapedUplink, body: bytes, delay: bool = True) -> tuple[float, bytes]:
    """Seconds on the shaper's own clock (time.monotonic) to pull every chunk, and the bytes."""

    async def run() -> tuple[float, bytes]:
        t0 = time.monotonic()
        parts = [p async for p in shaper.shaped_body(body, chunk=1024, delay=delay)]
        return time.monotonic() - t0, b"".join(parts)

    return asyncio.run(run())


@pytest.mark.parametrize("net,nbytes", [("3G", 40_000), ("4G", 200_000)])
def test_generator_never_faster_than_the_rate(net: str, nbytes: int) -> None:
    """With no burst, each chunk is booked after the previous one (the bucket's clock only moves
    forward by n/rate per chunk), so the last chunk cannot leave before t0 + N/rate."""
    rate = parse_network(net).rate_mbps
    shaper = ShapedUplink(rate, rtt_ms=0.0, burst_bytes=0)
    body = bytes(range(256)) * (nbytes // 256)
    elapsed, out = _drain_timed(shaper, body)
    assert out == body and shaper.bytes_sent == len(body)
    assert elapsed >= len(body) * 8 / (rate * 1e6) - CLOCK_SLACK_S, elapsed


def test_reserve_books_the_link_exactly() -> None:
    """The bucket's bookkeeping, checked with the calls' own time window: a fresh link with no
    burst makes the first n bytes wait n/rate exactly; bytes booked right after wait for both."""
    shaper = ShapedUplink(8.0, burst_bytes=0)  # 1e6 bytes/s
    t_a = time.monotonic()
    first = shaper.reserve(250_000)
    second = shaper.reserve(250_000)
    t_b = time.monotonic()
    assert first == pytest.approx(0.25, abs=1e-9)
    assert 0.5 - (t_b - t_a) - 1e-9 <= second <= 0.5 + 1e-9, (second, t_b - t_a)
    assert shaper.bytes_sent == 500_000
    # a burst allowance lets that many bytes leave at once after an idle period
    bursty = ShapedUplink(8.0, burst_bytes=100_000)
    assert bursty.reserve(100_000) == pytest.approx(0.0, abs=1e-6)


def test_the_default_link_lets_no_byte_ahead_of_its_rate() -> None:
    """An idle link by default grants no burst: a small frame (the 1 KB of a Fashion-MNIST
    input) waits its whole size over the rate, as the cost model prices its transfer (a 256 B
    default let a CAT1 frame through at 1.3x the rate), after idling too."""
    link = ShapedUplink(0.13)  # CAT1: 16,250 bytes/s
    assert link.reserve(1024) == pytest.approx(1024 / 16_250, rel=1e-6)
    fast = ShapedUplink(8.0)  # 1e6 bytes/s: idle again 50 ms after its first frame
    fast.reserve(1024)
    time.sleep(0.05)
    assert fast.reserve(1024) == pytest.approx(1024 / 1e6, rel=1e-6)


def test_loopback_transfer_not_faster_than_rate_plus_rtt() -> None:
    """Bytes really sent over a loopback TCP socket all arrive, and not before the emulated round
    trip plus (N − burst)/rate: the burst may leave at once, the rest at the rate."""
    rate, rtt_ms, nbytes, burst = 2.0, 50.0, 60_000, 512
    run = loopback(rate, rtt_ms, nbytes, burst)
    assert run.nbytes == nbytes
    assert run.elapsed_s >= rtt_ms / 1000 + (nbytes - burst) * 8 / (rate * 1e6) - CLOCK_SLACK_S, run
    assert run.target_s * 1000 == pytest.approx(rtt_ms + nbytes * 8 / (rate * 1000))


def test_shared_link_serialises_concurrent_senders() -> None:
    """Two senders of 50 kB on one 4 Mbit/s shaper take at least 100 kB / rate together (two
    independent links would finish in half that)."""
    run = shared(4.0)
    assert run.nbytes == 100_000
    assert run.elapsed_s >= 100_000 * 8 / (4.0 * 1e6) - CLOCK_SLACK_S, run


def test_rate_change_takes_effect() -> None:
    """A new rate prices the next bytes (12.5 kB at 1 Mbit/s: 0.1 s) and re-times bytes already
    booked: 1 MB booked at 8 Mbit/s (1 s) re-timed at 16 Mbit/s has at most 0.5 s left."""
    shaper = ShapedUplink(8.0, burst_bytes=0)
    shaper.set_rate(1.0)
    assert shaper.reserve(12_500) == pytest.approx(0.1, abs=1e-9)
    with pytest.raises(ValueError):
        shaper.set_rate(0)
    link = ShapedUplink(8.0, burst_bytes=0)
    t_a = time.monotonic()
    assert link.reserve(1_000_000) == pytest.approx(1.0, abs=1e-9)
    link.set_rate(16.0)
    left = link.reserve(0)
    t_b = time.monotonic()
    assert 0.5 - (t_b - t_a) - 1e-9 <= left <= 0.5 + 1e-9, (left, t_b - t_a)


class StepClock:
    """A clock that advances by `step` seconds per reading (for emulate_slowdown's `clock`)."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_emulate_slowdown_stretches_the_given_clock() -> None:
    """The sleep is (K − 1) × the duration on the clock it is given: a clock that says the work took
    50 ms makes K = 5 sleep >= 200 ms although the work itself took no time (a wall-clock stretch would
    sleep about 0 here)."""
    clock = StepClock(0.05)
    t0 = time.monotonic()
    assert emulate_slowdown(lambda: 7, 5, clock=clock) == 7
    assert time.monotonic() - t0 >= 4 * 0.05 - CLOCK_SLACK_S
    with pytest.raises(ValueError):
        emulate_slowdown(lambda: 7, 0.5)


def test_thread_cpu_clock_does_not_count_waits() -> None:
    """emulate_slowdown(clock=time.thread_time) stretches only CPU time, because the thread's CPU
    clock does not advance while it waits: 50 ms asleep cost it (far) under 10 ms of CPU."""
    t = time.thread_time()
    time.sleep(0.05)
    assert time.thread_time() - t < 0.01
    from dapdee.device.sensing import ComputeLoadMonitor

    # the load the cost model must see for a frame of 10 ms CPU stretched 5x within 30 ms of wall
    # time: 1 - 50 / 70 (stretched CPU / frame)
    assert ComputeLoadMonitor(stretch=5).observe(0.01, 0.03) == pytest.approx(1 - 50 / 70)
    assert ComputeLoadMonitor().observe(0.01, 0.03) == pytest.approx(1 - 1 / 3)  # wall-time emulation
