"""The shared edge in the planner: leases, admission and the worker choice, per device.

`Fleet.plan` answers one `POST /plan` against the other devices' leases with the exact plan of
`dapdee.fleet.assign` and, for a named device, reserves its lease atomically (`leases.LeaseBook`,
Lua in Redis). One round trip while this replica's view is Redis's own: the device is planned
against the view (per candidate worker what the others reserve, and the device's lease record
as this replica last wrote or read it), and the reservation verifies that view in the same
atomic step (the record by its tag: a rebalance or another replica may have replaced it). A stale
view writes nothing and brings back Redis's figures, which are adopted; the device is planned
again against them and reserved (two round trips). If another replica took the capacity
meanwhile the reservation is refused with the new figures and the device is planned again (at
most `RETRIES` times, then Device-Only, always admissible). A request without `device_id`
reserves nothing and is planned against this replica's view of the reservations (refreshed
every `refresh_s` and after each reservation here), with no Redis round trip.

A device whose lease carries a plan assigned by a rebalance gets that plan back while its
conditions have not drifted (`lease_drift`), re-priced at the load the others put on its worker.
Otherwise it keeps the plan it holds while that is still admissible and within the switching
margin of the exact plan (`switch_margin` μ: as many requirements met, no less accuracy, and
its time t·(1 − μ) <= the exact plan's), so near-ties do not move devices back and forth; the
rebalance credits held plans the same way.

Rebalancing, which re-solves every worker's leases together and assigns the plans this module
hands back, is `dapdee.planner.rebalancing`.

With Redis away, plans come from the last view of the reservations and no lease is stored
(the answer's lease then says so by `expires_in_s` 0); the planner never fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dapdee.costgraph import CostGraphError
from dapdee.fleet.assign import DevicePlan, EdgeSlot, edge_load_of, plan_for_device, plan_of
from dapdee.planner.config import Settings
from dapdee.planner.errors import CapacityExceeded, RedisUnavailable
from dapdee.planner.keys import Keys
from dapdee.planner.leases import Figures, LeaseBook, Reservation, ReservationView, View
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.workers import Worker
from dapdee.planning import PlanMap, PlanRequest
from dapdee.web.tasks import run_every, stop_task

log = logging.getLogger("dapdee.planner")

RETRIES = 3
# the request fields a lease record keeps: what the device asked, so a rebalance can re-plan it
REQUEST_FIELDS = (
    "bandwidth_mbps",
    "rtt_ms",
    "device_load",
    "device_tier",
    "latency_budget_ms",
    "min_accuracy",
    "frame_rate",
    "mode",
)


@dataclass(frozen=True)
class Candidate:
    """A worker a device may use and its plan map (under the worker tier's edge profile)."""

    worker: Worker
    planmap: PlanMap


@dataclass(frozen=True)
class Ask:
    """One `POST /plan` in the forms the fleet reads: the validated body (`PlanRequestBody`),
    its fields as a dict (dumped once: the lease record keeps them) and its `PlanRequest`."""

    body: Any
    fields: dict[str, Any]
    req: PlanRequest

    @classmethod
    def of(cls, body: Any) -> Ask:
        fields = body.model_dump()
        return cls(body, fields, request_of(fields))


# (model, device tier, workers) -> the candidates among those workers; [] when the model or a
# profile is gone
CandidatesFor = Callable[[str, str | None, Sequence[Worker]], Awaitable[list[Candidate]]]
LiveWorkers = Callable[[], Awaitable[list[Worker]]]
# (worker URL, capacity its last heartbeat states) when a reservation found less than this view
CapacitySeen = Callable[[str, float], None]


def request_of(fields: dict[str, Any]) -> PlanRequest:
    """The `PlanRequest` of a lease record's `request` (edge load left 0: the fleet sets it)."""
    return PlanRequest(
        bandwidth_mbps=fields["bandwidth_mbps"],
        rtt_ms=fields.get("rtt_ms", 0.0),
        device_load=fields.get("device_load", 0.0),
        latency_budget_ms=fields.get("latency_budget_ms"),
        min_accuracy=fields.get("min_accuracy"),
        frame_rate=fields.get("frame_rate"),
        mode=fields.get("mode", "auto"),
    )


REQUIREMENT_FIELDS = ("device_tier", "latency_budget_ms", "min_accuracy", "frame_rate", "mode")


def with_capacity(candidates: Sequence[Candidate], url: str, capacity_ms_per_s: float) -> list[Candidate]:
    """`candidates` with worker `url`'s capacity lowered to `capacity_ms_per_s` (the registry's,
    when below this replica's view). O(candidates)."""
    out = []
    for c in candidates:
        if c.worker.url == url and capacity_ms_per_s < c.worker.capacity_ms_per_s:
            c = replace(c, worker=replace(c.worker, capacity_ms_per_s=capacity_ms_per_s))
        out.append(c)
    return out


def capacity_of(candidates: Sequence[Candidate], url: str | None) -> float:
    """Worker `url`'s capacity among `candidates` (ms/s; inf for no worker). O(candidates)."""
    return next((c.worker.capacity_ms_per_s for c in candidates if c.worker.url == url), math.inf)


def requirements_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether the device's tier or any requirement differs between two requests. O(1)."""
    return any(old.get(key) != new.get(key) for key in REQUIREMENT_FIELDS)


def within_margin(held: dict[str, Any], best: dict[str, Any], margin: float) -> bool:
    """Whether a held plan is as good as `best` up to the switching margin: the same resolved
    mode, its requirements met if `best` meets them, no less accuracy, and its time (latency in
    latency mode, bottleneck in throughput mode) t·(1 − margin) <= best's. O(1)."""
    if held["mode"] != best["mode"] or (best["constraints_met"] and not held["constraints_met"]):
        return False
    if (held["exit"]["accuracy"] or 0.0) < (best["exit"]["accuracy"] or 0.0):
        return False
    key = "latency_ms" if best["mode"] == "latency" else "bottleneck_ms"
    return held["predicted"][key] * (1.0 - margin) <= best["predicted"][key]


def drifted(old: dict[str, Any], new: dict[str, Any], threshold: float) -> bool:
    """Whether the device's conditions moved past the re-plan threshold since `old` (relative
    change of bandwidth or round trip over `threshold`, device load over `threshold / 2`), or its
    requirements changed at all. O(1)."""
    if requirements_changed(old, new):
        return True
    b0, b1 = old["bandwidth_mbps"], new["bandwidth_mbps"]
    if abs(b1 - b0) > threshold * b0:
        return True
    r0, r1 = old.get("rtt_ms", 0.0), new.get("rtt_ms", 0.0)
    if abs(r1 - r0) > threshold * max(r0, 1.0):
        return True
    return abs(new.get("device_load", 0.0) - old.get("device_load", 0.0)) > threshold / 2


CONDITION_FIELDS = ("bandwidth_mbps", "rtt_ms", "device_load")


def recorded_request(anchor: dict[str, Any] | None, fields: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The request a lease record keeps: the new request's fields, except that its conditions
    stay those of `anchor` (the record's request so far) while they have not drifted past
    `threshold` (`drifted`). Conditions within the threshold are estimation noise; a rebalance
    that followed them would trade the worker's slots between like devices at every period,
    and the drift test of the next request measures from the anchor, so a slow creep is caught.
    O(1)."""
    request = {k: fields.get(k) for k in REQUEST_FIELDS}
    if anchor is not None and not drifted(anchor, request, threshold):
        request.update({k: anchor[k] for k in CONDITION_FIELDS if k in anchor})
    return request


class Fleet:
    """Leases and admission of one planner replica (module docstring). `start()` / `close()`
    in the app's lifespan. `candidates_for` and `live_workers` come from the store, and
    `capacity_seen` (the registry's) hears of a worker's capacity that a reservation found lower
    than this replica's view."""

    def __init__(
        self,
        settings: Settings,
        metrics: PlannerMetrics,
        link: RedisLink,
        keys: Keys,
        candidates_for: CandidatesFor,
        live_workers: LiveWorkers,
        capacity_seen: CapacitySeen | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.book = LeaseBook(link, keys.base, settings.lease_ttl_s, settings.max_leases, settings.rho_max)
        self.candidates_for = candidates_for
        self.live_workers = live_workers
        self.capacity_seen = capacity_seen
        self.reserved = ReservationView()  # this replica's view, as last seen
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
        self._stop.set()
        if self._task is not None:
            await stop_task(self._task)
        self._task = None

    async def refresh(self) -> None:
        """Re-read every worker's reservations and the lease count, and set the fleet gauges
        (from the last view when Redis is away; RedisUnavailable then passes up). Three round trips."""
        try:
            self.reserved.replace(await self.book.loads(), every=True)
            self.lease_count = await self.book.count()
        finally:
            workers = await self.live_workers()
            leased = {w.url: (w.capacity_ms_per_s, *self.leased(w.url)) for w in workers}
            self.metrics.set_fleet(self.lease_count, leased)

    async def _loop(self) -> None:
        quiet = (RedisUnavailable,)
        await run_every(self.settings.refresh_s, self._stop, self.refresh, "fleet refresh", log, quiet)

    # ---- views ------------------------------------------------------------------------------------
    def others(self, worker: str, device_id: str | None) -> float:
        """What the other devices reserve on `worker` (ms/s), from this replica's view. O(1)."""
        return self.reserved.others(worker, device_id)

    def leased(self, worker: str) -> tuple[float, int]:
        """(Σ f_j·e_j, lease count) on `worker`, from this replica's view. O(1)."""
        return self.reserved.leased(worker)

    # ---- planning ---------------------------------------------------------------------------------
    async def plan(self, body: Any, candidates: Sequence[Candidate], edge_load: float | None) -> dict[str, Any]:
        """The plan for one request (a validated `PlanRequestBody`) over `candidates` (at least
        one), with a lease when it names a device. CapacityExceeded past the lease cap."""
        ask = Ask.of(body)
        if body.device_id is None:
            slots = self._slots(candidates, None, {})
            dp = plan_for_device(slots, ask.req, None, self.settings.rho_max, edge_load)
            self.metrics.admissions.labels("unleased").inc()
            return dp.plan
        device = body.device_id
        tag, record = self.held.get(device, ("", None))
        view = View(tag, {c.worker.url: self.others(c.worker.url, device) for c in candidates})
        return await self._lease(ask, candidates, record, view, edge_load)

    async def lease_without_worker(self, body: Any, plan: dict[str, Any]) -> dict[str, Any]:
        """A named device of a model no worker serves: its plan reserves nothing, but the lease is
        recorded (GET /devices/{id}, the lease count, a later rebalance may bring it onto a worker)."""
        dp = DevicePlan(plan, None, 0.0, 0.0)
        return await self._reserve(Ask.of(body), [], dp, False, None, {}, body.edge_load, None)

    def _choose(
        self,
        record: dict[str, Any] | None,
        ask: Ask,
        candidates: Sequence[Candidate],
        others: dict[str, float],
        edge_load: float | None,
    ) -> tuple[DevicePlan, bool]:
        """The device's plan given `others` (per worker, what the other devices reserve): the one
        a rebalance assigned it while that still applies, else the plan it holds while within the
        switching margin of the exact plan (`_kept`), else the exact plan."""
        if (
            record is not None
            and record.get("assigned")
            and not drifted(record["request"], ask.fields, self.settings.lease_drift)
        ):
            dp = self._repriced(record, ask, candidates, others)
            if dp is not None:
                return dp, True
        slots = self._slots(candidates, ask.body.device_id, others)
        best = plan_for_device(slots, ask.req, ask.body.frame_rate, self.settings.rho_max, edge_load)
        return self._kept(record, ask, candidates, others, best) or best, False

    def _slots(
        self, candidates: Sequence[Candidate], device_id: str | None, fresh: dict[str, float] | None
    ) -> list[EdgeSlot]:
        out = []
        for c in candidates:
            url = c.worker.url
            others = fresh[url] if fresh is not None and url in fresh else self.others(url, device_id)
            # ties between equally leased workers: the lower heartbeat load (traffic without leases)
            tiebreak = c.worker.load + 1e-6 * (c.worker.inflight + c.worker.queue_depth)
            out.append(EdgeSlot(url, c.planmap, c.worker.capacity_ms_per_s, others, tiebreak, c.worker.nominal))
        return out

    def _repriced(
        self,
        record: dict[str, Any],
        ask: Ask,
        candidates: Sequence[Candidate],
        fresh: dict[str, float] | None,
    ) -> DevicePlan | None:
        """The plan in the device's lease record re-priced now, at the load the others put on its
        worker; None when it no longer applies (another model, its worker gone, the graph changed)."""
        body = ask.body
        if record.get("model") != body.model:
            return None
        worker = record.get("worker")
        by_url = {c.worker.url: c for c in candidates}
        if worker is not None and worker not in by_url:
            return None
        c = by_url[worker] if worker is not None else candidates[0]
        others = (fresh or {}).get(c.worker.url, self.others(c.worker.url, body.device_id))
        load = edge_load_of(others, c.worker.nominal)
        held = record["plan"]
        try:
            plan, e_i = plan_of(c.planmap, ask.req, held["exit"]["name"], held["device_nodes"], load, held["mode"])
        except (CostGraphError, KeyError, StopIteration):
            return None  # the graph changed under the plan
        # a Device-Only plan keeps naming the worker it named (the device probes its link there)
        plan["edge_worker"] = worker if worker is not None else (held.get("edge_worker") or c.worker.url)
        return DevicePlan(plan, worker, e_i, load if worker is not None else 0.0)

    def _kept(
        self,
        record: dict[str, Any] | None,
        ask: Ask,
        candidates: Sequence[Candidate],
        others: dict[str, float],
        best: DevicePlan,
    ) -> DevicePlan | None:
        """The plan the device holds, re-priced now, when its requirements are unchanged, it is
        still admissible, and it is within the switching margin of `best` (`within_margin`).
        None at once (no re-pricing) when `best` is that plan."""
        margin = self.settings.switch_margin
        if record is None or margin <= 0 or requirements_changed(record["request"], ask.fields):
            return None
        held_plan = record["plan"]
        same_plan = held_plan["exit"]["name"] == best.plan["exit"]["name"]
        if same_plan and held_plan["device_nodes"] == best.plan["device_nodes"] and record.get("worker") == best.worker:
            return None
        held = self._repriced(record, ask, candidates, others)
        if held is None or not within_margin(held.plan, best.plan, margin):
            return None
        if held.worker is None:
            return held
        capacity = next(c.worker.capacity_ms_per_s for c in candidates if c.worker.url == held.worker)
        reserved = others.get(held.worker, self.others(held.worker, ask.body.device_id))
        if reserved + ask.body.frame_rate * held.edge_ms_per_frame > self.settings.rho_max * capacity:
            return None
        return held

    async def _lease(
        self,
        ask: Ask,
        candidates: Sequence[Candidate],
        record: dict[str, Any] | None,
        view: View,
        edge_load: float | None,
    ) -> dict[str, Any]:
        """Plan the device against this replica's `view` and reserve that plan, the view verified
        in the same atomic step: one round trip when the view is Redis's own. Returns the plan
        JSON with its `lease`."""
        dp, assigned = self._choose(record, ask, candidates, view.others, edge_load)
        anchor = record["request"] if record is not None else None
        return await self._reserve(ask, candidates, dp, assigned, view, dict(view.others), edge_load, anchor)

    async def _reserve(
        self,
        ask: Ask,
        candidates: Sequence[Candidate],
        dp: DevicePlan,
        assigned: bool,
        view: View | None,
        others: dict[str, float],
        edge_load: float | None,
        anchor: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Reserve `dp`'s lease (verifying `view` when given), its record keeping the conditions
        of `anchor` (the lease's recorded request) while they hold (`recorded_request`). A stale
        view: adopt Redis's figures and plan again against them. A refusal (another replica took
        the room meanwhile, or the worker's last heartbeat states less capacity than this
        replica's view): plan again with the new figures, at most `RETRIES` times, then
        Device-Only (always admissible). Returns the plan JSON with its `lease`."""
        body = ask.body
        stored = False
        refusals = 0
        while True:
            load = body.frame_rate * dp.edge_ms_per_frame
            limit = self.settings.rho_max * capacity_of(candidates, dp.worker)
            record = self._record(ask, dp, assigned, anchor)
            try:
                res = await self.book.reserve(body.device_id, dp.worker, load, limit, record, view)
            except RedisUnavailable:
                break
            if res.status == "stale":
                assert res.figures is not None
                self.metrics.admissions.labels("stale").inc()
                others = self._adopt(res.figures, body.device_id)
                view = None  # the figures adopted are Redis's: the next reservation checks admission only
                held = res.figures.record.fields if res.figures.record is not None else None
                dp, assigned = self._choose(held, ask, candidates, others, edge_load)
                anchor = held["request"] if held is not None else None
                continue
            if res.status == "full":
                self.metrics.admissions.labels("full").inc()
                raise CapacityExceeded("leases", self.settings.max_leases)
            if res.status == "reserved":
                stored = True
                self._note(body.device_id, dp.worker, load)
                self._remember(body.device_id, record, res.tag)
                self.metrics.admissions.labels("device_only" if dp.worker is None else "reserved").inc()
                break
            assert dp.worker is not None
            refusals, assigned = refusals + 1, False
            give_up = refusals >= RETRIES
            candidates, dp = self._after_refusal(ask, candidates, dp.worker, res, others, give_up, edge_load)
        return self._answer(body, dp, assigned, stored)

    def _after_refusal(
        self,
        ask: Ask,
        candidates: Sequence[Candidate],
        worker: str,
        res: Reservation,
        others: dict[str, float],
        give_up: bool,
        edge_load: float | None,
    ) -> tuple[Sequence[Candidate], DevicePlan]:
        """The device planned again after Redis refused its reservation on `worker`: against the
        others' reservations and the worker's capacity Redis stated (`others` is updated; the
        registry hears of the capacity), or Device-Only once `give_up` (always admissible).
        Returns the candidates as now priced and the plan."""
        self.metrics.admissions.labels("refused").inc()
        others[worker] = res.others_ms_per_s
        if res.capacity_ms_per_s is not None:
            candidates = with_capacity(candidates, worker, res.capacity_ms_per_s)
            if self.capacity_seen is not None:
                self.capacity_seen(worker, res.capacity_ms_per_s)
        ahead = {c.worker.url: math.inf for c in candidates} if give_up else others
        slots = self._slots(candidates, ask.body.device_id, ahead)
        return candidates, plan_for_device(slots, ask.req, ask.body.frame_rate, self.settings.rho_max, edge_load)

    def _answer(self, body: Any, dp: DevicePlan, assigned: bool, stored: bool) -> dict[str, Any]:
        """The plan JSON with its `lease` (`expires_in_s` 0 when the lease could not be stored)."""
        plan = dict(dp.plan)
        plan["lease"] = {
            "device_id": body.device_id,
            "model": body.model,
            "worker": dp.worker,
            "frames_per_s": body.frame_rate,
            "edge_ms_per_frame": dp.edge_ms_per_frame,
            "expires_in_s": self.settings.lease_ttl_s if stored else 0.0,
            "replan_after_s": self.settings.replan_after_s,
            "assigned": assigned,
        }
        return plan

    def _record(self, ask: Ask, dp: DevicePlan, assigned: bool, anchor: dict[str, Any] | None) -> dict[str, Any]:
        body = ask.body
        return {
            "device_id": body.device_id,
            "model": body.model,
            "device_tier": body.device_tier,
            "worker": dp.worker,
            "frames_per_s": body.frame_rate,
            "edge_ms_per_frame": dp.edge_ms_per_frame,
            "request": recorded_request(anchor, ask.fields, self.settings.lease_drift),
            "plan": dp.plan,
            "assigned": assigned,
        }

    def _adopt(self, figures: Figures, device_id: str) -> dict[str, float]:
        """Take Redis's figures as this replica's view of those workers; per worker, what the
        devices other than `device_id` reserve there."""
        self.reserved.replace(figures.loads)
        return {url: self.reserved.others(url, device_id) for url in figures.loads}

    def _remember(self, device_id: str, record: dict[str, Any], tag: str) -> None:
        """Keep the device's lease record as stored (with its tag), so its next request plans
        from it without a read."""
        if len(self.held) >= self.settings.max_leases:  # leases that expired unseen: start over
            self.held.clear()
        self.held[device_id] = (tag, record)

    def _note(self, device_id: str, worker: str | None, load: float) -> None:
        """Update this replica's view after its own reservation (the device left any other worker)."""
        self.reserved.set(device_id, worker, load)

    # ---- devices ------------------------------------------------------------------------------------
    async def state(self, device_id: str) -> dict[str, Any] | None:
        """The device's lease and plan (None: no live lease; always None without Redis, where no
        lease is kept). One round trip. RedisUnavailable while a configured Redis is away."""
        if not self.link.enabled:
            return None
        got = await self.book.record(device_id)
        if got is None:
            return None
        record, ttl = got
        return {
            "device_id": device_id,
            "model": record["model"],
            "lease": {
                "device_id": device_id,
                "model": record["model"],
                "worker": record.get("worker"),
                "frames_per_s": record["frames_per_s"],
                "edge_ms_per_frame": record["edge_ms_per_frame"],
                "expires_in_s": round(ttl, 3),
                "replan_after_s": self.settings.replan_after_s,
                "assigned": bool(record.get("assigned")),
            },
            "plan": record["plan"],
            "assigned": bool(record.get("assigned")),
        }

    async def release(self, device_id: str) -> bool:
        """End the device's lease. False if it had none (always, without Redis)."""
        if not self.link.enabled:
            return False
        ended = await self.book.release(device_id)
        self._note(device_id, None, 0.0)
        self.held.pop(device_id, None)
        return ended
