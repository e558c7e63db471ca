"""The paper's experiments as cached cells, each measured through the services:

1. light load (sequential frames): each planner's plan for the shaped uplink, its latency;
2. heavy load (a stream offered at `heavy_factor` x Device-Only's predicted rate, within the
   final exit's accuracy class): each planner's plan, its throughput;
3. Figure 6 analogue: the latency budget swept at 3G -> exit, latency, accuracy;
4. Figure 7 analogue: the uplink swept at a fixed budget -> the cut (device nodes, bytes sent),
   latency; a model may be swept at its own device factor K (`fig7_k`: the camera-size ones at 30).

Planners whose plans are identical (same exit, same device set) share one measurement; each
distinct plan is measured in `rounds` interleaved rounds (their spread is the noise band), and a
plan whose rounds disagree by more than `tiebreak_ratio` in one more (the throughput is then the
median round's; the latency is the median of every round's frames pooled).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dapdee.bench.paperbench.cells import CellCache
from dapdee.bench.paperbench.measure import Run, run_fixed_plan
from dapdee.bench.paperbench.options import ACC_CLASS, Options, artifact_id, available_models
from dapdee.bench.paperbench.plans import PLANNERS, plan_key, plan_summary
from dapdee.bench.paperbench.stats import merge_rounds, rounds_disagree, skipped_measurement
from dapdee.bench.paperbench.systems import Device, System, say
from dapdee.netem import parse_network

KEY_PARTS_AT = 8  # where a cell key's own parts start (after kind ... probe rounds, CPU pinning)


class Bench:
    """The cell cache and the system (started only when a cell must be measured)."""

    def __init__(self, o: Options) -> None:
        self.o = o
        Path(o.out).mkdir(parents=True, exist_ok=True)
        self.cache = CellCache(Path(o.out), o.fresh)
        self.models, self.skipped = available_models(o)
        self.ids = {m: artifact_id(o.artifact(m)) for m in self.models}
        self.sys: System | None = None

    async def system(self) -> System:
        if self.sys is None:
            self.sys = System(self.o, self.models)
            await self.sys.start()
        return self.sys

    async def close(self) -> None:
        if self.sys is not None:
            await self.sys.stop()

    def key(self, kind: str, m: str, *parts: Any, slowdown: float | None = None) -> str:
        """The cache key of a cell: kind, model (or models, comma-joined), each one's artifact, K,
        RTT, the profiling repeats and passes and the live device's probe rounds (the presets
        differ in both), the CPU pinning, the cell's parts, the cap."""
        o = self.o
        k = o.slowdown if slowdown is None else slowdown
        ids = ",".join(self.ids.get(x, "") for x in m.split(","))  # each model's artifact (adaptation: several)
        return "|".join([kind, m, ids, f"K{k:g}", f"rtt{o.rtt_ms:g}",
                         f"rep{o.profile_repeats}x{o.profile_passes}", f"probe{o.probe_rounds}",
                         f"pin{int(o.cpu_split is not None)}", *map(str, parts), f"cap{o.plan_cap_s:g}"])  # fmt: skip

    async def cell(self, key: str, fn: Callable[[System], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The cached result of cell `key`, else `await fn(system)` (then cached)."""
        label = " ".join(key.split("|")[:2] + key.split("|")[KEY_PARTS_AT:-1])
        hit = self.cache.get(key)
        if hit is not None:
            say(self.o, f"[cached] {label}")
            return hit
        s = await self.system()
        say(self.o, f"[measuring] {label}")
        res = await fn(s)
        self.cache.put(key, res)
        return res


async def measure_one(s: System, dev: Device, plan: dict[str, Any], run: Run) -> dict[str, Any]:
    """One plan measured once (not run when one frame is predicted to exceed the cap)."""
    pred = plan["predicted"]["latency_ms"]
    if pred > run.cap_s * 1000:
        return skipped_measurement(pred, run.cap_s)
    return merge_rounds([await run_fixed_plan(s, dev, plan, run)])


async def measure_plans(s: System, dev: Device, plans: dict[str, dict[str, Any]], run: Run) -> dict[str, Any]:
    """Each distinct plan of `plans` measured in `rounds` interleaved rounds of `run.n / rounds`
    frames, and one tie-break round after them for a plan whose rounds disagree by more than
    `tiebreak_ratio` (throughput under a frame rate, else the median latency: `merge_rounds`
    takes the median round's throughput, and the median latency of every round's frames
    pooled); per planner its plan's summary, the planners sharing it, and the pooled numbers."""
    o = s.o
    distinct: dict[str, dict[str, Any]] = {}
    for name in PLANNERS:
        distinct.setdefault(plan_key(plans[name]), plans[name])
    per_round = max(1, math.ceil(run.n / o.rounds))
    rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in distinct}
    skipped = {k: skipped_measurement(p["predicted"]["latency_ms"], o.plan_cap_s) for k, p in distinct.items()
               if p["predicted"]["latency_ms"] > o.plan_cap_s * 1000}  # fmt: skip

    async def one_round(k: str, r: int) -> None:
        plan = distinct[k]
        desc = f"{run.desc} {plan.get('planner') or 'dapdee'} r{r + 1}"
        rounds[k].append(await run_fixed_plan(s, dev, plan, replace(run, n=per_round, offset=r * per_round,
                                                                    desc=desc)))  # fmt: skip

    measured = [k for k in distinct if k not in skipped]
    for r in range(o.rounds):
        for k in measured:
            await one_round(k, r)
    metric = "throughput_fps" if run.frame_rate else "median_ms"
    for k in measured:
        if rounds_disagree([x[metric] for x in rounds[k]], o.tiebreak_ratio):
            await one_round(k, o.rounds)
    meas = {k: skipped.get(k) or merge_rounds(v) for k, v in rounds.items()}
    out: dict[str, Any] = {}
    for name in PLANNERS:
        k = plan_key(plans[name])
        same = [b for b in PLANNERS if b != name and plan_key(plans[b]) == k]
        out[name] = {"plan": plan_summary(plans[name], s.graphs[dev.model]), "same_plan_as": same, **meas[k]}
    return out


def class_floor(s: System, m: str) -> float | None:
    """The lowest accuracy within the final exit's accuracy class (None: no accuracy known)."""
    final = s.graphs[m].exits[-1].accuracy
    return None if final is None else round(final - ACC_CLASS, 6)


async def light(b: Bench, m: str, net: str) -> dict[str, Any]:
    """Light load at network `net`: every planner's latency-mode plan, measured sequentially."""
    o, rate = b.o, parse_network(net).rate_mbps
    key = b.key("light", m, net, f"n{o.light_frames}x{o.rounds}", f"tb{o.tiebreak_ratio:g}")

    async def fn(s: System) -> dict[str, Any]:
        dev = await s.device(m)
        req = s.request(dev, rate, mode="latency")
        plans = await s.all_plans(req)
        run = Run(rate, o.light_frames, o.plan_cap_s, desc=f"light {m} {net}")
        res = await measure_plans(s, dev, plans, run)
        return {"model": m, "network": net, "rate_mbps": rate, "request": req, "overheads": dev.overheads,
                "planners": res}  # fmt: skip

    return await b.cell(key, fn)


async def heavy(b: Bench, m: str, net: str) -> dict[str, Any]:
    """Heavy load at `net`: every planner's throughput-mode plan for a stream offered at
    `heavy_factor` x Device-Only's predicted rate, within the final exit's accuracy class."""
    o, rate = b.o, parse_network(net).rate_mbps
    key = b.key("heavy", m, net, f"n{o.heavy_frames}x{o.rounds}", f"min{o.heavy_min_s:g}s",
                f"f{o.heavy_factor:g}", f"inflight{o.max_inflight}+fill2x", f"tb{o.tiebreak_ratio:g}")  # fmt: skip

    async def fn(s: System) -> dict[str, Any]:
        dev = await s.device(m)
        alone = await s.plan(s.request(dev, rate, mode="throughput"), "device-only")
        offered = o.heavy_factor * alone["predicted"]["throughput_fps"]
        req = s.request(dev, rate, mode="throughput", frame_rate=offered, min_accuracy=class_floor(s, m))
        plans = await s.all_plans(req)
        run = Run(rate, o.heavy_frames, o.plan_cap_s, frame_rate=offered, min_s=o.heavy_min_s,
                  desc=f"heavy {m} {net}")  # fmt: skip
        res = await measure_plans(s, dev, plans, run)
        return {"model": m, "network": net, "rate_mbps": rate, "offered_fps": offered, "request": req,
                "overheads": dev.overheads, "planners": res}  # fmt: skip

    return await b.cell(key, fn)


async def fig6(b: Bench, m: str) -> dict[str, Any]:
    """Figure 6: `fig6_points` latency budgets, log-spaced from below the fastest plan to above
    the final exit's best, at `fig6_network`; DAPDEE's plan and its latency per budget."""
    o, net = b.o, b.o.fig6_network
    rate = parse_network(net).rate_mbps
    key = b.key("fig6", m, net, f"pts{o.fig6_points}", f"n{o.fig_frames}")

    async def fn(s: System) -> dict[str, Any]:
        dev = await s.device(m)
        fastest = await s.plan(s.request(dev, rate, latency_budget_ms=1e-3))
        final = await s.plan(s.request(dev, rate))
        lo, hi = 0.9 * fastest["predicted"]["latency_ms"], 1.15 * final["predicted"]["latency_ms"]
        k = o.fig6_points
        budgets = [lo * (hi / lo) ** (i / max(1, k - 1)) for i in range(k)] if hi > lo else [lo, hi]
        points = []
        for i, budget in enumerate(budgets):
            plan = await s.plan(s.request(dev, rate, latency_budget_ms=budget))
            cls = await s.plan(s.request(dev, rate, latency_budget_ms=budget, min_accuracy=class_floor(s, m)))
            meas = await measure_one(s, dev, plan, Run(rate, o.fig_frames, o.plan_cap_s, desc=f"fig6 {m} b{i}"))
            points.append({"budget_ms": budget, "plan": plan_summary(plan, s.graphs[m]),
                           "class_allowed": bool(cls.get("constraints_met")), **meas})  # fmt: skip
        return {"model": m, "network": net, "rate_mbps": rate, "final_accuracy": s.graphs[m].exits[-1].accuracy,
                "points": points}  # fmt: skip

    return await b.cell(key, fn)


async def fig7(b: Bench, m: str) -> dict[str, Any]:
    """Figure 7: the uplink swept at a fixed budget (`fig7_budget_frac` x Device-Only's predicted
    latency) at the model's Fig. 7 K; per bandwidth DAPDEE's latency-mode plan (its cut), its
    measured latency, and the Device-Only and Edge-Only predictions beside it."""
    o, k, bws = b.o, b.o.fig7_slowdown(m), b.o.fig7_points(m)
    key = b.key("fig7", m, "bw" + ",".join(f"{x:g}" for x in bws), f"frac{o.fig7_budget_frac:g}",
                f"n{o.fig_frames}", slowdown=k)  # fmt: skip

    async def fn(s: System) -> dict[str, Any]:
        dev = await s.device(m, k)
        alone = await s.plan(s.request(dev, 1.0), "device-only")
        budget = o.fig7_budget_frac * alone["predicted"]["latency_ms"]
        points = []
        for bw in bws:
            req = s.request(dev, bw, latency_budget_ms=budget)
            plan = await s.plan(req)
            refs = {name: (await s.plan(req, name))["predicted"] for name in ("device-only", "edge-only")}
            meas = await measure_one(s, dev, plan, Run(bw, o.fig_frames, o.plan_cap_s, desc=f"fig7 {m} {bw:g}Mbps"))
            points.append({"bandwidth_mbps": bw, "plan": plan_summary(plan, s.graphs[m]),
                           "device_only": refs["device-only"], "edge_only": refs["edge-only"], **meas})  # fmt: skip
        return {"model": m, "slowdown": k, "budget_ms": budget, "rtt_ms": dev.request_rtt_ms, "tier": dev.tier,
                "overheads": dev.overheads,
                "budget_frac_of_device_only": o.fig7_budget_frac, "points": points}  # fmt: skip

    return await b.cell(key, fn)
