"""Load benchmark: many device clients against one planner and several edge workers.

The planner (`dapdee serve planner`, in-process store unless --redis-url) and each edge worker
(`dapdee serve edge --planner ...`, one torch thread, profiled at start-up and registered
through heartbeats) run as their own processes on free 127.0.0.1 ports. This process runs
`--clients` device runtimes (`dapdee.device.session.open_device`, sharing one loaded model and
one device profile, emulated `--slowdown` K) concurrently on one event loop, each classifying
`--frames` random frames. Everything stops by itself.

Reports: frames answered / lost, client errors, frames finished by the edge vs locally
(fallback), p50 / p99 of the measured per-frame latency, and each edge worker's share of the
infer requests (from its own Prometheus counters). The target: 32 clients x 200
frames, two workers -> zero errors, every frame answered.

Usage: python bench/load.py [--clients 32] [--frames 200] [--workers 2] [--spec zoo:alexnet?width=0.25]
       (or `dapdee bench load ...`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from dapdee.testing import ServiceProcess, wait_registered

DEFAULT_SPEC = "zoo:alexnet?width=0.25"


def planner_service(redis_url: str | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
    return ServiceProcess("planner", ["--redis-url", redis_url or "none"], "/readyz", env)


def edge_service(
    spec: str, planner_url: str | None, tier: str = "edge", extra: list[str] | None = None
) -> ServiceProcess:
    args = ["--models", spec, "--threads", "1", "--tier", tier, "--profile-repeats", "3"]
    if planner_url:
        args += ["--planner", planner_url]
    return ServiceProcess("edge", args + list(extra or []), "/v2/health/ready", {"DAPDEE_EDGE_HEARTBEAT_S": "1"})


def served_requests(url: str) -> float:
    """Successful infer requests a worker has answered (its dapdee_edge_requests_total, 200s)."""
    import httpx

    from dapdee.web import scrape

    samples = scrape.parse(httpx.get(f"{url}/metrics", timeout=5).text)
    return scrape.total(samples, "dapdee_edge_requests_total", status="200")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank. O(n log n)."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


@dataclass
class LoadConfig:
    clients: int = 32
    frames: int = 200
    workers: int = 2
    spec: str = DEFAULT_SPEC
    slowdown: float = 100.0
    mode: str = "latency"
    redis_url: str | None = None
    plan_max_age_s: float = 2.0
    timeout_floor_ms: float = 5000.0


@dataclass
class LoadResult:
    frames_expected: int
    frames_answered: int
    client_errors: list[str]
    where: dict[str, int]
    p50_ms: float
    p99_ms: float
    wall_s: float
    worker_requests: dict[str, float]
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    @property
    def frames_lost(self) -> int:
        return self.frames_expected - self.frames_answered

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "events"}
        d["frames_lost"] = self.frames_lost
        total = sum(self.worker_requests.values()) or 1.0
        d["worker_share"] = {u: round(n / total, 3) for u, n in self.worker_requests.items()}
        d["edge_frame_share"] = round(self.where.get("edge", 0) / max(1, self.frames_answered), 3)
        d["frames_per_s"] = round(self.frames_answered / self.wall_s, 1) if self.wall_s else None
        return d


async def run_clients(
    cfg: LoadConfig, planner_url: str, loaded: Any, device_graph: Any
) -> tuple[list[list[Any]], list[str], float, list[str]]:
    """Run cfg.clients device runtimes concurrently, cfg.frames random frames each. Returns the
    per-client records, client errors, wall seconds and the clients' notable events."""
    from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig, default_tier
    from dapdee.device.frames import FrameFormat, random_frames
    from dapdee.device.session import DeviceSettings, open_device

    runtime = RuntimeConfig(
        Requirements(mode=cfg.mode), plan_max_age_s=cfg.plan_max_age_s, timeout_floor_ms=cfg.timeout_floor_ms
    )
    planner = PlannerConfig(planner_url, default_tier(cfg.slowdown), ready_timeout_s=60.0)
    settings = DeviceSettings(runtime, planner, cfg.spec, slowdown=cfg.slowdown, device_load=0.0)

    async def one(i: int) -> tuple[list[Any], list[str]]:
        async with open_device(settings, loaded, device_graph) as rt:
            return await rt.run(random_frames(FrameFormat.of(loaded), cfg.frames, seed=i)), rt.events

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(cfg.clients)), return_exceptions=True)
    wall = time.perf_counter() - t0
    records, errors, events = [], [], []
    for r in results:
        if isinstance(r, BaseException):
            errors.append(f"{type(r).__name__}: {r}")
            records.append([])
        else:
            records.append(r[0])
            events += r[1]
    return records, errors, wall, events


def summarize_load(
    cfg: LoadConfig,
    records: list[list[Any]],
    errors: list[str],
    wall: float,
    worker_requests: dict[str, float],
) -> LoadResult:
    flat = [r for rs in records for r in rs]
    answered = sum(1 for r in flat if r.pred_class >= 0)
    where: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in flat:
        where[r.where] = where.get(r.where, 0) + 1
        if r.where == "fallback":
            reason = (r.error or "?")[:80]
            reasons[reason] = reasons.get(reason, 0) + 1
    lat = [r.measured_ms for r in flat] or [float("nan")]
    return LoadResult(
        frames_expected=cfg.clients * cfg.frames,
        frames_answered=answered,
        client_errors=errors,
        where=where,
        p50_ms=round(statistics.median(lat), 3),
        p99_ms=round(percentile(lat, 0.99), 3),
        wall_s=round(wall, 2),
        worker_requests=worker_requests,
        fallback_reasons=reasons,
    )


def run_load(cfg: LoadConfig) -> LoadResult:
    """Start planner + cfg.workers edge workers, run the clients, stop everything."""
    import torch

    from dapdee.models import load_model
    from dapdee.profiler import profile_model

    torch.set_num_threads(1)
    loaded = load_model(cfg.spec)
    device_graph = profile_model(loaded, "device", slowdown=cfg.slowdown, threads=1, repeats=3, warmup=1)
    planner = planner_service(cfg.redis_url).start()
    edges: list[ServiceProcess] = []
    try:
        for _ in range(cfg.workers):
            edges.append(edge_service(cfg.spec, planner.url).start())
        wait_registered(planner.url, loaded.name, [e.url for e in edges])
        before = {e.url: served_requests(e.url) for e in edges}
        records, errors, wall, events = asyncio.run(run_clients(cfg, planner.url, loaded, device_graph))
        served = {e.url: served_requests(e.url) - before[e.url] for e in edges}
        res = summarize_load(cfg, records, errors, wall, served)
        res.events = events
        return res
    finally:
        for e in edges:
            e.stop()
        planner.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--spec", default=DEFAULT_SPEC)
    p.add_argument(
        "--slowdown",
        type=float,
        default=100.0,
        help="device K x slower than this machine (the edge pays off)",
    )
    p.add_argument("--mode", default="latency", choices=["auto", "latency", "throughput"])
    p.add_argument("--redis-url", default=None, help="planner's Redis (default: in-process store)")
    p.add_argument("--json", action="store_true", help="print the result as JSON only")
    a = p.parse_args(argv)
    if a.clients < 1 or a.frames < 1 or a.workers < 1:
        raise SystemExit("--clients, --frames and --workers must be >= 1")
    cfg = LoadConfig(a.clients, a.frames, a.workers, a.spec, a.slowdown, a.mode, a.redis_url)
    res = run_load(cfg).as_dict()
    if a.json:
        print(json.dumps(res, indent=2))
        return 0 if not res["client_errors"] and res["frames_lost"] == 0 else 1
    print(
        f"load: {cfg.clients} clients x {cfg.frames} frames, {cfg.workers} edge workers, {cfg.spec}, K={cfg.slowdown:g}"
    )
    print(
        f"  frames answered {res['frames_answered']}/{res['frames_expected']} (lost {res['frames_lost']}), "
        f"client errors {len(res['client_errors'])}"
    )
    print(f"  where: {res['where']}  (edge share of frames {res['edge_frame_share']:.1%})")
    if res["fallback_reasons"]:
        print(f"  edge failures finished locally: {res['fallback_reasons']}")
    print(
        f"  latency p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms; "
        f"{res['frames_per_s']} frames/s over {res['wall_s']} s"
    )
    for url, share in res["worker_share"].items():
        print(f"  worker {url}: {res['worker_requests'][url]:.0f} infer requests ({share:.1%})")
    for e in res["client_errors"][:5]:
        print(f"  error: {e}")
    return 0 if not res["client_errors"] and res["frames_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
