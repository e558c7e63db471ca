"""Network and device emulation for experiments on one machine.

- `ShapedUplink`: a token-bucket shaper for the bytes a client really sends over loopback,
  plus an added round-trip delay per request. Tokens may go negative, so concurrent senders
  sharing one shaper are serialised at the link rate (a shared uplink), and a burst allowance
  of `burst_bytes` (default none: every byte leaves at the rate, as the cost model prices a
  transfer) may leave at once after an idle period.
- `NETWORKS`: the uplink rates of DADS Table I (Mbit/s); `parse_network("3G" | "4.5")`.
- `emulate_slowdown(fn, k, clock)`: run `fn`, then sleep (k - 1) x its measured duration (wall
  time, or the thread's CPU time), so a device is emulated K x slower than this machine.

Pure Python (asyncio + time): no web imports.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from dapdee.costmodel import uplink_ms
from dapdee.planning.request import MAX_BANDWIDTH_MBPS, MIN_BANDWIDTH_MBPS

T = TypeVar("T")

# Uplink Mbit/s per named network (DADS, Table I).
NETWORKS: dict[str, float] = {"CAT1": 0.13, "3G": 1.1, "4G": 5.85, "WiFi": 18.88}
MIN_CHUNK = 1024
CHUNK_S = 0.005  # a shaped body leaves in chunks of about this much link time (at least MIN_CHUNK bytes)
CONTINUE_SLACK_S = 0.02  # a sender's late wake-up, within a busy period of the link, not counted as idle


@dataclass(frozen=True)
class Network:
    """A named or numeric uplink: `name` for tables, `rate_mbps` for the shaper."""

    name: str
    rate_mbps: float

    def __str__(self) -> str:
        rate = f"{self.rate_mbps:g} Mbit/s"
        return f"{self.name} ({rate})" if self.name in NETWORKS else rate


def parse_network(text: str | float) -> Network:
    """`CAT1`, `3G`, `4G`, `WiFi` (any case) or a number of Mbit/s (`4.5`). O(1).
    Raises ValueError naming the accepted values."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        rate = float(text)
        name = f"{rate:g}Mbps"
    else:
        s = str(text).strip()
        for key, rate in NETWORKS.items():
            if s.lower() == key.lower():
                return Network(key, rate)
        s_num = s.lower().removesuffix("mbps").removesuffix("mbit/s").strip()
        try:
            rate = float(s_num)
        except ValueError:
            raise ValueError(
                f"network {text!r}: expected one of {', '.join(NETWORKS)} or an uplink rate in Mbit/s (e.g. 4.5)"
            ) from None
        name = f"{rate:g}Mbps"
    # an emulated uplink is one a planning request may state, so it can be planned for (a slower
    # one would hold a frame for hours)
    low, high = MIN_BANDWIDTH_MBPS, MAX_BANDWIDTH_MBPS
    if not low <= rate <= high:  # nan fails too
        raise ValueError(f"network {text!r}: the uplink rate must be in [{low:g}, {high:g}] Mbit/s")
    return Network(name, rate)


class ShapedUplink:
    """Token bucket at `rate_mbps` with `burst_bytes` of burst, plus `rtt_ms` of added delay
    per request (the loopback round trip is ~0, so the whole emulated RTT is added once, before
    the request's first byte). `pace(n)` returns when `n` more bytes may leave; O(1) per call.

    The bucket starts full; tokens are refilled at the rate up to `burst_bytes` and may go
    negative, so callers sharing one shaper wait in turn (the link is serialised)."""

    def __init__(self, rate_mbps: float, rtt_ms: float = 0.0, burst_bytes: int = 0) -> None:
        self.set_rate(rate_mbps)
        if not math.isfinite(rtt_ms) or rtt_ms < 0:
            raise ValueError(f"rtt_ms: must be a finite number >= 0, got {rtt_ms!r}")
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes: must be >= 0, got {burst_bytes!r}")
        self.rtt_ms = float(rtt_ms)
        self.burst_bytes = int(burst_bytes)
        self._free_at = time.monotonic() - self.burst_bytes / self.rate_bytes_per_s  # bucket starts full
        self.bytes_sent = 0

    @property
    def rate_bytes_per_s(self) -> float:
        return self.rate_mbps * 1e6 / 8.0

    def set_rate(self, rate_mbps: float) -> None:
        """Change the shaped rate (takes effect for the bytes paced from now on)."""
        ok = isinstance(rate_mbps, (int, float)) and not isinstance(rate_mbps, bool)
        if not ok or not math.isfinite(rate_mbps) or rate_mbps <= 0:
            raise ValueError(f"rate_mbps: must be a finite number > 0, got {rate_mbps!r}")
        if hasattr(self, "_free_at"):
            now = time.monotonic()
            # bytes already booked but not yet due are re-timed at the new rate
            backlog = max(0.0, self._free_at - now) * self.rate_bytes_per_s
            self.rate_mbps = float(rate_mbps)
            self._free_at = now + backlog / self.rate_bytes_per_s if backlog else self._free_at
        else:
            self.rate_mbps = float(rate_mbps)

    def reserve(self, nbytes: int, continuing: bool = False) -> float:
        """Take `nbytes` tokens now; seconds to wait before they may leave (0 within the burst).

        Implemented as the equivalent virtual clock (GCRA): the link is booked until `_free_at`;
        an idle link grants at most `burst_bytes` of credit. `continuing` marks the next part of
        a body whose sender was waiting on this shaper: its late wake-up (scheduler noise, up
        to CONTINUE_SLACK_S) is not counted as idle time, so a stream keeps the exact rate."""
        now = time.monotonic()
        rate = self.rate_bytes_per_s
        credit = self.burst_bytes / rate
        if continuing:
            credit = max(credit, CONTINUE_SLACK_S)
        start = max(self._free_at, now - credit)
        self._free_at = start + nbytes / rate
        self.bytes_sent += nbytes
        return max(0.0, self._free_at - now)

    async def pace(self, nbytes: int, continuing: bool = False) -> None:
        """Wait until `nbytes` more bytes may leave at the shaped rate."""
        wait = self.reserve(nbytes, continuing)
        if wait > 0:
            await asyncio.sleep(wait)

    def pace_sync(self, nbytes: int) -> None:
        """`pace` for threads."""
        wait = self.reserve(nbytes)
        if wait > 0:
            time.sleep(wait)

    async def delay(self) -> None:
        """The added round trip of one request."""
        if self.rtt_ms > 0:
            await asyncio.sleep(self.rtt_ms / 1000.0)

    def chunk_bytes(self) -> int:
        """The default chunk of `shaped_body`: CHUNK_S of link time, at least MIN_CHUNK bytes. A
        chunk leaves when its last byte would have, so the chunk size changes when the body's
        bytes are handed on, never when the body is done; larger chunks only save the sender the
        CPU of waking up per kilobyte (dozens of emulated devices share one process)."""
        return max(MIN_CHUNK, int(self.rate_bytes_per_s * CHUNK_S))

    async def shaped_body(
        self, body: bytes, chunk: int | None = None, delay: bool = True, queued: bool = False
    ) -> AsyncIterator[bytes]:
        """Yield `body` in chunks (`chunk` bytes; default `chunk_bytes()`), each released at the
        shaped rate (after the RTT delay when `delay`). `queued`: the body waited for the link
        behind another one, so its first chunk, like every later one, continues the link's busy
        period (`reserve`'s `continuing`): a link with a queue does not idle between bodies
        while the sender hands the next one on. Use as an httpx request's `content` (with an
        explicit Content-Length)."""
        chunk = self.chunk_bytes() if chunk is None else chunk
        if chunk <= 0:
            raise ValueError("chunk: must be > 0")
        if delay:
            await self.delay()
        view = memoryview(body)
        for i in range(0, len(view), chunk):
            part = view[i : i + chunk]
            await self.pace(len(part), continuing=queued or i > 0)
            yield bytes(part)

    def transfer_ms(self, nbytes: int) -> float:
        """What the cost model predicts for `nbytes` on this link: uplink time + RTT."""
        return uplink_ms(nbytes, self.rate_mbps) + self.rtt_ms

    def describe(self) -> str:
        return f"uplink {self.rate_mbps:g} Mbit/s, rtt {self.rtt_ms:g} ms"


def emulate_slowdown(fn: Callable[[], T], k: float, clock: Callable[[], float] = time.perf_counter) -> T:
    """Run `fn()`, then sleep (k - 1) x its duration on `clock`: the caller sees a device K x
    slower than this machine (the sleep leaves the CPU free, as a slower chip would not load
    this one). With `clock=time.thread_time` (single-threaded compute), only the CPU time `fn`
    used is stretched; time it spent waiting for the CPU (other threads, other processes on this
    host) is added once, so a co-located edge worker's work is not counted K times as if it
    were the device's. Blocking: call it from a worker thread in async code."""
    if not k >= 1.0:
        raise ValueError(f"slowdown: must be >= 1, got {k!r}")
    t0 = clock()
    out = fn()
    if k > 1.0:
        time.sleep((k - 1.0) * max(0.0, clock() - t0))
    return out
