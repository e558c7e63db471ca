"""FastAPI dependencies: the app's store, settings and metrics, and bearer-token auth."""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from dapdee.names import ModelError, check_model_name
from dapdee.planner.config import Settings
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.store import Store


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> PlannerMetrics:
    return request.app.state.metrics


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[PlannerMetrics, Depends(get_metrics)]


async def require_token(request: Request) -> None:
    """(Dependencies here are `async def` so FastAPI calls them inline, not in a thread pool.)
    When DAPDEE_API_TOKEN is set, mutating endpoints need `Authorization: Bearer <token>`:
    401 without one, 403 with a wrong one (constant-time comparison)."""
    token = request.app.state.settings.api_token
    if not token:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(403, "wrong bearer token")


AuthDep = Depends(require_token)


async def check_name(what: str, name: str) -> str:
    """See check_names."""
    await check_names(what, [name])
    return name


async def check_names(what: str, names: list[str]) -> None:
    """A model or tier name safe for URLs and Redis keys (dapdee.names.check_model_name),
    else HTTP 422 naming it."""
    for name in names:
        try:
            check_model_name(name)
        except ModelError as exc:
            raise HTTPException(422, f"{what}: {exc}") from None


def _safe_input(v: Any) -> Any:
    """Echo short scalar inputs only; NaN/inf as text, so the answer is always valid JSON."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, str) and len(v) <= 100:
        return v
    return None


def validation_body(errors: Iterable[dict[str, Any]], prefix: tuple[Any, ...] = ()) -> bytes:
    """FastAPI's 422 shape, `{"detail": [{"type", "loc", "msg", "input"}]}`, as strict JSON bytes
    (FastAPI's own handler fails on NaN inputs). O(errors)."""
    detail = [
        {
            "type": e.get("type"),
            "loc": [*prefix, *e.get("loc", ())],
            "msg": e.get("msg"),
            "input": _safe_input(e.get("input")),
        }
        for e in errors
    ]
    return json.dumps({"detail": detail}, allow_nan=False, default=str).encode()
