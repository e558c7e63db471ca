"""Edge-worker registry: heartbeats in, live workers out."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from dapdee.planner.deps import AuthDep, SettingsDep, StoreDep, check_names
from dapdee.planner.store import Worker

router = APIRouter(prefix="/workers", tags=["workers"])


class Heartbeat(BaseModel):
    """An edge worker's periodic report; it stays live for DAPDEE_WORKER_TTL_S after it."""

    model_config = ConfigDict(allow_inf_nan=False, extra="ignore")

    url: str = Field(min_length=1, max_length=2048, description="base URL devices reach the worker at")
    models: list[str] = Field(max_length=1000)
    tier: str = Field(
        min_length=1, max_length=64, description="hardware tier: its edge profile times the plan"
    )
    load: float = Field(ge=0, lt=1)
    inflight: int = Field(0, ge=0, le=10**9)
    queue_depth: int = Field(0, ge=0, le=10**9)


@router.post("/heartbeat", dependencies=[AuthDep])
async def heartbeat(hb: Heartbeat, store: StoreDep, settings: SettingsDep) -> dict[str, Any]:
    """Register or refresh a worker."""
    parts = urlsplit(hb.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HTTPException(422, f"url: expected an http(s) URL, got {hb.url!r}")
    await check_names("models", hb.models)
    await check_names("tier", [hb.tier])
    w = Worker(
        url=hb.url.rstrip("/"),
        models=tuple(dict.fromkeys(hb.models)),
        tier=hb.tier,
        load=hb.load,
        inflight=hb.inflight,
        queue_depth=hb.queue_depth,
        expires_at=time.time() + settings.worker_ttl_s,
    )
    shared = await store.heartbeat(w)
    return {"url": w.url, "ttl_s": settings.worker_ttl_s, "shared": shared}


@router.get("")
async def list_workers(store: StoreDep) -> dict[str, Any]:
    """Live workers, least loaded first."""
    now = time.time()
    out = []
    for w in await store.live_workers():
        d = w.to_dict()
        d["expires_in_s"] = round(w.expires_at - now, 3)
        out.append(d)
    return {"workers": out}
