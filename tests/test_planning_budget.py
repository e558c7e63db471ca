"""Time budgets of plan-map builds (dapdee.planning): without a deadline a build is exactly the
unbudgeted one; with one, enumeration gives up like at the cap and the fallback keeps every
prefix split; wide graphs enumerate in memory that does not grow with the square of the width."""

from __future__ import annotations

import random
import time
import tracemalloc
from typing import Any

import pytest

from dapdee.costgraph import CostGraph
from dapdee.planning import PlanMap, PlanRequest
from dapdee.planning.enumerate import ExitStructure, enumerate_ideals, prefix_masks, prefix_sums
from tests import oracle
from tests.test_planner_store import wide_graph


def _graphs(n: int, seed: int = 3) -> list[CostGraph]:
    rng = random.Random(seed)
    return [CostGraph.from_dict(oracle.random_graph(rng, max_nodes=10, name=f"g{i}")) for i in range(n)]


def test_no_deadline_and_ample_deadline_change_nothing() -> None:
    for g in _graphs(40):
        for cap in (2, 100_000):
            plain = PlanMap.build(g, cap)
            assert PlanMap.build(g, cap, deadline_s=None).to_bytes() == plain.to_bytes()
            roomy = PlanMap.build(g, cap, deadline_s=60.0)
            assert roomy.to_bytes() == plain.to_bytes() and not roomy.over_budget


def test_deadline_must_be_a_duration() -> None:
    g = _graphs(1)[0]
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="deadline_s"):
            PlanMap.build(g, deadline_s=bad)


def test_enumeration_gives_up_at_its_deadline() -> None:
    st = ExitStructure.build(wide_graph(40, fan=40), 0)  # 2^40 ideals: only a deadline stops it
    t0 = time.monotonic()
    assert enumerate_ideals(st, 10**12, deadline=t0 + 0.2) is None
    assert time.monotonic() - t0 < 1.5
    small = ExitStructure.build(_graphs(1)[0], 0)  # under DEADLINE_EVERY ideals: never looks
    assert enumerate_ideals(small, 10**6, deadline=0.0) == enumerate_ideals(small, 10**6)


def test_an_exit_out_of_time_keeps_every_prefix_split() -> None:
    """Out of time during its enumeration, before any min-cut: the candidates are the Pareto
    front of the prefix splits, so each prefix split is weakly dominated by a kept candidate;
    plans say approximate."""
    g = wide_graph(300, fan=100)  # 2^300 ideals: the enumeration runs out of its 0.3 s
    pm = PlanMap.build(g, deadline_s=0.3)
    assert pm.over_budget and not pm.exact
    cs = pm.cands[0]
    devs, byts, edges = prefix_sums(cs.st)
    for d, b, e in zip(devs, byts, edges, strict=True):
        assert any(cd <= d and cb <= b and ce <= e for cd, cb, ce in zip(cs.dev_l, cs.bytes_l, cs.edge_l, strict=True))
    plan = pm.plan(PlanRequest(bandwidth_mbps=2.0, mode="throughput"))
    assert plan["approximate"] is True
    latency = pm.plan(PlanRequest(bandwidth_mbps=2.0, mode="latency"))  # latency: exact min-cut
    assert latency["approximate"] is False


def test_an_exit_reached_after_the_deadline_keeps_device_only_and_edge_only() -> None:
    """With no time left when an exit's turn comes, it gets Device-Only and Edge-Only alone
    (no prefix splits: their Pareto filtering costs O(m · (m + E)) on a large exit, and every
    exit left would pay it past the deadline); its throughput plans say approximate, its latency
    plans are still exact (a min-cut per request), as for any capped exit."""
    g = wide_graph(300, fan=100)
    pm = PlanMap.build(g, deadline_s=0.0)
    assert pm.over_budget and not pm.exact
    assert [sorted(cs.masks) for cs in pm.cands] == [[0, cs.st.full] for cs in pm.cands]
    assert pm.plan(PlanRequest(bandwidth_mbps=2.0, mode="throughput"))["approximate"] is True
    unbudgeted = PlanMap.build(g, cap=10)  # capped: its latency answer is the exact min-cut
    req = PlanRequest(bandwidth_mbps=2.0, mode="latency")
    assert pm.plan(req)["approximate"] is False and pm.plan(req)["device_nodes"] == unbudgeted.plan(req)["device_nodes"]


def deep_graph(model: str, n: int = 2048, fan: int = 30, exits: int = 64) -> dict[str, Any]:
    """A chain of `n` nodes, each also reading the `fan` nodes before it, with `exits` exits:
    within the planner's default caps, yet each exit's front holds all its prefix splits and
    indexing the exits alone takes seconds."""
    nodes = [
        {"name": f"n{i}", "op": "conv2d", "inputs": [f"n{j}" for j in range(max(0, i - fan), i)] or ["x"],
         "out_bytes": 4, "device_ms": 1.0, "edge_ms": 0.1}
        for i in range(n)
    ]  # fmt: skip
    ends = [{"name": f"e{k}", "node": f"n{(k + 1) * n // exits - 1}"} for k in range(exits)]
    return {"model": model, "input": {"name": "x", "shape": [1, 4], "bytes": 16}, "nodes": nodes, "exits": ends}


def test_the_exits_after_the_deadline_take_device_only_and_edge_only() -> None:
    """With a 0.2 s deadline the exits of `deep_graph` reached after it take device-only and
    edge-only (unbudgeted, the build takes seconds), and the map still plans."""
    pm = PlanMap.build(CostGraph.from_dict(deep_graph("deep")), deadline_s=0.2)
    sizes = [len(cs) for cs in pm.cands]
    assert pm.over_budget and sizes[0] > 2 and sum(k == 2 for k in sizes) >= len(sizes) // 2, sizes
    k = sizes.index(2)
    assert sorted(pm.cands[k].masks) == [0, pm.cands[k].st.full]
    assert pm.plan(PlanRequest(bandwidth_mbps=2.0, mode="throughput"))["approximate"] is True


def test_prefix_sums_match_the_cost_model_bit_for_bit() -> None:
    for g in _graphs(30, seed=8):
        for i in range(len(g.exits)):
            st = ExitStructure.build(g, i)
            got = list(zip(*prefix_sums(st), strict=True))
            assert got == [st.sums(m) for m in prefix_masks(st)]


def test_wide_enumeration_memory_is_not_quadratic() -> None:
    """4,000 parallel nodes, cap 5,000 ideals: a stack that copied each frame's candidate list
    held ~8 million list slots (64 MB) before the cap stopped it."""
    st = ExitStructure.build(wide_graph(4000, fan=250), 0)
    tracemalloc.start()
    try:
        assert enumerate_ideals(st, 5_000) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak
