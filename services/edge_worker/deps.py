"""Worker state shared by the routers, errors in the `{"error": ...}` shape, and auth."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from dapdee.costgraph import CostGraph
from dapdee.edge_worker.batching import Batcher
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.metrics import EdgeMetrics
from dapdee.models import LoadedModel


class ApiError(Exception):
    """An HTTP error answered as `{"error": message}` with `status` (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.exit_label: str | None = None  # the request's exit, once known (metrics label)


@dataclass
class ModelEntry:
    """A served model: the loaded model, its cost graph (edge timings once profiled) and the
    per-sample shape of every value a request may send (graph input and tensor nodes)."""

    loaded: LoadedModel
    graph: CostGraph
    sample_shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, loaded: LoadedModel) -> ModelEntry:
        g = loaded.graph
        shapes = {g.input.name: tuple(g.input.shape[1:])}
        for n in g.nodes:
            if n.shape is not None and n.name not in loaded.executor.scalar_nodes:
                shapes[n.name] = tuple(n.shape[1:])
        return cls(loaded, g, shapes)

    @property
    def name(self) -> str:
        return self.loaded.name

    def metadata(self) -> dict[str, Any]:
        """v2 model metadata: the graph input as the input, logits/class outputs, exits as parameters."""
        g = self.graph
        final = g.node(g.exits[-1].node)
        classes = final.shape[-1] if final.shape else -1
        return {
            "name": self.name,
            "versions": ["1"],
            "platform": "pytorch",
            "inputs": [{"name": g.input.name, "datatype": "FP32", "shape": [-1, *g.input.shape[1:]]}],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
                {"name": "class", "datatype": "INT64", "shape": [-1]},
            ],
            "parameters": {
                "exits": [e.name for e in g.exits],
                "exit_nodes": {e.name: e.node for e in g.exits},
                "exit_accuracy": {e.name: e.accuracy for e in g.exits},
                "default_exit": g.exits[-1].name,
                "spec": self.loaded.spec,
                "inputs_note": (
                    "any graph node may be sent as an input (a boundary tensor named by node, "
                    "first dim = batch); the worker computes whatever the exit needs that was not "
                    "sent; request parameter 'exit' picks the exit"
                ),
                "node_count": len(g.nodes),
                "accepted_datatypes": ["FP32", "FP16", "FP64", "INT8", "UINT8", "INT16", "INT32", "INT64"],
            },
        }


@dataclass
class WorkerState:
    settings: Settings
    models: dict[str, ModelEntry]
    batcher: Batcher
    metrics: EdgeMetrics
    inflight: int = 0
    ready: bool = False
    registration: dict[str, Any] = field(default_factory=dict)  # planner registration status


def get_state(request: Request) -> WorkerState:
    state = getattr(request.app.state, "worker", None)
    if state is None:
        raise ApiError(503, "worker is starting", {"Retry-After": "1"})
    return state


def get_model(state: WorkerState, name: str) -> ModelEntry:
    entry = state.models.get(name)
    if entry is None:
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise ApiError(404, f"unknown model {shown!r}; this worker serves {sorted(state.models)}")
    return entry


def check_token(state: WorkerState, request: Request) -> None:
    """Bearer-token auth when DAPDEE_API_TOKEN is set: 401 without a token, 403 with a wrong one."""
    token = state.settings.api_token
    if token is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        state.metrics.rejected.labels("unauthenticated").inc()
        raise ApiError(
            401, "missing bearer token (Authorization: Bearer TOKEN)", {"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        state.metrics.rejected.labels("forbidden").inc()
        raise ApiError(403, "invalid token")
