"""Liveness, readiness and Prometheus metrics: public (no token), outside the concurrency limit."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from dapdee.api.planner import Health, Readiness
from dapdee.planner.deps import MetricsDep, StoreDep
from dapdee.web.prometheus import METRICS_RESPONSES
from dapdee.web.security import PUBLIC, require

router = APIRouter(tags=["ops"], dependencies=[require(PUBLIC)])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"description": "the store has not started"}})
async def readyz(store: StoreDep) -> JSONResponse:
    """Ready to plan: the store started. Redis being away does not make the planner unready
    (it plans from its in-process cache); the answer says how Redis is."""
    body = Readiness(ready=store.started, redis=store.link.state, pending_writes=store.model_sync.pending_count)
    return JSONResponse(body.model_dump(), status_code=200 if store.started else 503)


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text exposition: this app's metrics, or under `--workers N` every worker
    process's merged (read from their files off the event loop)."""
    body = m.exposition() if m.shared_dir is None else await asyncio.to_thread(m.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
