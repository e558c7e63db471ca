"""A plan-map build belongs to the planner's cache, not to the request that started it: against
the real Redis at 127.0.0.1:6379 (a unique key prefix per test), a request cancelled during a
build leaves the build running, its map cached and its build slot held until it ends."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import random
import signal
import time
import tracemalloc
from typing import Any

import pytest

from dapdee.costgraph import CostGraph
from dapdee.planner.planmaps import PROGRESSIVE, approx_bytes
from dapdee.planning import PlanMap, PlanRequest
from dapdee.planning.progressive import ProgressiveMap
from tests.test_planner_store import chain_graph, running, sample, settings, wide_graph

BUDGET_S = 1.5  # the wide graph's build is cut short by it (unbudgeted it takes 10-20 s)


def test_a_cancelled_request_leaves_its_build_to_finish_and_be_cached(planner_prefix: str) -> None:
    """The only request for a map is cancelled 0.3 s into its build. The build still ends (one
    build counted) and its map is kept: the next request is answered at once, not by a second
    build of the budget's length."""

    async def go() -> None:
        async with running(settings(planner_prefix, planmap_build_budget_s=BUDGET_S)) as s:
            st = (await s.model_writer.put_graph(wide_graph())).state
            first = asyncio.create_task(s.planmaps.get("wide", st, None, None))
            await asyncio.sleep(0.3)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            deadline = time.monotonic() + BUDGET_S + 30.0
            while sample(s, "dapdee_planner_planmap_builds_total", result="over_budget") < 1:
                assert time.monotonic() < deadline, "the build of the cancelled request never ended"
                await asyncio.sleep(0.05)
            t0 = time.monotonic()
            pm = await s.planmaps.get("wide", st, None, None)
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
            st = (await s.model_writer.put_graph(wide_graph())).state
            first = asyncio.create_task(s.planmaps.get("wide", st, None, None))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(s.planmaps.get("wide", st, None, None))
            await asyncio.sleep(0.3)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            pm = await second
            assert pm.over_budget
            assert sample(s, "dapdee_planner_cache_misses_total") == 1
            assert sample(s, "dapdee_planner_planmap_builds_total", result="over_budget") == 1

    asyncio.run(go())


def test_a_build_process_that_dies_leaves_the_map_cut_short_and_the_next_build_a_new_process(
    planner_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The build process is killed (as the OOM killer would) while it builds: the request gets
    the thread's map, cut short (not an error), and the next map is built in a new process
    (before, the broken pool failed every later build that needed a process with a 500)."""

    async def build_process(other_than: set[int]) -> multiprocessing.Process:
        deadline = time.monotonic() + 20
        while not (new := [p for p in multiprocessing.active_children() if p.pid not in other_than]):
            assert time.monotonic() < deadline, "no build process started"
            await asyncio.sleep(0.05)
        return new[0]

    async def go() -> None:
        async with running(settings(planner_prefix, planmap_build_budget_s=BUDGET_S)) as s:
            before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
            st = (await s.model_writer.put_graph(wide_graph())).state
            first = asyncio.create_task(s.planmaps.get("wide", st, None, None))
            builder = await build_process(before)
            await asyncio.sleep(0.2)
            os.kill(builder.pid, signal.SIGKILL)
            pm = await first
            assert pm.over_budget and pm.plan(PlanRequest(bandwidth_mbps=5.0, mode="throughput"))["approximate"]
            st = (await s.model_writer.put_graph(wide_graph(width=1999))).state
            second = asyncio.create_task(s.planmaps.get("wide", st, None, None))
            assert (await build_process(before | {builder.pid})).pid != builder.pid
            assert (await second).plan(PlanRequest(bandwidth_mbps=5.0))["exit"]["name"]
            assert sample(s, "dapdee_planner_planmap_builds_total", result="over_budget") == 2

    with caplog.at_level(logging.ERROR, logger="dapdee.planner"):
        asyncio.run(go())
    assert sum("a build process died" in r.getMessage() for r in caplog.records) == 1


def test_the_maps_in_process_memory_are_bounded_in_estimated_bytes(planner_prefix: str) -> None:
    """With room for about two maps' estimated bytes, the third map built evicts the least
    recently used; with room for none, the newest map still stays (alone)."""
    one = approx_bytes(PlanMap.build(chain_graph("m0", n=40)))

    async def built(cap: int) -> list[str]:
        async with running(settings(planner_prefix, None, planmap_cache_bytes=cap)) as s:
            hashes = {}
            for name in ("m0", "m1", "m2"):
                st = (await s.model_writer.put_graph(chain_graph(name, n=40))).state
                hashes[st.graph_hash] = name
                await s.planmaps.get(name, st, None, None)
            assert all(approx_bytes(pm) == one for pm in s.planmaps.maps.values())
            return [hashes[key[0]] for key in s.planmaps.maps]

    assert one > 40 * (5 + 150) and asyncio.run(built(int(2.5 * one))) == ["m1", "m2"]
    assert asyncio.run(built(1)) == ["m2"]


def random_dag(n: int, width: int, exits: int = 8, progressive: bool = False) -> CostGraph:
    """A random DAG of `n` nodes each reading up to `width` of the `width` before it, `exits`
    exits spread evenly; `progressive`: every exit but the last a confidence exit (threshold
    0.8), frames leaving evenly at each."""
    rng = random.Random(1)
    nodes = []
    for i in range(n):
        ins = ["x"] if i == 0 else [f"n{j}" for j in sorted(rng.sample(range(max(0, i - width), i), min(i, width)))]
        nodes.append(
            {"name": f"n{i}", "op": "", "inputs": ins, "out_bytes": 1000 + i, "device_ms": 1.0, "edge_ms": 0.1}
        )
    step = n // exits
    names = [f"e{k}" for k in range(exits)]
    graph: dict[str, Any] = {
        "model": "m",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 4000},
        "nodes": nodes,
        "exits": [
            {"name": e, "node": f"n{(k + 1) * step - 1}", "accuracy": 0.5 + k / 100} for k, e in enumerate(names)
        ],
    }
    if progressive:
        thresholds: dict[str, float | None] = {e: 0.8 for e in names[:-1]} | {names[-1]: None}
        by_exit = {
            e: {"fractions": {k: 1 / (i + 1) for k in names[: i + 1]}, "accuracy": 0.9} for i, e in enumerate(names)
        }
        graph["progressive"] = {"rule": "max_softmax", "split": "test", "thresholds": thresholds, "by_exit": by_exit}
    return CostGraph.from_dict(graph)


@pytest.mark.parametrize("kind", [PlanMap, ProgressiveMap])
@pytest.mark.parametrize(("n", "width"), [(800, 10), (400, 2)])
def test_a_maps_estimated_bytes_are_near_what_it_holds(kind: type, n: int, width: int) -> None:
    """`approx_bytes` against tracemalloc's count of a map's allocations (a plan map, and a
    confidence-exit map, which indexes its heads too), on random DAGs of 8 exits: within 25 %
    either way. (Counting candidates alone, it said a quarter of what the exits' indexed
    sub-graphs hold; it could not size a confidence-exit map at all.)"""
    graph = random_dag(n, width, progressive=kind is ProgressiveMap)
    kind.build(graph)  # first use: the allocations that stay (caches, imports) are not the map's
    gc.collect()
    tracemalloc.start()
    try:
        pm = kind.build(graph)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0.8 <= approx_bytes(pm) / held <= 1.25, (approx_bytes(pm), held)


def test_a_confidence_exit_map_is_counted_and_evicted_like_any_other(planner_prefix: str) -> None:
    """The cache holds a confidence-exit map (P bytes) and then two plan maps (c bytes each,
    c < P) with room for P + c: each is counted in the cache's bytes, so the third map built
    evicts the least recently used, the confidence-exit map. (The cache once failed to size a
    confidence-exit map: it stayed uncounted, and evictions broke.)"""
    calibrated = random_dag(120, 3, exits=4, progressive=True)
    p, c = approx_bytes(ProgressiveMap.build(calibrated)), approx_bytes(PlanMap.build(chain_graph("m1", n=120)))
    assert p > c

    async def go() -> list[tuple[str, bool]]:
        async with running(settings(planner_prefix, None, planmap_cache_bytes=p + c)) as s:
            names = {}
            st = (await s.model_writer.put_graph(calibrated)).state
            names[st.graph_hash] = "m"
            assert isinstance(await s.planmaps.get("m", st, None, None, progressive=True), ProgressiveMap)
            for name in ("m1", "m2"):
                st = (await s.model_writer.put_graph(chain_graph(name, n=120))).state
                names[st.graph_hash] = name
                await s.planmaps.get(name, st, None, None)
            return [(names[key[0]], key[2].endswith(PROGRESSIVE)) for key in s.planmaps.maps]

    assert asyncio.run(go()) == [("m1", False), ("m2", False)]
