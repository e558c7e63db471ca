"""The services of the fleet benchmark: a private Redis, one edge worker and a planner, each a
subprocess on 127.0.0.1 (`dapdee serve ...` through `dapdee.testing.ServiceProcess`), closed
with random admin, device and worker tokens.

- The edge worker serves every model of the run (`SPEC@ARTIFACT`), with ONE compute slot
  (`--workers 1`), one torch thread, and no batching (`--batch-max 1`): the targets' "limited
  to 1 compute slot", and batch 1 is the cost the planner books per frame (`edge_ms_per_frame`
  = Σ edge_ms + the worker's own measured `edge_request_ms`, both at batch 1), so the leases'
  arithmetic and the worker's real cost are the same thing.
- Both services are restarted for every run (`fresh`), on the same ports, the planner with a
  fresh Redis key prefix (no lease, plan map or profile of an earlier run survives) and the
  run's settings (fleet planning on or off). The worker is restarted too because what it
  measures under load is state: its advertised capacity rises at once when it is overloaded
  and falls back only after a minute of relief, so a worker kept across runs would start the
  run after an overloading baseline with a fraction of its capacity.
- Its price is measured once per `FleetStack` (one benchmark invocation), not per run: the
  first start profiles the nodes (or reads them from `profile_cache`), calibrates them to
  whole frames and measures its per-request cost, as any worker start does; the edge profile
  it registers with the planner (calibrated `edge_ms`, `meta` with `calibration` and
  `edge_request_ms`) is then written to a private profile cache that every later start reads,
  with no request samples (`DAPDEE_EDGE_REQUEST_SAMPLES=0`: no re-calibration, no re-measured
  request cost). Every run's planner therefore plans and books with the same edge price, and
  every run's worker prices its requests for its capacity meter (κ) with it (re-measured at
  each start, it would be a per-run draw that only the systems planning with it, fleet and
  independent, pay). Each run's result records the price it ran with (runner.py).
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from dapdee.api.planner import StoredProfile
from dapdee.client import EdgeClient, PlannerClient
from dapdee.costgraph import CostGraph
from dapdee.edge_worker.registration import profile_path
from dapdee.testing import RedisProcess, ServiceProcess, unique_prefix, wait_registered
from dapdee.web import scrape

EDGE_TIER = "edge"
PLANNER_NICENESS = 10  # see FleetStack.__init__


@dataclass(frozen=True)
class Tokens:
    """The three role tokens both services read from their environment."""

    admin: str
    device: str
    worker: str

    @classmethod
    def new(cls) -> Tokens:
        return cls(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(24))

    def env(self) -> dict[str, str]:
        return {
            "DAPDEE_ADMIN_TOKEN": self.admin,
            "DAPDEE_DEVICE_TOKEN": self.device,
            "DAPDEE_WORKER_TOKEN": self.worker,
        }


@dataclass(frozen=True)
class EdgeCounters:
    """The worker's cumulative counters at one instant (its /metrics)."""

    busy_s: float  # dapdee_edge_compute_busy_seconds_total
    slots: float  # dapdee_edge_compute_slots
    requests: dict[str, float]  # status -> infer requests
    # reason -> requests refused before decoding, and "expired": not computed, past their timeout
    rejected: dict[str, float]


def parse_edge_counters(text: str) -> EdgeCounters:
    """The counters the benchmark reads from a worker's /metrics text."""
    samples = scrape.parse(text)
    busy = scrape.total(samples, "dapdee_edge_compute_busy_seconds_total")
    slots = scrape.total(samples, "dapdee_edge_compute_slots") or 1.0
    requests = scrape.by_label(samples, "dapdee_edge_requests_total", "status")
    rejected = scrape.by_label(samples, "dapdee_edge_rejected_total", "reason")
    rejected["expired"] = scrape.total(samples, "dapdee_edge_expired_total")
    return EdgeCounters(busy, slots, requests, rejected)


PLANNER_COUNTERS = (
    "dapdee_planner_plans_total",
    "dapdee_planner_planmap_builds_total",
    "dapdee_planner_rebalances_total",
)


# results of dapdee_planner_rebalances_total for a heartbeat whose capacity the leases overbook
CAPACITY_DROPS = ("shed", "forced")


def parse_planner_counters(text: str) -> dict[str, float]:
    """The planner's totals the benchmark reads (plans answered, plan maps built, rebalances;
    capacity drops registered with their leases re-solved, `drops_shed`, or over them,
    `drops_forced`)."""
    samples = scrape.parse(text)
    out = {name.removeprefix("dapdee_planner_"): scrape.total(samples, name) for name in PLANNER_COUNTERS}
    by_result = scrape.by_label(samples, "dapdee_planner_rebalances_total", "result")
    return out | {f"drops_{r}": by_result.get(r, 0.0) for r in CAPACITY_DROPS}


class FleetStack:
    """Redis (started by `start`) + a planner and one edge worker per run (`fresh`).
    A context manager; `stop` ends everything it started. `profile_cache`: where the first
    worker start reads or caches its node profile (default: a private temporary folder, removed
    by `stop`); the calibrated profile later starts read is always private (module docstring).
    `edge_profiles`: each model's edge profile as the first start registered it (None before);
    `device_profiles`: each (model, K, tier)'s device profile as its first run published it.
    `request_passes`: bursts behind the worker's whole-frame calibration and request cost (the
    median of each is kept)."""

    def __init__(
        self,
        artifacts: Sequence[Path],
        profile_repeats: int = 20,
        request_samples: int = 50,
        profile_cache: Path | None = None,
        request_passes: int = 1,
    ) -> None:
        self.tokens = Tokens.new()
        self.redis = RedisProcess()
        # The planner has a machine of its own in a deployment; here it shares two cores with the
        # worker under test, so it runs at a lower priority: its rebalance and re-plan bursts must
        # not slow the worker (whose measured capacity, and so the fleet's plans, would follow).
        self.planner = ServiceProcess("planner", [], "/readyz", {}, log_level="error", niceness=PLANNER_NICENESS)
        self._private = tempfile.TemporaryDirectory(prefix="fleet-edge-")
        self.profile_cache = profile_cache if profile_cache is not None else Path(self._private.name) / "nodes"
        self.calibrated_cache = Path(self._private.name) / "calibrated"
        self.edge_profiles: dict[str, StoredProfile] | None = None
        # each (model, K, device tier)'s device profile as its first run published it (`runner`)
        self.device_profiles: dict[tuple[str, float, str], StoredProfile] = {}
        models = ",".join(f"@{a}" for a in artifacts)
        args = ["--models", models, "--workers", "1", "--batch-max", "1", "--threads", "1", "--tier", EDGE_TIER]
        args += ["--planner", self.planner.url, "--profile-repeats", str(profile_repeats)]
        env = {
            "DAPDEE_EDGE_HEARTBEAT_S": "1",
            "DAPDEE_EDGE_REQUEST_SAMPLES": str(request_samples),
            "DAPDEE_EDGE_REQUEST_PASSES": str(request_passes),
            "DAPDEE_EDGE_PROFILE_CACHE": str(self.profile_cache),
        }
        self.edge = ServiceProcess("edge", args, "/v2/health/ready", {**self.tokens.env(), **env}, log_level="error")
        self.prefix = ""

    def start(self) -> FleetStack:
        self.redis.start()
        return self

    def fresh(self, settings: Mapping[str, str], timeout_s: float = 180.0, log_file: Path | None = None) -> str:
        """(Re)start the planner with `settings` (DAPDEE_* variables) and a fresh key prefix, then
        the edge worker, and wait until the worker has registered every model it serves with the
        planner; after the first start, keep the edge profiles it registered for every later one
        (`keep_calibration`). `log_file`: the planner's log, at INFO (what each rebalance and
        capacity drop did); without one it logs errors only, to this process's standard error.
        Returns the planner's URL."""
        self.planner.stop()
        self.edge.stop()
        self.planner.log_file = log_file
        self.planner.log_level = "info" if log_file is not None else "error"
        self.prefix = unique_prefix("fleet")
        self.planner.args = ["--redis-url", self.redis.url]
        self.planner.env = {**self.tokens.env(), "DAPDEE_KEY_PREFIX": self.prefix, **settings}
        self.planner.start(90)
        self.edge.start(timeout_s)
        with EdgeClient(self.edge.url, self.tokens.admin) as edge:
            served = edge.server_metadata().models
        for m in served:
            wait_registered(self.planner.url, m, [self.edge.url], timeout_s, self.tokens.admin, EDGE_TIER)
        if self.edge_profiles is None:
            self.edge_profiles = self.keep_calibration(served)
        return self.planner.url

    def keep_calibration(self, models: Sequence[str]) -> dict[str, StoredProfile]:
        """Each model's edge profile as the running worker registered it (calibrated `edge_ms`,
        `meta` with `calibration` and `edge_request_ms`), written into the worker's cached node
        profile (same nodes, so the cache is valid for the same settings) in the private
        `calibrated_cache`; later starts read that cache and measure no request samples, so they
        register, and price their own requests with, exactly these timings and meta. O(nodes)."""
        with PlannerClient(self.planner.url, self.tokens.admin) as planner:
            profiles = {m: planner.list_profiles(m).profiles[EDGE_TIER] for m in models}
        self.calibrated_cache.mkdir(parents=True, exist_ok=True)
        for m, p in profiles.items():
            nodes = CostGraph.load(str(profile_path(str(self.profile_cache), m, EDGE_TIER)))
            nodes.with_timings("edge", p.timings_ms, p.meta).save(
                str(profile_path(str(self.calibrated_cache), m, EDGE_TIER))
            )
        self.edge.env |= {"DAPDEE_EDGE_PROFILE_CACHE": str(self.calibrated_cache), "DAPDEE_EDGE_REQUEST_SAMPLES": "0"}
        return profiles

    def edge_counters(self) -> EdgeCounters:
        return parse_edge_counters(httpx.get(f"{self.edge.url}/metrics", timeout=5).text)

    def planner_counters(self) -> dict[str, float]:
        return parse_planner_counters(httpx.get(f"{self.planner.url}/metrics", timeout=5).text)

    def pids(self) -> dict[str, int]:
        """The service processes' ids (for CPU accounting)."""
        out = {}
        for name, proc in (("edge", self.edge.proc), ("planner", self.planner.proc), ("redis", self.redis.proc)):
            if proc is not None:
                out[name] = proc.pid
        return out

    def stop(self) -> None:
        self.planner.stop()
        self.edge.stop()
        self.redis.stop()
        self._private.cleanup()

    def __enter__(self) -> FleetStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
