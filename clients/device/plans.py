"""Plans the runtime executes, from three places: a planner's answer (checked field by field
against the device's own cost graph before it is used), a fixed cut (benchmarks, `--edge`
runs without a planner), and the Device-Only plan (the run's floor when no edge may be used).

Every plan is priced by the one cost model (`dapdee.costmodel.partition`); a planner answer is
accepted only when its exit, device set, edge set and transfer are exactly what the device's
graph gives for that cut (for a plan made with confidence exits: the transfer and head sides of
`dapdee.progressive_run.split_sides`) and its numbers are finite and non-negative. O(V + E) per
plan.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from dapdee.costgraph import CostGraph, CostGraphError, is_finite_number
from dapdee.costmodel import Conditions, Partition, partition
from dapdee.device.progressive import plan_sides, transfer_of, with_heads
from dapdee.device.types import Lease, Plan, PlanError
from dapdee.progressive_run import Sides

MAX_PLAN_MS = 1e9  # bigger predictions are refused (a plan's numbers are bounded far below)
MAX_LEASE_S = 86400.0
MAX_URL = 2048
MAX_ID = 64


def _number(raw: Mapping[str, Any], key: str, where: str, upper: float, optional: bool = False) -> float | None:
    v = raw.get(key)
    if v is None and optional:
        return None
    if not is_finite_number(v) or not 0 <= v <= upper:  # an integer past a float's range too
        raise PlanError(f"{where}.{key}: expected a finite number in [0, {upper:g}], got {v!r}")
    return float(v)


def _names(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = raw.get(key)
    if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
        raise PlanError(f"plan.{key}: expected a list of node names")
    return tuple(v)


def _worker_url(v: Any, where: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > MAX_URL or not v.startswith(("http://", "https://")):
        raise PlanError(f"{where}: expected an http(s) URL or null, got {str(v)[:80]!r}")
    return v.rstrip("/")


def parse_lease(raw: Any, asked_at: float) -> Lease | None:
    """The plan's `lease` object as a `Lease` counted from `asked_at` (when the plan request was
    sent: see `Lease`), None when absent. `expires_in_s` 0 means the planner could not store the
    lease (it runs without Redis, or Redis is away): a `Lease` with `stored` False, which holds
    no reservation but keeps `replan_after_s`. PlanError naming the field when a number is not
    finite, negative or over a day, or the worker is not a URL. O(1)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise PlanError("plan.lease: expected an object")
    expires = _number(raw, "expires_in_s", "plan.lease", MAX_LEASE_S) or 0.0
    return Lease(
        worker=_worker_url(raw.get("worker"), "plan.lease.worker"),
        frames_per_s=_number(raw, "frames_per_s", "plan.lease", 1e5) or 0.0,
        edge_ms_per_frame=_number(raw, "edge_ms_per_frame", "plan.lease", MAX_PLAN_MS) or 0.0,
        expires_in_s=expires,
        replan_after_s=_number(raw, "replan_after_s", "plan.lease", MAX_LEASE_S) or 0.0,
        received_at=asked_at,
        stored=expires > 0.0,
    )


def _checked_partition(graph: CostGraph, raw: Mapping[str, Any]) -> tuple[Partition, Sides | None]:
    """The partition the answer names, re-derived from the device's graph, with its progressive
    sides when the answer has them; PlanError when the answer's sets or transfer differ."""
    ex = raw.get("exit")
    if not isinstance(ex, Mapping) or not isinstance(ex.get("name"), str):
        raise PlanError("plan.exit: expected an object with a name")
    if ex["name"] not in {e.name for e in graph.exits}:
        raise PlanError(f"plan.exit.name: {ex['name'][:64]!r} is not an exit of model {graph.model!r}")
    device = _names(raw, "device_nodes")
    try:
        part = partition(graph, ex["name"], device)
    except (CostGraphError, KeyError) as exc:
        raise PlanError(f"plan.device_nodes: {exc}") from None
    if set(device) != set(part.device_nodes) or len(device) != len(part.device_nodes):
        raise PlanError("plan.device_nodes: repeated or unknown nodes")
    if set(_names(raw, "edge_nodes")) != set(part.edge_nodes):
        raise PlanError("plan.edge_nodes: not the rest of the exit's nodes (A(exit) minus device_nodes)")
    transfer = raw.get("transfer")
    if not isinstance(transfer, list) or not all(isinstance(t, Mapping) for t in transfer):
        raise PlanError("plan.transfer: expected a list of {node, bytes}")
    got = sorted(
        (t["node"], t["bytes"])
        for t in transfer
        if isinstance(t.get("node"), str) and isinstance(t.get("bytes"), int) and not isinstance(t["bytes"], bool)
    )
    sides = plan_sides(raw, graph, part.exit, part.device_nodes)
    want = part.transfer if sides is None else transfer_of(graph, sides)
    if len(got) != len(transfer) or got != sorted(want):
        raise PlanError("plan.transfer: not the tensors this cut sends (names or sizes differ from the model's)")
    return part, sides


def plan_from_answer(
    raw: Any, graph: CostGraph, bandwidth_mbps: float, device_load: float, now: float | None = None
) -> Plan:
    """A planner answer (the plan JSON of DESIGN §3.3, as a mapping) checked against `graph`
    (the device's cost graph of the same model): model name, exit, a downward-closed device
    set, the edge set and transfer this cut implies, finite non-negative predictions (at most
    MAX_PLAN_MS), a URL or null as worker, and the lease. `now`: when the plan was asked for
    (default: now); the plan's age and its lease count from it, so a caller passes the time it
    sent the request (the planner starts the lease before it answers). Raises PlanError naming
    the first bad field. O(V + E)."""
    if not isinstance(raw, Mapping):
        raise PlanError("plan: expected a JSON object")
    if raw.get("model") != graph.model:
        raise PlanError(f"plan.model: expected {graph.model!r}, got {str(raw.get('model'))[:64]!r}")
    plan_id = raw.get("plan_id")
    if not isinstance(plan_id, str) or not 0 < len(plan_id) <= MAX_ID:
        raise PlanError("plan.plan_id: expected a string of 1-64 characters")
    predicted = raw.get("predicted")
    if not isinstance(predicted, Mapping):
        raise PlanError("plan.predicted: expected an object")
    latency = _number(predicted, "latency_ms", "plan.predicted", MAX_PLAN_MS)
    bottleneck = _number(predicted, "bottleneck_ms", "plan.predicted", MAX_PLAN_MS)
    expected = _number(predicted, "expected_latency_ms", "plan.predicted", MAX_PLAN_MS, optional=True)
    part, sides = _checked_partition(graph, raw)
    now = time.monotonic() if now is None else now
    mode = raw.get("mode")
    return Plan(
        plan_id=plan_id,
        model=graph.model,
        mode=mode if mode in ("latency", "throughput") else "latency",
        exit=part.exit,
        accuracy=graph.exit(part.exit).accuracy,
        device_nodes=part.device_nodes,
        edge_nodes=part.edge_nodes,
        transfer=part.transfer if sides is None else transfer_of(graph, sides),
        predicted_ms=latency or 0.0,
        bottleneck_ms=bottleneck or 0.0,
        edge_worker=_worker_url(raw.get("edge_worker"), "plan.edge_worker"),
        origin="planner",
        requested_at=now,
        bandwidth_mbps=bandwidth_mbps,
        device_load=device_load,
        lease=parse_lease(raw.get("lease"), now),
        progressive=sides,
        expected_ms=expected,
    )


def _priced(graph: CostGraph, part: Partition, cond: Conditions, plan_id: str, origin: str, worker: str | None) -> Plan:
    pred = part.predict(cond)
    return Plan(
        plan_id=plan_id,
        model=graph.model,
        mode="latency",
        exit=part.exit,
        accuracy=graph.exit(part.exit).accuracy,
        device_nodes=part.device_nodes,
        edge_nodes=part.edge_nodes,
        transfer=part.transfer,
        predicted_ms=pred.latency_ms,
        bottleneck_ms=pred.bottleneck_ms,
        edge_worker=worker if part.edge_nodes else None,
        origin=origin,
        requested_at=time.monotonic(),
        bandwidth_mbps=cond.bandwidth_mbps,
        device_load=cond.device_load,
    )


def device_only_plan(graph: CostGraph, cond: Conditions, exit_name: str | None = None) -> Plan:
    """The Device-Only plan: every node of A(exit) on the device (default: the deepest exit),
    priced by the cost model under `cond`. O(V + E)."""
    ex = graph.exit(exit_name)
    part = partition(graph, ex.name, graph.ancestors(ex.node))
    return _priced(graph, part, cond, "device-only", "device-only", None)


def fixed_plan(
    graph: CostGraph,
    exit_name: str | None,
    device_nodes: Iterable[str],
    edge_worker: str | None,
    cond: Conditions,
    plan_id: str = "fixed",
) -> Plan:
    """A plan for a given cut: `device_nodes` on the device (a downward-closed subset of
    A(exit)), the rest of the exit on `edge_worker`, priced under `cond`. CostGraphError when
    the set is not a cut of the exit. O(V + E)."""
    part = partition(graph, exit_name, device_nodes)
    return _priced(graph, part, cond, plan_id, "fixed", edge_worker.rstrip("/") if edge_worker else None)


def plan_from_json(raw: Any, graph: CostGraph, cond: Conditions, edge_worker: str | None = None) -> Plan:
    """A plan JSON (e.g. one a planner or `dapdee plan` wrote earlier) as a fixed plan: checked
    like a planner answer, then re-priced under `cond`; `edge_worker` overrides its worker. A
    plan made with confidence exits keeps its sides, priced as the planner prices them
    (`progressive.with_heads`). Raises PlanError. O(V + E), O(#heads · (V + E)) with heads."""
    checked = plan_from_answer(raw, graph, cond.bandwidth_mbps, cond.device_load)
    worker = edge_worker or checked.edge_worker
    plan = fixed_plan(graph, checked.exit, checked.device_nodes, worker, cond, checked.plan_id)
    return plan if checked.progressive is None else with_heads(plan, graph, cond, checked.progressive)
