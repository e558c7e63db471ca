"""The running system the paper bench measures, through public interfaces only.

- `Services`: the planner and one edge worker as `dapdee serve` subprocesses on 127.0.0.1 (the
  planner with its in-process store, no Redis; the edge worker profiles its models, measures its
  per-request cost and registers both), closed by a random token of this run that every part
  shares. The bench talks to them with the SDK (`dapdee.client`).
- `Device`: one emulated device tier of one model: the model, its profile at slowdown K (the
  device runtime's own `measure_device_profile`, cached on disk), the tier name, and what the
  device runtime sensed and published when it started against the services (`open_device`:
  round trips and probe pairs, its per-request CPU cost `device_request_ms`).
- `System`: both, plus the plan requests every planner is asked with: DAPDEE's plans from
  `POST /plan`, the baselines' from `POST /plan {"baseline": NAME}` over the same merged profiles.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dapdee.bench.paperbench.options import Options
from dapdee.bench.paperbench.plans import BASELINES
from dapdee.client import AsyncPlannerClient
from dapdee.costgraph import CostGraph
from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig, default_tier
from dapdee.device.frames import DatasetSource, FrameFormat
from dapdee.device.profile import device_profile
from dapdee.device.session import DeviceSettings, open_device
from dapdee.device.types import Frame
from dapdee.models import LoadedModel, load_model
from dapdee.netem import NETWORKS
from dapdee.testing import ServiceProcess, wait_registered

log = logging.getLogger("dapdee.bench.paper")

START_TIMEOUT_S = 600.0  # the edge worker profiles every model before it registers


def say(o: Options, *a: Any) -> None:
    """Progress on stderr unless the options ask for quiet."""
    if not o.quiet:
        print(*a, file=sys.stderr, flush=True)


class Services:
    """Planner and edge worker as `dapdee serve` subprocesses sharing one random token; with
    `o.cpu_split`, the worker on its CPUs."""

    def __init__(self, o: Options, models: list[str]) -> None:
        self.token = secrets.token_urlsafe(24)
        env = {"DAPDEE_API_TOKEN": self.token}
        edge_cpus = every_cpu = None
        if o.cpu_split:
            edge_cpus = ",".join(map(str, o.cpu_split[0]))
            every_cpu = ",".join(map(str, sorted(o.cpu_split[0] + o.cpu_split[1])))
        # The planner works between measurements only, so it gets every CPU back (it would inherit
        # this process's, the device's; its plan-map builds run in processes of their own). Its plan
        # budget is a service's guard, not under test here: the DADS baseline's min-cuts on
        # Inception take over the default 1 s on this host.
        planner_env = {**env, "DAPDEE_WORKER_TTL_S": "30", "DAPDEE_PLAN_BUDGET_S": "60"}
        self.planner_proc = ServiceProcess("planner", ["--redis-url", "none"], "/healthz", planner_env, cpus=every_cpu)
        cache = profile_dir(o)
        if o.fresh:  # the host's speed drifts between runs: profiles measured in this run only
            shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        args = [
            "--models", ",".join(f"@{o.artifact(m)}" for m in models), "--planner", self.planner_proc.url,
            "--profile-repeats", str(o.profile_repeats), "--profile-cache", str(cache),
            "--request-passes", str(o.profile_passes),
            "--workers", "1", "--threads", "1",
            # batch 1, as the cost model prices a request: a batching worker answers a heavy stream
            # faster than any plan predicts (AlexNet Edge-Only at 4G: 1.6x), which is not the model's error
            "--batch-max", "1",
        ]  # fmt: skip
        # its own process, as on its own machine: in the device's process it would share one GIL
        self.edge_proc = ServiceProcess(
            "edge",
            args,
            "/v2/health/live",
            {**env, "DAPDEE_EDGE_HEARTBEAT_S": "1", "DAPDEE_EDGE_PROFILE_WARMUP": "2"},
            cpus=edge_cpus,
        )
        self.models = models
        self.planner: AsyncPlannerClient | None = None

    @property
    def planner_url(self) -> str:
        return self.planner_proc.url

    @property
    def edge_url(self) -> str:
        return self.edge_proc.url

    @property
    def edge_pid(self) -> int:
        """The edge worker's process id (`taskset` execs into the service: the same process)."""
        assert self.edge_proc.proc is not None, "the edge worker has not been started"
        return self.edge_proc.proc.pid

    async def start(self) -> None:
        """Start both, then wait until the edge worker has registered every model with its
        profile (it profiles them first). O(models x profiling)."""
        await asyncio.to_thread(self.planner_proc.start, 60.0)
        await asyncio.to_thread(self.edge_proc.start, START_TIMEOUT_S)
        self.planner = AsyncPlannerClient(self.planner_url, self.token, timeout=30.0)
        for m in self.models:
            await asyncio.to_thread(wait_registered, self.planner_url, m, [self.edge_url], START_TIMEOUT_S, self.token)

    async def stop(self) -> None:
        if self.planner is not None:
            await self.planner.aclose()
        self.edge_proc.stop()
        self.planner_proc.stop()


@dataclass(frozen=True)
class Device:
    """One emulated device tier of one model (see the module docstring)."""

    model: str
    slowdown: float
    loaded: LoadedModel
    graph: CostGraph  # the device profile at `slowdown`
    tier: str
    request_rtt_ms: float  # the round trip the device runtime states in its plan requests
    device_request_ms: float | None  # the per-request CPU cost it published (cost model v2)
    edge_request_ms: float | None  # the edge worker's, from its published profile
    # its whole-frame calibration: ratio and the bursts behind it and behind edge_request_ms
    edge_calibration: dict[str, Any]

    @property
    def overheads(self) -> dict[str, Any]:
        """Cost model v2's per-request costs the planner prices for this device and the edge,
        and the edge's calibration to whole frames (`edge_calibration`)."""
        return {"device_request_ms": self.device_request_ms, "edge_request_ms": self.edge_request_ms,
                "edge_calibration": self.edge_calibration}  # fmt: skip


def profile_dir(o: Options) -> Path:
    """Where the device's and the edge worker's profiles are cached: one folder per profiling
    preset (repeats x passes), as the cells measured on them are keyed (`Bench.key`); a profile
    cache checks only the model, K and threads."""
    return Path(o.out) / "profiles" / f"rep{o.profile_repeats}x{o.profile_passes}"


def _profile(o: Options, loaded: LoadedModel, slowdown: float) -> CostGraph:
    """The device profile at `slowdown` (the median of `profile_passes` passes), cached under
    `profile_dir` (re-measured when the cache no longer matches the model)."""
    path = profile_dir(o) / f"{loaded.name}.{default_tier(slowdown)}.device.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return device_profile(loaded, slowdown, path, o.profile_repeats, o.profile_passes)
    except ValueError:  # a stale cache (another artifact): measure again
        path.unlink(missing_ok=True)
        return device_profile(loaded, slowdown, path, o.profile_repeats, o.profile_passes)


class System:
    """The services, the devices (one per model and K, made on first use) and the frames."""

    def __init__(self, o: Options, models: list[str]) -> None:
        self.o = o
        self.services = Services(o, models)
        self.loaded: dict[str, LoadedModel] = {}
        self.frames: dict[str, list[Frame]] = {}
        self.graphs: dict[str, CostGraph] = {}  # the planner's stored graph of each model
        self.devices: dict[tuple[str, float], Device] = {}

    @property
    def planner(self) -> AsyncPlannerClient:
        assert self.services.planner is not None, "start() first"
        return self.services.planner

    async def start(self) -> None:
        """Load every model (fx-traced before any server runs), its test frames, start the
        services and read back the graphs the planner stores."""
        n = max(self.o.light_frames, self.o.heavy_frames, self.o.fig_frames, 64)
        for m in self.services.models:
            self.loaded[m] = loaded = load_model("", weights=str(self.o.artifact(m)), name=m)
            if (loaded.manifest or {}).get("name") != m:
                raise ValueError(f"artifact {self.o.artifact(m)}: its manifest names another model than {m!r}")
            self.frames[m] = list(DatasetSource("fashion-mnist", FrameFormat.of(loaded), n))
        say(self.o, "starting the planner and the edge worker (it profiles its models) ...")
        await self.services.start()
        for m in self.services.models:
            self.graphs[m] = (await self.planner.get_model(m)).graph

    async def stop(self) -> None:
        await self.services.stop()

    async def device(self, m: str, slowdown: float | None = None) -> Device:
        """The device of model `m` at slowdown K (default: the bench's): profiled, then started
        once against the services as a live device starts, so that it senses its link and
        publishes its profile with its per-request cost. O(profiling) the first time."""
        k = self.o.slowdown if slowdown is None else slowdown
        if (m, k) not in self.devices:
            say(self.o, f"{m}: device at K={k:g}: profiling and publishing ...")
            graph = await asyncio.to_thread(_profile, self.o, self.loaded[m], k)
            self.devices[(m, k)] = await self._publish(m, k, graph)
            d = self.devices[(m, k)]
            say(self.o, f"{m} K={k:g}: request round trip {d.request_rtt_ms:.1f} ms, {d.overheads}")
        return self.devices[(m, k)]

    async def _publish(self, m: str, k: float, graph: CostGraph) -> Device:
        """Start a device runtime on the fastest shaped uplink (it probes the link, measures its
        per-request CPU time and uploads its profile), read what it sensed, stop it."""
        rate = max(NETWORKS.values())
        tier = default_tier(k)
        svc = self.services
        settings = DeviceSettings(
            runtime=RuntimeConfig(Requirements(mode="latency")),
            planner=PlannerConfig(svc.planner_url, tier, svc.token, svc.token, ready_timeout_s=60.0),
            model=m, slowdown=k, rate_mbps=rate, rtt_ms=self.o.rtt_ms, device_load=0.0,
            bandwidth_prior_mbps=rate, probe_rounds=self.o.probe_rounds,
        )  # fmt: skip
        async with open_device(settings, self.loaded[m], graph) as runtime:
            rtt = runtime.sensing.request_rtt_ms
        profiles = (await self.planner.list_profiles(m)).profiles
        mine, edge = profiles[tier].meta or {}, profiles["edge"].meta or {}
        calibration = {key: edge.get(key) for key in ("calibration", "frame_ms_passes", "edge_request_ms_passes")}
        return Device(
            m, k, self.loaded[m], graph, tier, rtt, mine.get("device_request_ms"), edge.get("edge_request_ms"),
            calibration,
        )  # fmt: skip

    # ---- plans ------------------------------------------------------------------------------------

    def request(self, dev: Device, rate: float, **kw: Any) -> dict[str, Any]:
        """A plan request at a known uplink (the shaped rate), zero device and edge load, and the
        round trip the device runtime states (see `Device`); `kw` adds requirements."""
        body = {
            "model": dev.model,
            "device_tier": dev.tier,
            "bandwidth_mbps": rate,
            "rtt_ms": dev.request_rtt_ms,
            "device_load": 0.0,
            "edge_load": 0.0,
            "mode": "latency",
        }
        body.update({k: v for k, v in kw.items() if v is not None})
        return body

    async def plan(self, req: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
        """The plan JSON for `req`: DAPDEE's (`POST /plan`), or baseline `baseline`'s."""
        body = {**req, "baseline": baseline} if baseline else req
        plan = (await self.planner.plan(body)).model_dump(mode="json")
        for key in ("lease", "progressive"):  # absent from the answer, not null
            if plan.get(key) is None:
                plan.pop(key, None)
        pred = plan["predicted"]
        plan["predicted"] = {k: v for k, v in pred.items() if v is not None or not k.startswith("expected")}
        return plan

    async def all_plans(self, req: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Every compared planner's plan for `req`."""
        plans = {b: await self.plan(req, b) for b in BASELINES}
        plans["dapdee"] = await self.plan(req)
        return plans
