"""Re-solving all leases of one worker together: a multiple-choice knapsack.

Each device i (frame rate f_i) picks one option: a candidate partition of one of its exits,
from the Pareto fronts of its plan map (Device-Only included). Option o costs the worker
load_o = f_i·e_o ms per second (e_o: zero-load edge ms per frame, 0 for Device-Only) and is
worth the lexicographic value

    (met_o, f_i·accuracy_o, −f_i·t_o)

where met_o says whether the option meets all the device's stated requirements (latency budget,
frame rate, min_accuracy), f_i·accuracy_o is rounded to a multiple of 2⁻²⁰ so that sums of it
are exact (`accuracy_term`), and t_o is its objective in the device's mode (latency_ms or
bottleneck_ms). met_o is priced at edge load ℓe = min(0.95, ρ_max·C_w/N_w): no feasible
assignment puts more than ρ_max·C_w on the worker, so no device sees more load from the others
(ℓe is taken over the nominal capacity N_w >= C_w, `dapdee.fleet.assign`), and an option
counted as met stays met however the others are assigned. (Priced at zero load instead, the
solver counted as met the deep cuts whose edge part only fits an idle worker, and handed out
plans that missed their budgets.) t_o is priced at one time load L for all devices (`solve`'s
`time_load`; `priced_load` by default). Both loads are fixed while the DP runs, so the problem
separates by device. The solution maximises the sum of values — first the number of devices
whose requirements are met, then Σ f_i·accuracy_i, then −Σ f_i·t_i — subject to Σ load <=
ρ_max·C_w (or a smaller limit).

Time load (`settle`, what the planner runs): solve for each share s = ρ_max·k/8 of the worker
with Σ load <= s·C_w and L = min(0.95, s·C_w/N_w), and keep the best answer. Each answer's times are
then at least what its devices will see from each other, and the best share is close to the load
the answer books: a lone device on an idle worker keeps the 30 ms Edge plan that, priced at
ρ_max (50 ms), lost to its 41.7 ms Device-Only plan, and a full worker keeps the devices that,
priced at the load booked before the rebalance, all left it at one rebalance and all came back
at the next. Leases the caller cannot price (their model or profiles gone) keep what they book,
K: each share's limit is then s·C_w − K.

Switching margin μ (`solve(..., switch_margin=μ)`): a device's current plan (`Demand.current`)
is credited μ·f_i·t of its own time in the third component, so a device moves only where the
move buys a met requirement, accuracy, or more than μ of its own frame time for the fleet;
near-ties (neighbouring cuts a few percent apart, which flip with every noisy bandwidth
estimate) no longer move devices back and forth. The DP is exact for the credited objective;
μ = 0 is the plain objective. `Solution.value` is the plain value of the options chosen.

Exact method (up to floating-point rounding of the sums): dynamic programming over devices
with real-valued loads. Each device's options are first reduced to a chain (load ascending,
value strictly increasing: an option with more load and no better value is never chosen).
The DP keeps, after each device, the staircase of states (total load, total value) in which
more load buys a strictly better value; a state dominated by one of no more load and no
less value cannot lead to a better solution (lexicographic order is compatible with
addition), so dropping it loses nothing. Each step is vectorised (numpy): cost
O(Σ_i |states_i|·|chain_i|·log) time.

The staircase alone grows combinatorially with varied devices (16 ResNet-18 devices on four
uplinks: 163,000 states), so the exact DP is bounded: the bucketed DP below first gives a
feasible answer A, and after each device the exact DP drops every state whose value plus an
upper bound on what the remaining devices can add within the room it leaves (the LP
relaxation, `dapdee.fleet.bounds`) is lexicographically below A's value: such a state cannot
lead to an answer as good as A, so the optimum is never dropped. Devices are taken heaviest
option first, so the room left is decided early and the bounds prune soon. On 54 ResNet-18
fleets of 16-64 devices this stayed within 20,000 states in all 54, at most 14,049 (the plain
staircase in 37, up to 158,000; `bench/rebalance_states.py`); the widest took 1.8-1.9 s of
CPU. Beyond `exact_leases` devices, or if the bounded staircase still outgrows `max_states`,
the answer is A: states whose loads fall in the same 1/GRID of the capacity merged (keeping
each bucket's best value, with its real load, so every answer stays feasible), reported
`exact: False`; at most GRID states per step, so a rebalance of 64 leases costs well under a
second of CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dapdee.costgraph import CostGraphError
from dapdee.costmodel import Predicted, partition
from dapdee.fleet.assign import ADMIT_RTOL, edge_load_of, edge_ms_per_frame, meets_all
from dapdee.fleet.bounds import COMPONENTS, SuffixBound, suffix_bounds
from dapdee.planning.planmap import PlanMap
from dapdee.planning.request import PlanRequest

Value = tuple[int, float, float]
ZERO: Value = (0, 0.0, 0.0)
EXACT_LEASES = 64
MAX_STATES = 20_000
GRID = 4096
TIE_WEIGHTS = ((1e4, 1e4, 1.0),)  # see _reaching
ACCURACY_QUANTUM = 2.0**-20  # frames/s: the resolution of the accuracy component (`accuracy_term`)
SETTLE_LEVELS = 8  # `settle` solves for shares ρ_max/8, 2ρ_max/8, ..., ρ_max of the worker


class SolveOverBudget(Exception):
    """A solve that ran past its `deadline` (`solve`, `settle`)."""


class SolveStopped(Exception):
    """A solve whose `stop` was set (`solve`, `settle`): its caller no longer wants the answer."""


@dataclass(frozen=True)
class _Budget:
    """When a solve gives up: once `stop` is set, or past `deadline` (a `time.monotonic()`
    value); None: never."""

    deadline: float | None = None
    stop: threading.Event | None = None

    def check(self) -> None:
        """SolveStopped once `stop` is set, SolveOverBudget past `deadline`. O(1)."""
        if self.stop is not None and self.stop.is_set():
            raise SolveStopped("the rebalance solve was stopped: its answer is no longer wanted")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise SolveOverBudget("the rebalance solve ran past its time budget")


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
    current: tuple[str, tuple[str, ...]] | None = None  # (exit, device nodes) of the plan it holds


@dataclass(frozen=True)
class Option:
    """One device's candidate: `planmap.cands[exit_index]` entry `cand_index` (-1: the plan the
    device holds, `Demand.current`). `credit` is added to the third component of `value` in the
    DP (the switching margin's credit of a held plan)."""

    exit_index: int
    cand_index: int
    uses_edge: bool
    load: float  # f_i·e_o, ms per second of the worker
    value: Value
    credit: float = 0.0

    @property
    def ranked(self) -> Value:
        """The value the DP maximises: `value` with the credit added to its third component."""
        return (self.value[0], self.value[1], self.value[2] + self.credit)


@dataclass(frozen=True)
class Solution:
    """The chosen option per device (in `demands` order), the totals, and whether it is exact."""

    choices: tuple[Option, ...]
    load: float
    value: Value
    exact: bool
    states: int  # largest staircase the DP kept (a measure of the work done)
    time_load: float  # the edge load the time terms were priced at
    ranked: Value  # the value the DP maximised (`value` with the held plans' credit)


def priced_load(rho_max: float, capacity_ms_per_s: float = 1.0, nominal_ms_per_s: float | None = None) -> float:
    """The edge load every option's met flag is priced at: min(0.95, ρ_max·C/N), the most the
    leases may book over the nominal capacity (N None: C; module docstring). O(1)."""
    return edge_load_of(rho_max * capacity_ms_per_s, nominal_ms_per_s or capacity_ms_per_s)


def resolved_objective(planmap: PlanMap, request: PlanRequest, edge_load: float) -> str:
    """The unit of a device's t_i: its mode, with "auto" resolved as the planner resolves it for
    the device alone at `edge_load` ("latency" when that plan sustains the frame rate, else
    "throughput"). The rebalancer passes every lease of a worker the same load, the worker's
    booking before the rebalance (at most `priced_load`): a lone device on an idle worker is
    valued in latency mode, as the planner answered it. (The mode of the plan a device holds was
    resolved at whatever load the others put on the worker when it asked; like devices then
    carried different units, and the solver traded the worker's slots between them for it.)
    O(exits) plan-map scans."""
    if request.mode in ("latency", "throughput"):
        return request.mode
    return str(planmap.plan(replace(request, edge_load=edge_load))["mode"])


def accuracy_term(frames_per_s: float, accuracy: float | None) -> float:
    """f·accuracy rounded to a multiple of `ACCURACY_QUANTUM` (2⁻²⁰ frames/s). Sums of such
    numbers are exact in floating point, so two sets of devices with equal accuracy totals
    compare equal whatever order the DP added them in, and the third component decides between
    them. (Unrounded, 10 x 0.9261 summed in two orders differs in the last bit, and that bit
    outranked every held plan's credit: each rebalance swapped like devices for nothing.) O(1)."""
    return round(frames_per_s * (accuracy or 0.0) / ACCURACY_QUANTUM) * ACCURACY_QUANTUM


def option_value(demand: Demand, at_most: Predicted, now: Predicted, accuracy: float | None) -> Value:
    """(met, f·accuracy (`accuracy_term`), −f·t) of a plan: met from its prediction at the most
    load the others can put on the worker (`at_most`), t from its prediction at the load they
    put on it now (`now`). O(1)."""
    met = meets_all(demand.request, at_most.latency_ms, at_most.bottleneck_ms, accuracy)
    t = now.latency_ms if demand.objective == "latency" else now.bottleneck_ms
    f = demand.frames_per_s
    return (int(met), accuracy_term(f, accuracy), -f * t)


def current_option(
    demand: Demand, exit_name: str, device_nodes: Sequence[str], edge_load: float, now_load: float
) -> Option:
    """The option a device holds now (its plan's exit and device nodes), valued like `options`
    (met at `edge_load`, t at `now_load`; it need not be on the front). `cand_index` is -1.
    Raises CostGraphError when the plan no longer fits the graph. O(V + E)."""
    part = partition(demand.planmap.graph, exit_name, device_nodes)
    index = next(i for i, e in enumerate(demand.planmap.graph.exits) if e.name == part.exit)
    uses_edge = bool(part.edge_nodes)
    cond = demand.request.conditions()
    at_most = part.predict(replace(cond, edge_load=edge_load if uses_edge else 0.0))
    now = part.predict(replace(cond, edge_load=now_load if uses_edge else 0.0))
    e = part.edge_sum_ms + demand.planmap.graph.overheads.edge_request_ms if uses_edge else 0.0
    accuracy = demand.planmap.graph.exits[index].accuracy
    return Option(index, -1, uses_edge, demand.frames_per_s * e, option_value(demand, at_most, now, accuracy))


def options(demand: Demand, edge_load: float, now_load: float) -> list[Option]:
    """The candidates of the device's exits' fronts that `chain` keeps, in its order: its met
    flag priced at `edge_load` and its time at `now_load`, each exit's priced at once
    (`CandSet.latencies` / `bottlenecks`, the same floating-point operations as
    `costmodel.predict_sums`), the chain taken over them all at once (`_records`). Every other
    candidate has a value no better than one of no more load before it, so `chain` over these
    and any other options (the held plan) is `chain` over every candidate and those options.
    O(n log n) numpy work for n candidates, plus an Option per kept one."""
    cond = demand.request.conditions()
    at_most_cond, now_cond = replace(cond, edge_load=edge_load), replace(cond, edge_load=now_load)
    req, f = demand.request, demand.frames_per_s
    cols: list[list[np.ndarray]] = [[], [], [], [], []]  # load, met, accuracy term, −f·t, exit
    for i, cs in enumerate(demand.planmap.cands):
        accuracy = demand.planmap.graph.exits[i].accuracy
        latency, bottleneck = cs.latencies(at_most_cond), cs.bottlenecks(at_most_cond)
        met = np.broadcast_to(meets_all(req, latency, bottleneck, accuracy), len(cs))
        if demand.objective == "latency":
            t = cs.latencies(now_cond) if now_load != edge_load else latency
        else:
            t = cs.bottlenecks(now_cond) if now_load != edge_load else bottleneck
        for col, x in zip(cols, (edge_ms_per_frame(cs) * f, met, np.full(len(cs), accuracy_term(f, accuracy)),
                                 -f * t, np.full(len(cs), i)), strict=True):  # fmt: skip
            col.append(x)
    load, met, acc, neg_t, exit_index = (np.concatenate(c) for c in cols)
    cand_index = np.concatenate([np.arange(len(cs)) for cs in demand.planmap.cands])
    out = []
    for k in _records(load, met, acc, neg_t, exit_index, cand_index):
        cs = demand.planmap.cands[int(exit_index[k])]
        j = int(cand_index[k])
        value = (int(met[k]), float(acc[k]), float(neg_t[k]))
        out.append(Option(int(exit_index[k]), j, cs.masks[j] != cs.st.full, float(load[k]), value))
    return out


def _records(
    load: np.ndarray, met: np.ndarray, acc: np.ndarray, neg_t: np.ndarray, exit_index: np.ndarray, cand: np.ndarray
) -> np.ndarray:
    """The positions `chain` keeps, in its order (load ascending, value (met, accuracy, −f·t)
    descending, the deeper exit, the earlier candidate): those whose value is strictly above
    every earlier one's. Values are ranked densely (equal values, equal ranks), so that is a
    rank above the running maximum of the ranks before. O(n log n)."""
    by_value = np.lexsort((neg_t, acc, met))
    v = (met[by_value], acc[by_value], neg_t[by_value])
    new = np.ones(len(load), dtype=bool)
    new[1:] = (v[0][1:] != v[0][:-1]) | (v[1][1:] != v[1][:-1]) | (v[2][1:] != v[2][:-1])
    rank = np.empty(len(load), dtype=np.int64)
    rank[by_value] = np.cumsum(new)
    order = np.lexsort((cand, -exit_index, -rank, load))
    ranks = rank[order]
    earlier = np.concatenate(([0], np.maximum.accumulate(ranks)[:-1]))
    return order[ranks > earlier]


def chain(opts: Sequence[Option]) -> list[Option]:
    """The options worth considering: load ascending, value strictly increasing (for equal
    loads the best value; ties keep the deeper exit, then the earlier candidate). O(n log n)."""
    ranked = sorted(opts, key=lambda o: (o.load, _neg(o.ranked), -o.exit_index, o.cand_index))
    out: list[Option] = []
    for o in ranked:
        if not out or o.ranked > out[-1].ranked:
            out.append(o)
    return out


def held_option(demand: Demand, switch_margin: float, edge_load: float, now_load: float) -> Option | None:
    """The device's current plan as an option (met at `edge_load`, t at `now_load`), credited
    μ·f·t (None: no current plan, or one that no longer fits the graph). O(V + E)."""
    if demand.current is None:
        return None
    try:
        held = current_option(demand, *demand.current, edge_load, now_load)
    except (CostGraphError, KeyError, StopIteration):
        return None
    return replace(held, credit=switch_margin * -held.value[2])


def _neg(v: Value) -> Value:
    return (-v[0], -v[1], -v[2])


@dataclass(frozen=True)
class _Layer:
    """The DP's states after k devices, as arrays: total load (n,), total value (n, 3), the
    parent state in the previous layer and the option taken (indices)."""

    load: np.ndarray
    value: np.ndarray
    parent: np.ndarray
    option: np.ndarray

    def __len__(self) -> int:
        return len(self.load)


def solve(
    demands: Sequence[Demand],
    capacity_ms_per_s: float,
    rho_max: float,
    exact_leases: int = EXACT_LEASES,
    max_states: int = MAX_STATES,
    switch_margin: float = 0.0,
    bounded: bool = True,
    time_load: float | None = None,
    limit_ms_per_s: float | None = None,
    nominal_ms_per_s: float | None = None,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> Solution:
    """The best option per device under Σ load <= `limit_ms_per_s` (None: ρ_max·C; within the
    lease scripts' relative ADMIT_RTOL; see the module docstring), each device's current plan
    credited `switch_margin`, met flags priced at `priced_load` (N: `nominal_ms_per_s`, None:
    C), times at edge load `time_load` (None: the same). Device-Only (load 0) is always an
    option, so a solution always exists. First the bucketed DP (at most GRID states a step) gives a
    feasible answer; then, for at most `exact_leases` devices, the exact DP keeps only the states
    whose LP bound (`dapdee.fleet.bounds`; `bounded` false: every state, for comparison) still
    reaches that answer's value, and gives up (answering the bucketed one, `exact` false) past
    `max_states` states. Each DP step is vectorised: O(S·c·log(S·c)) for S states and a chain
    of c options. `exact` is also false when a device's plan map is not (an exit past the
    enumeration cap, or a build cut short: its options are a candidate set, not every
    partition). SolveOverBudget once `time.monotonic()` passes `deadline`, SolveStopped once
    `stop` is set (each checked per device priced and per DP step)."""
    if not 0.0 <= switch_margin < 1.0:
        raise ValueError(f"switch_margin: must be in [0, 1), got {switch_margin!r}")
    # the lease scripts admit a sum up to a relative ADMIT_RTOL past the limit (`within_limit`),
    # and so does the DP: else a worker that admission filled exactly would look overbooked here
    # and lose a device at the next rebalance
    stated = rho_max * capacity_ms_per_s if limit_ms_per_s is None else limit_ms_per_s
    limit = stated * (1.0 + ADMIT_RTOL)
    load = priced_load(rho_max, capacity_ms_per_s, nominal_ms_per_s)
    now = load if time_load is None else time_load
    budget = _Budget(deadline, stop)
    order, chains = _heaviest_first(demands, switch_margin, load, now, budget)
    bucket = stated / GRID
    # limit 0 (or one GRID rounds to 0): zero loads only
    rough = _dp(chains, limit, bucket if bucket > 0 else None, budget=budget)
    assert rough is not None  # bucketed: never over a state budget
    run, exact = rough, False
    maps_exact = all(d.planmap.exact for d in demands)
    if len(demands) <= exact_leases:
        floor = None
        if bounded:
            bounds = suffix_bounds([[(o.load, o.ranked) for o in ch] for ch in chains], COMPONENTS + TIE_WEIGHTS)
            floor = (rough.ranked, bounds)
        found = _dp(chains, limit, None, max_states, floor, budget)
        if found is not None:
            run, exact = found, maps_exact
    by_device = dict(zip(order, run.picks, strict=True))
    picks = tuple(by_device[i] for i in range(len(order)))
    value = (sum(o.value[0] for o in picks), sum(o.value[1] for o in picks), sum(o.value[2] for o in picks))
    ranked = (sum(o.ranked[0] for o in picks), sum(o.ranked[1] for o in picks), sum(o.ranked[2] for o in picks))
    return Solution(picks, run.load, value, exact, run.states, now, ranked)


def settle(
    demands: Sequence[Demand],
    capacity_ms_per_s: float,
    rho_max: float,
    levels: int = SETTLE_LEVELS,
    nominal_ms_per_s: float | None = None,
    kept_ms_per_s: float = 0.0,
    deadline: float | None = None,
    stop: threading.Event | None = None,
    **solve_kw: Any,
) -> Solution:
    """The best of up to `levels` solves that each price the times at the load they may book:
    for the share s_k = ρ_max·k/levels of the worker, `solve` with Σ load <= s_k·C − K and times
    priced at min(0.95, s_k·C/N) (N: `nominal_ms_per_s`, None: C; K: `kept_ms_per_s`, what
    leases outside `demands` book and keep, e.g. those the caller cannot price), so every
    answer's times are at least what its devices will see from each other. The answer is the
    one of highest (credited) value. The top share is the plain ρ_max solve (within
    max(0, ρ_max·C − K)), so no answer meets fewer requirements or less accuracy; shares are
    tried downwards and the search stops at the first that meets fewer or less (a smaller share
    only shrinks the choice, so every share below it would too), or that K alone fills. A single
    time load is either too high for a light worker (priced at ρ_max, a lone device on an idle
    worker counted its 30 ms Edge plan as 50 ms and was moved to its 41.7 ms Device-Only plan)
    or unstable (priced at the load booked before the rebalance, a full worker's devices all
    left it, and the next rebalance sent them all back). The answer is exact only if every share
    solved was (an approximate top share may meet fewer requirements than the ρ_max problem
    allows, and a lower share then win). Past `deadline` (a `time.monotonic()` value) the
    search stops: with the top share solved, its best so far is the answer, `exact` false;
    before, SolveOverBudget. Once `stop` is set (another thread's), SolveStopped, whatever was
    solved. O(levels) calls of `solve`, the cheaper the smaller the share."""
    best: Solution | None = None
    exact = True
    for k in range(levels, 0, -1):
        share = rho_max * k / levels
        room = share * capacity_ms_per_s - kept_ms_per_s
        if best is not None and room < 0:
            break
        try:
            sol = solve(
                demands, capacity_ms_per_s, rho_max, time_load=priced_load(share, capacity_ms_per_s, nominal_ms_per_s),
                limit_ms_per_s=max(0.0, room), nominal_ms_per_s=nominal_ms_per_s, deadline=deadline, stop=stop,
                **solve_kw,
            )  # fmt: skip
        except SolveOverBudget:
            if best is None:
                raise
            exact = False
            break
        exact = exact and sol.exact
        if best is not None and sol.ranked[:2] < best.ranked[:2]:
            break
        if best is None or sol.ranked > best.ranked:
            best = sol
    assert best is not None, "levels >= 1"
    return replace(best, exact=exact)


def _heaviest_first(
    demands: Sequence[Demand], switch_margin: float, met_load: float, time_load: float, budget: _Budget
) -> tuple[list[int], list[list[Option]]]:
    """Each device's chain (its options and held plan, `chain`) and the device order the DP
    takes them in: the heaviest option first, since those choices decide most of the room left,
    so the bounds on the rest prune soonest (measured: several times fewer states than in the
    given order on varied fleets). Checks `budget` per device. O(Σ options log)."""
    chains = []
    for d in demands:
        held = held_option(d, switch_margin, met_load, time_load)
        chains.append(chain(options(d, met_load, time_load) + ([held] if held is not None else [])))
        budget.check()
    order = sorted(range(len(chains)), key=lambda i: (-chains[i][-1].load, i))
    return order, [chains[i] for i in order]


@dataclass(frozen=True)
class _Run:
    """One DP's answer: an option per device, their load, their ranked value (summed in device
    order, as the DP sums it) and the widest staircase it kept."""

    picks: tuple[Option, ...]
    load: float
    ranked: Value
    states: int


def _dp(
    chains: Sequence[Sequence[Option]],
    limit: float,
    bucket: float | None,
    max_states: int | None = None,
    floor: tuple[Value, Sequence[SuffixBound]] | None = None,
    budget: _Budget = _Budget(),
) -> _Run | None:
    """The DP over devices: the staircase after each one (one state per `bucket` of load when
    given), without the states whose bound cannot reach `floor`'s value (a known answer's, with
    the bounds of each suffix of devices). None when a staircase outgrows `max_states`;
    checks `budget` per step."""
    start = np.zeros(1, dtype=np.int64) - 1
    layers = [_Layer(np.zeros(1), np.zeros((1, 3)), start, start)]
    widest = 1
    for k, ch in enumerate(chains):
        budget.check()
        prev = layers[-1]
        loads = prev.load[:, None] + np.array([o.load for o in ch])[None, :]
        si, oi = np.nonzero(loads <= limit)  # state-major, like nested loops over states then options
        values = prev.value[si] + np.array([o.ranked for o in ch], dtype=np.float64)[oi]
        layer = _staircase(_Layer(loads[si, oi], values, si, oi), bucket)
        if floor is not None:
            layer = _reaching(layer, floor[1][k + 1], limit, floor[0])
        if len(layer) == 0 or (max_states is not None and len(layer) > max_states):
            return None  # (none left: only by rounding; the caller keeps its known answer)
        widest = max(widest, len(layer))
        layers.append(layer)
    k = len(layers[-1]) - 1  # the staircase's last state has the best value
    best = layers[-1]
    load, ranked = float(best.load[k]), (int(best.value[k, 0]), float(best.value[k, 1]), float(best.value[k, 2]))
    picks: list[Option] = []
    for depth in range(len(chains), 0, -1):
        picks.append(chains[depth - 1][int(layers[depth].option[k])])
        k = int(layers[depth].parent[k])
    picks.reverse()
    return _Run(tuple(picks), load, ranked, widest)


def _reaching(layer: _Layer, rest: SuffixBound, limit: float, floor: Value) -> _Layer:
    """The states whose value plus the bound on what the remaining devices add (`rest`, within
    the room each state leaves) is not lexicographically below `floor`. The bound's components
    are rounded up to what sums can be (whole devices; multiples of ACCURACY_QUANTUM) and the
    third is given a relative 10⁻⁹ of slack (float sums of n terms err by ~n·10⁻¹⁶), so rounding
    never drops a state that could tie.

    Where the first two components can at best tie `floor`, a completion that beats it ties
    them exactly, so for any weights λ ≥ 0 its λ·value is at least λ·floor: a state whose bound
    on λ·value (`TIE_WEIGHTS`, bounded after the three components) falls short cannot beat it
    either. The weights make the LP pay for the met devices and the accuracy the floor needs,
    which the third component's bound alone does not. O(n log S)."""
    bound = rest.upper(limit - layer.load)  # (n, 3 + len(TIE_WEIGHTS))
    upper = layer.value + bound[:, :3]
    met = np.floor(upper[:, 0] + 1e-6)
    acc = np.floor((upper[:, 1] + 1e-9) / ACCURACY_QUANTUM) * ACCURACY_QUANTUM  # LP sums err by ~1e-12
    slack = 1e-9 * max(1.0, abs(floor[2]))
    tie = (met == floor[0]) & (acc == floor[1])
    short = upper[:, 2] < floor[2] - slack
    for j, w in enumerate(TIE_WEIGHTS):
        target = w[0] * floor[0] + w[1] * floor[1] + w[2] * floor[2]
        margin = 1e-9 * (abs(w[0] * floor[0]) + abs(w[1] * floor[1]) + abs(floor[2]) + 1.0)
        short |= layer.value @ np.asarray(w) + bound[:, 3 + j] < target - margin
    below = (met < floor[0]) | ((met == floor[0]) & (acc < floor[1])) | (tie & short)
    keep = ~below
    return _Layer(layer.load[keep], layer.value[keep], layer.parent[keep], layer.option[keep])


def _value_ranks(values: np.ndarray) -> np.ndarray:
    """Each row's rank in the lexicographic order of the rows (equal rows share a rank). O(n log n)."""
    order = np.lexsort(values.T[::-1])
    ranked = values[order]
    new = np.ones(len(values), dtype=np.int64)
    new[1:] = np.any(ranked[1:] != ranked[:-1], axis=1)
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.cumsum(new)
    return ranks


def _staircase(layer: _Layer, bucket: float | None) -> _Layer:
    """The non-dominated states: load ascending, value strictly increasing (of equal loads the
    best value; ties keep the earlier state). With `bucket`, also one state per load bucket:
    the last (best valued) of the bucket, with its real load. O(n log n)."""
    if len(layer) == 0:
        return layer
    ranks = _value_ranks(layer.value)
    order = np.lexsort((-ranks, layer.load))  # load ascending, then value descending; stable
    ranks = ranks[order]
    before = np.maximum.accumulate(np.concatenate(([0], ranks[:-1])))
    keep = order[ranks > before]
    if bucket is not None:
        b = np.floor(layer.load[keep] / bucket)
        keep = keep[np.append(b[1:] != b[:-1], True)]
    return _Layer(layer.load[keep], layer.value[keep], layer.parent[keep], layer.option[keep])


def option_nodes(demand: Demand, option: Option) -> tuple[str, tuple[str, ...]]:
    """(exit name, device nodes) of an option: from `options`, or the held plan (index -1)."""
    if option.cand_index < 0:
        assert demand.current is not None, "a held option comes from Demand.current"
        return demand.planmap.graph.exits[option.exit_index].name, tuple(demand.current[1])
    cs = demand.planmap.cands[option.exit_index]
    return cs.st.exit_name, cs.lists(option.cand_index)[0]
