"""The paper's evaluation, measured end to end through the real services.

One command (`python bench/paper.py [--quick]`) starts the planner and one edge worker under
uvicorn on 127.0.0.1 (in-process store, no Redis), loads the shipped Fashion-MNIST artifacts,
measures the device tier's profile at slowdown K, registers it with the planner, and then runs
real Fashion-MNIST test images through the device client (`dapdee.device.client.DeviceClient`)
over a token-bucket-shaped uplink (`dapdee.netem.ShapedUplink`) for:

1. light load (sequential frames): end-to-end latency of Device-Only, Edge-Only, Neurosurgeon,
   DADS, Edgent (`dapdee.planning.baseline_plan` over the planner's own merged profile) and
   DAPDEE (`POST /plan`), each running its own plan;
2. heavy load (a stream offered faster than Device-Only sustains): measured throughput;
3. Figure 6 analogue: latency budget swept at 3G -> exit, latency, accuracy;
4. Figure 7 analogue: bandwidth swept at a fixed budget -> partition point, latency;
5. prediction fidelity: |predicted - measured| / measured per plan;
6. adaptation: the real client loop (its own bandwidth sensing and re-planning) while the
   shaped bandwidth changes 4G -> CAT1 -> 3G.

Every finished cell is cached in `OUT/paper_cells.json` (keyed by its full configuration) and
skipped on rerun; servers start only when some cell still has to be measured. Outputs:
`OUT/paper.json`, `OUT/paper.md` (tables + PASS/FAIL lines) and PNG plots in `OUT/`.

Fixed-plan runs use a tiny adapter (`run_fixed_plan`): a `DeviceClient` configured without a
planner (`device_only=True`, no background re-planning) pointed at the edge worker, whose
`plan` is replaced by the plan JSON under test; its own `run()` / `infer()` execute the frames
(device part with the split executor and K x slowdown, wire codec, shaped upload, edge v2).
Planners whose plans are identical (same exit, same device set) share one measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/paper.py` from anywhere
    sys.path.insert(0, str(REPO))

# display key -> artifact directory (relative to the repo)
MODELS: dict[str, str] = {
    "alexnet": "artifacts/fmnist-alexnet",
    "vgg16": "artifacts/fmnist-vgg16",
    "resnet18": "artifacts/fmnist-resnet18",
    "inception": "artifacts/fmnist-inception",
    "resnet18-224": "artifacts/fmnist-resnet18-224",
}
DAG_MODELS = ("resnet18", "inception", "resnet18-224")
# the paper's figure (>= 9.9x over Device-Only at 4G) is for its input size; at camera-frame
# size the 4G uplink bounds every plan far below it (the line shows that bound), so it informs
CAMERA_SIZE = ("resnet18-224",)
from dapdee.bench.paper_plots import LABEL, PLANNERS  # noqa: E402  (one list of planners and labels)

EXPERIMENTS = ("light", "heavy", "fig6", "fig7", "adapt")
ACC_CLASS = 0.012  # accuracy loss vs the final exit allowed ("accuracy class")
CELLS_SCHEMA = 2  # 2: graphs take raw uint8 frames; the edge worker runs in its own process

log = logging.getLogger("dapdee.bench.paper")


# ---- options ------------------------------------------------------------------------------------


@dataclass
class Options:
    """Everything that determines what is measured (all of it goes into cell keys)."""

    models: list[str]
    networks: list[str]
    slowdown: float = 10.0
    rtt_ms: float = 20.0
    light_frames: int = 20  # per plan, split over `rounds`
    heavy_frames: int = 60
    heavy_min_s: float = 2.0  # a heavy-load round streams for at least this long (fast plans: more frames)
    rounds: int = 2
    plan_cap_s: float = 30.0  # wall-clock cap of one plan's measurement in one round
    heavy_factor: float = 20.0  # offered frame rate = factor x Device-Only's predicted fps
    max_inflight: int = 4
    fig6_models: list[str] = field(default_factory=list)
    fig6_points: int = 7
    fig6_network: str = "3G"
    fig7_models: list[str] = field(default_factory=list)
    fig7_bandwidths: list[float] = field(default_factory=list)
    fig7_budget_frac: float = 1.0  # budget = frac x Device-Only latency of the final exit
    fig_frames: int = 6
    adapt_model: str | None = None
    adapt_mode: str = "auto"  # auto: latency mode unless no model's latency optimum changes
    only: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    adapt_phases: list[tuple[str, float]] = field(default_factory=list)
    profile_repeats: int = 7
    out: str = "bench/results"
    fresh: bool = False
    plots: bool = True
    quiet: bool = False
    variant: str = "full"
    artifacts: dict[str, str] = field(default_factory=dict)  # model key -> directory override

    def artifact(self, m: str) -> Path:
        """The artifact directory of model key `m`."""
        return Path(self.artifacts.get(m) or REPO / MODELS[m])


def build_options(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/paper.py",
        description="The DAPDEE paper's evaluation through the real planner, edge worker and device client.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="2 models, 2 networks, a few frames (minutes)")
    size.add_argument("--smoke", action="store_true", help="1 model, 1 network, 2 frames (the test's variant)")
    p.add_argument("--models", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--networks", help="comma list of CAT1, 3G, 4G, WiFi")
    p.add_argument("--slowdown", "-K", type=float, default=10.0, help="device slowdown K (default 10)")
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--frames", type=int, help="light-load frames per plan")
    p.add_argument("--heavy-frames", type=int)
    p.add_argument("--fig-frames", type=int)
    p.add_argument("--plan-cap-s", type=float, help="wall-clock cap per plan measurement and round")
    p.add_argument("--heavy-factor", type=float, default=20.0)
    p.add_argument("--out", help="output directory (default bench/results, bench/results/quick for --quick)")
    p.add_argument("--fresh", action="store_true", help="ignore cached cells")
    p.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="MODEL=DIR",
        help="use another artifact directory for a model key (repeatable)",
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--only", help=f"comma list of experiments to run: {', '.join(EXPERIMENTS)} (default all)")
    p.add_argument("--adapt-model", choices=list(MODELS), help="adaptation model (default: chosen)")
    p.add_argument(
        "--adapt-mode",
        choices=["auto", "latency", "throughput"],
        default="auto",
        help="adaptation mode (auto: latency unless no model's latency optimum changes)",
    )
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        o = Options(
            models=["alexnet"],
            networks=["4G"],
            light_frames=2,
            heavy_frames=10,
            heavy_min_s=0.3,
            plan_cap_s=4.0,
            fig6_points=2,
            fig7_bandwidths=[1.1, 18.88],
            fig_frames=1,
            adapt_phases=[("4G", 1.5), ("CAT1", 1.5), ("3G", 1.5)],
            profile_repeats=3,
            variant="smoke",
        )
    elif a.quick:
        second = next(
            (
                m
                for m in ("resnet18-224", "resnet18", "inception", "vgg16")
                if (REPO / MODELS[m] / "manifest.json").is_file()
            ),
            "resnet18-224",
        )
        o = Options(
            models=["alexnet", second],
            networks=["3G", "4G"],
            light_frames=10,
            heavy_frames=30,
            heavy_min_s=1.0,
            plan_cap_s=8.0,
            fig6_points=4,
            fig7_bandwidths=[0.1, 1.1, 5.85, 20.0],
            fig_frames=3,
            adapt_phases=[("4G", 8.0), ("CAT1", 8.0), ("3G", 8.0)],
            profile_repeats=5,
            variant="quick",
        )
    else:
        o = Options(
            models=list(MODELS),
            networks=["CAT1", "3G", "4G", "WiFi"],
            fig7_bandwidths=[0.1, 0.13, 0.3, 0.6, 1.1, 2.5, 5.85, 10.0, 18.88, 20.0],
            adapt_phases=[("4G", 20.0), ("CAT1", 20.0), ("3G", 20.0)],
        )
    if a.models:
        o.models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.networks:
        o.networks = [n.strip() for n in a.networks.split(",") if n.strip()]
    for m in o.models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r}; expected some of {', '.join(MODELS)}")
    from dapdee.netem import parse_network

    o.networks = [parse_network(n).name for n in o.networks]
    o.slowdown, o.rtt_ms, o.heavy_factor = a.slowdown, a.rtt_ms, a.heavy_factor
    if a.frames:
        o.light_frames = a.frames
    if a.heavy_frames:
        o.heavy_frames = a.heavy_frames
    if a.fig_frames:
        o.fig_frames = a.fig_frames
    if a.plan_cap_s:
        o.plan_cap_s = a.plan_cap_s
    default_out = REPO / "bench" / "results" / ("" if o.variant == "full" else o.variant)
    o.out, o.fresh, o.plots, o.quiet = a.out or str(default_out), a.fresh, not a.no_plots, a.quiet
    if a.only:
        o.only = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = sorted(set(o.only) - set(EXPERIMENTS))
        if bad:
            raise SystemExit(f"--only: unknown {bad}; expected some of {', '.join(EXPERIMENTS)}")
    o.adapt_model, o.adapt_mode = a.adapt_model, a.adapt_mode
    for item in a.artifact:
        key, sep, path = item.partition("=")
        if not sep or key not in MODELS or not path:
            raise SystemExit(f"--artifact: expected MODEL=DIR with MODEL one of {', '.join(MODELS)}")
        o.artifacts[key] = str(Path(path).resolve())
    return o


def available_models(o: Options) -> tuple[list[str], dict[str, str]]:
    """The selected models whose artifacts exist, and why the others were skipped."""
    ok, skipped = [], {}
    for m in o.models:
        d = o.artifact(m)
        if (d / "manifest.json").is_file() and (d / "weights.safetensors").is_file():
            ok.append(m)
        else:
            skipped[m] = f"artifact {d} not found"
    return ok, skipped


def artifact_id(d: Path) -> str:
    """A short identity of an artifact (its weights' sha256 from the manifest, else the
    manifest's mtime), so cells of a re-trained artifact are not taken from the cache."""
    try:
        man = json.loads((d / "manifest.json").read_text())
        sha = man.get("weights_sha256")
        if isinstance(sha, str) and sha:
            return sha[:12]
    except (OSError, ValueError):
        pass
    return f"m{int((d / 'manifest.json').stat().st_mtime)}"


# ---- small statistics -----------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank, q in [0, 1]) of xs; None when empty. O(n log n)."""
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def plan_key(plan: dict[str, Any]) -> str:
    """Identity of a plan for sharing measurements: exit + sorted device set."""
    return plan["exit"]["name"] + "|" + ",".join(sorted(plan["device_nodes"]))


def plan_summary(plan: dict[str, Any], graph: Any) -> dict[str, Any]:
    """What a table shows of a plan: exit, cut size, bytes sent, device FLOPs share, predictions."""
    dev = set(plan["device_nodes"])
    anc = graph.ancestors(graph.exit(plan["exit"]["name"]).node)
    flops_all = sum(graph.node(n).flops for n in anc) or 1
    flops_dev = sum(graph.node(n).flops for n in dev)
    names = [e.name for e in graph.exits]
    return {
        "exit": plan["exit"]["name"],
        "exit_index": names.index(plan["exit"]["name"]) + 1,
        "exits": len(names),
        "exit_accuracy": plan["exit"]["accuracy"],
        "device_nodes": len(dev),
        "exit_nodes": len(anc),
        "bytes": sum(t["bytes"] for t in plan["transfer"]) if plan["edge_nodes"] else 0,
        "device_flops": flops_dev,
        "device_flops_frac": flops_dev / flops_all,
        "predicted": plan["predicted"],
        "mode": plan.get("mode"),
        "constraints_met": plan.get("constraints_met"),
    }


# ---- the running system ---------------------------------------------------------------------------


class System:
    """Planner + edge worker (uvicorn threads on 127.0.0.1) + per-model device state."""

    def __init__(self, o: Options, models: list[str]) -> None:
        self.o = o
        self.models = models
        self.loaded: dict[str, Any] = {}
        self.device_graph: dict[str, Any] = {}
        self.merged: dict[str, Any] = {}
        self.frames: dict[str, list[Any]] = {}
        self.planner: Any = None
        self.edge: Any = None
        self.edge_url = ""
        self.http: Any = None
        self.sensed_rtt_ms: dict[str, float] = {}

    @property
    def tier(self) -> str:
        from dapdee.device.client import ClientConfig

        return ClientConfig(planner_url="", slowdown=self.o.slowdown).tier

    async def start(self) -> None:
        """Load the device's models (fx-traced before any server thread runs), profile the
        device at K, start the planner (a thread) and the edge worker (a process), wait for edge
        registration, upload the device profile, fetch the planner's merged profiles and sense
        the per-request round trip. O(models x profiling)."""
        import httpx
        import torch

        from dapdee.bench.load import ServiceProcess
        from dapdee.costgraph import CostGraph
        from dapdee.device.client import dataset_frames
        from dapdee.device.servers import ServerThread
        from dapdee.models import load_model
        from dapdee.planner.app import create_app as create_planner
        from dapdee.planner.config import Settings as PlannerSettings

        torch.set_num_threads(1)
        prof_dir = Path(self.o.out) / "profiles"
        prof_dir.mkdir(parents=True, exist_ok=True)
        for m in self.models:
            art = str(self.o.artifact(m))
            self.loaded[m] = load_model("", weights=art, name=m)
            if (self.loaded[m].manifest or {}).get("name") != m:
                named = (self.loaded[m].manifest or {}).get("name")
                raise ValueError(f"artifact {art}: its manifest names the model {named!r}, not {m!r}")
        n_frames = max(self.o.light_frames, self.o.heavy_frames, self.o.fig_frames, 64)
        for m in self.models:
            loaded = self.loaded[m]
            self.frames[m] = list(dataset_frames(loaded, "fashion-mnist", n_frames))
            path = prof_dir / f"{m}.{self.tier}.device.json"
            g = None
            if path.is_file():
                with contextlib.suppress(Exception):
                    g = CostGraph.load(str(path))
                    if g.structure_key() != loaded.graph.structure_key() or not g.has_timings("device"):
                        g = None
            if g is None:
                say(self.o, f"profiling {m} on the emulated device (K={self.o.slowdown:g}) ...")
                g = await asyncio.to_thread(device_profile, loaded, self.o.slowdown, self.o.profile_repeats)
                g.save(str(path))
            self.device_graph[m] = g
        self.planner = ServerThread(
            create_planner(PlannerSettings(redis_url=None, worker_ttl_s=30.0)), name="planner"
        ).start()
        # The edge worker is its own process, as on its own machine: in this one it would share
        # the device client's GIL, and every frame's Python work would queue behind the other's.
        edge = ServiceProcess(
            "edge",
            [
                "--models", ",".join(f"@{self.o.artifact(m)}" for m in self.models),
                "--planner", self.planner.url,
                "--profile-repeats", str(self.o.profile_repeats),
                "--profile-cache", str(prof_dir),
                "--workers", "1",
                "--threads", "1",
            ],
            "/v2/health/live",
            {"DAPDEE_EDGE_HEARTBEAT_S": "1", "DAPDEE_EDGE_PROFILE_WARMUP": "2"},
        )
        edge.args += ["--public-url", edge.url]
        self.edge = await asyncio.to_thread(edge.start, 600.0)
        self.edge_url = edge.url
        self.http = httpx.AsyncClient(base_url=self.planner.url, timeout=30.0)
        say(self.o, f"planner {self.planner.url}, edge worker {self.edge_url}: waiting for edge profiles ...")
        deadline = time.monotonic() + 600
        for m in self.models:
            while True:
                r = await self.http.get(f"/models/{m}/profiles")
                if r.status_code == 200 and "edge" in r.json()["profiles"]:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"edge worker did not register {m} with the planner")
                await asyncio.sleep(0.2)
            g = self.device_graph[m]
            body = {
                "kind": "device",
                "timings_ms": {n.name: n.device_ms for n in g.nodes},
                "meta": {**g.meta.get("device", {}), "tier": self.tier, "slowdown": self.o.slowdown},
            }
            r = await self.http.put(f"/models/{m}/profiles/{self.tier}", json=body)
            r.raise_for_status()
            self.merged[m] = await self.merged_profile(m)
            self.sensed_rtt_ms[m] = await self.sense_link(m)
            rtt = self.sensed_rtt_ms[m]
            say(self.o, f"{m}: sensed per-request round trip {rtt:.1f} ms (added RTT {self.o.rtt_ms:g})")

    async def sense_link(self, m: str, probes: int = 6) -> float:
        """The `rtt_ms` a live device client puts in its plan requests: its RTT estimate plus
        the fixed per-request cost (HTTP, codec, scheduling) its probe pairs measure, sensed by
        the client's own code on an uplink shaped at the fastest network. Every planner, the
        baselines included, then prices plans with the round trip a frame really pays."""
        from dapdee.device.client import ClientConfig, DeviceClient
        from dapdee.netem import NETWORKS

        rate = max(NETWORKS.values())
        cfg = ClientConfig(
            planner_url=self.planner.url,
            rate_mbps=rate,
            rtt_ms=self.o.rtt_ms,
            slowdown=self.o.slowdown,
            device_only=True,
            edge_url=self.edge_url,
            bandwidth_prior_mbps=rate,
            threads=1,
        )
        client = DeviceClient(cfg, loaded=self.loaded[m], device_graph=self.device_graph[m])
        await client.start()
        try:
            await client.measure_rtt(5)
            for _ in range(probes):
                await client.probe()
            return client.rtt.estimate_ms + client.bandwidth.overhead_ms
        finally:
            await client.close()

    async def merged_profile(self, m: str) -> Any:
        """The planner's merged graph (its own `merged_graph`) from its stored graph + profiles."""
        from dapdee.costgraph import CostGraph
        from dapdee.planner.store import ModelState, Profile, merged_graph

        g = CostGraph.from_dict((await self.http.get(f"/models/{m}")).json())
        profs = (await self.http.get(f"/models/{m}/profiles")).json()["profiles"]
        p = {t: Profile.make(t, d["kind"], d["timings_ms"], d.get("meta") or {}) for t, d in profs.items()}
        return merged_graph(m, ModelState(g, "", p), p[self.tier], p["edge"])

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.edge is not None:
            self.edge.stop()
        if self.planner is not None:
            self.planner.stop()

    # ---- plans --------------------------------------------------------------------------------

    def request(self, m: str, rate: float, **kw: Any) -> dict[str, Any]:
        """A plan request at a known uplink (the shaped rate), zero device and edge load, and the
        round trip a live device client would report for model `m` (see `sense_link`)."""
        body = {
            "bandwidth_mbps": rate,
            "rtt_ms": self.sensed_rtt_ms[m],
            "device_load": 0.0,
            "edge_load": 0.0,
            "mode": "latency",
        }
        body.update({k: v for k, v in kw.items() if v is not None})
        return body

    async def dapdee_plan(self, m: str, req: dict[str, Any]) -> dict[str, Any]:
        """DAPDEE's plan: POST /plan to the planner service."""
        r = await self.http.post("/plan", json={"model": m, "device_tier": self.tier, **req})
        if r.status_code != 200:
            raise RuntimeError(f"POST /plan {m}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    def baseline(self, m: str, req: dict[str, Any], name: str) -> dict[str, Any]:
        """Baseline `name`'s plan over the planner's merged profile (dapdee.planning.baseline_plan)."""
        from dapdee.planning import PlanRequest, baseline_plan

        return baseline_plan(self.merged[m], PlanRequest(**req), name)

    async def all_plans(self, m: str, req: dict[str, Any]) -> dict[str, dict[str, Any]]:
        plans = {b: self.baseline(m, req, b) for b in PLANNERS if b != "dapdee"}
        plans["dapdee"] = await self.dapdee_plan(m, req)
        return plans

    # ---- measuring ----------------------------------------------------------------------------

    async def run_fixed_plan(
        self,
        m: str,
        plan: dict[str, Any],
        rate: float,
        n: int,
        cap_s: float,
        frame_rate: float | None = None,
        offset: int = 0,
        warmup: bool = True,
        desc: str = "",
        min_s: float = 0.0,
    ) -> dict[str, Any]:
        """Adapter: run `n` frames (stopping after `cap_s` s) with the fixed `plan` through a
        DeviceClient (no planner, no re-planning) over an uplink shaped at `rate` Mbit/s.
        `frame_rate` given: a pipelined stream offered at that rate (heavy load), else sequential.
        `min_s`: keep streaming past `n` frames until that many seconds have passed (a round of a
        fast plan then still spans enough time to average out scheduler hiccups).
        Returns per-frame measured latencies and aggregates. O(n frames)."""
        from tqdm import tqdm

        from dapdee.device.client import ClientConfig, DeviceClient, Plan

        pred = plan["predicted"]
        # enough frames in flight to fill the 3-stage pipeline (Little's law: latency / bottleneck)
        inflight = self.o.max_inflight
        if frame_rate:
            fill = math.ceil(pred["latency_ms"] / max(pred["bottleneck_ms"], 1e-6)) + 2
            inflight = min(32, max(inflight, fill))
        cfg = ClientConfig(
            planner_url=self.planner.url,
            rate_mbps=rate,
            rtt_ms=self.o.rtt_ms,
            slowdown=self.o.slowdown,
            device_load=0.0,
            device_only=True,  # no planner, no background re-planning: the plan stays fixed
            edge_url=self.edge_url,
            mode="throughput" if frame_rate else "latency",
            frame_rate=frame_rate,
            max_inflight=inflight,
            timeout_floor_ms=max(5000.0, 3 * cap_s * 1000.0),
            threads=1,
        )
        frames = self.frames[m]
        client = DeviceClient(cfg, loaded=self.loaded[m], device_graph=self.device_graph[m])
        await client.start()
        try:
            client.plan = Plan(plan, time.monotonic(), rate, 0.0)
            if warmup and pred["latency_ms"] < cap_s * 1000 / 5:
                await client.infer(*frames[(offset + len(frames) - 1) % len(frames)])
            # pre-cap by prediction, so a pipelined stream leaves no long tail of frames in flight
            per_frame_ms = pred["bottleneck_ms"] if frame_rate else pred["latency_ms"]
            fit = int(cap_s * 1000 / max(per_frame_ms, 1e-6))
            if frame_rate:  # a steady state needs several pipeline-fulls of frames
                n = max(n, 2 * inflight)
            state = {"capped": fit < n}
            n = max(min(n, fit), 3 if frame_rate else 1)
            t0 = time.monotonic()

            async def source() -> AsyncIterator[Any]:
                i = 0
                while i < n or time.monotonic() - t0 < min_s:
                    if i > 0 and time.monotonic() - t0 > cap_s:
                        state["capped"] = i < n
                        return
                    yield frames[(offset + i) % len(frames)]
                    i += 1

            with tqdm(total=n, desc=desc[:40], file=sys.stderr, leave=False, disable=self.o.quiet) as bar:
                records = await client.run(source(), progress=lambda r: bar.update(1))
            wall = time.monotonic() - t0
        finally:
            await client.close()
        meas = [r.measured_ms for r in records]
        ends = sorted(r.started_at + r.measured_ms / 1000.0 for r in records)
        tput = None
        first_start = min((r.started_at for r in records), default=0.0)
        if len(ends) >= 2 * inflight and ends[-1] > ends[0]:
            # steady state: completions after the first (the pipeline fill is not counted)
            tput = (len(ends) - 1) / (ends[-1] - ends[0])
        elif records and ends[-1] > first_start:
            # too few frames for a steady state (frames in flight may finish together)
            tput = len(ends) / (ends[-1] - first_start)
        labelled = [r for r in records if r.correct is not None]
        return {
            "frames": len(records),
            "requested": n,
            "capped": state["capped"],
            "measured_ms": [round(x, 3) for x in meas],
            "median_ms": med(meas),
            "p90_ms": pct(meas, 0.9),
            "throughput_fps": tput,
            "wall_s": wall,
            "where": {w: sum(r.where == w for r in records) for w in ("edge", "local", "fallback")},
            "errors": sorted({r.error for r in records if r.error}),
            "correct": sum(bool(r.correct) for r in labelled),
            "labelled": len(labelled),
            "exits": sorted({r.exit for r in records}),
            "max_inflight": inflight,
        }


def device_profile(loaded: Any, slowdown: float, repeats: int) -> Any:
    """The device tier's profile exactly as the device client measures its own
    (`dapdee.device.client.measure_device_profile`: per-node medians at K, calibrated to
    whole-frame runs), else `dapdee.profiler.profile_model` when that client has no such helper."""
    try:
        from dapdee.device.client import measure_device_profile
    except ImportError:
        from dapdee.profiler import profile_model

        return profile_model(loaded, "device", slowdown=slowdown, threads=1, repeats=repeats, warmup=2)
    return measure_device_profile(loaded, slowdown, 1, repeats)


def say(o: Options, *a: Any) -> None:
    if not o.quiet:
        print(*a, file=sys.stderr, flush=True)


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool repeated measurements of one plan; per-round medians / throughputs kept for noise."""
    meas = [x for r in rounds for x in r["measured_ms"]]
    tputs = [r["throughput_fps"] for r in rounds if r["throughput_fps"]]
    frames = sum(r["frames"] for r in rounds)
    correct = sum(r["correct"] for r in rounds)
    labelled = sum(r["labelled"] for r in rounds)
    out = {
        "frames": frames,
        "requested": sum(r["requested"] for r in rounds),
        "capped": any(r["capped"] for r in rounds),
        "median_ms": med(meas),
        "p90_ms": pct(meas, 0.9),
        "throughput_fps": statistics.fmean(tputs) if tputs else None,
        "round_median_ms": [r["median_ms"] for r in rounds],
        "round_throughput_fps": [r["throughput_fps"] for r in rounds],
        "where": {w: sum(r["where"][w] for r in rounds) for w in ("edge", "local", "fallback")},
        "errors": sorted({e for r in rounds for e in r["errors"]}),
        "frame_accuracy": correct / labelled if labelled else None,
        "measured_ms": meas,
    }
    return out


def skipped_measurement(pred_ms: float, cap_s: float) -> dict[str, Any]:
    return {
        "frames": 0,
        "capped": True,
        "not_run": f"predicted {pred_ms / 1000:.1f} s/frame > cap {cap_s:g} s",
        "median_ms": None,
        "p90_ms": None,
        "throughput_fps": None,
        "round_median_ms": [],
        "round_throughput_fps": [],
        "where": {},
        "errors": [],
        "frame_accuracy": None,
        "measured_ms": [],
    }


# ---- the benchmark --------------------------------------------------------------------------------


class PaperBench:
    """Cells (cached), the servers (started lazily), and the report."""

    def __init__(self, o: Options) -> None:
        self.o = o
        self.out = Path(o.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cells_path = self.out / "paper_cells.json"
        self.cells: dict[str, Any] = {}
        if self.cells_path.is_file() and not o.fresh:
            with contextlib.suppress(ValueError, OSError):
                d = json.loads(self.cells_path.read_text())
                if d.get("schema") == CELLS_SCHEMA:
                    self.cells = d.get("cells", {})
        self.models, self.skipped = available_models(o)
        self.ids = {m: artifact_id(o.artifact(m)) for m in self.models}
        self.sys: System | None = None
        self.cached_hits = 0
        self.measured = 0

    def save_cells(self) -> None:
        tmp = self.cells_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": CELLS_SCHEMA, "cells": self.cells}, indent=1))
        tmp.replace(self.cells_path)

    async def system(self) -> System:
        if self.sys is None:
            self.sys = System(self.o, self.models)
            await self.sys.start()
        return self.sys

    async def cell(self, key: str, fn: Callable[[System], Any]) -> dict[str, Any]:
        """The cached result of cell `key`, else `await fn(system)` (then cached). O(1) when cached."""
        label = " ".join(key.split("|")[:2]) + " " + " ".join(key.split("|")[5:-1])
        if key in self.cells:
            self.cached_hits += 1
            say(self.o, f"[cached] {label}")
            return self.cells[key]
        s = await self.system()
        say(self.o, f"[measuring] {label}")
        res = await fn(s)
        res["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.cells[key] = res
        self.measured += 1
        self.save_cells()
        return res

    def base_key(self, kind: str, m: str, *parts: Any) -> str:
        o = self.o
        return "|".join(
            [
                kind,
                m,
                self.ids.get(m, ""),
                f"K{o.slowdown:g}",
                f"rtt{o.rtt_ms:g}",
                *map(str, parts),
                f"cap{o.plan_cap_s:g}",
            ]
        )

    # ---- 1 + 2: light and heavy load ------------------------------------------------------

    async def measure_plans(
        self,
        s: System,
        m: str,
        plans: dict[str, dict[str, Any]],
        rate: float,
        n: int,
        frame_rate: float | None,
        desc: str,
        min_s: float = 0.0,
    ) -> dict[str, Any]:
        """Measure each distinct plan of `plans` in `rounds` interleaved rounds (each at least
        `min_s` long, within the cap)."""
        distinct: dict[str, dict[str, Any]] = {}
        for name in PLANNERS:
            distinct.setdefault(plan_key(plans[name]), plans[name])
        per_round = max(1, math.ceil(n / self.o.rounds))
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in distinct}
        skipped: dict[str, dict[str, Any]] = {}
        for r in range(self.o.rounds):
            for k, plan in distinct.items():
                if k in skipped:
                    continue
                pred = plan["predicted"]["latency_ms"]
                if pred > self.o.plan_cap_s * 1000:
                    skipped[k] = skipped_measurement(pred, self.o.plan_cap_s)
                    continue
                rounds[k].append(
                    await s.run_fixed_plan(
                        m,
                        plan,
                        rate,
                        per_round,
                        self.o.plan_cap_s,
                        frame_rate=frame_rate,
                        offset=r * per_round,
                        min_s=min_s,
                        desc=f"{desc} {plan.get('planner') or 'dapdee'} r{r + 1}",
                    )
                )
        meas = {k: skipped.get(k) or merge_rounds(v) for k, v in rounds.items()}
        out: dict[str, Any] = {}
        for name in PLANNERS:
            k = plan_key(plans[name])
            same = [b for b in PLANNERS if b != name and plan_key(plans[b]) == k]
            out[name] = {
                "plan": plan_summary(plans[name], s.merged[m]),
                "same_plan_as": same,
                **meas[k],
            }
        return out

    async def light(self, m: str, net: str) -> dict[str, Any]:
        from dapdee.netem import parse_network

        rate = parse_network(net).rate_mbps
        key = self.base_key("light", m, net, f"n{self.o.light_frames}x{self.o.rounds}")

        async def fn(s: System) -> dict[str, Any]:
            req = s.request(m, rate, mode="latency")
            plans = await s.all_plans(m, req)
            res = await self.measure_plans(s, m, plans, rate, self.o.light_frames, None, f"light {m} {net}")
            return {"model": m, "network": net, "rate_mbps": rate, "request": req, "planners": res}

        return await self.cell(key, fn)

    async def heavy(self, m: str, net: str) -> dict[str, Any]:
        from dapdee.netem import parse_network

        rate = parse_network(net).rate_mbps
        key = self.base_key(
            "heavy",
            m,
            net,
            f"n{self.o.heavy_frames}x{self.o.rounds}",
            f"min{self.o.heavy_min_s:g}s",
            f"f{self.o.heavy_factor:g}",
            f"inflight{self.o.max_inflight}+fill2",
        )

        async def fn(s: System) -> dict[str, Any]:
            g = s.merged[m]
            dev = s.baseline(m, s.request(m, rate, mode="throughput"), "device-only")
            offered = self.o.heavy_factor * dev["predicted"]["throughput_fps"]
            final_acc = g.exits[-1].accuracy
            min_acc = None if final_acc is None else round(final_acc - ACC_CLASS, 6)
            req = s.request(m, rate, mode="throughput", frame_rate=offered, min_accuracy=min_acc)
            plans = await s.all_plans(m, req)
            res = await self.measure_plans(
                s, m, plans, rate, self.o.heavy_frames, offered, f"heavy {m} {net}", self.o.heavy_min_s
            )
            return {
                "model": m,
                "network": net,
                "rate_mbps": rate,
                "offered_fps": offered,
                "request": req,
                "planners": res,
            }

        return await self.cell(key, fn)

    # ---- 3: budget sweep (Figure 6) ------------------------------------------------------------

    async def fig6(self, m: str) -> dict[str, Any]:
        from dapdee.netem import parse_network

        net = self.o.fig6_network
        rate = parse_network(net).rate_mbps
        key = self.base_key("fig6", m, net, f"pts{self.o.fig6_points}", f"n{self.o.fig_frames}")

        async def fn(s: System) -> dict[str, Any]:
            fastest = await s.dapdee_plan(m, s.request(m, rate, latency_budget_ms=1e-3))
            final = await s.dapdee_plan(m, s.request(m, rate))
            lo = 0.9 * fastest["predicted"]["latency_ms"]
            hi = 1.15 * final["predicted"]["latency_ms"]
            k = self.o.fig6_points
            budgets = [lo * (hi / lo) ** (i / max(1, k - 1)) for i in range(k)] if hi > lo else [lo, hi]
            final_acc = s.merged[m].exits[-1].accuracy
            points = []
            for i, b in enumerate(budgets):
                plan = await s.dapdee_plan(m, s.request(m, rate, latency_budget_ms=b))
                cls = await s.dapdee_plan(
                    m,
                    s.request(
                        m,
                        rate,
                        latency_budget_ms=b,
                        min_accuracy=None if final_acc is None else round(final_acc - ACC_CLASS, 6),
                    ),
                )
                meas = await self.measure_one(s, m, plan, rate, f"fig6 {m} b{i}")
                points.append(
                    {
                        "budget_ms": b,
                        "plan": plan_summary(plan, s.merged[m]),
                        "class_allowed": bool(cls.get("constraints_met")),
                        **meas,
                    }
                )
            return {
                "model": m,
                "network": net,
                "rate_mbps": rate,
                "final_accuracy": final_acc,
                "points": points,
            }

        return await self.cell(key, fn)

    async def measure_one(self, s: System, m: str, plan: dict[str, Any], rate: float, desc: str) -> dict[str, Any]:
        pred = plan["predicted"]["latency_ms"]
        if pred > self.o.plan_cap_s * 1000:
            return skipped_measurement(pred, self.o.plan_cap_s)
        r = await s.run_fixed_plan(m, plan, rate, self.o.fig_frames, self.o.plan_cap_s, desc=desc)
        return merge_rounds([r])

    # ---- 4: bandwidth sweep (Figure 7) ---------------------------------------------------------

    async def fig7(self, m: str) -> dict[str, Any]:
        bws = self.o.fig7_bandwidths
        key = self.base_key(
            "fig7",
            m,
            "bw" + ",".join(f"{b:g}" for b in bws),
            f"frac{self.o.fig7_budget_frac:g}",
            f"n{self.o.fig_frames}",
        )

        async def fn(s: System) -> dict[str, Any]:
            dev = s.baseline(m, s.request(m, 1.0), "device-only")
            budget = self.o.fig7_budget_frac * dev["predicted"]["latency_ms"]
            points = []
            for b in bws:
                plan = await s.dapdee_plan(m, s.request(m, b, latency_budget_ms=budget))
                meas = await self.measure_one(s, m, plan, b, f"fig7 {m} {b:g}Mbps")
                points.append({"bandwidth_mbps": b, "plan": plan_summary(plan, s.merged[m]), **meas})
            return {
                "model": m,
                "budget_ms": budget,
                "budget_frac_of_device_only": self.o.fig7_budget_frac,
                "points": points,
            }

        return await self.cell(key, fn)

    # ---- 6: adaptation -------------------------------------------------------------------------

    async def adaptation(self, candidates: list[str]) -> dict[str, Any]:
        """The real client loop (its own sensing and re-planning) on a stream while the shaped
        rate changes phase by phase. The model (and mode) is the candidate whose optimal plans
        differ most across the phases (latency mode preferred; throughput mode, a pipelined
        stream, when no model's latency optimum changes)."""
        phases = self.o.adapt_phases
        key = self.base_key("adapt", ",".join(candidates), ",".join(f"{n}:{t:g}" for n, t in phases)) + (
            "" if self.o.adapt_mode == "auto" else f"|{self.o.adapt_mode}"
        )

        async def fn(s: System) -> dict[str, Any]:
            from dapdee.device.client import ClientConfig, DeviceClient
            from dapdee.netem import ShapedUplink, parse_network

            rates = [(n, parse_network(n).rate_mbps, t) for n, t in phases]
            best: tuple[int, str, str, dict[str, Any]] | None = None
            modes = ("latency", "throughput") if self.o.adapt_mode == "auto" else (self.o.adapt_mode,)
            for mode in modes:
                for m in candidates:
                    plans = {n: await s.dapdee_plan(m, s.request(m, r, mode=mode)) for n, r, _ in rates}
                    distinct = len({plan_key(p) for p in plans.values()})
                    if best is None or distinct > best[0]:
                        best = (distinct, m, mode, plans)
                if best is not None and best[0] > 1:
                    break
            assert best is not None
            _, m, mode, plans = best
            pipelined = mode == "throughput"
            optimum: dict[str, Any] = {}
            for n, r, _ in rates:  # the per-condition optimum, measured as a fixed plan
                p = plans[n]
                pred = p["predicted"]["latency_ms"]
                if pred > self.o.plan_cap_s * 1000:
                    meas = skipped_measurement(pred, self.o.plan_cap_s)
                else:
                    meas = merge_rounds(
                        [
                            await s.run_fixed_plan(
                                m,
                                p,
                                r,
                                max(self.o.fig_frames, 8 if pipelined else 1),
                                self.o.plan_cap_s,
                                frame_rate=1e4 if pipelined else None,
                                desc=f"adapt opt {n}",
                            )
                        ]
                    )
                optimum[n] = {
                    "plan": plan_summary(p, s.merged[m]),
                    "median_ms": meas["median_ms"],
                    "p90_ms": meas["p90_ms"],
                    "throughput_fps": meas["throughput_fps"],
                }
            shaper = ShapedUplink(rates[0][1], rtt_ms=self.o.rtt_ms)
            cfg = ClientConfig(
                planner_url=s.planner.url,
                rate_mbps=rates[0][1],
                rtt_ms=self.o.rtt_ms,
                slowdown=self.o.slowdown,
                device_load=0.0,
                mode=mode,
                max_inflight=2 * self.o.max_inflight,
                plan_max_age_s=2.0,
                probe_idle_s=0.5,
                bandwidth_prior_mbps=rates[0][1],
                threads=1,
            )
            client = DeviceClient(cfg, loaded=s.loaded[m], device_graph=s.device_graph[m], shaper=shaper)
            frames = s.frames[m]
            switches: list[dict[str, Any]] = []
            ends = list(itertools.accumulate(t for _, _, t in rates))
            await client.start()
            try:
                t0 = time.monotonic()
                t0_client = t0 - client.started_at

                async def source() -> AsyncIterator[Any]:
                    i = 0
                    phase = 0
                    while True:
                        el = time.monotonic() - t0
                        if el >= ends[-1]:
                            return
                        j = next(k for k, end in enumerate(ends) if el < end)
                        if j != phase:
                            phase = j
                            shaper.set_rate(rates[j][1])
                            switches.append({"t_s": el, "network": rates[j][0], "rate_mbps": rates[j][1]})
                        yield frames[i % len(frames)]
                        i += 1

                from tqdm import tqdm

                with tqdm(desc=f"adapt {m} ({mode})", file=sys.stderr, leave=False, disable=self.o.quiet) as bar:
                    records = await client.run(source(), progress=lambda r: bar.update(1))
            finally:
                await client.close()
            frames_out = [
                {
                    "t_s": r.started_at - t0_client,
                    "measured_ms": r.measured_ms,
                    "predicted_ms": r.predicted_ms,
                    "rate_mbps": r.rate_mbps,
                    "bandwidth_est_mbps": r.bandwidth_est_mbps,
                    "exit": r.exit,
                    "where": r.where,
                    "device_nodes": r.device_nodes,
                    "bytes": r.bytes_sent,
                    "plan_id": r.plan_id,
                }
                for r in records
            ]
            per_phase = {}
            start = 0.0
            for (n, _, t), end in zip(rates, ends, strict=True):
                fr = [f for f in frames_out if start <= f["t_s"] < end]
                half = start + t / 2
                late = [f for f in fr if f["t_s"] >= half]
                done = [f for f in fr if half <= f["t_s"] + f["measured_ms"] / 1000 < end]
                per_phase[n] = {
                    "frames": len(fr),
                    "median_ms_second_half": med([f["measured_ms"] for f in late]),
                    "throughput_fps_second_half": len(done) / (t / 2) if t else None,
                    "optimum_median_ms": optimum[n]["median_ms"],
                    "optimum_throughput_fps": optimum[n]["throughput_fps"],
                    "optimum_predicted_ms": optimum[n]["plan"]["predicted"]["latency_ms"],
                    "optimum_plan": f"{optimum[n]['plan']['exit']} "
                    f"{optimum[n]['plan']['device_nodes']}/{optimum[n]['plan']['exit_nodes']}",
                    "plans_used": sorted({f"{f['exit']} {f['device_nodes']}" for f in late}),
                }
                start = end
            return {
                "model": m,
                "mode": mode,
                "distinct_optimal_plans": best[0],
                "phases": [{"network": n, "rate_mbps": r, "seconds": t} for n, r, t in rates],
                "switches": switches,
                "optimum": optimum,
                "per_phase": per_phase,
                "frames": frames_out,
                "plans": len(client.plans),
                "events": client.events[-50:],
            }

        return await self.cell(key, fn)

    # ---- run everything ------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        o = self.o
        res: dict[str, Any] = {"light": [], "heavy": [], "fig6": [], "fig7": [], "adaptation": None}
        fig6_models = o.fig6_models or self.models
        fig7_models = o.fig7_models or self.models
        adapt_models = [o.adapt_model] if o.adapt_model else self.models
        try:
            for m in self.models:
                for net in o.networks:
                    if "light" in o.only:
                        res["light"].append(await self.light(m, net))
                    if "heavy" in o.only:
                        res["heavy"].append(await self.heavy(m, net))
            for m in fig6_models if "fig6" in o.only else []:
                res["fig6"].append(await self.fig6(m))
            for m in fig7_models if "fig7" in o.only else []:
                res["fig7"].append(await self.fig7(m))
            if adapt_models and o.adapt_phases and "adapt" in o.only:
                res["adaptation"] = await self.adaptation(adapt_models)
        finally:
            if self.sys is not None:
                await self.sys.stop()
        return res


# ---- targets and report ---------------------------------------------------------------------------


def first_of_plan(name: str, v: dict[str, Any]) -> bool:
    """True for the first planner (in PLANNERS order) of those sharing this plan's measurement."""
    return all(PLANNERS.index(b) > PLANNERS.index(name) for b in v.get("same_plan_as", []))


def noise_bands(res: dict[str, Any]) -> dict[str, Any]:
    """Relative spread between repeated rounds of the same plan: |a - b| / mean, over every
    measured plan; the band used is the 90th percentile (latency from light load, throughput
    from heavy load)."""
    lat, thr = [], []
    for cell in res["light"]:
        for k, v in cell["planners"].items():
            if not first_of_plan(k, v) or v.get("capped"):
                continue
            r = [x for x in v.get("round_median_ms", []) if x]
            if len(r) >= 2:
                lat.append(abs(r[0] - r[1]) / statistics.fmean(r[:2]))
    for cell in res["heavy"]:
        for k, v in cell["planners"].items():
            if not first_of_plan(k, v) or v.get("capped"):
                continue
            r = [x for x in v.get("round_throughput_fps", []) if x]
            if len(r) >= 2:
                thr.append(abs(r[0] - r[1]) / statistics.fmean(r[:2]))
    return {
        "latency_band": pct(lat, 0.9) if lat else 0.1,
        "throughput_band": pct(thr, 0.9) if thr else 0.1,
        "latency_samples": len(lat),
        "throughput_samples": len(thr),
        "latency_spreads": lat,
        "throughput_spreads": thr,
    }


def targets(res: dict[str, Any], o: Options) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every target of the issue as lines with ratio and PASS/FAIL."""
    bands = noise_bands(res)
    lb, tb = bands["latency_band"], bands["throughput_band"]
    lines: list[dict[str, Any]] = []

    def add(group: str, what: str, ratio: float | None, ok: bool, note: str = "", info: bool = False) -> None:
        """`info`: a line reported for completeness that no target of the issue requires."""
        lines.append({"group": group, "what": what, "ratio": ratio, "pass": ok, "note": note, "info": info})

    for cell in res["light"]:
        d = cell["planners"]["dapdee"]
        for b in PLANNERS[:-1]:
            v = cell["planners"][b]
            what = f"light {cell['model']} {cell['network']}: DAPDEE/{LABEL[b]} latency"
            if b in d["same_plan_as"]:
                add("light", what, 1.0, True, "same plan")
            elif v["median_ms"] is None:
                ok = d["median_ms"] is not None and d["median_ms"] <= o.plan_cap_s * 1000
                add("light", what, None, ok, f"{LABEL[b]} capped ({v.get('not_run')})")
            elif d["median_ms"] is None:
                add("light", what, None, False, "DAPDEE capped")
            else:
                r = d["median_ms"] / v["median_ms"]
                add("light", what, r, r <= 1 + lb, f"<= {1 + lb:.3f}")
    for cell in res["heavy"]:
        d = cell["planners"]["dapdee"]
        for b in PLANNERS[:-1]:
            v = cell["planners"][b]
            what = f"heavy {cell['model']} {cell['network']}: DAPDEE/{LABEL[b]} throughput"
            if b in d["same_plan_as"]:
                add("heavy", what, 1.0, True, "same plan")
            elif not v["throughput_fps"]:
                add("heavy", what, None, bool(d["throughput_fps"]), f"{LABEL[b]} capped")
            elif not d["throughput_fps"]:
                add("heavy", what, None, False, "DAPDEE capped")
            else:
                r = d["throughput_fps"] / v["throughput_fps"]
                add("heavy", what, r, r >= 1 - tb, f">= {1 - tb:.3f}")
    for cell in res["heavy"]:
        if cell["network"] != "4G":
            continue
        d, dev = cell["planners"]["dapdee"], cell["planners"]["device-only"]
        if d["throughput_fps"] and dev["throughput_fps"]:
            r = d["throughput_fps"] / dev["throughput_fps"]
            pr = d["plan"]["predicted"]["throughput_fps"] / dev["plan"]["predicted"]["throughput_fps"]
            if cell["model"] not in DAG_MODELS:
                scope = " (chain model: informational)"
            elif cell["model"] in CAMERA_SIZE:
                scope = " (camera-size input: informational)"
            else:
                scope = ""
            add(
                "speedup",
                f"heavy {cell['model']} 4G: DAPDEE/Device-Only throughput (K={o.slowdown:g})",
                r,
                r >= 9.9,
                f">= 9.9{scope}; the cost model's own ratio for these plans: {pr:.2f}",
                info=bool(scope),
            )
    # accuracy: wherever the budget (or frame rate) allows the final exit's accuracy class
    acc_checks = []
    for cell in res["fig6"]:
        fa = cell["final_accuracy"]
        for p in cell["points"]:
            if p["class_allowed"] and fa is not None and p["plan"]["exit_accuracy"] is not None:
                acc_checks.append(
                    (f"fig6 {cell['model']} budget {p['budget_ms']:.0f} ms", fa - p["plan"]["exit_accuracy"])
                )
    for cell in res["heavy"] + res["light"]:
        final = cell["planners"]["device-only"]["plan"]["exit_accuracy"]  # the final exit's
        fa = cell["planners"]["dapdee"]["plan"]["exit_accuracy"]
        if final is not None and fa is not None:
            kind = "heavy" if "offered_fps" in cell else "light"
            acc_checks.append((f"{kind} {cell['model']} {cell['network']}", final - fa))
    if acc_checks:
        worst = max(acc_checks, key=lambda x: x[1])
        add(
            "accuracy",
            f"accuracy loss vs final exit, worst of {len(acc_checks)} plans in the class ({worst[0]})",
            worst[1],
            worst[1] <= ACC_CLASS + 1e-9,
            "<= 0.012",
        )
    ad = res.get("adaptation")
    if ad:
        for n, v in ad["per_phase"].items():
            what = f"adaptation {ad['model']} ({ad['mode']}) {n}: DAPDEE"
            if ad["mode"] == "latency" and v["median_ms_second_half"] and v["optimum_median_ms"]:
                r = v["median_ms_second_half"] / v["optimum_median_ms"]
                add("adaptation", f"{what} / optimum plan latency", r, r <= 1 + lb, f"<= {1 + lb:.3f}")
            elif v["throughput_fps_second_half"] and v["optimum_throughput_fps"]:
                r = v["throughput_fps_second_half"] / v["optimum_throughput_fps"]
                add("adaptation", f"{what} / optimum plan throughput", r, r >= 1 - tb, f">= {1 - tb:.3f}")
    fid = fidelity(res)
    if fid["plans"]:
        add(
            "fidelity",
            f"median |pred - meas| / meas over {fid['plans']} sequential plans, light load + sweeps "
            f"(p90 {fid['p90']:.3f})",
            fid["median"],
            fid["median"] <= 0.15,
            "<= 0.15",
        )
    return lines, {**bands, "fidelity": fid}


def fidelity(res: dict[str, Any]) -> dict[str, Any]:
    """Relative error of the predicted latency per measured sequential plan (light load, both
    sweeps): |pred - median measured| / median measured."""
    rows = []
    for cell in res["light"]:
        for k, v in cell["planners"].items():
            if not first_of_plan(k, v):
                continue
            if v["median_ms"]:
                p = v["plan"]["predicted"]["latency_ms"]
                rows.append(
                    {
                        "where": f"light {cell['model']} {cell['network']} {k}",
                        "predicted_ms": p,
                        "measured_ms": v["median_ms"],
                        "rel_error": abs(p - v["median_ms"]) / v["median_ms"],
                    }
                )
    for cell in res["fig6"]:
        for pnt in cell["points"]:
            if pnt["median_ms"]:
                p = pnt["plan"]["predicted"]["latency_ms"]
                rows.append(
                    {
                        "where": f"fig6 {cell['model']} {pnt['budget_ms']:.0f}ms",
                        "predicted_ms": p,
                        "measured_ms": pnt["median_ms"],
                        "rel_error": abs(p - pnt["median_ms"]) / pnt["median_ms"],
                    }
                )
    for cell in res["fig7"]:
        for pnt in cell["points"]:
            if pnt["median_ms"]:
                p = pnt["plan"]["predicted"]["latency_ms"]
                rows.append(
                    {
                        "where": f"fig7 {cell['model']} {pnt['bandwidth_mbps']:g}Mbps",
                        "predicted_ms": p,
                        "measured_ms": pnt["median_ms"],
                        "rel_error": abs(p - pnt["median_ms"]) / pnt["median_ms"],
                    }
                )
    errs = [r["rel_error"] for r in rows]
    return {"plans": len(rows), "median": med(errs), "p90": pct(errs, 0.9), "rows": rows}


def _f(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(
    res: dict[str, Any],
    lines: list[dict[str, Any]],
    info: dict[str, Any],
    o: Options,
    skipped: dict[str, str],
    plots: list[str],
    cmd: str,
) -> str:
    """The Markdown report: setup, one table per experiment, targets."""
    md = [
        "# DAPDEE paper evaluation (measured)",
        "",
        f"Command: `{cmd}` (variant: {o.variant}). Device slowdown **K = {o.slowdown:g}** "
        f"(the device is K x slower than this machine, 1 torch thread); added RTT {o.rtt_ms:g} ms; "
        "uplinks shaped by token bucket on 127.0.0.1 (CAT1 0.13, 3G 1.1, 4G 5.85, WiFi 18.88 Mbit/s). "
        "Planner (uvicorn) and edge worker (its own process) over HTTP, device client with the shaped uplink "
        "and the round trip it senses in every plan request; "
        "real Fashion-MNIST test images; shipped artifacts. "
        f"Light load: {o.light_frames} frames per plan in {o.rounds} interleaved rounds; heavy load: "
        f"{o.heavy_frames} frames per plan (each round streams for at least {o.heavy_min_s:g} s) offered at "
        f"{o.heavy_factor:g} x Device-Only's predicted rate, "
        f"at least {o.max_inflight} in flight (more when the plan's predicted latency / bottleneck needs "
        "more to fill the pipeline, at most 32); every plan's measurement capped at "
        f"{o.plan_cap_s:g} s per round "
        "(capped cells say so; a plan predicted slower than the cap per frame is not run). "
        "Planners with identical plans share one measurement.",
        "",
        f"Noise band (90th percentile of the relative spread between the two rounds of the same plan): "
        f"latency ±{info['latency_band'] * 100:.1f} % ({info['latency_samples']} plans), throughput "
        f"±{info['throughput_band'] * 100:.1f} % ({info['throughput_samples']} plans).",
        "",
    ]
    sensed = {c["model"]: c["request"]["rtt_ms"] for c in res["light"] + res["heavy"]}
    if sensed:
        md += [
            "Round trip in every plan request (the device client's RTT estimate + the fixed per-request "
            "cost its probe pairs measure): " + ", ".join(f"{k} {v:.1f} ms" for k, v in sensed.items()) + ".",
            "",
        ]
    if skipped:
        md += [f"Skipped: {', '.join(f'{k} ({v})' for k, v in skipped.items())}.", ""]
    md += ["## 1. Light load: measured latency, median / p90 ms (exit, device nodes / exit nodes)", ""]
    md += [
        "| model | net | " + " | ".join(LABEL[p] for p in PLANNERS) + " |",
        "|---|---|" + "---|" * len(PLANNERS),
    ]
    for c in res["light"]:
        cells = []
        for p in PLANNERS:
            v = c["planners"][p]
            pl = v["plan"]
            if v["median_ms"] is None:
                s = f"capped (pred {pl['predicted']['latency_ms']:.0f})"
            else:
                s = f"{v['median_ms']:.1f} / {v['p90_ms']:.1f}" + (" (capped)" if v["capped"] else "")
            s += f" ({pl['exit']}, {pl['device_nodes']}/{pl['exit_nodes']})"
            cells.append(s)
        md.append(f"| {c['model']} | {c['network']} | " + " | ".join(cells) + " |")
    md += [
        "",
        "Exit accuracy (held-out test split) of DAPDEE's plans: "
        + ", ".join(
            f"{c['model']} {c['network']} {c['planners']['dapdee']['plan']['exit']} "
            f"{_f(c['planners']['dapdee']['plan']['exit_accuracy'], '.4f')} "
            f"(frames {_f(c['planners']['dapdee']['frame_accuracy'], '.2f')})"
            for c in res["light"]
        ),
        "",
    ]
    md += ["## 2. Heavy load: measured throughput, frames/s (median latency ms; exit)", ""]
    md += [
        "| model | net | offered fps | " + " | ".join(LABEL[p] for p in PLANNERS) + " |",
        "|---|---|---|" + "---|" * len(PLANNERS),
    ]
    for c in res["heavy"]:
        cells = []
        for p in PLANNERS:
            v = c["planners"][p]
            if not v["throughput_fps"]:
                s = "capped"
            else:
                s = f"{v['throughput_fps']:.2f} ({_f(v['median_ms'])}; {v['plan']['exit']})"
                s += " (capped)" if v["capped"] else ""
            cells.append(s)
        md.append(f"| {c['model']} | {c['network']} | {c['offered_fps']:.1f} | " + " | ".join(cells) + " |")
    md += [
        "",
        "## 3. Figure 6 analogue: latency budget at 3G",
        "",
        "| model | budget ms | exit | exit acc | device/exit nodes | bytes | pred ms | meas ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["fig6"]:
        for p in c["points"]:
            pl = p["plan"]
            md.append(
                f"| {c['model']} | {p['budget_ms']:.1f} | {pl['exit']} | {_f(pl['exit_accuracy'], '.4f')} | "
                f"{pl['device_nodes']}/{pl['exit_nodes']} | {pl['bytes']} | "
                f"{pl['predicted']['latency_ms']:.1f} | {_f(p['median_ms'])} |"
            )
    md += [
        "",
        "## 4. Figure 7 analogue: bandwidth sweep at a fixed budget",
        "",
        f"Budget = {o.fig7_budget_frac:g} x the Device-Only latency of the final exit (predicted); "
        "DAPDEE's plan per bandwidth (latency mode).",
        "",
        "| model | budget ms | Mbit/s | exit | device/exit nodes | bytes sent | device FLOPs share "
        "| pred ms | meas ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["fig7"]:
        for p in c["points"]:
            pl = p["plan"]
            md.append(
                f"| {c['model']} | {c['budget_ms']:.0f} | {p['bandwidth_mbps']:g} | {pl['exit']} | "
                f"{pl['device_nodes']}/{pl['exit_nodes']} | {pl['bytes']} | {pl['device_flops_frac']:.2f} | "
                f"{pl['predicted']['latency_ms']:.1f} | {_f(p['median_ms'])} |"
            )
    fid = info["fidelity"]
    md += [
        "",
        "## 5. Prediction fidelity",
        "",
        f"{fid['plans']} measured sequential plans: median relative error {_f(fid['median'], '.3f')}, "
        f"p90 {_f(fid['p90'], '.3f')}.",
        "",
    ]
    ad = res.get("adaptation")
    if ad:
        md += [
            "## 6. Adaptation (real client loop, bandwidth changes during the stream)",
            "",
            f"Model {ad['model']}, {ad['mode']} mode (chosen as the model whose optimal plans differ most "
            f"across the phases: {ad['distinct_optimal_plans']} distinct); the client sensed the link itself "
            f"and requested {ad['plans']} plans; "
            "phases " + ", ".join(f"{p['network']} {p['seconds']:g} s" for p in ad["phases"]) + ".",
            "",
            "| phase | frames | DAPDEE plans used (2nd half: exit, device nodes) | measured median ms "
            "| frames/s | optimum plan | its measured median ms | its frames/s | its predicted ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for n, v in ad["per_phase"].items():
            md.append(
                f"| {n} | {v['frames']} | {', '.join(v['plans_used'])} | {_f(v['median_ms_second_half'])} | "
                f"{_f(v['throughput_fps_second_half'])} | {v['optimum_plan']} | "
                f"{_f(v['optimum_median_ms'])} | "
                f"{_f(v['optimum_throughput_fps'])} | {_f(v['optimum_predicted_ms'])} |"
            )
        md.append("")
    md += ["## Targets", "", "```"]
    md += [format_target(t) for t in lines]
    md += ["```", ""]
    strict = [t for t in lines if t["group"] in ("light", "heavy") and t["ratio"] is not None]
    strict_ok = [t for t in strict if (t["ratio"] <= 1.0 if t["group"] == "light" else t["ratio"] >= 1.0)]
    required = [t for t in lines if not t.get("info")]
    short = sum(not t["pass"] for t in lines if t.get("info"))
    md += [
        f"{sum(t['pass'] for t in required)} PASS, {sum(not t['pass'] for t in required)} FAIL of the required "
        f"target lines ({short} informational line(s) short of 9.9x, see their notes). Without the noise "
        f"band (ratio <= 1 for latency, >= 1 for throughput): {len(strict_ok)} of {len(strict)} "
        "baseline comparisons hold (identical plans count as 1.000).",
        "",
    ]
    if plots:
        md += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    return "\n".join(md)


def format_target(t: dict[str, Any]) -> str:
    r = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
    return f"{'PASS' if t['pass'] else 'FAIL'}  {t['what']}: {r} {t['note']}".rstrip()


def main(argv: list[str] | None = None) -> int:
    o = build_options(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in (
        "dapdee.edge",
        "dapdee.edge.registration",
        "dapdee.device",
        "httpx",
        "dapdee.planner",
        "uvicorn.error",
    ):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    cmd = "python bench/paper.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.monotonic()
    bench = PaperBench(o)
    if not bench.models:
        print(f"no artifacts found for {', '.join(o.models)}", file=sys.stderr)
        return 2
    res = asyncio.run(bench.run())
    lines, info = targets(res, o)
    out = Path(o.out)
    plots: list[str] = []
    if o.plots:
        try:
            from dapdee.bench.paper_plots import make_plots

            plots = make_plots(res, out, o.slowdown)
        except Exception as exc:  # plots are a convenience: never lose the numbers
            print(f"warning: plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    doc = {
        "setup": {
            **asdict(o),
            "planners": list(PLANNERS),
            "noise": {k: v for k, v in info.items() if k != "fidelity"},
        },
        "skipped": bench.skipped,
        "results": res,
        "fidelity": info["fidelity"],
        "targets": lines,
        "plots": plots,
        "cells_cached": bench.cached_hits,
        "cells_measured": bench.measured,
        "wall_s": time.monotonic() - t0,
    }
    (out / "paper.json").write_text(json.dumps(doc, indent=1))
    md = markdown(res, lines, info, o, bench.skipped, plots, cmd)
    (out / "paper.md").write_text(md)
    print(md)
    print(
        f"{bench.measured} cells measured, {bench.cached_hits} from cache; {time.monotonic() - t0:.0f} s; "
        f"wrote {out / 'paper.json'}, {out / 'paper.md'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
