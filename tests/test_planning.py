"""DAPDEE planning: exact optimality against the independent oracle (tests/oracle.py), semantics, plan map
serialisation, min-cut fallback, CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph
from dapdee.costmodel import partition
from dapdee.planning import MODES, PlanMap, PlanMapError, PlanRequest, make_plan
from dapdee.planning.enumerate import ExitStructure
from dapdee.planning.mincut import min_cut_mask
from tests import oracle

EXAMPLES = int(os.environ.get("DAPDEE_HYPOTHESIS_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- random graphs -------------------------------------------------------------------------------

costs = st.floats(0.0, 20.0, allow_nan=False, allow_infinity=False)
sizes = st.integers(0, 60_000)
accuracies = st.one_of(st.none(), st.floats(0.0, 1.0))


def _graph(draw, nodes: list[dict]) -> dict:
    k = draw(st.integers(1, min(3, len(nodes))))
    idx = sorted(draw(st.lists(st.integers(0, len(nodes) - 1), min_size=k, max_size=k, unique=True)))
    exits = [{"name": f"e{j}", "node": nodes[i]["name"], "accuracy": draw(accuracies)} for j, i in enumerate(idx)]
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


def plan_requests(frame_rate: st.SearchStrategy) -> st.SearchStrategy:
    """Requests over the whole range of conditions, each requirement present or not."""
    return st.builds(
        PlanRequest,
        bandwidth_mbps=st.floats(0.01, 1000.0),
        rtt_ms=st.floats(0.0, 50.0),
        device_load=st.floats(0.0, 0.95),
        edge_load=st.floats(0.0, 0.95),
        latency_budget_ms=st.one_of(st.none(), st.floats(0.1, 150.0)),
        min_accuracy=st.one_of(st.none(), st.floats(0.0, 1.0)),
        frame_rate=frame_rate,
    )


requests = plan_requests(st.one_of(st.none(), st.floats(1.0, 2000.0)))


# ---- against the independent oracle (tests/oracle.py) --------------------------------------------


def to_oracle(req: PlanRequest) -> oracle.Req:
    cond = oracle.Cond(req.bandwidth_mbps, req.rtt_ms, req.device_load, req.edge_load)
    return oracle.Req(cond, req.latency_budget_ms, req.min_accuracy, req.frame_rate, req.mode)


def check_all_modes(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    """Every mode's plan is what the oracle's walk over all downward-closed partitions gives, and
    auto is exactly the latency plan when that sustains the frame rate, else the throughput plan."""
    g = graph.to_dict()
    pm = PlanMap.build(graph)
    for req in reqs:
        r = to_oracle(req)
        prices = oracle.all_prices(g, r.cond)
        plans = {}
        for mode in MODES:
            want = oracle.decide(g, replace(r, mode=mode), prices)
            assume(not want.fragile)  # keep clear of floating ties at a threshold
            plans[mode] = pm.plan(replace(req, mode=mode))
            oracle.check_plan(g, plans[mode], replace(r, mode=mode), want)
            assert plans[mode]["planner"] == "dapdee" and plans[mode]["approximate"] is False
        lat = plans["latency"]
        fps = lat["predicted"]["throughput_fps"]  # null: unbounded (a zero bottleneck)
        sustain = req.frame_rate is None or fps is None or fps >= req.frame_rate
        want_auto = lat if sustain else plans["throughput"]
        assert {k: v for k, v in plans["auto"].items() if k != "plan_id"} == {
            k: v for k, v in want_auto.items() if k != "plan_id"
        }


@SETTINGS
@given(arbitrary_dags(), st.lists(requests, min_size=1, max_size=3))
def test_exact_on_arbitrary_dags(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    check_all_modes(graph, reqs)


@SETTINGS
@given(series_parallel(), st.lists(requests, min_size=1, max_size=3))
def test_exact_on_series_parallel(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    check_all_modes(graph, reqs)


# ---- capped plan maps --------------------------------------------------------------------------------


def _bounds(g: dict, cond: oracle.Cond) -> tuple[dict, dict[str, float], dict[str, float]]:
    """All prices, each exit's optimal bottleneck, and each exit's best prefix-split bottleneck."""
    prices = oracle.all_prices(g, cond)
    exact = {n: oracle.best(ps, "throughput").bottleneck_ms for n, ps in prices.items()}
    pref = oracle.all_prices(g, cond, "prefixes")
    upper = {n: oracle.best(ps, "throughput").bottleneck_ms for n, ps in pref.items()}
    return prices, exact, upper


def check_capped(g: dict, capped: PlanMap, req: PlanRequest) -> tuple[int, int]:
    """Every mode's plan of a capped map: exact wherever it says so (latency answers come from a
    min-cut, exits under the cap are enumerated), else within oracle.check_capped_throughput's
    bounds. Returns (plans checked exactly, plans checked against the bounds); fragile cases
    (a threshold within rounding) count in neither."""
    r = to_oracle(req)
    prices, exact, upper = _bounds(g, r.cond)
    n_exact = n_bounded = 0
    for mode in MODES:
        rm = replace(r, mode=mode)
        want = oracle.decide(g, rm, prices)
        plan = capped.plan(replace(req, mode=mode))
        if want.fragile:
            oracle.check_consistent(g, plan, rm.cond)
        elif plan["approximate"] is False:
            oracle.check_plan(g, plan, rm, want)
            n_exact += 1
        else:
            assert want.mode == "throughput"  # the latency walk (and so auto's switch) is exact
            n_bounded += oracle.check_capped_throughput(g, plan, rm, exact, upper)
    return n_exact, n_bounded


capped_requests = plan_requests(st.floats(1.0, 2000.0))  # always a frame rate: the exit choice is at stake


@SETTINGS
@given(arbitrary_dags(), st.lists(capped_requests, min_size=1, max_size=3))
def test_capped_plan_maps_exact_or_bounded(graph: CostGraph, reqs: list[PlanRequest]) -> None:
    """cap=3: exits with more than 3 downward-closed sets fall back (latency: min-cut; throughput:
    prefix splits + weight-grid min-cuts, `approximate: true`)."""
    capped = PlanMap.build(graph, cap=3)
    full = PlanMap.build(graph).ideal_counts()
    assert all((c is None) == (full[n] > 3) for n, c in capped.ideal_counts().items())
    g = graph.to_dict()
    for req in reqs:
        check_capped(g, capped, req)


def test_capped_throughput_fallback_bounded_on_seeded_dags() -> None:
    """Seeded DAGs of up to 8 nodes, cap=3, frame-rate and accuracy requirements: enough plans
    are approximate, and all of those lie within the bounds; enough are exact and optimal."""
    rng = random.Random(11)
    n_exact = n_bounded = 0
    for i in range(40):
        g = oracle.random_graph(rng, max_nodes=8, name=f"capped-{i}")
        capped = PlanMap.build(CostGraph.from_dict(g), cap=3)
        for _ in range(3):
            r = oracle.random_request(rng)
            req = PlanRequest(
                **vars(r.cond),
                latency_budget_ms=r.latency_budget_ms,
                min_accuracy=r.min_accuracy,
                frame_rate=r.frame_rate or 30.0,
            )
            e, b = check_capped(g, capped, req)
            n_exact += e
            n_bounded += b
    assert n_exact >= 150 and n_bounded >= 60, (n_exact, n_bounded)  # seeded: 263 and 93


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
    # equal inputs, equal ids: an int is the float it equals
    ints = PlanRequest(bandwidth_mbps=5, rtt_ms=0, latency_budget_ms=40, frame_rate=10)  # type: ignore[arg-type]
    floats = PlanRequest(bandwidth_mbps=5.0, rtt_ms=0.0, latency_budget_ms=40.0, frame_rate=10.0)
    assert make_plan(g, ints)["plan_id"] == make_plan(g, floats)["plan_id"]


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
    for field, bad in (("device_ms", None), ("bytes", [1])):  # sums that are not numbers
        d = json.loads(pm.to_bytes())
        d["exits"][0][field] = [bad] * len(d["exits"][0]["masks"])
        with pytest.raises(PlanMapError, match=r"exits\[0\]: malformed"):
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
    huge = 10**400  # an integer no float holds: math.isfinite raises OverflowError for it
    for field in ("bandwidth_mbps", "rtt_ms", "device_load", "edge_load", "latency_budget_ms", "frame_rate"):
        bad[f"{field} (10**400)"] = {field: huge}
    for field, kw in bad.items():
        args = {"bandwidth_mbps": 5.0, **kw}
        with pytest.raises(ValueError, match=field.split()[0]):
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
    rc = cli_main(["plan", "--profile", str(p), "--bandwidth-mbps", "0.5", "--rtt-ms", "3", "--mode", "latency"])
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
        (edit(lambda d: d["nodes"][1].update(device_ms=10**400)), [], "device_ms"),  # JSON allows it
        (edit(lambda d: d.update(overheads={"edge_request_ms": 10**400})), [], "overheads.edge_request_ms"),
        (edit(lambda d: d["nodes"][1].update(edge_ms=None)), [], "edge_ms: missing timing"),
        (edit(lambda d: d["exits"][0].update(node="nope")), [], "exits[0].node"),
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
    for option, value in (("--mode", "fast"), ("--bandwidth-mbps", "0"), ("--bandwidth-mbps", "-3")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["plan", "--profile", _write(tmp_path, good), "--bandwidth-mbps", "5", option, value])
        assert exc.value.code != 0 and option in capsys.readouterr().err


def _wide_graph(seed: int, branches: int = 5, depth: int = 3) -> CostGraph:
    """A fork into `branches` chains of `depth` nodes joined again: a front of many candidates."""
    rng = random.Random(seed)
    nodes = [{"name": "fork", "inputs": ["x"], "out_bytes": 4000}]
    ends = []
    for b in range(branches):
        prev = "fork"
        for d in range(depth):
            name = f"b{b}_{d}"
            nodes.append({"name": name, "inputs": [prev], "out_bytes": rng.randint(100, 8000)})
            prev = name
        ends.append(prev)
    nodes.append({"name": "join", "inputs": ends, "out_bytes": 40})
    for n in nodes:
        n.update(
            op="conv2d", flops=1, device_ms=round(rng.uniform(0.5, 5.0), 3), edge_ms=round(rng.uniform(0.05, 0.5), 3)
        )
    return CostGraph.from_dict(
        {
            "model": "wide",
            "input": {"name": "x", "shape": [1, 3, 8, 8], "bytes": 20000},
            "nodes": nodes,
            "exits": [{"name": "final", "node": "join", "accuracy": 0.9}],
        }
    )


@pytest.mark.parametrize("seed", range(4))
def test_small_front_scan_matches_the_vectorised_scan(seed: int) -> None:
    """Fronts up to SMALL_FRONT are scanned in plain Python, larger ones with numpy: on the same
    candidates both pick the same index (same operations, same order), exact ties included,
    and the pick is the cost model's optimum (priced independently, per candidate)."""
    from dapdee.costmodel import Conditions, predict_sums
    from dapdee.planning.planmap import SMALL_FRONT, _scan_latency, _scan_throughput

    cs = PlanMap.build(_wide_graph(seed)).cands[-1]
    assert len(cs) > SMALL_FRONT  # the numpy path
    rows = cs._rows() + cs._rows()[:5]  # exact duplicates: the first must win
    rng = random.Random(seed)
    for _ in range(60):
        cond = Conditions(rng.uniform(0.05, 200), rng.uniform(0, 60), rng.uniform(0, 0.9), rng.uniform(0, 0.9))
        allowed = np.array([rng.random() < 0.7 for _ in range(len(cs))]) if rng.random() < 0.5 else None
        if allowed is not None:
            allowed[rng.randrange(len(cs))] = True
        for objective, scan in (("latency", _scan_latency), ("throughput", _scan_throughput)):
            j = cs.best(objective, cond, None if allowed is None else allowed.copy())
            assert scan(cs._rows(), cond, allowed) == j
            assert scan(rows, cond, None if allowed is None else np.concatenate([allowed, allowed[:5]])) == j
            prices = [
                predict_sums(cs.dev_l[i], cs.bytes_l[i], cs.edge_l[i], cs.masks[i] == cs.st.full, cond, cs.st.overheads)
                for i in range(len(cs))
                if allowed is None or allowed[i]
            ]
            key = (lambda p: p.latency_ms) if objective == "latency" else (lambda p: p.bottleneck_ms)
            got = cs.predict(j, cond)
            assert key(got) <= min(map(key, prices)) * (1 + 1e-9) + 1e-12


def test_partition_sums_are_the_same_in_every_process() -> None:
    """A partition's device sum is taken in topological order, as the plan map takes it: summed
    in set order it follows string hashing, and replicas (other PYTHONHASHSEEDs) disagreed in the
    last bit (100012.30099999999 against 100012.301 here)."""
    script = (
        "from dapdee.costgraph import CostGraph\n"
        "from dapdee.costmodel import partition\n"
        "names = ['conv1', 'relu', 'pool', 'fc', 'head', 'bn', 'act', 'out']\n"
        "vals = [0.1, 0.2, 0.3, 1e-3, 7.7, 1e5, 3.3, 0.7]\n"
        "nodes = [{'name': n, 'inputs': [names[i - 1] if i else 'x'], 'out_bytes': 4, 'device_ms': v,"
        " 'edge_ms': v} for i, (n, v) in enumerate(zip(names, vals))]\n"
        "g = CostGraph.from_dict({'model': 'm', 'input': {'name': 'x', 'shape': [1], 'bytes': 4},"
        " 'nodes': nodes, 'exits': [{'name': 'final', 'node': 'out', 'accuracy': 0.9}]})\n"
        "print(repr(partition(g, 'final', names).device_sum_ms))\n"
    )
    topological = 0.0
    for v in (0.1, 0.2, 0.3, 1e-3, 7.7, 1e5, 3.3, 0.7):
        topological += v
    seen = set()
    for seed in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        seen.add(float(out.stdout))
    assert seen == {topological}


def test_a_budget_equal_to_the_best_latency_is_met() -> None:
    """The latency scan adds the stage times in the order the answer's `predicted` does: added in
    another order, it picked a partition one ulp slower (1.3000000000000003 against 1.3 here),
    and a budget equal to the best latency was missed, while DADS met it. The best latency is
    found by pricing every downward-closed device set (`oracle.ideals`) with `partition`."""
    spec = [("n0", ["x"], 1, 0.1, 0.3), ("n1", ["n0"], 0, 0.3, 0.3), ("n2", ["x"], 0, 0.2, 0.1),
            ("n3", ["n0"], 3, 0.1, 0.2), ("n4", ["n3"], 3, 0.3, 0.1), ("n5", ["n2"], 0, 0.2, 0.2),
            ("n6", ["n5", "n1"], 1, 0.7, 0.2)]  # fmt: skip
    g = {
        "model": "r",
        "input": {"name": "x", "shape": [1], "bytes": 2},
        "nodes": [{"name": n, "inputs": i, "out_bytes": b, "device_ms": d, "edge_ms": e} for n, i, b, d, e in spec],
        "exits": [{"name": "final", "node": "n6", "accuracy": 0.9}],
    }
    graph = CostGraph.from_dict(g)
    req = PlanRequest(bandwidth_mbps=0.0008, rtt_ms=0.3, mode="latency")
    cond = req.conditions()
    best = min(partition(graph, "final", d).predict(cond).latency_ms for d in oracle.ideals(g, "final"))
    plan = PlanMap.build(graph).plan(replace(req, latency_budget_ms=best))
    assert plan["predicted"]["latency_ms"] == best and plan["constraints_met"]


def test_a_latency_min_cut_with_a_float_saturated_edge_is_the_optimum() -> None:
    """A graph whose max-flow leaves one edge a few ulps off its capacity (found by a random
    search, about 1 exit in 8,000): networkx's `minimum_cut` read that edge as unsaturated and put
    n2 on the edge side, a cut 0.46 ms worse than the optimum {n0, n2} while the flow's value was
    the optimum's. Past the enumeration cap the latency plan is the min-cut's, and must still be
    the brute-force optimum (and say it is exact)."""
    nodes = [
        ("n0", ["x"], 0, 1.0, 5.064),
        ("n1", ["n0", "x"], 1000, 7.758, 2.578),
        ("n2", ["x"], 1000, 2.0, 3.427),
        ("n4", ["n0", "n2"], 37135, 0.0, 1.407),
        ("n5", ["x", "n1", "n4"], 0, 0.0, 0.025),
    ]
    g = {
        "model": "ulps",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 17254},
        "nodes": [
            {"name": n, "op": "", "inputs": i, "out_bytes": b, "device_ms": d, "edge_ms": e} for n, i, b, d, e in nodes
        ],
        "exits": [{"name": "e0", "node": "n5", "accuracy": 0.535}],
    }
    req = oracle.Req(oracle.Cond(48.0229, 0.0, 0.285, 0.0), mode="latency")
    plan = PlanMap.build(CostGraph.from_dict(g), cap=2).plan(PlanRequest(**vars(req.cond), mode="latency"))
    assert plan["approximate"] is False
    oracle.check_plan(g, plan, req)
    assert sorted(plan["device_nodes"]) == ["n0", "n2"]  # 11.247 ms; {n0} alone is 11.710 ms


def test_a_min_cut_with_zero_cost_nodes_completes_and_is_the_optimum() -> None:
    """A graph with zero timings and zero-byte tensors (found by a random search) on which
    preflow-push's second phase (turning the preflow into a flow) raised inside networkx at the
    weights (0.5, 0.001, 2); the cut is read after its first phase. At every weight of a grid,
    each exit's min-cut is the best downward-closed set."""
    nodes = [
        ("n0", ["x"], 56770, 0.0, 0.0),
        ("n1", ["x"], 0, 0.0, 4.566457),
        ("n2", ["x", "n0", "n1"], 23344, 5.573553, 0.0),
        ("n3", ["x"], 0, 11.558386, 4.154598),
        ("n4", ["n3", "n2"], 0, 18.773923, 1.899108),
        ("n5", ["n0", "n2"], 50147, 0.0, 4.846911),
        ("n6", ["n3", "n5"], 22920, 0.0, 2.63007),
    ]
    g = {
        "model": "zeros",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 59918},
        "nodes": [
            {"name": n, "op": "op", "inputs": i, "out_bytes": b, "device_ms": d, "edge_ms": e}
            for n, i, b, d, e in nodes
        ],
        "exits": [
            {"name": "e0", "node": "n2", "accuracy": 0.5107},
            {"name": "e1", "node": "n3", "accuracy": 0.6614},
            {"name": "e2", "node": "n5", "accuracy": None},
        ],
    }
    weights = ((0.5, 0.001, 2.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (2.0, 1e-4, 0.25))
    assert_min_cuts_optimal(g, weights)


def test_a_min_cut_of_timings_far_apart_completes_and_is_the_optimum() -> None:
    """Timings from 3e-10 to 9e5 ms (found by a random search): preflow-push's first phase
    raised inside networkx (a node left with excess and no residual edge); Edmonds-Karp gives
    the flow then, and the cut is still the best downward-closed set."""
    e = 1e-10
    nodes = [
        ("n0", ["x"], 0, 6.88 * e, 0.0),
        ("n1", ["n0", "x"], 44845, 691114.6510938677, 0.0),
        ("n2", ["x", "n0"], 57729, 0.0, 773019.7823139887),
        ("n3", ["n2", "n0"], 0, 587031.8428251663, 13.398485),
        ("n4", ["n2", "n0", "n1"], 0, 2.93 * e, 9.51974),
        ("n5", ["x", "n1"], 32928, 2.64 * e, 881556.672404353),
        ("n6", ["n5", "n2", "n0"], 58651, 5.83 * e, 0.0),
        ("n7", ["n4", "n0", "x"], 0, 12.498335, 19026.67919317269),
    ]
    g = {
        "model": "far",
        "input": {"name": "x", "shape": [1], "dtype": "float32", "bytes": 1708},
        "nodes": [
            {"name": n, "op": "op", "inputs": i, "out_bytes": b, "device_ms": d, "edge_ms": e}
            for n, i, b, d, e in nodes
        ],
        "exits": [{"name": "e", "node": "n7", "accuracy": 0.5}],
    }
    assert_min_cuts_optimal(g, ((0.16847119400320487, 0.0008082039794386062, 2.237922019087388), (1.0, 1.0, 1.0)))


def assert_min_cuts_optimal(g: dict, weights: tuple[tuple[float, float, float], ...]) -> None:
    """At each of `weights`, each exit's min-cut has the weighted cost of the best downward-closed
    set, enumerated (Σ device_ms, bytes sent and Σ edge_ms from the oracle's pricing)."""
    cg = CostGraph.from_dict(g)
    free = oracle.Cond(1.0, 0.0, 0.0, 0.0)  # no load: the oracle's device and edge ms are the sums
    for k, ex in enumerate(g["exits"]):
        st = ExitStructure.build(cg, k)
        parts = [oracle.price(g, ex["name"], d, free) for d in oracle.ideals(g, ex["name"])]
        for w in weights:

            def cost(p: oracle.Price, w: tuple[float, float, float] = w) -> float:
                return w[0] * p.device_ms + w[1] * p.sent_bytes + w[2] * p.edge_ms

            mask = min_cut_mask(st, *w)
            chosen = oracle.price(g, ex["name"], {st.nodes[i] for i in range(st.m) if mask >> i & 1}, free)
            assert cost(chosen) <= min(map(cost, parts)) * (1 + 1e-9) + 1e-12, (ex["name"], w)


def _wide_random_dag(rng: random.Random, n: int) -> CostGraph:
    """`n` nodes, each reading the one before it and up to 3 earlier nodes anywhere before that
    (so consumer and producer sets span several 64-bit words), some the input too; exits at a
    third, two thirds and the end."""
    nodes = []
    for i in range(n):
        earlier = sorted({i - 1, *rng.sample(range(i), min(i, rng.randint(0, 3)))}) if i else []
        inputs = [f"n{j}" for j in earlier] if i and rng.random() > 0.1 else ["x", *(f"n{j}" for j in earlier)]
        nodes.append({"name": f"n{i}", "op": "conv2d", "inputs": inputs, "out_bytes": rng.randint(1, 1 << 20),
                      "device_ms": rng.uniform(0.01, 5.0), "edge_ms": rng.uniform(0.001, 0.5)})  # fmt: skip
    exits = [{"name": f"e{k}", "node": f"n{(k + 1) * n // 3 - 1}"} for k in range(3)]
    return CostGraph.from_dict({"model": "wide", "input": {"name": "x", "shape": [1, 8], "bytes": 4096},
                                "nodes": nodes, "exits": exits})  # fmt: skip


def test_vectorised_sums_equal_the_cost_model_on_graphs_wider_than_a_word() -> None:
    """The plan map's vectorised sums (bit masks in 64-bit words) equal `costmodel.partition`'s
    for random downward-closed device sets of 150-node DAGs: bytes exactly, time sums bit for
    bit; and a stored map whose mask drops a producer in another word is refused."""
    from dapdee.planning.planmap import mask_sums

    rng = random.Random(7)
    for _ in range(4):
        g = _wide_random_dag(rng, 150)
        for i, ex in enumerate(g.exits):
            st_ = ExitStructure.build(g, i)
            masks = [0, st_.full]
            for _ in range(40):  # a random set closed downward
                seed = {st_.nodes[j] for j in range(st_.m) if rng.random() < rng.random()}
                closed = set().union(*(g.ancestors(s) for s in seed)) if seed else set()
                masks.append(sum(1 << j for j, name in enumerate(st_.nodes) if name in closed))
            dev, sent, edge = mask_sums(st_, masks)
            for k, mask in enumerate(masks):
                p = partition(g, ex.name, [st_.nodes[j] for j in range(st_.m) if mask >> j & 1])
                assert (dev[k], sent[k], edge[k]) == (p.device_sum_ms, p.sent_bytes, p.edge_sum_ms), (i, k)
    d = json.loads(PlanMap.build(g, cap=50).to_bytes())
    last, st_ = d["exits"][-1], ExitStructure.build(g, len(g.exits) - 1)
    k = last["masks"].index(format(st_.full, "x"))  # device-only: every node on the device
    low = next(j for j in range(64) if any(c >= 64 for c in st_.cons[j]))
    last["masks"][k] = format(st_.full & ~(1 << low), "x")  # a producer in word 0 gone, its consumer in word 1 kept
    with pytest.raises(PlanMapError, match="not downward-closed"):
        PlanMap.from_bytes(json.dumps(d).encode())


def _topological_sums(g: dict, exit_name: str, dev: frozenset[str]) -> tuple[float, int, float]:
    """(Σ_D device_ms, sent bytes, Σ_E edge_ms) of the device set `dev` of A(exit), each time
    sum added from 0 in the graph's node order (the cost model's topological order), the bytes
    from the oracle's transfer."""
    need = set(oracle.needed(g, exit_name))
    sent = oracle.price(g, exit_name, dev, oracle.Cond(1.0)).sent_bytes
    d = e = 0.0  # added one by one: sum() compensates float sums from Python 3.12
    for n in g["nodes"]:
        if n["name"] in dev:
            d += n["device_ms"]
        elif n["name"] in need:
            e += n["edge_ms"]
    return d, int(sent), e


def _weakly_below(q: tuple[float, int, float], p: tuple[float, int, float]) -> bool:
    return q[0] <= p[0] and q[1] <= p[1] and q[2] <= p[2]


@pytest.mark.parametrize("seed", range(300))
def test_the_front_is_the_brute_force_front_when_timings_span_sixteen_orders(seed: int) -> None:
    """Each exit's candidates are exactly Device-Only plus the Pareto front, in (Σ_D device_ms,
    bytes, Σ_E edge_ms), of every downward-closed partition that uses the edge (oracle.ideals),
    one per equal triple, with timings from 1e-9 to 1e7 ms. Σ_E taken as the exit's total minus
    Σ_D lost the small terms beside a 1e7 ms one, and with them front points (in 9 of these
    300 graphs)."""
    rng = random.Random(seed)
    g = oracle.random_graph(rng, max_nodes=9, name=f"wide{seed}")
    for n in g["nodes"]:
        for key in ("device_ms", "edge_ms"):
            n[key] = min(1e7, rng.choice([1e7, 1e3, 1.0, 1e-3, 1e-9]) * rng.uniform(1.0, 2.0))
    pm = PlanMap.build(CostGraph.from_dict(g))
    for i, ex in enumerate(g["exits"]):
        need = frozenset(oracle.needed(g, ex["name"]))
        points = {_topological_sums(g, ex["name"], d) for d in oracle.ideals(g, ex["name"]) if d != need}
        front = {p for p in points if not any(q != p and _weakly_below(q, p) for q in points)}
        front.add(_topological_sums(g, ex["name"], need))  # E = ∅ pays no per-request constants
        cs = pm.cands[i]
        assert sorted(zip(cs.dev_l, cs.bytes_l, cs.edge_l, strict=True)) == sorted(front), ex["name"]
