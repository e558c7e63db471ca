"""Values that cannot cross the network (`"sendable": false`, DESIGN.md §3.1 and §4.1).

A traced model's non-tensor values (the `size` node of `x.view(x.size(0), -1)`: a Python int; a
`torch.Size`; the tuple of `torch.chunk`) are marked by the tracer, carried by the cost graph's
JSON and the planner's upload, and never cross a plan's cut: the plan map, the min-cut, the
progressive map and every baseline keep such a node on the side that reads it. Checked against
the independent oracle (tests/oracle.py prices a partition sending one at infinite bytes) on the
traced models and on random DAGs, and end to end: a device runtime splitting a traced
`x.view(x.size(0), -1)` model with a real edge worker gets every frame answered by the edge.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.costmodel import Conditions, partition
from dapdee.models import LoadedModel, load_model
from dapdee.planning import BASELINES, MODES, PlanMap, PlanMapError, PlanRequest, baseline_plan
from dapdee.planning.enumerate import ExitStructure
from dapdee.planning.mincut import min_latency_mask, weight_grid_masks
from dapdee.planning.progressive import ProgressiveMap
from dapdee.testing import serve_app_in_thread
from tests import oracle
from tests.test_planning import SETTINGS, arbitrary_dags, check_capped, series_parallel, to_oracle
from tests.test_progressive import check_progressive_plan, random_case, request, simulate

SHAPE = (1, 3, 16, 16)


# ---- traced models ----------------------------------------------------------------------------------


class FlatCNN(nn.Module):
    """conv-relu-pool, then `x.view(x.size(0), -1)` for an early head; conv-relu-pool again and
    the same `size` for the final classifier: one int node read by both exits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 8 * 8, 10)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool(torch.relu(self.conv1(x)))
        n = x.size(0)
        early = self.head(x.view(n, -1))
        y = self.pool(torch.relu(self.conv2(x)))
        return early, self.fc(y.view(n, -1))


class TupleCNN(nn.Module):
    """A tuple of tensors (`torch.chunk`), a `torch.Size` (`x.size()`) and an int read off it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fa = nn.Linear(2 * 8 * 8, 10)
        self.fb = nn.Linear(2 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        a, b = torch.chunk(x, 2, dim=1)
        s = x.size()
        return self.fa(a.reshape(s[0], -1)) + self.fb(torch.flatten(b, 1))


class FlattenCNN(nn.Module):
    """The same without non-tensor values: `torch.flatten` is one tensor node."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2), 1))


def flat_cnn() -> nn.Module:
    torch.manual_seed(0)
    return FlatCNN()


def tuple_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TupleCNN()


def flatten_cnn() -> nn.Module:
    torch.manual_seed(0)
    return FlattenCNN()


@pytest.fixture(scope="module")
def traced() -> dict[str, LoadedModel]:
    return {name: load_model(f"tests.test_unsendable:{name}", input_shape=SHAPE) for name in ("flat_cnn", "tuple_cnn")}


def unsendable(g: CostGraph | dict[str, Any]) -> set[str]:
    nodes = g.to_dict()["nodes"] if isinstance(g, CostGraph) else g["nodes"]
    return {n["name"] for n in nodes if n.get("sendable", True) is False}


def tempting_timings(graph: CostGraph, rng: random.Random) -> CostGraph:
    """Random timings in which computing an unsendable node on the device is often much cheaper
    than on the edge (what makes sending it look attractive), random exit accuracies."""
    bad = unsendable(graph)
    dev, edge = {}, {}
    for n in graph.nodes:
        dev[n.name] = 0.0 if n.name in bad and rng.random() < 0.7 else round(rng.uniform(0.01, 8.0), 4)
        edge[n.name] = round(rng.uniform(2.0, 30.0), 4) if n.name in bad else round(rng.uniform(0.01, 1.5), 4)
    g = graph.with_timings("device", dev).with_timings("edge", edge)
    return g.with_accuracies({e.name: round(0.6 + 0.1 * i + rng.uniform(0, 0.05), 4) for i, e in enumerate(g.exits)})


def without_marks(g: dict[str, Any]) -> dict[str, Any]:
    """`g` with every node sendable: the planning problem before the field existed."""
    g = copy.deepcopy(g)
    for n in g["nodes"]:
        n.pop("sendable", None)
    return g


def crosses(g: dict[str, Any], price: oracle.Price) -> bool:
    return bool(unsendable(g) & set(price.transfer))


# ---- the tracer and the cost graph JSON ---------------------------------------------------------------


def test_tracer_marks_the_values_that_are_not_tensors(traced: dict[str, LoadedModel]) -> None:
    """Exactly the nodes whose traced value is not a tensor are `sendable: false`: the int of
    `x.size(0)`, the torch.Size of `x.size()` and the int read off it, chunk's tuple; tensor-only
    graphs (torch.flatten) carry no `sendable` key at all, so they serialise as before."""
    flat, tup = traced["flat_cnn"].graph, traced["tuple_cnn"].graph
    assert unsendable(flat) == {"size"} == traced["flat_cnn"].executor.scalar_nodes
    assert flat.node("size").out_bytes == 8 and flat.node("size").shape is None
    ops = {n.op for n in tup.nodes if not n.sendable}
    assert {"chunk", "size", "getitem"} <= ops, ops
    assert unsendable(tup) == {n.name for n in tup.nodes if n.shape is None}
    plain = load_model("tests.test_unsendable:flatten_cnn", input_shape=SHAPE).graph
    assert all(n.sendable for n in plain.nodes) and all("sendable" not in n for n in plain.to_dict()["nodes"])


def test_cost_graph_json_round_trip(traced: dict[str, LoadedModel], tmp_path: Path) -> None:
    """`sendable: false` survives to_dict/to_json/from_json and save/load, is written only where
    false, and is part of the content hash and of the structure two profiles must share."""
    g = traced["flat_cnn"].graph
    d = g.to_dict()
    assert [n["name"] for n in d["nodes"] if "sendable" in n] == ["size"]
    assert next(n for n in d["nodes"] if n["name"] == "size")["sendable"] is False
    assert CostGraph.from_json(g.to_json()) == g
    path = tmp_path / "g.json"
    g.save(str(path))
    back = CostGraph.load(str(path))
    assert back == g and unsendable(back) == {"size"} and back.content_hash() == g.content_hash()
    plain = CostGraph.from_dict(without_marks(d))
    assert plain.content_hash() != g.content_hash() and plain.structure_key() != g.structure_key()
    explicit = copy.deepcopy(d)
    explicit["nodes"][0]["sendable"] = True  # the default, accepted and not written back
    assert CostGraph.from_dict(explicit) == g


@pytest.mark.parametrize("bad", ["no", None, 0, 1, [False], {"value": False}])
def test_a_bad_sendable_names_the_field(traced: dict[str, LoadedModel], bad: Any, tmp_path: Path) -> None:
    d = traced["flat_cnn"].graph.to_dict()
    i = next(i for i, n in enumerate(d["nodes"]) if n["name"] == "size")
    d["nodes"][i]["sendable"] = bad
    with pytest.raises(CostGraphError, match=rf"nodes\[{i}\] \(size\)\.sendable: expected true or false"):
        CostGraph.from_dict(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(CostGraphError, match=rf"bad\.json: nodes\[{i}\] \(size\)\.sendable"):
        CostGraph.load(str(path))


def test_a_partition_sending_an_unsendable_value_is_refused(traced: dict[str, LoadedModel]) -> None:
    """The cost model builds no partition in which `size` is computed on the device and read on
    the edge; the same cut with `size` on the edge, or with its readers on the device, is fine.
    The device refuses a planner answer naming such a cut (an old planner's)."""
    from dapdee.device.plans import PlanError, plan_from_answer

    g = tempting_timings(traced["flat_cnn"].graph, random.Random(0))
    trunk = ["conv1", "relu", "pool"]
    with pytest.raises(CostGraphError, match="'size' is not sendable.*'view'"):
        partition(g, "exit1", [*trunk, "size"])
    assert partition(g, "exit1", trunk).transfer == (("pool", g.node("pool").out_bytes),)
    assert partition(g, "exit1", [*trunk, "size", "view"]).transfer == (("view", g.node("view").out_bytes),)
    st_ = ExitStructure.build(g, 0)
    bad = sum(1 << st_.nodes.index(n) for n in [*trunk, "size"])
    assert not st_.feasible(bad) and st_.sums(bad)[1] == math.inf
    answer = baseline_plan(g, PlanRequest(bandwidth_mbps=5.0), "edge-only")
    answer.update(
        exit={"name": "exit1", "accuracy": g.exit("exit1").accuracy},
        device_nodes=[*trunk, "size"],
        edge_nodes=["view", "head"],
        transfer=[{"node": "pool", "bytes": 1024}, {"node": "size", "bytes": 8}],
    )
    with pytest.raises(PlanError, match="plan.device_nodes: .*'size' is not sendable"):
        plan_from_answer(answer, g, 5.0, 0.0)


# ---- plans of the traced models against the oracle ----------------------------------------------------


def _final_only(g: dict[str, Any]) -> dict[str, Any]:
    return {**g, "exits": [g["exits"][-1]]}


def check_baselines(g: dict[str, Any], graph: CostGraph, req: PlanRequest) -> None:
    """Every baseline's plan is feasible and priced as the oracle prices it; Neurosurgeon and
    Edgent are the oracle's walk over the feasible prefix splits, DADS (latency) over every
    feasible partition of the final exit."""
    r = to_oracle(req)
    for name in BASELINES:
        plan = baseline_plan(graph, req, name)
        gg = g if name == "edgent" else _final_only(g)
        oracle.check_consistent(gg, plan, r.cond)
        if name in ("neurosurgeon", "edgent"):
            want = oracle.decide(gg, r, oracle.all_prices(gg, r.cond, "prefixes"))
        elif name == "dads" and plan["mode"] == "latency":
            want = oracle.decide(gg, replace(r, mode="latency"))
        else:
            continue
        if not want.fragile:
            oracle.check_plan(gg, plan, r if name != "dads" else replace(r, mode="latency"), want)


def check_graph(g: dict[str, Any], reqs: list[oracle.Req]) -> dict[str, int]:
    """The exact plan map, a capped one (min-cut latency answers, approximate throughput), and
    every baseline against the oracle for each request in each mode. Counts the checks and how
    often the optimum over all partitions, unsendable values ignored, would send one."""
    graph = CostGraph.from_dict(g)
    pm, capped = PlanMap.build(graph), PlanMap.build(graph, cap=1)
    assert PlanMap.from_bytes(pm.to_bytes()).to_bytes() == pm.to_bytes()
    seen = {"exact": 0, "tempted": 0, "split": 0}
    for r in reqs:
        prices = oracle.all_prices(g, r.cond)
        free = oracle.all_prices(without_marks(g), r.cond)
        for mode in MODES:
            rm = replace(r, mode=mode)
            req = PlanRequest(**vars(r.cond), latency_budget_ms=r.latency_budget_ms, min_accuracy=r.min_accuracy,
                              frame_rate=r.frame_rate, mode=mode)  # fmt: skip
            want = oracle.decide(g, rm, prices)
            plan = pm.plan(req)
            oracle.check_consistent(g, plan, r.cond)
            if not want.fragile:
                oracle.check_plan(g, plan, rm, want)
                seen["exact"] += 1
            seen["tempted"] += crosses(g, oracle.decide(without_marks(g), rm, free).choice)
            seen["split"] += bool(plan["device_nodes"] and plan["edge_nodes"])
            check_capped(g, capped, req)
            check_baselines(g, graph, req)
    return seen


@pytest.mark.parametrize("model", ["flat_cnn", "tuple_cnn"])
def test_traced_plans_never_send_an_unsendable_value(traced: dict[str, LoadedModel], model: str) -> None:
    """Many random timings and requests: the plan map's plans (exact), the capped map's
    (min-cut latency, approximate throughput), and every baseline's are feasible and what the
    oracle's walk over the feasible partitions gives; where it is decided, the optimum that
    ignores sendability would often have sent one (the old planner's answer)."""
    rng = random.Random(7)
    seen = {"exact": 0, "tempted": 0, "split": 0}
    for _ in range(12):
        g = tempting_timings(traced[model].graph, rng).to_dict()
        for k, v in check_graph(g, [oracle.random_request(rng) for _ in range(4)]).items():
            seen[k] += v
    assert seen["exact"] >= 100 and seen["tempted"] >= 10 and seen["split"] >= 10, seen


def test_min_cuts_keep_unsendable_values_home(traced: dict[str, LoadedModel]) -> None:
    """The min-cut of every exit is the oracle's latency optimum over feasible partitions, and
    every weight-grid min-cut (DADS's throughput search) is feasible."""
    rng = random.Random(3)
    for model in ("flat_cnn", "tuple_cnn"):
        for _ in range(20):
            graph = tempting_timings(traced[model].graph, rng)
            g = graph.to_dict()
            r = oracle.random_request(rng)
            cond = Conditions(**vars(r.cond))
            for i, ex in enumerate(graph.exits):
                s = ExitStructure.build(graph, i)
                mask = min_latency_mask(s, cond)
                assert s.feasible(mask)
                dev = {n for k, n in enumerate(s.nodes) if (mask >> k) & 1}
                got = oracle.price(g, ex.name, dev, r.cond).latency_ms
                best = oracle.best([oracle.price(g, ex.name, d, r.cond) for d in oracle.ideals(g, ex.name)], "latency")
                assert oracle.close(got, best.latency_ms), (model, ex.name, got, best)
                assert all(s.feasible(m) for m in weight_grid_masks(s, cond))


# ---- random DAGs with unsendable nodes -----------------------------------------------------------------


def test_random_dags_agree_with_the_oracle() -> None:
    """Seeded random DAGs (oracle.random_graph) with about a third of the nodes unsendable."""
    seen = {"exact": 0, "tempted": 0, "split": 0}
    for seed in range(60):
        rng = random.Random(seed)
        g = oracle.random_graph(rng, max_nodes=8, name=f"uns{seed}", unsendable=0.35)
        for k, v in check_graph(g, [oracle.random_request(rng) for _ in range(3)]).items():
            seen[k] += v
    assert seen["exact"] >= 400 and seen["tempted"] >= 15, seen


@st.composite
def marked(draw: st.DrawFn, base: st.SearchStrategy[CostGraph]) -> dict[str, Any]:
    """A graph of `base` with a drawn subset of its nodes `sendable: false`."""
    g = draw(base).to_dict()
    for n in g["nodes"]:
        if draw(st.booleans()):
            n["sendable"] = False
    return g


oracle_requests = st.builds(
    oracle.Req,
    st.builds(oracle.Cond, st.floats(0.01, 1000.0), st.floats(0.0, 50.0), st.floats(0.0, 0.95), st.floats(0.0, 0.95)),
    st.one_of(st.none(), st.floats(0.1, 150.0)),
    st.one_of(st.none(), st.floats(0.0, 1.0)),
    st.one_of(st.none(), st.floats(1.0, 2000.0)),
)


@SETTINGS
@given(
    st.one_of(marked(arbitrary_dags()), marked(series_parallel())), st.lists(oracle_requests, min_size=1, max_size=2)
)
def test_hypothesis_dags_agree_with_the_oracle(g: dict[str, Any], reqs: list[oracle.Req]) -> None:
    check_graph(g, reqs)


def test_a_stored_map_sending_an_unsendable_value_is_refused(traced: dict[str, LoadedModel]) -> None:
    graph = tempting_timings(traced["flat_cnn"].graph, random.Random(1))
    d = json.loads(PlanMap.build(graph).to_bytes())
    s = ExitStructure.build(graph, 0)
    bad = sum(1 << s.nodes.index(n) for n in ["conv1", "relu", "pool", "size"])
    ex = d["exits"][0]
    ex["masks"].append(format(bad, "x"))
    for key, v in zip(("device_ms", "bytes", "edge_ms"), s.sums(bad), strict=True):
        ex[key].append(v if key != "bytes" else 1032)
    with pytest.raises(PlanMapError, match="'size' is not sendable"):
        PlanMap.from_bytes(json.dumps(d).encode())


# ---- progressive plans -------------------------------------------------------------------------------


def _progressive_optimum(g: dict[str, Any], req: oracle.Req) -> oracle.Decision:
    """tests/test_progressive.py's brute force, a partition sending an unsendable value (trunk
    or head) priced infinite."""
    bad = unsendable(g)
    prices = {}
    for e in g["exits"]:
        prices[e["name"]] = []
        for d in oracle.ideals(g, e["name"]):
            s = simulate(g, e["name"], d, req.cond)
            lat, bott = (math.inf, math.inf) if bad & set(s["sent"]) else (s["latency"], s["bottleneck"])
            p = oracle.price(without_marks(g), e["name"], d, req.cond)
            fps = 1000 / bott if bott > 0 else math.inf
            prices[e["name"]].append(replace(p, latency_ms=lat, bottleneck_ms=bott, throughput_fps=fps))
    g2 = copy.deepcopy(g)
    for e in g2["exits"]:
        e["accuracy"] = g["progressive"]["by_exit"][e["name"]]["accuracy"]
    return oracle.decide(g2, req, prices)


def test_progressive_plans_never_send_an_unsendable_value() -> None:
    """Random DAGs with calibrated heads and unsendable nodes: each progressive plan sends no
    unsendable value (trunk or head) and is the brute-force optimum over the feasible sets."""
    checked = 0
    for seed in range(30):
        rng = random.Random(500 + seed)
        g = random_case(seed)
        for n in g["nodes"]:
            if rng.random() < 0.3:
                n["sendable"] = False
        pm = ProgressiveMap.build(CostGraph.from_dict(g))
        assert ProgressiveMap.from_bytes(pm.to_bytes()).to_bytes() == pm.to_bytes()
        for _ in range(5):
            r = oracle.random_request(rng)
            plan = pm.plan(request(r))
            assert not unsendable(g) & {t["node"] for t in plan["transfer"]}, plan["transfer"]
            s = check_progressive_plan(without_marks(g), plan, r)
            want = _progressive_optimum(g, r)
            if want.fragile:
                continue
            assert (plan["mode"], plan["exit"]["name"], plan["constraints_met"]) == (want.mode, want.exit, want.met)
            value = s["latency"] if want.value_key == "latency_ms" else s["bottleneck"]
            assert oracle.close(value, want.value, 1e-7), (seed, want.value_key, value, want.value)
            checked += 1
    assert checked >= 100


# ---- the planner service and the whole path ------------------------------------------------------------

TOKENS = {"admin_token": "uns-admin-" + "a" * 16, "device_token": "uns-device-" + "d" * 16}


def _auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role + '_token']}"}


def test_planner_upload_carries_sendable(traced: dict[str, LoadedModel]) -> None:
    """PUT /models/{model} keeps `sendable: false` (GET answers it back) and its plans never send
    the node; a non-boolean is a 422 naming the field."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    graph = tempting_timings(traced["flat_cnn"].graph, random.Random(5))
    body = graph.to_dict()
    i = next(i for i, n in enumerate(body["nodes"]) if n["name"] == "size")
    with serve_app_in_thread(create_app(Settings(redis_url=None, **TOKENS))) as url, httpx.Client(base_url=url) as c:
        bad = copy.deepcopy(body)
        bad["nodes"][i]["sendable"] = "no"
        r = c.put(f"/models/{graph.model}", json=bad, headers=_auth("admin"))
        assert r.status_code == 422 and ["body", "nodes", i, "sendable"] in [e["loc"] for e in r.json()["errors"]]
        assert c.put(f"/models/{graph.model}", json=body, headers=_auth("admin")).status_code == 201
        got = c.get(f"/models/{graph.model}", headers=_auth("admin")).json()
        assert got["nodes"][i]["sendable"] is False and CostGraph.from_dict(got) == graph
        for bw in (0.05, 0.5, 5.0, 50.0):
            plan = c.post("/plan", json={"model": graph.model, "bandwidth_mbps": bw}, headers=_auth("device")).json()
            assert "size" not in {t["node"] for t in plan["transfer"]}, plan


def test_a_device_splits_a_traced_view_size_model_with_the_edge(traced: dict[str, LoadedModel]) -> None:
    """The whole path on `x.view(x.size(0), -1)`: timings under which the optimum ignoring
    sendability computes `size` on the device and sends it; the planner's plan (checked by the
    device as a planner answer) is a split that sends the pooled tensor only (the edge computes
    `size` from it), and a real device runtime with a real edge worker gets every frame answered
    by the edge, as the model answers locally."""
    from dapdee.device.compute import TorchCompute
    from dapdee.device.config import Requirements, RuntimeConfig
    from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
    from dapdee.device.plan_source import FixedPlanSource
    from dapdee.device.plans import plan_from_answer
    from dapdee.device.runtime import DeviceRuntime
    from dapdee.device.sensing import Sensing
    from dapdee.device.types import Frame
    from dapdee.edge_worker.app import create_app
    from dapdee.edge_worker.config import Settings

    m = traced["flat_cnn"]
    dev = {n.name: 50.0 for n in m.graph.nodes} | {"conv1": 0.1, "relu": 0.1, "pool": 0.1, "size": 0.0}
    edge = {n.name: 0.1 for n in m.graph.nodes} | {"size": 20.0}
    graph = m.graph.with_timings("device", dev).with_timings("edge", edge)
    req = PlanRequest(bandwidth_mbps=0.5, mode="latency")
    free = oracle.decide(without_marks(graph.to_dict()), to_oracle(req))
    assert "size" in free.choice.transfer  # sending it would be cheapest
    answer = PlanMap.build(graph).plan(req)
    with serve_app_in_thread(create_app(Settings(models=""), [m])) as url:
        plan = replace(plan_from_answer(answer, graph, 0.5, 0.0), edge_worker=url)
        sensing = Sensing(prior_mbps=5.0, fixed_load=0.0)
        link = EdgeLink(graph, WorkerTrust(None, [url]), sensing, backoff=Backoff(0.5, 8.0))
        runtime = DeviceRuntime(graph, TorchCompute(m, 1.0), FixedPlanSource(plan),
                                config=RuntimeConfig(Requirements(mode="latency")), sensing=sensing, edge=link,
                                edge_url=url)  # fmt: skip
        torch.manual_seed(4)
        xs = [torch.randn(*SHAPE) for _ in range(3)]

        async def go() -> list[Any]:
            async with runtime:
                records = await runtime.run([Frame(x) for x in xs])
            await link.aclose()
            runtime.compute.close()
            return records

        records = asyncio.run(go())
    assert [r.where for r in records] == ["edge"] * 3, ([r.error for r in records], answer["transfer"])
    assert answer["exit"]["name"] == "final" and answer["device_nodes"] and answer["edge_nodes"]
    assert "size" in answer["edge_nodes"] and [t["node"] for t in answer["transfer"]] == ["pool"]
    with torch.inference_mode():
        expected = [int(m.run_exit(x, "final").argmax()) for x in xs]
    assert [r.pred_class for r in records] == expected
