"""Where a frame leaves when the device must finish it alone (the edge failed, timed out, is
resting after a failure, or no worker serves the model): the planned exit, or, when a latency
budget would be missed, the deepest earlier exit that still meets it.

Costs come from the device's cost graph (zero-load `device_ms` sums over what is still to run,
divided by 1 − load, as in the cost model). "Still to run" is what the executor would run from
the values the device holds (`nodes_to_run`): the device part that produced the cut's tensors is
not charged again, while an earlier exit whose trunk was not kept is charged for recomputing it.
Pure functions, O(exits x (V + E)).
"""

from __future__ import annotations

from collections.abc import Collection

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions, stage_ms
from dapdee.device.compute import nodes_to_run


def local_cost_ms(graph: CostGraph, exit_name: str, have: Collection[str], device_load: float) -> float:
    """Predicted device ms to finish `exit_name` from the values in `have` (node names; the
    input, the frame itself, is always held): Σ device_ms over the nodes the executor would run
    for it (`nodes_to_run`: those of A(exit) not derivable from `have`; the nodes that produced
    `have` do not run again), at the load. O(V + E)."""
    nodes = nodes_to_run(graph, {*have, graph.input.name}, [graph.exit(exit_name).node])
    todo = sum(graph.node(n).device_ms or 0.0 for n in nodes)
    cond = Conditions(bandwidth_mbps=1.0, device_load=min(max(device_load, 0.0), 0.95))
    return float(stage_ms(todo, 0, 0.0, cond)[0])


def fallback_exit(
    graph: CostGraph,
    planned: str,
    have: Collection[str],
    elapsed_ms: float,
    budget_ms: float | None,
    device_load: float,
) -> str:
    """The exit a locally finished frame leaves at: `planned` when there is no budget or it
    still fits (`elapsed_ms` + the local cost ≤ `budget_ms`); else the deepest exit up to the
    planned one that fits; else the cheapest of them. O(exits x (V + E))."""
    if budget_ms is None:
        return planned
    names = [e.name for e in graph.exits]
    upto = names[: names.index(planned) + 1]
    costs = {e: local_cost_ms(graph, e, have, device_load) for e in upto}
    for e in reversed(upto):
        if elapsed_ms + costs[e] <= budget_ms:
            return e
    return min(upto, key=costs.__getitem__)
