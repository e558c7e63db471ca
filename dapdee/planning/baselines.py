"""Baseline planners over the same cost model and plan JSON (`"planner": NAME`).

- `device-only`, `edge-only`: final exit, D = A(e) / D = ∅.
- `neurosurgeon`: final exit, best single split of the topological order (prefix of A(e)):
  minimum latency_ms (latency mode) or bottleneck_ms (throughput mode). Blind to DAG cuts.
- `dads`: final exit; latency mode: networkx min-cut (exact for latency); throughput mode:
  DADS's α/γ weight grid over min-cuts, keeping the cut of best bottleneck (heuristic).
- `edgent`: every exit deepest-first × best prefix split, with DAPDEE's constraint semantics.

All use `planmap.decide`, so modes (auto included), budgets, min_accuracy and frame_rate
mean the same as for DAPDEE; only the set of partitions each planner can see differs.
"""

from __future__ import annotations

from typing import Any

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.planning.enumerate import ExitStructure, prefix_masks, prefix_sums
from dapdee.planning.mincut import min_latency_mask, weight_grid_masks
from dapdee.planning.planmap import CandSet, Choice, decide, mask_choice, plan_dict
from dapdee.planning.request import PlanRequest

BASELINES: tuple[str, ...] = ("device-only", "edge-only", "neurosurgeon", "dads", "edgent")


def _cand_choice(cs: CandSet, objective: str, cond: Conditions) -> Choice:
    j = cs.best(objective, cond)
    return Choice(cs.st.exit_index, cs.predict(j, cond), lambda: cs.lists(j))


def baseline_plan(graph: CostGraph, req: PlanRequest, name: str) -> dict[str, Any]:
    """The plan baseline `name` (one of BASELINES) makes for `req`. Cost per request:
    device-only/edge-only O(V + E); neurosurgeon O(m²); edgent O(Σ_e m_e²); dads one max-flow
    (latency) or |grid|² max-flows (throughput)."""
    if name not in BASELINES:
        raise ValueError(f"baseline: unknown {name!r}; expected one of {', '.join(BASELINES)}")
    req.validate()
    graph.validate()
    graph.require_timings()
    cond = req.conditions()
    last = len(graph.exits) - 1
    exit_indices = list(range(len(graph.exits))) if name == "edgent" else [last]
    structures: dict[int, ExitStructure] = {}
    prefixes: dict[int, CandSet] = {}
    cache: dict[tuple[int, str], Choice] = {}

    def structure(i: int) -> ExitStructure:
        if i not in structures:
            structures[i] = ExitStructure.build(graph, i)
        return structures[i]

    def get(i: int, objective: str) -> Choice:
        key = (i, objective)
        if key in cache:
            return cache[key]
        st = structure(i)
        if name == "device-only":
            c = mask_choice(st, st.full, cond)
        elif name == "edge-only":
            c = mask_choice(st, 0, cond)
        elif name in ("neurosurgeon", "edgent"):
            if i not in prefixes:
                prefixes[i] = CandSet(st, prefix_masks(st), prefix_sums(st))
            c = _cand_choice(prefixes[i], objective, cond)
        elif objective == "latency":  # dads
            c = mask_choice(st, min_latency_mask(st, cond), cond)
        else:
            masks = sorted(weight_grid_masks(st, cond))
            c = _cand_choice(CandSet(st, masks), "throughput", cond)
        cache[key] = c
        return c

    acc = [e.accuracy for e in graph.exits]
    c, mode, met, _ = decide(acc, exit_indices, get, req)
    return plan_dict(graph, graph.content_hash(), req, name, c, mode, met, False)
