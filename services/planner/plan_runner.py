"""Answering one plan request without blocking the event loop.

A plan from an exact plan map is a scan of small Pareto fronts (microseconds): it runs inline.
A plan map that is not exact (an exit had too many partitions to enumerate, or its build ran out
of time) answers latency requests with a max-flow per consulted exit (milliseconds to seconds on
large graphs): such a plan runs in one of `threads` worker threads, at most `threads` at once,
and the request waits at most `budget_s` for it (waiting for a thread included); past that it is
refused with `PlanOverBudget` (HTTP 503 + Retry-After). A thread whose request gave up finishes
its min-cut and only then frees its slot, so abandoned work never piles up beyond `threads`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dapdee.planning import PlanMap, PlanRequest

T = TypeVar("T")


class PlanOverBudget(Exception):
    """A plan that needs min-cuts did not finish within the budget."""


class PlanRunner:
    """Runs `PlanMap.plan` inline when the map is exact, else in a bounded thread pool under a
    time budget. Create and `close()` it inside the app's lifespan (it owns threads)."""

    def __init__(self, threads: int, budget_s: float, on_offload: Callable[[], None] | None = None) -> None:
        """`on_offload()` is called as each plan goes to a thread (the planner counts it in a metric)."""
        self.threads = threads
        self.budget_s = budget_s
        self._on_offload = on_offload
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dapdee-plan")
        self._slots = asyncio.Semaphore(threads)
        self.refused = 0  # plans refused past the budget

    async def plan(self, pm: PlanMap, req: PlanRequest) -> dict[str, Any]:
        """The plan JSON for `req`; raises ValueError (bad request field) or PlanOverBudget. Inline
        O(front) when `pm.exact`, else one max-flow per consulted capped exit, off the loop."""
        return await self.run(pm.exact, pm.plan, req)

    async def run(self, exact: bool, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, a plan over plan maps that are all `exact` (a scan of small fronts: inline)
        or not (it may take min-cuts: `call`, off the loop under the budget)."""
        return fn(*args) if exact else await self.call(fn, *args)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread under the budget (for plans that may need min-cuts:
        capped maps, the DADS baseline, a fleet plan choice over a capped map); PlanOverBudget
        past it."""
        try:
            return await asyncio.wait_for(self._in_thread(fn, *args), self.budget_s)
        except asyncio.TimeoutError:
            self.refused += 1
            raise PlanOverBudget(
                f"the plan needs min-cuts that took longer than {self.budget_s:g} s (or {self.threads} such "
                "plans are in progress); retry later, or upload a smaller graph"
            ) from None

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        await self._slots.acquire()
        if self._on_offload is not None:
            self._on_offload()
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        fut.add_done_callback(self._done)
        return await asyncio.shield(fut)  # a timed-out request leaves the thread to finish

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self._slots.release()
        if not fut.cancelled():
            fut.exception()  # retrieved: an abandoned plan's error is not logged as unhandled

    def close(self) -> None:
        """Stop taking work; threads finish what they run (bounded by one plan each)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
