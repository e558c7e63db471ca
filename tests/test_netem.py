"""Network / device emulation: the token bucket paces real bytes at the configured rate."""

from __future__ import annotations

import asyncio
import time

import pytest

from dapdee.netem import NETWORKS, ShapedUplink, emulate_slowdown, parse_network


def test_parse_network_names_and_numbers() -> None:
    assert parse_network("3G").rate_mbps == 1.1
    assert parse_network("cat1").rate_mbps == NETWORKS["CAT1"]
    assert parse_network("wifi").name == "WiFi"
    assert parse_network("4.5").rate_mbps == 4.5
    for bad in ("5G", "-1", "0", "nan", ""):
        with pytest.raises(ValueError, match="network"):
            parse_network(bad)


def _time_generator(shaper: ShapedUplink, body: bytes) -> tuple[float, bytes]:
    async def run() -> tuple[float, bytes]:
        t0 = time.perf_counter()
        parts = [p async for p in shaper.shaped_body(body, chunk=1024)]
        return time.perf_counter() - t0, b"".join(parts)

    return asyncio.run(run())


@pytest.mark.parametrize("net,nbytes", [("3G", 40_000), ("4G", 200_000)])
def test_generator_paces_at_rate(net: str, nbytes: int) -> None:
    rate = parse_network(net).rate_mbps
    shaper = ShapedUplink(rate, rtt_ms=0.0, burst_bytes=0)
    body = bytes(range(256)) * (nbytes // 256)
    elapsed, out = _time_generator(shaper, body)
    assert out == body
    want = len(body) * 8 / (rate * 1e6)
    assert abs(elapsed - want) / want < 0.15, (elapsed, want)


def test_loopback_transfer_paced_and_rtt_added() -> None:
    """Bytes really sent over a loopback TCP socket arrive at the shaped rate (+ the RTT)."""
    rate, rtt_ms, nbytes = 2.0, 50.0, 60_000
    shaper = ShapedUplink(rate, rtt_ms=rtt_ms, burst_bytes=512)

    async def run() -> tuple[float, int]:
        got = 0
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal got
            while chunk := await reader.read(65536):
                got += len(chunk)
            done.set()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.perf_counter()
        async for part in shaper.shaped_body(b"\x01" * nbytes, chunk=1460):
            writer.write(part)
            await writer.drain()
        writer.close()
        await done.wait()
        elapsed = time.perf_counter() - t0
        server.close()
        return elapsed, got

    elapsed, got = asyncio.run(run())
    assert got == nbytes
    want = shaper.transfer_ms(nbytes) / 1000.0
    assert abs(elapsed - want) / want < 0.15, (elapsed, want)


def test_shared_link_serialises_concurrent_senders() -> None:
    rate = 4.0
    shaper = ShapedUplink(rate, burst_bytes=0)

    async def send(n: int) -> None:
        async for _ in shaper.shaped_body(b"\0" * n, delay=False):
            pass

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(send(50_000), send(50_000))
        return time.perf_counter() - t0

    elapsed = asyncio.run(run())
    want = 100_000 * 8 / (rate * 1e6)
    assert abs(elapsed - want) / want < 0.15, (elapsed, want)
    assert shaper.bytes_sent == 100_000


def test_rate_change_takes_effect() -> None:
    shaper = ShapedUplink(8.0, burst_bytes=0)
    shaper.set_rate(1.0)
    elapsed, _ = _time_generator(shaper, b"\0" * 12_500)  # 0.1 s at 1 Mbit/s
    assert abs(elapsed - 0.1) / 0.1 < 0.15
    with pytest.raises(ValueError):
        shaper.set_rate(0)


def test_emulate_slowdown_stretches_duration() -> None:
    def work() -> int:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.01:
            pass
        return 7

    t0 = time.perf_counter()
    assert emulate_slowdown(work, 5) == 7
    elapsed = time.perf_counter() - t0
    assert 0.045 < elapsed < 0.15  # 5 x 10 ms, plus scheduling delay on a busy machine
    with pytest.raises(ValueError):
        emulate_slowdown(work, 0.5)


def test_emulate_slowdown_on_cpu_time_adds_waits_once() -> None:
    """Stretching the thread's CPU time: 10 ms of CPU becomes 50 ms, 20 ms spent waiting
    (here: sleeping, as a thread does that waits for the CPU or a lock) is not stretched."""

    spent: dict[str, float] = {}

    def work() -> None:
        w, t = time.perf_counter(), time.thread_time()
        while time.thread_time() - t < 0.01:
            pass
        time.sleep(0.02)
        spent["cpu"], spent["wall"] = time.thread_time() - t, time.perf_counter() - w

    t0 = time.perf_counter()
    emulate_slowdown(work, 5, clock=time.thread_time)
    added = time.perf_counter() - t0 - spent["wall"]
    # the added sleep is 4 x the CPU time (~40 ms), not 4 x the wall time (>= 120 ms); measured
    # against the work's own clocks, so a loaded host does not move the bounds
    assert 4 * spent["cpu"] - 0.002 <= added < 4 * spent["cpu"] + 0.03, (added, spent)
    from dapdee.device.bandwidth import ComputeLoadMonitor

    # the load the cost model must see for that frame: 1 - 50 / 70 (stretched CPU / frame)
    assert ComputeLoadMonitor(stretch=5).observe(0.01, 0.03) == pytest.approx(1 - 50 / 70)
    assert ComputeLoadMonitor().observe(0.01, 0.03) == pytest.approx(1 - 1 / 3)  # wall-time emulation
