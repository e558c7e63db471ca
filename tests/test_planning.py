"""DAPDEE planning: exact optimality against an independent brute force, semantics, plan map
serialisation, min-cut fallback, CLI."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph
from dapdee.costmodel import Predicted, partition
from dapdee.planning import PlanMap, PlanMapError, PlanRequest, make_plan

RTOL = 1e-9
EXAMPLES = int(os.environ.get("DAPDEE_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(a: float, b: float, rtol: float = 1e-7) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)


# ---- random graphs -------------------------------------------------------------------------------

costs = st.floats(0.0, 20.0, allow_nan=False, allow_infinity=False)
sizes = st.integers(0, 60_000)
accuracies = st.one_of(st.none(), st.floats(0.0, 1.0))


def _graph(draw, nodes: list[dict]) -> dict:
    k = draw(st.integers(1, min(3, len(nodes))))
    idx = sorted(draw(st.lists(st.integers(0, len(nodes) - 1), min_size=k, max_size=k, unique=True)))
    exits = [
        {"name": f"e{j}", "node": nodes[i]["name"], "accuracy": draw(accuracies)} for j, i in enumerate(idx)
    ]
    return {
        "model": "rand",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": draw(sizes)},
        "nodes": nodes,
        "exits": exits,
    }


def _node(draw, i: int, inputs: list[str]) -> dict:
    return {
        "name": f"n{i}",
        "op": "op",
        "inputs": inputs,
        "out_bytes": draw(sizes),
        "device_ms": draw(costs),
        "edge_ms": draw(costs),
    }


@st.composite
def arbitrary_dags(draw, max_nodes: int = 9) -> CostGraph:
    """Any small DAG: each node consumes 1-3 earlier producers (input included); several exits."""
    n = draw(st.integers(1, max_nodes))
    nodes: list[dict] = []
    for i in range(n):
        pool = ["x"] + [f"n{j}" for j in range(i)]
        inputs = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=min(3, len(pool)), unique=True))
        nodes.append(_node(draw, i, inputs))
    return CostGraph.from_dict(_graph(draw, nodes))


@st.composite
def series_parallel(draw, max_nodes: int = 10) -> CostGraph:
    """Series compositions of single nodes and forks of 2-3 branches (length 1-2) joined again."""
    nodes: list[dict] = []
    last = "x"
    while len(nodes) < max_nodes - 3:
        if draw(st.booleans()):
            nodes.append(_node(draw, len(nodes), [last]))
        else:
            ends = []
            for _ in range(draw(st.integers(2, 3))):
                prev = last
                for _ in range(draw(st.integers(1, 2))):
                    if len(nodes) >= max_nodes - 1:
                        break
                    nodes.append(_node(draw, len(nodes), [prev]))
                    prev = nodes[-1]["name"]
                ends.append(prev)
            nodes.append(_node(draw, len(nodes), sorted(set(ends), key=ends.index)))
        last = nodes[-1]["name"]
        if draw(st.booleans()):
            break
    return CostGraph.from_dict(_graph(draw, nodes))


requests = st.builds(
    PlanRequest,
    bandwidth_mbps=st.floats(0.01, 1000.0),
    rtt_ms=st.floats(0.0, 50.0),
    device_load=st.floats(0.0, 0.95),
    edge_load=st.floats(0.0, 0.95),
    latency_budget_ms=st.one_of(st.none(), st.floats(0.1, 150.0)),
    min_accuracy=st.one_of(st.none(), st.floats(0.0, 1.0)),
    frame_rate=st.one_of(st.none(), st.floats(1.0, 2000.0)),
)


# ---- the independent brute force ---------------------------------------------------------------


def all_partitions(graph: CostGraph) -> dict[str, list]:
    """Every downward-closed D ⊆ A(e) of every exit, as costmodel Partitions (2^|A(e)| subsets)."""
    out = {}
    for ex in graph.exits:
        need = graph.ancestors(ex.node)
        parts = []
        for bits in range(1 << len(need)):
            d = {n for i, n in enumerate(need) if bits >> i & 1}
            if all(u == graph.input.name or u in d for n in d for u in graph.node(n).inputs):
                parts.append(partition(graph, ex.name, d))
        out[ex.name] = parts
    return out


def acc_ok(acc: float | None, req: PlanRequest) -> bool:
    return req.min_accuracy is None or (acc is not None and acc >= req.min_accuracy)


def brute_best(parts: list, cond, objective: str) -> Predicted:
    preds = [p.predict(cond) for p in parts]
    if objective == "latency":
        return min(preds, key=lambda p: p.latency_ms)
    bmin = min(p.bottleneck_ms for p in preds)
    return min((p for p in preds if p.bottleneck_ms <= bmin * (1 + 1e-10)), key=lambda p: p.latency_ms)


def check_plan(
    graph: CostGraph, parts: dict[str, list], req: PlanRequest, plan: dict, objective: str
) -> None:
    """The plan is self-consistent and as good as the brute-force walk of DESIGN.md."""
    cond = req.conditions()
    names = [e.name for e in graph.exits]
    acc = {e.name: e.accuracy for e in graph.exits}
    # node lists, transfer and numbers agree with the cost model
    part = partition(graph, plan["exit"]["name"], plan["device_nodes"])
    assert plan["edge_nodes"] == list(part.edge_nodes)
    assert plan["transfer"] == [{"node": n, "bytes": b} for n, b in part.transfer]
    want = part.predict(cond).as_dict(acc[part.exit])
    assert all(close(plan["predicted"][k], v) for k, v in want.items() if k != "accuracy")
    assert plan["predicted"]["accuracy"] == acc[part.exit] == plan["exit"]["accuracy"]
    assert plan["mode"] == objective and plan["planner"] == "dapdee" and plan["approximate"] is False
    best = {n: brute_best(parts[n], cond, objective) for n in names}
    if objective == "latency":
        value = {n: best[n].latency_ms for n in names}
        limit = req.latency_budget_ms
        key = "latency_ms"
    else:
        value = {n: best[n].bottleneck_ms for n in names}
        limit = None if req.frame_rate is None else 1000.0 / req.frame_rate
        key = "bottleneck_ms"
    if limit is not None:  # keep clear of floating ties at the threshold
        assume(all(abs(v - limit) > 1e-6 * max(1.0, limit) for v in value.values()))
    meeting = [n for n in names if acc_ok(acc[n], req) and (limit is None or value[n] <= limit)]
    if meeting:
        expected = meeting[-1]  # the deepest that meets
        assert plan["exit"]["name"] == expected
        assert plan["constraints_met"] is True
        assert close(plan["predicted"][key], value[expected], 1e-9)
        if objective == "throughput":
            assert plan["predicted"]["latency_ms"] <= best[expected].latency_ms * (1 + 1e-9) + 1e-12
    else:
        pool = [n for n in names if acc_ok(acc[n], req)] or names
        assert plan["constraints_met"] is False
        assert plan["exit"]["name"] in pool
        assert close(plan["predicted"][key], min(value[n] for n in pool), 1e-9)


def check_all_modes(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    parts = all_partitions(graph)
    pm = PlanMap.build(graph)
    for req in reqs:
        plans = {}
        for mode in ("latency", "throughput"):
            plans[mode] = pm.plan(replace(req, mode=mode))
            check_plan(graph, parts, replace(req, mode=mode), plans[mode], mode)
        auto = pm.plan(replace(req, mode="auto"))
        lat = plans["latency"]
        sustain = req.frame_rate is None or lat["predicted"]["throughput_fps"] >= req.frame_rate
        want = lat if sustain else plans["throughput"]
        assert {k: v for k, v in auto.items() if k != "plan_id"} == {
            k: v for k, v in want.items() if k != "plan_id"
        }


@SETTINGS
@given(arbitrary_dags(), st.lists(requests, min_size=1, max_size=3))
def test_exact_on_arbitrary_dags(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    check_all_modes(graph, reqs)


@SETTINGS
@given(series_parallel(), st.lists(requests, min_size=1, max_size=3))
def test_exact_on_series_parallel(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    check_all_modes(graph, reqs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arbitrary_dags(), st.lists(requests, min_size=1, max_size=3))
def test_mincut_fallback_matches_enumeration(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    exact = PlanMap.build(graph)
    capped = PlanMap.build(graph, cap=1)  # every exit has >= 2 ideals: all fall back
    assert not capped.exact and all(c is None for c in capped.ideal_counts().values())
    for req in reqs:
        lreq = replace(req, mode="latency", latency_budget_ms=None)  # exit choice by accuracy only
        a = exact.plan(lreq)
        b = capped.plan(lreq)
        assert b["approximate"] is False and a["exit"] == b["exit"]
        assert close(a["predicted"]["latency_ms"], b["predicted"]["latency_ms"], 1e-9)
        t_exact = exact.plan(replace(req, mode="throughput", frame_rate=None, min_accuracy=None))
        t_cap = capped.plan(replace(req, mode="throughput", frame_rate=None, min_accuracy=None))
        assert t_cap["approximate"] is True
        assert t_cap["exit"] == t_exact["exit"]
        assert t_cap["predicted"]["bottleneck_ms"] >= t_exact["predicted"]["bottleneck_ms"] * (1 - 1e-9)


@SETTINGS
@given(arbitrary_dags(), requests)
def test_plan_map_round_trips(graph: CostGraph, req: PlanRequest) -> None:
    for cap in (1, 10_000):
        pm = PlanMap.build(graph, cap=cap)
        data = pm.to_bytes()
        back = PlanMap.from_bytes(data)
        assert back.to_bytes() == data
        for mode in ("latency", "throughput", "auto"):
            r = replace(req, mode=mode)
            assert back.plan(r) == pm.plan(r)


def test_plan_map_front_counts_and_device_only_kept() -> None:
    g = _fork_graph()
    pm = PlanMap.build(g)
    # x -> {a, b} -> j: ideals {}, {a}, {b}, {a,b}, {a,b,j}
    assert pm.ideal_counts() == {"final": 5}
    cs = pm.cands[0]
    assert cs.st.full in cs.masks
    # device-only wins with a huge rtt although other partitions have smaller sums
    plan = pm.plan(PlanRequest(bandwidth_mbps=1000.0, rtt_ms=1e6, mode="latency"))
    assert plan["edge_nodes"] == [] and plan["transfer"] == [] and plan["predicted"]["transfer_ms"] == 0.0


def test_plan_id_deterministic_and_request_sensitive() -> None:
    g = _fork_graph()
    r = PlanRequest(bandwidth_mbps=5.0)
    assert make_plan(g, r)["plan_id"] == make_plan(g, r)["plan_id"]
    assert make_plan(g, r)["plan_id"] != make_plan(g, replace(r, rtt_ms=1.0))["plan_id"]


def test_null_accuracy_never_meets_min_accuracy() -> None:
    d = _fork_graph().to_dict()
    d["exits"] = [
        {"name": "early", "node": "a", "accuracy": 0.9},
        {"name": "final", "node": "j", "accuracy": None},
    ]
    g = CostGraph.from_dict(d)
    plan = make_plan(g, PlanRequest(bandwidth_mbps=5.0, min_accuracy=0.5, mode="latency"))
    assert plan["exit"]["name"] == "early" and plan["constraints_met"] is True
    plan = make_plan(g, PlanRequest(bandwidth_mbps=5.0, mode="latency"))
    assert plan["exit"]["name"] == "final"


def test_from_bytes_rejects_garbage() -> None:
    pm = PlanMap.build(_fork_graph())
    with pytest.raises(PlanMapError, match="not valid JSON"):
        PlanMap.from_bytes(b"\x80nope")
    d = json.loads(pm.to_bytes())
    d["exits"][0]["masks"] = ["4"]  # {j} alone is not downward closed
    d["exits"][0]["device_ms"], d["exits"][0]["bytes"], d["exits"][0]["edge_ms"] = [0.0], [0], [0.0]
    with pytest.raises(PlanMapError, match="masks"):
        PlanMap.from_bytes(json.dumps(d).encode())
    d = json.loads(pm.to_bytes())
    d["schema"] = 99
    with pytest.raises(PlanMapError, match="schema"):
        PlanMap.from_bytes(json.dumps(d).encode())


def test_request_validation_names_fields() -> None:
    bad = {
        "bandwidth_mbps": {"bandwidth_mbps": 0.0},
        "rtt_ms": {"rtt_ms": -1.0},
        "device_load": {"device_load": 1.0},
        "edge_load": {"edge_load": -0.1},
        "latency_budget_ms": {"latency_budget_ms": 0.0},
        "min_accuracy": {"min_accuracy": 1.5},
        "frame_rate": {"frame_rate": -2.0},
        "mode": {"mode": "fast"},
    }
    for field, kw in bad.items():
        args = {"bandwidth_mbps": 5.0, **kw}
        with pytest.raises(ValueError, match=field):
            PlanRequest(**args).validate()


# ---- CLI -----------------------------------------------------------------------------------------


def _fork_graph() -> CostGraph:
    return CostGraph.from_dict(
        {
            "model": "fork",
            "input": {"name": "x", "shape": [1, 8], "bytes": 4000},
            "nodes": [
                {
                    "name": "a",
                    "op": "op",
                    "inputs": ["x"],
                    "out_bytes": 100,
                    "device_ms": 1.0,
                    "edge_ms": 0.1,
                },
                {
                    "name": "b",
                    "op": "op",
                    "inputs": ["x"],
                    "out_bytes": 100,
                    "device_ms": 1.0,
                    "edge_ms": 0.1,
                },
                {
                    "name": "j",
                    "op": "op",
                    "inputs": ["a", "b"],
                    "out_bytes": 40,
                    "device_ms": 50.0,
                    "edge_ms": 0.5,
                },
            ],
            "exits": [{"name": "final", "node": "j", "accuracy": 0.9}],
        }
    )


def test_cli_prints_plan_json(tmp_path, capsys) -> None:
    p = tmp_path / "g.json"
    _fork_graph().save(str(p))
    rc = cli_main(
        ["plan", "--profile", str(p), "--bandwidth-mbps", "0.5", "--rtt-ms", "3", "--mode", "latency"]
    )
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    want = {
        "plan_id",
        "model",
        "mode",
        "planner",
        "exit",
        "device_nodes",
        "edge_nodes",
        "transfer",
        "predicted",
    }
    assert want | {"constraints_met", "approximate", "edge_worker"} == set(plan)
    assert plan["planner"] == "dapdee" and plan["model"] == "fork"
    assert plan["device_nodes"] == ["a", "b"]  # ship 200 bytes instead of the 4000-byte input
    rc = cli_main(["plan", "--profile", str(p), "--bandwidth-mbps", "0.5", "--baseline", "edge-only"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["planner"] == "edge-only"


def _write(tmp_path, d: dict) -> str:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_cli_bad_input_names_field(tmp_path, capsys) -> None:
    good = _fork_graph().to_dict()

    def edit(fn) -> dict:
        d = json.loads(json.dumps(good))
        fn(d)
        return d

    cases = [
        (edit(lambda d: d["nodes"][2].update(inputs=["a", "zz"])), [], "unknown producer 'zz'"),
        (
            edit(lambda d: d["nodes"][0].update(inputs=["j"])),
            [],
            "topological order (or the graph has a cycle)",
        ),
        (edit(lambda d: d["nodes"][1].update(device_ms=-1.0)), [], "device_ms"),
        (edit(lambda d: d["nodes"][1].update(edge_ms=None)), [], "edge_ms: missing timing"),
        (edit(lambda d: d["exits"][0].update(node="nope")), [], "exits[0].node"),
        (good, ["--bandwidth-mbps", "0"], "bandwidth_mbps"),
        (good, ["--bandwidth-mbps", "-3"], "bandwidth_mbps"),
        (good, ["--device-load", "1"], "device_load"),
        (good, ["--edge-load", "-0.5"], "edge_load"),
        (good, ["--min-accuracy", "2"], "min_accuracy"),
    ]
    for d, extra, needle in cases:
        path = _write(tmp_path, d)
        args = ["plan", "--profile", path, "--bandwidth-mbps", "5", *extra]
        rc = cli_main(args)
        err = capsys.readouterr().err
        assert rc != 0, (needle, err)
        assert needle in err, (needle, err)
    assert cli_main(["plan", "--profile", str(tmp_path / "missing.json"), "--bandwidth-mbps", "5"]) != 0
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["plan", "--profile", _write(tmp_path, good), "--bandwidth-mbps", "5", "--mode", "fast"])
    assert exc.value.code != 0 and "--mode" in capsys.readouterr().err
