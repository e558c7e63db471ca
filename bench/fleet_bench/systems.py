"""The compared systems: how each one's devices get their plans, and the planner it runs
against. Every device is the same runtime; only its plan source and the planner's settings
differ.

- DAPDEE-fleet: fleet planning on (leases, admission, a periodic rebalance); devices ask
  `POST /plan` with `device_id` + `frame_rate` and re-plan at the lease's `replan_after_s`, on
  drift and on edge trouble.
- DAPDEE-independent: `DAPDEE_FLEET_PLANNING=false` (each device planned against the worker's
  heartbeat load); devices ask without `device_id` and re-plan on drift, plan age, edge trouble.
- Edge-Only, Device-Only, DADS: one `POST /plan {"baseline": ...}` at the device's sensed
  conditions at start-up, then that plan, fixed (baselines hold no lease and are priced at the
  edge load the leases put on the worker, zero here: no device of these systems holds one).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from dapdee.client import ApiError, TransportError
from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.device.config import Requirements
from dapdee.device.plan_source import (
    FixedPlanSource,
    PlannerPlanSource,
    PlanSource,
    retry_delay,
    transient,
    unavailable,
)
from dapdee.device.plans import plan_from_answer


@dataclass(frozen=True)
class System:
    """`key` on the command line, `label` in tables; `fleet_planning` the planner's setting;
    `named`: devices send their `device_id` (leases); `baseline`: a fixed baseline plan."""

    key: str
    label: str
    fleet_planning: bool
    named: bool = False
    baseline: str | None = None


SYSTEMS: dict[str, System] = {
    s.key: s
    for s in (
        System("fleet", "DAPDEE-fleet", True, named=True),
        System("independent", "DAPDEE-independent", False),
        System("edge-only", "Edge-Only", True, baseline="edge-only"),
        System("device-only", "Device-Only", True, baseline="device-only"),
        System("dads", "DADS", True, baseline="dads"),
    )
}
BASELINES = tuple(k for k, s in SYSTEMS.items() if k != "fleet")


@dataclass(frozen=True)
class PlannerSettings:
    """The planner settings of the fleet runs (DAPDEE_* variables); the planner's defaults
    unless the command line changes them."""

    rho_max: float = 0.9
    rebalance_s: float = 10.0
    replan_after_s: float = 5.0
    lease_ttl_s: float = 30.0

    def env(self, system: System) -> dict[str, str]:
        return {
            "DAPDEE_FLEET_PLANNING": "true" if system.fleet_planning else "false",
            "DAPDEE_RHO_MAX": f"{self.rho_max:g}",
            "DAPDEE_REBALANCE_S": f"{self.rebalance_s:g}",
            "DAPDEE_REPLAN_AFTER_S": f"{self.replan_after_s:g}",
            "DAPDEE_LEASE_TTL_S": f"{self.lease_ttl_s:g}",
        }


async def plan_source(
    system: System,
    planner: Any,
    graph: CostGraph,
    requirements: Requirements,
    tier: str,
    device_id: str,
    cond: Conditions,
) -> PlanSource:
    """The device's plan source under `system`. `planner` is the device's planner client (an
    `AsyncPlannerClient` or anything with its `plan`, `release` and `base_url`); `cond` are the
    device's sensed conditions, which a baseline's one plan request states. Raises
    `dapdee.client.ClientError` or `PlanError` when a baseline plan cannot be had."""
    named = device_id if system.named else None
    source = PlannerPlanSource(planner, graph, requirements, tier, named, ready_timeout_s=60.0)
    if system.baseline is None:
        return source
    answer = await _baseline_answer(planner, source.body(cond) | {"baseline": system.baseline})
    body = source.body(cond)
    plan = plan_from_answer(answer.model_dump(mode="json"), graph, body["bandwidth_mbps"], body["device_load"])
    return FixedPlanSource(plan)


async def _baseline_answer(planner: Any, body: dict[str, Any], timeout_s: float = 60.0) -> Any:
    """The planner's answer to a baseline's plan request, asked again while the planner refuses
    it for now or does not answer (`transient`: e.g. a 503 while its min-cut threads are busy,
    as when 64 DADS devices start at once), as the device runtime asks for its first plan; the
    refusal once `timeout_s` has passed. O(attempts)."""
    start = time.monotonic()
    while True:
        try:
            return await planner.plan(body)
        except (ApiError, TransportError) as exc:  # as the runtime's own plan request (`unavailable`)
            refused, left = unavailable(exc), timeout_s - (time.monotonic() - start)
            if not transient(refused) or left <= 0:
                raise
            await asyncio.sleep(retry_delay(refused.retry_after_s, left))
