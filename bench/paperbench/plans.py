"""The planners compared, and what a table shows of a plan (exit, cut, bytes, predictions)."""

from __future__ import annotations

from typing import Any

from dapdee.costgraph import CostGraph

PLANNERS = ("device-only", "edge-only", "neurosurgeon", "dads", "edgent", "dapdee")
BASELINES = PLANNERS[:-1]
LABEL = {
    "device-only": "Device-Only",
    "edge-only": "Edge-Only",
    "neurosurgeon": "Neurosurgeon",
    "dads": "DADS",
    "edgent": "Edgent",
    "dapdee": "DAPDEE",
}


def plan_key(plan: dict[str, Any]) -> str:
    """Identity of a plan for sharing measurements: exit + sorted device set."""
    return plan["exit"]["name"] + "|" + ",".join(sorted(plan["device_nodes"]))


def cut_kind(plan: dict[str, Any]) -> str:
    """`device-only` (no edge nodes), `edge-only` (no device nodes) or `mid` (both sides compute)."""
    if not plan["edge_nodes"]:
        return "device-only"
    return "edge-only" if not plan["device_nodes"] else "mid"


def plan_summary(plan: dict[str, Any], graph: CostGraph) -> dict[str, Any]:
    """What a table shows of a plan: exit, cut size and kind, the tensors sent and their bytes,
    the device's share of the exit's FLOPs, the planner's predictions. O(V)."""
    dev = set(plan["device_nodes"])
    anc = graph.ancestors(graph.exit(plan["exit"]["name"]).node)
    flops_all = sum(graph.node(n).flops for n in anc) or 1
    flops_dev = sum(graph.node(n).flops for n in dev)
    names = [e.name for e in graph.exits]
    return {
        "exit": plan["exit"]["name"],
        "exit_index": names.index(plan["exit"]["name"]) + 1,
        "exits": len(names),
        "exit_accuracy": plan["exit"]["accuracy"],
        "device_nodes": len(dev),
        "exit_nodes": len(anc),
        "kind": cut_kind(plan),
        "sent_after": [t["node"] for t in plan["transfer"]] if plan["edge_nodes"] else [],
        "bytes": sum(t["bytes"] for t in plan["transfer"]) if plan["edge_nodes"] else 0,
        "device_flops": flops_dev,
        "device_flops_frac": flops_dev / flops_all,
        "predicted": plan["predicted"],
        "mode": plan.get("mode"),
        "planner": plan.get("planner"),
        "constraints_met": plan.get("constraints_met"),
    }
