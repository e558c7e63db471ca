"""The cost model and the planner against numbers worked out by hand, and against the independent
oracle of tests/oracle.py on seeded random DAGs (in process and through `dapdee plan`).

Every expected number below is computed in the comment beside it from DESIGN.md's formulas:
device_ms = Σ_D device_ms / (1 − ℓd), edge_ms = Σ_E edge_ms / (1 − ℓe),
uplink_ms = sent_bytes · 8 / (B · 1000), transfer_ms = uplink_ms + rtt (0 when E is empty),
latency = device + transfer + edge, bottleneck = max(device, uplink, edge), fps = 1000 / bottleneck.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions, partition
from dapdee.planning import PlanMap, PlanRequest, make_plan
from tests import oracle
from tests.oracle import Cond, Req

REPO = Path(__file__).resolve().parent.parent


def node(name: str, inputs: list[str], out: int, dev: float, edge: float) -> dict[str, Any]:
    return {"name": name, "op": "op", "inputs": inputs, "out_bytes": out, "device_ms": dev, "edge_ms": edge}


def graph(nodes: list[dict], input_bytes: int, exits: list[tuple[str, str, float | None]] | None = None) -> dict:
    exits = exits or [("final", nodes[-1]["name"], 0.9)]
    return {
        "model": "hand",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": input_bytes},
        "nodes": nodes,
        "exits": [{"name": n, "node": v, "accuracy": a} for n, v, a in exits],
    }


@dataclass(frozen=True)
class Case:
    """One partition of one tiny graph with its numbers worked out by hand."""

    name: str
    g: dict
    exit: str
    device: tuple[str, ...]
    cond: Cond
    transfer: dict[str, int]
    want: dict[str, float] = field(hash=False)  # device, edge, uplink, transfer, latency, bottleneck, fps


def W(device: float, edge: float, uplink: float, transfer: float, latency: float, bottleneck: float) -> dict:
    return {
        "device_ms": device,
        "edge_ms": edge,
        "uplink_ms": uplink,
        "transfer_ms": transfer,
        "latency_ms": latency,
        "bottleneck_ms": bottleneck,
        "throughput_fps": 1000.0 / bottleneck,
    }


# G1, a chain x(1000 B) -> a -> b; B = 1 Mbit/s, rtt 5 ms, ℓd = 0.5 (factor 2), ℓe = 0.75 (factor 4)
G1 = graph([node("a", ["x"], 500, 4.0, 1.0), node("b", ["a"], 40, 6.0, 2.0)], 1000)
C1 = Cond(bandwidth_mbps=1.0, rtt_ms=5.0, device_load=0.5, edge_load=0.75)
# G2: the input feeds a (device) and b (edge): it is sent although a consumer runs on the device
G2 = graph([node("a", ["x"], 300, 1.0, 0.5), node("b", ["x", "a"], 64, 3.0, 1.0)], 2000)
C2 = Cond(bandwidth_mbps=2.0, rtt_ms=1.0)
# G3: p feeds q and r; with both on the edge p's output is sent once
G3 = graph(
    [
        node("p", ["x"], 1000, 2.0, 0.2),
        node("q", ["p"], 700, 5.0, 0.5),
        node("r", ["p"], 300, 5.0, 0.5),
        node("j", ["q", "r"], 10, 1.0, 0.1),
    ],
    4000,
)
C3 = Cond(bandwidth_mbps=8.0, rtt_ms=0.0, device_load=0.2, edge_load=0.5)
# G4: x -> a -> b -> c, exit "early" at a: only A(early) = {a} is priced
G4 = graph(
    [node("a", ["x"], 50, 1.0, 0.5), node("b", ["a"], 30, 2.0, 1.0), node("c", ["b"], 10, 4.0, 2.0)],
    100,
    [("early", "a", 0.7), ("final", "c", 0.9)],
)
C4 = Cond(bandwidth_mbps=0.1, rtt_ms=2.0)
# G5: a sends 0 bytes, but an edge that is used still costs the round trip
G5 = graph([node("a", ["x"], 0, 1.0, 1.0), node("b", ["a"], 8, 1.0, 1.0)], 100)
C5 = Cond(bandwidth_mbps=3.0, rtt_ms=7.0)
# G6: b consumes a twice (a + a in the traced model): a is one transfer
G6 = graph([node("a", ["x"], 250, 1.0, 0.5), node("b", ["a", "a"], 4, 1.0, 0.5)], 100)
C6 = Cond(bandwidth_mbps=2.0, rtt_ms=0.5)
# G7: two cheap reductions of a big input, two heavy branch bodies, a join (an Inception block)
G7 = graph(
    [
        node("r1", ["x"], 16384, 0.2, 0.1),
        node("h1", ["r1"], 65536, 40.0, 1.0),
        node("r2", ["x"], 16384, 0.2, 0.1),
        node("h2", ["r2"], 65536, 40.0, 1.0),
        node("j", ["h1", "h2"], 131072, 5.0, 0.2),
    ],
    262144,
)
C7 = Cond(bandwidth_mbps=10.0, rtt_ms=2.0)
# G8: one node, loads on both sides
G8 = graph([node("a", ["x"], 10, 3.0, 1.0)], 5000)
C8 = Cond(bandwidth_mbps=4.0, rtt_ms=3.0, device_load=0.25, edge_load=0.2)
# G9: an exit head h hangs off a; for the final exit, h is outside A(final) and does not count as
# a consumer of a
G9 = graph(
    [
        node("a", ["x"], 400, 2.0, 0.5),
        node("h", ["a"], 40, 0.5, 0.1),
        node("b", ["a"], 200, 6.0, 1.0),
        node("f", ["b"], 40, 1.0, 0.2),
    ],
    1000,
    [("exit1", "h", 0.8), ("final", "f", 0.9)],
)
C9 = Cond(bandwidth_mbps=1.6, rtt_ms=0.0)
# G10: loads of 0.9 on both sides multiply by 10
G10 = graph([node("a", ["x"], 10, 1.5, 0.3)], 10)
C10 = Cond(bandwidth_mbps=0.08, rtt_ms=0.0, device_load=0.9, edge_load=0.9)
# G11: the input fans out to a, b, c, joined by d
G11 = graph(
    [
        node("a", ["x"], 100, 1.0, 0.25),
        node("b", ["x"], 100, 1.0, 0.25),
        node("c", ["x"], 100, 1.0, 0.25),
        node("d", ["a", "b", "c"], 8, 2.0, 0.5),
    ],
    600,
)
C11 = Cond(bandwidth_mbps=0.8, rtt_ms=1.5, device_load=0.5, edge_load=0.5)
# G12: the edge is the pipeline's slowest stage
G12 = graph([node("a", ["x"], 100, 1.0, 9.0)], 100)
C12 = Cond(bandwidth_mbps=100.0, rtt_ms=0.5)

CASES = [
    # G1 D={}: device 0; edge (1+2)·4 = 12; sent x 1000 -> 1000·8/1000 = 8; transfer 8+5 = 13;
    # latency 0+13+12 = 25; bottleneck max(0, 8, 12) = 12
    Case("chain edge-only", G1, "final", (), C1, {"x": 1000}, W(0.0, 12.0, 8.0, 13.0, 25.0, 12.0)),
    # G1 D={a}: device 4·2 = 8; edge 2·4 = 8; sent a 500 -> 4; transfer 9; latency 25; bottleneck 8
    Case("chain split", G1, "final", ("a",), C1, {"a": 500}, W(8.0, 8.0, 4.0, 9.0, 25.0, 8.0)),
    # G1 D={a,b}: device (4+6)·2 = 20; E empty: nothing sent, no rtt; latency 20; bottleneck 20
    Case("chain device-only", G1, "final", ("a", "b"), C1, {}, W(20.0, 0.0, 0.0, 0.0, 20.0, 20.0)),
    # G2 D={a}: x (b on the edge) 2000 + a 300 = 2300 -> 2300·8/2000 = 9.2; transfer 10.2;
    # latency 1 + 10.2 + 1 = 12.2; bottleneck 9.2
    Case("input on both sides", G2, "final", ("a",), C2, {"x": 2000, "a": 300}, W(1.0, 1.0, 9.2, 10.2, 12.2, 9.2)),
    # G2 D={}: x once although a and b both read it: 2000 -> 8; transfer 9; edge 1.5; latency 10.5
    Case("input read twice on the edge", G2, "final", (), C2, {"x": 2000}, W(0.0, 1.5, 8.0, 9.0, 10.5, 8.0)),
    # G3 D={p}: p once (q and r on the edge) 1000 -> 1000·8/8000 = 1; device 2/0.8 = 2.5;
    # edge (0.5+0.5+0.1)/0.5 = 2.2; latency 2.5+1+2.2 = 5.7; bottleneck 2.5
    Case("multi-consumer producer", G3, "final", ("p",), C3, {"p": 1000}, W(2.5, 2.2, 1.0, 1.0, 5.7, 2.5)),
    # G3 D={p,q}: p (r on the edge) 1000 + q (j on the edge) 700 = 1700 -> 1.7; device 7/0.8 = 8.75;
    # edge (0.5+0.1)/0.5 = 1.2; latency 8.75+1.7+1.2 = 11.65; bottleneck 8.75
    Case("two producers sent", G3, "final", ("p", "q"), C3, {"p": 1000, "q": 700}, W(8.75, 1.2, 1.7, 1.7, 11.65, 8.75)),
    # G4 exit early, D={}: E={a}; x 100 -> 100·8/100 = 8; transfer 10; edge 0.5; latency 10.5
    Case("shallow exit prices A(e) only", G4, "early", (), C4, {"x": 100}, W(0.0, 0.5, 8.0, 10.0, 10.5, 8.0)),
    # G4 exit early, D={a}: device-only for that exit: 1 ms, nothing else
    Case("shallow exit device-only", G4, "early", ("a",), C4, {}, W(1.0, 0.0, 0.0, 0.0, 1.0, 1.0)),
    # G5 D={a}: 0 bytes sent, uplink 0, but E={b} is used: transfer = rtt 7; latency 1+7+1 = 9
    Case("zero bytes still pay rtt", G5, "final", ("a",), C5, {"a": 0}, W(1.0, 1.0, 0.0, 7.0, 9.0, 1.0)),
    # G6 D={a}: a once -> 250·8/2000 = 1; transfer 1.5; latency 1+1.5+0.5 = 3
    Case("producer read twice by one node", G6, "final", ("a",), C6, {"a": 250}, W(1.0, 0.5, 1.0, 1.5, 3.0, 1.0)),
    # G7 D={r1,r2}: 2·16384 = 32768 -> 32768·8/10000 = 26.2144; transfer 28.2144; device 0.4;
    # edge 1+1+0.2 = 2.2; latency 30.8144; bottleneck 26.2144
    Case(
        "DAG cut",
        G7,
        "final",
        ("r1", "r2"),
        C7,
        {"r1": 16384, "r2": 16384},
        W(0.4, 2.2, 26.2144, 28.2144, 30.8144, 26.2144),
    ),
    # G7 D={r1}: r1 16384 + x 262144 (r2 reads it on the edge) = 278528 -> 222.8224; transfer 224.8224;
    # edge 1+0.1+1+0.2 = 2.3; latency 0.2+224.8224+2.3 = 227.3224
    Case(
        "half a DAG cut sends the input",
        G7,
        "final",
        ("r1",),
        C7,
        {"x": 262144, "r1": 16384},
        W(0.2, 2.3, 222.8224, 224.8224, 227.3224, 222.8224),
    ),
    # G8 D={}: edge 1/0.8 = 1.25; x 5000 -> 5000·8/4000 = 10; transfer 13; latency 14.25; bottleneck 10
    Case("loads on both sides", G8, "final", (), C8, {"x": 5000}, W(0.0, 1.25, 10.0, 13.0, 14.25, 10.0)),
    # G8 D={a}: device 3/0.75 = 4
    Case("device load factor", G8, "final", ("a",), C8, {}, W(4.0, 0.0, 0.0, 0.0, 4.0, 4.0)),
    # G9 final, D={a}: a's consumers in A(final): b (edge) -> 400·8/1600 = 2; edge 1+0.2 = 1.2;
    # latency 2+2+1.2 = 5.2; bottleneck 2
    Case("side head not a consumer", G9, "final", ("a",), C9, {"a": 400}, W(2.0, 1.2, 2.0, 2.0, 5.2, 2.0)),
    # G9 final, D={a,b}: a is not sent (h is not in A(final)); b 200 -> 1; device 8; edge 0.2;
    # latency 8+1+0.2 = 9.2; bottleneck 8
    Case("consumer outside A(e) ignored", G9, "final", ("a", "b"), C9, {"b": 200}, W(8.0, 0.2, 1.0, 1.0, 9.2, 8.0)),
    # G9 exit1, D={a}: E={h}: a 400 -> 2; edge 0.1; latency 2+2+0.1 = 4.1
    Case("side head's own exit", G9, "exit1", ("a",), C9, {"a": 400}, W(2.0, 0.1, 2.0, 2.0, 4.1, 2.0)),
    # G10 D={}: edge 0.3·10 = 3; x 10 -> 10·8/80 = 1; latency 0+1+3 = 4; bottleneck 3
    Case("load 0.9 edge", G10, "final", (), C10, {"x": 10}, W(0.0, 3.0, 1.0, 1.0, 4.0, 3.0)),
    # G10 D={a}: device 1.5·10 = 15
    Case("load 0.9 device", G10, "final", ("a",), C10, {}, W(15.0, 0.0, 0.0, 0.0, 15.0, 15.0)),
    # G11 D={a,b}: x (c on the edge) 600 + a 100 + b 100 = 800 -> 800·8/800 = 8; transfer 9.5;
    # device 2·2 = 4; edge (0.25+0.5)·2 = 1.5; latency 15; bottleneck 8
    Case(
        "fan-out cut",
        G11,
        "final",
        ("a", "b"),
        C11,
        {"x": 600, "a": 100, "b": 100},
        W(4.0, 1.5, 8.0, 9.5, 15.0, 8.0),
    ),
    # G11 D={}: x once for three readers: 600 -> 6; transfer 7.5; edge (0.75+0.5)·2 = 2.5; latency 10
    Case("fan-out edge-only", G11, "final", (), C11, {"x": 600}, W(0.0, 2.5, 6.0, 7.5, 10.0, 6.0)),
    # G12 D={}: x 100 -> 100·8/100000 = 0.008; transfer 0.508; edge 9; latency 9.508; bottleneck 9 (edge)
    Case("edge is the bottleneck", G12, "final", (), C12, {"x": 100}, W(0.0, 9.0, 0.008, 0.508, 9.508, 9.0)),
]


def _approx(got: dict[str, float], want: dict[str, float]) -> None:
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (k, got[k], v)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_oracle_matches_hand_numbers(case: Case) -> None:
    p = oracle.price(case.g, case.exit, set(case.device), case.cond)
    assert p.transfer == case.transfer and p.sent_bytes == sum(case.transfer.values())
    _approx({k: getattr(p, k) for k in case.want}, case.want)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cost_model_matches_hand_numbers(case: Case) -> None:
    """dapdee.costmodel itself: partition() for the transfer list, predict() for the numbers."""
    g = CostGraph.from_dict(case.g)
    part = partition(g, case.exit, case.device)
    assert dict(part.transfer) == case.transfer and len(part.transfer) == len(case.transfer)
    pred = part.predict(Conditions(**vars(case.cond)))
    _approx({k: getattr(pred, k) for k in case.want}, case.want)
    assert pred.sent_bytes == sum(case.transfer.values())


# ---- plans worked out by hand ----------------------------------------------------------------------

PLAN_CASES = [
    # G1, latency: D={} 25, {a} 25, {a,b} 20 -> device-only
    ("G1 latency", G1, C1, "latency", ("a", "b"), 20.0),
    # G1, throughput: bottlenecks 12, 8, 20 -> D={a}
    ("G1 throughput", G1, C1, "throughput", ("a",), 8.0),
    # G7, latency: a D holding h1 or h2 costs >= 40 ms on the device; a D missing r1 or r2 sends x
    # (>= 209.7 ms); so D = {r1, r2}, 30.8144 ms, a cut no prefix of the order r1,h1,r2,h2,j gives
    ("G7 latency", G7, C7, "latency", ("r1", "r2"), 30.8144),
    # G8, latency: D={} 14.25 vs D={a} 4
    ("G8 latency", G8, C8, "latency", ("a",), 4.0),
    # G11, throughput (B 0.8: bytes/100 ms; factors 2): D={} max(0, 600 -> 6, 2.5) = 6; {a} max(2, 7, 2) = 7;
    # {a,b} max(4, 8, 1.5) = 8; {a,b,c} max(6, 300 -> 3, 1) = 6; {a,b,c,d} 10 (and {b}, {c}, {a,c}, {b,c}
    # like {a}, {a,b}). Tie at 6: the lower latency wins, D={} 0+7.5+2.5 = 10 over {a,b,c} 6+4.5+1 = 11.5
    ("G11 throughput", G11, C11, "throughput", (), 6.0),
    # G12, latency: D={} 9.508 vs D={a} 1 -> device-only
    ("G12 latency", G12, C12, "latency", ("a",), 1.0),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_planner_picks_the_hand_optimum(case: tuple) -> None:
    _, g, cond, mode, device, value = case
    plan = make_plan(CostGraph.from_dict(g), PlanRequest(**vars(cond), mode=mode))
    assert plan["mode"] == mode and plan["constraints_met"] is True
    assert plan["device_nodes"] == list(device)
    key = "latency_ms" if mode == "latency" else "bottleneck_ms"
    assert plan["predicted"][key] == pytest.approx(value, rel=1e-12)
    assert oracle.decide(g, Req(cond, mode=mode)).choice.device_nodes == frozenset(device)


def test_requirements_met_with_equality() -> None:
    """Thresholds are inclusive (exact binary floats, no rounding): G1's device-only plan has latency
    exactly 20 = (4 + 6) · 2, its D={a} plan a bottleneck of exactly 8 = max(4·2, 500·0.008, 2·4)."""
    g = CostGraph.from_dict(G1)
    lat = make_plan(g, PlanRequest(**vars(C1), mode="latency", latency_budget_ms=20.0))
    assert lat["constraints_met"] is True and lat["device_nodes"] == ["a", "b"]
    thr = make_plan(g, PlanRequest(**vars(C1), mode="throughput", frame_rate=125.0))  # 1000/125 = 8
    assert thr["constraints_met"] is True and thr["predicted"]["bottleneck_ms"] == 8.0
    # auto: the latency plan (device-only, bottleneck 20) sustains exactly 1000/20 = 50 fps
    auto = make_plan(g, PlanRequest(**vars(C1), mode="auto", frame_rate=50.0))
    assert auto["mode"] == "latency" and auto["device_nodes"] == ["a", "b"]
    # a hair more and it does not: throughput mode, D={a}
    auto = make_plan(g, PlanRequest(**vars(C1), mode="auto", frame_rate=50.001))
    assert auto["mode"] == "throughput" and auto["device_nodes"] == ["a"]


def test_inverse_search_takes_the_deepest_exit_that_meets() -> None:
    """G4 at C4 (B 0.1: 0.08 ms per byte; rtt 2). Final: D={} 0+(8+2)+3.5 = 13.5, {a} 1+(4+2)+3 = 10,
    {a,b} 3+(2.4+2)+2 = 9.4, {a,b,c} 7 -> 7 ms. Early: D={} 0+(8+2)+0.5 = 10.5, {a} 1 -> 1 ms.
    Budget 3: final misses, early meets. Budget 8: final meets (deepest first)."""
    g = CostGraph.from_dict(G4)
    plan = make_plan(g, PlanRequest(**vars(C4), mode="latency", latency_budget_ms=3.0))
    assert plan["exit"]["name"] == "early" and plan["constraints_met"] is True
    assert plan["predicted"]["latency_ms"] == pytest.approx(1.0)
    plan = make_plan(g, PlanRequest(**vars(C4), mode="latency", latency_budget_ms=8.0))
    assert plan["exit"]["name"] == "final" and plan["predicted"]["latency_ms"] == pytest.approx(7.0)
    # no budget: the deepest exit; min_accuracy above every exit: nothing meets, fastest overall
    assert make_plan(g, PlanRequest(**vars(C4), mode="latency"))["exit"]["name"] == "final"
    plan = make_plan(g, PlanRequest(**vars(C4), mode="latency", min_accuracy=0.95))
    assert plan["constraints_met"] is False and plan["exit"]["name"] == "early"


# ---- the planner against the oracle on random DAGs ------------------------------------------------------

N_GRAPHS = 60
REQS_PER_GRAPH = 4


def _plan_request(r: Req) -> PlanRequest:
    return PlanRequest(
        **vars(r.cond),
        latency_budget_ms=r.latency_budget_ms,
        min_accuracy=r.min_accuracy,
        frame_rate=r.frame_rate,
        mode=r.mode,
    )


def _cases(seed: int, n_graphs: int, per_graph: int) -> list[tuple[dict, list[tuple[Req, oracle.Decision]]]]:
    """Seeded random graphs with requests whose answer is not decided by floating-point rounding."""
    rng = random.Random(seed)
    out = []
    for i in range(n_graphs):
        g = oracle.random_graph(rng, name=f"oracle-{i}")
        reqs: list[tuple[Req, oracle.Decision]] = []
        while len(reqs) < per_graph:
            r = oracle.random_request(rng)
            want = oracle.decide(g, r)
            if not want.fragile:
                reqs.append((r, want))
        out.append((g, reqs))
    return out


def test_planner_agrees_with_oracle_on_random_dags(record_property: Any) -> None:
    modes: dict[str, int] = {}
    met = 0
    for g, reqs in _cases(20250, N_GRAPHS, REQS_PER_GRAPH):
        pm = PlanMap.build(CostGraph.from_dict(g))
        for r, want in reqs:
            plan = pm.plan(_plan_request(r))
            oracle.check_plan(g, plan, r, want)
            assert plan["approximate"] is False
            modes[plan["mode"]] = modes.get(plan["mode"], 0) + 1
            met += want.met
    record_property("oracle_plans_by_mode", json.dumps(modes))
    total = N_GRAPHS * REQS_PER_GRAPH
    # both modes and both outcomes occur, so neither walk nor its fallback goes unchecked
    assert sum(modes.values()) == total and min(modes.get("latency", 0), modes.get("throughput", 0)) >= total // 10
    assert total // 10 <= met <= total - total // 10


def test_cli_plan_agrees_with_oracle(tmp_path: Path) -> None:
    """`dapdee plan` as a user runs it (its own process, the JSON file, the printed plan)."""
    checked = 0
    for i, (g, reqs) in enumerate(_cases(7, 6, 2)):
        path = tmp_path / f"g{i}.json"
        path.write_text(json.dumps(g))
        for r, want in reqs:
            p = subprocess.run(
                [sys.executable, "-m", "dapdee.cli", "plan", "--profile", str(path), *r.cli_args()],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            )
            assert p.returncode == 0, p.stderr
            oracle.check_plan(g, json.loads(p.stdout), r, want)
            checked += 1
    assert checked == 12


# ---- cost model v2: per-request overheads ------------------------------------------------------------

# V: x(1000 B) -> a -> b; overheads: 1.5 ms per request on the device, 4 ms on the edge (only when
# E is not empty). B = 8 Mbit/s: x costs 1000·8/8000 = 1 ms, a 100·8/8000 = 0.1 ms; rtt 1.
V = graph([node("a", ["x"], 100, 2.0, 0.5), node("b", ["a"], 10, 4.0, 0.5)], 1000)
V["overheads"] = {"device_request_ms": 1.5, "edge_request_ms": 4.0}
CV0 = Cond(bandwidth_mbps=8.0, rtt_ms=1.0)
CV1 = Cond(bandwidth_mbps=8.0, rtt_ms=1.0, device_load=0.5, edge_load=0.5)

V2_CASES = [
    # loads 0. D={}: device 0+1.5 = 1.5; edge 0.5+0.5+4 = 5; transfer 1+1 = 2; latency 8.5; bottleneck 5
    Case("v2 edge-only", V, "final", (), CV0, {"x": 1000}, W(1.5, 5.0, 1.0, 2.0, 8.5, 5.0)),
    # D={a}: device 2+1.5 = 3.5; edge 0.5+4 = 4.5; transfer 0.1+1 = 1.1; latency 9.1; bottleneck 4.5
    Case("v2 split", V, "final", ("a",), CV0, {"a": 100}, W(3.5, 4.5, 0.1, 1.1, 9.1, 4.5)),
    # D={a,b}: no edge, no overhead: device 6; latency 6; bottleneck 6
    Case("v2 device-only", V, "final", ("a", "b"), CV0, {}, W(6.0, 0.0, 0.0, 0.0, 6.0, 6.0)),
    # loads 0.5 (factor 2) apply to the overheads too. D={}: device 1.5·2 = 3; edge 5·2 = 10;
    # latency 3+2+10 = 15; bottleneck 10
    Case("v2 edge-only loaded", V, "final", (), CV1, {"x": 1000}, W(3.0, 10.0, 1.0, 2.0, 15.0, 10.0)),
    # D={a}: device 3.5·2 = 7; edge 4.5·2 = 9; latency 7+1.1+9 = 17.1; bottleneck 9
    Case("v2 split loaded", V, "final", ("a",), CV1, {"a": 100}, W(7.0, 9.0, 0.1, 1.1, 17.1, 9.0)),
    # D={a,b}: 6·2 = 12
    Case("v2 device-only loaded", V, "final", ("a", "b"), CV1, {}, W(12.0, 0.0, 0.0, 0.0, 12.0, 12.0)),
]
V2_PLANS = [
    # v1 would pick edge-only (latency 0+2+1 = 3) and edge-only (bottleneck max(0, 1, 1) = 1);
    # v2 latency: 8.5, 9.1, 6 -> device-only; throughput: 5, 4.5, 6 -> D={a}
    (CV0, "latency", ("a", "b"), 6.0),
    (CV0, "throughput", ("a",), 4.5),
    # loaded: latency 15, 17.1, 12 -> device-only; throughput 10, 9, 12 -> D={a}
    (CV1, "latency", ("a", "b"), 12.0),
    (CV1, "throughput", ("a",), 9.0),
]


@pytest.mark.parametrize("case", V2_CASES, ids=[c.name for c in V2_CASES])
def test_oracle_v2_matches_hand_numbers(case: Case) -> None:
    p = oracle.price(case.g, case.exit, set(case.device), case.cond)
    assert p.transfer == case.transfer
    _approx({k: getattr(p, k) for k in case.want}, case.want)


def test_planner_v2_hand_plans() -> None:
    g = CostGraph.from_dict(V)
    assert g.to_dict()["overheads"] == V["overheads"]
    zero = {**V, "overheads": {"device_request_ms": 0.0, "edge_request_ms": 0.0}}
    # the overheads are part of what the planner reads: the content hash sees them
    assert g.content_hash() != CostGraph.from_dict(zero).content_hash()
    for cond, mode, device, value in V2_PLANS:
        plan = make_plan(g, PlanRequest(**vars(cond), mode=mode))
        assert plan["device_nodes"] == list(device), (cond, mode)
        key = "latency_ms" if mode == "latency" else "bottleneck_ms"
        assert plan["predicted"][key] == pytest.approx(value, rel=1e-12)
        oracle.check_plan(V, plan, Req(cond, mode=mode))
    # both overheads zero: exactly v1 (edge-only for both modes at CV0)
    for mode in ("latency", "throughput"):
        plan = make_plan(CostGraph.from_dict(zero), PlanRequest(**vars(CV0), mode=mode))
        assert plan["device_nodes"] == []


def test_planner_v2_agrees_with_oracle_on_random_dags() -> None:
    rng = random.Random(99)
    for g, reqs in _cases(31, 25, 3):
        g["overheads"] = {
            "device_request_ms": round(rng.uniform(0, 3), 4),
            "edge_request_ms": round(rng.uniform(0, 6), 4),
        }
        pm = PlanMap.build(CostGraph.from_dict(g))
        for r, _ in reqs:
            want = oracle.decide(g, r)
            if not want.fragile:
                oracle.check_plan(g, pm.plan(_plan_request(r)), r, want)
