"""The device's plan handling on the documented `tiny` graph (docs/DESIGN.md §3.1): a planner
answer is accepted only when it is exactly a cut of the device's own graph with finite numbers;
Device-Only and fixed plans are priced by the cost model; the fallback exit meets a budget; the
re-plan policy and the lease rules; edge timeouts are always finite; settings are checked."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.costmodel import Conditions
from dapdee.device.compute import nodes_to_run
from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig, default_tier
from dapdee.device.fallback import fallback_exit, local_cost_ms
from dapdee.device.plan_source import FixedPlanSource, PlannerPlanSource
from dapdee.device.plans import device_only_plan, fixed_plan, plan_from_answer, plan_from_json
from dapdee.device.replanner import ReplanPolicy
from dapdee.device.sensing import Sensing
from dapdee.device.types import Lease, PlanError

TINY = {
    "model": "tiny",
    "input": {"name": "x", "shape": [1, 3, 64, 64], "dtype": "float32", "bytes": 49152},
    "nodes": [
        {"name": "conv1", "op": "conv2d", "inputs": ["x"], "out_bytes": 32768, "device_ms": 4.0, "edge_ms": 0.5,
         "shape": [1, 2, 64, 64]},
        {"name": "pool1", "op": "maxpool2d", "inputs": ["conv1"], "out_bytes": 8192, "device_ms": 1.0,
         "edge_ms": 0.125, "shape": [1, 2, 32, 32]},
        {"name": "exit1_fc", "op": "linear", "inputs": ["pool1"], "out_bytes": 40, "device_ms": 0.5,
         "edge_ms": 0.0625, "shape": [1, 10]},
        {"name": "branch_a", "op": "conv2d", "inputs": ["pool1"], "out_bytes": 8192, "device_ms": 12.0,
         "edge_ms": 1.5, "shape": [1, 2, 32, 32]},
        {"name": "branch_b", "op": "conv2d", "inputs": ["pool1"], "out_bytes": 8192, "device_ms": 12.0,
         "edge_ms": 1.5, "shape": [1, 2, 32, 32]},
        {"name": "add", "op": "add", "inputs": ["branch_a", "branch_b"], "out_bytes": 8192, "device_ms": 0.25,
         "edge_ms": 0.03125, "shape": [1, 2, 32, 32]},
        {"name": "fc", "op": "linear", "inputs": ["add"], "out_bytes": 40, "device_ms": 1.0, "edge_ms": 0.125,
         "shape": [1, 10]},
    ],
    "exits": [{"name": "exit1", "node": "exit1_fc", "accuracy": 0.81}, {"name": "final", "node": "fc",
                                                                         "accuracy": 0.9}],
}  # fmt: skip
G = CostGraph.from_dict(TINY)
# the planner's answer of DESIGN.md §3.3 (8 Mbit/s, 5 ms, load 0.2, 25 ms budget)
ANSWER: dict[str, Any] = {
    "plan_id": "d96eae44ba17d59f",
    "model": "tiny",
    "mode": "latency",
    "planner": "dapdee",
    "exit": {"name": "final", "accuracy": 0.9},
    "device_nodes": ["conv1", "pool1"],
    "edge_nodes": ["branch_a", "branch_b", "add", "fc"],
    "transfer": [{"node": "pool1", "bytes": 8192}],
    "predicted": {"latency_ms": 22.59825, "device_ms": 6.25, "transfer_ms": 13.192, "edge_ms": 3.15625,
                  "bottleneck_ms": 8.192, "throughput_fps": 122.0703125, "accuracy": 0.9},
    "constraints_met": True,
    "approximate": False,
    "edge_worker": "http://127.0.0.1:8001/",
    "lease": {"device_id": "cam-7", "model": "tiny", "worker": "http://127.0.0.1:8001", "frames_per_s": 10.0,
              "edge_ms_per_frame": 3.15625, "expires_in_s": 30.0, "replan_after_s": 10.0},
}  # fmt: skip
COND = Conditions(8.0, 5.0, 0.2, 0.0)


def test_a_valid_answer_becomes_a_plan() -> None:
    p = plan_from_answer(ANSWER, G, 8.0, 0.2, now=100.0)
    assert (p.exit, p.device_nodes, p.transfer) == ("final", ("conv1", "pool1"), (("pool1", 8192),))
    assert p.edge_nodes == ("branch_a", "branch_b", "add", "fc") and p.cut == 2
    assert p.edge_worker == "http://127.0.0.1:8001" and p.predicted_ms == 22.59825
    assert p.lease is not None and (p.lease.expires_at, p.lease.replan_at) == (130.0, 110.0)


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(ANSWER)
    d = raw
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("predicted", "latency_ms"), math.inf, "latency_ms"),
        (("predicted", "latency_ms"), "x", "latency_ms"),
        (("predicted", "bottleneck_ms"), -1.0, "bottleneck_ms"),
        (("predicted", "latency_ms"), 1e300, "latency_ms"),
        (("predicted", "latency_ms"), 10**400, "latency_ms"),  # an integer past a float's range
        (("model",), "other", "model"),
        (("exit", "name"), "exit9", "exit.name"),
        (("device_nodes",), ["pool1"], "device_nodes"),  # not downward closed
        (("device_nodes",), ["conv1", "pool1", "nope"], "device_nodes"),
        (("edge_nodes",), ["fc"], "edge_nodes"),
        (("transfer",), [{"node": "pool1", "bytes": 1 << 40}], "transfer"),  # an oversized tensor
        (("transfer",), [{"node": "pool1", "bytes": "8192"}], "transfer"),
        (("edge_worker",), "file:///etc/passwd", "edge_worker"),
        (("lease", "expires_in_s"), math.nan, "lease.expires_in_s"),
        (("lease", "replan_after_s"), -3, "lease.replan_after_s"),
        (("plan_id",), 7, "plan_id"),
    ],
)
def test_a_bad_answer_is_refused_naming_the_field(path: tuple[str, ...], value: Any, field: str) -> None:
    with pytest.raises(PlanError, match=field.replace(".", r"\.")):
        plan_from_answer(_with(path, value), G, 8.0, 0.2)


def test_device_only_and_fixed_plans_are_priced_by_the_cost_model() -> None:
    only = device_only_plan(G, COND)
    assert only.device_nodes == ("conv1", "pool1", "branch_a", "branch_b", "add", "fc") and not only.uses_edge
    assert only.predicted_ms == pytest.approx((4 + 1 + 12 + 12 + 0.25 + 1) / 0.8)
    split = fixed_plan(G, "final", ["conv1", "pool1"], "http://e:1/", COND)
    assert split.predicted_ms == pytest.approx(22.59825) and split.edge_worker == "http://e:1"
    assert fixed_plan(G, "exit1", ["conv1", "pool1", "exit1_fc"], "http://e:1", COND).edge_worker is None
    with pytest.raises(CostGraphError):
        fixed_plan(G, "final", ["pool1"], None, COND)
    again = plan_from_json(ANSWER, G, COND, edge_worker="http://other:2")
    assert again.origin == "fixed" and again.edge_worker == "http://other:2" and again.lease is None


def test_fallback_exit_meets_the_budget_or_takes_the_cheapest() -> None:
    # finishing `final` from pool1 costs 25.25 ms at load 0; exit1 costs 0.5 ms
    have = {"x", "conv1", "pool1"}
    assert local_cost_ms(G, "final", have, 0.0) == pytest.approx(25.25)
    assert local_cost_ms(G, "final", have, 0.5) == pytest.approx(50.5)
    assert fallback_exit(G, "final", have, 10.0, None, 0.0) == "final"  # no budget
    assert fallback_exit(G, "final", have, 10.0, 40.0, 0.0) == "final"  # 35.25 <= 40
    assert fallback_exit(G, "final", have, 20.0, 40.0, 0.0) == "exit1"  # 45.25 > 40, 20.5 fits
    assert fallback_exit(G, "final", set(), 100.0, 40.0, 0.0) == "exit1"  # nothing fits: the cheapest
    assert fallback_exit(G, "exit1", set(), 1e9, 1.0, 0.0) == "exit1"  # never deeper than planned


def test_edge_timeouts_are_always_finite() -> None:
    cfg = RuntimeConfig(timeout_floor_ms=100.0, timeout_max_ms=5000.0)
    assert cfg.edge_timeout_s(50.0) == pytest.approx(0.15)
    assert cfg.edge_timeout_s(10.0) == pytest.approx(0.1)  # the floor
    for pred in (math.inf, math.nan, None, 1e300):
        assert math.isfinite(cfg.edge_timeout_s(pred)) and cfg.edge_timeout_s(pred) <= 5.0


def test_settings_are_checked() -> None:
    for bad in ({"mode": "fast"}, {"frame_rate": 0}, {"min_accuracy": 1.5}, {"latency_budget_ms": math.inf}):
        with pytest.raises(ValueError):
            Requirements(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max in flight"):
        RuntimeConfig(max_inflight=0)
    with pytest.raises(ValueError, match="planner URL"):
        PlannerConfig("127.0.0.1:80", "t")
    assert Requirements(frame_rate=5).pipelined and not Requirements(mode="latency").pipelined
    assert Requirements(20.0, None, 5.0, "auto").plan_fields() == {
        "mode": "auto",
        "latency_budget_ms": 20.0,
        "frame_rate": 5.0,
    }
    assert default_tier(2.5) == "device-k2_5"


def test_replan_policy_reasons() -> None:
    cfg = RuntimeConfig(replan_threshold=0.2, plan_max_age_s=10.0)
    policy = ReplanPolicy(cfg)
    plan = plan_from_answer(ANSWER, G, 8.0, 0.2, now=100.0)
    s = Sensing(prior_mbps=8.0, fixed_load=0.2)
    assert policy.reason(plan, s, 105.0, None) is None
    assert policy.reason(plan, s, 105.0, "edge trouble") == "edge trouble"
    assert policy.reason(plan, s, 110.0, None) == "lease replan_after_s"
    assert policy.reason(plan, s, 131.0, None) == "lease expired"
    s.bandwidth.estimate_mbps = 5.0
    assert policy.reason(plan, s, 105.0, None) == "bandwidth drift"
    s.bandwidth.estimate_mbps, s.fixed_load = 8.0, 0.5
    assert policy.reason(plan, s, 105.0, None) == "load drift"
    unleased = plan_from_answer(_with(("lease",), None), G, 8.0, 0.2, now=100.0)
    s.fixed_load = 0.2
    assert policy.reason(unleased, s, 109.0, None) is None
    assert policy.reason(unleased, s, 111.0, None) == "plan age"


def test_during_an_outage_a_lease_is_kept_until_it_expires_then_device_only() -> None:
    source = PlannerPlanSource(None, G, Requirements(frame_rate=10.0), "phone", "cam-7")  # type: ignore[arg-type]
    plan = plan_from_answer(ANSWER, G, 8.0, 0.2, now=100.0)
    assert source.meanwhile(plan, COND, 129.9) is plan
    after = source.meanwhile(plan, COND, 130.0)
    assert after.origin == "device-only" and not after.uses_edge
    unleased = plan_from_answer(_with(("lease",), None), G, 8.0, 0.2, now=100.0)
    assert source.meanwhile(unleased, COND, 1e9) is unleased  # no lease: the last plan is kept
    lease = Lease(None, 10.0, 0.0, 30.0, 10.0, 0.0)
    assert lease.replan_at == 10.0
    fixed = FixedPlanSource(plan)
    assert fixed.meanwhile(plan, COND, 1e9) is plan and not fixed.replans
    with pytest.raises(ValueError, match="frame rate"):
        PlannerPlanSource(None, G, Requirements(), "phone", "cam-7")  # type: ignore[arg-type]
    body = source.body(Conditions(2e6, 5.0, 0.99, 0.0))
    assert body["bandwidth_mbps"] == 1e6 and body["device_load"] == 0.95 and body["device_id"] == "cam-7"
    assert body["frame_rate"] == 10.0 and body["device_tier"] == "phone"


def test_a_lease_the_planner_could_not_store_is_renewed_but_never_lapses() -> None:
    """`expires_in_s` 0 (the planner's Redis was away): the device holds no reservation, so the
    plan never turns Device-Only because of it, but it asks again at `replan_after_s`."""
    source = PlannerPlanSource(None, G, Requirements(frame_rate=10.0), "phone", "cam-7")  # type: ignore[arg-type]
    plan = plan_from_answer(_with(("lease", "expires_in_s"), 0.0), G, 8.0, 0.2, now=100.0)
    lease = plan.lease
    assert lease is not None and not lease.stored and lease.expires_at == math.inf and lease.replan_at == 110.0
    assert source.meanwhile(plan, COND, 1e9) is plan
    policy, s = ReplanPolicy(RuntimeConfig(plan_max_age_s=1e6)), Sensing(prior_mbps=8.0, fixed_load=0.2)
    assert policy.reason(plan, s, 109.9, None) is None
    assert policy.reason(plan, s, 110.0, None) == "lease not stored"
    stored = plan_from_answer(ANSWER, G, 8.0, 0.2, now=100.0)
    assert stored.lease is not None and stored.lease.stored
    assert policy.reason(stored, s, 110.0, None) == "lease replan_after_s"


def test_emulated_compute_runs_what_the_cut_needs() -> None:
    assert nodes_to_run(G, {"x"}, ["pool1"]) == ["conv1", "pool1"]
    assert nodes_to_run(G, {"x", "pool1"}, ["fc"]) == ["branch_a", "branch_b", "add", "fc"]
    with pytest.raises(ValueError, match="input is missing"):
        nodes_to_run(G, set(), ["conv1"])
