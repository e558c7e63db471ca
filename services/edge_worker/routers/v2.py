"""Open Inference Protocol v2 model endpoints: metadata, readiness and infer.

An infer request's inputs are boundary tensors named by graph node (first dim = batch); the
worker computes whatever the requested exit needs that was not sent and returns the exit's
`logits` (FP32) and predicted `class` (INT64), with server-side `queue_ms` / `compute_ms`.
"""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from dapdee import wire
from dapdee.edge_worker.deps import ApiError, ModelEntry, WorkerState, check_token, get_model, get_state
from dapdee.edge_worker.metrics import UNKNOWN
from dapdee.executor import MissingInputsError

router = APIRouter()
OUTPUT_NAMES = ("logits", "class")
THREAD_DECODE_BYTES = 256 << 10  # decode bigger bodies off the event loop


@router.get("/v2/models/{model}")
async def model_metadata(model: str, request: Request) -> JSONResponse:
    return JSONResponse(get_model(get_state(request), model).metadata())


@router.get("/v2/models/{model}/versions/{version}")
async def model_version_metadata(model: str, version: str, request: Request) -> JSONResponse:
    if version != "1":
        raise ApiError(404, f"model {model!r} has only version '1'")
    return JSONResponse(get_model(get_state(request), model).metadata())


@router.get("/v2/models/{model}/ready", response_class=Response)
async def model_ready(model: str, request: Request) -> Response:
    state = get_state(request)
    get_model(state, model)
    return Response(status_code=200 if state.ready else 503)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over `limit` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "Content-Length: expected a non-negative integer")
        if int(declared) > limit:
            raise ApiError(413, f"body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _validate(entry: ModelEntry, inputs: dict[str, torch.Tensor], exit_name: str) -> tuple[str, int]:
    """Check names, per-sample shapes, batch agreement and that the inputs determine the exit.
    Returns (exit node, batch size). O(inputs + nodes the exit needs)."""
    g = entry.graph
    batch = None
    for name, t in inputs.items():
        expected = entry.sample_shapes.get(name)
        if expected is None:
            if name in entry.loaded.executor.nodes:
                raise ApiError(400, f"input {name!r}: node does not produce a tensor and cannot be sent")
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ApiError(400, f"input {shown!r}: unknown node of model {entry.name!r}")
        if t.dim() != len(expected) + 1 or tuple(t.shape[1:]) != expected:
            raise ApiError(
                400,
                f"input {name!r}: wrong shape; expected [batch, {', '.join(map(str, expected))}], "
                f"got {list(t.shape)}",
            )
        if batch is None:
            batch = t.shape[0]
        elif t.shape[0] != batch:
            raise ApiError(
                400, f"input {name!r}: batch size {t.shape[0]} differs from the other inputs' {batch}"
            )
    if not batch:
        raise ApiError(400, "inputs: batch size must be at least 1")
    node = g.exit(exit_name).node
    try:
        entry.loaded.executor.schedule(list(inputs), [node])
    except MissingInputsError as exc:
        boundary = _missing_boundary(entry, set(inputs), node)
        hint = f" (or the cut's boundary nodes {', '.join(boundary)})" if boundary else ""
        raise ApiError(
            400,
            f"inputs do not determine exit {exit_name!r} (node {node}): "
            f"missing {', '.join(exc.missing)}{hint}",
        ) from None
    return node, batch


def _missing_boundary(entry: ModelEntry, given: set[str], target: str) -> list[str]:
    """Nodes the sender computed-before (ancestors of what it sent) that the rest still needs but
    were not sent: the boundary tensors a cut forgot. O(V + E)."""
    g = entry.graph
    need: set[str] = set()
    stack = [target]
    while stack:
        n = stack.pop()
        if n in need or n in given or n == g.input.name:
            continue
        need.add(n)
        stack.extend(g.node(n).inputs)
    sent_side: set[str] = set()
    for n in given:
        if n != g.input.name:
            sent_side.update(g.ancestors(n))
    consumers = g.consumers()
    return [
        n.name
        for n in g.nodes
        if n.name in need
        and n.name in sent_side
        and any(c in need and c not in sent_side for c in consumers[n.name])
    ]


@router.post("/v2/models/{model}/infer")
async def infer(model: str, request: Request) -> Response:
    t0 = time.perf_counter()
    state = get_state(request)
    check_token(state, request)
    label_model, label_exit, status = UNKNOWN, UNKNOWN, 500
    counted = False
    try:
        entry = get_model(state, model)
        label_model = entry.name
        if state.inflight >= state.settings.max_inflight:
            state.metrics.rejected.labels("overloaded").inc()
            raise ApiError(
                503, f"too many requests in flight ({state.settings.max_inflight})", {"Retry-After": "1"}
            )
        state.inflight += 1
        counted = True
        state.metrics.inflight.set(state.inflight)
        response = await _infer(state, entry, request, t0)
        label_exit = response.headers.get("x-dapdee-exit", UNKNOWN)
        status = response.status_code
        return response
    except ApiError as exc:
        status = exc.status
        label_exit = exc.exit_label or label_exit
        raise
    finally:
        if counted:
            state.inflight -= 1
            state.metrics.inflight.set(state.inflight)
        state.metrics.requests.labels(label_model, label_exit, str(status)).inc()
        if label_model != UNKNOWN:
            state.metrics.request_duration.labels(label_model).observe(time.perf_counter() - t0)


async def _infer(state: WorkerState, entry: ModelEntry, request: Request, t0: float) -> Response:
    """Read, decode, validate, batch-compute and encode one infer request."""
    s = state.settings
    body = await _read_body(request, s.max_body_bytes)
    state.metrics.received_bytes.labels(entry.name).inc(len(body))
    try:
        hlen = wire.parse_header_length(request.headers.get(wire.HEADER_LENGTH))
        if len(body) > THREAD_DECODE_BYTES:
            req = await asyncio.to_thread(wire.decode_request, body, hlen, s.max_elements)
        else:
            req = wire.decode_request(body, hlen, s.max_elements)
    except wire.WireError as exc:
        raise ApiError(400, str(exc)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # a malformed body the codec missed
        raise ApiError(400, f"malformed request: {type(exc).__name__}: {str(exc)[:200]}") from None
    exit_name = req.parameters.get("exit", entry.graph.exits[-1].name)
    exits = [e.name for e in entry.graph.exits]
    if not isinstance(exit_name, str) or exit_name not in exits:
        raise ApiError(
            400, f"parameter exit {str(exit_name)[:64]!r}: unknown exit; model {entry.name!r} has {exits}"
        )
    if req.outputs is not None:
        unknown = [o for o in req.outputs if o not in OUTPUT_NAMES]
        if unknown:
            err = ApiError(
                400, f"outputs: unknown output {unknown[0][:64]!r}; outputs are {list(OUTPUT_NAMES)}"
            )
            err.exit_label = exit_name
            raise err
    try:
        node, _batch = _validate(entry, req.inputs, exit_name)
    except ApiError as exc:
        exc.exit_label = exit_name
        raise
    key = (entry.name, frozenset(req.inputs), exit_name)
    result = await state.batcher.submit(key, entry.loaded.executor, node, req.inputs)
    logits = result.output.float()
    outputs = {
        "logits": logits,
        "class": logits.argmax(dim=1) if logits.dim() == 2 else logits.argmax(dim=-1),
    }
    if req.outputs:
        outputs = {k: v for k, v in outputs.items() if k in req.outputs}
        binary: bool | dict[str, bool] = dict(req.outputs)
    else:
        binary = req.binary_output
    m = state.metrics
    m.queue_duration.labels(entry.name).observe(result.queue_s)
    params = {
        "exit": exit_name,
        "queue_ms": round(result.queue_s * 1000.0, 4),
        "compute_ms": round(result.compute_s * 1000.0, 4),
        "batch_size": result.batch_size,
        "server_ms": round((time.perf_counter() - t0) * 1000.0, 4),
    }
    payload, headers = wire.encode_response(
        entry.name, outputs, request_id=req.id, parameters=params, binary=binary, model_version="1"
    )
    headers["x-dapdee-exit"] = exit_name
    return Response(content=payload, headers=headers, media_type=headers["Content-Type"])
