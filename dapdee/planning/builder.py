"""Building a plan map in another process (a planner's build pool).

A large graph's plan map takes seconds of pure-Python enumeration and min-cuts, which in a thread
would hold the planner's interpreter lock and slow every request beside it. A process has its
own. Only plain data crosses the process boundary: the graph as JSON text, numbers, and the
map's canonical JSON bytes back (`to_bytes`), which the caller reads with `from_bytes`.

A build process ends with the planner that started it (`exit_with_parent`, the pool's
initializer): a pool worker otherwise outlives a planner killed without a shutdown (SIGKILL, the
OOM killer), blocked forever on its task queue, whose write end it holds itself.
"""

from __future__ import annotations

import json
import os
import threading
import time

from dapdee.costgraph import CostGraph, GraphLimits


def build_serialised(
    graph_json: str, cap: int, deadline: float | None, progressive: bool, limits: tuple[int, int, int]
) -> tuple[bytes, bool]:
    """Build the plan map (`progressive`: the confidence-exit map) of the graph in `graph_json`
    (checked against `limits`: max nodes, exits, in-degree) by `deadline`, a `time.time()`
    value: wall-clock, so that the time this process took to start and import counts against
    the caller's budget. Its `to_bytes()` and whether the budget cut anything short. Cost: that
    of the build."""
    from dapdee.planning.planmap import PlanMap
    from dapdee.planning.progressive import ProgressiveMap

    graph = CostGraph.from_dict(json.loads(graph_json), GraphLimits(*limits))
    kind = ProgressiveMap if progressive else PlanMap
    deadline_s = None if deadline is None else max(0.0, deadline - time.time())
    pm = kind.build(graph, cap, deadline_s)
    return pm.to_bytes(), pm.over_budget


def exit_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """A build pool's initializer, run in each build process: a daemon thread that ends this
    process (`os._exit`) once its parent is no longer `parent_pid` (it died and the process was
    re-parented). Its cost: one `getppid` per `poll_s` seconds."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
