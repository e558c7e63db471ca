"""POST /plan: the plan JSON of DESIGN.md for one device's conditions, plus the edge worker to use."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from dapdee.planner.deps import validation_body
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.store import MissingTimings, Store
from dapdee.planning import PlanRequest

router = APIRouter(tags=["plan"])


class PlanBody(BaseModel):
    """A plan request. Bounds reject NaN/inf and absurd values with 422 naming the field."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    model: str = Field(min_length=1, max_length=64)
    bandwidth_mbps: float = Field(gt=0, le=1e6, description="uplink Mbit/s")
    rtt_ms: float = Field(0.0, ge=0, le=1e6)
    device_load: float = Field(0.0, ge=0, lt=1)
    device_tier: str | None = Field(None, min_length=1, max_length=64, description="device profile to use")
    edge_load: float | None = Field(None, ge=0, lt=1, description="default: the chosen worker's load")
    latency_budget_ms: float | None = Field(None, gt=0, le=1e7)
    min_accuracy: float | None = Field(None, ge=0, le=1)
    frame_rate: float | None = Field(None, gt=0, le=1e5)
    mode: Literal["auto", "latency", "throughput"] = "auto"


PLAN_EXAMPLE = {
    "plan_id": "…",
    "model": "resnet18",
    "mode": "latency",
    "exit": {"name": "exit2", "accuracy": 0.921},
    "device_nodes": ["conv1"],
    "edge_nodes": ["fc"],
    "transfer": [{"node": "conv1", "bytes": 32768}],
    "predicted": {
        "latency_ms": 41.2,
        "device_ms": 20.1,
        "transfer_ms": 15.0,
        "edge_ms": 6.1,
        "bottleneck_ms": 20.1,
        "throughput_fps": 49.8,
        "accuracy": 0.921,
    },
    "constraints_met": True,
    "edge_worker": "http://edge-1:8000",
}


@router.post(
    "/plan",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PlanBody.model_json_schema()}},
        }
    },
    responses={
        200: {"description": "the plan JSON", "content": {"application/json": {"example": PLAN_EXAMPLE}}},
        404: {"description": "unknown model"},
        409: {"description": "timings missing: the message says which profile to upload"},
        422: {"description": "a field out of range (named)"},
    },
)
async def plan(request: Request) -> Response:
    """Plan for one device: exact under the cost model, from the model's cached plan map (process
    memory only when cached). Device timings: the `device_tier` profile, else the cost graph's own;
    edge timings: the chosen worker's tier profile, else the cost graph's own; `edge_load`
    defaults to the chosen worker's reported load. (The app serves this route through
    `PlanFastPath`; this handler is the same code behind FastAPI's routing.)"""
    status, data = await answer(request.app.state.store, request.app.state.metrics, await request.body())
    return Response(data, status, media_type="application/json")


def _error(status: int, msg: str) -> tuple[int, bytes]:
    return status, json.dumps({"detail": msg}).encode()


async def answer(store: Store, metrics: PlannerMetrics, raw: bytes) -> tuple[int, bytes]:
    """(HTTP status, JSON body) of POST /plan for the raw request body: parse and validate it in
    one pydantic-core pass, then read process memory only (model, worker, plan map) unless
    something is not cached yet. O(front of the exits consulted)."""
    t0 = time.perf_counter()
    outcome = "error"
    mode = "auto"
    try:
        try:
            body = PlanBody.model_validate_json(raw)
        except ValidationError as exc:
            outcome = "invalid"
            return 422, validation_body(exc.errors(include_url=False, include_context=False), ("body",))
        mode = body.mode
        name = body.model
        st = store.models.get(name)
        if st is None:
            st = await store.get_model(name)
            if st is None:
                outcome = "unknown_model"
                return _error(
                    404, f"unknown model {name!r}; upload its cost graph with PUT /models/{{model}}"
                )
        dev = None
        if body.device_tier is not None:
            dev = st.profiles.get(body.device_tier)
            if dev is None:  # maybe just uploaded through another replica: ask Redis once
                st = await store.refresh_model(name) or st
                dev = st.profiles.get(body.device_tier)
            if dev is None or dev.kind != "device":
                outcome = "missing_timings"
                what = "no profile" if dev is None else f"a {dev.kind} profile, not a device profile,"
                return _error(
                    409,
                    f"model {name!r} has {what} for device_tier {body.device_tier!r}; upload it with "
                    f"PUT /models/{name}/profiles/{body.device_tier} "
                    '{"kind": "device", "timings_ms": {...}}',
                )
        worker = store.pick_worker(name)
        edge = None
        hint = ""
        if worker is not None:
            p = st.profiles.get(worker.tier)
            if p is not None and p.kind == "edge":
                edge = p
            else:
                hint = f" and there is no edge profile for tier {worker.tier!r} of worker {worker.url}"
        try:
            pm = await store.planmap(name, st, dev, edge, hint)
        except MissingTimings as exc:
            outcome = "missing_timings"
            return _error(409, str(exc))
        edge_load = body.edge_load
        if edge_load is None:
            edge_load = worker.load if worker is not None else 0.0
        req = PlanRequest(
            bandwidth_mbps=body.bandwidth_mbps,
            rtt_ms=body.rtt_ms,
            device_load=body.device_load,
            edge_load=edge_load,
            latency_budget_ms=body.latency_budget_ms,
            min_accuracy=body.min_accuracy,
            frame_rate=body.frame_rate,
            mode=body.mode,
        )
        try:
            result = pm.plan(req)  # validates the request: ValueError names the field
        except ValueError as exc:
            outcome = "invalid"
            return _error(422, str(exc))
        result["edge_worker"] = worker.url if worker is not None else None
        mode = result.get("mode", mode)
        outcome = "ok" if result.get("constraints_met", True) else "constraints_unmet"
        return 200, json.dumps(result).encode()
    finally:
        metrics.plans.labels(mode, outcome).inc()
        metrics.plan_duration.observe(time.perf_counter() - t0)


class PlanFastPath:
    """Pure-ASGI fast path for `POST /plan`: skips routing and FastAPI's request machinery (the
    route above stays for OpenAPI and is the same `answer`). Runs inside the body-limit
    middleware, so oversized bodies are already refused; anything else passes through."""

    def __init__(self, app: ASGIApp, fastapi_app: Any) -> None:
        self.app = app
        self.state = fastapi_app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/plan" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        store = getattr(self.state, "store", None)
        if store is None:  # lifespan not run: let the normal stack answer
            await self.app(scope, receive, send)
            return
        try:
            msg = await receive()
            raw = msg.get("body", b"")
            if msg.get("more_body", False):
                chunks = [raw]
                while msg.get("more_body", False):
                    msg = await receive()
                    chunks.append(msg.get("body", b""))
                raw = b"".join(chunks)
        except HTTPException as exc:  # the body limit, while streaming
            status, data = _error(exc.status_code, str(exc.detail))
        else:
            status, data = await answer(store, self.state.metrics, raw)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))],
            }
        )
        await send({"type": "http.response.body", "body": data})
