"""The edge worker FastAPI app: Open Inference Protocol v2 REST over the split executor.

`create_app(settings, models)` builds the app; its lifespan loads the models (unless given),
starts the batcher's thread pool and the planner registration task, and closes them on
shutdown. Run it with `dapdee serve edge` or `uvicorn --factory dapdee.edge_worker.app:app_from_env`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dapdee.edge_worker.batching import Batcher
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.deps import ApiError, ModelEntry, WorkerState
from dapdee.edge_worker.metrics import EdgeMetrics
from dapdee.edge_worker.registration import run_registration
from dapdee.edge_worker.routers import health, v2
from dapdee.models import LoadedModel, load_model, parse_spec, read_manifest

log = logging.getLogger("dapdee.edge")


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
            if (
                given is not None
                and not given.options
                and (given.kind, given.target) == (trained.kind, trained.target)
            ):
                spec = ""  # `zoo:resnet18@dir`: the artifact pins the options
            loaded = load_model(spec, weights=artifact)
        if any(m.name == loaded.name for m in out):
            raise ValueError(f"models: two models are named {loaded.name!r}")
        out.append(loaded)
    return out


def _warm_up(models: list[LoadedModel]) -> None:
    """One whole-model run each, so the first request does not pay for lazy initialisation."""
    for m in models:
        with torch.inference_mode():
            m.gm(m.example_input())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(settings: Settings | None = None, models: list[LoadedModel] | None = None) -> FastAPI:
    """The worker app. `models` given: serve those; else load `settings.models` at start-up."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        loaded = models if models is not None else await asyncio.to_thread(load_models, settings)
        await asyncio.to_thread(_warm_up, loaded)
        metrics = EdgeMetrics()

        def on_batch(model: str, size: int, compute_s: float) -> None:
            metrics.batch_size.labels(model).observe(size)
            metrics.compute_duration.labels(model).observe(compute_s)

        batcher = Batcher(
            settings.batch_max, settings.batch_wait_ms, settings.workers, settings.slowdown, on_batch
        )
        entries = {m.name: ModelEntry.of(m) for m in loaded}
        for name, e in entries.items():
            metrics.model_info.labels(name).info(
                {
                    "spec": e.loaded.spec,
                    "exits": ",".join(x.name for x in e.graph.exits),
                    "input_shape": "x".join(map(str, e.graph.input.shape)),
                    "tier": settings.tier,
                }
            )
        state = WorkerState(settings, entries, batcher, metrics, ready=True)
        app.state.worker = state
        task = None
        if settings.planner_url:
            public = settings.public_url or f"http://{settings.host}:{settings.port}"
            task = asyncio.create_task(run_registration(state, public))
        log.info("edge worker ready: models %s, tier %s", sorted(entries), settings.tier)
        try:
            yield
        finally:
            state.ready = False
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await asyncio.to_thread(batcher.close)
            app.state.worker = None

    app = FastAPI(title="DAPDEE edge worker", version="0.1.0", lifespan=lifespan)
    app.state.worker = None

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error(
            422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid request')}"
        )

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    app.include_router(health.router)
    app.include_router(v2.router)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory dapdee.edge_worker.app:app_from_env` (settings from the env)."""
    return create_app(Settings())
