"""POST /plan: the plan JSON of DESIGN.md for one device's conditions, plus the edge worker to use.

An ordinary route (the guard, dependencies and exception handlers run as for every route). For
speed it validates the raw body in one pydantic-core pass (`model_validate_json`) and answers
bytes; FastAPI's own body handling would parse the JSON twice."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic_core import to_json

from dapdee.api.planner import PLAN_REQUEST_EXAMPLE, PlanAnswer, PlanRequestBody
from dapdee.planner import spans
from dapdee.planner.deps import PlanningDep
from dapdee.planner.errors import CapacityExceeded, MapBuildPending, ModelUnreachable
from dapdee.planner.json_body import validated
from dapdee.planner.plan_choice import Candidate, usable
from dapdee.planner.plan_runner import PlanOverBudget, PlanRunner
from dapdee.planner.planmaps import NoConfidenceExits
from dapdee.planner.problems import MISSING_TIMINGS, PLAN_BUDGET, ApiProblem
from dapdee.planner.store import MissingTimings, ModelState, Profile, Store, Worker
from dapdee.planning import PlanMap, PlanRequest, baseline_plan
from dapdee.web import otel
from dapdee.web.security import DEVICE, require

router = APIRouter(tags=["plan"])

REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": PlanRequestBody.model_json_schema(), "example": PLAN_REQUEST_EXAMPLE}
        },
    }
}


@router.post(
    "/plan",
    response_model=PlanAnswer,
    dependencies=[require(DEVICE)],
    openapi_extra=REQUEST_BODY,
    responses={
        404: {"description": "unknown model"},
        409: {"description": "timings missing: the detail says which profile to upload"},
        422: {"description": "a field missing, unknown or out of range (named in `errors`)"},
        503: {"description": "the plan needed min-cuts that ran past the plan budget (Retry-After)"},
    },
)
async def plan(request: Request, planning: PlanningDep) -> Response:
    """Plan for one device: exact under the cost model (else `approximate: true`). Device timings:
    the `device_tier` profile, else the cost graph's own; edge timings: each live worker's tier
    profile, else the cost graph's own; the edge load (unless the request gives `edge_load`) is
    what the other devices' leases reserve on a worker, and a `device_id` makes the plan hold a
    lease of its own (docs/DESIGN.md, "The shared edge"). A cached exact plan map answers inline
    in microseconds; a plan that needs min-cuts runs in a thread under the plan budget (503 past
    it)."""
    t0 = time.perf_counter()
    mode, outcome = "auto", "error"
    try:
        body = validated(PlanRequestBody, await request.body())
        mode = body.mode
        tracing = otel.recording()  # None unless this request's trace is exported
        if tracing is None:
            result = await _answer(planning.store, planning.runner, body)
        else:
            with tracing.span(otel.PLANNER, spans.request_attributes(body.model, body.mode)) as span:
                result = await _answer(planning.store, planning.runner, body)
                span.set_attributes(spans.plan_attributes(result))
        mode = result["mode"]
        outcome = "ok" if result["constraints_met"] else "constraints_unmet"
        return Response(to_json(result, inf_nan_mode="null"), media_type="application/json")
    except MapBuildPending as exc:  # waited for a plan map as long as a request may (`_map_deadline`)
        outcome = "over_budget"
        raise ApiProblem(503, str(exc), PLAN_BUDGET, {"Retry-After": "1"}) from None
    except Exception as exc:
        outcome = _outcome(exc)
        raise
    finally:
        planning.metrics.plans.labels(mode, outcome).inc()
        planning.metrics.plan_duration.observe(time.perf_counter() - t0)


async def _answer(store: Store, runner: PlanRunner, body: PlanRequestBody) -> dict[str, Any]:
    """The plan JSON for a validated request: model and profiles from the store (process memory
    once cached), then by what the request asks — a baseline, a confidence-exit plan, or
    DAPDEE's plan over the live workers and the other devices' leases (with a lease of its own
    when it names a device); over the workers it does not ask to avoid (`usable`)."""
    st = await store.model_cache.get(body.model)
    if st is None:
        raise ApiProblem(404, f"unknown model {body.model!r}; upload its cost graph with PUT /models/{body.model}")
    st, dev = await _device_profile(store, st, body)
    if body.device_id is not None and not store.settings.fleet_planning:
        raise ApiProblem(
            422, "device_id: leases are off on this planner (DAPDEE_FLEET_PLANNING=false)", loc=("body", "device_id")
        )
    serving = store.registry.serving(body.model)
    workers, avoided = usable(serving, body.avoid_workers)
    if avoided != body.avoid_workers:  # a lease records the workers actually left out
        body = body.model_copy(update={"avoid_workers": avoided})
    if body.baseline is not None or body.confidence_exits or not store.settings.fleet_planning or not workers:
        return await _single_worker(store, runner, body, st, dev, workers, serving)
    candidates, body = await _candidates(store, body, st, dev, workers, serving)
    try:
        return await store.fleet.plan(body, candidates, body.edge_load)
    except PlanOverBudget as exc:  # a choice over a capped plan map: min-cuts past the budget
        raise ApiProblem(503, str(exc), PLAN_BUDGET, {"Retry-After": "1"}) from None


async def _candidates(
    store: Store,
    body: PlanRequestBody,
    st: ModelState,
    dev: Profile | None,
    workers: list[Worker],
    serving: list[Worker],
) -> tuple[list[Candidate], PlanRequestBody]:
    """`CandidateFinder.among` over `workers` (those the device does not avoid); when none of them
    has its timings, over every live worker `serving` the model (as when the device avoids
    every live worker, `usable`: the avoided ones are all it can use), the lease then recording
    none avoided. 409 (missing timings) when no worker has them. O(workers) map look-ups."""
    until = _map_deadline(store)
    try:
        return await store.candidates.among(body.model, st, dev, workers, until), body
    except MissingTimings as exc:
        if len(workers) == len(serving):
            raise ApiProblem(409, str(exc), MISSING_TIMINGS) from None
    try:
        every = await store.candidates.among(body.model, st, dev, serving, until)
    except MissingTimings as exc:
        raise ApiProblem(409, str(exc), MISSING_TIMINGS) from None
    return every, body.model_copy(update={"avoid_workers": []})


async def _single_worker(
    store: Store,
    runner: PlanRunner,
    body: PlanRequestBody,
    st: ModelState,
    dev: Profile | None,
    workers: list[Worker],
    serving: list[Worker],
) -> dict[str, Any]:
    """A plan against one worker (`_priced_map`; none: the graph's own edge timings): for
    baselines, confidence exits, a planner without fleet planning, or a model no worker serves
    (then a named device holds a lease on no worker)."""
    kept = {w.url for w in workers}
    order = _price_order(store, body, workers) + _price_order(store, body, [w for w in serving if w.url not in kept])
    worker, edge_load, pm = await _priced_map(store, body, st, dev, order)
    req = PlanRequest(
        bandwidth_mbps=body.bandwidth_mbps,
        rtt_ms=body.rtt_ms,
        device_load=body.device_load,
        edge_load=edge_load,
        latency_budget_ms=body.latency_budget_ms,
        min_accuracy=body.min_accuracy,
        frame_rate=body.frame_rate,
        mode=body.mode,
        confidence_exits=body.confidence_exits,
    )
    try:
        if body.baseline is not None:
            result = await runner.call(baseline_plan, pm.graph, req, body.baseline)
        else:
            result = await runner.plan(pm, req)
    except PlanOverBudget as exc:
        raise ApiProblem(503, str(exc), PLAN_BUDGET, {"Retry-After": "1"}) from None
    except ValueError as exc:  # the request's numbers (bounded above, so not expected)
        raise ApiProblem(422, str(exc)) from None
    result["edge_worker"] = worker.url if worker is not None else None
    if body.device_id is not None:  # no worker serves the model: a lease reserving nothing
        result = await store.fleet.lease_without_worker(body, result)
    return result


def _map_deadline(store: Store) -> float:
    """How long a request waits for a plan map not in memory (a `time.monotonic()` value): a
    map's build budget plus a plan's, since a build may overrun its own (the indexing of a very
    large graph) and a request must not wait for it (MapBuildPending: 503)."""
    return time.monotonic() + store.settings.planmap_build_budget_s + store.settings.plan_budget_s


async def _priced_map(
    store: Store, body: PlanRequestBody, st: ModelState, dev: Profile | None, order: list[tuple[Worker, float]]
) -> tuple[Worker | None, float, PlanMap]:
    """The worker a plan against one worker uses, the edge load it is priced at, and its plan
    map: the first of `order` (the workers the device does not avoid, then the avoided ones,
    each in `_price_order`) whose timings are complete (`CandidateFinder.timed`); no live worker: the
    graph's own edge timings, at load 0. 409 (the first worker's missing timings) when none has
    them; 422 for confidence exits the graph lacks. A map look-up per worker tried."""
    until, loads = _map_deadline(store), {w.url: load for w, load in order}
    try:
        if not order:
            pm = await store.planmaps.get(body.model, st, dev, None, progressive=body.confidence_exits, until=until)
            return None, body.edge_load if body.edge_load is not None else 0.0, pm
        timed = store.candidates.timed(body.model, st, dev, [w for w, _ in order], body.confidence_exits, until)
        try:
            first = await anext(timed)  # the first with timings is the one: no further maps
        finally:
            await timed.aclose()
    except MissingTimings as exc:
        raise ApiProblem(409, str(exc), MISSING_TIMINGS) from None
    except NoConfidenceExits as exc:
        raise ApiProblem(422, str(exc), loc=("body", "confidence_exits")) from None
    return first.worker, loads[first.worker.url], first.planmap


def _price_order(store: Store, body: PlanRequestBody, workers: list[Worker]) -> list[tuple[Worker, float]]:
    """`workers` in the order a plan against one worker prefers them, each with the edge load it
    is priced at (the request's `edge_load` when it gives one): with fleet planning, the least
    loaded by the other devices' leases first, at that load ℓe (`Fleet.by_lease_load`), as a
    DAPDEE plan is priced (such a plan holds no lease and takes no admission test); without, by
    heartbeat load (the registry's order), at that load. O(w log w)."""
    ranked = store.fleet.by_lease_load(workers) if store.settings.fleet_planning else [(w, w.load) for w in workers]
    return [(w, body.edge_load if body.edge_load is not None else load) for w, load in ranked]


async def _device_profile(store: Store, st: ModelState, body: PlanRequestBody) -> tuple[ModelState, Profile | None]:
    """The model (re-read from Redis once when this replica lacks the tier) and its `device_tier`
    profile (None without a tier); 409 naming the upload when it is missing or not a device one."""
    if body.device_tier is None:
        return st, None
    dev = st.profiles.get(body.device_tier)
    if dev is None:  # maybe just uploaded through another replica
        st = await store.model_cache.refresh(body.model) or st
        dev = st.profiles.get(body.device_tier)
    if dev is None or dev.kind != "device":
        what = "no profile" if dev is None else f"a {dev.kind} profile, not a device profile,"
        raise ApiProblem(
            409,
            f"model {body.model!r} has {what} for device_tier {body.device_tier!r}; upload it with "
            f'PUT /models/{body.model}/profiles/{body.device_tier} {{"kind": "device", "timings_ms": {{...}}}}',
            MISSING_TIMINGS,
        )
    return st, dev


def _outcome(exc: Exception) -> str:
    """The metrics label of a failed plan request, as it was answered: the store's refusals by
    their type (the app answers them, `dapdee.planner.app`), the route's own by status."""
    if isinstance(exc, RequestValidationError):
        return "invalid"
    if isinstance(exc, CapacityExceeded):
        return "lease_cap"  # 409: the planner holds DAPDEE_MAX_LEASES leases
    if isinstance(exc, ModelUnreachable):
        return "unavailable"  # 404 + Retry-After: the model cannot be read while Redis is away
    if isinstance(exc, MissingTimings):
        return "missing_timings"
    status = getattr(exc, "status_code", 500)
    return {404: "unknown_model", 409: "missing_timings", 422: "invalid", 503: "over_budget"}.get(status, "error")
