"""Devices' leases on the shared edge: read one (any role), end one (the device or an admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from dapdee.api.planner import DeviceState, Name
from dapdee.planner.deps import StoreDep
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.problems import ApiProblem
from dapdee.web.security import ANY_ROLE, DEVICE_OR_ADMIN, require

router = APIRouter(prefix="/devices", tags=["fleet"])

DeviceId = Annotated[Name, Path(description="the device_id it planned with")]


@router.get(
    "/{device_id}", response_model=DeviceState, response_model_exclude_unset=True, dependencies=[require(ANY_ROLE)]
)
async def get_device(device_id: DeviceId, store: StoreDep) -> DeviceState:
    """The device's live lease and the plan now assigned to it (by its last POST /plan or by a
    rebalance since, priced as handed out). 404 when it holds no live lease (always, on a
    planner without Redis: it keeps no leases); 503 while Redis, where leases live, is
    unavailable."""
    try:
        state = await store.fleet.state(device_id)
    except RedisUnavailable:
        raise _leases_away() from None
    if state is None:
        raise ApiProblem(404, f"device {device_id!r} holds no live lease")
    return DeviceState.model_validate(state)


@router.delete("/{device_id}", status_code=204, response_class=Response, dependencies=[require(DEVICE_OR_ADMIN)])
async def delete_device(device_id: DeviceId, store: StoreDep) -> Response:
    """End the device's lease at once (its reservation on the worker is freed). 404 without one
    (always, on a planner without Redis); 503 while Redis is unavailable."""
    try:
        ended = await store.fleet.release(device_id)
    except RedisUnavailable:
        raise _leases_away() from None
    if not ended:
        raise ApiProblem(404, f"device {device_id!r} holds no live lease")
    return Response(status_code=204)


def _leases_away() -> ApiProblem:
    """503 while Redis (where leases live) is unavailable."""
    return ApiProblem(503, "leases live in Redis, which is unavailable here; retry", headers={"Retry-After": "1"})
