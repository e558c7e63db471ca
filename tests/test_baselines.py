"""Baselines (device-only, edge-only, Neurosurgeon, DADS, Edgent) against DAPDEE on the zoo models,
all priced by the same cost model."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

import pytest

from dapdee.costgraph import CostGraph
from dapdee.models import load_model
from dapdee.planning import BASELINES, PlanMap, PlanRequest, baseline_plan
from tests import oracle

MODELS = ("alexnet", "vgg16", "resnet18", "inception")


def synthetic_timings(graph: CostGraph, k1: float = 2e-7, c: float = 0.02, k: float = 10.0) -> CostGraph:
    """device_ms = flops·k1 + c, edge_ms = device_ms / k, exit accuracies rising with depth."""
    dev = {n.name: n.flops * k1 + c for n in graph.nodes}
    graph = graph.with_timings("device", dev).with_timings("edge", {n: v / k for n, v in dev.items()})
    return graph.with_accuracies({e.name: round(0.6 + 0.1 * i, 3) for i, e in enumerate(graph.exits)})


@pytest.fixture(scope="module")
def zoo() -> dict[str, tuple[CostGraph, PlanMap]]:
    out = {}
    for name in MODELS:
        g = synthetic_timings(load_model(f"zoo:{name}?width=0.25").graph)
        out[name] = (g, PlanMap.build(g))
    return out


def _key(mode: str) -> str:
    return "latency_ms" if mode == "latency" else "bottleneck_ms"


GRID = [
    PlanRequest(bandwidth_mbps=bw, rtt_ms=rtt, device_load=dl, edge_load=el, mode=mode)
    for mode, bw, (rtt, dl, el) in itertools.product(
        ("latency", "throughput"),
        (0.13, 1.1, 5.85, 18.88, 100.0),
        ((0.0, 0.0, 0.0), (10.0, 0.5, 0.3), (2.0, 0.1, 0.9)),
    )
]


@pytest.mark.parametrize("model", MODELS)
def test_dapdee_never_worse_than_any_baseline(zoo, model: str) -> None:
    g, pm = zoo[model]
    gd = g.to_dict()
    final = g.exits[-1].name
    for i, req in enumerate(GRID):
        cond = oracle.Cond(req.bandwidth_mbps, req.rtt_ms, req.device_load, req.edge_load)
        ours = pm.plan(req)
        assert ours["exit"]["name"] == final and ours["constraints_met"] and ours["mode"] == req.mode
        for name in BASELINES:
            if name == "dads" and req.mode == "throughput" and i % 5:
                continue  # the α/γ grid is |grid|² max-flows per request: sample it
            theirs = baseline_plan(g, req, name)
            assert theirs["planner"] == name and theirs["exit"]["name"] == final
            key = _key(req.mode)
            assert ours["predicted"][key] <= theirs["predicted"][key] * (1 + 1e-9), (name, req)
            # the baseline's node lists, transfer and numbers are the cost model's (the oracle's)
            oracle.check_consistent(gd, theirs, cond)
            if name == "dads" and req.mode == "latency":  # min-cut is exact for latency
                assert theirs["predicted"]["latency_ms"] == pytest.approx(ours["predicted"]["latency_ms"], rel=1e-9)


@pytest.mark.parametrize("model", MODELS)
def test_constraints_deepest_exit_at_least_edgents(zoo, model: str, record_property: Any) -> None:
    """Whenever Edgent meets the requirements, DAPDEE (same mode) meets them too, at an exit at least
    as deep, and at the same exit at least as well. Edgent's unmet cases and auto requests where the
    two end in different modes compare nothing; the compared ones are counted and must be many."""
    g, pm = zoo[model]
    names = [e.name for e in g.exits]
    reqs = [
        PlanRequest(bandwidth_mbps=bw, rtt_ms=5.0, device_load=dl, mode=mode, latency_budget_ms=lb, frame_rate=fr)
        for mode, bw, dl, lb, fr in itertools.product(
            ("latency", "throughput", "auto"), (0.5, 5.85, 50.0), (0.0, 0.7), (3.0, 8.0, 20.0, 60.0), (30.0, 200.0)
        )
    ]
    compared = {"latency": 0, "throughput": 0, "auto": 0}
    deeper = 0
    for req in reqs:
        ours, theirs = pm.plan(req), baseline_plan(g, req, "edgent")
        assert theirs["planner"] == "edgent"
        if ours["mode"] != theirs["mode"] or not theirs["constraints_met"]:
            continue
        compared[req.mode] += 1
        assert ours["constraints_met"], req
        oi, ti = names.index(ours["exit"]["name"]), names.index(theirs["exit"]["name"])
        assert oi >= ti, req
        deeper += oi > ti
        if oi == ti:
            key = _key(ours["mode"])
            assert ours["predicted"][key] <= theirs["predicted"][key] * (1 + 1e-9)
    record_property("edgent_compared", json.dumps({**compared, "deeper_exit": deeper}))
    print(model, "compared with Edgent:", compared, "DAPDEE deeper:", deeper)
    # 48 requests per mode; Edgent meets the requirements (in DAPDEE's mode) in 11-48 of them per
    # mode and model (measured), so the comparison cannot pass by comparing nothing
    assert min(compared.values()) >= 10, compared


# ---- derived cases: where every split of the topological order is provably worse ----------------

EPS_MS = 0.001
HEAVY_MS = 1000.0
# A cut that is downward closed but not a prefix of the traced topological order:
# inception: everything up to block b3's input plus the 1x1 reductions of its 3x3 and 5x5 branches
# (b3_b1_* comes between b3's input and b3_b2_0, and b3_b2_1..5 between b3_b2_0 and b3_b3_0);
# resnet18: everything up to layer1's output plus layer2's first conv and its shortcut conv
# (layer2_0_bn1 .. bn2 come between them).
DAG_CUTS = {
    "inception": ("cat", ("b3_b2_0", "b3_b3_0")),
    "resnet18": ("relu_3", ("layer2_0_conv1", "layer2_0_shortcut_0")),
}


def _rigged(g: CostGraph, cut: set[str]) -> CostGraph:
    """Timings that make `cut` the only good partition of the final exit: its nodes cost EPS on the
    device and HEAVY on the edge, every other node the reverse. Any other partition D puts a node of
    `cut` on the edge or a node outside it on the device, so its edge or device stage alone takes
    >= HEAVY (loads 0): latency and bottleneck >= HEAVY. `cut` itself costs EPS per node on either
    side plus its uplink transfer."""
    dev = {n.name: EPS_MS if n.name in cut else HEAVY_MS for n in g.nodes}
    edge = {n.name: HEAVY_MS if n.name in cut else EPS_MS for n in g.nodes}
    return g.with_timings("device", dev).with_timings("edge", edge)


@pytest.mark.parametrize("model", sorted(DAG_CUTS))
@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_dag_models_where_chain_splits_are_provably_worse(zoo, model: str, mode: str) -> None:
    base, _ = zoo[model]
    head, extra = DAG_CUTS[model]
    cut = set(base.ancestors(head)) | set(extra)
    need = base.ancestors(base.exits[-1].node)
    assert cut < set(need) and all(set(need[:k]) != cut for k in range(len(need) + 1))  # not a prefix
    g = _rigged(base, cut)
    sent = sum(
        n.out_bytes for n in g.nodes if n.name in cut and any(c in set(need) - cut for c in g.consumers()[n.name])
    )
    # the uplink of the cut's boundary takes 1 ms at B = sent·8/1000 Mbit/s
    req = PlanRequest(bandwidth_mbps=sent * 8 / 1000, rtt_ms=0.5, mode=mode)
    ours = PlanMap.build(g).plan(req)
    assert ours["device_nodes"] == [n for n in need if n in cut]
    # the cut: device |cut|·EPS, edge (|A(final)| − |cut|)·EPS, uplink 1 ms, rtt 0.5 ms
    want_latency = len(cut) * EPS_MS + 1.0 + 0.5 + (len(need) - len(cut)) * EPS_MS
    assert ours["predicted"]["latency_ms"] == pytest.approx(want_latency, rel=1e-9)
    assert ours["predicted"]["bottleneck_ms"] == pytest.approx(1.0, rel=1e-9)
    for name in ("neurosurgeon", "edgent"):
        theirs = baseline_plan(g, req, name)
        assert theirs["exit"]["name"] == ours["exit"]["name"]
        key = _key(mode)
        assert theirs["predicted"][key] >= HEAVY_MS, name
    dads = baseline_plan(g, req, "dads")
    if mode == "latency":  # min-cut sees DAG cuts
        assert dads["device_nodes"] == ours["device_nodes"]


def _reduce_fork() -> CostGraph:
    """Inception-like block: a big input, two cheap 1x1 reductions, two heavy branch bodies.
    Topological order r1, h1, r2, h2, j: no prefix isolates {r1, r2}."""

    def node(name: str, inputs: list[str], out: int, dev: float, edge: float) -> dict:
        return {
            "name": name,
            "op": "op",
            "inputs": inputs,
            "out_bytes": out,
            "device_ms": dev,
            "edge_ms": edge,
        }

    return CostGraph.from_dict(
        {
            "model": "reduce_fork",
            "input": {"name": "x", "shape": [1, 64, 32, 32], "bytes": 262144},
            "nodes": [
                node("r1", ["x"], 16384, 0.2, 0.1),
                node("h1", ["r1"], 65536, 40.0, 1.0),
                node("r2", ["x"], 16384, 0.2, 0.1),
                node("h2", ["r2"], 65536, 40.0, 1.0),
                node("j", ["h1", "h2"], 131072, 5.0, 0.2),
            ],
            "exits": [{"name": "final", "node": "j", "accuracy": 0.9}],
        }
    )


def test_neurosurgeon_and_edgent_strictly_worse_in_latency_on_a_dag() -> None:
    """B 10 Mbit/s (1 kB = 0.8 ms), rtt 2. DAPDEE: D={r1,r2}, 0.4 + (26.2144 + 2) + 2.2 = 30.8144 ms.
    Prefixes of r1,h1,r2,h2,j: {} 209.7152+2+2.4 = 214.1; {r1} sends x too: 0.2+224.8+2.3 = 227.3;
    {r1,h1} sends x + h1: 40.2+264.1+1.3 = 305.6; {r1,h1,r2} sends h1 + r2: 40.4+67.5+1.2 = 109.1;
    {r1,h1,r2,h2} sends h1 + h2: 80.4+106.9+0.2 = 187.5; device-only 85.4: best 85.4 > 2.7 x 30.8."""
    g = _reduce_fork()
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=2.0, mode="latency")
    ours = PlanMap.build(g).plan(req)
    assert ours["device_nodes"] == ["r1", "r2"]
    assert ours["predicted"]["latency_ms"] == pytest.approx(30.8144, rel=1e-9)
    assert [t["node"] for t in ours["transfer"]] == ["r1", "r2"]
    for name in ("neurosurgeon", "edgent"):
        theirs = baseline_plan(g, req, name)
        assert theirs["predicted"]["latency_ms"] == pytest.approx(85.4, rel=1e-9), name
    dads = baseline_plan(g, req, "dads")
    assert dads["device_nodes"] == ["r1", "r2"]  # min-cut sees DAG cuts


def test_baseline_shapes(zoo) -> None:
    g, _ = zoo["resnet18"]
    req = PlanRequest(bandwidth_mbps=5.85, rtt_ms=3.0, mode="latency")
    need = g.ancestors(g.exits[-1].node)
    dev = baseline_plan(g, req, "device-only")
    assert dev["device_nodes"] == need and dev["edge_nodes"] == [] and dev["transfer"] == []
    assert dev["predicted"]["transfer_ms"] == 0.0
    edge = baseline_plan(g, req, "edge-only")
    assert edge["device_nodes"] == [] and edge["edge_nodes"] == need
    assert edge["transfer"] == [{"node": g.input.name, "bytes": g.input.bytes}]
    ns = baseline_plan(g, req, "neurosurgeon")
    assert ns["device_nodes"] == need[: len(ns["device_nodes"])]
    for name in BASELINES:
        p = baseline_plan(g, req, name)
        assert p["plan_id"] == baseline_plan(g, req, name)["plan_id"]
        assert p["approximate"] is False and p["edge_worker"] is None
    with pytest.raises(ValueError, match="baseline"):
        baseline_plan(g, req, "spinn")


@pytest.mark.parametrize("model", ("resnet18", "inception"))
def test_capped_plan_maps_on_zoo(zoo, model: str) -> None:
    """cap=20 is below every exit's count of downward-closed sets, so every exit falls back. Every
    plan is checked against the oracle's cost model; latency plans (min-cut) must equal the exact
    map's; throughput plans must lie between each exit's exact optimum (a one-exit exact map) and
    its best prefix split, with frame rates placed between those bounds and an accuracy floor, so
    the exit choice is at stake."""
    g, pm = zoo[model]
    gd = g.to_dict()
    capped = PlanMap.build(g, cap=20)
    assert all(c is None for c in capped.ideal_counts().values())
    one_exit = {e.name: PlanMap.build(replace(g, exits=(e,))) for e in g.exits}
    bounded = 0
    for req in GRID[::5]:
        cond = oracle.Cond(req.bandwidth_mbps, req.rtt_ms, req.device_load, req.edge_load)
        tput = replace(req, mode="throughput")
        exact = {n: m.plan(tput)["predicted"]["bottleneck_ms"] for n, m in one_exit.items()}
        prefix = oracle.all_prices(gd, cond, "prefixes")
        upper = {n: oracle.best(ps, "throughput").bottleneck_ms for n, ps in prefix.items()}
        final = g.exits[-1].name
        limits = [exact[final] * 1.01, upper[final] * 1.01]
        if upper[final] > exact[final] * 1.02:  # a frame rate only the exact search can meet
            limits.append((exact[final] * upper[final]) ** 0.5)
        for budget in (None, 12.0):
            r = replace(req, mode="latency", latency_budget_ms=budget, min_accuracy=0.65)
            a, b = pm.plan(r), capped.plan(r)
            oracle.check_consistent(gd, b, cond)
            assert b["approximate"] is False and a["exit"] == b["exit"]
            assert b["predicted"]["latency_ms"] == pytest.approx(a["predicted"]["latency_ms"], rel=1e-9)
        for limit, min_acc in itertools.product([None, *limits], (None, 0.75)):
            r = replace(tput, frame_rate=None if limit is None else 1000.0 / limit, min_accuracy=min_acc)
            t = capped.plan(r)
            rq = oracle.Req(cond, None, r.min_accuracy, r.frame_rate, "throughput")
            bounded += oracle.check_capped_throughput(gd, t, rq, exact, upper)
    print(model, "capped throughput plans checked against the bounds:", bounded)
    # 6 conditions x 8 requirement sets; the fragile ones (a frame rate within rounding of a bound)
    # aside, measured 36 on each model. (On these synthetic timings the best prefix split is often
    # optimal; tests/test_planning.py checks the bounds where they differ.)
    assert bounded >= 30, bounded


def test_device_only_wins_an_exact_latency_tie_in_every_baseline() -> None:
    """Chain x -> a -> b: Device-Only 2 + 2 = 4 ms; Edge-Only sends the 1,000-byte input at 8 Mbit/s
    (1 ms, rtt 0) and computes 1.5 + 1.5 ms: 4 ms, an exact tie in binary floating point. DESIGN:
    in latency mode Device-Only wins an exact tie, in every planner (the single-split baselines
    scanned Edge-Only first and kept it)."""
    node = {"op": "conv", "flops": 1, "device_ms": 2.0, "edge_ms": 1.5}
    g = CostGraph.from_dict(
        {
            "model": "tie",
            "input": {"name": "x", "shape": [1], "dtype": "float32", "bytes": 1000},
            "nodes": [
                node | {"name": "a", "inputs": ["x"], "out_bytes": 100000},
                node | {"name": "b", "inputs": ["a"], "out_bytes": 10},
            ],
            "exits": [{"name": "final", "node": "b", "accuracy": 0.9}],
        }
    )
    req = PlanRequest(bandwidth_mbps=8.0, rtt_ms=0.0, mode="latency")
    plans = {name: baseline_plan(g, req, name) for name in BASELINES} | {"dapdee": PlanMap.build(g).plan(req)}
    for name, p in plans.items():
        assert p["predicted"]["latency_ms"] == 4.0, name
        if name != "edge-only":
            assert p["device_nodes"] == ["a", "b"] and p["edge_nodes"] == [], (name, p["device_nodes"])
