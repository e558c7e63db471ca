"""Keeping the device's view of its link and load fresh.

- `LinkProber`: round-trip probes (`GET /v2/health/live`) and bandwidth probe pairs: two infer
  requests at the shallowest exit, back to back, a small one (the input alone) and a large one
  (the input plus a node tensor as filler, sized for about PROBE_MS of upload at the current
  estimate). Their size difference over their time difference is the uplink rate with the
  round trip and every fixed per-request cost cancelled (`BandwidthEstimator.observe_pair`).
  At start-up, with nothing else on the event loop, the device thread's CPU time (encode,
  send, decode) gives the device's per-request cost, `device_request_ms` of cost model v2:
  CPU = a + b · bytes fitted through each pair, a the cost of a request as such; the per-byte
  part (copying, and an emulated uplink's pacing) runs while the bytes are on the wire and is
  not a per-request constant. A request costs a busy thread less than an idle one (measured
  here: 1.2-1.4 ms with eight in flight against 2.2-3 ms alone, a 1 KB input over an emulated
  4G or WiFi link: warm caches, one loop wake-up serving several requests). Where the device
  stage is mostly this cost (little or no device compute, a fast stream), the stage runs at
  the busy figure, and the idle one would price it up to twice too slow; where the stage is
  mostly compute, the thread sending the request idles between frames and pays the idle
  figure, about 1 ms more, a few percent of such a stage. So a short burst of small
  requests kept in flight measures it too, and the lower figure is used
  (`busy_request_cost_ms`). Light-load latency does not move with it: the fixed cost the
  device states with its round trip is the pairs' measured wall time less this figure. After
  a failed probe (a link too slow for the pair to finish in time), the next is the input
  alone, a lone upload with a longer timeout.
- `Sensor`: the background duty, one `tick` at a time: load readings, and probes when the
  link has been idle long enough (or a big change is suspected). A tick never waits for
  either: probes and compute-load calibrations run as tasks of their own.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from dapdee.costgraph import CostGraph
from dapdee.costmodel import uplink_ms
from dapdee.device.config import RuntimeConfig
from dapdee.device.edge import EdgeLink
from dapdee.device.sensing import ComputeLoadMonitor, LoadMonitor, Sensing
from dapdee.device.types import EdgeAnswer, EdgeFailure
from dapdee.web.tasks import all_or_stop, stop_task

log = logging.getLogger("dapdee.device.probe")

PROBE_MS = 100.0  # a probe's size aims at this much upload time (fixed costs then weigh little)
MAX_FILLER_BYTES = 262144
PROBE_TIMEOUT_S = 5.0
PROBE_TIMEOUT_MAX_S = 60.0  # a lone probe after failures waits at most this (a very slow link)
MAX_CPU_PAIRS = 32
BUSY_DEPTH = 8  # requests kept in flight while a busy thread's per-request CPU is measured
BUSY_REQUESTS = 32  # requests measured (after BUSY_DEPTH unmeasured ones, which warm the path up)
BUSY_BUDGET_S = 1.0  # the whole burst's time (none when the link could not carry it in this)


def _zeros(shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    return torch.zeros(shape, dtype=getattr(torch, dtype, torch.float32))


def _upload_ms(answer: EdgeAnswer) -> float | None:
    """The answer's time less the worker's queue and compute time (what the request spent on
    the link and in fixed costs); None when the worker's time is not within 0..elapsed (as for
    a lone upload, `BandwidthEstimator.upload_finished`: such a pair gives no sample)."""
    server_ms = answer.queue_ms + answer.compute_ms
    if not 0.0 <= server_ms <= answer.elapsed_ms:
        return None
    return answer.elapsed_ms - server_ms


class LinkProber:
    """Probes of one device's link to a worker (see the module docstring); `timeout_s` bounds
    each probe request (until probes fail: `probe`)."""

    def __init__(self, edge: EdgeLink, graph: CostGraph, sensing: Sensing, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.edge = edge
        self.graph = graph
        self.sensing = sensing
        self.timeout_s = timeout_s  # a probe request's timeout (a lone probe after failures: longer)
        self.failures = 0  # failed probes in a row
        # the last probe pairs' (small bytes, CPU ms, large bytes, CPU ms)
        self.cpu_pairs: deque[tuple[int, float, int, float]] = deque(maxlen=MAX_CPU_PAIRS)

    async def measure_rtt(self, url: str, n: int = 3) -> float:
        """`n` round trips folded into the RTT estimate; returns the estimate (ms)."""
        for _ in range(n):
            ms = await self.edge.round_trip_ms(url)
            if ms is None:
                break
            self.sensing.rtt.observe(ms)
        return self.sensing.rtt.estimate_ms

    def filler(self, target_bytes: int) -> tuple[str, tuple[int, ...]] | None:
        """The node whose tensor is the largest at most `target_bytes` (float, batch 1)."""
        best: tuple[str, tuple[int, ...], int] | None = None
        for n in self.graph.nodes:
            if not n.shape or n.shape[0] != 1 or n.out_bytes > target_bytes:
                continue
            if best is None or n.out_bytes > best[2]:
                best = (n.name, tuple(n.shape), n.out_bytes)
        return (best[0], best[1]) if best else None

    async def _send(self, url: str, inputs: dict[str, torch.Tensor]) -> EdgeAnswer:
        return await self.edge.infer(url, inputs, self.graph.exits[0].name, self.timeout_s, observe=False)

    async def probe(self, url: str) -> float | None:
        """One probe; the rate sample (Mbit/s) folded into the estimate, or None (a probe
        failed, overlapped another upload, or its worker stated a queue + compute time outside
        0..its elapsed time). Normally a pair whose filler aims at PROBE_MS of upload at the
        lower of the estimate and the last sample; after a failed probe, the smallest probe
        there is, the input alone, timed as a lone upload, with `timeout_s` doubled per failure
        in a row and at least 3x the input's upload at the estimate (at most PROBE_TIMEOUT_MAX_S):
        a link too slow for the pair is still measured. A timed-out probe, alone on the link,
        still bounds the estimate (`EdgeLink.infer`). An answer with `Retry-After` (a busy
        worker) is no sign of a slow link: the worker rests (`EdgeLink.backoff_of`), so neither
        probes (`Sensor`) nor frames go to it before then."""
        inp = self.graph.input
        x = {inp.name: _zeros(tuple(inp.shape), inp.dtype)}
        bw = self.sensing.bandwidth
        # sized from the lower of the estimate and the last sample: after a sudden drop the
        # estimate still trails far above the link, and a probe sized from it would not finish
        rate = min(bw.estimate_mbps, bw.last_sample_mbps or bw.estimate_mbps)
        floor = int(2.5 * inp.bytes)
        target = int(min(max(rate * 1000 / 8 * PROBE_MS, floor), MAX_FILLER_BYTES))
        node = self.filler(target)
        try:
            if node is None or self.failures:
                sample = await self._lone(url, x, rate)
            else:
                sample = await self._pair(url, x, node)
        except EdgeFailure as exc:
            if not exc.worker_fault:  # not listed by the planner: never contacted, no sign of the link
                return None
            if exc.retry_after_s is None:
                self.failures += 1
            else:  # a busy worker, not a slow link: it is left alone (probes and frames) that long
                backoff = self.edge.backoff_of(url)
                backoff.failed(backoff.rests, exc.retry_after_s)
            return None
        self.failures = 0
        return sample

    async def _lone(self, url: str, x: dict[str, torch.Tensor], rate_mbps: float) -> float | None:
        """The input alone as a lone upload (`observe`): its sample, or None."""
        upload_s = uplink_ms(self.graph.input.bytes, rate_mbps) / 1000.0
        timeout = min(PROBE_TIMEOUT_MAX_S, max(self.timeout_s * 2.0**self.failures, 3.0 * upload_s))
        answer = await self.edge.infer(url, x, self.graph.exits[0].name, timeout)
        return answer.sample_mbps

    async def _pair(self, url: str, x: dict[str, torch.Tensor], node: tuple[str, tuple[int, ...]]) -> float | None:
        """A small and a large upload back to back: their rate sample, or None."""
        small = await self._send(url, x)
        large = await self._send(url, {**x, node[0]: torch.zeros(node[1])})
        small_ms, large_ms = _upload_ms(small), _upload_ms(large)
        if small.overlapped or large.overlapped or small_ms is None or large_ms is None:
            return None
        self.cpu_pairs.append((small.request_bytes, small.cpu_ms, large.request_bytes, large.cpu_ms))
        return self.sensing.observe_pair((small.request_bytes, small_ms), (large.request_bytes, large_ms))

    def _fits(self) -> list[tuple[float, float]]:
        """Per probe pair since start-up, (a, b) of CPU = a + b · bytes through it: b >= 0,
        0 <= a <= the small request's CPU. O(pairs)."""
        fits = []
        for small_b, small_ms, large_b, large_ms in self.cpu_pairs:
            per_byte = max(0.0, (large_ms - small_ms) / (large_b - small_b)) if large_b > small_b else 0.0
            fits.append((min(small_ms, max(0.0, small_ms - per_byte * small_b)), per_byte))
        return fits

    def request_cost_ms(self) -> float | None:
        """The device's per-request CPU cost from the probe pairs since start-up: the median of
        their intercepts a (`_fits`); None without a pair."""
        fits = self._fits()
        return statistics.median(a for a, _ in fits) if fits else None

    async def busy_request_cost_ms(
        self, url: str, count: int = BUSY_REQUESTS, depth: int = BUSY_DEPTH, budget_s: float = BUSY_BUDGET_S
    ) -> float | None:
        """The device's CPU per request while its thread is kept busy, as in a fast stream whose
        device stage is mostly this cost: `depth` unmeasured requests (they open the connections
        and warm the code path), then up to `count` small ones (the input alone, at the
        shallowest exit) kept `depth` in flight, all within `budget_s`; the event-loop thread's
        CPU time over the measured ones divided by their number, less their per-byte part (the
        pairs' median b · bytes), at least 0. None when fewer than `depth` were measured or one
        failed, and without a request when the uplink estimate could not carry them all within
        `budget_s` (a link that slow never keeps the thread busy). Run it while nothing else
        uses the event loop. At most `count + depth` requests."""
        inp = self.graph.input
        if uplink_ms((count + depth) * inp.bytes, self.sensing.bandwidth_mbps) / 1000.0 > budget_s:
            return None
        x = {inp.name: _zeros(tuple(inp.shape), inp.dtype)}
        deadline = time.monotonic() + budget_s
        try:
            await all_or_stop(self._send(url, x) for _ in range(depth))
            c0 = time.thread_time()
            started = 0
            sizes: list[int] = []  # request bytes of the measured requests

            async def keep_sending() -> None:
                nonlocal started
                while started < count and time.monotonic() < deadline:
                    started += 1
                    sizes.append((await self._send(url, x)).request_bytes)

            await all_or_stop(keep_sending() for _ in range(depth))
            cpu_ms = (time.thread_time() - c0) * 1000.0
        except EdgeFailure as exc:
            log.info("busy request cost: a request failed (%s); the probe pairs' figure stands", exc)
            return None
        if len(sizes) < depth:
            return None
        fits = self._fits()
        per_byte = statistics.median(b for _, b in fits) if fits else 0.0
        return max(0.0, (cpu_ms - per_byte * sum(sizes)) / len(sizes))

    async def startup(self, url: str, rounds: int = 3, burst: int = BUSY_REQUESTS) -> float | None:
        """Round trips, then `rounds` probe pairs (the first sized from the prior), then a burst
        of `burst` small requests (`busy_request_cost_ms`; 0: none); returns the device's
        per-request CPU cost, the lower of the pairs' (`request_cost_ms`) and the burst's (on a
        link too slow to keep the thread busy the burst is no busier than the pairs and pays
        the pacing's wake-ups), or None when neither gave one, and keeps it as
        `sensing.request_cpu_ms` (it is priced apart from the round trip). Run it while
        nothing else uses the event loop."""
        self.cpu_pairs.clear()
        await self.measure_rtt(url)
        for _ in range(rounds):
            await self.probe(url)
        costs = [self.request_cost_ms(), await self.busy_request_cost_ms(url, burst) if burst > 0 else None]
        cost = min((c for c in costs if c is not None), default=None)
        if cost is not None:
            self.sensing.request_cpu_ms = cost
        return cost


class Sensor:
    """The background sensing of a runtime: each `tick` takes a load reading when due and,
    when the link is idle (no upload for `probe_idle_s`, or a big change suspected), measures
    the round trip (every `rtt_probe_every_s`) and probes the bandwidth once the last sample is
    stale. Probes run in a task of their own (a slow link's probe never holds up re-planning)
    and use at most ~20 % of an idle link. `target()` names the worker to probe (None: none).
    `spin(fn)` runs `fn` on the compute thread (a compute-load calibration); it too runs in a
    task of its own, at most one at a time: queued on that one thread behind a frame being
    computed, it would otherwise hold up every tick (and the lease renewals after it) until
    the frame is done."""

    def __init__(
        self,
        prober: LinkProber | None,
        sensing: Sensing,
        config: RuntimeConfig,
        target: Callable[[], str | None],
        spin: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    ) -> None:
        self.prober = prober
        self.sensing = sensing
        self.config = config
        self.target = target
        self.spin = spin
        self.last_load = 0.0
        self.last_rtt = time.monotonic()
        self.next_probe = 0.0
        self.probed_at = float("-inf")  # when the last bandwidth probe ended
        self._probing: asyncio.Task[None] | None = None
        self._calibrating: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        """Take a load reading when due and start a probe when due; waits for neither (each
        runs in a task of its own). O(1)."""
        self._load()
        if self.prober is not None and (self._probing is None or self._probing.done()):
            url = self._due()
            if url is not None:
                self._probing = asyncio.create_task(self._probe(url))

    async def aclose(self) -> None:
        """Stop a probe or a calibration in flight (a calibration already running on the
        compute thread finishes there; its reading is dropped)."""
        for task in (self._probing, self._calibrating):
            if task is not None:
                await stop_task(task)

    def _load(self) -> None:
        """Take a load reading when due: a `proc` sample every 0.5 s, or, for `compute`, a
        calibration started on the compute thread after 1 s without a computed frame (not
        awaited: it queues behind whatever that thread is computing). O(1)."""
        now = time.monotonic()
        mon = self.sensing.monitor
        if isinstance(mon, LoadMonitor) and now - self.last_load >= 0.5:
            mon.sample()
            self.last_load = now
        elif isinstance(mon, ComputeLoadMonitor) and self.spin is not None:
            edge_idle = self.prober is None or self.prober.edge.uploads_active == 0  # an in-process edge is load
            idle = min(now - mon.last_sample_at, now - self.last_load) > 1.0
            if idle and edge_idle and (self._calibrating is None or self._calibrating.done()):
                self.last_load = now  # the device computed nothing for a while: take a reading
                self._calibrating = asyncio.create_task(self._calibrate(self.spin, mon))

    async def _calibrate(self, spin: Callable[[Callable[[], Any]], Awaitable[Any]], mon: ComputeLoadMonitor) -> None:
        """One calibration of `mon` on the compute thread (`spin`); a failure is logged."""
        try:
            await spin(mon.calibrate)
        except Exception as exc:  # a calibration must never stop the sensing; logged, tried again later
            log.warning("compute-load calibration: %s: %s", type(exc).__name__, exc)

    def _due(self) -> str | None:
        """The worker to probe now (None: the link is busy, resting, or no worker is known). A
        big change suspected since the last probe ended is probed after 0.2 s of quiet, at once;
        one a probe has met already (it failed, or it saw the change and did not settle it) is
        probed again as an idle link is: after `probe_idle_s` of quiet, at most ~20 % of it."""
        assert self.prober is not None
        edge, bw = self.prober.edge, self.sensing.bandwidth
        now = time.monotonic()
        quiet = now - edge.last_activity > self.config.probe_idle_s
        fresh = bw.suspect_change and bw.suspect_at > self.probed_at
        if fresh and now - edge.last_activity > 0.2:
            quiet, self.next_probe = True, min(self.next_probe, now)  # no frames confirm a big change
        url = self.target()
        if not quiet or edge.uploads_active or url is None or edge.resting(url, now):
            return None
        return url

    async def _probe(self, url: str) -> None:
        try:
            await self._measure(url)
        except Exception as exc:  # a probe must never stop the sensing; logged, tried again later
            log.warning("link probe of %s: %s: %s", url, type(exc).__name__, exc)

    async def _measure(self, url: str) -> None:
        assert self.prober is not None
        edge, bw = self.prober.edge, self.sensing.bandwidth
        now = time.monotonic()
        if now - self.last_rtt > self.config.rtt_probe_every_s or self.sensing.rtt.samples == 0:
            await self.prober.measure_rtt(url, 1)
            self.last_rtt = time.monotonic()
        stale = bw.age_s() > self.config.probe_idle_s or bw.suspect_change
        if stale and now >= self.next_probe:
            t0 = time.monotonic()
            await self.prober.probe(url)
            edge.last_activity = self.probed_at = time.monotonic()
            self.next_probe = edge.last_activity + 4 * (edge.last_activity - t0)
