"""Confidence exits on the device: what the runtime needs to run a plan made with
`confidence_exits: true` (DESIGN §8) the way the planner priced it.

- `plan_sides`: the plan's two sides (`dapdee.progressive_run.split_sides` on the device's own
  cost graph), checked against the answer's `progressive.heads` and `transfer`.
- `confidence_graph`: the device's cost graph with the artifact's calibrated thresholds, or the
  clear start-up error when confidence exits are asked for and the model has none.
- `with_heads`: a Device-Only or fixed (`--plan`) plan run with confidence exits.
- `device_answer`: the exit and logits of a frame after the device's part, when a device head
  (or, with no edge part, the planned exit) answered it.
- `edge_exit`: the exit an edge answer names for the frame, checked against the plan's heads.

The compute itself is `dapdee.progressive_run.run_part` on the device's compute thread
(`TorchCompute.progressive`); the edge part is the worker's, asked with `confidence: true`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.device.types import DeviceError, EdgeFailure, Plan, PlanError
from dapdee.models import LoadedModel
from dapdee.planning.progressive import priced
from dapdee.progressive_run import PartResult, Sides, split_sides


def require_thresholds(graph: CostGraph) -> None:
    """DeviceError naming the flag when the model has no calibrated confidence exits."""
    if graph.progressive is None:
        raise DeviceError(
            f"--confidence-exits: model {graph.model!r} has no calibrated confidence exits (no thresholds in "
            "its artifact's manifest); run `dapdee calibrate ARTIFACT` and load it with --weights ARTIFACT"
        )


def confidence_graph(loaded: LoadedModel, graph: CostGraph) -> CostGraph:
    """`graph` (the device profile) carrying the loaded artifact's calibrated thresholds (a
    profile cached before calibration has none); DeviceError naming `--confidence-exits` when
    the model has none. O(1)."""
    require_thresholds(loaded.graph)
    if graph.progressive == loaded.graph.progressive:
        return graph
    return replace(graph, progressive=loaded.graph.progressive)


def with_heads(plan: Plan, graph: CostGraph, cond: Conditions, sides: Sides | None = None) -> Plan:
    """`plan` (a Device-Only or fixed plan) run with confidence exits: `sides` (default: its
    cut's, as the planner splits a plan made with them: each head on the side that computes its
    node), what they send, and its worst case and expected latency priced under `cond` as the
    planner prices them. DeviceError naming `--confidence-exits` when `graph` has no thresholds.
    O(#heads · (V + E))."""
    require_thresholds(graph)
    sides = sides if sides is not None else split_sides(graph, plan.exit, plan.device_nodes)
    worst, expected = priced(graph, plan.exit, plan.device_nodes, cond)
    return replace(
        plan,
        progressive=sides,
        transfer=transfer_of(graph, sides),
        predicted_ms=worst.latency_ms,
        bottleneck_ms=worst.bottleneck_ms,
        expected_ms=expected.latency_ms,
    )


def transfer_of(graph: CostGraph, sides: Sides) -> tuple[tuple[str, int], ...]:
    """The sides' uplink as (name, bytes per frame), the input first. O(len(transfer))."""
    return tuple((n, graph.input.bytes if n == graph.input.name else graph.node(n).out_bytes) for n in sides.transfer)


def plan_sides(raw: Mapping[str, Any], graph: CostGraph, exit_name: str, device_nodes: Sequence[str]) -> Sides | None:
    """The sides of a planner answer that carries `progressive` (None when it does not): the
    device graph's own split of (exit, device set), refused with PlanError naming
    `plan.progressive` when the graph has no thresholds or the answer puts a head on another
    side. O(#heads · (V + E))."""
    prog = raw.get("progressive")
    if prog is None:
        return None
    heads = prog.get("heads") if isinstance(prog, Mapping) else None
    if not isinstance(heads, list) or not all(isinstance(h, Mapping) for h in heads):
        raise PlanError("plan.progressive.heads: expected a list of objects")
    try:
        sides = split_sides(graph, exit_name, device_nodes)
    except ValueError as exc:
        raise PlanError(f"plan.progressive: {exc}") from None
    mine = [(h.exit, part.side) for part in (sides.device, sides.edge) for h in part.heads]
    theirs = [(h.get("exit"), h.get("side")) for h in heads]
    if mine != theirs:
        raise PlanError(f"plan.progressive.heads: {theirs} differ from this device's split of the cut {mine}")
    return sides


def device_answer(result: PartResult, sides: Sides) -> tuple[str, torch.Tensor] | None:
    """(exit, logits [1, classes]) of a one-frame device run that answered the frame: at a
    device head, or at the planned exit when the edge has no part; None when the frame goes on
    to the edge. O(classes)."""
    if result.left:
        leave = result.left[0]
        return leave.exit, leave.logits
    if not sides.uses_edge:
        return sides.exit, result.values[sides.exit_node]
    return None


def edge_exit(sides: Sides | None, exit_name: str, taken: Sequence[str] | None) -> str:
    """The exit that answered the frame at the edge: the planned one without edge heads, else
    the worker's `exits_taken[0]`, which must be one of the plan's edge heads or the planned
    exit (EdgeFailure naming it otherwise). O(#heads)."""
    if sides is None or not sides.edge.heads:
        return exit_name
    allowed = {h.exit for h in sides.edge.heads} | {exit_name}
    if not taken or len(taken) != 1 or taken[0] not in allowed:
        raise EdgeFailure(f"bad answer: exits_taken {list(taken or [])[:3]}, expected one of {sorted(allowed)}")
    return taken[0]
