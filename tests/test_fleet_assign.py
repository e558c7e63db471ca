"""One device on a shared edge (dapdee.fleet.assign) against a brute force written from the design:
every (worker, downward-closed partition) pair priced by the independent oracle, admission and edge
load from the other leases applied by hand, then the design's walk."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from dapdee.costgraph import CostGraph
from dapdee.fleet.assign import EdgeSlot, plan_for_device, plan_of
from dapdee.planning import PlanMap, PlanRequest
from tests import oracle

RHO_MAX = 0.9


def _with_edge_scale(g: dict[str, Any], scale: float) -> dict[str, Any]:
    """The graph as a worker tier `scale` x slower than the graph's own edge timings sees it."""
    return {**g, "nodes": [{**n, "edge_ms": round(n["edge_ms"] * scale, 6)} for n in g["nodes"]]}


def _plan_request(req: oracle.Req) -> PlanRequest:
    c = req.cond
    return PlanRequest(
        c.bandwidth_mbps,
        c.rtt_ms,
        c.device_load,
        0.0,
        req.latency_budget_ms,
        req.min_accuracy,
        req.frame_rate,
        req.mode,
    )


Worker = tuple[dict[str, Any], float, float, float]  # graph, capacity, reserved by others, nominal


def brute_force(workers: list[Worker], req: oracle.Req, fps: float) -> dict[str, list[oracle.Price]]:
    """Per exit, every admissible partition on every worker (graph, capacity, reserved by others,
    nominal capacity), priced at that worker's edge load min(0.95, reserved / nominal);
    admissible: reserved + fps·e_i <= ρ_max·capacity; Device-Only always."""
    out: dict[str, list[oracle.Price]] = {}
    for g, capacity, reserved, nominal in workers:
        cond = oracle.Cond(
            req.cond.bandwidth_mbps, req.cond.rtt_ms, req.cond.device_load, min(0.95, reserved / nominal)
        )
        er = (g.get("overheads") or {}).get("edge_request_ms", 0.0)
        for e in g["exits"]:
            for dev in oracle.ideals(g, e["name"]):
                p = oracle.price(g, e["name"], dev, cond)
                if p.edge_nodes:
                    e_i = sum(n["edge_ms"] for n in g["nodes"] if n["name"] in p.edge_nodes) + er
                    if reserved + fps * e_i > RHO_MAX * capacity:
                        continue
                out.setdefault(e["name"], []).append(p)
    return out


def _random_fleet_case(rng: random.Random) -> tuple[dict[str, Any], list[Worker], float]:
    g = oracle.random_graph(rng, max_nodes=7)
    if rng.random() < 0.7:
        g["overheads"] = {
            "device_request_ms": round(rng.uniform(0, 3), 4),
            "edge_request_ms": round(rng.uniform(0, 4), 4),
        }
    workers = []
    for _ in range(rng.randint(1, 3)):
        nominal = rng.choice([1000.0, 2000.0, 4000.0])
        capacity = nominal / rng.choice([1.0, 1.0, 1.3, 1.9])  # a measured slowdown κ lowers admission only
        reserved = capacity * rng.choice([0.0, rng.uniform(0, 0.95), 0.89, rng.uniform(0.85, 1.2)])
        workers.append((_with_edge_scale(g, rng.choice([1.0, 0.5, 3.0])), capacity, reserved, nominal))
    fps = round(10 ** rng.uniform(0, 2.3), 4)
    return g, workers, fps


def test_plans_are_the_brute_force_optimum_over_workers_and_partitions() -> None:
    rng = random.Random(20251202)
    checked = fragile = 0
    for case in range(300):
        g, workers, fps = _random_fleet_case(rng)
        req = oracle.random_request(rng)
        slots = [
            EdgeSlot(f"http://w{k}", PlanMap.build(CostGraph.from_dict(wg)), cap, res, nominal_ms_per_s=nom)
            for k, (wg, cap, res, nom) in enumerate(workers)
        ]
        got = plan_for_device(slots, _plan_request(req), fps, RHO_MAX)
        prices = brute_force(workers, req, fps)
        want = oracle.decide(g, req, prices)
        # the plan's numbers are the oracle's for its own partition on the worker it names
        named = next(w for k, w in enumerate(workers) if f"http://w{k}" == got.plan["edge_worker"])
        assert got.worker in (None, got.plan["edge_worker"])
        cond = oracle.Cond(req.cond.bandwidth_mbps, req.cond.rtt_ms, req.cond.device_load, got.edge_load)
        p = oracle.check_consistent(named[0], got.plan, cond)
        if got.worker is None:
            assert not p.edge_nodes and got.edge_ms_per_frame == 0.0
        else:
            assert p.edge_nodes, case
            _, capacity, reserved, _ = named
            assert reserved + fps * got.edge_ms_per_frame <= RHO_MAX * capacity, case
        assert got.edge_load == pytest.approx(min(0.95, named[2] / named[3]))
        if want.fragile:
            fragile += 1
            continue
        assert got.plan["mode"] == want.mode, case
        assert got.plan["exit"]["name"] == want.exit, (case, got.plan["exit"], want.exit)
        assert got.plan["constraints_met"] is want.met, case
        assert oracle.close(getattr(p, want.value_key), want.value), (case, want.value_key, want.value)
        checked += 1
    print(f"fleet assign: {checked} cases checked exactly, {fragile} fragile (ties at a threshold)")
    assert checked >= 250


def test_a_plan_handed_out_by_name_says_what_the_librarys_plan_says() -> None:
    """A partition the planner hands out by name (a rebalance's assignment, a held plan:
    `plan_of`) is the library's plan of that partition: the same plan id, mode, prediction and
    `constraints_met` (judged in the plan's mode), on random graphs and requests."""
    rng = random.Random(11)
    met_in_mode_only = 0
    for _ in range(400):
        g = oracle.random_graph(rng, max_nodes=6)
        req = _plan_request(oracle.random_request(rng))
        pm = PlanMap.build(CostGraph.from_dict(g))
        lib = pm.plan(req)
        plan, _ = plan_of(pm, req, lib["exit"]["name"], lib["device_nodes"], req.edge_load, lib["mode"])
        assert (plan["plan_id"], plan["mode"], plan["constraints_met"]) == (
            lib["plan_id"],
            lib["mode"],
            lib["constraints_met"],
        ), (g, req)
        assert plan["predicted"] == pytest.approx(lib["predicted"])
        pred = plan["predicted"]
        if lib["mode"] == "latency":
            misses_other = req.frame_rate is not None and pred["bottleneck_ms"] > 1000.0 / req.frame_rate
        else:
            misses_other = req.latency_budget_ms is not None and pred["latency_ms"] > req.latency_budget_ms
        met_in_mode_only += lib["constraints_met"] and misses_other
    assert met_in_mode_only > 0  # plans met in their mode that miss the other mode's requirement


def test_a_full_worker_pushes_the_device_elsewhere_and_then_onto_its_own_cpu() -> None:
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(30.0, 1.0, 3.0)))
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=1.0, mode="latency")
    # Edge-Only: 0 + (0.8 + 1) + (2 + 3) = 6.8 ms, e_i = 5 ms; at 20 frames/s it books 100 ms/s.
    roomy = EdgeSlot("http://roomy", pm, 1000.0, 700.0)  # 700 + 100 <= 900: admitted at load 0.7
    full = EdgeSlot("http://full", pm, 1000.0, 850.0)  # 850 + 100 > 900: only Device-Only
    got = plan_for_device([full, roomy], req, 20.0)
    assert got.worker == "http://roomy" and got.plan["edge_worker"] == "http://roomy"
    assert got.plan["device_nodes"] == [] and got.edge_ms_per_frame == pytest.approx(5.0)
    # edge_ms = 5 / (1 - 0.7) = 16.67; latency = 0.8 + 1 + 16.67 = 18.47 < Device-Only 60
    assert got.plan["predicted"]["latency_ms"] == pytest.approx(1.8 + 5.0 / 0.3)
    got = plan_for_device([full], req, 20.0)
    assert got.worker is None and got.plan["edge_worker"] == "http://full"  # the link to probe
    assert got.plan["device_nodes"] == ["a", "b"] and got.plan["predicted"]["latency_ms"] == pytest.approx(60.0)
    # a lower frame rate fits on the full worker: 850 + 5 * 10 = 900 <= 900, and at load 0.85
    # Edge-Only still wins: 1.8 + 5 / 0.15 = 35.1 < 60 (the mid cut: 30 + 1.08 + 4 / 0.15 = 57.7)
    got = plan_for_device([full], req, 10.0)
    assert got.worker == "http://full" and got.edge_load == pytest.approx(0.85)


def test_an_explicit_edge_load_overrides_the_leases_but_not_admission() -> None:
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(30.0, 1.0, 3.0)))
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=1.0, mode="latency")
    got = plan_for_device([EdgeSlot("http://w", pm, 1000.0, 700.0)], req, 20.0, edge_load=0.0)
    assert got.edge_load == 0.0 and got.plan["predicted"]["latency_ms"] == pytest.approx(6.8)
    got = plan_for_device([EdgeSlot("http://w", pm, 1000.0, 890.0)], req, 20.0, edge_load=0.0)
    assert got.worker is None


def test_without_a_frame_rate_only_a_worker_already_past_the_threshold_is_refused() -> None:
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(30.0, 1.0, 3.0)))
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=1.0, mode="latency")
    assert plan_for_device([EdgeSlot("http://w", pm, 1000.0, 900.0)], req, None).worker == "http://w"
    assert plan_for_device([EdgeSlot("http://w", pm, 1000.0, 900.5)], req, None).worker is None


def test_a_plan_that_fills_a_worker_exactly_is_admitted_whatever_the_rounding() -> None:
    """Four leases of 850 ms/s in all sum to 850.0000000000001 in this order, so Edge-Only at 10
    frames/s (e_i = 5 ms: 50 ms/s) books 900.0000000000001 against the limit 0.9 x 1000 = 900:
    refused by an exact comparison. Like the lease scripts, the planner allows a relative 1e-9,
    and no more: 1 ppm over is refused."""
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(30.0, 1.0, 3.0)))
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=1.0, mode="latency")
    others = sum([276.5, 269.2, 201.1, 103.2])
    assert others + 50.0 > RHO_MAX * 1000.0  # the rounding this test is about
    got = plan_for_device([EdgeSlot("http://w", pm, 1000.0, others)], req, 10.0)
    assert got.worker == "http://w" and got.plan["device_nodes"] == [], got.plan["device_nodes"]
    # the cheapest edge plan (b on the edge: e_i = 1 + 3 = 4 ms, 40 ms/s) 1 ppm past the limit
    over = plan_for_device([EdgeSlot("http://w", pm, 1000.0, 860.0 * (1 + 1e-6))], req, 10.0)
    assert over.worker is None


def test_a_slowdown_lowers_admission_but_not_the_edge_load() -> None:
    pm = PlanMap.build(CostGraph.from_dict(oracle.chain_graph(30.0, 1.0, 3.0)))
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=1.0, mode="latency")
    # nominal 1000 ms/s, κ = 2: the leases may book 0.9 x 500 = 450 ms/s; others reserve 300
    slow = EdgeSlot("http://w", pm, 500.0, 300.0, nominal_ms_per_s=1000.0)
    got = plan_for_device([slow], req, 20.0)  # 300 + 5 x 20 = 400 <= 450: admitted
    # priced at ℓe = 300 / 1000 = 0.3 (over the capacity it would be 0.6): 1.8 + 5 / 0.7
    assert got.worker == "http://w" and got.edge_load == pytest.approx(0.3)
    assert got.plan["predicted"]["latency_ms"] == pytest.approx(1.8 + 5.0 / 0.7)
    got = plan_for_device([slow], req, 40.0)  # 300 + 5 x 40 = 500 > 450: Device-Only
    assert got.worker is None


def test_latency_plans_past_the_enumeration_cap_are_the_brute_force_optimum() -> None:
    """On plan maps capped at one candidate per exit (DAPDEE_PLANMAP_CAP: the enumeration is cut
    short), a latency-mode plan is still the brute-force optimum over every (worker, partition)
    pair, as `PlanMap.plan` makes it by the min-cut, and says `approximate: false`; unless the
    min-cut partition does not fit some worker's admission, where the plan must say
    `approximate: true`. (Before, the capped candidate set alone was scanned and every latency
    plan on a capped map said approximate.)"""
    rng = random.Random(25)
    exact = 0
    for case in range(200):
        g, workers, fps = _random_fleet_case(rng)
        req = replace(oracle.random_request(rng, mode="latency"), frame_rate=None)
        slots = [
            EdgeSlot(f"http://w{k}", PlanMap.build(CostGraph.from_dict(wg), cap=1), cap, res, nominal_ms_per_s=nom)
            for k, (wg, cap, res, nom) in enumerate(workers)
        ]
        got = plan_for_device(slots, _plan_request(req), fps, RHO_MAX)
        want = oracle.decide(g, req, brute_force(workers, req, fps))
        if got.plan["approximate"] or want.fragile:
            continue
        assert (got.plan["exit"]["name"], got.plan["constraints_met"]) == (want.exit, want.met), case
        assert oracle.close(got.plan["predicted"]["latency_ms"], want.value), (case, want.value)
        exact += 1
    assert exact >= 150, exact


def test_a_plan_is_approximate_when_another_workers_capped_pick_is() -> None:
    """Capped maps, two workers: on a (idle, small) the exit's unconstrained min-cut does not
    fit admission, so a's pick is the capped set's best, approximate; b's (large, 63.5 % booked)
    is exact and beats a's pick. But a has an admissible partition outside its candidate set,
    device {n1}, that beats b's: the answer must not claim to be exact."""
    nodes = [
        ("n0", ["x"], 2.0723, 1.9863),
        ("n1", ["x"], 8.0378, 4.5906),
        ("n2", ["n0", "x", "n1"], 10.7382, 1.3906),
        ("n3", ["n1", "n0", "n2"], 16.135, 4.0042),
    ]
    g = {"model": "g", "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 11652},
         "nodes": [{"name": n, "op": "op", "inputs": i, "out_bytes": 0, "device_ms": d, "edge_ms": e}
                   for n, i, d, e in nodes],
         "exits": [{"name": "e0", "node": "n2", "accuracy": 0.9}],
         "overheads": {"device_request_ms": 1.889, "edge_request_ms": 0.0}}  # fmt: skip
    workers: list[Worker] = [(g, 40.0, 0.0, 40.0), (g, 1e6, 635004.47, 1e6)]
    req = oracle.Req(oracle.Cond(306.31391, 0.0, 0.5), mode="latency")
    slots = [
        EdgeSlot(f"http://w{k}", PlanMap.build(CostGraph.from_dict(wg), cap=1), cap, res, nominal_ms_per_s=nom)
        for k, (wg, cap, res, nom) in enumerate(workers)
    ]
    got = plan_for_device(slots, _plan_request(req), 10.0, RHO_MAX).plan
    want = oracle.decide(g, req, brute_force(workers, req, 10.0))
    assert want.value < got["predicted"]["latency_ms"] - 1.0  # the capped scan misses a's {n1}
    assert got["approximate"] is True


def test_a_throughput_plan_is_approximate_when_another_workers_capped_pick_is() -> None:
    """The throughput twin: w0's map is capped (its pick approximate), w1's exact; w1's pick wins
    alone in the tie band, though a partition of w0 outside its candidate set beats it (the
    brute force over (worker, partition) pairs): the answer must not claim to be exact."""
    nodes = [
        ("n0", ["x"], 1039, 5.692357, 3.21066),
        ("n1", ["x"], 0, 2.825246, 1.504307),
        ("n2", ["n1", "n0", "x"], 0, 3.908062, 2.483562),
        ("n3", ["n0", "n1", "n2"], 40203, 6.07281, 0.411408),
    ]
    g = {"model": "rand", "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 58800},
         "nodes": [{"name": n, "op": "op", "inputs": i, "out_bytes": b, "device_ms": d, "edge_ms": e}
                   for n, i, b, d, e in nodes],
         "exits": [{"name": "e0", "node": "n1", "accuracy": 0.5733}, {"name": "e1", "node": "n2", "accuracy": 0.687},
                   {"name": "e2", "node": "n3", "accuracy": 0.7392}],
         "overheads": {"device_request_ms": 0.2549, "edge_request_ms": 0.0}}  # fmt: skip
    workers: list[Worker] = [(g, 1e6, 344434.8460938408, 1e6), (g, 1e6, 393524.4690622081, 1e6)]
    req = oracle.Req(oracle.Cond(61.913069, 5.676668, 0.468199), mode="throughput")
    slots = [
        EdgeSlot(f"http://w{k}", PlanMap.build(CostGraph.from_dict(wg), cap=c), cap, res, nominal_ms_per_s=nom)
        for k, ((wg, cap, res, nom), c) in enumerate(zip(workers, [1, 10**6], strict=True))
    ]
    got = plan_for_device(slots, _plan_request(req), 1.0, RHO_MAX).plan
    want = oracle.decide(g, req, brute_force(workers, req, 1.0))
    assert not want.fragile and want.choice.bottleneck_ms < got["predicted"]["bottleneck_ms"] - 0.5
    assert got["approximate"] is True


def test_a_throughput_tie_is_judged_over_all_workers_at_once() -> None:
    """Bottlenecks within a relative 1e-9 of the lowest are tied and the lower latency wins, over
    every (worker, partition) pair at once (as within one plan map): worker a's best is 9.9999999999
    ms a frame in 14.9999999999 ms, worker b's 10.0 in 11.0, so b's is the plan. (Compared exactly
    across workers, a's won.) The numbers: 5 input bytes at 1 ms a byte; a runs node b in just under
    10 ms, b runs node a's 100 ms on the edge or 10 on the device."""

    def graph(edge_a: float, edge_b: float) -> CostGraph:
        nodes = [
            {"name": "a", "inputs": ["x"], "out_bytes": 0, "device_ms": 10.0, "edge_ms": edge_a},
            {"name": "b", "inputs": ["a"], "out_bytes": 1, "device_ms": 100.0, "edge_ms": edge_b},
        ]
        g = {"model": "m", "input": {"name": "x", "shape": [1], "bytes": 5}, "nodes": nodes}
        return CostGraph.from_dict({**g, "exits": [{"name": "final", "node": "b", "accuracy": 0.9}]})

    a = EdgeSlot("http://a", PlanMap.build(graph(0.0, 10.0 * (1 - 1e-11))), 1e9, 0.0, 0.0, 1e9)
    b = EdgeSlot("http://b", PlanMap.build(graph(100.0, 1.0)), 1e9, 0.0, 0.0, 1e9)
    req = PlanRequest(bandwidth_mbps=0.008, rtt_ms=0.0, mode="throughput")
    alone = plan_for_device([a], req, None).plan["predicted"]
    assert alone["bottleneck_ms"] < 10.0 and alone["latency_ms"] > 14.9
    both = plan_for_device([a, b], req, None).plan
    assert (both["edge_worker"], both["device_nodes"]) == ("http://b", ["a"])
    assert (both["predicted"]["bottleneck_ms"], both["predicted"]["latency_ms"]) == (10.0, 11.0)
