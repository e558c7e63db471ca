"""The planner FastAPI app: `create_app(settings)`; the lifespan owns the store and the plan runner."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from dapdee.planner import openapi, problems
from dapdee.planner.config import Settings
from dapdee.planner.deps import Planning
from dapdee.planner.errors import CapacityExceeded, MissingTimings, ModelUnreachable, RedisRefused, VersionConflict
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.plan_runner import PlanRunner
from dapdee.planner.routers import devices, fleet, models, ops, plan, workers
from dapdee.planner.store import Store
from dapdee.web.access_log import AccessLog
from dapdee.web.guard import install_request_guard
from dapdee.web.otel import Tracing, tracer

REFUSED_RETRY_S = 5  # Retry-After of a write Redis refused: memory or a failover takes a while

log = logging.getLogger("dapdee.planner")


def create_app(settings: Settings | None = None, *, guard: bool = True, tracing: Tracing | None = None) -> FastAPI:
    """A planner app for `settings` (default: from the environment). Its lifespan starts the
    store and the plan runner and closes them on shutdown. `guard=False` leaves out the request
    guard (body limits, concurrency limit, early auth), for mounting behind another gateway:
    every route's own dependency still checks its roles. The guard's refusals are counted in
    `dapdee_planner_rejected_total` by route and reason."""
    settings = settings or Settings()
    metrics = PlannerMetrics()
    tokens = settings.tokens()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if tokens.open:
            log.warning(
                "planner runs OPEN: no token is configured (DAPDEE_ADMIN_TOKEN, DAPDEE_DEVICE_TOKEN, "
                "DAPDEE_WORKER_TOKEN or DAPDEE_API_TOKEN), so every route is callable without one"
            )
        runner = PlanRunner(settings.plan_threads, settings.plan_budget_s, metrics.offloaded_plans.inc)
        store = Store(settings, metrics, runner)
        app.state.store, app.state.plan_runner = store, runner
        app.state.planning = Planning(store, metrics, runner)
        metrics.bind(lambda: store.registry.count(), lambda: len(store.model_cache.models))
        await store.start()
        try:
            yield
        finally:
            runner.close()
            await store.close()

    app = FastAPI(
        title="DAPDEE planner",
        version="1.0",
        summary="Where to cut a DNN between device and edge, and which early exit to take.",
        description=openapi.DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.tokens = tokens
    problems.install(app)
    _store_errors(app)
    for r in (plan.router, models.router, workers.router, devices.router, fleet.router, ops.router):
        app.include_router(r, responses=openapi.ERROR_RESPONSES)
    openapi.install(app)
    if guard:
        # each refusal counted in `rejected` by route and reason
        install_request_guard(
            app, settings, problems.render_refusal, lambda reason, route: metrics.rejected.labels(route, reason).inc()
        )
    # the access log wraps the guard (added after it): refusals are logged and carry the traceparent;
    # `tracing` (default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set) exports a span per request
    app.state.tracing = tracing if tracing is not None else tracer("planner")
    app.add_middleware(AccessLog, service="planner", tracing=app.state.tracing)
    return app


def _store_errors(app: FastAPI) -> None:
    """The store's refusals as 409 problems (a version conflict, a capacity limit, timings a plan
    needs that nobody uploaded), a 404 with Retry-After for a model that cannot be read while
    Redis is away (never a 5xx because Redis is away), and a 503 with Retry-After for a model
    write that Redis answered but refused (out of memory, read-only, busy: nothing changed)."""
    kinds: tuple[tuple[type[Exception], str], ...] = (
        (VersionConflict, problems.VERSION_CONFLICT),
        (CapacityExceeded, problems.CAPACITY),
        (MissingTimings, problems.MISSING_TIMINGS),
    )
    for exc_type, type_ in kinds:

        async def handler(request: Request, exc: Any, type_: str = type_) -> Response:
            return problems.problem_response(409, str(exc), type_)

        app.add_exception_handler(exc_type, handler)

    async def unreachable(request: Request, exc: Any) -> Response:
        return problems.problem_response(404, str(exc), headers={"Retry-After": "1"})

    app.add_exception_handler(ModelUnreachable, unreachable)

    async def refused(request: Request, exc: Any) -> Response:
        detail = f"not stored: Redis refused the write ({exc.reason}), so nothing changed; retry later"
        return problems.problem_response(503, detail, headers={"Retry-After": str(REFUSED_RETRY_S)})

    app.add_exception_handler(RedisRefused, refused)
