"""Rebalancing the shared edge: each worker's leases re-solved together.

`Rebalancer.rebalance` re-solves every worker's leases (`dapdee.fleet.rebalance.settle`, in a
thread) together with the live Device-Only leases of models the worker serves, and applies each
worker's assignment atomically: refused, and left for the next period, if leases changed
meanwhile; solved again at once (up to `CAPACITY_RETRIES` solves in all) if the worker's last
heartbeat states less capacity than the solve had. Leases the replica cannot price (their model
or profiles gone) keep what they book, and the others are solved within what is left. Devices
pick up their assigned plans at their next `POST /plan` (`Fleet.plan`). It runs on request
(`POST /fleet/rebalance`), every `rebalance_s` on one replica at a time (`redis_lock.RedisLock`), and for
a heartbeat whose capacity no longer holds the worker's leases within ρ_max (the worker measured
itself slower): `shed` re-solves that worker's leases for the new capacity and registers the
heartbeat with the new plans in one atomic step, so no moment shows the leases past ρ_max of the
capacity registered. It needs no lock (the step is checked in Redis): while it runs, the
refused capacity is pending there, so admissions book within it and no other rebalance of the
worker applies (solved for the capacity before, its apply would leave the re-solve's reads
stale). Its apply is partial: a device that re-planned while the leases were solved keeps the
plan it got (what it reserves counts with the others'), since devices re-plan every few seconds
and an all-or-nothing apply over a large fleet would rarely find every lease as it was read.
Only when that fails (the
leases still book past ρ_max of the new capacity, each of `CAPACITY_RETRIES` times) is the
heartbeat registered as it is, and a rebalance follows at once (`note_capacity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from dapdee.fleet.assign import edge_load_of, plan_of
from dapdee.fleet.rebalance import (
    Demand,
    Option,
    Solution,
    SolveOverBudget,
    SolveStopped,
    held_option,
    option_nodes,
    priced_load,
    resolved_objective,
    settle,
)
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.fleet import Fleet
from dapdee.planner.keys import Keys
from dapdee.planner.leases import Heartbeat, StoredRecord
from dapdee.planner.plan_choice import request_of, usable
from dapdee.planner.redis_lock import RedisLock
from dapdee.planner.workers import Worker
from dapdee.web.tasks import run_every, stop_task

log = logging.getLogger("dapdee.planner")

# solves of one worker's leases per rebalance when its capacity keeps falling meanwhile
CAPACITY_RETRIES = 3
# a rebalance after a capacity drop waits this long at most for a rebalance holding the lock
URGENT_WAIT_S = 30.0
LOCK_POLL_S = 0.2


class Rebalancer:
    """The rebalances of one planner replica over `fleet`'s leases (module docstring). `start()`
    / `close()` in the app's lifespan, after / before the fleet's."""

    def __init__(self, fleet: Fleet, keys: Keys) -> None:
        self.fleet = fleet
        self.settings = fleet.settings
        self.metrics = fleet.metrics
        ttl_ms = int(max(self.settings.rebalance_s, 1.0) * 1000)  # a rebalance holds it at most this long
        self.lock = RedisLock(fleet.link, f"{keys.base}:rebalance-lock", ttl_ms)
        self._task: asyncio.Task[None] | None = None
        self._urgent: asyncio.Task[None] | None = None  # a rebalance started by a capacity drop
        self._shedding: dict[str, asyncio.Future[None]] = {}  # worker URL -> done when its `shed` ends
        # worker URL -> the stop of a rebalance's solve running for it (a `shed` sets it)
        self._solving: dict[str, threading.Event] = {}
        self._stop = asyncio.Event()

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the periodic rebalance (none when `rebalance_s` is 0: only on request)."""
        if self.settings.rebalance_s:
            self._task = asyncio.create_task(self._loop(), name="dapdee-rebalance")

    async def close(self) -> None:
        self._stop.set()
        for task in (self._task, self._urgent):
            if task is not None:
                await stop_task(task)
        self._task = self._urgent = None

    async def _loop(self) -> None:
        quiet = (RedisUnavailable,)
        await run_every(self.settings.rebalance_s, self._stop, self._periodic, "periodic rebalance", log, quiet)

    async def _periodic(self) -> None:
        if self.fleet.lease_count:  # as of the fleet's last refresh
            await self.rebalance_if_leader()

    def note_capacity(self, url: str, capacity_ms_per_s: float) -> None:
        """After a heartbeat: when the leases on worker `url` (this replica's view) book more
        than ρ_max of the capacity it now reports, rebalance at once instead of at the next
        period (only where rebalancing is periodic; one such rebalance at a time). O(1)."""
        if not self.settings.rebalance_s or not self._over_booked(url, capacity_ms_per_s):
            return
        if self._urgent is None or self._urgent.done():
            leased, _ = self.fleet.leased(url)
            log.info("worker %s: leases book %.0f of %.0f ms/s; rebalancing now", url, leased, capacity_ms_per_s)
            self._urgent = asyncio.create_task(self._rebalance_now(url), name="dapdee-rebalance-urgent")

    def _over_booked(self, url: str, capacity_ms_per_s: float) -> bool:
        leased, _ = self.fleet.leased(url)
        return leased > self.settings.rho_max * capacity_ms_per_s * (1 + 1e-9)

    async def _rebalance_now(self, url: str) -> None:
        """Rebalance once, unless worker `url`'s leases fit its capacity by then (as this replica
        sees both). While another rebalance holds the lock (a periodic one here, or another
        replica's), wait for it and look again: it may have solved for the capacity before the
        drop. Gives up after `URGENT_WAIT_S` (the next heartbeat starts another)."""
        deadline = time.monotonic() + URGENT_WAIT_S
        try:
            while time.monotonic() < deadline:
                workers = {w.url: w for w in await self.fleet.live_workers()}
                if url not in workers or not self._over_booked(url, workers[url].capacity_ms_per_s):
                    return
                if await self.rebalance_if_leader() is not None:
                    return
                await asyncio.sleep(LOCK_POLL_S)
                await self.fleet.refresh()  # what the lock holder applied
        except RedisUnavailable:
            pass
        except Exception:  # a background task: log, never raise into the loop
            log.exception("rebalance after a capacity drop failed")

    async def shed(self, w: Worker, ttl_ms: int, refused_at_ms: int) -> bool | None:
        """Heartbeat `w` states a capacity that its worker's leases book past ρ_max of (the registry
        refused it): re-solve those leases for it, with the Device-Only leases of models it
        serves as a rebalance does (solved without them, the next rebalance moved those again),
        and apply their plans together with the heartbeat (live for `ttl_ms`; a heartbeat the
        registry took after `refused_at_ms`, Redis's time of the refusal, is newer and stays) in
        one step, a device that re-planned meanwhile left on the plan it got (a partial apply).
        A rebalance's solve of the worker running here stops (solved for the capacity before).
        True when applied; False when each of `CAPACITY_RETRIES` tries found the leases past ρ_max of the
        capacity all the same (or the worker no longer live), or none of them can be priced
        (nothing written: the caller registers the heartbeat as it is); None when this replica
        was already doing so for the worker (a heartbeat sent again after a timeout): it waited
        for that, and the caller checks its heartbeat again.
        RedisUnavailable passes up. One round trip (the live workers), then per try: four round
        trips, the demands and one `settle`."""
        running = self._shedding.get(w.url)
        if running is not None:
            await asyncio.shield(running)  # the waiter's cancellation must not end the shed's
            return None
        done = self._shedding[w.url] = asyncio.get_running_loop().create_future()
        if (solving := self._solving.get(w.url)) is not None:
            solving.set()  # solved for the capacity before: its apply would be refused anyway
        try:
            return await self._shed(w, Heartbeat(w.info_json(), w.capacity_ms_per_s, ttl_ms, refused_at_ms))
        finally:  # no entry outlives its shed: workers come and go (new URLs), the map stays small
            del self._shedding[w.url]
            done.set_result(None)

    async def _shed(self, w: Worker, heartbeat: Heartbeat) -> bool:
        workers = await self.fleet.live_workers()
        for _ in range(CAPACITY_RETRIES):
            reserved = await self.fleet.book.loads()
            records = await self.fleet.book.records(await self.fleet.book.devices())
            held = reserved.get(w.url, {})
            candidates = _candidates(w, reserved, records, _joiners(reserved, records), workers)
            try:
                report = await self._rebalance_worker(w, candidates, records, held, heartbeat)
            except SolveOverBudget:
                self._over_budget(w, len(candidates))
                break
            if report is None:
                break
            if report["applied"]:
                await self.fleet.refresh()
                return True
        return False

    # ---- rebalancing ------------------------------------------------------------------------------
    async def rebalance_if_leader(self) -> dict[str, Any] | None:
        """Rebalance unless another replica holds the lock (then None)."""
        token = await self.lock.acquire()
        if token is None:
            return None
        try:
            return await self.rebalance()
        finally:
            with contextlib.suppress(RedisUnavailable):
                await self.lock.release(token)

    async def rebalance_on_request(self, wait_s: float = URGENT_WAIT_S) -> dict[str, Any] | None:
        """`POST /fleet/rebalance`: a rebalance under the lock, as the periodic ones (one replica
        at a time); while another rebalance holds it, wait for it (polling every `LOCK_POLL_S`)
        and then rebalance. None when the lock stayed taken for `wait_s`. Without Redis: the
        empty answer at once (no leases are kept). RedisUnavailable passes up."""
        if not self.fleet.link.enabled:
            return await self.rebalance()
        deadline = time.monotonic() + wait_s
        while True:
            got = await self.rebalance_if_leader()
            if got is not None or time.monotonic() >= deadline:
                return got
            await asyncio.sleep(LOCK_POLL_S)

    async def rebalance(self) -> dict[str, Any]:
        """Re-solve each worker's leases (and the Device-Only leases of models it serves) and apply
        the assignments; the answer lists, per worker, the totals before and after and each device's
        old and new plan value, and the workers whose solve ran past `rebalance_budget_s` (left as
        they were; nothing without Redis: no leases are kept). A worker whose capacity drop is
        being re-solved here (`shed`) is left to that. RedisUnavailable passes up."""
        if not self.fleet.link.enabled:
            return {"approximate": False, "workers": [], "over_budget": []}
        reserved = await self.fleet.book.loads()
        devices = await self.fleet.book.devices()
        records = await self.fleet.book.records(devices)
        workers = await self.fleet.live_workers()
        joiners = _joiners(reserved, records)
        reports, over_budget = [], []
        for w in sorted(workers, key=lambda w: w.url):
            if w.url in self._shedding:
                continue
            candidates = _candidates(w, reserved, records, joiners, workers)
            try:
                report = await self._rebalance_worker(w, candidates, records, reserved.get(w.url, {}))
            except SolveOverBudget:
                self._over_budget(w, len(candidates))
                over_budget.append(w.url)
                continue
            except SolveStopped:
                log.info("rebalance of %s: stopped for the re-solve of its capacity drop", w.url)
                continue
            if report is not None:
                reports.append(report)
                if report["applied"]:  # a refused apply moved nobody: its joiners may join another worker
                    solved = {c["device_id"] for c in report["devices"]}
                    joiners -= {c["device_id"] for c in report["devices"] if c["new"]["edge_ms_per_frame"] > 0}
                    joiners = await self._reread(joiners & solved, joiners, records)
        self.metrics.rebalances.labels("noop" if not reports else "done").inc()
        await self.fleet.refresh()
        return {"approximate": any(not r["exact"] for r in reports), "workers": reports, "over_budget": over_budget}

    def _over_budget(self, w: Worker, leases: int) -> None:
        """Count and log a worker whose solve ran past `rebalance_budget_s` (left as it was)."""
        self.metrics.rebalances.labels("over_budget").inc()
        log.warning(
            "rebalance of %s: solving %d leases took longer than %g s (DAPDEE_REBALANCE_BUDGET_S); left as it was",
            w.url, leases, self.settings.rebalance_budget_s,
        )  # fmt: skip

    async def _reread(self, rewritten: set[str], joiners: set[str], records: dict[str, StoredRecord]) -> set[str]:
        """After an apply rewrote the records of the Device-Only `rewritten` (left Device-Only, on
        that worker's graph: another basis; or put on that worker at e_i = 0, a zero-cost edge
        plan), read them again, so the next worker's apply checks them as they are now instead
        of refusing everything it solved. Returns the joiners without those whose lease ended
        meanwhile or is now on a worker (another worker's apply would refuse them: `apply`).
        One round trip (none when nothing was)."""
        if not rewritten:
            return joiners
        fresh = await self.fleet.book.records(sorted(rewritten))
        records.update(fresh)
        gone = {d for d in rewritten if d not in fresh or fresh[d].fields.get("worker") is not None}
        return joiners - gone

    async def _rebalance_worker(
        self,
        w: Worker,
        device_ids: list[str],
        records: dict[str, StoredRecord],
        held: dict[str, float],
        heartbeat: Heartbeat | None = None,
    ) -> dict[str, Any] | None:
        capacity, nominal, rho = w.capacity_ms_per_s, w.nominal, self.settings.rho_max
        booked = min(priced_load(rho, capacity, nominal), edge_load_of(sum(held.values()), nominal))
        demands = []
        for d in device_ids:
            demand = await self._demand(w, records[d].fields, booked)
            if demand is not None:
                demands.append(demand)
        if not demands:
            return None
        # leases on the worker this replica cannot price (their model or profiles gone) keep
        # their booking, and the others are solved within what it leaves
        priced = {d.device_id for d in demands}
        kept = sum(load for d, load in held.items() if d in records and d not in priced)
        shed = heartbeat is not None  # a capacity drop's re-solve: partial apply, never stopped
        with self._stoppable(w.url, shed) as stop:
            for _ in range(CAPACITY_RETRIES):
                sol = await self._solve(demands, capacity, nominal, kept, stop)
                assignments = _assignments(w.url, demands, sol, nominal, records, kept)
                limit = self.settings.rho_max * capacity
                outcome = await self.fleet.book.apply(w.url, assignments, limit, heartbeat, partial=shed)
                now = outcome.capacity_ms_per_s
                if outcome.status != "over" or now is None or now >= capacity:
                    break
                log.info("worker %s: capacity fell to %.1f ms/s while its leases were solved; solving again",
                         w.url, now)  # fmt: skip
                capacity = now  # the worker measured itself slower meanwhile: solve for what it has now
        self.fleet.view.applied(w.url, assignments, outcome)
        applied = outcome.status == "applied"
        self.metrics.rebalances.labels(_outcome(applied, shed)).inc()
        olds = [held_option(d, 0.0, priced_load(rho, capacity, nominal), sol.time_load) for d in demands]
        pairs = zip(demands, olds, sol.choices, strict=True)
        moved = sum(o is None or option_nodes(d, o) != option_nodes(d, n) for d, o, n in pairs)
        log.log(
            logging.INFO if moved or outcome.left else logging.DEBUG,
            "rebalance of %s: %d leases, %d moved, %.1f of %.1f ms/s booked, exact %s, %s%s",
            w.url, len(demands), moved, sol.load, capacity, sol.exact, outcome.status,
            f" ({len(outcome.left)} left as they were: they re-planned meanwhile)" if outcome.left else "",
        )  # fmt: skip
        return _report(w, demands, olds, sol, applied, sum(held.values()), kept)

    @contextlib.contextmanager
    def _stoppable(self, url: str, shed: bool) -> Iterator[threading.Event | None]:
        """The stop of a rebalance's solve of worker `url`, kept while it runs for a `shed` of
        the worker to set (None for a shed's own solve). O(1)."""
        if shed:
            yield None
            return
        stop = self._solving.setdefault(url, threading.Event())
        try:
            yield stop
        finally:
            if self._solving.get(url) is stop:
                del self._solving[url]

    async def _solve(
        self,
        demands: list[Demand],
        capacity_ms_per_s: float,
        nominal_ms_per_s: float,
        kept_ms_per_s: float,
        stop: threading.Event | None = None,
    ) -> Solution:
        """The fleet objective's best choices for `demands` on that capacity, next to the
        `kept_ms_per_s` other leases book, times priced at no less than the load they put on the
        worker (`settle`; ℓe over `nominal_ms_per_s`), in a thread, within `rebalance_budget_s`
        (SolveOverBudget past it; SolveStopped once `stop` is set)."""
        rho, margin = self.settings.rho_max, self.settings.switch_margin
        deadline = time.monotonic() + self.settings.rebalance_budget_s
        return await asyncio.to_thread(
            settle, demands, capacity_ms_per_s, rho, nominal_ms_per_s=nominal_ms_per_s, kept_ms_per_s=kept_ms_per_s,
            switch_margin=margin, deadline=deadline, stop=stop,
        )  # fmt: skip

    async def _demand(self, w: Worker, record: dict[str, Any], booked: float) -> Demand | None:
        """The rebalancer's view of one lease on `w`, "auto" resolved at `booked`, the load the
        worker's leases book now (None: its model or profiles are gone)."""
        found = await self.fleet.candidates_for(record["model"], record.get("device_tier"), [w])
        if not found:
            return None
        req = request_of(record["request"])
        held = record["plan"]
        pm = found[0].planmap
        if pm.exact:
            objective = resolved_objective(pm, req, booked)
        else:  # "auto" over a capped map may take min-cuts: off the event loop, as the solve is
            objective = await asyncio.to_thread(resolved_objective, pm, req, booked)
        current = (held["exit"]["name"], tuple(held["device_nodes"]))
        return Demand(record["device_id"], float(record["frames_per_s"]), pm, req, objective, current)


def _joiners(reserved: dict[str, dict[str, float]], records: dict[str, StoredRecord]) -> set[str]:
    """The devices whose lease holds no worker (Device-Only), which a worker's solve may take in."""
    attached = {d for loads in reserved.values() for d in loads}
    return {d for d in records if d not in attached and records[d].fields.get("worker") is None}


def _candidates(
    w: Worker,
    reserved: dict[str, dict[str, float]],
    records: dict[str, StoredRecord],
    joiners: set[str],
    workers: Sequence[Worker],
) -> list[str]:
    """The leases a solve of worker `w` chooses for: those on it of models it serves (one of a
    model it stopped serving keeps its booking until its device plans again: the worker would
    refuse its frames), then the `joiners` that may join it (`_may_join`, among the live
    `workers`). O(leases · workers)."""
    members = [d for d in reserved.get(w.url, {}) if d in records and records[d].fields["model"] in w.models]
    return members + sorted(d for d in joiners if _may_join(w, records[d].fields, workers))


def _may_join(w: Worker, record: dict[str, Any], workers: Sequence[Worker]) -> bool:
    """Whether a Device-Only lease may be brought onto worker `w`: `w` serves its model and its
    device did not ask to avoid it (`usable` over the live `workers` serving the model, as its
    own request is planned). O(workers)."""
    model = record["model"]
    if model not in w.models:
        return False
    request = record.get("request")
    avoid = request.get("avoid_workers") if isinstance(request, dict) else None
    if not avoid:
        return True
    serving = [x for x in workers if model in x.models and x.url != w.url] + [w]
    kept, _ = usable(serving, avoid)
    return any(x.url == w.url for x in kept)


def _outcome(applied: bool, shed: bool) -> str:
    """The `dapdee_planner_rebalances_total` result of one worker's apply (`shed`: with its
    heartbeat)."""
    if shed:
        return "shed" if applied else "shed_refused"
    return "applied" if applied else "refused"


def _assignments(
    url: str,
    demands: Sequence[Demand],
    sol: Solution,
    nominal: float,
    records: dict[str, StoredRecord],
    kept: float,
) -> dict[str, tuple[float, dict[str, Any], str]]:
    """Per device, the load and lease record `sol` assigns it on worker `url` (with the basis of
    the record it replaces), each plan priced at the load the others put on the worker: the rest
    of `sol` and the `kept` leases outside it (over its `nominal` capacity). O(devices · plan
    pricing)."""
    assignments = {}
    for demand, opt in zip(demands, sol.choices, strict=True):
        exit_name, nodes = option_nodes(demand, opt)
        load = edge_load_of(sol.load + kept - opt.load, nominal)
        plan, e_i = plan_of(demand.planmap, demand.request, exit_name, nodes, load, demand.objective, not sol.exact)
        plan["edge_worker"] = url  # for a Device-Only plan: where to probe the link
        held = records[demand.device_id]
        record = {
            **held.fields,
            "worker": url if opt.uses_edge else None,
            "edge_ms_per_frame": e_i,
            "plan": plan,
            "assigned": True,
            "graph_hash": demand.planmap.graph_hash,
        }
        assignments[demand.device_id] = (opt.load, record, held.basis)
    return assignments


def _option_value(demand: Demand, opt: Option) -> dict[str, Any]:
    exit_name, nodes = option_nodes(demand, opt)
    return {
        "exit": exit_name,
        "device_nodes": len(nodes),
        "edge_ms_per_frame": opt.load / demand.frames_per_s,
        "met": bool(opt.value[0]),
        "accuracy": demand.planmap.graph.exits[opt.exit_index].accuracy,
        "objective_ms": -opt.value[2] / demand.frames_per_s,
    }


def _totals(demands: Sequence[Demand], opts: Sequence[Option | None], leased: float) -> dict[str, Any]:
    have = [o for o in opts if o is not None]
    return {
        "devices_met": sum(o.value[0] for o in have),
        "accuracy_frames_per_s": sum(o.value[1] for o in have),
        "frame_ms_per_s": -sum(o.value[2] for o in have),
        "leased_ms_per_s": leased,
    }


def _report(
    w: Worker, demands: list[Demand], olds: list[Option | None], sol: Solution, applied: bool, held: float, kept: float
) -> dict[str, Any]:
    devices = [
        {
            "device_id": d.device_id,
            "old": _option_value(d, o) if o is not None else None,
            "new": _option_value(d, n),
        }
        for d, o, n in zip(demands, olds, sol.choices, strict=True)
    ]
    return {
        "worker": w.url,
        "leases": len(demands),
        "exact": sol.exact,
        "time_load": sol.time_load,
        "applied": applied,
        "before": _totals(demands, olds, held),
        "after": _totals(demands, list(sol.choices), sol.load + kept),
        "devices": devices,
    }
