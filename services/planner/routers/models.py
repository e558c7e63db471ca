"""Models (cost graphs) and their per-tier profiles: reads for any role, writes for admin.

Every model has a `version` (1 when created, +1 with every change of its graph or profiles),
answered in each reply and as `ETag: "<version>"`; a write sent with `If-Match: "<version>"`
is refused with 409 when the stored version differs."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from dapdee.api.planner import (
    CostGraphBody,
    ModelList,
    ModelSummary,
    ModelWritten,
    Name,
    ProfileBody,
    ProfileList,
    ProfileWritten,
    StoredProfile,
    TierTimings,
)
from dapdee.costgraph import CostGraph, CostGraphError, GraphLimits
from dapdee.planner.deps import IfMatchDep, ModelCacheDep, ModelWriterDep, SettingsDep, StoreDep
from dapdee.planner.errors import UnknownNodes
from dapdee.planner.json_body import PydanticJsonRoute, validated
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.modelstate import PARSE_INLINE_BYTES
from dapdee.planner.problems import ApiProblem
from dapdee.planner.store import ModelState, Profile
from dapdee.web.security import ADMIN, ANY_ROLE, require

router = APIRouter(prefix="/models", tags=["models"], route_class=PydanticJsonRoute)

ModelName = Annotated[Name, Path(description="model name")]
TierName = Annotated[Name, Path(description="hardware tier name")]
READ = [require(ANY_ROLE)]
WRITE = [require(ADMIN)]
CONFLICT = {409: {"description": "If-Match names another version, or a capacity limit is reached"}}
NOT_FOUND = {404: {"description": "unknown model (or tier)"}}


def _summary(name: str, st: ModelState) -> ModelSummary:
    g = st.graph
    return ModelSummary(
        model=name,
        version=st.version,
        graph_hash=st.graph_hash,
        nodes=len(g.nodes),
        exits=[e.name for e in g.exits],
        timings=TierTimings(device=g.has_timings("device"), edge=g.has_timings("edge")),
        profiles={t: p.kind for t, p in sorted(st.profiles.items())},
    )


def _etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


async def _model_or_404(cache: ModelCache, name: str) -> ModelState:
    st = await cache.get(name)
    if st is None:
        raise ApiProblem(404, f"unknown model {name!r}; upload its cost graph with PUT /models/{name}")
    return st


@router.get("", response_model=ModelList, dependencies=READ)
async def list_models(cache: ModelCacheDep) -> ModelList:
    """Every stored model (all replicas' when Redis is reachable) with its profiles."""
    models = await cache.list_all()
    return ModelList(models=[_summary(n, st) for n, st in models.items()])


GRAPH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CostGraphBody"}}},
    }
}


@router.put(
    "/{model}",
    response_model=ModelWritten,
    dependencies=WRITE,
    openapi_extra=GRAPH_BODY,
    responses={
        201: {"description": "created", "model": ModelWritten},
        422: {"description": "a field missing, unknown or out of range (named in `errors`)"},
        **CONFLICT,
    },
)
async def put_model(
    model: ModelName,
    request: Request,
    writer: ModelWriterDep,
    settings: SettingsDep,
    expect: IfMatchDep,
    response: Response,
) -> ModelWritten:
    """Store (201) or replace (200) a model's cost graph; its `model` must equal the path's.
    Profiles survive a replacement with the same nodes and exits; a different structure drops
    them (listed in the answer). Size caps: DAPDEE_MAX_NODES, _MAX_EXITS, _MAX_IN_DEGREE. A body
    over PARSE_INLINE_BYTES is parsed and validated in a worker thread (a 2 MB graph takes
    about 0.1 s of CPU, which the event loop must not hold)."""
    raw = await request.body()
    limits = settings.graph_limits()
    if len(raw) > PARSE_INLINE_BYTES:
        graph = await asyncio.to_thread(_graph_of, raw, model, limits)
    else:
        graph = _graph_of(raw, model, limits)
    res = await writer.put_graph(graph, expect)
    response.status_code = 201 if res.created else 200
    _etag(response, res.state.version)
    if res.created:
        response.headers["Location"] = f"/models/{model}"
    return ModelWritten(
        model=model,
        version=res.state.version,
        graph_hash=res.state.graph_hash,
        created=res.created,
        dropped_profiles=res.dropped_profiles,
        stored=res.stored,
    )


def _graph_of(raw: bytes, model: str, limits: GraphLimits) -> CostGraph:
    """The cost graph a PUT body holds (`CostGraphBody`, naming `model`), checked against
    `limits`; 422 naming the bad field. O(len(raw))."""
    body = validated(CostGraphBody, raw)
    if body.model != model:
        detail = f"model: the body names {body.model!r} but the path names {model!r}"
        raise ApiProblem(422, detail, loc=("body", "model"))
    try:
        graph = CostGraph.from_dict(body.model_dump(exclude_unset=True), limits)
    except CostGraphError as exc:
        raise ApiProblem(422, f"cost graph: {exc}") from None
    return graph


@router.get(
    "/{model}",
    response_model=CostGraphBody,
    response_model_exclude_unset=True,
    dependencies=READ,
    responses=NOT_FOUND,
)
async def get_model(model: ModelName, cache: ModelCacheDep, response: Response) -> dict:
    """The model's cost graph as stored; `ETag: "<version>"`."""
    st = await _model_or_404(cache, model)
    _etag(response, st.version)
    return st.graph.to_dict()


@router.delete(
    "/{model}", status_code=204, response_class=Response, dependencies=WRITE, responses={**NOT_FOUND, **CONFLICT}
)
async def delete_model(model: ModelName, store: StoreDep, expect: IfMatchDep) -> Response:
    """Forget a model and its profiles, and end its devices' leases."""
    if not await store.delete_model(model, expect):
        raise ApiProblem(404, f"unknown model {model!r}")
    return Response(status_code=204)


@router.get("/{model}/profiles", response_model=ProfileList, dependencies=READ, responses=NOT_FOUND)
async def list_profiles(model: ModelName, cache: ModelCacheDep, response: Response) -> ProfileList:
    """Every uploaded profile of the model, by tier; `ETag: "<version>"`."""
    st = await _model_or_404(cache, model)
    _etag(response, st.version)
    profiles = {t: StoredProfile(**p.to_dict()) for t, p in sorted(st.profiles.items())}
    return ProfileList(model=model, version=st.version, profiles=profiles)


@router.put(
    "/{model}/profiles/{tier}",
    response_model=ProfileWritten,
    dependencies=WRITE,
    responses={201: {"description": "created", "model": ProfileWritten}, **NOT_FOUND, **CONFLICT},
)
async def put_profile(
    model: ModelName, tier: TierName, body: ProfileBody, writer: ModelWriterDep, expect: IfMatchDep, response: Response
) -> ProfileWritten:
    """Store (201) or replace (200) one tier's measured timings (ms per node of the model's graph)."""
    prof = Profile.make(tier, body.kind, dict(body.timings_ms), body.meta)
    try:  # the node names are checked against the graph the write finds, not this replica's cache
        res = await writer.put_profile(model, prof, expect)
    except UnknownNodes as exc:
        raise ApiProblem(422, str(exc), loc=("body", "timings_ms")) from None
    if res is None:
        raise ApiProblem(404, f"unknown model {model!r}")
    response.status_code = 201 if res.created else 200
    _etag(response, res.state.version)
    missing = [n.name for n in res.state.graph.nodes if n.name not in prof.timings_ms]
    return ProfileWritten(
        model=model,
        tier=tier,
        kind=prof.kind,
        version=res.state.version,
        created=res.created,
        profile_hash=prof.hash,
        nodes_timed=len(prof.timings_ms),
        nodes_missing=missing[:20],
        stored=res.stored,
    )


@router.delete(
    "/{model}/profiles/{tier}",
    status_code=204,
    response_class=Response,
    dependencies=WRITE,
    responses={**NOT_FOUND, **CONFLICT},
)
async def delete_profile(model: ModelName, tier: TierName, writer: ModelWriterDep, expect: IfMatchDep) -> Response:
    """Forget one tier's profile of the model."""
    res = await writer.delete_profile(model, tier, expect)
    if res is None:
        raise ApiProblem(404, f"unknown model {model!r}")
    if res is False:
        raise ApiProblem(404, f"model {model!r} has no profile {tier!r}")
    return Response(status_code=204)
