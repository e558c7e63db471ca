"""POST /fleet/rebalance: re-solve every worker's leases now (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from dapdee.api.planner import RebalanceAnswer
from dapdee.planner.deps import StoreDep
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.problems import ApiProblem
from dapdee.web.security import ADMIN, require

router = APIRouter(prefix="/fleet", tags=["fleet"])


@router.post(
    "/rebalance",
    response_model=RebalanceAnswer,
    dependencies=[require(ADMIN)],
    responses={503: {"description": "Redis is away (leases live there), or another rebalance held the lock too long"}},
)
async def rebalance(store: StoreDep) -> RebalanceAnswer:
    """Re-solve each worker's leases together (and bring Device-Only leases of the models it serves
    on board where that is better): most devices meeting their requirements, then Σ f·accuracy,
    then the least Σ f·t, within ρ_max of its capacity. Exact up to 64 leases per worker; the
    answer says where it was not, and where leases changed meanwhile (not applied). Devices pick
    up their new plans at their next POST /plan. One rebalance at a time across replicas: this
    one waits for a rebalance that holds the lock (503 when it is still held after 30 s)."""
    try:
        answer = await store.rebalancer.rebalance_on_request()
    except RedisUnavailable:
        detail = "leases live in Redis, which is unavailable; retry"
        raise ApiProblem(503, detail, headers={"Retry-After": "1"}) from None
    if answer is None:
        detail = "another rebalance has held the lock for 30 s; retry"
        raise ApiProblem(503, detail, headers={"Retry-After": "5"})
    return RebalanceAnswer.model_validate(answer)
