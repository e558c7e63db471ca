"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dapdee.planner.deps import MetricsDep, StoreDep

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(store: StoreDep) -> Any:
    """Ready to plan: the store started. Redis being away does not make the planner unready
    (it plans from its in-process cache); the answer says how Redis is."""
    body = {
        "ready": store.started,
        "redis": store.redis_state,
        "models": len(store.models),
        "pending_writes": len(store.pending),
    }
    return JSONResponse(body, status_code=200 if store.started else 503)


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
