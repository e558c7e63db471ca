"""One fleet run end to end, on a started `FleetStack`:

1. the planner is restarted with the system's settings, then the edge worker, which registers
   again (`FleetStack.fresh`: no run inherits the state an earlier one left) with the edge
   profile the invocation's first worker start calibrated and priced (the same in every run;
   the result's `costs` record it: `edge_calibration`, `edge_request_ms`, `edge_ms_final`);
2. the device tier's profile (measured at K = 10, x K / 10: `scenario.scaled_profile`) is
   published by a real device session (`dapdee.device.session.open_device` on the same
   profile, shaped 4G uplink, nothing else running), which measures and publishes the
   device's per-request CPU cost (`meta.device_request_ms`) as every device would; the
   invocation's first run of a model and
   K measures it, and every later one publishes that same profile (`FleetStack.device_profiles`),
   so every system is planned with one device cost, as with one edge cost;
3. the devices start in client processes (`devices`, at most `per_process` each), sense their
   links and get their first plans, then report ready;
4. all cameras start at one wall-clock instant; after the warm-up the worker's counters and
   every process's CPU time are read, and again at the end of the window; meanwhile the
   planner's `GET /workers` is polled for what leases book on the worker and the capacity it
   advertises;
5. each process reports its devices' frames and plans.

The raw result (`run_scenario`) is JSON; `metrics.summarize` turns it into the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from dapdee.bench.edge_worker import proc_cpu_s
from dapdee.bench.fleet_bench.devices import DRAIN_S, ClientJob
from dapdee.bench.fleet_bench.scenario import NETWORK_CYCLE, Scenario, base_profile, scaled_profile
from dapdee.bench.fleet_bench.stack import EDGE_TIER, EdgeCounters, FleetStack
from dapdee.bench.fleet_bench.systems import SYSTEMS, PlannerSettings
from dapdee.client import ClientError, PlannerClient
from dapdee.testing.processes import ROOT, service_env

READY_TIMEOUT_S = 240.0
POLL_S = 2.0


class ClientProcess:
    """One `python -m dapdee.bench.fleet_bench.devices` process and its stdout lines (read by
    a thread, so waits have timeouts)."""

    def __init__(self, job: ClientJob, log_path: Path) -> None:
        self.log = open(log_path, "ab")  # noqa: SIM115 -- closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dapdee.bench.fleet_bench.devices"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT, env=service_env(),
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()
        self.send(job.to_json())

    def _read(self, out: IO[bytes]) -> None:
        for line in out:
            self.lines.put(line.decode())
        self.lines.put("")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def message(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line; RuntimeError when the process ended or stayed silent."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"client process {self.proc.pid} said nothing for {timeout_s:g} s") from None
        if not line:
            raise RuntimeError(f"client process {self.proc.pid} exited (code {self.proc.wait()}); see its log")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def publish_profile(stack: FleetStack, sc: Scenario, loaded: Any, planner_url: str) -> dict[str, float | None]:
    """Publish the tier's device profile (module docstring, 2): measured through a real device
    session the first time for this model and K, then the profile kept from it; returns what
    the planner now prices: the per-request costs device_request_ms and edge_request_ms, the
    edge profile's `calibration` (its timings' factor to whole frames) and `edge_ms_final`
    (Σ edge_ms over the final exit's nodes)."""
    from dapdee.device.config import PlannerConfig, RuntimeConfig
    from dapdee.device.session import DeviceSettings, open_device
    from dapdee.netem import NETWORKS

    graph = scaled_profile(base_profile(loaded, sc.model), sc.k)
    runtime = RuntimeConfig(sc.requirements())
    planner = PlannerConfig(planner_url, sc.tier, token=stack.tokens.device, admin_token=stack.tokens.admin)
    settings = DeviceSettings(
        runtime, planner, "", weights=str(sc.artifact), slowdown=sc.k, rate_mbps=NETWORKS[NETWORK_CYCLE[0]],
        rtt_ms=sc.rtt_ms, device_load=0.0,
    )  # fmt: skip

    async def go() -> None:
        async with open_device(settings, loaded, graph):
            pass

    kept = stack.device_profiles.get((sc.model, sc.k, sc.tier))
    if kept is None:
        asyncio.run(go())
    with PlannerClient(planner_url, stack.tokens.admin) as client:
        if kept is not None:
            client.put_profile(loaded.name, sc.tier, "device", kept.timings_ms, kept.meta)
        profiles = client.list_profiles(loaded.name).profiles
    stack.device_profiles[(sc.model, sc.k, sc.tier)] = profiles[sc.tier]
    return {
        "device_request_ms": profiles[sc.tier].meta.get("device_request_ms"),
        "edge_request_ms": profiles[EDGE_TIER].meta.get("edge_request_ms"),
        "edge_calibration": profiles[EDGE_TIER].meta.get("calibration"),
        "edge_ms_final": sum(profiles[EDGE_TIER].timings_ms[n] for n in graph.ancestors(graph.exits[-1].node)),
    }


@dataclass(frozen=True)
class Snapshot:
    """Cumulative counters at one instant: the worker's, the planner's, every process's CPU."""

    edge: EdgeCounters
    planner: dict[str, float]
    cpu: dict[str, float]
    at: float


def _snapshot(stack: FleetStack, clients: list[ClientProcess]) -> Snapshot:
    pids = {**stack.pids(), **{f"client-{i}": c.proc.pid for i, c in enumerate(clients)}}
    cpu = {name: proc_cpu_s(pid) for name, pid in pids.items()}
    return Snapshot(stack.edge_counters(), stack.planner_counters(), cpu, time.time())


def _booked(planner_url: str, token: str) -> tuple[float, float] | None:
    """(the largest share of its capacity that leases book on any worker, the smallest capacity
    a worker advertises, ms/s) now, from GET /workers; None when no worker is listed."""
    try:
        with PlannerClient(planner_url, token, timeout=2.0) as client:
            workers = client.workers().workers
    except ClientError:
        return None
    if not workers:
        return None
    return max(w.leased_ms_per_s / w.capacity_ms_per_s for w in workers), min(w.capacity_ms_per_s for w in workers)


def _wait_until(t: float, every: Callable[[], None] | None = None) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, POLL_S))
        if every is not None and t - time.time() > 0.5:
            every()


def _diff(a: EdgeCounters, b: EdgeCounters) -> dict[str, Any]:
    def sub(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
        return {k: y.get(k, 0.0) - x.get(k, 0.0) for k in set(x) | set(y) if y.get(k, 0.0) - x.get(k, 0.0)}

    return {"busy_s": b.busy_s - a.busy_s, "slots": b.slots, "requests": sub(a.requests, b.requests),
            "rejected": sub(a.rejected, b.rejected)}  # fmt: skip


def _measure(stack: FleetStack, sc: Scenario, clients: list[ClientProcess], url: str) -> dict[str, Any]:
    """Start the cameras, read the counters at the window's ends, poll the leases' booking."""
    go = time.time() + 1.0
    for c in clients:
        c.send(json.dumps({"go": go}))
    series: list[tuple[float, float, float]] = []  # (s since go, booked share, capacity ms/s)

    def poll() -> None:
        b = _booked(url, stack.tokens.admin)
        if b is not None:
            series.append((round(time.time() - go, 2), *b))

    _wait_until(go + sc.warmup_s, poll)
    a = _snapshot(stack, clients)
    _wait_until(go + sc.warmup_s + sc.window_s, poll)
    b = _snapshot(stack, clients)
    wall = b.at - a.at
    booked = [(s, c) for t, s, c in series if t >= sc.warmup_s]
    return {
        "wall_s": wall,
        "edge": _diff(a.edge, b.edge),
        "planner": {k: b.planner[k] - a.planner[k] for k in a.planner},
        "planner_run": b.planner,  # since the planner started with the run: warm-up included
        "cpu_per_s": {k: (b.cpu[k] - a.cpu[k]) / wall for k in a.cpu},
        "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "booked_max": max((b for b, _ in booked), default=None),
        "capacity_ms_per_s": statistics.median(c for _, c in booked) if booked else None,
        "booking_series": series,
    }


def run_scenario(
    stack: FleetStack, sc: Scenario, settings: PlannerSettings, loaded: Any, log_dir: Path
) -> dict[str, Any]:
    """One run (module docstring); the raw result as JSON-able data."""
    system = SYSTEMS[sc.system]
    run = f"{sc.system}-n{sc.n}-k{sc.k:g}-{sc.model}"
    url = stack.fresh(settings.env(system), log_file=log_dir / f"planner-{run}.log")
    costs = publish_profile(stack, sc, loaded, url)
    clients: list[ClientProcess] = []
    try:
        for i, group in enumerate(sc.groups()):
            job = ClientJob(
                url, stack.tokens.device, sc.system, sc.model, sc.k, sc.tier, group, sc.frame_rate, sc.budget_ms,
                sc.warmup_s, sc.window_s, device_request_ms=costs["device_request_ms"], min_accuracy=sc.min_accuracy,
            )  # fmt: skip
            clients.append(ClientProcess(job, log_dir / f"clients-{run}-{i}.log"))
        ready = [c.message(READY_TIMEOUT_S) for c in clients]
        window = _measure(stack, sc, clients, url)
        done = [c.message(sc.window_s + DRAIN_S + 60.0) for c in clients]
    finally:
        for c in clients:
            c.close()
    errors = [e for r in ready for e in r.get("errors", [])]
    return {
        "scenario": asdict(sc),
        "system": system.label,
        "settings": asdict(settings),
        "costs": costs,
        "window": window,
        "clients": len(clients),
        "devices": [d for r in done for d in r["devices"]],
        "errors": errors,
    }
