"""A plan-map build belongs to the planner's cache, not to the request that started it: against
the real Redis at 127.0.0.1:6379 (a unique key prefix per test), a request cancelled during a
build leaves the build running, its map cached and its build slot held until it ends."""

from __future__ import annotations

import asyncio
import time

import pytest

from dapdee.planning import PlanRequest
from tests.test_planner_store import running, sample, settings, wide_graph

BUDGET_S = 1.5  # the wide graph's build is cut short by it (unbudgeted it takes 10-20 s)


def test_a_cancelled_request_leaves_its_build_to_finish_and_be_cached(planner_prefix: str) -> None:
    """The only request for a map is cancelled 0.3 s into its build. The build still ends (one
    build counted) and its map is kept: the next request is answered at once, not by a second
    build of the budget's length."""

    async def go() -> None:
        async with running(settings(planner_prefix, planmap_build_budget_s=BUDGET_S)) as s:
            st = (await s.put_graph(wide_graph())).state
            first = asyncio.create_task(s.planmap("wide", st, None, None))
            await asyncio.sleep(0.3)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            deadline = time.monotonic() + BUDGET_S + 30.0
            while sample(s, "dapdee_planner_planmap_builds_total", result="over_budget") < 1:
                assert time.monotonic() < deadline, "the build of the cancelled request never ended"
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            pm = await s.planmap("wide", st, None, None)
            assert time.monotonic() - t0 < 0.2
            # answered by the first build (cached, or just ending): no second look-up missed
            assert sample(s, "dapdee_planner_cache_misses_total") == 1
            assert sample(s, "dapdee_planner_planmap_builds_total", result="over_budget") == 1
            assert pm.plan(PlanRequest(bandwidth_mbps=5.0))["exit"]["name"]

    asyncio.run(go())


def test_a_request_cancelled_while_another_waits_does_not_start_a_second_build(planner_prefix: str) -> None:
    """Two requests for one map; the one that started the build is cancelled. The other gets the
    map of that same build: one look-up missed the caches (one build started), one build ended."""

    async def go() -> None:
        async with running(settings(planner_prefix, planmap_build_budget_s=BUDGET_S)) as s:
            st = (await s.put_graph(wide_graph())).state
            first = asyncio.create_task(s.planmap("wide", st, None, None))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(s.planmap("wide", st, None, None))
            await asyncio.sleep(0.3)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            pm = await second
            assert pm.over_budget
            assert sample(s, "dapdee_planner_cache_misses_total") == 1
            assert sample(s, "dapdee_planner_planmap_builds_total", result="over_budget") == 1

    asyncio.run(go())


def test_the_maps_in_process_memory_are_bounded_in_estimated_bytes(planner_prefix: str) -> None:
    """With room for about two maps' estimated bytes, the third map built evicts the least
    recently used; with room for none, the newest map still stays (alone)."""
    from dapdee.planner.planmaps import approx_bytes
    from dapdee.planning import PlanMap
    from tests.test_planner_store import chain_graph

    one = approx_bytes(PlanMap.build(chain_graph("m0", n=40)))

    async def built(cap: int) -> list[str]:
        async with running(settings(planner_prefix, None, planmap_cache_bytes=cap)) as s:
            hashes = {}
            for name in ("m0", "m1", "m2"):
                st = (await s.put_graph(chain_graph(name, n=40))).state
                hashes[st.graph_hash] = name
                await s.planmap(name, st, None, None)
            assert all(approx_bytes(pm) == one for pm in s.planmaps.maps.values())
            return [hashes[key[0]] for key in s.planmaps.maps]

    assert one > 40 * (5 + 150) and asyncio.run(built(int(2.5 * one))) == ["m1", "m2"]
    assert asyncio.run(built(1)) == ["m2"]


def test_a_maps_estimated_bytes_are_near_what_it_holds() -> None:
    """`approx_bytes` against tracemalloc's count of a map's allocations, on a random DAG of 800
    nodes each reading up to 10 of the 10 before it, 8 exits: within 25 % either way. (Counting
    candidates alone, it said a quarter of what the exits' indexed sub-graphs hold.)"""
    import gc
    import random
    import tracemalloc

    from dapdee.costgraph import CostGraph
    from dapdee.planner.planmaps import approx_bytes
    from dapdee.planning import PlanMap

    rng = random.Random(1)
    nodes = []
    for i in range(800):
        ins = ["x"] if i == 0 else [f"n{j}" for j in sorted(rng.sample(range(max(0, i - 10), i), min(i, 10)))]
        node = {"name": f"n{i}", "op": "", "inputs": ins, "out_bytes": 1000 + i, "device_ms": 1.0, "edge_ms": 0.1}
        nodes.append(node)
    exits = [{"name": f"e{k}", "node": f"n{(k + 1) * 100 - 1}", "accuracy": 0.5 + k / 100} for k in range(8)]
    shape = {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 4000}
    graph = CostGraph.from_dict({"model": "m", "input": shape, "nodes": nodes, "exits": exits})
    PlanMap.build(graph)  # first use: the allocations that stay (caches, imports) are not the map's
    gc.collect()
    tracemalloc.start()
    try:
        pm = PlanMap.build(graph)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0.8 <= approx_bytes(pm) / held <= 1.25, (approx_bytes(pm), held)
