"""Compute backends: how the device computes its part of a plan. The runtime is the same for
both; the backend is a constructor argument.

- `TorchCompute`: real compute with the split executor (`dapdee.executor`) on one worker
  thread, stretched K x by `dapdee.netem.emulate_slowdown` (a device K x slower than this
  machine); `progressive` runs the device side of a plan with confidence exits
  (`dapdee.progressive_run.run_part`), stopping at the first confident head.
- `EmulatedCompute`: no compute at all. It sleeps the profiled device time of the nodes it
  would run (x `scale`) and answers with real tensors of the right shapes, computed once per
  value from one real input (`BoundaryValues`, shared by any number of emulated devices). Many
  devices then fit in one process without using the CPU, for fleet benchmarks. Its values are
  not the frame's, so it checks no confidence heads: every frame goes on as if none answered.

Neither changes process-wide settings (torch threads are the command line's business).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dapdee.costgraph import CostGraph
from dapdee.models import LoadedModel
from dapdee.netem import emulate_slowdown
from dapdee.progressive_run import PartResult, SidePart, run_part


@dataclass(frozen=True)
class Computed:
    """The values of the requested targets and the wall time (ms) the device took for them."""

    values: dict[str, Any]
    ms: float


@dataclass(frozen=True)
class Progressed:
    """A progressive run of the device side (`run_part`'s result) and the wall time (ms) it took."""

    result: PartResult
    ms: float


class ComputeBackend(Protocol):
    """What the runtime needs of a backend."""

    async def run(
        self, given: Mapping[str, Any], targets: Sequence[str], allowed: Collection[str] | None = None
    ) -> Computed:
        """The values of `targets` from the values in `given`; with `allowed`, ValueError when
        a node outside it would have to run."""
        ...

    async def progressive(
        self, given: Mapping[str, Any], part: SidePart, targets: Sequence[str], allowed: Collection[str] | None = None
    ) -> Progressed:
        """The device side `part` of a plan with confidence exits (`run_part`): a confident head
        answers the frame, else the values of `targets`."""
        ...

    def close(self) -> None: ...


def emulation_clock() -> Callable[[], float]:
    """The clock the K x emulation stretches: the compute thread's CPU time when torch computes
    on that one thread (waits for the CPU, e.g. for a co-located edge worker or the event loop,
    are then added once instead of K times), else wall time. O(1)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


class TorchCompute:
    """The device part run for real: `executor.compute` under `torch.inference_mode` on one
    worker thread, then a sleep of (K − 1) x its duration. `observer` (a compute-load monitor)
    sees each run's CPU and wall time. Cost: the nodes' own work, K x in wall time."""

    def __init__(
        self, loaded: LoadedModel, slowdown: float = 1.0, observer: Any = None, name: str = "device-compute"
    ) -> None:
        if not slowdown >= 1.0:
            raise ValueError(f"slowdown: must be >= 1 (a device K x slower than this machine), got {slowdown!r}")
        self.loaded = loaded
        self.slowdown = float(slowdown)
        self.observer = observer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def _blocking(self, given: Mapping[str, Any], targets: Sequence[str], allowed: Collection[str] | None) -> Computed:
        ex = self.loaded.executor
        return Computed(*self._timed(lambda: ex.compute(given, targets, allowed=allowed)))

    def _timed(self, work: Callable[[], Any]) -> tuple[Any, float]:
        """(`work()` under inference mode, stretched K x; its wall time in ms), seen by the observer."""

        def fn() -> Any:
            c0, w0 = time.thread_time(), time.perf_counter()
            with torch.inference_mode():
                out = work()
            if self.observer is not None:
                self.observer.observe(time.thread_time() - c0, time.perf_counter() - w0)
            return out

        t0 = time.perf_counter()
        out = emulate_slowdown(fn, self.slowdown, emulation_clock())
        return out, (time.perf_counter() - t0) * 1000.0

    async def run(
        self, given: Mapping[str, Any], targets: Sequence[str], allowed: Collection[str] | None = None
    ) -> Computed:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._blocking, dict(given), list(targets), allowed)

    async def progressive(
        self, given: Mapping[str, Any], part: SidePart, targets: Sequence[str], allowed: Collection[str] | None = None
    ) -> Progressed:
        ex, given, targets = self.loaded.executor, dict(given), list(targets)

        def blocking() -> Progressed:
            return Progressed(*self._timed(lambda: run_part(ex, given, part, targets, allowed)))

        return await asyncio.get_running_loop().run_in_executor(self._pool, blocking)

    async def spin(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the compute thread (e.g. a load monitor's calibration)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class BoundaryValues:
    """Real values of a model's nodes for one real input `x` (default: a seeded random input),
    each computed once, on first request, with the split executor; thread-safe, shareable by
    any number of emulated devices. Memory: the values requested so far."""

    def __init__(self, loaded: LoadedModel, x: torch.Tensor | None = None) -> None:
        self.loaded = loaded
        self.x = x if x is not None else loaded.example_input(torch.Generator().manual_seed(0))
        self._values: dict[str, Any] = {loaded.input_name: self.x}
        self._lock = threading.Lock()

    def get(self, names: Sequence[str]) -> dict[str, Any]:
        """The values of `names` (computed once each, together, the first time). O(nodes
        needed) on a miss, O(len(names)) after."""
        with self._lock:
            missing = [n for n in names if n not in self._values]
            if missing:
                with torch.inference_mode():
                    got = self.loaded.executor.compute({self.loaded.input_name: self.x}, missing)
                self._values.update(got)
            return {n: self._values[n] for n in names}


def nodes_to_run(graph: CostGraph, given: Collection[str], targets: Sequence[str]) -> list[str]:
    """The nodes that must run to get `targets` from the values in `given`, in topological
    order. ValueError when the graph's input is needed but not given. O(V + E)."""
    have = set(given)
    need: set[str] = set()
    stack = [t for t in targets if t not in have]
    while stack:
        name = stack.pop()
        if name in need:
            continue
        if name == graph.input.name:
            raise ValueError(f"the values given do not determine {', '.join(targets)}: the input is missing")
        need.add(name)
        stack.extend(u for u in graph.node(name).inputs if u not in have and u not in need)
    return [n.name for n in graph.nodes if n.name in need]


class EmulatedCompute:
    """The device part emulated: sleeps `scale` x Σ device_ms of the nodes it would run (the
    profile's timings, so a profile measured at K already includes K) and returns the
    `BoundaryValues`' real tensors. Runs one at a time, as `TorchCompute`'s one compute thread
    does (a pipelined frame waits for the previous one's device part; the wait is not in `ms`).
    Uses no CPU beyond a timer. O(V + E) per call.

    **Its own clock.** The device is booked until `free_at` (monotonic s), the end of its last
    part, as `dapdee.netem.ShapedUplink` books its link. `run(..., released_at=t)`: the frame
    was in the device's hands at `t`, so the part begins at `t` or when the previous part ends,
    whichever is later (never after the call), and ends `ms` after that, however late the call
    came. A caller emulating many devices on one event loop passes it: the loop's delay in
    getting to a part is not the device's, and charged as device time it would push every later
    frame back. Without it a part begins when called."""

    def __init__(self, graph: CostGraph, values: BoundaryValues, scale: float = 1.0) -> None:
        if not graph.has_timings("device"):
            raise ValueError(f"emulated compute needs device timings; model {graph.model!r} has none")
        if not scale > 0:
            raise ValueError(f"scale: must be > 0, got {scale!r}")
        self.graph = graph
        self.values = values
        self.scale = float(scale)
        self._busy = asyncio.Lock()  # the device's one compute thread
        self.free_at = -math.inf

    def part_ms(self, given: Collection[str], targets: Sequence[str], allowed: Collection[str] | None = None) -> float:
        """The emulated ms of the part that computes `targets` from the values named in `given`:
        `scale` x Σ device_ms of the nodes it runs. ValueError as `nodes_to_run`, or when a node
        outside `allowed` would have to run. O(V + E)."""
        nodes = nodes_to_run(self.graph, given, targets)
        if allowed is not None:
            outside = [n for n in nodes if n not in allowed]
            if outside:
                raise ValueError(f"partition would need nodes outside it: {', '.join(outside[:5])}")
        return self.scale * sum(self.graph.node(n).device_ms or 0.0 for n in nodes)

    async def run(
        self,
        given: Mapping[str, Any],
        targets: Sequence[str],
        allowed: Collection[str] | None = None,
        *,
        released_at: float | None = None,
    ) -> Computed:
        return await self._emulated(self.part_ms(given.keys(), targets, allowed), targets, released_at)

    async def _emulated(self, ms: float, targets: Sequence[str], released_at: float | None) -> Computed:
        """Hold the device for `ms` (from `released_at` when the device was free then, else from
        when it frees) and hand back the boundary values of `targets`."""
        async with self._busy:
            now = time.monotonic()
            start = now if released_at is None else min(now, max(released_at, self.free_at))
            self.free_at = start + ms / 1000.0
            await asyncio.sleep(max(0.0, self.free_at - time.monotonic()))
            values = self.values.get([t for t in targets])
            return Computed(values, (time.monotonic() - start) * 1000.0)

    async def progressive(
        self,
        given: Mapping[str, Any],
        part: SidePart,
        targets: Sequence[str],
        allowed: Collection[str] | None = None,
        *,
        released_at: float | None = None,
    ) -> Progressed:
        """`run` of the targets, timed with the part's heads computed too: no head answers (the
        values are not the frame's), so each frame pays for every head, as the planner's worst
        case prices it."""
        heads = [h.node for h in part.heads]
        ms = self.part_ms(given.keys(), [*targets, *heads], allowed)
        done = await self._emulated(ms, targets, released_at)
        return Progressed(PartResult(1, (), torch.zeros(1, dtype=torch.long), done.values), done.ms)

    def close(self) -> None:
        return None
