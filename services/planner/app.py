"""The planner FastAPI app: `create_app(settings)`; the lifespan owns the Redis client and store."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dapdee.planner.config import Settings
from dapdee.planner.deps import validation_body
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.routers import models, ops, plan, workers
from dapdee.planner.store import Store

_BODY_METHODS = ("POST", "PUT", "PATCH")


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`: refused up front from Content-Length, and cut
    off while streaming when the announced size lies or is absent (chunked). Pure ASGI, so
    bodiless requests pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    await _send_json(send, 400, {"detail": "Content-Length: not an integer"})
                    return
                if n > limit:
                    await _send_json(
                        send, 413, {"detail": f"request body of {n} bytes exceeds the limit of {limit} bytes"}
                    )
                    return
                break
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return msg

        await self.app(scope, limited, send)


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def create_app(settings: Settings | None = None) -> FastAPI:
    """A planner app for `settings` (default: from the environment). Its lifespan starts the
    store (Redis client, model load, refresh loop) and closes it on shutdown."""
    settings = settings or Settings()
    metrics = PlannerMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings, metrics)
        app.state.store = store
        metrics.bind(lambda: store.live_worker_count(), lambda: len(store.models))
        await store.start()
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(
        title="DAPDEE planner",
        version="1.0",
        summary="Where to cut a DNN between device and edge, and which early exit to take.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(plan.PlanFastPath, fastapi_app=app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)  # outermost

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Any:
        # 422s raised by the routes (names, cost graphs) use the documented validation shape,
        # {"detail": [{"type", "loc", "msg"}]}, like FastAPI's own 422s; others keep theirs
        if exc.status_code == 422 and isinstance(exc.detail, str):
            body = {"detail": [{"type": "value_error", "loc": ["body"], "msg": exc.detail, "input": None}]}
            return Response(json.dumps(body), 422, media_type="application/json", headers=exc.headers)
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        if request.url.path == "/plan":
            metrics.plans.labels("auto", "invalid").inc()
        return Response(validation_body(exc.errors()), 422, media_type="application/json")

    for r in (plan.router, models.router, workers.router, ops.router):
        app.include_router(r)
    return app
