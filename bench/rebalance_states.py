"""How much work the exact rebalance does with and without its LP bounds.

For fleets of ResNet-18 cameras (the fleet benchmark's device profile at K = 30; `graph()`),
N in {16, 32, 64}, three seeds and three worker capacities (ms/s), solves each worker's
multiple-choice knapsack twice (`dapdee.fleet.rebalance.solve`): with the bounds (the default)
and without (`bounded=False`, every non-dominated state kept, the DP before the bounds).
Prints, per case, the widest staircase and the CPU time of each, and checks that both give the
same value; then how many cases each keeps exact within the default state budget
(`MAX_STATES`) and the median ratios. Also times what the planner runs, `settle` (up to eight
solves, one per share of the worker), against one bounded solve. Two kinds of fleet:

- `bench`: the fleet benchmark's cameras (uplinks 4G/WiFi/3G/CAT1 in its proportions, ±15 %,
  20-28 ms round trips, 10 frames/s within 250 ms);
- `varied`: uplinks 0.1-50 Mbit/s, device loads 0-0.5, budgets 150-400 ms, 5/10/15 frames/s,
  accuracy floors none/0.9/0.93, modes auto/latency/throughput.

The run without bounds stops at `--cap` states (200,000): past it the case is marked `over`.

    python bench/rebalance_states.py [--out bench/results/rebalance_states] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from dapdee.bench.fleet_bench.scenario import NETWORK_CYCLE, PROFILE_DIR
from dapdee.costgraph import CostGraph
from dapdee.fleet.rebalance import MAX_STATES, Demand, resolved_objective, settle, solve
from dapdee.netem import NETWORKS
from dapdee.planning import PlanMap, PlanRequest

RHO = 0.9
CAPACITIES = (300.0, 1000.0, 3000.0)


def graph() -> CostGraph:
    """The fleet benchmark's ResNet-18 device profile (measured at K = 10) x 3 (K = 30); edge
    timings: the K = 10 timings / 10 x 1.2 (an edge a little slower than the device's own
    CPU at K = 1); overheads 3.5 ms on the device, 2.5 ms on the edge per request."""
    raw = json.loads((PROFILE_DIR / "resnet18.device-k10.device.json").read_text())
    for n in raw["nodes"]:
        d = n["device_ms"] or 0.0
        n["device_ms"], n["edge_ms"] = d * 3.0, d / 10.0 * 1.2
    raw["overheads"] = {"device_request_ms": 3.5, "edge_request_ms": 2.5}
    return CostGraph.from_dict(raw)


def fleet(pm: PlanMap, kind: str, n: int, seed: int) -> list[Demand]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "bench":
            bw = NETWORKS[NETWORK_CYCLE[i % len(NETWORK_CYCLE)]] * rng.uniform(0.85, 1.15)
            fps = 10.0
            req = PlanRequest(bw, 20.0 + rng.uniform(0, 8), latency_budget_ms=250.0, frame_rate=fps)
        else:
            fps = rng.choice([5.0, 10.0, 15.0])
            req = PlanRequest(
                10 ** rng.uniform(-1, 1.7), rng.uniform(5, 60), rng.uniform(0, 0.5), 0.0, rng.uniform(150, 400),
                rng.choice([None, 0.9, 0.93]), fps, rng.choice(["auto", "latency", "throughput"]),
            )  # fmt: skip
        out.append(Demand(f"d{i}", fps, pm, req, resolved_objective(pm, req, RHO)))
    return out


def one_case(demands: list[Demand], capacity: float, cap: int) -> dict[str, object]:
    t0 = time.process_time()
    bounded = solve(demands, capacity, RHO, max_states=cap)
    t1 = time.process_time()
    plain = solve(demands, capacity, RHO, max_states=cap, bounded=False)
    t2 = time.process_time()
    settled = settle(demands, capacity, RHO)
    t3 = time.process_time()
    return {
        "bounded_states": bounded.states, "bounded_s": t1 - t0, "bounded_exact": bounded.exact,
        "settled_s": t3 - t2, "settled_share": settled.time_load,
        "plain_states": plain.states if plain.exact else None, "plain_s": t2 - t1,
        "same_value": bounded.exact and plain.exact and bounded.value[:2] == plain.value[:2]
        and abs(bounded.value[2] - plain.value[2]) <= 1e-9 * max(1.0, abs(plain.value[2])),
        "bounded_exact_default": bounded.exact and bounded.states <= MAX_STATES,
        "plain_exact_default": plain.exact and plain.states <= MAX_STATES,
    }  # fmt: skip


def report(rows: list[dict[str, object]]) -> str:
    lines = ["| fleet | N | seed | capacity ms/s | states, bounds | states, none | CPU s, bounds | CPU s, none "
             "| CPU s, settled | settled share |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        plain = r["plain_states"] if r["plain_states"] is not None else "over"
        lines.append(
            f"| {r['kind']} | {r['n']} | {r['seed']} | {r['capacity']:g} | {r['bounded_states']} | {plain} "
            f"| {r['bounded_s']:.2f} | {r['plain_s']:.2f} | {r['settled_s']:.2f} | {r['settled_share']:.3f} |"
        )
    both = [r for r in rows if r["plain_states"] is not None]
    ratio = statistics.median(r["plain_states"] / r["bounded_states"] for r in both)  # type: ignore[operator]
    cpu = sum(r["plain_s"] for r in rows) / max(1e-9, sum(r["bounded_s"] for r in rows))  # type: ignore[misc]
    exact_b = sum(bool(r["bounded_exact_default"]) for r in rows)
    exact_p = sum(bool(r["plain_exact_default"]) for r in rows)
    same = sum(bool(r["same_value"]) for r in both)
    settled = [r["settled_s"] / max(1e-9, r["bounded_s"]) for r in rows]  # type: ignore[operator]
    slowest = max(rows, key=lambda r: r["settled_s"])  # type: ignore[arg-type,return-value]
    lines += [
        "",
        f"- exact within the default budget of {MAX_STATES:,} states: with bounds {exact_b} of {len(rows)} cases, "
        f"without {exact_p} of {len(rows)}",
        f"- widest staircase, without / with bounds: median ratio {ratio:.1f}x over the {len(both)} cases both solved",
        f"- CPU, without / with bounds, all cases: {cpu:.1f}x",
        f"- same value with and without bounds: {same} of {len(both)} ({'PASS' if same == len(both) else 'FAIL'})",
        f"- settled (up to eight shares) / one bounded solve, CPU: median {statistics.median(settled):.1f}x, "
        f"max {max(settled):.1f}x; slowest settle {slowest['settled_s']:.2f} s ({slowest['kind']}, N = {slowest['n']}, "
        f"{slowest['capacity']:g} ms/s)",
    ]
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for kind, marker in (("bench", "o"), ("varied", "s")):
        pts = [(r["plain_states"], r["bounded_states"]) for r in rows if r["kind"] == kind and r["plain_states"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
    ax.axline((1, 1), slope=1, color="grey", lw=0.8, ls="--")
    ax.axhline(MAX_STATES, color="red", lw=0.8, label=f"state budget {MAX_STATES:,}")
    ax.set(xscale="log", yscale="log", xlabel="widest staircase without bounds",
           ylabel="widest staircase with bounds", title="Exact rebalance: states kept")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/rebalance_states", help="output prefix (.md, .json, .png)")
    ap.add_argument("--cap", type=int, default=200_000, help="most states either DP keeps here")
    ap.add_argument("--quick", action="store_true", help="N = 16 and 32, one seed")
    args = ap.parse_args()
    pm = PlanMap.build(graph())
    ns, seeds = ((16, 32), (1,)) if args.quick else ((16, 32, 64), (1, 2, 3))
    cases = [(k, n, s, c) for k in ("bench", "varied") for n in ns for s in seeds for c in CAPACITIES]
    rows = []
    for kind, n, seed, capacity in tqdm(cases, desc="rebalances"):
        row = one_case(fleet(pm, kind, n, seed), capacity, args.cap)
        rows.append({"kind": kind, "n": n, "seed": seed, "capacity": capacity, **row})
    text = "# Exact rebalance: states with and without the LP bounds\n\n" + report(rows) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}.md, {out}.json, {out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
