"""One device's plan on a shared edge: edge load from the other leases, admission, worker choice.

Worker w has a nominal capacity N_w (ms of compute per second, 1000 x its compute slots) and
an admission capacity C_w <= N_w (N_w over the slowdown κ >= 1 the worker measures under load:
what its requests really take against what they are priced at); the leases of the other
devices reserve R_w = Σ_{j≠i} f_j·e_j, where f_j is a device's frame rate and e_j its plan's
zero-load edge cost per frame (Σ_E edge_ms + edge_request_ms; 0 for Device-Only). Planning
device i (frame rate f_i) against w uses

- edge load ℓe = min(0.95, R_w / N_w) (`edge_load_of`), unless the request names `edge_load`
  itself: the share of the worker's compute slots the others keep busy, which is what a
  request waits behind. (Taken over C_w instead, ℓe read 0.85 where the slot was 0.51 busy,
  and plans were priced at several times the edge wait they met.)
- admission: a plan that uses the edge is admissible only if R_w + f_i·e_i <= ρ_max·C_w
  (without a frame rate, only if R_w <= ρ_max·C_w); Device-Only always is. κ lowers what the
  leases may book, not what they are priced at.

The answer is the inverse search of `planmap.decide` over the union of every worker's
admissible candidates: for each exit the best candidate over all workers (ties: the less
loaded worker, then the given tie-break, then the URL), so it is the plan a brute-force walk over every (worker,
downward-closed partition) pair gives — exactly optimal for this device given the others.
Because f_i is fixed by the request, admission is a threshold on each candidate's edge sum,
and the scan of each plan map stays one vectorised pass per exit and worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dapdee.costmodel import Conditions, Predicted, partition
from dapdee.planning.mincut import min_latency_mask
from dapdee.planning.planmap import TIE_RTOL, CandSet, Choice, PlanMap, acc_ok, decide, mask_choice, meets, plan_dict
from dapdee.planning.request import PlanRequest

Timing = float | np.ndarray  # one plan's predicted ms, or an array of them (one per plan)
Met = bool | np.ndarray

MAX_EDGE_LOAD = 0.95
DEFAULT_RHO_MAX = 0.9


@dataclass(frozen=True)
class EdgeSlot:
    """A worker one device may use: its plan map (under that worker tier's edge timings), its
    capacity and what the other devices' leases reserve on it (ms per second)."""

    url: str
    planmap: PlanMap
    capacity_ms_per_s: float  # C_w: what admission lets the leases book
    reserved_ms_per_s: float
    tiebreak: float = 0.0  # between workers of equal lease load, the lower goes first (e.g. its heartbeat load)
    nominal_ms_per_s: float | None = None  # N_w, ℓe's denominator; None: C_w

    def edge_load(self) -> float:
        """ℓe from the other leases: min(0.95, R_w / N_w)."""
        return edge_load_of(self.reserved_ms_per_s, self.nominal_ms_per_s or self.capacity_ms_per_s)


def edge_load_of(others_ms_per_s: float, nominal_ms_per_s: float) -> float:
    """ℓe = min(0.95, R / N): the edge load the other leases' R ms/s put on a worker of nominal
    capacity N ms/s (1000 x its compute slots); a worker of no capacity is idle while nothing
    is booked on it and full otherwise. O(1)."""
    if nominal_ms_per_s <= 0:
        return 0.0 if others_ms_per_s <= 0 else MAX_EDGE_LOAD
    return min(MAX_EDGE_LOAD, others_ms_per_s / nominal_ms_per_s)


@dataclass(frozen=True)
class DevicePlan:
    """The plan JSON (edge_worker filled), the worker it uses (None: Device-Only; the plan's
    edge_worker then names the least-loaded worker), its zero-load edge cost per frame e_i, and
    the edge load it was priced at."""

    plan: dict[str, Any]
    worker: str | None
    edge_ms_per_frame: float
    edge_load: float


def edge_ms_per_frame(cs: CandSet) -> np.ndarray:
    """Zero-load edge cost per frame of every candidate: Σ_E edge_ms + edge_request_ms where the
    candidate uses the edge, 0 for Device-Only. O(n)."""
    return (cs.edge + cs.st.overheads.edge_request_ms) * cs.nonempty


def admissible(cs: CandSet, frames_per_s: float | None, slot: EdgeSlot, rho_max: float) -> np.ndarray:
    """Boolean mask of `cs`'s candidates admissible on `slot` for a device offering
    `frames_per_s`: Device-Only always; an edge-using candidate iff R_w + f_i·e_i <= ρ_max·C_w
    (no frame rate: iff R_w <= ρ_max·C_w). O(n)."""
    return (cs.nonempty == 0) | fits(slot, frames_per_s, edge_ms_per_frame(cs), rho_max)


ADMIT_RTOL = 1e-9  # the lease scripts' tolerance: the same loads summed in another order differ in their last bits


def within_limit(total: Any, limit: Any) -> Any:
    """Whether reservations `total` stay within `limit` (ms/s; numbers or arrays elementwise),
    allowing a relative ADMIT_RTOL as every admission check does (the lease scripts' `over`),
    so a plan that fills a worker exactly is not refused for a rounding. O(1) elementwise."""
    return total <= limit * (1.0 + ADMIT_RTOL)


def fits(slot: EdgeSlot, frames_per_s: float | None, e_i: Any, rho_max: float) -> Any:
    """The admission test of an edge-using plan of zero-load edge cost `e_i` per frame (a
    number, or an array elementwise): R_w + f_i·e_i <= ρ_max·C_w (`within_limit`); without a
    frame rate, R_w <= ρ_max·C_w. O(1) elementwise."""
    f = 0.0 if frames_per_s is None else frames_per_s
    return within_limit(slot.reserved_ms_per_s + f * e_i, rho_max * slot.capacity_ms_per_s)


def plan_for_device(
    slots: Sequence[EdgeSlot],
    req: PlanRequest,
    frames_per_s: float | None,
    rho_max: float = DEFAULT_RHO_MAX,
    edge_load: float | None = None,
) -> DevicePlan:
    """The exact plan for one device over `slots` (at least one), given the other leases (see
    the module docstring). `edge_load` given: every worker is priced at it instead of its
    reserved load (admission still applies). Cost: one vectorised scan per (exit consulted,
    worker) of that exit's Pareto front. Exits beyond the plan map's enumeration cap are
    scanned over their approximate candidate set: a latency answer is then made exact by the
    min-cut (where that partition is admissible), a throughput one says `"approximate": true`."""
    if not slots:
        raise ValueError("slots: a device needs at least one worker to plan against")
    if frames_per_s is not None and not frames_per_s > 0:
        raise ValueError(f"frames_per_s: must be > 0, got {frames_per_s!r}")
    order = sorted(slots, key=lambda s: (s.edge_load(), s.tiebreak, s.url))
    base = req.conditions()
    loads = {s.url: s.edge_load() if edge_load is None else edge_load for s in order}
    conds = {s.url: replace(base, edge_load=loads[s.url]) for s in order}
    masks: dict[tuple[str, int], np.ndarray] = {}
    cache: dict[tuple[int, str], Choice] = {}

    def get(i: int, objective: str) -> Choice:
        if (i, objective) not in cache:
            cache[(i, objective)] = _best_over_workers(order, i, objective, conds, masks, frames_per_s, rho_max)
        return cache[(i, objective)]

    graph = order[0].planmap.graph
    accuracies = [e.accuracy for e in graph.exits]
    choice, mode, met, approx = decide(accuracies, range(len(graph.exits)), get, req)
    # Device-Only plans still name a worker (the least loaded): the device probes the link to it
    # and sends there once a re-plan puts work on the edge; the lease reserves nothing there
    chosen = next((s for s in order if s.url == choice.worker), order[0])
    priced_at = loads[chosen.url]
    plan = plan_dict(
        chosen.planmap.graph,
        chosen.planmap.graph_hash,
        replace(req, edge_load=priced_at),
        "dapdee",
        choice,
        mode,
        met,
        approx,
    )
    plan["edge_worker"] = chosen.url
    return DevicePlan(plan, choice.worker, choice.edge_ms_per_frame, priced_at)


def _best_over_workers(
    order: Sequence[EdgeSlot],
    i: int,
    objective: str,
    conds: dict[str, Conditions],
    masks: dict[tuple[str, int], np.ndarray],
    frames_per_s: float | None,
    rho_max: float,
) -> Choice:
    """Exit i's best admissible candidate over every worker under `objective`, as a brute force
    over every (worker, partition) pair ranks them (latency: lowest latency_ms; throughput:
    lowest bottleneck_ms, and within a relative TIE_RTOL of the lowest over all workers, lowest
    latency_ms); ties keep the earlier worker of `order`. `approximate` when any worker's pick
    is (its own best may be one the capped candidate set lacks). O(Σ_w front size), and a min-cut per
    worker for latency on an exit past the enumeration cap."""
    picks = []
    for slot in order:
        key = (slot.url, i)
        if key not in masks:
            masks[key] = admissible(slot.planmap.cands[i], frames_per_s, slot, rho_max)
        picks.append(_worker_best(slot, i, objective, conds[slot.url], masks[key], frames_per_s, rho_max))
    # a worker's approximate pick may hide a partition that beats the best: then none is proven exact
    approximate = any(c.approximate for c in picks)
    if objective == "throughput":
        limit = min(c.pred.bottleneck_ms for c in picks) * (1.0 + TIE_RTOL)
        tied = [k for k, c in enumerate(picks) if c.pred.bottleneck_ms <= limit]
        # each worker's own tie band may differ from the one over all workers
        if len(tied) > 1:
            picks = [_within(order[k], i, conds[order[k].url], masks[(order[k].url, i)], limit) for k in tied]
        else:
            picks = [picks[tied[0]]]
    best = min(picks, key=lambda c: c.pred.latency_ms)  # min keeps the first of equals
    return replace(best, approximate=True) if approximate and not best.approximate else best


def _worker_best(
    slot: EdgeSlot,
    i: int,
    objective: str,
    cond: Conditions,
    allowed: np.ndarray,
    frames_per_s: float | None,
    rho_max: float,
) -> Choice:
    """Exit i's best admissible candidate on one worker. On an exit past the enumeration cap a
    latency answer is made exact as `PlanMap` makes it, by the min-cut over every partition,
    when that partition is admissible here (else the candidate set's best, `approximate`)."""
    cs = slot.planmap.cands[i]
    j = cs.best(objective, cond, allowed)
    best = _choice(slot, cs, i, j, cs.predict(j, cond), approximate=not cs.exact)
    if objective != "latency" or cs.exact:
        return best
    st = cs.st
    mask = min_latency_mask(st, cond)
    exact = mask_choice(st, mask, cond)
    uses_edge = mask != st.full
    e_i = st.sums(mask)[2] + st.overheads.edge_request_ms if uses_edge else 0.0
    if uses_edge and not fits(slot, frames_per_s, e_i, rho_max):
        return best  # the unconstrained optimum is not admissible here: the scan's best, approximate
    if exact.pred.latency_ms < best.pred.latency_ms:
        return replace(exact, worker=slot.url if uses_edge else None, edge_ms_per_frame=e_i)
    return replace(best, approximate=False)


def _within(slot: EdgeSlot, i: int, cond: Conditions, allowed: np.ndarray, limit: float) -> Choice:
    """Exit i's admissible candidate on one worker of lowest latency_ms among those whose
    bottleneck_ms is within `limit` (the throughput tie band over all workers). O(front)."""
    cs = slot.planmap.cands[i]
    j = cs.best_latency(cond, allowed & (cs.bottlenecks(cond) <= limit))
    return _choice(slot, cs, i, j, cs.predict(j, cond), approximate=not cs.exact)


def _choice(slot: EdgeSlot, cs: CandSet, i: int, j: int, pred: Predicted, approximate: bool) -> Choice:
    uses_edge = cs.masks[j] != cs.st.full
    return Choice(
        i,
        pred,
        lambda cs=cs, j=j: cs.lists(j),
        approximate=approximate,
        worker=slot.url if uses_edge else None,
        edge_ms_per_frame=float(edge_ms_per_frame(cs)[j]),
    )


def meets_all(req: PlanRequest, latency_ms: Timing, bottleneck_ms: Timing, accuracy: float | None) -> Met:
    """Whether a plan of `accuracy` predicted at `latency_ms` and `bottleneck_ms` meets every
    requirement the request states (latency budget, frame rate, min_accuracy), whatever its
    mode: the fleet's notion of a device being served. Elementwise when the timings are arrays
    (one plan per entry; a bool when the request states neither a budget nor a frame rate).
    O(1) per plan."""
    met: Met = acc_ok(accuracy, req)
    if req.latency_budget_ms is not None:
        met = met & (latency_ms <= req.latency_budget_ms)
    if req.frame_rate is not None:
        met = met & (bottleneck_ms <= 1000.0 / req.frame_rate)
    return met


def plan_of(
    planmap: PlanMap,
    req: PlanRequest,
    exit_name: str,
    device_nodes: Sequence[str],
    edge_load: float,
    mode: str,
    approximate: bool = False,
) -> tuple[dict[str, Any], float]:
    """The plan JSON of one given partition (a rebalance's assignment, or one handed back to its
    device) priced at `edge_load`, and its zero-load edge cost per frame e_i. `constraints_met`
    is the library's for a plan in `mode` (`planmap.meets`: the other mode's requirement is not
    its to meet), so the same plan says the same whoever hands it out; the rebalance's count of
    devices served is `meets_all`'s. `approximate` is the plan's (the solve that chose it was not
    exact).
    Raises CostGraphError when the partition no longer fits the graph. O(V + E)."""
    part = partition(planmap.graph, exit_name, device_nodes)
    load = edge_load if part.edge_nodes else 0.0
    cond = replace(req.conditions(), edge_load=load)
    pred = part.predict(cond)
    index = next(i for i, e in enumerate(planmap.graph.exits) if e.name == part.exit)
    accuracy = planmap.graph.exits[index].accuracy
    lists = (part.device_nodes, part.edge_nodes, part.transfer)
    choice = Choice(index, pred, lambda: lists)
    met = meets(accuracy, req, pred, mode)
    plan = plan_dict(
        planmap.graph, planmap.graph_hash, replace(req, edge_load=load), "dapdee", choice, mode, met, approximate
    )
    e_i = part.edge_sum_ms + planmap.graph.overheads.edge_request_ms if part.edge_nodes else 0.0
    return plan, e_i
