"""The shared edge in the planner: each device's lease, reserved in Redis, and its admission.

`Fleet.plan` answers one `POST /plan` against the other devices' leases with the plan
`dapdee.planner.plan_choice` chooses (the exact plan of `dapdee.fleet.assign`, or one assigned or
held) and, for a named device, reserves its lease atomically (`leases.LeaseBook`, Lua in Redis).
One round trip while this replica's view (`dapdee.planner.lease_view`) is Redis's own: the
device is planned against the view (per candidate worker what the others reserve, and the
device's lease record as this replica last wrote or read it), and the reservation verifies that
view in the same atomic step (the record by its tag: a rebalance or another replica may have
replaced it). A stale view writes nothing and brings back Redis's figures, which are adopted; the
device is planned again against them and reserved (two round trips). If another replica took the
capacity meanwhile the reservation is refused with the new figures and the device is planned
again (at most `RETRIES` times, then Device-Only, always admissible). A request without
`device_id` reserves nothing and is planned against this replica's view of the reservations
(refreshed every `refresh_s` and after each reservation here), with no Redis round trip.

The lease record keeps what the device asked (`recorded_request`), so that a rebalance can
re-plan it and its next request can tell whether its conditions drifted.

With Redis away, plans come from the last view of the reservations and no lease is stored
(the answer's lease then says so by `expires_in_s` 0); the planner never fails for it.

A plan choice over exact plan maps is a scan of small fronts and runs inline; over a capped map
(an exit past the enumeration cap) a latency answer takes a min-cut per worker, so it runs on
the plan runner's threads under the plan budget, as a single-worker plan does
(`dapdee.planner.plan_runner`: PlanOverBudget past it).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from dapdee.fleet.assign import DevicePlan
from dapdee.planner.config import Settings
from dapdee.planner.errors import CapacityExceeded, RedisUnavailable
from dapdee.planner.keys import Keys
from dapdee.planner.lease_view import LeaseView, LiveWorkers
from dapdee.planner.leases import LeaseBook, Reservation, View
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.plan_choice import Ask, Candidate, PlanChooser, drifted, load_order
from dapdee.planner.plan_runner import PlanRunner
from dapdee.planner.problems import ApiProblem
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.workers import Worker

RETRIES = 3
T = TypeVar("T")
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
    "avoid_workers",
)
CONDITION_FIELDS = ("bandwidth_mbps", "rtt_ms", "device_load")

# (model, device tier, workers) -> the candidates among those workers; [] when the model or a
# profile is gone
CandidatesFor = Callable[[str, str | None, Sequence[Worker]], Awaitable[list[Candidate]]]
# (worker URL, capacity its last heartbeat states) when a reservation found less than this view
CapacitySeen = Callable[[str, float], None]


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
    in the app's lifespan. `candidates_for` (the store's `CandidateFinder.by_name`) and
    `live_workers` (the registry's `live`) come from the store, and `capacity_seen` (the
    registry's) hears of a worker's capacity that a reservation found lower than this replica's
    view. `queued(model)` says whether this replica holds writes of a model
    that Redis has not had yet (its registry may lack the model: a lease of it is not checked
    against the registry then). `runner` computes plan choices over capped plan maps off the
    event loop (None: inline, for callers without one)."""

    def __init__(
        self,
        settings: Settings,
        metrics: PlannerMetrics,
        link: RedisLink,
        keys: Keys,
        candidates_for: CandidatesFor,
        live_workers: LiveWorkers,
        capacity_seen: CapacitySeen | None = None,
        queued: Callable[[str], bool] | None = None,
        runner: PlanRunner | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.link = link
        self.keys = keys
        self.book = LeaseBook(link, keys.base, settings.lease_ttl_s, settings.max_leases, settings.rho_max)
        self.candidates_for = candidates_for
        self.live_workers = live_workers
        self.capacity_seen = capacity_seen
        self.queued = queued
        self.runner = runner
        self.view = LeaseView(self.book, metrics, live_workers, settings.refresh_s, settings.max_leases)
        self.chooser = PlanChooser(settings.rho_max, settings.switch_margin, settings.lease_drift)

    # ---- life cycle and the view ------------------------------------------------------------------
    async def start(self) -> None:
        """Read the reservations once and start the view's refresh loop (`LeaseView.start`)."""
        await self.view.start()

    async def close(self) -> None:
        """Stop the view's refresh loop."""
        await self.view.close()

    async def refresh(self) -> None:
        """Re-read the reservations and set the fleet gauges (`LeaseView.refresh`)."""
        await self.view.refresh()

    @property
    def lease_count(self) -> int:
        """The lease count as of the view's last refresh."""
        return self.view.lease_count

    def leased(self, worker: str) -> tuple[float, int]:
        """(Σ f_j·e_j, lease count) on `worker`, from this replica's view. O(1)."""
        return self.view.leased(worker)

    def by_lease_load(self, workers: Sequence[Worker]) -> list[tuple[Worker, float]]:
        """`workers`, the one the leases load least first, each with that edge load
        ℓe = min(0.95, Σ f_j·e_j / N_w), from this replica's view, ranked by `load_order` (as
        `dapdee.fleet.assign.plan_for_device` orders workers; equals keep their order). What a
        plan against one worker (a baseline, confidence exits) is priced at. O(w log w)."""
        order = {w.url: load_order(w, self.leased(w.url)[0]) for w in workers}
        return [(w, order[w.url][0]) for w in sorted(workers, key=lambda w: order[w.url])]

    def _others(
        self, candidates: Sequence[Candidate], device_id: str | None, fresh: dict[str, float]
    ) -> dict[str, float]:
        """Per candidate worker, what the devices other than `device_id` reserve there: `fresh`'s
        figure where it names the worker, else this replica's view's. O(candidates)."""
        return self.view.others_on((c.worker.url for c in candidates), device_id, fresh)

    async def _chosen(self, candidates: Sequence[Candidate], fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`, a plan choice over `candidates`: inline when every plan map is exact,
        else on the runner's threads under the plan budget (PlanOverBudget past it). O(fn)."""
        exact = all(c.planmap.exact for c in candidates)
        return fn(*args) if self.runner is None else await self.runner.run(exact, fn, *args)

    # ---- planning ---------------------------------------------------------------------------------
    async def plan(self, body: Any, candidates: Sequence[Candidate], edge_load: float | None) -> dict[str, Any]:
        """The plan for one request (a validated `PlanRequestBody`) over `candidates` (at least
        one), with a lease when it names a device. CapacityExceeded past the lease cap."""
        ask = Ask.of(body)
        if body.device_id is None:  # reserves nothing: its frame_rate is a requirement, not a booking
            others = self._others(candidates, None, {})
            dp = await self._chosen(candidates, self.chooser.exact, candidates, ask.req, None, others, edge_load)
            self.metrics.admissions.labels("unleased").inc()
            return dp.plan
        view, record = self.view.as_seen(body.device_id, (c.worker.url for c in candidates))
        return await self._lease(ask, candidates, record, view, edge_load)

    async def lease_without_worker(self, body: Any, plan: dict[str, Any]) -> dict[str, Any]:
        """A named device of a model no worker serves: its plan reserves nothing, but the lease is
        recorded (GET /devices/{id}, the lease count, a later rebalance may bring it onto a worker)."""
        dp = DevicePlan(plan, None, 0.0, 0.0)
        return await self._reserve(Ask.of(body), [], dp, False, None, {}, body.edge_load, None)

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
        dp, assigned = await self._chosen(
            candidates, self.chooser.choose, record, ask, candidates, view.others, edge_load
        )
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
        Device-Only (always admissible). A worker whose last heartbeat no longer lists the model
        (it left after this replica read the registry): plan again without it. Returns the plan
        JSON with its `lease`."""
        body = ask.body
        stored = False
        refusals = 0
        while True:
            load = body.frame_rate * dp.edge_ms_per_frame
            limit = self.settings.rho_max * capacity_of(candidates, dp.worker)
            record = self._record(ask, candidates, dp, assigned, anchor)
            model = "" if self.queued is not None and self.queued(body.model) else body.model
            try:
                res = await self.book.reserve(body.device_id, dp.worker, load, limit, record, view, model)
            except RedisUnavailable:  # answered expires_in_s 0; a timed-out reservation may still land
                self.metrics.admissions.labels("unstored").inc()
                break
            if res.status == "gone":  # no lease outlives a delete; Retry-After: Redis may have lost it
                raise ApiProblem(404, _gone(body.model), headers={"Retry-After": "1"})
            if res.status == "stale":
                dp, assigned, others, anchor = await self._after_stale(ask, candidates, res, edge_load)
                view = None  # the figures adopted are Redis's: the next reservation checks admission only
                continue
            if res.status == "departed":  # this replica's registry is behind: the worker takes no one
                assert dp.worker is not None
                dp, assigned = await self._without(ask, candidates, dp.worker, others, edge_load), False
                continue
            if res.status == "full":
                self.metrics.admissions.labels("full").inc()
                raise CapacityExceeded("leases", self.settings.max_leases)
            if res.status == "reserved":
                stored = True
                self.view.note(body.device_id, dp.worker, load)
                self.view.remember(body.device_id, record, res.tag)
                self.metrics.admissions.labels("device_only" if dp.worker is None else "reserved").inc()
                break
            assert dp.worker is not None
            refusals, assigned = refusals + 1, False
            give_up = refusals >= RETRIES
            candidates, dp = await self._after_refusal(ask, candidates, dp.worker, res, others, give_up, edge_load)
        return self._answer(body, dp, assigned, stored)

    async def _after_stale(
        self, ask: Ask, candidates: Sequence[Candidate], res: Reservation, edge_load: float | None
    ) -> tuple[DevicePlan, bool, dict[str, float], dict[str, Any] | None]:
        """The device planned again after its reservation found this replica's view of the leases
        out of date: from Redis's figures (`res.figures`, adopted into the view) and the record
        Redis holds. Returns (plan, assigned, the others' reservations, the recorded request)."""
        assert res.figures is not None
        self.metrics.admissions.labels("stale").inc()
        others = self.view.adopt(res.figures, ask.body.device_id)
        held = res.figures.record.fields if res.figures.record is not None else None
        fresh = self._others(candidates, ask.body.device_id, others)
        dp, assigned = await self._chosen(candidates, self.chooser.choose, held, ask, candidates, fresh, edge_load)
        return dp, assigned, others, held["request"] if held is not None else None

    async def _without(
        self, ask: Ask, candidates: Sequence[Candidate], worker: str, others: dict[str, float], edge_load: float | None
    ) -> DevicePlan:
        """The device planned again without `worker`, whose last heartbeat no longer lists the
        model (the reservation answered "departed": it left after this replica read the
        registry): taken as full (`others` is updated), so another worker's plan or Device-Only."""
        self.metrics.admissions.labels("departed").inc()
        others[worker] = math.inf
        return await self._exact(ask, candidates, others, edge_load)

    async def _after_refusal(
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
        return candidates, await self._exact(ask, candidates, ahead, edge_load)

    async def _exact(
        self, ask: Ask, candidates: Sequence[Candidate], ahead: dict[str, float], edge_load: float | None
    ) -> DevicePlan:
        """The device's exact plan over `candidates`, the others' reservations on each worker taken
        from `ahead` where it names the worker (else this replica's view): what a re-plan after a
        refused or departed reservation reserves. A plan choice."""
        fresh = self._others(candidates, ask.body.device_id, ahead)
        return await self._chosen(
            candidates, self.chooser.exact, candidates, ask.req, ask.body.frame_rate, fresh, edge_load
        )

    def _answer(self, body: Any, dp: DevicePlan, assigned: bool, stored: bool) -> dict[str, Any]:
        """The plan JSON with its `lease` (`expires_in_s` 0 when the lease could not be stored)."""
        plan = dict(dp.plan)
        expires = self.settings.lease_ttl_s if stored else 0.0
        record = {"worker": dp.worker, "frames_per_s": body.frame_rate, "edge_ms_per_frame": dp.edge_ms_per_frame}
        plan["lease"] = self._lease_json(body.device_id, body.model, record, expires, assigned, stored)
        return plan

    def _lease_json(
        self,
        device_id: str,
        model: str,
        record: dict[str, Any],
        expires_in_s: float,
        assigned: bool,
        stored: bool = True,
    ) -> dict[str, Any]:
        """The `lease` object of an answer (lease.schema.json): what `record` reserves, expiring in
        `expires_in_s` (0 when not `stored`), re-planned after `replan_after_s`, never past the
        expiry of a stored lease. O(1)."""
        replan = self.settings.replan_after_s
        return {
            "device_id": device_id,
            "model": model,
            "worker": record.get("worker"),
            "frames_per_s": record["frames_per_s"],
            "edge_ms_per_frame": record["edge_ms_per_frame"],
            "expires_in_s": expires_in_s,
            "replan_after_s": min(replan, expires_in_s) if stored else replan,
            "assigned": assigned,
        }

    def _record(
        self,
        ask: Ask,
        candidates: Sequence[Candidate],
        dp: DevicePlan,
        assigned: bool,
        anchor: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """The lease record `dp` is reserved with, naming the content hash of the graph it was
        planned on (the plan map of its worker, or for Device-Only of the worker its plan names:
        the graph, its device and edge timings; None without candidates). O(candidates)."""
        body = ask.body
        url = dp.worker if dp.worker is not None else dp.plan.get("edge_worker")
        planned_on = next((c for c in candidates if c.worker.url == url), candidates[0] if candidates else None)
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
            "graph_hash": planned_on.planmap.graph_hash if planned_on is not None else None,
        }

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
        assigned = bool(record.get("assigned"))
        return {
            "device_id": device_id,
            "model": record["model"],
            "lease": self._lease_json(device_id, record["model"], record, round(ttl, 3), assigned),
            "plan": record["plan"],
            "assigned": assigned,
        }

    async def release(self, device_id: str) -> bool:
        """End the device's lease. False if it had none (always, without Redis)."""
        if not self.link.enabled:
            return False
        ended = await self.book.release(device_id)
        self.view.forget(device_id)
        return ended

    async def end_model(self, model: str) -> int:
        """End every lease of `model` (deleted), so what they reserved is free at once rather
        than at their expiry: one atomic step in Redis (`LeaseBook.end_model`), so a rebalance
        applying meanwhile either rewrote the record first (it still names the model: ended) or
        is refused after; nothing ends if the model was created again meanwhile. Returns how many
        ended (0 without Redis; RedisUnavailable passes up). One round trip, and a refresh."""
        if not self.link.enabled:
            return 0
        ended = await self.book.end_model(model, self.keys.models)
        for device in ended:
            self.view.forget(device)
        if ended:
            await self.refresh()
        return len(ended)


def _gone(model: str) -> str:
    """The detail of a lease refused because `model` is not in Redis's model registry: deleted
    while the request was planned, or Redis lost its state (this replica writes its models back
    at its next refresh, so the device is told to retry rather than that the model is unknown)."""
    return (
        f"model {model!r} is not in the planner's model registry: deleted, or Redis lost its state and "
        "the planner is writing it back; retry"
    )
