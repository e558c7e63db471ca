"""The edge worker FastAPI app: Open Inference Protocol v2 REST over the split executor.

`create_app(settings, models)` builds the app; its lifespan loads the models (unless given),
derives each model's request limits, starts the batcher's thread pool and the planner
registration task, and closes them on shutdown. The shared `AccessLog` is its outermost
middleware (the request's trace context, one log record per request, refusals included), then
the shared `RequestGuard`: role tokens, the per-model body limit, the body read timeout and the
concurrency limit are checked before anything is parsed (an infer to a model the worker does not
serve is a 404 before its body is read), and refusals are OIP's `{"error": ...}`. Run it with
`dapdee serve edge` or `uvicorn --factory dapdee.edge_worker.app:app_from_env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from dapdee.edge_worker import openapi
from dapdee.edge_worker.batching import Batcher
from dapdee.edge_worker.capacity import CapacityMeter, thread_cpu_clock
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.deps import ApiError, ModelEntry, WorkerState, unknown_model
from dapdee.edge_worker.metrics import UNKNOWN, EdgeMetrics
from dapdee.edge_worker.registration import announce_departure, run_registration
from dapdee.edge_worker.routers import health, v2
from dapdee.models import LoadedModel, load_model, parse_spec, read_manifest
from dapdee.web.access_log import AccessLog
from dapdee.web.guard import ROUTE_SCOPE_KEY, RouteAccess, install_request_guard
from dapdee.web.http_head import BoundedHeadProtocol
from dapdee.web.otel import Tracing, tracer
from dapdee.web.tasks import stop_task

log = logging.getLogger("dapdee.edge")
# the infer routes' path templates, as the router declares them
INFER_ROUTES = frozenset(
    r.path for r in v2.router.routes if getattr(r, "endpoint", None) in (v2.infer, v2.infer_version)
)
OTHER_BODY_BYTES = 64 << 10  # the body limit of any other request (the worker reads no other body)


def load_models(settings: Settings) -> list[LoadedModel]:
    """Load every `SPEC[@ARTIFACT_DIR]` of `settings.models` (untrained ones with a warning).
    Raises ModelError (a ValueError) naming the bad spec or artifact."""
    out: list[LoadedModel] = []
    for spec, artifact in settings.model_entries():
        if artifact is None:
            loaded = load_model(spec)
            log.warning("model %s (%s): no artifact given, serving untrained weights", loaded.name, spec)
        else:
            manifest = read_manifest(artifact)
            given = parse_spec(spec) if spec else None
            trained = parse_spec(manifest["model"])
            same = given is not None and (given.kind, given.target) == (trained.kind, trained.target)
            if same and given.kind == "zoo" and not given.options:
                spec = ""  # `zoo:resnet18@dir`: the artifact pins the options (an import spec stays named)
            loaded = load_model(spec, weights=artifact)
        out.append(loaded)
    check_unique_names(out)
    return out


def check_unique_names(models: list[LoadedModel]) -> None:
    """ValueError naming a model name given twice (the routes serve one model per name: the
    other would be silently dropped). O(models)."""
    seen: set[str] = set()
    for m in models:
        if m.name in seen:
            raise ValueError(f"models: two models are named {m.name!r}")
        seen.add(m.name)


def _warm_up(models: list[LoadedModel]) -> None:
    """One whole-model run each, so the first request does not pay for lazy initialisation."""
    for m in models:
        with torch.inference_mode():
            m.gm(m.example_input())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def render_error(status: int, message: str) -> tuple[bytes, str]:
    """OIP's error object for the guard's refusals: `{"error": message}` as JSON."""
    return json.dumps({"error": message}).encode(), "application/json"


class OipHeadProtocol(BoundedHeadProtocol):
    """The bounded request head (`BoundedHeadProtocol`) answering its 408 and 431 with OIP's
    error object, like every other edge error; uvicorn's `http` for the edge worker."""

    render = render_error


def _entries(settings: Settings, loaded: list[LoadedModel]) -> dict[str, ModelEntry]:
    """Warm each model up and index it with its request limits. Blocking."""
    _warm_up(loaded)
    return {m.name: ModelEntry.of(m, settings.max_batch_rows, settings.max_body_bytes) for m in loaded}


def _worker_state(settings: Settings, entries: dict[str, ModelEntry]) -> WorkerState:
    """Metrics (model info filled in), the batcher and the capacity meter for the served
    models. Call it on the event loop's thread (the meter times that thread's CPU)."""
    metrics = EdgeMetrics()

    def on_batch(model: str, size: int, compute_s: float) -> None:
        metrics.batch_size.labels(model).observe(size)
        metrics.compute_duration.labels(model).observe(compute_s)
        metrics.compute_busy.inc(compute_s)

    s = settings
    batcher = Batcher(
        s.batch_max, s.batch_wait_ms, s.max_batch_rows, s.workers, s.slowdown, on_batch, starve_ms=s.batch_starve_ms
    )
    metrics.compute_slots.set(s.workers)
    for name, e in entries.items():
        exits = ",".join(x.name for x in e.graph.exits)
        shape = "x".join(map(str, e.graph.input.shape))
        info = {"spec": e.loaded.spec, "exits": exits, "input_shape": shape, "tier": s.tier}
        metrics.model_info.labels(name).info(info)
    meter = CapacityMeter(
        settings.capacity_window_s,
        settings.capacity_min_ms,
        settings.capacity_max_factor,
        settings.capacity_hysteresis,
        settings.capacity_raise_after_s,
        outside=thread_cpu_clock(),  # called from the lifespan: the event loop's thread, where HTTP work runs
    )
    profiling = settings.planner_url is not None  # the registration task profiles first
    return WorkerState(settings, entries, batcher, metrics, ready=True, profiling=profiling, capacity=meter)


Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


def _lifespan(settings: Settings, models: list[LoadedModel] | None) -> Lifespan:
    """Start-up: load (unless given) and index the models, start the batcher and the planner
    registration (ready once it has profiled the models); shutdown: not ready, stop
    registering, tell the planner the worker is leaving (`announce_departure`), drain the
    batcher."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = models if models is not None else await asyncio.to_thread(load_models, settings)
        state = _worker_state(settings, await asyncio.to_thread(_entries, settings, loaded))
        app.state.worker = state
        task = None
        if settings.planner_url:
            task = asyncio.create_task(run_registration(state, settings.advertised_url()))
        log.info(
            "edge worker %s: models %s, tier %s",
            "up, ready once profiled" if state.profiling else "ready",
            sorted(state.models),
            settings.tier,
        )
        try:
            yield
        finally:
            state.ready = False
            if task is not None:
                await stop_task(task)
                await announce_departure(state, settings.advertised_url())
            await state.batcher.aclose()
            app.state.worker = None

    return lifespan


def infer_model(scope: Scope) -> str | None:
    """The model a request names when the guard matched it to an infer route (its path
    parameter `model`), else None: only those get a model's body limit. O(1)."""
    routed: RouteAccess | None = scope.get(ROUTE_SCOPE_KEY)
    if routed is None or routed.route not in INFER_ROUTES:
        return None
    return dict(routed.params).get("model")


def _install_guard(app: FastAPI, settings: Settings) -> None:
    """The shared request guard, outermost: roles, an infer to a model the worker does not serve
    (404 before its body is read: it has no body limit of its own, and `OTHER_BODY_BYTES` would
    answer a real tensor 413), the per-model body limit (a model's derived limit on its infer
    routes, `OTHER_BODY_BYTES` elsewhere), the body read timeout and the concurrency limit,
    before anything is parsed; refusals counted by reason (`not_found`: that 404)."""

    def body_limit(scope: Scope) -> int:
        state: WorkerState | None = app.state.worker
        model = infer_model(scope)
        entry = state.models.get(model) if state is not None and model is not None else None
        return entry.limits.body_bytes if entry is not None else OTHER_BODY_BYTES

    def unserved(scope: Scope) -> tuple[int, str, str] | None:
        state: WorkerState | None = app.state.worker
        model = infer_model(scope)
        if state is None or model is None or model in state.models:
            return None
        exc = unknown_model(state, model)
        state.metrics.requests.labels(UNKNOWN, UNKNOWN, str(exc.status)).inc()  # as the route counts it
        return exc.status, "not_found", exc.message

    def on_reject(reason: str, route: str) -> None:  # by reason only: infer is nearly every request
        state: WorkerState | None = app.state.worker
        if state is not None:
            state.metrics.rejected.labels(reason).inc()

    install_request_guard(app, settings, render_error, on_reject, body_limit=body_limit, before_body=unserved)


def _install_error_handlers(app: FastAPI) -> None:
    """Every 4xx/5xx as OIP's `{"error": message}`."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")


def create_app(
    settings: Settings | None = None, models: list[LoadedModel] | None = None, *, tracing: Tracing | None = None
) -> FastAPI:
    """The worker app. `models` given: serve those (ValueError for two of one name); else load
    `settings.models` at start-up.
    `tracing` (default: on when OTEL_EXPORTER_OTLP_ENDPOINT is set) exports a span per request."""
    settings = settings or Settings()
    if models is not None:
        check_unique_names(models)
    app = FastAPI(title="DAPDEE edge worker", version="0.1.0", lifespan=_lifespan(settings, models))
    app.state.worker = None
    app.state.tokens = settings.tokens()
    app.state.tracing = tracing if tracing is not None else tracer("edge")
    _install_guard(app, settings)
    # added after the guard, so it wraps it: refusals are logged and carry the traceparent too
    app.add_middleware(AccessLog, service="edge", tracing=app.state.tracing)
    _install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v2.router)
    openapi.install(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory dapdee.edge_worker.app:app_from_env` (settings from the env)."""
    return create_app(Settings())
