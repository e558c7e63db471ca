"""Liveness, readiness, server metadata and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dapdee.edge_worker.deps import get_state

router = APIRouter()
SERVER_NAME = "dapdee-edge"
SERVER_VERSION = "0.1.0"


@router.get("/v2/health/live", response_class=Response)
async def live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", response_class=Response)
async def ready(request: Request) -> Response:
    state = getattr(request.app.state, "worker", None)
    return Response(status_code=200 if state is not None and state.ready else 503)


@router.get("/v2")
async def server_metadata(request: Request) -> JSONResponse:
    state = get_state(request)
    return JSONResponse(
        {
            "name": SERVER_NAME,
            "version": SERVER_VERSION,
            "extensions": ["binary_tensor_data", "model_parameters"],
            "models": sorted(state.models),
            "tier": state.settings.tier,
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    state.metrics.inflight.set(state.inflight)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
