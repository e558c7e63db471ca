"""Progressive (confidence) exits: plans priced by their expected cost.

The brute force here writes the execution model out frame by frame (each side walks the graph in
order, computing its own nodes and checking its heads; a confident frame leaves) over every
downward-closed device set of every planned exit, and reuses `tests/oracle.py` for the ideals,
the plain pricing and the design's walk. The planner (`dapdee.planning.progressive`) must give
the brute-force optimum. Also: hand-worked chains, "no heads" = the ordinary plan, the cost
graph's `progressive` field, the request flag, the CLI, and the re-calibrated artifacts.
"""

from __future__ import annotations

import copy
import json
import math
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.models import progressive_of
from dapdee.planning import PlanMapError, PlanRequest, make_plan
from dapdee.planning.progressive import ProgressiveMap, Sums, pareto4
from dapdee.planning.progressive import plan as progressive_plan
from dapdee.training import confidence as C
from tests import oracle

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["fmnist-alexnet", "fmnist-vgg16", "fmnist-resnet18", "fmnist-inception"]


# ---- the execution model, written out ----------------------------------------------------------------


def simulate(g: dict[str, Any], exit_name: str, dev: frozenset[str], cond: oracle.Cond) -> dict[str, Any]:
    """Run the progressive execution model for planned exit `exit_name` and device set `dev`:
    every leaving point with its probability and the time it takes, the device, uplink and edge
    busy time of a frame leaving there. Returns the expectations and the worst case."""
    nodes = {n["name"]: n for n in g["nodes"]}
    order = [n["name"] for n in g["nodes"]]
    exit_node = {e["name"]: e["node"] for e in g["exits"]}
    names = [e["name"] for e in g["exits"]]
    prog = g["progressive"]
    oh = g.get("overheads") or {}
    dr, er = oh.get("device_request_ms", 0.0), oh.get("edge_request_ms", 0.0)
    inp = g["input"]["name"]
    trunk = set(oracle.needed(g, exit_name))
    heads = [k for k in names[: names.index(exit_name)] if prog["thresholds"].get(k) is not None]
    # sides: a head on the device needs its trunk nodes there and every shallower head there
    side, all_dev = {}, True
    for k in heads:
        all_dev = all_dev and (set(oracle.needed(g, k)) & trunk) <= dev
        side[k] = "device" if all_dev else "edge"
    dev_side, edge_side, owned = set(dev), trunk - dev, set(trunk)
    for k in heads:
        own = set(oracle.needed(g, k)) - owned
        owned |= own
        (dev_side if side[k] == "device" else edge_side).update(own)
    sent = {u for v in edge_side for u in nodes[v]["inputs"] if u == inp or u in dev_side}
    sent |= {exit_node[k] for k in heads if side[k] == "edge" and exit_node[k] in dev_side}
    sent_bytes = sum(g["input"]["bytes"] if u == inp else nodes[u]["out_bytes"] for u in sent)

    def walk(mine: set[str], tier: str, checks: list[str]) -> tuple[dict[str, float], float]:
        """Walk the graph in order computing `mine`; a head is checked once its exit node and
        those of the shallower heads in `checks` have been passed. (check times, total)."""
        t, at, pending = 0.0, {}, list(checks)
        for v in order:
            if v in mine:
                t += nodes[v][f"{tier}_ms"]
            while pending and order.index(exit_node[pending[0]]) <= order.index(v):
                at[pending.pop(0)] = t
        return at, t

    q = prog["by_exit"][exit_name]["fractions"]
    dev_at, dev_total = walk(dev_side, "device", [k for k in heads if side[k] == "device"])
    edge_at, edge_total = walk(edge_side, "edge", [k for k in heads if side[k] == "edge"])
    sd, se = 1.0 / (1.0 - cond.device_load), 1.0 / (1.0 - cond.edge_load)
    uplink = sent_bytes * 8 / (cond.bandwidth_mbps * 1000)
    outcomes = []  # (probability, latency, device busy, uplink busy, edge busy)
    for k in heads:
        if side[k] == "device":
            outcomes.append((q[k], dev_at[k] * sd, dev_at[k] * sd, 0.0, 0.0))
    uses_edge = bool(trunk - dev)
    for k in [*[h for h in heads if side[h] == "edge"], exit_name]:
        if not uses_edge:  # no edge at all: the frame leaves at e on the device
            outcomes.append((q[k], dev_total * sd, dev_total * sd, 0.0, 0.0))
            continue
        d = (dev_total + dr) * sd
        e = ((edge_at[k] if k != exit_name else edge_total) + er) * se
        outcomes.append((q[k], d + uplink + cond.rtt_ms + e, d, uplink, e))
    exp = [sum(o[0] * o[i] for o in outcomes) for i in range(1, 5)]
    bott = max(exp[1:])
    return {
        "latency": exp[0],
        "bottleneck": bott,
        "fps": 1000 / bott if bott > 0 else math.inf,
        "worst": outcomes[-1][1],
        "reach": sum(q[k] for k in [*heads, exit_name] if side.get(k, "edge") == "edge") if uses_edge else 0.0,
        "side": side,
        "sent": {u: (g["input"]["bytes"] if u == inp else nodes[u]["out_bytes"]) for u in sent},
    }


def brute_force(g: dict[str, Any], req: oracle.Req) -> oracle.Decision:
    """The design's walk (oracle.decide) over every planned exit and downward-closed set, each
    priced by `simulate`, with the outcomes' accuracies standing in for the exits'."""
    prices = {}
    for e in g["exits"]:
        prices[e["name"]] = []
        for d in oracle.ideals(g, e["name"]):
            s = simulate(g, e["name"], d, req.cond)
            p = oracle.price(g, e["name"], d, req.cond)
            prices[e["name"]].append(
                replace(p, latency_ms=s["latency"], bottleneck_ms=s["bottleneck"], throughput_fps=s["fps"])
            )
    g2 = copy.deepcopy(g)
    for e in g2["exits"]:
        e["accuracy"] = g["progressive"]["by_exit"][e["name"]]["accuracy"]
    return oracle.decide(g2, req, prices)


def check_progressive_plan(g: dict[str, Any], plan: dict[str, Any], req: oracle.Req) -> dict[str, Any]:
    """The plan's partition is an ideal of its exit, and its expected and worst-case numbers,
    head sides and transfers are the execution model's for it. Returns the simulation."""
    ex = plan["exit"]["name"]
    dev = frozenset(plan["device_nodes"])
    assert oracle.is_ideal(g, ex, dev) and dev | set(plan["edge_nodes"]) == set(oracle.needed(g, ex))
    s = simulate(g, ex, dev, req.cond)
    pr = plan["predicted"]
    assert oracle.close(pr["expected_latency_ms"], s["latency"], 1e-7), (pr, s)
    assert oracle.close(pr["expected_bottleneck_ms"], s["bottleneck"], 1e-7)
    assert oracle.close(pr["latency_ms"], s["worst"], 1e-7) and pr["expected_latency_ms"] <= pr["latency_ms"] * (
        1 + 1e-9
    )
    assert {h["exit"]: h["side"] for h in plan["progressive"]["heads"]} == s["side"]
    assert {t["node"]: t["bytes"] for t in plan["transfer"]} == s["sent"]
    assert oracle.close(plan["progressive"]["edge_fraction"], s["reach"], 1e-9)
    assert pr["accuracy"] == g["progressive"]["by_exit"][ex]["accuracy"]
    return s


# ---- random graphs with heads ---------------------------------------------------------------------------


def with_progressive(rng: random.Random, g: dict[str, Any], active: float = 0.7) -> dict[str, Any]:
    """`g` with random thresholds (null with probability 1 − active) and, per planned exit, random
    fractions over its active shallower exits and itself (summing to 1) and a random accuracy."""
    names = [e["name"] for e in g["exits"]]
    th = {k: (round(rng.uniform(0.3, 0.95), 3) if rng.random() < active else None) for k in names[:-1]}
    th[names[-1]] = None
    by_exit = {}
    for i, e in enumerate(names):
        keys = [k for k in names[:i] if th[k] is not None] + [e]
        w = [rng.choice([0.0, rng.random(), rng.random()]) for _ in keys]
        w[-1] += 0.05
        fr = {k: x / sum(w) for k, x in zip(keys, w, strict=True)}
        acc = None if rng.random() < 0.1 else round(rng.uniform(0.5, 0.99), 4)
        by_exit[e] = {"fractions": fr, "accuracy": acc}
    g = copy.deepcopy(g)
    g["progressive"] = {"rule": "max_softmax", "split": "test", "thresholds": th, "by_exit": by_exit}
    if rng.random() < 0.4:
        g["overheads"] = {
            "device_request_ms": round(rng.uniform(0, 3), 3),
            "edge_request_ms": round(rng.uniform(0, 5), 3),
        }
    return g


def random_case(seed: int, max_nodes: int = 9) -> dict[str, Any]:
    """A random DAG (oracle.random_graph) with often more exits, sometimes not in topological
    order (a deeper exit's node computed before a shallower one's), and random heads."""
    rng = random.Random(seed)
    g = oracle.random_graph(rng, max_nodes=max_nodes, name=f"prog{seed}")
    if len(g["exits"]) < 3 and rng.random() < 0.7:  # more exits, so more heads
        picks = sorted(rng.sample(range(len(g["nodes"])), min(len(g["nodes"]), rng.randint(2, 5))))
        if rng.random() < 0.3:
            picks[:-1] = rng.sample(picks[:-1], len(picks) - 1)
        g["exits"] = [{"name": f"e{j}", "node": f"n{i}", "accuracy": 0.5 + 0.1 * j} for j, i in enumerate(picks)]
    return with_progressive(rng, g)


def request(r: oracle.Req) -> PlanRequest:
    """The oracle's request as a PlanRequest asking for confidence exits."""
    return PlanRequest(
        **vars(r.cond),
        latency_budget_ms=r.latency_budget_ms,
        min_accuracy=r.min_accuracy,
        frame_rate=r.frame_rate,
        mode=r.mode,
        confidence_exits=True,
    )


N_GRAPHS, REQS = 70, 8


def test_planner_is_the_brute_force_optimum() -> None:
    """Every answer: the walk's exit, mode and met flag, and the optimal expected value of its
    objective, over all downward-closed sets of all planned exits; its numbers are the model's."""
    seen = {"latency": 0, "throughput": 0, "device_head": 0, "edge_head": 0, "met": 0, "fragile": 0}
    for seed in range(N_GRAPHS):
        g = random_case(seed)
        pm = ProgressiveMap.build(CostGraph.from_dict(g))
        assert pm.exact
        rng = random.Random(1000 + seed)
        for _ in range(REQS):
            r = oracle.random_request(rng)
            want = brute_force(g, r)
            plan = pm.plan(request(r))
            s = check_progressive_plan(g, plan, r)
            value = s["latency"] if want.value_key == "latency_ms" else s["bottleneck"]
            if want.fragile:
                seen["fragile"] += 1
                continue
            assert (plan["mode"], plan["exit"]["name"], plan["constraints_met"]) == (want.mode, want.exit, want.met)
            assert oracle.close(value, want.value, 1e-7), (seed, want.value_key, value, want.value)
            seen[want.mode] += 1
            seen["met"] += want.met
            sides = [h["side"] for h in plan["progressive"]["heads"]]
            seen["device_head"] += "device" in sides
            seen["edge_head"] += "edge" in sides
    total = N_GRAPHS * REQS - seen["fragile"]
    assert seen["fragile"] < total // 10 and min(seen["latency"], seen["throughput"]) >= total // 10
    assert total // 10 <= seen["met"] <= total - total // 10
    assert min(seen["device_head"], seen["edge_head"]) >= total // 20, seen


def test_a_plain_plan_map_refuses_a_request_for_confidence_exits() -> None:
    """The plain plan map does not price heads: asked for confidence exits it says so (it
    answered a plain plan under the progressive request's plan_id)."""
    g = CostGraph.from_dict(random_case(0))
    req = request(oracle.random_request(random.Random(7)))
    with pytest.raises(ValueError, match="confidence_exits"):
        make_plan(g, req)
    assert "progressive" in progressive_plan(g, req)  # the progressive planner answers it


def test_a_pinned_progressive_plan_is_priced_as_the_planner_priced_it() -> None:
    """A plan made with confidence exits, read back as a pinned plan (`--plan FILE`) under the
    conditions it was made for, keeps the planner's worst case, bottleneck and expected latency
    (it kept the trunk cut's price, which leaves out the heads' compute and what they send)."""
    from dapdee.costmodel import Conditions
    from dapdee.device.plans import plan_from_json

    checked = 0
    for seed in range(80):
        g = CostGraph.from_dict(random_case(seed))
        r = oracle.random_request(random.Random(500 + seed))
        answer = progressive_plan(g, request(r))
        if not answer["edge_nodes"] or not answer["progressive"]["heads"]:
            continue
        pinned = plan_from_json(answer, g, Conditions(**vars(r.cond)))
        got = (pinned.predicted_ms, pinned.bottleneck_ms, pinned.expected_ms)
        p = answer["predicted"]
        want = (p["latency_ms"], p["bottleneck_ms"], p["expected_latency_ms"])
        assert got == pytest.approx(want, rel=1e-6, abs=1e-3), (seed, got, want)
        checked += 1
    assert checked >= 10


def test_every_partition_is_priced_like_the_model() -> None:
    """Not just the optimum: each front point's expected latency is the simulation's, and no
    downward-closed set beats the front's best under random conditions (both objectives)."""
    for seed in range(200, 230):
        g = random_case(seed, max_nodes=8)
        pm = ProgressiveMap.build(CostGraph.from_dict(g))
        rng = random.Random(seed)
        cond = oracle.random_request(rng).cond
        conditions = PlanRequest(**vars(cond)).conditions()
        for cs, e in zip(pm.cands, g["exits"], strict=True):
            exp = [cs.expected(i, conditions) for i in range(len(cs))]
            sims = [simulate(g, e["name"], frozenset(cs.describe(i)[0]), cond) for i in range(len(cs))]
            for p, s in zip(exp, sims, strict=True):
                assert oracle.close(p.latency_ms, s["latency"], 1e-7) and oracle.close(
                    p.bottleneck_ms, s["bottleneck"], 1e-7
                )
            every = [simulate(g, e["name"], d, cond) for d in oracle.ideals(g, e["name"])]
            for key in ("latency", "bottleneck"):
                assert oracle.close(min(s[key] for s in sims), min(s[key] for s in every), 1e-7), (seed, e, key)


def test_front_of_four_sums() -> None:
    """pareto4 keeps exactly the points no other point weakly dominates in (a, s, c, p), one of
    each group of equal points, whatever the order of p (small integers: many ties)."""
    rng = random.Random(5)
    for _ in range(300):
        pts = [tuple(float(rng.randint(0, 3)) for _ in range(4)) for _ in range(rng.randint(1, 25))]
        cols = [np.array(c) for c in zip(*pts, strict=True)]
        zero = np.zeros(len(pts))
        keep = pareto4(Sums(*cols, zero, zero, zero, zero.astype(np.int64)))
        want = {x for x in pts if not any(y != x and all(b <= a for a, b in zip(x, y, strict=True)) for y in pts)}
        assert sorted(pts[i] for i in keep) == sorted(want), (pts, keep)


# ---- hand-worked chain --------------------------------------------------------------------------------


def node(name: str, inputs: list[str], dev: float, edge: float, out: int) -> dict[str, Any]:
    """A cost-graph node with its device_ms, edge_ms and out_bytes."""
    return {"name": name, "op": "op", "inputs": inputs, "out_bytes": out, "device_ms": dev, "edge_ms": edge}


def chain() -> dict[str, Any]:
    """x (4000 B) -> a -> b -> c -> d (final); head h1 (exit1) reads a, head h2 (exit2) reads c.
    Graph order a, h1, b, c, h2, d. Thresholds 0.8, 0.7; planned final: 50 % leave at exit1,
    30 % at exit2, 20 % at final. Overheads: 0.5 ms per request on the device, 1 ms on the edge.
    (device_ms, edge_ms, out_bytes): a (4, 1, 2000), h1 (1, 0.5, 40), b (4, 1, 1000),
    c (8, 2, 1000), h2 (1, 0.5, 40), d (8, 2, 40)."""

    return {
        "model": "chain",
        "input": {"name": "x", "shape": [1, 4], "bytes": 4000},
        "nodes": [
            node("a", ["x"], 4, 1, 2000),
            node("h1", ["a"], 1, 0.5, 40),
            node("b", ["a"], 4, 1, 1000),
            node("c", ["b"], 8, 2, 1000),
            node("h2", ["c"], 1, 0.5, 40),
            node("d", ["c"], 8, 2, 40),
        ],
        "exits": [
            {"name": "exit1", "node": "h1", "accuracy": 0.7},
            {"name": "exit2", "node": "h2", "accuracy": 0.85},
            {"name": "final", "node": "d", "accuracy": 0.93},
        ],
        "overheads": {"device_request_ms": 0.5, "edge_request_ms": 1.0},
        "progressive": {
            "rule": "max_softmax",
            "split": "test",
            "thresholds": {"exit1": 0.8, "exit2": 0.7, "final": None},
            "by_exit": {
                "exit1": {"fractions": {"exit1": 1.0}, "accuracy": 0.7},
                "exit2": {"fractions": {"exit1": 0.5, "exit2": 0.5}, "accuracy": 0.8},
                "final": {"fractions": {"exit1": 0.5, "exit2": 0.3, "final": 0.2}, "accuracy": 0.9},
            },
        },
    }


# B = 8 Mbit/s: 1000 bytes take 1 ms; rtt 2 ms; no load. Planned exit final, expected latency:
# D = {a,b,c,d}: all on the device; h1 checked at 4+1 = 5, h2 at 5+4+8+1 = 18, d at 26:
#   0.5·5 + 0.3·18 + 0.2·26 = 13.1
# D = {a,b,c}: both heads on the device (5, 18); send c (1 ms); the final's 20 %: 18 + 0.5 + 1 + 2
#   + (2 + 1) = 24.5: 2.5 + 5.4 + 4.9 = 12.8
# D = {a,b}: h1 on the device (5), h2 on the edge; send b (1 ms); device total 9; base 9 + 0.5 + 1
#   + 2 = 12.5; edge: c 2, h2 0.5 -> 2.5, d 2 -> 4.5; 0.5·5 + 0.3·(12.5+2.5+1) + 0.2·(12.5+4.5+1)
#   = 2.5 + 4.8 + 3.6 = 10.9
# D = {a}: h1 on the device (5), h2 on the edge; send a (2000 B: 2 ms); base 5 + 0.5 + 2 + 2 = 9.5;
#   edge: b 1, c 2, h2 0.5 -> 3.5, d 2 -> 5.5; 2.5 + 0.3·(9.5+3.5+1) + 0.2·(9.5+5.5+1)
#   = 2.5 + 4.2 + 3.2 = 9.9   <- the optimum: one head on each side
# D = {}: both heads on the edge; send x (4 ms); base 0 + 0.5 + 4 + 2 = 6.5; edge: a 1, h1 0.5 -> 1.5,
#   b 1, c 2, h2 0.5 -> 5, d 2 -> 7; 0.5·(6.5+1.5+1) + 0.3·(6.5+5+1) + 0.2·(6.5+7+1)
#   = 4.5 + 3.75 + 2.9 = 11.15
# The static plan (no confidence exits) of the final exit: D = {} at 0.5 + 4 + 2 + 6 + 1 = 13.5.
CHAIN_COND = {"bandwidth_mbps": 8.0, "rtt_ms": 2.0}


def test_chain_latency_by_hand() -> None:
    g = CostGraph.from_dict(chain())
    plan = progressive_plan(g, PlanRequest(**CHAIN_COND, mode="latency", confidence_exits=True))
    assert plan["exit"]["name"] == "final" and plan["device_nodes"] == ["a"]
    assert plan["edge_nodes"] == ["b", "c", "d"] and plan["transfer"] == [{"node": "a", "bytes": 2000}]
    pr = plan["predicted"]
    assert pr["expected_latency_ms"] == pytest.approx(9.9)
    # expected stages: device 0.5·5 + 0.5·(5+0.5) = 5.25; uplink 0.5·2 = 1, transfer 1 + 0.5·2 = 2;
    # edge 0.3·(3.5+1) + 0.2·(5.5+1) = 2.65; bottleneck 5.25
    assert pr["expected_device_ms"] == pytest.approx(5.25) and pr["expected_transfer_ms"] == pytest.approx(2.0)
    assert pr["expected_edge_ms"] == pytest.approx(2.65) and pr["expected_bottleneck_ms"] == pytest.approx(5.25)
    assert pr["expected_throughput_fps"] == pytest.approx(1000 / 5.25)
    # worst case: a frame past both heads: device 5 + 0.5, transfer 2 + 2, edge 5.5 + 1: 16
    assert (pr["latency_ms"], pr["device_ms"], pr["transfer_ms"], pr["edge_ms"]) == pytest.approx((16, 5.5, 4, 6.5))
    assert pr["accuracy"] == 0.9 and plan["exit"]["accuracy"] == 0.93
    heads = plan["progressive"]["heads"]
    assert [(h["exit"], h["side"], h["nodes"], h["fraction"]) for h in heads] == [
        ("exit1", "device", ["h1"], 0.5),
        ("exit2", "edge", ["h2"], 0.3),
    ]
    assert plan["progressive"]["edge_fraction"] == pytest.approx(0.5) and plan["progressive"]["exit_fraction"] == 0.2
    static = make_plan(g, PlanRequest(**CHAIN_COND, mode="latency"))
    assert static["device_nodes"] == [] and static["predicted"]["latency_ms"] == pytest.approx(13.5)
    # a budget of 9 ms is beyond the final's 9.9: exit2 (fractions 0.5/0.5) is next. Its best:
    # D = {a}: h1 device (5), base 9.5, edge b 1, c 2, h2 0.5 -> 3.5: 2.5 + 0.5·(9.5+3.5+1) = 9.5;
    # D = {}: 0.5·9 + 0.5·(6.5+5+1) = 10.75; D = {a,b,c,h2}: 2.5 + 0.5·18 = 11.5; {a,b}: 2.5 + 0.5·
    # (12.5 + 2.5 + 1) = 10.5. Nothing meets 9 (exit1 alone: D = {a,h1} 5, meets)
    budget = progressive_plan(
        g, PlanRequest(**CHAIN_COND, latency_budget_ms=9.0, mode="latency", confidence_exits=True)
    )
    assert budget["exit"]["name"] == "exit1" and budget["constraints_met"] is True
    assert budget["predicted"]["expected_latency_ms"] == pytest.approx(5.0)
    tight = progressive_plan(g, PlanRequest(**CHAIN_COND, latency_budget_ms=9.6, mode="latency", confidence_exits=True))
    assert tight["exit"]["name"] == "exit2" and tight["predicted"]["expected_latency_ms"] == pytest.approx(9.5)


# Throughput, same conditions: expected (device, uplink, edge) per D, bottleneck = the max:
# {a,b,c,d}: (13.1, 0, 0) 13.1; {a,b,c}: (2.5 + 5.4 + 0.2·18.5 = 11.6, 0.2, 0.2·3 = 0.6) 11.6;
# {a,b}: (2.5 + 0.5·9.5 = 7.25, 0.5, 0.3·3.5 + 0.2·5.5 = 2.15) 7.25; {a}: (5.25, 1, 2.65) 5.25;
# {}: (0.5, 4, 0.5·2.5 + 0.3·6 + 0.2·8 = 4.65) 4.65  <- the optimum, both heads on the edge


def test_chain_throughput_by_hand() -> None:
    g = CostGraph.from_dict(chain())
    plan = progressive_plan(g, PlanRequest(**CHAIN_COND, mode="throughput", frame_rate=200.0, confidence_exits=True))
    assert plan["mode"] == "throughput" and plan["exit"]["name"] == "final" and plan["device_nodes"] == []
    assert plan["predicted"]["expected_bottleneck_ms"] == pytest.approx(4.65) and plan["constraints_met"] is True
    assert plan["predicted"]["expected_latency_ms"] == pytest.approx(11.15)
    assert [h["side"] for h in plan["progressive"]["heads"]] == ["edge", "edge"]
    # 1000/4.65 = 215.05 fps: 216 fps is not sustained at final; exit2's best bottleneck:
    # D = {}: (0.5, 4, 0.5·2.5 + 0.5·6 = 4.25) 4.25 -> 235 fps, meets
    faster = progressive_plan(g, PlanRequest(**CHAIN_COND, mode="throughput", frame_rate=216.0, confidence_exits=True))
    assert faster["exit"]["name"] == "exit2" and faster["predicted"]["expected_bottleneck_ms"] == pytest.approx(4.25)


def test_head_sides_keep_the_exit_order() -> None:
    """x -> a -> b -> d (final); head h1 reads b, head h2 reads only a. With D = {a}, h2's trunk is
    on the device but the shallower h1's is not: h2 goes to the edge too (checked after h1), and
    its producer a is sent with it. D = {a} is forced by a fast device and a slow uplink for b."""

    g = {
        "model": "order",
        "input": {"name": "x", "shape": [1], "bytes": 100000},
        "nodes": [
            node("a", ["x"], 1, 1, 10),
            node("b", ["a"], 100, 1, 10),
            node("h1", ["b"], 1, 1, 4),
            node("h2", ["a"], 1, 1, 4),
            node("d", ["b"], 1, 1, 4),
        ],
        "exits": [{"name": "e1", "node": "h1"}, {"name": "e2", "node": "h2"}, {"name": "final", "node": "d"}],
        "progressive": {
            "thresholds": {"e1": 0.5, "e2": 0.5},
            "by_exit": {
                "e1": {"fractions": {"e1": 1.0}, "accuracy": None},
                "e2": {"fractions": {"e1": 0.2, "e2": 0.8}, "accuracy": None},
                "final": {"fractions": {"e1": 0.2, "e2": 0.3, "final": 0.5}, "accuracy": None},
            },
        },
    }
    pm = ProgressiveMap.build(CostGraph.from_dict(g))
    plan = pm.plan(PlanRequest(bandwidth_mbps=1.0, mode="latency", confidence_exits=True))
    assert plan["device_nodes"] == ["a"]
    assert [h["side"] for h in plan["progressive"]["heads"]] == ["edge", "edge"]
    assert plan["transfer"] == [{"node": "a", "bytes": 10}] and plan["progressive"]["edge_fraction"] == 1.0
    check_progressive_plan(g, plan, oracle.Req(oracle.Cond(1.0), mode="latency"))


# ---- no heads: the ordinary plan ---------------------------------------------------------------------


def test_without_heads_progressive_is_the_ordinary_plan() -> None:
    """All thresholds null: every planned exit's outcome is (e: 1), so the expected cost is the
    worst case and the walk is the ordinary one (the outcome's accuracy = the exit's)."""
    for seed in range(300, 340):
        rng = random.Random(seed)
        g = with_progressive(rng, oracle.random_graph(rng, 8, f"flat{seed}"), active=0.0)
        for e in g["exits"]:
            g["progressive"]["by_exit"][e["name"]]["accuracy"] = e["accuracy"]
        graph = CostGraph.from_dict(g)
        pm = ProgressiveMap.build(graph)
        for _ in range(5):
            r = oracle.random_request(rng)
            prog, plain = pm.plan(request(r)), make_plan(graph, replace(request(r), confidence_exits=False))
            want = oracle.decide(g, r)
            if want.fragile:
                continue
            pr, pp = prog["predicted"], plain["predicted"]
            assert (prog["mode"], prog["exit"], prog["constraints_met"]) == (
                plain["mode"],
                plain["exit"],
                plain["constraints_met"],
            )
            assert prog["progressive"]["heads"] == [] and prog["plan_id"] != plain["plan_id"]
            assert pr["expected_latency_ms"] == pytest.approx(pr["latency_ms"], rel=1e-9)
            assert pr["expected_bottleneck_ms"] == pytest.approx(pr["bottleneck_ms"], rel=1e-9)
            key = "latency_ms" if prog["mode"] == "latency" else "bottleneck_ms"
            assert pr[key] == pytest.approx(pp[key], rel=1e-9)


def test_device_only_wins_an_exact_latency_tie_as_in_the_ordinary_plan() -> None:
    """One node of 2 ms on either side, nothing sent, no round trip: Device-Only and Edge-Only
    tie exactly at 2 ms. In latency mode Device-Only wins the tie (the ordinary plan's rule), so
    the confidence-exit plan keeps the node on the device as the ordinary plan does (its front
    listed Device-Only last, and the first of equals was Edge-Only)."""
    g = {
        "model": "tie",
        "input": {"name": "x", "shape": [1, 3], "bytes": 0},
        "nodes": [{"name": "a", "inputs": ["x"], "out_bytes": 40, "device_ms": 2.0, "edge_ms": 2.0}],
        "exits": [{"name": "final", "node": "a", "accuracy": 0.9}],
        "progressive": {
            "rule": "max_softmax",
            "split": "test",
            "thresholds": {"final": None},
            "by_exit": {"final": {"fractions": {"final": 1.0}, "accuracy": 0.9}},
        },
    }
    graph = CostGraph.from_dict(g)
    req = PlanRequest(bandwidth_mbps=8.0, rtt_ms=0.0, mode="latency")
    plain = make_plan(graph, req)
    prog = ProgressiveMap.build(graph).plan(replace(req, confidence_exits=True))
    assert plain["device_nodes"] == prog["device_nodes"] == ["a"]
    assert prog["predicted"]["latency_ms"] == pytest.approx(2.0)


# ---- approximate beyond the cap, serialisation, requests -----------------------------------------------


def test_capped_map_is_approximate_and_consistent() -> None:
    for seed in range(400, 415):
        g = random_case(seed, max_nodes=9)
        pm = ProgressiveMap.build(CostGraph.from_dict(g), cap=2)
        rng = random.Random(seed)
        r = oracle.random_request(rng, "latency")
        plan = pm.plan(request(r))
        check_progressive_plan(g, plan, r)
        names = [e["name"] for e in g["exits"]]
        counts = {n: sum(1 for _ in oracle.ideals(g, n)) for n in names}
        # the walk consults the exits from the deepest down to its answer, or all when none meets
        consulted = names[names.index(plan["exit"]["name"]) :] if plan["constraints_met"] else names
        assert plan["approximate"] is any(counts[n] > 2 for n in consulted)
        # never better than the optimum over every set of the chosen exit
        best = min(
            simulate(g, plan["exit"]["name"], d, r.cond)["latency"] for d in oracle.ideals(g, plan["exit"]["name"])
        )
        assert plan["predicted"]["expected_latency_ms"] >= best * (1 - 1e-9)


def test_map_round_trips_and_rejects_tampering() -> None:
    graph = CostGraph.from_dict(random_case(7))
    pm = ProgressiveMap.build(graph)
    again = ProgressiveMap.from_bytes(pm.to_bytes())
    rng = random.Random(7)
    for _ in range(10):
        req = request(oracle.random_request(rng))
        assert again.plan(req) == pm.plan(req)
    d = json.loads(pm.to_bytes())
    d["exits"][-1]["masks"] = ["ff" * 8]
    with pytest.raises(PlanMapError, match="masks"):
        ProgressiveMap.from_bytes(json.dumps(d).encode())
    with pytest.raises(PlanMapError, match="schema"):
        ProgressiveMap.from_bytes(b'{"schema": 1}')


def test_request_flag_and_missing_calibration() -> None:
    r = PlanRequest(bandwidth_mbps=5.0)
    assert r.key() == (5.0, 0.0, 0.0, 0.0, None, None, None, "auto")  # unchanged: plan ids stay
    assert PlanRequest(bandwidth_mbps=5.0, confidence_exits=True).key() == (*r.key(), "confidence_exits")
    with pytest.raises(ValueError, match="confidence_exits"):
        PlanRequest(bandwidth_mbps=5.0, confidence_exits="yes").validate()  # type: ignore[arg-type]
    bare = chain()
    del bare["progressive"]
    with pytest.raises(ValueError, match="confidence_exits: model 'chain'"):
        progressive_plan(CostGraph.from_dict(bare), PlanRequest(bandwidth_mbps=5.0, confidence_exits=True))
    assert (
        progressive_plan(CostGraph.from_dict(bare), r)["plan_id"] == make_plan(CostGraph.from_dict(bare), r)["plan_id"]
    )
    with pytest.raises(ValueError, match="confidence_exits"):
        ProgressiveMap.build(CostGraph.from_dict(chain())).plan(r)


def test_cli_plan_confidence_exits(tmp_path: Path) -> None:
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(chain()))
    args = [
        sys.executable,
        "-m",
        "dapdee.cli",
        "plan",
        "--profile",
        str(path),
        "--bandwidth-mbps",
        "8",
        "--rtt-ms",
        "2",
    ]
    p = subprocess.run([*args, "--mode", "latency", "--confidence-exits"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["predicted"]["expected_latency_ms"] == pytest.approx(9.9)
    bare = chain()
    del bare["progressive"]
    path.write_text(json.dumps(bare))
    p = subprocess.run([*args, "--confidence-exits"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "confidence_exits" in p.stderr and p.stderr.count("\n") == 1


# ---- the cost graph field --------------------------------------------------------------------------------


def test_cost_graph_progressive_field() -> None:
    g = CostGraph.from_dict(chain())
    assert CostGraph.from_json(g.to_json()) == g and g.progressive is not None
    bare = chain()
    del bare["progressive"]
    plain = CostGraph.from_dict(bare)
    assert "progressive" not in plain.to_dict() and plain.progressive is None
    assert plain.structure_key() == g.structure_key() and plain.content_hash() != g.content_hash()
    for path, value, match in [
        (("by_exit", "final", "fractions", "final"), 0.3, "must sum to 1"),
        (("by_exit", "exit2", "fractions"), {"exit2": 1.0}, r"expected the exits \['exit1', 'exit2'\]"),
        (("thresholds", "nope"), 0.5, "unknown exits"),
        (("thresholds", "exit1"), 1.5, r"progressive.thresholds.exit1: expected a number in \[0, 1\]"),
        (("by_exit", "final", "accuracy"), "high", "progressive.by_exit.final.accuracy"),
        (("by_exit", "final", "fractions", "exit1"), float("nan"), "progressive.by_exit.final.fractions.exit1"),
        (("extra",), 1, "unknown fields"),
    ]:
        bad = chain()
        d = bad["progressive"]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        with pytest.raises(CostGraphError, match=match):
            CostGraph.from_dict(bad)
    bad = chain()
    del bad["progressive"]["by_exit"]["exit1"]
    with pytest.raises(CostGraphError, match="one entry per exit"):
        CostGraph.from_dict(bad)


def test_progressive_documents_match_the_schemas() -> None:
    """The cost graph with `progressive` and the plans with `progressive` and `expected_*`
    satisfy the published JSON Schemas; a fraction above 1 fails naming the field."""
    from tests.test_schemas import assert_invalid_at, assert_valid

    g = CostGraph.from_dict(chain())
    assert_valid("cost-graph", g.to_dict())
    for mode, extra in (("latency", {}), ("throughput", {"frame_rate": 200.0}), ("auto", {"frame_rate": 1e4})):
        plan = progressive_plan(g, PlanRequest(**CHAIN_COND, mode=mode, confidence_exits=True, **extra))
        assert_valid("plan", plan)
    bad = chain()
    bad["progressive"]["by_exit"]["final"]["fractions"]["exit1"] = 1.5
    assert_invalid_at("cost-graph", bad, "exit1")


# ---- calibration: the per-planned-exit outcomes ----------------------------------------------------------


def test_by_exit_outcomes_by_hand() -> None:
    """Four frames, three exits, thresholds 0.8 (exit1), inactive (exit2), 0.6 (exit3), final.
    Confidences per frame: exit1 [0.9, 0.5, 0.5, 0.5], exit3 [-, 0.7, 0.5, 0.9]. The full rule:
    frame 0 leaves at exit1, 1 and 3 at exit3, 2 at final. Truncated at exit3 (planned exit3):
    frame 0 at exit1, the rest at exit3. Correct: exit1 [1, 0, 0, 0], exit2 [1, 1, 1, 1],
    exit3 [0, 1, 0, 0], final [0, 1, 1, 1]."""
    conf = torch.tensor([[0.9, 0.5, 0.5, 0.5], [0.9, 0.9, 0.9, 0.9], [0.5, 0.7, 0.5, 0.9], [0.9] * 4])
    right = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    out = C.by_exit_outcomes(conf, right, [0.8, None, 0.6, None], ["exit1", "exit2", "exit3", "final"])
    assert out["exit1"] == {"fractions": {"exit1": 1.0}, "accuracy": 0.25}
    # planned exit2: frame 0 at exit1 (right), 1-3 at exit2 (right): 4/4
    assert out["exit2"] == {"fractions": {"exit1": 0.25, "exit2": 0.75}, "accuracy": 1.0}
    # planned exit3: frame 0 exit1 (right), frames 1-3 exit3: only frame 1 right: 2/4
    assert out["exit3"] == {"fractions": {"exit1": 0.25, "exit3": 0.75}, "accuracy": 0.5}
    # planned final: exit1 {0}, exit3 {1, 3}, final {2}: right 0 (exit1), 1 (exit3), 2 (final): 3/4
    assert out["final"] == {"fractions": {"exit1": 0.25, "exit3": 0.5, "final": 0.25}, "accuracy": 0.75}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_artifacts_record_per_exit_outcomes(name: str) -> None:
    m = json.loads((REPO / "artifacts" / name / "manifest.json").read_text())
    ce = m["confidence_exits"]
    names = [e["name"] for e in m["exits"]]
    for split in ("calib", "test"):
        by_exit = ce[split]["by_exit"]
        assert list(by_exit) == names
        for i, e in enumerate(names):
            fr = by_exit[e]["fractions"]
            assert list(fr) == [k for k in names[:i] if ce["thresholds"][k] is not None] + [e]
            assert math.fsum(fr.values()) == pytest.approx(1.0, abs=1e-12)
            assert all(0 <= q <= 1 for q in fr.values()) and 0 <= by_exit[e]["accuracy"] <= 1
            # the shallow fractions are the whole rule's: truncation changes only who leaves at e
            assert all(fr[k] == pytest.approx(ce[split]["exit_fraction"][k], abs=1e-12) for k in list(fr)[:-1])
        assert by_exit[names[-1]]["accuracy"] == pytest.approx(ce[split]["accuracy"], abs=1e-12)
        # exit1 alone, as training measured it (within 2 samples: thread-dependent argmax ties)
        assert by_exit[names[0]]["accuracy"] == pytest.approx(
            m["exits"][0]["accuracy" if split == "test" else "calib_accuracy"], abs=2 / m["splits"][split]
        )
    prog = progressive_of(m)
    assert prog is not None and prog.split == m["accuracy_split"] == "test"
    assert dict(prog.thresholds) == ce["thresholds"]


def test_device_only_keeps_an_exact_expected_latency_tie() -> None:
    """Graph order a, h, b, c; the head `early` at h reads a, threshold 0, so every frame
    leaves there (q_early = 1). Device-Only and the split D = {a} both cost a + h = 6 ms
    expected (h runs on the device either way); worst case Device-Only 16 ms, the split
    6 + 3.2 (4,000 B at 10 Mbit/s) + 5 ms rtt + 2 ms of edge = 16.2 ms. In latency mode
    Device-Only wins an exact tie (as the ordinary plan does); it used to be dropped from the
    front as the split's equal, and the plan sent frames nowhere but named a worker."""

    def node(name: str, inputs: list[str], dev: float, edge: float, out: int = 4000) -> dict[str, Any]:
        return {"name": name, "op": "x", "inputs": inputs, "out_bytes": out, "device_ms": dev, "edge_ms": edge}

    g = {
        "model": "m",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 10000},
        "nodes": [
            node("a", ["x"], 5, 1),
            node("h", ["a"], 1, 0.1, 40),
            node("b", ["a"], 5, 1),
            node("c", ["b"], 5, 1, 40),
        ],
        "exits": [{"name": "early", "node": "h", "accuracy": 0.7}, {"name": "final", "node": "c", "accuracy": 0.9}],
        "progressive": {
            "thresholds": {"early": 0.0},
            "by_exit": {
                "early": {"fractions": {"early": 1.0}, "accuracy": 0.7},
                "final": {"fractions": {"early": 1.0, "final": 0.0}, "accuracy": 0.7},
            },
        },
    }
    pm = ProgressiveMap.build(CostGraph.from_dict(g))
    assert pm.cands[1].masks[0] == pm.cands[1].hs.st.full  # Device-Only is in the final exit's front
    for bw, rtt in ((10.0, 5.0), (1.0, 50.0)):
        p = pm.plan(PlanRequest(bandwidth_mbps=bw, rtt_ms=rtt, confidence_exits=True, mode="latency"))
        assert p["exit"]["name"] == "final" and p["edge_nodes"] == [], p
        assert p["predicted"]["expected_latency_ms"] == pytest.approx(6.0)
        assert p["predicted"]["latency_ms"] == pytest.approx(16.0)
