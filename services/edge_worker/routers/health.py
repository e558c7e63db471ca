"""Liveness, readiness, server metadata and Prometheus metrics.

Health status codes follow the KServe v2 protocol (kserve/kserve, docs/predict-api/v2/
required_api.md, "Health"): "The HTTP response status code indicates a boolean result for the
health request. A 200 status code indicates true and a 4xx status code indicates false. The HTTP
response body should be empty." Not ready is therefore 400 (as Triton answers), never a 5xx.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dapdee.api.oip import ErrorResponse, ServerMetadata
from dapdee.edge_worker.deps import get_state
from dapdee.web.prometheus import METRICS_RESPONSES
from dapdee.web.security import ANY_ROLE, PUBLIC, require

router = APIRouter(tags=["health"])
SERVER_NAME = "dapdee-edge"
SERVER_VERSION = "0.1.0"
READY, NOT_READY = 200, 400
HEALTH_RESPONSES = {READY: {"description": "true (empty body)"}, NOT_READY: {"description": "false (empty body)"}}
ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}}


def health_status(flag: bool) -> Response:
    """A v2 health answer: 200 for true, 400 for false, empty body."""
    return Response(status_code=READY if flag else NOT_READY)


@router.get("/v2/health/live", response_class=Response, responses=HEALTH_RESPONSES, dependencies=[require(PUBLIC)])
async def live() -> Response:
    """The server can receive and answer requests (Kubernetes livenessProbe)."""
    return health_status(True)


@router.get("/v2/health/ready", response_class=Response, responses=HEALTH_RESPONSES, dependencies=[require(PUBLIC)])
async def ready(request: Request) -> Response:
    """Every model is loaded (and profiled, when registering with a planner) and the worker is
    not draining (Kubernetes readinessProbe)."""
    state = getattr(request.app.state, "worker", None)
    return health_status(state is not None and state.is_ready())


@router.get("/v2", response_model=ServerMetadata, responses=ERRORS, dependencies=[require(ANY_ROLE)])
async def server_metadata(request: Request) -> ServerMetadata:
    """v2 server metadata, plus the served models and the worker's tier."""
    state = get_state(request)
    return ServerMetadata(
        name=SERVER_NAME,
        version=SERVER_VERSION,
        extensions=["binary_tensor_data", "model_parameters"],
        models=sorted(state.models),
        tier=state.settings.tier,
    )


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSES, dependencies=[require(PUBLIC)])
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the worker's own registry."""
    state = get_state(request)
    state.metrics.inflight.set(state.inflight)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
