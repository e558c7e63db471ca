"""Planning: which exit and which downward-closed device set, exactly optimal under the cost model.

`PlanMap.build(graph)` precomputes per exit the Pareto front of (Σdevice_ms, sent_bytes,
Σedge_ms) over downward-closed partitions (`cap` and an optional time budget `deadline_s`
bound the work: past them an exit falls back to min-cuts); `PlanMap.plan(req)` answers a
`PlanRequest` with the plan JSON of DESIGN.md by scanning it. `baseline_plan` gives the baselines' plans
(device-only, edge-only, neurosurgeon, dads, edgent) in the same shape.
"""

from __future__ import annotations

from dapdee.planning.baselines import BASELINES, baseline_plan
from dapdee.planning.planmap import DEFAULT_CAP, PlanMap, PlanMapError, make_plan
from dapdee.planning.request import MODES, PlanRequest

__all__ = [
    "BASELINES",
    "DEFAULT_CAP",
    "MODES",
    "PlanMap",
    "PlanMapError",
    "PlanRequest",
    "baseline_plan",
    "make_plan",
]
