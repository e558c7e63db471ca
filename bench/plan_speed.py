"""Planning speed: plan-map build, map size, per-request planning vs per-request min-cut.

For each zoo model (width 0.25, flops-derived synthetic timings: device_ms = flops·2e-7 + 0.02,
edge_ms = device_ms / 10) and a synthetic ~300-node Inception-like DAG, prints:

- plan-map build time, serialised size (bytes), downward-closed sets and Pareto front per exit;
- per-request DAPDEE planning time (median, p99) over N random requests (random mode, bandwidth,
  rtt, loads, budget, min accuracy, frame rate), full plan JSON built each time;
- per-request networkx min-cut (DADS-style, latency objective of the final exit) on fewer requests;
- ratio and PASS/FAIL against the targets: median <= 0.1 ms (zoo), >= 50x faster than min-cut,
  build <= 2 s (zoo).

Usage: python bench/plan_speed.py [--requests 10000] [--mincut-requests 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import numpy as np
from tqdm import tqdm

from dapdee.costgraph import CostGraph
from dapdee.planning import PlanMap, PlanRequest
from dapdee.planning.enumerate import ExitStructure
from dapdee.planning.mincut import min_latency_mask

ZOO = ("alexnet", "vgg16", "resnet18", "inception")
TARGET_MEDIAN_MS = 0.1
TARGET_RATIO = 50.0
TARGET_BUILD_S = 2.0


def synthetic_timings(graph: CostGraph, k1: float = 2e-7, c: float = 0.02, k: float = 10.0) -> CostGraph:
    """device_ms = flops·k1 + c, edge_ms = device_ms / k, exit accuracies rising with depth."""
    dev = {n.name: n.flops * k1 + c for n in graph.nodes}
    graph = graph.with_timings("device", dev).with_timings("edge", {n: v / k for n, v in dev.items()})
    return graph.with_accuracies({e.name: round(0.6 + 0.1 * i, 3) for i, e in enumerate(graph.exits)})


def inception_like(modules: int = 18, seed: int = 0) -> CostGraph:
    """A synthetic Inception-like DAG: a stem, `modules` blocks of four parallel branches
    (lengths 2, 4, 6, 3) concatenated, an exit head (4 nodes) after every third of the stack.
    18 modules give 301 nodes."""
    rng = random.Random(seed)
    nodes: list[dict] = []

    def add(name: str, inputs: list[str], out: int) -> str:
        dev = rng.uniform(0.05, 2.0)
        nodes.append(
            {
                "name": name,
                "op": "op",
                "inputs": inputs,
                "out_bytes": out,
                "device_ms": dev,
                "edge_ms": dev / 10,
            }
        )
        return name

    size = 32 * 32 * 4
    last = add("stem", ["x"], 64 * size)
    exits = []
    for m in range(modules):
        ends = []
        for b, length in enumerate((2, 4, 6, 3)):
            prev = last
            for i in range(length):
                ch = rng.choice((8, 16, 24, 32, 48))
                prev = add(f"m{m}_b{b}_{i}", [prev], ch * size)
            ends.append(prev)
        last = add(f"m{m}_cat", ends, 128 * size)
        if (m + 1) % (modules // 3) == 0:
            h = last
            for i in range(4):
                h = add(f"exit{len(exits) + 1}_{i}", [h], 10 * 4 if i == 3 else 32 * size // (4**i))
            exits.append({"name": f"exit{len(exits) + 1}", "node": h, "accuracy": round(0.6 + 0.1 * len(exits), 3)})
    exits[-1]["name"] = "final"
    return CostGraph.from_dict(
        {
            "model": "inception_like",
            "input": {"name": "x", "shape": [1, 3, 32, 32], "bytes": 3 * size},
            "nodes": nodes,
            "exits": exits,
        }
    )


def random_requests(n: int, rng: random.Random) -> list[PlanRequest]:
    out = []
    for _ in range(n):
        out.append(
            PlanRequest(
                bandwidth_mbps=10 ** rng.uniform(-1, 2),
                rtt_ms=rng.uniform(0, 50),
                device_load=rng.uniform(0, 0.9),
                edge_load=rng.uniform(0, 0.9),
                latency_budget_ms=rng.choice((None, rng.uniform(5, 200))),
                min_accuracy=rng.choice((None, rng.uniform(0.5, 0.95))),
                frame_rate=rng.choice((None, rng.uniform(1, 120))),
                mode=rng.choice(("auto", "latency", "throughput")),
            )
        )
    return out


def bench_one(name: str, graph: CostGraph, n_req: int, n_cut: int, seed: int, zoo: bool) -> bool:
    t0 = time.perf_counter()
    pm = PlanMap.build(graph)
    build_s = time.perf_counter() - t0
    data = pm.to_bytes()
    t0 = time.perf_counter()
    PlanMap.from_bytes(data)
    load_s = time.perf_counter() - t0
    rng = random.Random(seed)
    reqs = random_requests(n_req, rng)
    times = np.empty(n_req)
    for i, req in enumerate(tqdm(reqs, desc=f"{name}: plan", leave=False, mininterval=0.5)):
        t = time.perf_counter()
        pm.plan(req)
        times[i] = time.perf_counter() - t
    st = ExitStructure.build(graph, len(graph.exits) - 1)
    cut_times = np.empty(n_cut)
    for i, req in enumerate(tqdm(reqs[:n_cut], desc=f"{name}: min-cut", leave=False, mininterval=0.5)):
        t = time.perf_counter()
        min_latency_mask(st, req.conditions())
        cut_times[i] = time.perf_counter() - t
    med, p99 = np.median(times) * 1e3, np.percentile(times, 99) * 1e3
    cmed, cp99 = np.median(cut_times) * 1e3, np.percentile(cut_times, 99) * 1e3
    ratio = cmed / med
    ok_med = med <= TARGET_MEDIAN_MS or not zoo
    ok_ratio = ratio >= TARGET_RATIO
    ok_build = build_s <= TARGET_BUILD_S or not zoo

    def verdict(ok: bool, applies: bool = True) -> str:
        return ("PASS" if ok else "FAIL") if applies else "info"

    print(f"== {name}: {len(graph.nodes)} nodes, {len(graph.exits)} exits, exact={pm.exact}")
    print(f"   downward-closed sets per exit: {pm.ideal_counts()}")
    print(f"   Pareto front per exit:         {pm.front_sizes()}")
    print(f"   plan map: {len(data):,} bytes; from_bytes {load_s * 1e3:.1f} ms")
    print(f"   build      {build_s:8.3f} s    (target <= {TARGET_BUILD_S} s)          {verdict(ok_build, zoo)}")
    print(
        f"   plan       median {med:.4f} ms  p99 {p99:.4f} ms  over {n_req} requests  "
        f"(target median <= {TARGET_MEDIAN_MS} ms) {verdict(ok_med, zoo)}"
    )
    print(f"   min-cut    median {cmed:.4f} ms  p99 {cp99:.4f} ms  over {n_cut} requests")
    print(f"   speed-up   {ratio:8.1f}x   (target >= {TARGET_RATIO:.0f}x)          {verdict(ok_ratio)}")
    return ok_med and ok_ratio and ok_build


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--mincut-requests", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from dapdee.models import load_model

    ok = True
    cases = [(m, lambda m=m: synthetic_timings(load_model(f"zoo:{m}?width=0.25").graph), True) for m in ZOO]
    cases.append(("inception_like-300", inception_like, False))
    for name, make, zoo in tqdm(cases, desc="models", leave=False):
        ok &= bench_one(name, make(), args.requests, args.mincut_requests, args.seed, zoo)
    print(f"OVERALL {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
