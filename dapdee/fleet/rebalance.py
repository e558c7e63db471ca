"""Re-solving all leases of one worker together: a multiple-choice knapsack.

Each device i (frame rate f_i) picks one option: a candidate partition of one of its exits,
from the Pareto fronts of its plan map (Device-Only included). Option o costs the worker
load_o = f_i·e_o ms per second (e_o: zero-load edge ms per frame, 0 for Device-Only) and is
worth the lexicographic value

    (met_o, f_i·accuracy_o, −f_i·t_o)

where met_o says whether the option meets all the device's stated requirements (latency
budget, frame rate, min_accuracy), and t_o is its objective in the device's mode (latency_ms
or bottleneck_ms), both priced at zero edge load so the problem separates by device. The
solution maximises the sum of values — first the number of devices whose requirements are
met, then Σ f_i·accuracy_i, then −Σ f_i·t_i — subject to Σ load <= ρ_max·C_w.

Exact method (up to floating-point rounding of the sums): dynamic programming over devices
with real-valued loads. Each device's options are first reduced to a chain (load ascending,
value strictly increasing: an option with more load and no better value is never chosen).
The DP keeps, after each device, the staircase of states (total load, total value) in which
more load buys a strictly better value; a state dominated by one of no more load and no
less value cannot lead to a better solution (lexicographic order is compatible with
addition), so dropping it loses nothing. Cost: O(Σ_i |states_i|·|chain_i|·log) time. The
staircase can grow combinatorially; beyond `exact_leases` devices or `max_states` states the
solver merges states whose loads fall in the same 1/`grid` of the capacity (keeping each
bucket's best value, with its real load, so every answer stays feasible) and reports
`exact: False`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from dapdee.costmodel import Conditions, Predicted, partition
from dapdee.fleet.assign import MAX_EDGE_LOAD, edge_ms_per_frame, meets_all
from dapdee.planning.planmap import CandSet, PlanMap
from dapdee.planning.request import PlanRequest

Value = tuple[int, float, float]
ZERO: Value = (0, 0.0, 0.0)
EXACT_LEASES = 64
MAX_STATES = 200_000
GRID = 4096


@dataclass(frozen=True)
class Demand:
    """One lease as the rebalancer sees it: the device's frame rate, its plan map for this
    worker's tier, its conditions and requirements (`request`; edge_load is ignored) and the
    objective of its mode ("latency" or "throughput")."""

    device_id: str
    frames_per_s: float
    planmap: PlanMap
    request: PlanRequest
    objective: str


@dataclass(frozen=True)
class Option:
    """One device's candidate: `planmap.cands[exit_index]` entry `cand_index`."""

    exit_index: int
    cand_index: int
    uses_edge: bool
    load: float  # f_i·e_o, ms per second of the worker
    value: Value


@dataclass(frozen=True)
class Solution:
    """The chosen option per device (in `demands` order), the totals, and whether it is exact."""

    choices: tuple[Option, ...]
    load: float
    value: Value
    exact: bool
    states: int  # largest staircase the DP kept (a measure of the work done)


def add(a: Value, b: Value) -> Value:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def option_value(demand: Demand, pred: Predicted, accuracy: float | None) -> Value:
    """(met, f·accuracy, −f·t) of a plan priced at zero edge load. O(1)."""
    met = meets_all(demand.request, pred, accuracy)
    t = pred.latency_ms if demand.objective == "latency" else pred.bottleneck_ms
    f = demand.frames_per_s
    return (int(met), f * (accuracy or 0.0), -f * t)


def current_option(demand: Demand, exit_name: str, device_nodes: Sequence[str]) -> Option:
    """The option a device holds now (its plan's exit and device nodes), valued like `options`
    (it need not be on the front). `cand_index` is -1. Raises CostGraphError when the plan no
    longer fits the graph. O(V + E)."""
    part = partition(demand.planmap.graph, exit_name, device_nodes)
    index = next(i for i, e in enumerate(demand.planmap.graph.exits) if e.name == part.exit)
    pred = part.predict(replace(demand.request.conditions(), edge_load=0.0))
    uses_edge = bool(part.edge_nodes)
    e = part.edge_sum_ms + demand.planmap.graph.overheads.edge_request_ms if uses_edge else 0.0
    accuracy = demand.planmap.graph.exits[index].accuracy
    return Option(index, -1, uses_edge, demand.frames_per_s * e, option_value(demand, pred, accuracy))


def options(demand: Demand) -> list[Option]:
    """Every candidate of every exit's front, priced at zero edge load. O(Σ_e front_e)."""
    cond = replace(demand.request.conditions(), edge_load=0.0)
    out = []
    for i, cs in enumerate(demand.planmap.cands):
        accuracy = demand.planmap.graph.exits[i].accuracy
        loads = edge_ms_per_frame(cs) * demand.frames_per_s
        for j in range(len(cs)):
            value = option_value(demand, cs.predict(j, cond), accuracy)
            out.append(Option(i, j, cs.masks[j] != cs.st.full, float(loads[j]), value))
    return out


def chain(opts: Sequence[Option]) -> list[Option]:
    """The options worth considering: load ascending, value strictly increasing (for equal
    loads the best value; ties keep the deeper exit, then the earlier candidate). O(n log n)."""
    ranked = sorted(opts, key=lambda o: (o.load, _neg(o.value), -o.exit_index, o.cand_index))
    out: list[Option] = []
    for o in ranked:
        if not out or o.value > out[-1].value:
            out.append(o)
    return out


def _neg(v: Value) -> Value:
    return (-v[0], -v[1], -v[2])


def solve(
    demands: Sequence[Demand],
    capacity_ms_per_s: float,
    rho_max: float,
    exact_leases: int = EXACT_LEASES,
    max_states: int = MAX_STATES,
) -> Solution:
    """The best option per device under Σ load <= ρ_max·C (see the module docstring). Device-Only
    (load 0) is always an option, so a solution always exists."""
    limit = rho_max * capacity_ms_per_s
    chains = [chain(options(d)) for d in demands]
    exact = len(demands) <= exact_leases
    bucket = None if exact else limit / GRID
    # layers[k]: states after k devices as (load, value, parent state index, option index)
    layers: list[list[tuple[float, Value, int, int]]] = [[(0.0, ZERO, -1, -1)]]
    widest = 1
    for ch in chains:
        nxt: list[tuple[float, Value, int, int]] = []
        for si, (load, value, _, _) in enumerate(layers[-1]):
            for oi, o in enumerate(ch):
                total = load + o.load
                if total > limit:
                    break  # the chain is sorted by load
                nxt.append((total, add(value, o.value), si, oi))
        states = _staircase(nxt, bucket)
        if bucket is None and len(states) > max_states:
            exact, bucket = False, limit / GRID
            states = _staircase(states, bucket)
        widest = max(widest, len(states))
        layers.append(states)
    best = max(range(len(layers[-1])), key=lambda k: (layers[-1][k][1], -layers[-1][k][0]))
    picks: list[Option] = []
    k = best
    for depth in range(len(chains), 0, -1):
        _, _, parent, oi = layers[depth][k]
        picks.append(chains[depth - 1][oi])
        k = parent
    picks.reverse()
    load, value = layers[-1][best][0], layers[-1][best][1]
    return Solution(tuple(picks), load, value, exact, widest)


def _staircase(
    states: list[tuple[float, Value, int, int]], bucket: float | None
) -> list[tuple[float, Value, int, int]]:
    """The non-dominated states: load ascending, value strictly increasing. With `bucket`, also
    one state per load bucket (its best value). O(n log n)."""
    states.sort(key=lambda s: (s[0], _neg(s[1])))
    out: list[tuple[float, Value, int, int]] = []
    for s in states:
        if out and s[1] <= out[-1][1]:
            continue
        if bucket is not None and out and math.floor(out[-1][0] / bucket) == math.floor(s[0] / bucket):
            out[-1] = s  # same bucket, better value: keep this one (its real load stays exact)
            continue
        out.append(s)
    return out


def priced(demand: Demand, option: Option, others_ms_per_s: float, capacity_ms_per_s: float) -> Predicted:
    """The option's prediction at the edge load the other chosen devices put on the worker
    (ℓe = min(0.95, others / C)), as the plan handed out states it. O(1)."""
    cs: CandSet = demand.planmap.cands[option.exit_index]
    load = min(MAX_EDGE_LOAD, others_ms_per_s / capacity_ms_per_s) if option.uses_edge else 0.0
    cond: Conditions = replace(demand.request.conditions(), edge_load=load)
    return cs.predict(option.cand_index, cond)


def option_nodes(demand: Demand, option: Option) -> tuple[str, tuple[str, ...]]:
    """(exit name, device nodes) of an option from `options`."""
    cs = demand.planmap.cands[option.exit_index]
    return cs.st.exit_name, cs.lists(option.cand_index)[0]
