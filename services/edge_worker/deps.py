"""Worker state shared by the routers, the served models with their request limits, and errors
in OIP's `{"error": ...}` shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import Request

from dapdee import wire
from dapdee.api.oip import ModelMetadata, ModelParameters, TensorMetadata
from dapdee.bounded_cache import BoundedCache
from dapdee.costgraph import CostGraph
from dapdee.edge_worker.batching import Batcher
from dapdee.edge_worker.capacity import CapacityMeter
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.limits import RequestLimits, request_limits
from dapdee.edge_worker.metrics import EdgeMetrics
from dapdee.models import LoadedModel

MODEL_VERSION = "1"  # every served model has exactly this version
# names the compute-ms predictions of one model hold at most (each: the given names and the
# target): requests may name arbitrary cuts
COMPUTE_CACHE_NAMES = 1 << 18
INPUTS_NOTE = (
    "any graph node may be sent as an input (a boundary tensor named by node, first dim = rows, "
    "per-sample shape = the node's traced shape); the worker computes whatever the exit needs that "
    "was not sent; a node computed from the model's parameters alone (no batch dimension) may be "
    "sent at its whole traced shape, and is then ignored: the worker computes it itself; request "
    "parameter 'exit' picks the exit"
)


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
    """A served model: the loaded model, its cost graph (edge timings once profiled), the
    per-sample shape of every batch value a request may send (graph input and tensor nodes that
    depend on it), the whole shape of every tensor node computed from the model's parameters
    alone (`fixed_shapes`: no batch dimension; sent or not, the worker computes it itself), and
    the request limits derived from them."""

    loaded: LoadedModel
    graph: CostGraph
    sample_shapes: dict[str, tuple[int, ...]]
    limits: RequestLimits
    fixed_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # (the graph the figures are for, (given names, target) -> profiled compute ms)
    _compute_ms: tuple[CostGraph | None, BoundedCache[tuple[frozenset[str], str], tuple[float | None]]] = field(
        default_factory=lambda: (None, BoundedCache(COMPUTE_CACHE_NAMES)), repr=False
    )

    @classmethod
    def of(cls, loaded: LoadedModel, max_rows: int, body_cap: int) -> ModelEntry:
        """Index `loaded` for requests of at most `max_rows` rows and `body_cap` bytes.
        O(largest_boundary) (enumerates the model's cuts)."""
        g, ex = loaded.graph, loaded.executor
        shapes = {g.input.name: tuple(g.input.shape[1:])}
        fixed: dict[str, tuple[int, ...]] = {}
        for n in g.nodes:
            if n.shape is None or n.name in ex.scalar_nodes:
                continue
            if n.name in ex.batch_nodes:
                shapes[n.name] = tuple(n.shape[1:])
            else:  # a parameter, or computed from parameters alone: the same for every row
                fixed[n.name] = tuple(n.shape)
        return cls(loaded, g, shapes, request_limits(g, shapes, max_rows, body_cap, fixed), fixed)

    @property
    def name(self) -> str:
        return self.loaded.name

    def compute_ms(self, given: frozenset[str], target: str) -> float | None:
        """What the graph's edge profile predicts for computing `target` from the values named
        `given`: Σ edge_ms over the nodes that computation runs (None: the graph has no edge
        timings there). Cached per (given, target) for the current graph, the most recently used
        within COMPUTE_CACHE_NAMES names; a hit is O(1), a miss O(V + E)."""
        graph, cache = self._compute_ms
        if graph is not self.graph:
            graph, cache = self.graph, BoundedCache(COMPUTE_CACHE_NAMES)
            self._compute_ms = (graph, cache)
        key = (given, target)
        held = cache.get(key)  # (figure,): a figure may be None
        if held is None:
            held = (_compute_ms(graph, given, target),)
            cache.put(key, held, len(given) + 1)
        return held[0]

    @property
    def request_ms(self) -> float:
        """The per-request cost a lease books for this model on this worker (cost model v2's
        `edge_request_ms`): the one the worker measured (its edge profile's meta), else the
        graph's own `overheads`, as the planner resolves it. O(1)."""
        measured = self.graph.meta.get("edge", {}).get("edge_request_ms")
        if isinstance(measured, (int, float)) and not isinstance(measured, bool):
            return float(measured)
        return self.graph.overheads.edge_request_ms

    @property
    def input_datatype(self) -> str:
        """The graph input's dtype as a v2 datatype (uint8 -> UINT8, float32 -> FP32, ...)."""
        return wire.TORCH_TO_V2.get(getattr(torch, self.graph.input.dtype, torch.float32), "FP32")

    def metadata(self) -> ModelMetadata:
        """v2 model metadata: the graph input with its real datatype and per-sample shape, the
        logits/class outputs, the exits and limits as parameters. O(nodes)."""
        g = self.graph
        final = g.node(g.exits[-1].node)
        classes = final.shape[-1] if final.shape else -1
        return ModelMetadata(
            name=self.name,
            versions=[MODEL_VERSION],
            platform="pytorch",
            inputs=[TensorMetadata(name=g.input.name, datatype=self.input_datatype, shape=[-1, *g.input.shape[1:]])],
            outputs=[
                TensorMetadata(name="logits", datatype="FP32", shape=[-1, classes]),
                TensorMetadata(name="class", datatype="INT64", shape=[-1]),
            ],
            parameters=ModelParameters(
                exits=[e.name for e in g.exits],
                exit_nodes={e.name: e.node for e in g.exits},
                exit_accuracy={e.name: e.accuracy for e in g.exits},
                default_exit=g.exits[-1].name,
                spec=self.loaded.spec,
                node_count=len(g.nodes),
                max_batch_rows=self.limits.max_rows,
                max_body_bytes=self.limits.body_bytes,
                accepted_datatypes=list(wire.DATATYPES),
                inputs_note=INPUTS_NOTE,
            ),
        )


def _compute_ms(graph: CostGraph, given: frozenset[str], target: str) -> float | None:
    """Σ edge_ms over the nodes needed for `target` that are not given (see `compute_ms`)."""
    total, seen, stack = 0.0, set(), [target]
    while stack:
        name = stack.pop()
        if name in seen or name in given or name == graph.input.name:
            continue
        seen.add(name)
        node = graph.node(name)
        if node.edge_ms is None:
            return None
        total += node.edge_ms
        stack.extend(node.inputs)
    return total


@dataclass
class WorkerState:
    settings: Settings
    models: dict[str, ModelEntry]
    batcher: Batcher
    metrics: EdgeMetrics
    inflight: int = 0  # infer requests being handled (metrics and heartbeats)
    capacity: CapacityMeter = field(default_factory=CapacityMeter)  # heartbeats' capacity_ms_per_s
    ready: bool = False  # models loaded and not draining
    profiling: bool = False  # registering with a planner, and the edge timings not settled yet
    registration: dict[str, Any] = field(default_factory=dict)  # planner registration status

    def is_ready(self) -> bool:
        """Ready for traffic (the v2 readiness answers): every model loaded, not draining, and,
        when registering with a planner, the models profiled (or their profiling given up)."""
        return self.ready and not self.profiling


def get_state(request: Request) -> WorkerState:
    state = getattr(request.app.state, "worker", None)
    if state is None:
        raise ApiError(503, "worker is starting", {"Retry-After": "1"})
    return state


def unknown_model(state: WorkerState, name: str) -> ApiError:
    """The 404 for a model `name` the worker does not serve, naming those it does. O(models)."""
    shown = name if len(name) <= 64 else name[:64] + "..."
    return ApiError(404, f"unknown model {shown!r}; this worker serves {sorted(state.models)}")


def get_model(state: WorkerState, name: str, version: str | None = None) -> ModelEntry:
    """The served model `name` (404 naming it when unknown), at `version` when given (404
    unless it is the one version every model has)."""
    entry = state.models.get(name)
    if entry is None:
        raise unknown_model(state, name)
    if version is not None and version != MODEL_VERSION:
        shown = version if len(version) <= 32 else version[:32] + "..."
        raise ApiError(404, f"model {name!r} has no version {shown!r}; its only version is {MODEL_VERSION!r}")
    return entry
