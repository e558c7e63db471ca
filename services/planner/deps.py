"""FastAPI dependencies: the app's store (and its model cache and model writer, for the routes
that use only those), settings, metrics and plan runner, and the `If-Match` precondition of
versioned writes. (They are `async def` so FastAPI calls them inline, not in a thread pool.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from dapdee.planner.config import Settings
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.model_writes import ModelWriter
from dapdee.planner.plan_runner import PlanRunner
from dapdee.planner.problems import ApiProblem
from dapdee.planner.store import Store


async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_model_cache(request: Request) -> ModelCache:
    return request.app.state.store.model_cache


async def get_model_writer(request: Request) -> ModelWriter:
    return request.app.state.store.model_writer


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> PlannerMetrics:
    return request.app.state.metrics


@dataclass(frozen=True)
class Planning:
    """What POST /plan works with, handed in as one dependency (each dependency costs FastAPI
    tens of microseconds per request, a sizeable share of a plan's)."""

    store: Store
    metrics: PlannerMetrics
    runner: PlanRunner


async def get_planning(request: Request) -> Planning:
    return request.app.state.planning


async def expected_version(
    if_match: Annotated[
        str | None,
        Header(
            description='`"<version>"` (the ETag of GET /models/{model}): write only if the model is '
            "still at that version, else 409; `*` or absent: no condition",
            max_length=64,
        ),
    ] = None,
) -> int | None:
    """The version an `If-Match` header asks for (None: no condition); 422 naming the header
    when it is not `"<integer>"` or `*`. O(len(header))."""
    if if_match is None or if_match.strip() == "*":
        return None
    text = if_match.strip()
    digits = text[1:-1]
    if len(text) >= 3 and text[0] == text[-1] == '"' and digits.isascii() and digits.isdigit():  # not '²'
        return int(text[1:-1])
    raise ApiProblem(
        422, f'If-Match: expected "<version>" (an ETag of this API) or *, got {if_match!r}', loc=("header", "If-Match")
    )


StoreDep = Annotated[Store, Depends(get_store)]
ModelCacheDep = Annotated[ModelCache, Depends(get_model_cache)]
ModelWriterDep = Annotated[ModelWriter, Depends(get_model_writer)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[PlannerMetrics, Depends(get_metrics)]
PlanningDep = Annotated[Planning, Depends(get_planning)]
IfMatchDep = Annotated[int | None, Depends(expected_version)]
