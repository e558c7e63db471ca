"""This replica's view of the leases, which the fleet plans against and Redis then verifies.

Per worker what each device reserves there (so what the *other* devices reserve is O(1) per
request), the lease count, and per device its lease record with its tag as this replica last
wrote or read it. Re-read from Redis at start and every `refresh_s` (which also sets the fleet
gauges), updated after each reservation and each rebalance applied here, and replaced worker by worker with Redis's own
figures when a reservation finds the view out of date (`dapdee.planner.fleet`). With Redis away
it stays as last seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.leases import (
    Application,
    Figures,
    LeaseBook,
    ReservationView,
    View,
    on_worker,
    record_tag,
    record_text,
)
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.workers import Worker
from dapdee.web.tasks import run_every, stop_task

log = logging.getLogger("dapdee.planner")

LiveWorkers = Callable[[], Awaitable[list[Worker]]]


class LeaseView:
    """The view of one planner replica (module docstring), read through `book`. `start()` /
    `close()` with the fleet's; `live_workers` (the registry's `live`) names the workers whose gauges a
    refresh sets."""

    def __init__(
        self,
        book: LeaseBook,
        metrics: PlannerMetrics,
        live_workers: LiveWorkers,
        refresh_s: float,
        max_leases: int,
    ) -> None:
        self.book = book
        self.metrics = metrics
        self.live_workers = live_workers
        self.refresh_s = refresh_s
        self.max_leases = max_leases
        self.reserved = ReservationView()  # as last seen
        # device -> (the tag of its lease record, the record), as last written or read here
        self.held: dict[str, tuple[str, dict[str, Any]]] = {}
        self.lease_count = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Read the reservations once and start the refresh loop."""
        with contextlib.suppress(RedisUnavailable):
            await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="dapdee-fleet")

    async def close(self) -> None:
        """Stop the refresh loop."""
        self._stop.set()
        if self._task is not None:
            await stop_task(self._task)
        self._task = None

    async def refresh(self) -> None:
        """Re-read every worker's reservations and the lease count, and set the fleet gauges
        (from the last view when Redis is away; RedisUnavailable then passes up). Three round trips."""
        try:
            await self._read_loads()
            self.lease_count = await self.book.count()
        finally:
            workers = await self.live_workers()
            leased = {w.url: (w.capacity_ms_per_s, *self.leased(w.url)) for w in workers}
            self.metrics.set_fleet(self.lease_count, leased)

    async def _read_loads(self) -> None:
        """Take Redis's reservations as the view, with the reservations this replica made while
        they were read made again on top (the answer may have been read before them)."""
        mark = self.reserved.read_started()
        try:
            self.reserved.replace(await self.book.loads(), every=True, mark=mark)
        finally:
            self.reserved.read_ended(mark)

    async def _loop(self) -> None:
        """`refresh` every `refresh_s` until `close` (Redis away: quietly, the view as last seen)."""
        quiet = (RedisUnavailable,)
        await run_every(self.refresh_s, self._stop, self.refresh, "fleet refresh", log, quiet)

    # ---- reading ----------------------------------------------------------------------------------
    def others(self, worker: str, device_id: str | None) -> float:
        """What the other devices reserve on `worker` (ms/s). O(1)."""
        return self.reserved.others(worker, device_id)

    def leased(self, worker: str) -> tuple[float, int]:
        """(Σ f_j·e_j, lease count) on `worker`. O(1)."""
        return self.reserved.leased(worker)

    def others_on(self, urls: Iterable[str], device_id: str | None, fresh: dict[str, float]) -> dict[str, float]:
        """Per worker URL of `urls`, what the devices other than `device_id` reserve there: the
        figure in `fresh` where it names the worker, else this view's. O(urls)."""
        return {url: fresh[url] if url in fresh else self.others(url, device_id) for url in urls}

    def as_seen(self, device_id: str, urls: Iterable[str]) -> tuple[View, dict[str, Any] | None]:
        """What the device is planned against, for the reservation to verify: the `View` (its
        record's tag, what the others reserve on each of `urls`) and its lease record (None: none
        seen here). O(urls)."""
        tag, record = self.held.get(device_id, ("", None))
        return View(tag, self.others_on(urls, device_id, {})), record

    # ---- updates ----------------------------------------------------------------------------------
    def adopt(self, figures: Figures, device_id: str) -> dict[str, float]:
        """Take Redis's figures as this view of those workers; per worker, what the devices other
        than `device_id` reserve there. O(reservations on those workers)."""
        self.reserved.replace(figures.loads)
        return {url: self.reserved.others(url, device_id) for url in figures.loads}

    def note(self, device_id: str, worker: str | None, load: float) -> None:
        """Update the view after this replica's own reservation (the device left any other
        worker): its lease is on `worker` (None: none) whatever its load, as Redis holds it
        (`LeaseBook.reserve`: the record names that worker). O(workers)."""
        self.reserved.set(device_id, worker, load, held=worker is not None)

    def remember(self, device_id: str, record: dict[str, Any], tag: str) -> None:
        """Keep the device's lease record as stored (with its tag), so its next request plans
        from it without a read. Past `max_leases` records the one remembered longest ago goes
        (a lease that expired unseen, most likely; a live device renews its own every re-plan,
        so it stays). O(1)."""
        self.held.pop(device_id, None)  # to the end: the dict's order is the order remembered
        if len(self.held) >= self.max_leases:
            del self.held[next(iter(self.held))]
        self.held[device_id] = (tag, record)

    def applied(
        self, worker: str, assignments: dict[str, tuple[float, dict[str, Any], str]], outcome: Application
    ) -> None:
        """Update the view after this replica's rebalance tried `assignments` on `worker`
        (`LeaseBook.apply`): when `outcome` says they were applied, each lease written (all but
        the devices the apply left as they were) as Redis now holds it, its load on `worker` or
        none, its record with the tag Redis's scripts compute, so the device's next request plans
        from its assigned record in one round trip instead of finding the view stale; otherwise
        nothing. O(assignments · record)."""
        if outcome.status != "applied":
            return
        left = set(outcome.left)
        for device, (load, record, _) in assignments.items():
            if device not in left:
                on = on_worker(worker, load, record)
                self.note(device, worker if on else None, load if on else 0.0)
                self.remember(device, record, record_tag(record_text(record)))

    def forget(self, device_id: str) -> None:
        """The device's lease ended here: it reserves nothing and has no record. O(workers)."""
        self.note(device_id, None, 0.0)
        self.held.pop(device_id, None)
