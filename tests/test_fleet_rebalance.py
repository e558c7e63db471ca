"""Rebalancing one worker's leases (dapdee.fleet.rebalance) against brute force on small fleets: every
combination of every device's partitions (all exits, all downward-closed sets, priced by the
independent oracle: the met flag at edge load ρ_max, the time at the solve's time load), the
design's lexicographic objective and the capacity; and the time load `settle` finds."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import warnings
from math import prod
from typing import Any

import pytest

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Predicted
from dapdee.fleet.assign import edge_load_of, plan_of, within_limit
from dapdee.fleet.rebalance import SETTLE_LEVELS, Demand, Option, option_nodes, resolved_objective, settle, solve
from dapdee.planning import PlanMap, PlanRequest
from tests import oracle

RHO_MAX = 0.9


def _edge_per_frame(g: dict[str, Any], p: oracle.Price) -> float:
    if not p.edge_nodes:
        return 0.0
    er = (g.get("overheads") or {}).get("edge_request_ms", 0.0)
    return sum(n["edge_ms"] for n in g["nodes"] if n["name"] in p.edge_nodes) + er


def _acc_term(fps: float, acc: float | None) -> float:
    """f·accuracy in the objective's resolution: the nearest multiple of 2⁻²⁰ frames/s, so
    that equal accuracy totals compare equal in any order of summation."""
    return round(fps * (acc or 0.0) * 2**20) / 2**20


def brute_value(
    g: dict[str, Any],
    req: oracle.Req,
    fps: float,
    objective: str,
    now_load: float,
    exit_name: str,
    dev: Any,
    met_load: float = RHO_MAX,
) -> tuple[float, tuple]:
    """(load, (met, f·accuracy, −f·t)) of one partition: met at edge load `met_load` (ρ_max: the
    most any feasible assignment puts on a worker whose capacity is its nominal one), t at
    `now_load`."""
    c = req.cond
    at_most = oracle.price(g, exit_name, dev, oracle.Cond(c.bandwidth_mbps, c.rtt_ms, c.device_load, met_load))
    now = oracle.price(g, exit_name, dev, oracle.Cond(c.bandwidth_mbps, c.rtt_ms, c.device_load, now_load))
    acc = next(e["accuracy"] for e in g["exits"] if e["name"] == exit_name)
    met = (
        (req.min_accuracy is None or (acc is not None and acc >= req.min_accuracy))
        and (req.latency_budget_ms is None or at_most.latency_ms <= req.latency_budget_ms)
        and (req.frame_rate is None or at_most.bottleneck_ms <= 1000 / req.frame_rate)
    )
    t = now.latency_ms if objective == "latency" else now.bottleneck_ms
    return fps * _edge_per_frame(g, at_most), (int(met), _acc_term(fps, acc), -fps * t)


def brute_options(
    g: dict[str, Any], req: oracle.Req, fps: float, objective: str, now_load: float = RHO_MAX, met_load: float = RHO_MAX
) -> list[tuple[float, tuple]]:
    """`brute_value` of every partition of every exit."""
    return [
        brute_value(g, req, fps, objective, now_load, e["name"], dev, met_load)
        for e in g["exits"]
        for dev in oracle.ideals(g, e["name"])
    ]


def brute_best(per_device: list[list[tuple[float, tuple]]], limit: float) -> tuple:
    best = None
    for combo in itertools.product(*per_device):
        if sum(c[0] for c in combo) > limit:
            continue
        value = (sum(c[1][0] for c in combo), sum(c[1][1] for c in combo), sum(c[1][2] for c in combo))
        if best is None or value > best:
            best = value
    return best


def _fleet(
    rng: random.Random, n: int, now_load: float = RHO_MAX, met_load: float = RHO_MAX
) -> tuple[list[Demand], list[list[tuple[float, tuple]]]]:
    """`n` random devices, and each one's brute-force options, times priced at `now_load`, met
    flags at `met_load`."""
    demands, brute = [], []
    for i in range(n):
        g = oracle.random_graph(rng, max_nodes=5, name=f"m{i}")
        g["overheads"] = {
            "device_request_ms": round(rng.uniform(0, 2), 3),
            "edge_request_ms": round(rng.uniform(0, 4), 3),
        }
        fps = rng.choice([5.0, 10.0, 20.0])
        req = oracle.random_request(rng, mode="latency")
        req = oracle.Req(
            oracle.Cond(req.cond.bandwidth_mbps, req.cond.rtt_ms, req.cond.device_load, 0.0),
            latency_budget_ms=rng.choice([None, round(rng.uniform(5, 60), 3)]),
            min_accuracy=req.min_accuracy,
            frame_rate=fps if rng.random() < 0.5 else None,
            mode="latency",
        )
        objective = rng.choice(["latency", "throughput"])
        c = req.cond
        preq = PlanRequest(
            c.bandwidth_mbps,
            c.rtt_ms,
            c.device_load,
            0.0,
            req.latency_budget_ms,
            req.min_accuracy,
            req.frame_rate,
            objective,
        )
        demands.append(Demand(f"d{i}", fps, PlanMap.build(CostGraph.from_dict(g)), preq, objective))
        brute.append(brute_options(g, req, fps, objective, now_load, met_load))
    return demands, brute


def _held(
    rng: random.Random, g: dict[str, Any], req: oracle.Req, d: Demand, now_load: float, margin: float
) -> tuple[tuple[str, tuple[str, ...]], tuple[float, tuple]]:
    """A random partition the device holds: (exit, device nodes) and its brute-force option
    credited margin·f·t in the third component (the oracle's own pricing)."""
    e = rng.choice(g["exits"])
    dev = rng.choice(list(oracle.ideals(g, e["name"])))
    load, (met, acc, neg_time) = brute_value(g, req, d.frames_per_s, d.objective, now_load, e["name"], dev)
    return (e["name"], tuple(sorted(dev))), (load, (met, acc, neg_time * (1 - margin)))


def _close(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and oracle.close(a[1], b[1], 1e-9) and oracle.close(a[2], b[2], 1e-9)


@pytest.mark.parametrize("seed", range(40))
def test_the_rebalance_is_the_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    capacity = rng.choice([50.0, 150.0, 400.0, 1000.0])
    now_load = rng.choice([None, 0.0, rng.uniform(0, RHO_MAX)])
    demands, brute = _fleet(rng, n, RHO_MAX if now_load is None else now_load)
    while n > 2 and prod(len(b) for b in brute) > 300_000:  # keep the brute force to seconds
        n -= 1
        demands, brute = demands[:n], brute[:n]
    sol = solve(demands, capacity, RHO_MAX, time_load=now_load)
    want = brute_best(brute, RHO_MAX * capacity)
    assert sol.exact
    assert _close(sol.value, want), (sol.value, want)
    assert sol.load <= RHO_MAX * capacity
    assert sum(o.load for o in sol.choices) == pytest.approx(sol.load)


@pytest.mark.parametrize("seed", range(30))
def test_with_a_switching_margin_the_rebalance_is_the_credited_brute_force_optimum(seed: int) -> None:
    """Each device holds a random partition (or none), credited μ·f·t of its own time; the
    solver's choice is the brute-force optimum of the credited objective, a held choice names
    the held partition, and the reported value is the plain one."""
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 5)
    margin = rng.choice([0.05, 0.2, 0.6])
    capacity = rng.choice([50.0, 150.0, 400.0])
    now_load = rng.choice([0.0, 0.5, RHO_MAX])
    demands, brute = _fleet(rng, n, now_load)
    while n > 2 and prod(len(b) + 1 for b in brute) > 300_000:
        n -= 1
        demands, brute = demands[:n], brute[:n]
    held, credited = [], []
    for d, opts in zip(demands, brute, strict=True):
        if rng.random() < 0.2:
            held.append(d)
            credited.append(opts)
            continue
        g = json.loads(d.planmap.graph.to_json())
        r = d.request
        cond = oracle.Cond(r.bandwidth_mbps, r.rtt_ms, r.device_load, 0.0)
        req = oracle.Req(cond, r.latency_budget_ms, r.min_accuracy, r.frame_rate, "latency")
        current, option = _held(rng, g, req, d, now_load, margin)
        held.append(dataclasses.replace(d, current=current))
        credited.append([*opts, option])
    sol = solve(held, capacity, RHO_MAX, switch_margin=margin, time_load=now_load)
    ranked = tuple(sum(o.ranked[k] for o in sol.choices) for k in range(3))
    assert _close(ranked, brute_best(credited, RHO_MAX * capacity)), (ranked, brute_best(credited, RHO_MAX * capacity))
    assert sol.value == tuple(sum(o.value[k] for o in sol.choices) for k in range(3))
    for d, o in zip(held, sol.choices, strict=True):
        if o.cand_index < 0:
            assert d.current is not None and option_nodes(d, o) == (d.current[0], d.current[1])
            assert o.credit == pytest.approx(-margin * o.value[2])


def test_a_held_plan_is_kept_while_within_the_margin() -> None:
    """One device holds Device-Only (120 ms); Edge-Only, priced at edge load ρ_max = 0.9, takes
    0.8 + 5 + 8 / (1 − 0.9) = 85.8 ms. Credited μ·120 ms it stays only once
    120·(1 − μ) <= 85.8, i.e. μ >= 0.285."""
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(60.0, 2.0, 4.0)))
    req = PlanRequest(10.0, 5.0, 0.0, latency_budget_ms=200.0, mode="latency")
    d = Demand("d", 10.0, pm, req, "latency", current=("final", ("a", "b")))
    moved = solve([d], 1000.0, RHO_MAX, switch_margin=0.25).choices[0]
    assert moved.uses_edge and moved.load == pytest.approx(80.0)
    kept = solve([d], 1000.0, RHO_MAX, switch_margin=0.3).choices[0]
    assert kept.cand_index == -1 and not kept.uses_edge
    assert handed_out(d, kept, 0.0, 1000.0)["latency_ms"] == pytest.approx(120.0)
    with pytest.raises(ValueError, match="switch_margin"):
        solve([d], 1000.0, RHO_MAX, switch_margin=1.0)


def handed_out(demand: Demand, option: Option, others_ms_per_s: float, nominal_ms_per_s: float) -> dict[str, Any]:
    """The predicted stages of the plan the planner hands out for `option` (`plan_of`, as the
    rebalance's assignments price it) when the other devices book `others_ms_per_s`."""
    load = edge_load_of(others_ms_per_s, nominal_ms_per_s)
    plan, _ = plan_of(demand.planmap, demand.request, *option_nodes(demand, option), load, demand.objective)
    return plan["predicted"]


def test_an_auto_device_is_valued_in_the_mode_it_resolves_to_at_the_priced_load() -> None:
    """20 frames/s (50 ms a frame) at 10 Mbit/s, rtt 5 ms. Edge-Only is the fastest plan at any
    load; its edge stage takes 8 / (1 − ℓe) ms: 16 ms at ℓe = 0.5, which sustains the rate (auto →
    latency), 80 ms at ℓe = 0.9, which does not (auto → throughput). Set modes stay as asked."""
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(60.0, 2.0, 4.0)))
    auto = PlanRequest(bandwidth_mbps=10.0, rtt_ms=5.0, frame_rate=20.0, mode="auto")
    assert resolved_objective(pm, auto, 0.5) == "latency"
    assert resolved_objective(pm, auto, 0.9) == "throughput"
    for mode in ("latency", "throughput"):
        assert resolved_objective(pm, dataclasses.replace(auto, mode=mode), 0.9) == mode


def test_the_edge_goes_to_the_device_that_cannot_meet_its_budget_alone() -> None:
    """Both want 10 frames/s within 200 ms on a 10 Mbit/s link, rtt 5 ms. Device-Only takes
    120 ms on the idle device (meets) and 120 / (1 - 0.8) = 600 ms on the busy one (misses).
    Edge-Only: 0.8 + 5 + 8 = 13.8 ms and 8 ms of the worker per frame = 80 ms/s; the mid cut
    (a on the device) books 6 ms per frame = 60 ms/s and takes 60/(1-ℓd) + 0.08 + 5 + 6 ms.
    With room for 80 ms/s only one device can use the edge. First come, first served would
    give it to whoever asked first; the fleet objective gives it to the busy device, the only
    way both meet their budget. (The solver prices edge parts at ℓe = ρ_max = 0.9, ten times
    the figures above: Edge-Only 85.8 ms, still within the budget, the choice the same.)"""
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(60.0, 2.0, 4.0)))
    idle = Demand("idle", 10.0, pm, PlanRequest(10.0, 5.0, 0.0, latency_budget_ms=200.0, mode="latency"), "latency")
    busy = Demand("busy", 10.0, pm, PlanRequest(10.0, 5.0, 0.8, latency_budget_ms=200.0, mode="latency"), "latency")
    capacity = 80.0 / RHO_MAX
    for order in ([idle, busy], [busy, idle]):
        sol = solve(order, capacity, RHO_MAX)
        picked = {d.device_id: o for d, o in zip(order, sol.choices, strict=True)}
        assert sol.value[0] == 2, sol.value
        assert picked["busy"].uses_edge and not picked["idle"].uses_edge
        # Edge-Only for the busy device beats its mid cut (300 + 11.08 ms) on Σ f·t
        assert picked["busy"].load == pytest.approx(80.0)
    # the plan handed out is priced at the load the other chosen devices put on the worker
    pred = handed_out(busy, picked["busy"], 0.0, capacity)
    assert pred["latency_ms"] == pytest.approx(0.8 + 5 + 8)
    assert handed_out(busy, picked["busy"], 40.0, capacity)["edge_ms"] == pytest.approx(8 / (1 - 40 / capacity))


def test_identical_devices_share_the_worker_optimally() -> None:
    """Six copies of one device (the common fleet case: many cameras of one kind): the staircase
    of sums of identical chains, checked against brute force."""
    rng = random.Random(99)
    demands, brute = _fleet(rng, 1)
    six = [
        Demand(f"d{i}", demands[0].frames_per_s, demands[0].planmap, demands[0].request, demands[0].objective)
        for i in range(6)
    ]
    for capacity in (10.0, 60.0, 200.0):
        sol = solve(six, capacity, RHO_MAX)
        assert _close(sol.value, brute_best(brute * 6, RHO_MAX * capacity))


def test_past_the_exact_limit_the_answer_says_approximate_and_stays_feasible() -> None:
    rng = random.Random(7)
    demands, _ = _fleet(rng, 12)
    sol = solve(demands, 300.0, RHO_MAX, exact_leases=8)
    assert not sol.exact and sol.load <= RHO_MAX * 300.0
    exact = solve(demands, 300.0, RHO_MAX)
    assert exact.exact and exact.value >= sol.value
    # a staircase past the state budget (here: every state kept, none dropped by the bounds)
    tight = solve(demands, 300.0, RHO_MAX, max_states=5, bounded=False)
    assert not tight.exact and tight.load <= RHO_MAX * 300.0 and tight.value <= exact.value


def _node(name: str, inp: str, out_bytes: int, device_ms: float, edge_ms: float) -> dict[str, Any]:
    return {"name": name, "op": "", "inputs": [inp], "out_bytes": out_bytes, "device_ms": device_ms, "edge_ms": edge_ms}


def _chain_demand(name: str, nodes: list[dict[str, Any]]) -> Demand:
    """A device at 100 frames/s with a 150 ms budget on a chain of `nodes` (no overheads)."""
    g = {
        "model": name,
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 1000},
        "nodes": nodes,
        "exits": [{"name": "final", "node": nodes[-1]["name"], "accuracy": 0.9}],
    }
    req = PlanRequest(10.0, 0.0, 0.0, latency_budget_ms=150.0, mode="latency")
    return Demand(name, 100.0, PlanMap.build(CostGraph.from_dict(g)), req, "latency")


def test_settle_is_exact_only_if_every_share_it_solved_was() -> None:
    """Both devices meet their budget only together on the top share (A on device up to b, 450
    ms/s, and B on the edge, 449.995: 899.995 of 900). Past its state budget the top share is
    bucketed, takes A's 450.01 option of the same bucket, and meets one device; the shares
    below are solved exactly and one of them wins with one device met. That answer is not
    exact, and says so."""
    a = _chain_demand(
        "A", [_node("a", "x", 60000, 1.0, 4.0), _node("b", "a", 100, 50.0, 1e-4), _node("c", "b", 10, 100.0, 4.5)]
    )
    b = _chain_demand("B", [_node("p", "x", 10, 200.0, 4.49995)])
    full = settle([a, b], 1000.0, 0.9)
    assert full.exact and full.value[0] == 2
    tight = settle([a, b], 1000.0, 0.9, max_states=3, bounded=False)
    assert tight.value[0] == 1 and not tight.exact


def _parallel_branches() -> CostGraph:
    """Five branches of x joined by one node: 2^5 downward-closed sets for the final exit, past
    an enumeration cap of 4."""
    branches = [(5.0, 9.0, 20000), (40.0, 1.0, 1000), (20.0, 9.0, 100), (40.0, 2.0, 1000), (40.0, 9.0, 100)]
    nodes = [_node(f"b{i}", "x", b, d, e) for i, (d, e, b) in enumerate(branches)]
    join = {"name": "j", "op": "add", "inputs": [n["name"] for n in nodes], "out_bytes": 10}
    nodes.append(join | {"device_ms": 1.0, "edge_ms": 0.5})
    return CostGraph.from_dict(
        {
            "model": "par",
            "input": {"name": "x", "shape": [1], "dtype": "float32", "bytes": 4000},
            "nodes": nodes,
            "exits": [{"name": "final", "node": "j", "accuracy": 0.9}],
        }
    )


def test_a_plan_map_past_its_cap_makes_the_answer_approximate() -> None:
    """A capped map's options are a candidate set, not every partition: here it misses the
    optimum (the full map's answer is faster), so a solve over it must not say exact."""
    req = PlanRequest(bandwidth_mbps=20.0, rtt_ms=2.0, mode="latency")
    full, capped = PlanMap.build(_parallel_branches()), PlanMap.build(_parallel_branches(), cap=4)
    assert full.exact and not capped.exact
    best = settle([Demand("d", 10.0, full, req, "latency")], 30.0, RHO_MAX)
    rough = settle([Demand("d", 10.0, capped, req, "latency")], 30.0, RHO_MAX)
    assert best.exact and best.value > rough.value
    assert not rough.exact and not solve([Demand("d", 10.0, capped, req, "latency")], 30.0, RHO_MAX).exact


def test_a_worker_of_no_capacity_takes_no_load_and_does_not_crash() -> None:
    rng = random.Random(3)
    demands, _ = _fleet(rng, 3)
    for sol in (solve(demands, 0.0, RHO_MAX), settle(demands, 0.0, RHO_MAX)):
        assert sol.load == 0.0 and all(o.load == 0.0 for o in sol.choices)
    assert edge_load_of(0.0, 0.0) == 0.0 and edge_load_of(1.0, 0.0) == 0.95
    # the least positive capacity: its bucket of load (limit / GRID) rounds to zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sol in (solve(demands, 5e-324, RHO_MAX), settle(demands, 5e-324, RHO_MAX)):
            assert sol.load == 0.0 and all(o.load == 0.0 for o in sol.choices)


def test_the_work_of_a_big_fleet_stays_bounded() -> None:
    """Sixty-four devices stay exact while their staircase is small; with a state budget smaller
    than the staircase (a varied fleet of big graphs outgrows any budget; here the LP bounds are
    off, so that every state counts), the solver keeps at most the budget (or one state per
    bucket), says approximate, and its answer stays feasible and no worse than all devices on
    Device-Only."""
    from dapdee.fleet.rebalance import GRID

    rng = random.Random(64)
    demands, brute = _fleet(rng, 64)
    full = solve(demands, 300.0, RHO_MAX, bounded=False)
    assert full.exact and full.load <= RHO_MAX * 300.0 + 1e-9
    assert solve(demands, 300.0, RHO_MAX).value == full.value
    budget = full.states // 3
    sol = solve(demands, 300.0, RHO_MAX, max_states=budget, bounded=False)
    assert not sol.exact and sol.states <= max(budget, GRID)
    assert sol.load <= RHO_MAX * 300.0 + 1e-9 and sol.value <= full.value
    device_only = tuple(sum(max(v for load, v in opts if load == 0)[k] for opts in brute) for k in range(3))
    assert sol.value >= device_only


def _like_cameras(n: int) -> list[Demand]:
    """`n` cameras of one kind, 10 frames/s within 150 ms: an early exit (accuracy 0.9261, 40 ms)
    meets on the device, the final exit (0.9324) only with its second half on the edge (the
    device alone takes 160 ms; the cut after a, priced at edge load 0.9, 40 + 0.08 + rtt +
    (2 + 4) / 0.1 ms, books 60 ms/s). Their round trips differ by a little, as sensed ones do."""
    g = oracle.chain_graph(60.0, 2.0, 4.0)
    g["nodes"][0]["device_ms"], g["nodes"][1]["device_ms"] = 40.0, 120.0
    g["exits"] = [
        {"name": "early", "node": "a", "accuracy": 0.9261},
        {"name": "final", "node": "b", "accuracy": 0.9324},
    ]
    pm = PlanMap.build(CostGraph.from_dict(g))
    asks = [PlanRequest(10.0, 20.0 + 0.37 * i, latency_budget_ms=150.0, mode="latency") for i in range(n)]
    return [Demand(f"cam-{i:02d}", 10.0, pm, ask, "latency") for i, ask in enumerate(asks)]


@pytest.mark.parametrize("n", [12, 64])
def test_like_devices_keep_their_plans_when_nothing_changed(n: int) -> None:
    """Re-solving with every device holding the plan it was just given, nothing else changed,
    moves no device: the held plans are credited, and the accuracy totals of two sets of like
    devices compare equal however the DP happened to add them up (summed as plain floats,
    their last bits decided, and each rebalance swapped devices for nothing)."""
    demands = _like_cameras(n)
    for capacity in (100.0, 250.0, 420.0):
        first = solve(demands, capacity, RHO_MAX, switch_margin=0.05)
        assert 0 < sum(o.uses_edge for o in first.choices) < n, capacity
        held = [dataclasses.replace(d, current=option_nodes(d, o)) for d, o in zip(demands, first.choices, strict=True)]
        for order in (held, held[::-1]):
            again = solve(order, capacity, RHO_MAX, switch_margin=0.05)
            moved = [d.device_id for d, o in zip(order, again.choices, strict=True) if option_nodes(d, o) != d.current]
            assert not moved, (capacity, moved)


@pytest.mark.parametrize("seed", range(25))
def test_settle_is_the_best_over_the_shares_by_brute_force(seed: int) -> None:
    """For each share s_k = ρ_max·k/8 of the worker: the brute-force optimum within s_k·C with
    times priced at s_k; the settled answer's value is the best of these, and it books no more
    than the share its times were priced at."""
    rng = random.Random(5000 + seed)
    n = rng.randint(1, 5)
    capacity = rng.choice([50.0, 150.0, 400.0, 1000.0])
    demands, brute = _fleet(random.Random(seed), n)
    while n > 1 and prod(len(b) for b in brute) > 60_000:
        n -= 1
    demands = demands[:n]
    sol = settle(demands, capacity, RHO_MAX)
    per_share = []
    for k in range(1, SETTLE_LEVELS + 1):
        share = RHO_MAX * k / SETTLE_LEVELS
        _, brute = _fleet(random.Random(seed), n, share)
        per_share.append(brute_best(brute[:n], share * capacity))
    assert _close(sol.value, max(per_share)), (sol.value, per_share)
    assert sol.load <= sol.time_load * capacity * (1 + 1e-9)
    assert sol.time_load in [pytest.approx(RHO_MAX * k / SETTLE_LEVELS) for k in range(1, SETTLE_LEVELS + 1)]


@pytest.mark.parametrize("seed", range(16))
def test_settle_fits_the_devices_around_the_load_kept_by_others_by_brute_force(seed: int) -> None:
    """Leases outside the solve (ones the planner cannot price) keep K of the worker: for each
    share s_k that K does not fill on its own, the brute-force optimum within s_k·C − K with
    times priced at s_k; the settled answer's value is the best of these, and with K it books
    no more than the share its times were priced at. K past ρ_max·C leaves the devices nothing
    to book."""
    rng = random.Random(9000 + seed)
    n = rng.randint(1, 5)
    capacity = rng.choice([50.0, 150.0, 400.0, 1000.0])
    kept = RHO_MAX * capacity * rng.choice([0.1, 0.3, 0.55, 0.8])
    demands, brute = _fleet(random.Random(seed), n)
    while n > 1 and prod(len(b) for b in brute) > 60_000:
        n -= 1
    demands = demands[:n]
    sol = settle(demands, capacity, RHO_MAX, kept_ms_per_s=kept)
    per_share = []
    for k in range(1, SETTLE_LEVELS + 1):
        share = RHO_MAX * k / SETTLE_LEVELS
        if share * capacity >= kept:
            _, brute = _fleet(random.Random(seed), n, share)
            per_share.append(brute_best(brute[:n], share * capacity - kept))
    assert _close(sol.value, max(per_share)), (sol.value, per_share)
    assert sol.load + kept <= sol.time_load * capacity * (1 + 1e-9)
    over = settle(demands, capacity, RHO_MAX, kept_ms_per_s=1.2 * RHO_MAX * capacity)
    assert over.load == 0.0


@pytest.mark.parametrize("seed", range(12))
def test_a_slowdown_prices_the_loads_over_the_nominal_capacity_by_brute_force(seed: int) -> None:
    """A worker measured κ times slower than its nominal capacity N admits C = N/κ: the met flags
    are priced at ρ_max·C/N (the most the others can book, over N), and for each share s_k the
    times at s_k·C/N within s_k·C; the settled answer is the best of these brute-force optima."""
    rng = random.Random(7000 + seed)
    n = rng.randint(1, 4)
    capacity = rng.choice([50.0, 150.0, 400.0])
    kappa = rng.choice([1.3, 1.9, 3.0])
    demands, brute = _fleet(random.Random(seed), n)
    while n > 1 and prod(len(b) for b in brute) > 60_000:
        n -= 1
    demands = demands[:n]
    sol = settle(demands, capacity, RHO_MAX, nominal_ms_per_s=capacity * kappa)
    per_share = []
    for k in range(1, SETTLE_LEVELS + 1):
        share = RHO_MAX * k / SETTLE_LEVELS
        _, brute = _fleet(random.Random(seed), n, share / kappa, RHO_MAX / kappa)
        per_share.append(brute_best(brute[:n], share * capacity))
    assert _close(sol.value, max(per_share)), (sol.value, per_share)
    assert sol.load <= RHO_MAX * capacity * (1 + 1e-9)
    assert sol.time_load in [pytest.approx(RHO_MAX * k / SETTLE_LEVELS / kappa) for k in range(1, SETTLE_LEVELS + 1)]


def _fast_cameras(n: int) -> list[Demand]:
    """`n` cameras that are fast on their own (20 + 20 ms a frame), 10 frames/s within 150 ms,
    10 Mbit/s, round trips a little apart. Edge-Only takes 0.8 + rtt + 8 / (1 − ℓe) ms and books
    80 ms/s: faster than the 40 ms on the device only while the worker is lightly loaded."""
    g = oracle.chain_graph(60.0, 2.0, 4.0)
    g["nodes"][0]["device_ms"], g["nodes"][1]["device_ms"] = 20.0, 20.0
    pm = PlanMap.build(CostGraph.from_dict(g))
    asks = [PlanRequest(10.0, 5.0 + 0.01 * i, latency_budget_ms=150.0, mode="latency") for i in range(n)]
    return [Demand(f"cam-{i:02d}", 10.0, pm, ask, "latency") for i, ask in enumerate(asks)]


def test_a_lone_device_keeps_the_edge_plan_that_is_fastest_on_an_idle_worker() -> None:
    """Alone, Edge-Only books 80 of 1000 ms/s: within the smallest share (0.1125), its time there
    is 0.8 + 5 + 8 / 0.8875 = 14.8 ms against 40 ms on the device. Priced at ρ_max (85.8 ms) it
    would have been moved to the slower plan."""
    (cam,) = _fast_cameras(1)
    plain = solve([cam], 1000.0, RHO_MAX).choices[0]
    assert not plain.uses_edge
    sol = settle([cam], 1000.0, RHO_MAX)
    assert sol.choices[0].uses_edge and sol.time_load == pytest.approx(RHO_MAX / SETTLE_LEVELS)
    assert -sol.value[2] / 10.0 == pytest.approx(0.8 + 5.0 + 8.0 / (1 - RHO_MAX / SETTLE_LEVELS))


def test_settled_devices_stay_put_where_a_rebalance_at_the_booked_load_swings() -> None:
    """Sixteen fast cameras on a worker with room for eleven Edge-Only devices. Priced at the
    load booked before (the others' 0.8 of a full worker), every device is faster on its own CPU;
    priced at an empty worker, every device that fits goes to the edge: re-solving at the load
    each answer booked swings the whole fleet on and off the worker. The settled answer puts
    some devices on the edge, and re-settling with every device holding its plan moves none."""
    cams = _fast_cameras(16)
    full = solve(cams, 1000.0, RHO_MAX, time_load=0.0)
    assert sum(o.uses_edge for o in full.choices) == 11
    emptied = solve(cams, 1000.0, RHO_MAX, time_load=(full.load - 80.0) / 1000.0)
    assert not any(o.uses_edge for o in emptied.choices)
    first = settle(cams, 1000.0, RHO_MAX, switch_margin=0.05)
    on_edge = sum(o.uses_edge for o in first.choices)
    assert 0 < on_edge <= 11 and first.load <= first.time_load * 1000.0 + 1e-9
    held = [dataclasses.replace(d, current=option_nodes(d, o)) for d, o in zip(cams, first.choices, strict=True)]
    again = settle(held, 1000.0, RHO_MAX, switch_margin=0.05)
    moved = [d.device_id for d, o in zip(held, again.choices, strict=True) if option_nodes(d, o) != d.current]
    assert not moved, moved


def test_a_worker_filled_exactly_keeps_both_devices_as_admission_does() -> None:
    """Two devices that miss their budget without the edge book 0.1 and 0.2 ms/s (10 frames/s
    × 0.01 and 0.02 ms) of a 0.3 ms/s limit. Summed in floating point that is
    0.30000000000000004: admission (`within_limit`, the lease scripts' relative 1e-9) admits
    both, and the rebalance must keep both rather than drop one for a rounding."""
    demands = []
    for name, edge_ms in (("a", 0.01), ("b", 0.02)):
        d = _chain_demand(name, [_node("n", "x", 10, 500.0, edge_ms)])
        demands.append(dataclasses.replace(d, frames_per_s=10.0))
    assert 0.1 + 0.2 > 0.3 and within_limit(0.1 + 0.2, 0.3)
    sol = solve(demands, 1000.0, RHO_MAX, limit_ms_per_s=0.3)
    assert sol.value[0] == 2 and all(o.uses_edge for o in sol.choices), sol


def _priced_one_by_one(demand: Demand, edge_load: float, now_load: float) -> list[Option]:
    """Every candidate of every exit's front as an Option, each priced alone by
    `CandSet.predict` (`costmodel.predict_sums`) and valued by the fleet's rule, spelt here on
    its own (DESIGN: met = accuracy, latency budget and frame rate all met): what `options`
    priced candidate by candidate before it priced each exit at once."""
    from dapdee.fleet.assign import edge_ms_per_frame
    from dapdee.fleet.rebalance import accuracy_term

    req = demand.request

    def met(pred: Predicted, accuracy: float | None) -> bool:
        return (
            (req.min_accuracy is None or (accuracy is not None and accuracy >= req.min_accuracy))
            and (req.latency_budget_ms is None or pred.latency_ms <= req.latency_budget_ms)
            and (req.frame_rate is None or pred.bottleneck_ms <= 1000.0 / req.frame_rate)
        )

    cond = demand.request.conditions()
    at_most_cond, now_cond = (
        dataclasses.replace(cond, edge_load=edge_load),
        dataclasses.replace(cond, edge_load=now_load),
    )
    f, out = demand.frames_per_s, []
    for i, cs in enumerate(demand.planmap.cands):
        accuracy = demand.planmap.graph.exits[i].accuracy
        loads = edge_ms_per_frame(cs) * f
        for j in range(len(cs)):
            at_most, now = cs.predict(j, at_most_cond), cs.predict(j, now_cond)
            t = now.latency_ms if demand.objective == "latency" else now.bottleneck_ms
            value = (int(met(at_most, accuracy)), accuracy_term(f, accuracy), -f * t)
            out.append(Option(i, j, cs.masks[j] != cs.st.full, float(loads[j]), value))
    return out


@pytest.mark.parametrize("seed", range(300))
def test_the_options_priced_per_exit_give_the_chain_of_every_candidate_priced_alone(seed: int) -> None:
    """`options(...)` is exactly (every field, every bit) `chain` over every candidate priced one
    by one, and so is `chain` of it with the held plan added, on random graphs, requests and
    loads, with budgets set at a candidate's own latency (met by a hair's breadth), graphs with
    twin branches and exits sharing a node (equal values, so the tie-breaks decide)."""
    from dapdee.fleet.rebalance import chain, held_option, options

    rng = random.Random(seed)
    g = oracle.random_graph(rng, max_nodes=7, name=f"m{seed}")
    if rng.random() < 0.3:  # twins: equal sums, equal values
        twin = dict(g["nodes"][0], name="twin")
        g["nodes"].append(twin)
    if rng.random() < 0.3:  # a second exit at an exit's node, as accurate: equal options of two exits
        g["exits"].insert(0, dict(g["exits"][0], name="same"))
    if rng.random() < 0.5:
        g["overheads"] = {"device_request_ms": rng.choice([0.0, 1.5]), "edge_request_ms": rng.choice([0.0, 3.0])}
    pm = PlanMap.build(CostGraph.from_dict(g))
    objective = rng.choice(["latency", "throughput"])
    edge_load, now_load = rng.choice([0.0, 0.3, 0.9]), rng.choice([0.0, 0.45, 0.9])
    probe = PlanRequest(rng.uniform(0.1, 50.0), rng.uniform(0, 20), rng.choice([0.0, 0.5]), 0.0, mode=objective)
    cs = rng.choice(pm.cands)
    hair = cs.predict(rng.randrange(len(cs)), dataclasses.replace(probe.conditions(), edge_load=edge_load))
    req = dataclasses.replace(
        probe,
        latency_budget_ms=rng.choice([None, hair.latency_ms, rng.uniform(1, 60)]),
        min_accuracy=rng.choice([None, 0.55, 0.7]),
        frame_rate=rng.choice([None, 1000.0 / hair.bottleneck_ms if hair.bottleneck_ms > 0 else None, 10.0]),
    )
    e = rng.randrange(len(pm.cands))
    current = (pm.graph.exits[e].name, pm.cands[e].lists(rng.randrange(len(pm.cands[e])))[0])
    demand = Demand("d", rng.choice([1.0, 10.0, 30.0]), pm, req, objective, current)
    held = held_option(demand, 0.05, edge_load, now_load)
    assert held is not None
    alone = _priced_one_by_one(demand, edge_load, now_load)
    assert options(demand, edge_load, now_load) == chain(alone)
    assert chain([*options(demand, edge_load, now_load), held]) == chain([*alone, held])


def test_a_solve_past_its_deadline_or_stopped_stops_and_one_within_it_is_unchanged() -> None:
    """`settle` with a deadline already past raises SolveOverBudget (no share solved: nothing to
    answer with); with its stop set, SolveStopped, deadline or not; with a deadline far off and
    a stop not set it answers as without either."""
    import threading
    import time

    from dapdee.fleet.rebalance import SolveOverBudget, SolveStopped

    demands, _ = _fleet(random.Random(5), 4)
    with pytest.raises(SolveOverBudget):
        settle(demands, 300.0, RHO_MAX, deadline=time.monotonic() - 1.0)
    stopped = threading.Event()
    stopped.set()
    for deadline in (None, time.monotonic() + 600.0):
        with pytest.raises(SolveStopped):
            settle(demands, 300.0, RHO_MAX, deadline=deadline, stop=stopped)
    free = settle(demands, 300.0, RHO_MAX, deadline=time.monotonic() + 600.0, stop=threading.Event())
    assert free == settle(demands, 300.0, RHO_MAX)


def test_a_64_exit_fleet_is_priced_per_exit_at_once() -> None:
    """64 exits on one node of a 100-node chain (each front 100 candidates), 12 devices: the
    options of a device are the chain of its 6,464 candidates (`options` keeps only those), and
    settle answers exactly; priced candidate by candidate this took seconds per device."""
    from dapdee.fleet.rebalance import chain, options

    nodes = [_node(f"n{i}", f"n{i - 1}" if i else "x", 100, 1.0, 0.5) for i in range(100)]
    g = {
        "model": "wide-exits",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 100},
        "nodes": nodes,
        "exits": [{"name": f"e{k}", "node": "n99", "accuracy": k / 63} for k in range(64)],
    }
    pm = PlanMap.build(CostGraph.from_dict(g))
    demands = [
        Demand(f"d{i}", 1.0, pm, PlanRequest(bandwidth_mbps=1.0 + i, frame_rate=1.0, mode="latency"), "latency")
        for i in range(12)
    ]
    assert sum(len(cs) for cs in pm.cands) > 6000
    for d in demands[:2]:
        kept = options(d, 0.9, 0.9)
        assert kept == chain(kept) and len(kept) < 200
    assert settle(demands, 1000.0, RHO_MAX).exact
