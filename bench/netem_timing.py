"""How close do the network and device emulators come to their targets in wall-clock time here?

The unit tests (tests/test_netem.py) check only what holds on any machine: the shaper never lets
bytes out faster than its rate and its bookkeeping is exact; the slowdown sleeps at least (K−1)×
the measured time. How much later than the target things finish depends on the machine's load,
so it is measured here and printed as a ratio (1.00 = on target):

- a paced body at 3G and 4G rates, bytes sent over loopback TCP at 2 Mbit/s + 50 ms rtt,
  two senders sharing one 4 Mbit/s link, a rate change to 1 Mbit/s;
- emulate_slowdown K = 5 on wall time (10 ms of work) and on the thread's CPU time (10 ms of
  CPU + 20 ms asleep: only the CPU part is stretched).

    python bench/netem_timing.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from dapdee.netem import ShapedUplink, emulate_slowdown, parse_network


@dataclass(frozen=True)
class Timed:
    """One run: seconds taken (time.monotonic, the shaper's clock), the target, bytes moved."""

    elapsed_s: float
    target_s: float
    nbytes: int = 0


async def _drain(shaper: ShapedUplink, body: bytes, delay: bool = True) -> None:
    async for _ in shaper.shaped_body(body, chunk=1024, delay=delay):
        pass


def paced(net: str, nbytes: int) -> Timed:
    shaper = ShapedUplink(parse_network(net).rate_mbps, burst_bytes=0)
    t0 = time.monotonic()
    asyncio.run(_drain(shaper, b"\0" * nbytes))
    return Timed(time.monotonic() - t0, shaper.transfer_ms(nbytes) / 1000, shaper.bytes_sent)


def loopback(rate: float = 2.0, rtt_ms: float = 50.0, nbytes: int = 60_000, burst: int = 512) -> Timed:
    """`nbytes` paced through a shaper into a loopback TCP server; `nbytes` of the result is what
    the server received."""
    shaper = ShapedUplink(rate, rtt_ms=rtt_ms, burst_bytes=burst)
    got = 0

    async def run() -> float:
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal got
            while chunk := await reader.read(65536):
                got += len(chunk)
            done.set()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        t0 = time.monotonic()
        async for part in shaper.shaped_body(b"\1" * nbytes, chunk=1460):
            writer.write(part)
            await writer.drain()
        writer.close()
        await done.wait()
        server.close()
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    return Timed(elapsed, shaper.transfer_ms(nbytes) / 1000, got)


def shared(rate: float = 4.0) -> Timed:
    """Two senders of 50 kB on one shaper; `nbytes`: the bytes the shaper booked."""
    shaper = ShapedUplink(rate, burst_bytes=0)

    async def run() -> float:
        t0 = time.monotonic()
        await asyncio.gather(_drain(shaper, b"\0" * 50_000, False), _drain(shaper, b"\0" * 50_000, False))
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    return Timed(elapsed, 100_000 * 8 / (rate * 1e6), shaper.bytes_sent)


def rate_change() -> Timed:
    shaper = ShapedUplink(8.0, burst_bytes=0)
    shaper.set_rate(1.0)
    t0 = time.monotonic()
    asyncio.run(_drain(shaper, b"\0" * 12_500))
    return Timed(time.monotonic() - t0, 0.1, shaper.bytes_sent)


def slowdown_wall() -> Timed:
    def work() -> None:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.01:
            pass

    t0 = time.perf_counter()
    emulate_slowdown(work, 5)
    return Timed(time.perf_counter() - t0, 0.05)


def slowdown_cpu() -> Timed:
    spent: dict[str, float] = {}

    def work() -> None:
        w, t = time.perf_counter(), time.thread_time()
        while time.thread_time() - t < 0.01:
            pass
        time.sleep(0.02)
        spent["cpu"], spent["wall"] = time.thread_time() - t, time.perf_counter() - w

    t0 = time.perf_counter()
    emulate_slowdown(work, 5, clock=time.thread_time)
    return Timed(time.perf_counter() - t0, spent["wall"] + 4 * spent["cpu"])


CHECKS: dict[str, Callable[[], Timed]] = {
    "paced body, 3G, 40 kB": lambda: paced("3G", 40_000),
    "paced body, 4G, 200 kB": lambda: paced("4G", 200_000),
    "loopback TCP, 2 Mbit/s + 50 ms": loopback,
    "two senders, one 4 Mbit/s link": shared,
    "rate change 8 -> 1 Mbit/s": rate_change,
    "slowdown K=5, wall clock": slowdown_wall,
    "slowdown K=5, thread CPU clock": slowdown_cpu,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'check':34} {'target ms':>10} {'median ms':>10} {'worst ms':>10} {'ratio':>6}")
    for name, fn in CHECKS.items():
        runs = [fn() for _ in range(args.repeats)]
        target = runs[0].target_s * 1000
        got = [r.elapsed_s * 1000 for r in runs]
        med = statistics.median(got)
        print(f"{name:34} {target:10.1f} {med:10.1f} {max(got):10.1f} {med / target:6.2f}")


if __name__ == "__main__":
    main()
