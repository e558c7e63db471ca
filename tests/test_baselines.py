"""Baselines (device-only, edge-only, Neurosurgeon, DADS, Edgent) against DAPDEE on the zoo models,
all priced by the same cost model."""

from __future__ import annotations

import itertools

import pytest

from dapdee.costgraph import CostGraph
from dapdee.costmodel import partition
from dapdee.models import load_model
from dapdee.planning import BASELINES, PlanMap, PlanRequest, baseline_plan

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
    final = g.exits[-1].name
    for i, req in enumerate(GRID):
        ours = pm.plan(req)
        assert ours["exit"]["name"] == final and ours["constraints_met"] and ours["mode"] == req.mode
        for name in BASELINES:
            if name == "dads" and req.mode == "throughput" and i % 5:
                continue  # the α/γ grid is |grid|² max-flows per request: sample it
            theirs = baseline_plan(g, req, name)
            assert theirs["planner"] == name and theirs["exit"]["name"] == final
            key = _key(req.mode)
            assert ours["predicted"][key] <= theirs["predicted"][key] * (1 + 1e-9), (name, req)
            # the baseline's numbers are the cost model's for its node sets
            part = partition(g, final, theirs["device_nodes"])
            assert theirs["edge_nodes"] == list(part.edge_nodes)
            assert theirs["predicted"][key] == pytest.approx(getattr(part.predict(req.conditions()), key))
            if name == "dads" and req.mode == "latency":  # min-cut is exact for latency
                assert theirs["predicted"]["latency_ms"] == pytest.approx(
                    ours["predicted"]["latency_ms"], rel=1e-9
                )


@pytest.mark.parametrize("model", MODELS)
def test_constraints_deepest_exit_at_least_edgents(zoo, model: str) -> None:
    g, pm = zoo[model]
    names = [e.name for e in g.exits]
    reqs = [
        PlanRequest(
            bandwidth_mbps=bw, rtt_ms=5.0, device_load=dl, mode=mode, latency_budget_ms=lb, frame_rate=fr
        )
        for mode, bw, dl, lb, fr in itertools.product(
            ("latency", "throughput", "auto"), (0.5, 5.85, 50.0), (0.0, 0.7), (3.0, 8.0, 20.0), (30.0, 200.0)
        )
    ]
    for req in reqs:
        ours, theirs = pm.plan(req), baseline_plan(g, req, "edgent")
        assert theirs["planner"] == "edgent"
        if ours["mode"] != theirs["mode"] or not theirs["constraints_met"]:
            continue
        assert ours["constraints_met"], req
        oi, ti = names.index(ours["exit"]["name"]), names.index(theirs["exit"]["name"])
        assert oi >= ti, req
        if oi == ti:
            key = _key(ours["mode"])
            assert ours["predicted"][key] <= theirs["predicted"][key] * (1 + 1e-9)


@pytest.mark.parametrize(
    ("model", "req", "ratio"),
    [
        # inception: the best pipeline cut runs the 1x1 reductions of c4's branches on the device
        (
            "inception",
            PlanRequest(bandwidth_mbps=22.25, device_load=0.22, edge_load=0.92, mode="throughput"),
            1.3,
        ),
        # resnet18: a cut across layer2's first block (its conv1 and its shortcut on the device)
        (
            "resnet18",
            PlanRequest(bandwidth_mbps=125.424, device_load=0.06, edge_load=0.8, mode="throughput"),
            1.05,
        ),
    ],
)
def test_dag_models_where_chain_splits_are_strictly_worse(
    zoo, model: str, req: PlanRequest, ratio: float
) -> None:
    g, pm = zoo[model]
    ours = pm.plan(req)
    need = g.ancestors(g.exits[-1].node)
    prefixes = {tuple(need[:k]) for k in range(len(need) + 1)}
    assert tuple(ours["device_nodes"]) not in prefixes  # a DAG cut, not a split of the topological order
    for name in ("neurosurgeon", "edgent"):
        theirs = baseline_plan(g, req, name)
        assert theirs["predicted"]["bottleneck_ms"] > ours["predicted"]["bottleneck_ms"] * ratio, name


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
    g = _reduce_fork()
    req = PlanRequest(bandwidth_mbps=10.0, rtt_ms=2.0, mode="latency")
    ours = PlanMap.build(g).plan(req)
    assert ours["device_nodes"] == ["r1", "r2"]
    assert [t["node"] for t in ours["transfer"]] == ["r1", "r2"]
    for name in ("neurosurgeon", "edgent"):
        theirs = baseline_plan(g, req, name)
        assert theirs["predicted"]["latency_ms"] > 1.5 * ours["predicted"]["latency_ms"], name
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
def test_mincut_fallback_matches_enumeration_on_zoo(zoo, model: str) -> None:
    g, pm = zoo[model]
    capped = PlanMap.build(g, cap=20)  # below every exit's count of downward-closed sets
    assert all(c is None for c in capped.ideal_counts().values())
    for req in GRID[::3]:
        for budget in (None, 12.0):
            r = PlanRequest(**{**req.__dict__, "mode": "latency", "latency_budget_ms": budget})
            a, b = pm.plan(r), capped.plan(r)
            assert b["approximate"] is False and a["exit"] == b["exit"]
            assert b["predicted"]["latency_ms"] == pytest.approx(a["predicted"]["latency_ms"], rel=1e-9)
        t = capped.plan(PlanRequest(**{**req.__dict__, "mode": "throughput"}))
        assert t["approximate"] is True
        exact = pm.plan(PlanRequest(**{**req.__dict__, "mode": "throughput"}))
        assert t["predicted"]["bottleneck_ms"] >= exact["predicted"]["bottleneck_ms"] * (1 - 1e-9)
