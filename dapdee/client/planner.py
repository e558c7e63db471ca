"""The planner's client: graphs, profiles, plans, workers and leases (a device's state, its
release, a fleet rebalance), typed with `dapdee.api.planner`.

`PlannerClient` (sync) and `AsyncPlannerClient` (async) have the same methods, one per route;
each builds its request with a function below (pure, shared by both) and reads the answer into
the route's answer model, so an answer that breaks the contract is a `ProtocolError`, never a
half-read dict. Request bodies may be the typed models (`PlanRequestBody`, `HeartbeatBody`; the
fields set are sent) or plain mappings (sent as given: the planner judges them, and a misspelt
field comes back as an `ApiError` 422 naming it).

A plan's `lease` and `GET /devices/{id}`'s answer are held to lease.schema.json by their
models (`LeaseInfo`, `DeviceState`: names and the worker URL match the schema's patterns, a
name is never null, the lease's types are strict). Unknown fields are ignored there as in every
answer model, so a planner that adds one keeps its clients.

`upload_profile` is the one place a profile body is built from a profiled cost graph.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from dapdee.api.planner import (
    DeviceState,
    Health,
    HeartbeatAnswer,
    HeartbeatBody,
    ModelList,
    ModelWritten,
    PlanAnswer,
    PlanRequestBody,
    ProfileList,
    ProfileWritten,
    Readiness,
    RebalanceAnswer,
    WorkerList,
)
from dapdee.client.errors import RequestError
from dapdee.client.transport import (
    Answer,
    AsyncTransport,
    Call,
    SyncTransport,
    api_error,
    check_name,
    json_call,
    reader,
)
from dapdee.costgraph import CostGraph

Kind = Literal["device", "edge"]
GraphBody = CostGraph | BaseModel | Mapping[str, Any]  # a CostGraph, a CostGraphBody or its JSON
Meta = Mapping[str, Any] | None
Timings = Mapping[str, float]
Version = int | None  # a model version an If-Match write expects (None: unconditional)
WRITTEN = frozenset({200, 201})  # replaced, created
NO_CONTENT = frozenset({204})
_ETAG = re.compile(r'(?:W/)?"([0-9]{1,18})"')


@dataclass(frozen=True)
class StoredGraph:
    """A model's cost graph as the planner stores it, with its version (from the ETag)."""

    graph: CostGraph
    version: int


# ---- requests (pure) ------------------------------------------------------------------------------


def _nothing(answer: Answer) -> None:
    return None


def _model_path(name: str) -> str:
    return f"/models/{check_name(name, 'model')}"


def _profile_path(name: str, tier: str) -> str:
    return f"{_model_path(name)}/profiles/{check_name(tier, 'tier')}"


def _stored_graph(answer: Answer) -> StoredGraph:
    graph = CostGraph.from_dict(answer.json())
    match = _ETAG.fullmatch(answer.headers.get("etag", "").strip())
    if match is None:
        raise ValueError(f'ETag {answer.headers.get("etag")!r}: expected "<version>"')
    return StoredGraph(graph, int(match.group(1)))


def if_match(version: Version) -> dict[str, str]:
    """The `If-Match` header of a write conditional on `version` (none when None)."""
    if version is None:
        return {}
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RequestError(f"if_version: expected a model version (an integer >= 1), got {version!r}")
    return {"If-Match": f'"{version}"'}


def as_body(body: BaseModel | Mapping[str, Any], what: str) -> dict[str, Any]:
    """A request body as JSON-ready data: a typed model's fields that were set, or a mapping
    as given (the planner validates it)."""
    if isinstance(body, BaseModel):
        return body.model_dump(mode="json", exclude_unset=True)
    if isinstance(body, Mapping):
        return dict(body)
    raise RequestError(f"{what}: expected a {what} model or a mapping, got {type(body).__name__}")


def profile_body(graph: CostGraph, kind: Kind, meta: Meta = None) -> dict[str, Any]:
    """The profile upload of a profiled cost graph: every node's `{kind}_ms` as `timings_ms`, and
    as `meta` the graph's `meta[kind]` (how it was measured) updated with `meta`. RequestError
    when a node has no such timing. O(nodes)."""
    if kind not in ("device", "edge"):
        raise RequestError(f"kind: expected 'device' or 'edge', got {kind!r}")
    timings = {n.name: getattr(n, f"{kind}_ms") for n in graph.nodes}
    missing = [name for name, ms in timings.items() if ms is None]
    if missing:
        raise RequestError(f"model {graph.model!r}: no {kind}_ms for nodes {missing[:5]}; profile it first")
    measured = graph.meta.get(kind)
    merged = {**(measured if isinstance(measured, dict) else {}), **(meta or {})}
    return {"kind": kind, "timings_ms": timings, "meta": merged}


def healthz_call() -> Call[Health]:
    return Call("GET", "/healthz", reader(Health))


def _readiness(answer: Answer) -> Readiness:
    """A 200's Readiness (ValueError when it does not fit); a 503's when it is one, else the
    503 is an ApiError like any other (e.g. a proxy's HTML page)."""
    if answer.status != 503:
        return Readiness.model_validate_json(answer.content)
    try:
        return Readiness.model_validate_json(answer.content)
    except ValueError:
        raise api_error("GET", "/readyz", answer) from None


def readyz_call() -> Call[Readiness]:
    """`GET /readyz`: 503 (not started yet) answers a Readiness too, with `ready` false; a 503
    whose body is not one is an ApiError."""
    return Call("GET", "/readyz", _readiness, ok=frozenset({200, 503}))


def list_models_call() -> Call[ModelList]:
    return Call("GET", "/models", reader(ModelList))


def get_model_call(name: str) -> Call[StoredGraph]:
    return Call("GET", _model_path(name), _stored_graph)


def put_graph_call(graph: GraphBody, if_version: Version = None) -> Call[ModelWritten]:
    body = graph.to_dict() if isinstance(graph, CostGraph) else as_body(graph, "cost graph")
    if not isinstance(body.get("model"), str):
        raise RequestError("cost graph: no model name")
    path = _model_path(body["model"])
    return json_call("PUT", path, reader(ModelWritten), body, headers=if_match(if_version), ok=WRITTEN)


def delete_model_call(name: str, if_version: Version = None) -> Call[None]:
    return Call("DELETE", _model_path(name), _nothing, headers=if_match(if_version), ok=NO_CONTENT)


def list_profiles_call(name: str) -> Call[ProfileList]:
    return Call("GET", f"{_model_path(name)}/profiles", reader(ProfileList))


def put_profile_call(
    name: str, tier: str, kind: Kind, timings_ms: Timings, meta: Meta = None, if_version: Version = None
) -> Call[ProfileWritten]:
    body = {"kind": kind, "timings_ms": dict(timings_ms), "meta": dict(meta or {})}
    headers = if_match(if_version)
    return json_call("PUT", _profile_path(name, tier), reader(ProfileWritten), body, headers=headers, ok=WRITTEN)


def upload_profile_call(
    graph: CostGraph, tier: str, kind: Kind, meta: Meta = None, if_version: Version = None
) -> Call[ProfileWritten]:
    """`PUT /models/{graph.model}/profiles/{tier}` with `profile_body(graph, kind, meta)`."""
    body = profile_body(graph, kind, meta)
    return put_profile_call(graph.model, tier, kind, body["timings_ms"], body["meta"], if_version)


def delete_profile_call(name: str, tier: str, if_version: Version = None) -> Call[None]:
    return Call("DELETE", _profile_path(name, tier), _nothing, headers=if_match(if_version), ok=NO_CONTENT)


def plan_call(body: PlanRequestBody | Mapping[str, Any], traceparent: str | None = None) -> Call[PlanAnswer]:
    """`POST /plan`. Idempotent, so repeated after a broken connection: without `device_id` it
    changes nothing on the planner; with one, the device's lease is one record keyed by the
    device (its reservation replaced, never added to), so a repeat renews the same lease."""
    body_json = as_body(body, "PlanRequestBody")
    return json_call("POST", "/plan", reader(PlanAnswer), body_json, traceparent=traceparent, idempotent=True)


def heartbeat_call(body: HeartbeatBody | Mapping[str, Any]) -> Call[HeartbeatAnswer]:
    """`POST /workers/heartbeat` (worker). Not repeated by the transport: a heartbeat whose
    capacity its worker's leases book past ρ_max re-solves them (the registration loop sends
    the next one anyway)."""
    return json_call("POST", "/workers/heartbeat", reader(HeartbeatAnswer), as_body(body, "HeartbeatBody"))


def workers_call() -> Call[WorkerList]:
    return Call("GET", "/workers", reader(WorkerList))


def device_call(device_id: str) -> Call[DeviceState]:
    """`GET /devices/{device_id}`: the device's lease and the plan now assigned to it."""
    return Call("GET", f"/devices/{check_name(device_id, 'device_id')}", reader(DeviceState))


def release_call(device_id: str) -> Call[None]:
    """`DELETE /devices/{device_id}`: end the device's lease (404 when it holds none)."""
    return Call("DELETE", f"/devices/{check_name(device_id, 'device_id')}", _nothing, ok=NO_CONTENT)


def rebalance_call() -> Call[RebalanceAnswer]:
    """`POST /fleet/rebalance` (admin): re-solve every worker's leases now. Not idempotent (a
    second solve starts from the first's assignment), so never repeated by the transport."""
    return Call("POST", "/fleet/rebalance", reader(RebalanceAnswer))


# ---- clients ----------------------------------------------------------------------------------------


class PlannerClient(SyncTransport):
    """The planner's routes, blocking. `PlannerClient(base_url, token=None, *, timeout=5.0,
    headers=None, transport=None)`; use as a context manager or `close()` it. Every method
    raises ApiError (4xx/5xx), ProtocolError (an answer off contract), TransportError (no
    answer) or RequestError (arguments it will not send)."""

    def healthz(self) -> Health:
        return self.run(healthz_call())

    def readyz(self) -> Readiness:
        return self.run(readyz_call())

    def list_models(self) -> ModelList:
        return self.run(list_models_call())

    def get_model(self, name: str) -> StoredGraph:
        return self.run(get_model_call(name))

    def put_graph(self, graph: GraphBody, if_version: Version = None) -> ModelWritten:
        return self.run(put_graph_call(graph, if_version))

    def delete_model(self, name: str, if_version: Version = None) -> None:
        self.run(delete_model_call(name, if_version))

    def list_profiles(self, name: str) -> ProfileList:
        return self.run(list_profiles_call(name))

    def put_profile(
        self, name: str, tier: str, kind: Kind, timings_ms: Timings, meta: Meta = None, if_version: Version = None
    ) -> ProfileWritten:
        return self.run(put_profile_call(name, tier, kind, timings_ms, meta, if_version))

    def upload_profile(
        self, graph: CostGraph, tier: str, kind: Kind, meta: Meta = None, if_version: Version = None
    ) -> ProfileWritten:
        """Upload `graph`'s `{kind}_ms` timings as tier `tier`'s profile (`profile_body`)."""
        return self.run(upload_profile_call(graph, tier, kind, meta, if_version))

    def delete_profile(self, name: str, tier: str, if_version: Version = None) -> None:
        self.run(delete_profile_call(name, tier, if_version))

    def plan(self, body: PlanRequestBody | Mapping[str, Any], traceparent: str | None = None) -> PlanAnswer:
        return self.run(plan_call(body, traceparent))

    def heartbeat(self, body: HeartbeatBody | Mapping[str, Any]) -> HeartbeatAnswer:
        return self.run(heartbeat_call(body))

    def workers(self) -> WorkerList:
        return self.run(workers_call())

    def device(self, device_id: str) -> DeviceState:
        return self.run(device_call(device_id))

    def release(self, device_id: str) -> None:
        self.run(release_call(device_id))

    def rebalance(self) -> RebalanceAnswer:
        return self.run(rebalance_call())


class AsyncPlannerClient(AsyncTransport):
    """`PlannerClient` for asyncio: the same methods, awaited; `async with` or `await aclose()`."""

    async def healthz(self) -> Health:
        return await self.run(healthz_call())

    async def readyz(self) -> Readiness:
        return await self.run(readyz_call())

    async def list_models(self) -> ModelList:
        return await self.run(list_models_call())

    async def get_model(self, name: str) -> StoredGraph:
        return await self.run(get_model_call(name))

    async def put_graph(self, graph: GraphBody, if_version: Version = None) -> ModelWritten:
        return await self.run(put_graph_call(graph, if_version))

    async def delete_model(self, name: str, if_version: Version = None) -> None:
        await self.run(delete_model_call(name, if_version))

    async def list_profiles(self, name: str) -> ProfileList:
        return await self.run(list_profiles_call(name))

    async def put_profile(
        self, name: str, tier: str, kind: Kind, timings_ms: Timings, meta: Meta = None, if_version: Version = None
    ) -> ProfileWritten:
        return await self.run(put_profile_call(name, tier, kind, timings_ms, meta, if_version))

    async def upload_profile(
        self, graph: CostGraph, tier: str, kind: Kind, meta: Meta = None, if_version: Version = None
    ) -> ProfileWritten:
        """Upload `graph`'s `{kind}_ms` timings as tier `tier`'s profile (`profile_body`)."""
        return await self.run(upload_profile_call(graph, tier, kind, meta, if_version))

    async def delete_profile(self, name: str, tier: str, if_version: Version = None) -> None:
        await self.run(delete_profile_call(name, tier, if_version))

    async def plan(self, body: PlanRequestBody | Mapping[str, Any], traceparent: str | None = None) -> PlanAnswer:
        return await self.run(plan_call(body, traceparent))

    async def heartbeat(self, body: HeartbeatBody | Mapping[str, Any]) -> HeartbeatAnswer:
        return await self.run(heartbeat_call(body))

    async def workers(self) -> WorkerList:
        return await self.run(workers_call())

    async def device(self, device_id: str) -> DeviceState:
        return await self.run(device_call(device_id))

    async def release(self, device_id: str) -> None:
        await self.run(release_call(device_id))

    async def rebalance(self) -> RebalanceAnswer:
        return await self.run(rebalance_call())
