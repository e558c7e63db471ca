"""Models (cost graphs) and their per-tier profiles."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.planner.deps import AuthDep, StoreDep, check_name
from dapdee.planner.store import ModelState, Profile

router = APIRouter(prefix="/models", tags=["models"])

ModelName = Annotated[str, Path(max_length=64, description="model name (letters, digits, _ . -)")]
TierName = Annotated[str, Path(max_length=64, description="hardware tier name (letters, digits, _ . -)")]


class ProfileBody(BaseModel):
    """Measured timings of one tier: `kind` says which column (device_ms or edge_ms) they fill."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    kind: Literal["device", "edge"]
    timings_ms: dict[str, Annotated[float, Field(ge=0, le=1e7)]] = Field(max_length=1_000_000)
    meta: dict[str, Any] = Field(default_factory=dict)


def _summary(name: str, st: ModelState) -> dict[str, Any]:
    g = st.graph
    return {
        "model": name,
        "graph_hash": st.graph_hash,
        "nodes": len(g.nodes),
        "exits": [e.name for e in g.exits],
        "timings": {"device": g.has_timings("device"), "edge": g.has_timings("edge")},
        "profiles": {t: p.kind for t, p in sorted(st.profiles.items())},
    }


async def _model_or_404(store: Any, name: str) -> ModelState:
    st = await store.get_model(name)
    if st is None:
        raise HTTPException(404, f"unknown model {name!r}")
    return st


@router.get("")
async def list_models(store: StoreDep) -> dict[str, Any]:
    """Every stored model (all replicas' when Redis is reachable) with its profiles."""
    models = await store.list_models()
    return {"models": [_summary(n, st) for n, st in models.items()]}


@router.put(
    "/{model}",
    dependencies=[AuthDep],
    responses={422: {"description": "invalid cost graph or name (reason given)"}},
)
async def put_model(
    model: ModelName,
    store: StoreDep,
    graph_json: dict[str, Any] = Body(
        ...,
        description="a cost graph JSON (DESIGN.md); its `model` must equal the path's",
        media_type="application/json",
    ),
) -> dict[str, Any]:
    """Store (or replace) a model's cost graph. Profiles survive a replacement with the same
    nodes and exits; a different structure drops them (listed in the answer)."""
    await check_name("model", model)
    try:
        graph = CostGraph.from_dict(graph_json)
    except CostGraphError as exc:
        raise HTTPException(422, f"cost graph: {exc}") from None
    if graph.model != model:
        raise HTTPException(422, f"model: the body names {graph.model!r} but the path names {model!r}")
    return await store.put_graph(graph)


@router.get("/{model}")
async def get_model(model: ModelName, store: StoreDep) -> dict[str, Any]:
    """The model's cost graph as stored."""
    st = await _model_or_404(store, model)
    return st.graph.to_dict()


@router.delete("/{model}", dependencies=[AuthDep])
async def delete_model(model: ModelName, store: StoreDep) -> dict[str, Any]:
    """Forget a model and its profiles."""
    if not await store.delete_model(model):
        raise HTTPException(404, f"unknown model {model!r}")
    return {"deleted": model}


@router.get("/{model}/profiles")
async def list_profiles(model: ModelName, store: StoreDep) -> dict[str, Any]:
    """Every uploaded profile of the model, by tier."""
    st = await _model_or_404(store, model)
    return {"model": model, "profiles": {t: p.to_dict() for t, p in sorted(st.profiles.items())}}


@router.put("/{model}/profiles/{tier}", dependencies=[AuthDep])
async def put_profile(model: ModelName, tier: TierName, body: ProfileBody, store: StoreDep) -> dict[str, Any]:
    """Store one tier's measured timings (ms per node, >= 0, nodes of the model's graph)."""
    await check_name("tier", tier)
    st = await _model_or_404(store, model)
    names = {n.name for n in st.graph.nodes}
    unknown = sorted(set(body.timings_ms) - names)
    if unknown:
        raise HTTPException(422, f"timings_ms: unknown nodes {unknown[:5]} (model {model!r})")
    try:
        meta_ok = len(json.dumps(body.meta)) <= 65536
    except (TypeError, ValueError):
        meta_ok = False
    if not meta_ok:
        raise HTTPException(422, "meta: must be a JSON object of at most 64 KiB")
    prof = Profile.make(tier, body.kind, {k: float(v) for k, v in body.timings_ms.items()}, body.meta)
    new = await store.put_profile(model, prof)
    if new is None:
        raise HTTPException(404, f"unknown model {model!r}")
    missing = [n.name for n in new.graph.nodes if n.name not in prof.timings_ms]
    return {
        "model": model,
        "tier": tier,
        "kind": prof.kind,
        "profile_hash": prof.hash,
        "nodes_timed": len(prof.timings_ms),
        "nodes_missing": missing[:20],
    }


@router.delete("/{model}/profiles/{tier}", dependencies=[AuthDep])
async def delete_profile(model: ModelName, tier: TierName, store: StoreDep) -> dict[str, Any]:
    """Forget one tier's profile of the model."""
    res = await store.delete_profile(model, tier)
    if res is None:
        raise HTTPException(404, f"unknown model {model!r}")
    if res is False:
        raise HTTPException(404, f"model {model!r} has no profile {tier!r}")
    return {"deleted": f"{model}/{tier}"}
