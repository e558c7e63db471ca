"""Open Inference Protocol v2 model endpoints: metadata, readiness and infer, each with and
without `/versions/{version}` (every model has version "1"; another version is 404).

Infer needs the device role; metadata and readiness any role (see the security model). The
request guard has already checked the token and read the body under the model's size limit (an
infer to a model the worker does not serve is answered 404 before that, by the guard: app.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request, Response

from dapdee.api.oip import ErrorResponse, InferRequest, InferResponse, ModelMetadata
from dapdee.edge_worker.deps import ApiError, get_model, get_state
from dapdee.edge_worker.infer import EXIT_HEADER, run_infer
from dapdee.edge_worker.metrics import CANCELLED_STATUS, UNKNOWN
from dapdee.edge_worker.routers.health import HEALTH_RESPONSES, health_status
from dapdee.web.security import ANY_ROLE, DEVICE, require

router = APIRouter(tags=["v2"])
ERROR = {"model": ErrorResponse}
READ_ERRORS: dict[int | str, dict[str, Any]] = {401: ERROR, 403: ERROR, 404: ERROR}


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with every `#/$defs/...` reference replaced by its definition (the OpenAPI
    document has no `$defs` of its own). O(schema size); the models have no cycles."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def _infer_body_schema() -> dict[str, Any]:
    schema = InferRequest.model_json_schema()
    return _inline_refs(schema, schema.get("$defs", {}))


INFER_ROUTE: dict[str, Any] = {
    "dependencies": [require(DEVICE)],
    "response_class": Response,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "JSON, or (binary tensor extension) a JSON header of "
            "`Inference-Header-Content-Length` bytes followed by the tensors' bytes; with a length "
            "of 0 (a raw binary request), the model input's bytes alone, at batch 1",
            "content": {
                "application/json": {"schema": _infer_body_schema()},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    "responses": {
        200: {
            "model": InferResponse,
            "description": "the exit's logits and class (binary outputs follow the JSON header)",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **{status: ERROR for status in (400, 401, 403, 404, 408, 413, 415, 422, 503)},
    },
}


@router.get("/v2/models/{model}", response_model=ModelMetadata, responses=READ_ERRORS, dependencies=[require(ANY_ROLE)])
async def model_metadata(model: str, request: Request) -> ModelMetadata:
    """The model's input (the graph input, its real datatype and shape), outputs and exits."""
    return get_model(get_state(request), model).metadata()


@router.get(
    "/v2/models/{model}/versions/{version}",
    response_model=ModelMetadata,
    responses=READ_ERRORS,
    dependencies=[require(ANY_ROLE)],
)
async def model_version_metadata(model: str, version: str, request: Request) -> ModelMetadata:
    """`GET /v2/models/{model}` of one version."""
    return get_model(get_state(request), model, version).metadata()


@router.get(
    "/v2/models/{model}/ready",
    response_class=Response,
    responses={**HEALTH_RESPONSES, **READ_ERRORS},
    dependencies=[require(ANY_ROLE)],
)
async def model_ready(model: str, request: Request) -> Response:
    """200 when the model is ready for inference, 400 when not (the worker is not ready: still
    profiling for the planner, or draining; 404: unknown model)."""
    state = get_state(request)
    get_model(state, model)
    return health_status(state.is_ready())


@router.get(
    "/v2/models/{model}/versions/{version}/ready",
    response_class=Response,
    responses={**HEALTH_RESPONSES, **READ_ERRORS},
    dependencies=[require(ANY_ROLE)],
)
async def model_version_ready(model: str, version: str, request: Request) -> Response:
    """`GET /v2/models/{model}/ready` of one version."""
    state = get_state(request)
    get_model(state, model, version)
    return health_status(state.is_ready())


@router.post("/v2/models/{model}/infer", **INFER_ROUTE)
async def infer(model: str, request: Request) -> Response:
    """Compute the requested exit from the boundary tensors sent. Request parameters: `exit`
    (default: the deepest); `confidence: true` also checks the calibrated confidence heads the
    worker computes on the way to it, each row answering at its first confident head, and the
    answer's parameters then carry `exits_taken` (per row, the exit that answered; 400 naming
    `confidence` when the model has no calibrated thresholds); `timeout` (microseconds, 0: none):
    a request whose batch has not started that long after it arrived is not computed (503)."""
    return await _serve(request, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", **INFER_ROUTE)
async def infer_version(model: str, version: str, request: Request) -> Response:
    """`POST /v2/models/{model}/infer` of one version."""
    return await _serve(request, model, version)


async def _serve(request: Request, model: str, version: str | None) -> Response:
    """Run one infer request and count it (requests by model, exit and status, CANCELLED_STATUS
    for a handler cancelled before it answered; duration; body bytes). A served model at a version
    it does not serve is its 404, counted under the model's name (a bounded label value, like
    its other 4xx); only a model the worker does not serve is counted under UNKNOWN."""
    t0 = time.perf_counter()
    state = get_state(request)
    label_model, label_exit, status = UNKNOWN, UNKNOWN, 500
    state.inflight += 1
    state.metrics.inflight.set(state.inflight)
    try:
        entry = get_model(state, model)
        label_model = entry.name
        body = await request.body()  # already read by the guard, under the model's body limit
        state.metrics.received_bytes.labels(entry.name).inc(len(body))
        get_model(state, model, version)  # 404 for a version the model does not have
        payload, headers = await run_infer(state, entry, body, request.headers, t0)
        label_exit, status = headers[EXIT_HEADER], 200
        return Response(content=payload, headers=headers, media_type=headers["Content-Type"])
    except ApiError as exc:
        status = exc.status
        label_exit = exc.exit_label or label_exit
        raise
    except asyncio.CancelledError:  # no answer went out (a shutdown past its grace): not a server error
        status = CANCELLED_STATUS
        raise
    finally:
        state.inflight -= 1
        state.metrics.inflight.set(state.inflight)
        state.metrics.requests.labels(label_model, label_exit, str(status)).inc()
        if label_model != UNKNOWN:
            state.metrics.request_duration.labels(label_model).observe(time.perf_counter() - t0)
