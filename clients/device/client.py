"""The device runtime: sense, plan, run the device part, ship boundary tensors, fall back.

`DeviceClient` loads the model (the same artifact the edge serves), measures or loads its own
device profile (`profile_model(..., "device", slowdown=K)`), registers graph + profile with the
planner and asks `POST /plan`. Each frame runs the plan's device part with the split executor
(`executor.compute(..., allowed=device_nodes)`), sends the transfer tensors to the edge worker
(Open Inference Protocol v2, binary tensors via `dapdee.wire`, FP16 optional) over an
optionally shaped uplink (`dapdee.netem.ShapedUplink`), and gets the exit's logits back. A
plan without edge nodes runs wholly on the device.

A background task re-plans when the uplink estimate or the device load drift past a threshold
(relative), when the plan ages, or after an edge failure; frames never wait for it. Edge
failure (connect error, 5xx/4xx, timeout = max(3 × predicted latency, floor)) finishes the
frame locally from the values the device already has (an earlier exit when a latency budget
demands it), backs off before retrying the worker, and asks for a new plan. Under heavy load
(throughput mode or a frame rate) frames are pipelined: device compute (one thread) of frame
i+1 overlaps the upload of frame i and the edge compute of frame i−1, with a bounded number of
frames in flight.

The emulated device slowdown K and the shaped uplink rate are stated in every record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.device.bandwidth import (
    BandwidthEstimator,
    ComputeLoadMonitor,
    LoadMonitor,
    RttEstimator,
    drifted,
    load_drifted,
)
from dapdee.models import LoadedModel, ModelError
from dapdee.netem import ShapedUplink, emulate_slowdown

log = logging.getLogger("dapdee.device")

Frame = tuple[torch.Tensor, int | None]  # (input [1,C,H,W], label or None)
MIN_REPLAN_S = 0.2  # spacing between two plan requests
WORKER_WAIT_S = 5.0  # at start, how long to wait for the planner to know an edge worker
PROBE_MS = 100.0  # a probe's size aims at this much upload time (per-request overhead becomes small)


class PlannerError(ValueError):
    """The planner is unreachable or refused a request; the message says which and why;
    `status` is the HTTP status when it answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EdgeFailure(Exception):
    """One edge request failed (connect error, timeout, HTTP error); `reason` is short."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ClientConfig:
    """Everything the device runtime needs. `model` is a spec (`zoo:NAME?…`, `pkg.mod:fn`) or a
    name the planner knows (its stored graph's spec is used); `weights` an artifact directory."""

    planner_url: str
    model: str = ""
    weights: str | None = None
    rate_mbps: float | None = None  # shaped uplink; None: no shaping (real network)
    network_name: str | None = None
    rtt_ms: float = 0.0  # added round trip when shaping
    slowdown: float = 1.0  # K: the device is K x slower than this machine
    latency_budget_ms: float | None = None
    min_accuracy: float | None = None
    frame_rate: float | None = None
    mode: str = "auto"
    fp16: bool = False
    edge_url: str | None = None  # override the plan's worker
    device_tier: str | None = None  # default device-k{K}
    device_load: float | None = None  # fixed load; None: measured (see load_source)
    load_source: str = "proc"  # proc: other processes' CPU share; compute: own compute's lost time
    profile_path: str | None = None  # device profile JSON to load (measured when absent)
    profile_repeats: int = 10
    token: str | None = None
    bandwidth_prior_mbps: float = 1.0
    replan_threshold: float = 0.2
    plan_max_age_s: float = 10.0
    max_inflight: int = 3
    timeout_floor_ms: float = 1000.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    probe_idle_s: float = 1.0
    planner_timeout_s: float = 5.0
    ready_timeout_s: float = 60.0
    threads: int | None = 1  # torch threads of the device part (None: leave as is)
    device_only: bool = False  # baseline: no planner, no edge; the final exit on the device

    @property
    def tier(self) -> str:
        return self.device_tier or f"device-k{self.slowdown:g}".replace(".", "_")

    @property
    def pipelined(self) -> bool:
        return self.mode == "throughput" or self.frame_rate is not None


@dataclass
class FrameRecord:
    """One frame: what was planned, what happened."""

    index: int
    plan_id: str | None
    exit: str
    device_nodes: int
    bytes_sent: int
    where: str  # edge | local | fallback
    predicted_ms: float | None
    measured_ms: float
    device_ms: float
    pred_class: int
    label: int | None = None
    correct: bool | None = None
    edge_queue_ms: float | None = None
    edge_compute_ms: float | None = None
    error: str | None = None
    rate_mbps: float | None = None
    slowdown: float = 1.0
    bandwidth_est_mbps: float | None = None
    device_load: float | None = None
    started_at: float = 0.0  # seconds since the client started (perf_counter)


@dataclass
class SendResult:
    """One edge request: outputs, server parameters and its timing."""

    logits: torch.Tensor
    cls: torch.Tensor
    params: dict[str, Any]
    sample: float | None  # bandwidth sample taken from it (Mbit/s), if any
    nbytes: int  # request body bytes
    elapsed_ms: float
    server_ms: float  # queue_ms + compute_ms reported by the worker
    overlapped: bool  # another upload shared the link meanwhile


@dataclass
class Plan:
    """A planner answer, with the derived sets the runtime needs."""

    raw: dict[str, Any]
    requested_at: float
    bandwidth_mbps: float
    device_load: float

    @property
    def id(self) -> str | None:
        return self.raw.get("plan_id")

    @property
    def exit(self) -> str:
        return self.raw["exit"]["name"]

    @property
    def device_nodes(self) -> list[str]:
        return list(self.raw.get("device_nodes") or [])

    @property
    def edge_nodes(self) -> list[str]:
        return list(self.raw.get("edge_nodes") or [])

    @property
    def transfer(self) -> list[str]:
        return [t["node"] for t in self.raw.get("transfer") or []]

    @property
    def predicted_ms(self) -> float | None:
        return (self.raw.get("predicted") or {}).get("latency_ms")

    @property
    def edge_worker(self) -> str | None:
        return self.raw.get("edge_worker")


class DeviceClient:
    """The device runtime (see the module docstring). Use `async with DeviceClient(cfg) as c:`
    or `await c.start()` / `await c.close()`; then `await c.infer(x)` or `await c.run(frames)`."""

    def __init__(
        self,
        config: ClientConfig,
        loaded: LoadedModel | None = None,
        device_graph: CostGraph | None = None,
        shaper: ShapedUplink | None = None,
    ) -> None:
        self.cfg = config
        self.loaded = loaded
        self.device_graph = device_graph
        if shaper is None and config.rate_mbps is not None:
            shaper = ShapedUplink(config.rate_mbps, rtt_ms=config.rtt_ms)
        self.shaper = shaper
        self.bandwidth = BandwidthEstimator(prior_mbps=config.bandwidth_prior_mbps)
        self.rtt = RttEstimator()
        if config.load_source not in ("proc", "compute"):
            raise ValueError(f"load source: expected proc or compute, got {config.load_source!r}")
        self.load_monitor: LoadMonitor | ComputeLoadMonitor | None = None
        if config.device_load is None:
            self.load_monitor = LoadMonitor() if config.load_source == "proc" else ComputeLoadMonitor()
        self.plan: Plan | None = None
        self.plans: list[Plan] = []
        self.records: list[FrameRecord] = []
        self.events: list[str] = []
        self._http: Any = None  # httpx.AsyncClient
        self._device_pool = ThreadPoolExecutor(1, thread_name_prefix="device")
        self._bg: asyncio.Task[None] | None = None
        self._replan_task: asyncio.Task[None] | None = None
        self._replan_wanted = False
        self._edge_down_until = 0.0
        self._backoff_s = config.backoff_initial_s
        self._uploads_active = 0
        self._last_edge_activity = 0.0
        self._frame_counter = 0
        self._probe_node: tuple[str, tuple[int, ...]] | None = None
        self._closed = False
        self.started_at = 0.0
        self._perf_base = time.perf_counter()
        self._registered_at = 0.0

    # ---- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> DeviceClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def model_name(self) -> str:
        assert self.loaded is not None
        return self.loaded.name

    @property
    def device_load(self) -> float:
        if self.cfg.device_load is not None:
            return self.cfg.device_load
        assert self.load_monitor is not None
        return self.load_monitor.load

    @property
    def edge_url(self) -> str | None:
        if self.cfg.edge_url:
            return self.cfg.edge_url.rstrip("/")
        if self.plan is not None and self.plan.edge_worker:
            return self.plan.edge_worker.rstrip("/")
        return None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else {}

    async def start(self) -> None:
        """Load the model, load or measure the device profile, register with the planner,
        measure the link and get the first plan. Raises PlannerError / ModelError (ValueErrors)
        with one-line messages."""
        import httpx

        if self.cfg.mode not in ("auto", "latency", "throughput"):
            raise ValueError(f"mode: expected auto, latency or throughput, got {self.cfg.mode!r}")
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if isinstance(self.load_monitor, ComputeLoadMonitor) and emulation_clock() is time.thread_time:
            self.load_monitor.stretch = self.cfg.slowdown  # consistent with what the emulation stretches
        self.started_at = time.monotonic()
        self._perf_base = time.perf_counter()  # FrameRecord.started_at is relative to this
        self._http = httpx.AsyncClient(headers=self._headers(), timeout=httpx.Timeout(self.cfg.planner_timeout_s))
        try:
            if not self.cfg.device_only:
                r = await self._planner("GET", "/healthz")
                if r.status_code != 200:
                    raise PlannerError(f"planner {self.cfg.planner_url} is not healthy: HTTP {r.status_code}")
            if self.loaded is None:
                self.loaded = await self._load_model()
            if self.device_graph is None:
                self.device_graph = await asyncio.to_thread(self._device_profile)
            await self._first_load_reading()
            if self.cfg.device_only:
                self.plan = self.device_only_plan()
                return
            await self._register()
            self.plan = await self._wait_first_plan()
            if self.edge_url:
                await self._measure_link()
                self.plan = await self.request_plan()
        except BaseException:
            await self._http.aclose()
            self._http = None
            raise
        self._bg = asyncio.create_task(self._background())

    async def _first_load_reading(self) -> None:
        """A load reading before the first plan (0.3 s of /proc/stat, or a few calibration spins
        in the device thread)."""
        mon = self.load_monitor
        if isinstance(mon, LoadMonitor):
            await asyncio.sleep(0.3)
            mon.sample()
        elif isinstance(mon, ComputeLoadMonitor):
            loop = asyncio.get_running_loop()
            for _ in range(5):
                await loop.run_in_executor(self._device_pool, mon.calibrate)
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._bg, self._replan_task):
            if task is not None and not task.done():
                # let an in-flight probe or plan request finish (the loop exits at its next turn)
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), 2.0)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._http is not None:
            await self._http.aclose()
        self._device_pool.shutdown(wait=False)

    async def _load_model(self) -> LoadedModel:
        from dapdee.models import load_model

        spec = self.cfg.model or ""
        if self.cfg.weights and ":" not in spec:  # the artifact pins the spec; `spec` is a name
            return await asyncio.to_thread(load_model, "", None, self.cfg.weights, spec or None)
        if ":" in spec:
            return await asyncio.to_thread(load_model, spec, None, self.cfg.weights)
        if not spec:
            raise ModelError("give --model (zoo:NAME?…, package.module:factory or a model name) or --weights")
        # a bare name: the planner's stored graph says which spec and input shape it is
        graph = await self._get_graph(spec)
        if graph is None:
            raise PlannerError(
                f"planner {self.cfg.planner_url} has no model {spec!r}; give a spec "
                "(zoo:NAME?opt=v, package.module:factory) or --weights ARTIFACT"
            )
        model_spec = graph.meta.get("spec")
        if not isinstance(model_spec, str) or not model_spec:
            raise ModelError(f"model {spec!r}: the planner's graph does not record its spec; give --model SPEC")
        if not model_spec.startswith("zoo:"):
            # whoever can write graphs to the planner must not pick code this device imports
            raise ModelError(
                f"model {spec!r}: the planner's graph names spec {model_spec!r}, which would import code "
                "on this device; give --model SPEC yourself if you trust it"
            )
        if graph.input.dtype == "uint8":
            raise ModelError(
                f"model {spec!r} takes raw uint8 frames (an artifact's graph): give --weights ARTIFACT, "
                "the artifact the edge serves"
            )
        log.warning(
            "model %s: built from the planner's spec %s without --weights: the device part runs "
            "untrained weights (give the artifact the edge serves)",
            spec,
            model_spec,
        )
        return await asyncio.to_thread(load_model, model_spec, tuple(graph.input.shape), None, spec)

    def _device_profile(self) -> CostGraph:
        """The device tier's profile: from `profile_path` when it matches the model, else
        measured (`measure_device_profile`: `profile_model(loaded, "device", slowdown=K)`,
        calibrated to whole-frame runs) and written there."""
        assert self.loaded is not None
        path = Path(self.cfg.profile_path) if self.cfg.profile_path else None
        if path is not None and path.is_file():
            try:
                g = CostGraph.load(str(path))
            except (CostGraphError, OSError, ValueError) as exc:
                raise ValueError(f"device profile {str(path)!r}: {exc}") from None
            if g.structure_key() != self.loaded.graph.structure_key() or not g.has_timings("device"):
                raise ValueError(
                    f"device profile {str(path)!r} does not match model {self.loaded.name!r} "
                    "(other nodes or no device_ms); delete it to re-measure"
                )
            return g
        g = measure_device_profile(self.loaded, self.cfg.slowdown, self.cfg.threads, self.cfg.profile_repeats)
        if path is not None:
            g.save(str(path))
        return g

    def device_only_plan(self, exit_name: str | None = None) -> Plan:
        """The Device-Only baseline as a plan: every node of A(exit) on the device, priced by
        the cost model (`dapdee.costmodel.partition`) at the current device load."""
        from dapdee.costmodel import Conditions, partition

        assert self.device_graph is not None
        g = self.device_graph
        ex = g.exit(exit_name)
        part = partition(g, ex.name, g.ancestors(ex.node))
        cond = Conditions(max(self.bandwidth.estimate_mbps, 1e-3), 0.0, min(self.device_load, 0.95), 0.0)
        pred = part.predict(cond)
        raw = {
            "plan_id": "device-only",
            "model": g.model,
            "mode": "latency",
            "exit": {"name": ex.name, "accuracy": ex.accuracy},
            "device_nodes": list(part.device_nodes),
            "edge_nodes": [],
            "transfer": [],
            "predicted": pred.as_dict(ex.accuracy),
            "constraints_met": True,
            "edge_worker": None,
        }
        plan = Plan(raw, time.monotonic(), cond.bandwidth_mbps, cond.device_load)
        self.plans.append(plan)
        return plan

    # ---- planner --------------------------------------------------------------------------

    async def _planner(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        url = self.cfg.planner_url.rstrip("/") + path
        try:
            try:
                return await self._http.request(method, url, **kw)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # a kept-alive connection the server closed meanwhile: planner calls are safe to repeat
                return await self._http.request(method, url, **kw)
        except httpx.InvalidURL as exc:
            raise PlannerError(f"planner URL {self.cfg.planner_url!r} is not valid ({exc})") from None
        except httpx.UnsupportedProtocol:
            raise PlannerError(
                f"planner URL {self.cfg.planner_url!r} is not valid (expected http://HOST:PORT)"
            ) from None
        except httpx.HTTPError as exc:
            raise PlannerError(
                f"cannot reach the planner at {self.cfg.planner_url} ({type(exc).__name__}: {exc or 'no answer'})"
            ) from None

    @staticmethod
    def _detail(r: Any) -> str:
        try:
            body = r.json()
        except ValueError:
            return r.text[:200]
        if isinstance(body, dict):
            d = body.get("detail", body.get("error", body))
            if isinstance(d, list) and d and isinstance(d[0], dict):
                return f"{'.'.join(map(str, d[0].get('loc', ())))}: {d[0].get('msg')}"
            return str(d)[:300]
        return str(body)[:200]

    async def _get_graph(self, name: str) -> CostGraph | None:
        r = await self._planner("GET", f"/models/{name}")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise PlannerError(f"planner GET /models/{name}: HTTP {r.status_code}: {self._detail(r)}")
        try:
            return CostGraph.from_dict(r.json())
        except (CostGraphError, ValueError) as exc:
            raise PlannerError(f"planner GET /models/{name}: not a cost graph ({exc})") from None

    async def _register(self) -> None:
        """Upload the cost graph (unless the planner has it with the same structure) and this
        tier's device profile."""
        assert self.loaded is not None and self.device_graph is not None
        name = self.model_name
        stored = await self._get_graph(name)
        if stored is None:
            r = await self._planner("PUT", f"/models/{name}", json=self.device_graph.to_dict())
            if r.status_code >= 300:
                raise PlannerError(f"planner refused model {name!r}: HTTP {r.status_code}: {self._detail(r)}")
        elif stored.structure_key() != self.loaded.graph.structure_key():
            raise PlannerError(
                f"the planner's model {name!r} has another structure than the local one "
                "(different spec, input shape or artifact?)"
            )
        meta = {
            **self.device_graph.meta.get("device", {}),
            "tier": self.cfg.tier,
            "slowdown": self.cfg.slowdown,
        }
        body = {
            "kind": "device",
            "timings_ms": {n.name: n.device_ms for n in self.device_graph.nodes},
            "meta": meta,
        }
        r = await self._planner("PUT", f"/models/{name}/profiles/{self.cfg.tier}", json=body)
        if r.status_code >= 300:
            raise PlannerError(f"planner refused the device profile: HTTP {r.status_code}: {self._detail(r)}")
        self._registered_at = time.monotonic()

    def _plan_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "bandwidth_mbps": max(self.bandwidth.estimate_mbps, 1e-3),
            # the per-request round trip as seen by an upload: network RTT + fixed HTTP/codec cost
            "rtt_ms": self.rtt.estimate_ms + self.bandwidth.overhead_ms,
            "device_load": min(self.device_load, 0.95),
            "device_tier": self.cfg.tier,
            "mode": self.cfg.mode,
        }
        for k in ("latency_budget_ms", "min_accuracy", "frame_rate"):
            v = getattr(self.cfg, k)
            if v is not None:
                body[k] = v
        return body

    async def request_plan(self) -> Plan:
        """POST /plan with the current estimates. Raises PlannerError."""
        body = self._plan_body()
        r = await self._planner("POST", "/plan", json=body)
        if r.status_code != 200:
            raise PlannerError(f"planner POST /plan: HTTP {r.status_code}: {self._detail(r)}", r.status_code)
        raw = r.json()
        if not isinstance(raw, dict) or "exit" not in raw:
            raise PlannerError("planner POST /plan: the answer is not a plan")
        plan = Plan(raw, time.monotonic(), body["bandwidth_mbps"], body["device_load"])
        old = self.plan
        self.plans.append(plan)
        if old is None or (old.exit, old.device_nodes, old.edge_worker) != (
            plan.exit,
            plan.device_nodes,
            plan.edge_worker,
        ):
            self.events.append(
                f"plan {plan.id}: exit {plan.exit}, {len(plan.device_nodes)} device nodes, "
                f"bw {body['bandwidth_mbps']:.3g} Mbit/s, load {body['device_load']:.2f}"
            )
        return plan

    async def _wait_first_plan(self) -> Plan:
        """The first plan; 409 (the edge has not registered its profile yet) is retried until
        `ready_timeout_s`, and a plan naming no edge worker (one is registering) for up to
        WORKER_WAIT_S — after that the device runs on without one."""
        start = time.monotonic()
        while True:
            try:
                plan = await self.request_plan()
            except PlannerError as exc:
                if "HTTP 409" not in str(exc) or time.monotonic() - start > self.cfg.ready_timeout_s:
                    raise
                await asyncio.sleep(0.3)
                continue
            if self.cfg.edge_url or plan.edge_worker or time.monotonic() - start > WORKER_WAIT_S:
                return plan
            await asyncio.sleep(0.3)

    # ---- link sensing ---------------------------------------------------------------------

    async def measure_rtt(self, n: int = 3) -> float:
        """GET {edge}/v2/health/live `n` times (through the emulated delay); EWMA of the round trips."""
        url = self.edge_url
        if url is None:
            return self.rtt.estimate_ms
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                if self.shaper is not None:
                    await self.shaper.delay()
                r = await self._http.get(url + "/v2/health/live", timeout=2.0)
            except Exception:
                return self.rtt.estimate_ms
            if r.status_code == 200:
                self.rtt.observe((time.perf_counter() - t0) * 1000.0)
        return self.rtt.estimate_ms

    def _pick_probe_node(self, target_bytes: int) -> tuple[str, tuple[int, ...]] | None:
        """The graph node whose tensor is largest but at most `target_bytes` (sent as filler)."""
        assert self.loaded is not None
        best = None
        for n in self.loaded.graph.nodes:
            if n.shape is None or n.name in self.loaded.executor.scalar_nodes or not n.shape or n.shape[0] != 1:
                continue
            if n.out_bytes <= target_bytes and (best is None or n.out_bytes > best[2]):
                best = (n.name, tuple(n.shape), n.out_bytes)
        return (best[0], best[1]) if best else None

    async def probe(self) -> float | None:
        """One bandwidth probe: a pair of infer requests at the shallowest exit, back to back — a
        small one (the input alone) and a large one (the input plus, as filler, a node tensor
        sized for ~PROBE_MS of upload at the current estimate). The size difference over the
        time difference is the uplink rate with the round trip and every fixed per-request cost
        cancelled; the small one's remainder is that fixed cost, which frame samples then net
        out too (`BandwidthEstimator.observe_pair`). Returns the rate sample (Mbit/s) or None."""
        assert self.loaded is not None
        url = self.edge_url
        if url is None or time.monotonic() < self._edge_down_until:
            return None
        # the filler: ~PROBE_MS of upload, and up to 2.5x the input so the pair's sizes differ enough
        floor = int(2.5 * self.loaded.graph.input.bytes)
        target = int(min(max(self.bandwidth.estimate_mbps * 1000 / 8 * PROBE_MS, floor), 262144))
        node = self._pick_probe_node(target)
        x = {self.loaded.input_name: self.loaded.example_input().zero_()}
        exit_name = self.loaded.graph.exits[0].name
        timeout = max(5.0, self.cfg.timeout_floor_ms / 1000)
        try:
            if node is None:
                return (await self._send(url, x, exit_name, timeout)).sample
            small = await self._send(url, x, exit_name, timeout, observe=False)
            large = await self._send(url, {**x, node[0]: torch.zeros(node[1])}, exit_name, timeout, observe=False)
        except EdgeFailure:
            return None
        if small.overlapped or large.overlapped:
            return None
        return self.bandwidth.observe_pair(
            (small.nbytes, small.elapsed_ms - small.server_ms),
            (large.nbytes, large.elapsed_ms - large.server_ms),
            self.rtt.estimate_ms,
        )

    async def _measure_link(self) -> None:
        await self.measure_rtt()
        for _ in range(3):  # the first is sized from the prior, the next from a measurement
            await self.probe()

    # ---- edge requests --------------------------------------------------------------------

    async def _send(
        self,
        url: str,
        inputs: dict[str, Any],
        exit_name: str,
        timeout_s: float,
        request_id: str | None = None,
        observe: bool = True,
    ) -> SendResult:
        """POST one v2 infer request (through the shaper when there is one) and time it; with
        `observe`, the upload is folded into the bandwidth estimate. Raises EdgeFailure."""
        import httpx

        from dapdee import wire

        tensors = {k: (v if isinstance(v, torch.Tensor) else torch.tensor(v)) for k, v in inputs.items()}
        body, headers = wire.encode_request(
            tensors,
            parameters={"exit": exit_name},
            request_id=request_id,
            wire_dtype="FP16" if self.cfg.fp16 else "FP32",
        )
        headers["Content-Length"] = str(len(body))
        content: Any = self.shaper.shaped_body(body) if self.shaper is not None else body
        self._uploads_active += 1
        overlapped = self._uploads_active > 1
        t0 = time.perf_counter()
        # overlapping uploads are timed too: the estimator groups them into busy periods of the link
        ticket = self.bandwidth.upload_started(t0) if observe else None
        sample = None
        try:
            try:
                r = await asyncio.wait_for(
                    self._http.post(f"{url}/v2/models/{self.model_name}/infer", content=content, headers=headers),
                    timeout_s,
                )
            except asyncio.TimeoutError:
                raise EdgeFailure(f"timeout after {timeout_s * 1000:.0f} ms") from None
            except httpx.HTTPError as exc:
                raise EdgeFailure(type(exc).__name__) from None
            finally:
                self._uploads_active -= 1
                overlapped = overlapped or self._uploads_active > 0
                self._last_edge_activity = time.monotonic()
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            if r.status_code != 200:
                raise EdgeFailure(f"HTTP {r.status_code}: {self._detail(r)[:120]}")
            try:
                resp = wire.decode_response(r.content, r.headers)
                logits = resp.outputs["logits"]
                cls = resp.outputs["class"]
            except (wire.WireError, KeyError) as exc:
                raise EdgeFailure(f"bad response: {exc}") from None
            params = resp.parameters
            server_ms = float(params.get("queue_ms", 0.0)) + float(params.get("compute_ms", 0.0))
            if ticket is not None:
                end = t0 + elapsed_ms / 1000.0
                sample = self.bandwidth.upload_finished(ticket, len(body), end, server_ms, self.rtt.estimate_ms)
                ticket = None
        finally:
            if ticket is not None:
                self.bandwidth.upload_failed(ticket)
        return SendResult(logits, cls, params, sample, len(body), elapsed_ms, server_ms, overlapped)

    def _timeout_s(self, plan: Plan) -> float:
        pred = plan.predicted_ms or 0.0
        return max(3.0 * pred, self.cfg.timeout_floor_ms) / 1000.0

    def _edge_failed(self, reason: str) -> None:
        now = time.monotonic()
        self._edge_down_until = now + self._backoff_s
        self.events.append(f"edge failure ({reason}); local for {self._backoff_s:.1f} s, asking for a new plan")
        log.warning("edge failure: %s; backing off %.1f s", reason, self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, self.cfg.backoff_max_s)
        self._replan_wanted = True

    # ---- device compute -------------------------------------------------------------------

    def _device_run(self, given: dict[str, Any], targets: list[str], allowed: set[str] | None) -> tuple[dict, float]:
        """Run the device part with the K x slowdown; (values, ms). Blocking (device thread)."""
        assert self.loaded is not None
        ex = self.loaded.executor

        mon = self.load_monitor if isinstance(self.load_monitor, ComputeLoadMonitor) else None

        def fn() -> dict[str, Any]:
            c0, w0 = time.thread_time(), time.perf_counter()
            with torch.inference_mode():
                out = ex.compute(given, targets, allowed=allowed)
            if mon is not None:
                mon.observe(time.thread_time() - c0, time.perf_counter() - w0)
            return out

        t0 = time.perf_counter()
        out = emulate_slowdown(fn, self.cfg.slowdown, emulation_clock())
        return out, (time.perf_counter() - t0) * 1000.0

    async def _on_device(
        self, given: dict[str, Any], targets: list[str], allowed: set[str] | None
    ) -> tuple[dict, float]:
        """Run on the device thread. A plan whose device part does not produce its own targets
        (a planner / executor mismatch) is run without the restriction rather than losing the
        frame, and a new plan is asked for."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._device_pool, self._device_run, given, targets, allowed)
        except (ValueError, KeyError) as exc:
            if allowed is None:
                raise
            self.events.append(f"device part of the plan is not runnable ({exc}); ran it unrestricted")
            self._replan_wanted = True
            return await loop.run_in_executor(self._device_pool, self._device_run, given, targets, None)

    def _local_cost_ms(self, exit_name: str, have: set[str]) -> float:
        """Predicted device ms to finish `exit_name` given the values in `have` (cost model sums)."""
        assert self.device_graph is not None
        g = self.device_graph
        total = sum(g.node(n).device_ms or 0.0 for n in g.ancestors(g.exit(exit_name).node) if n not in have)
        return total / (1.0 - min(self.device_load, 0.95))

    def _fallback_exit(self, planned: str, have: set[str], elapsed_ms: float) -> str:
        """The planned exit, or — when a latency budget would be missed — the deepest exit that
        still meets it locally (the cheapest one when none does)."""
        budget = self.cfg.latency_budget_ms
        if budget is None:
            return planned
        assert self.device_graph is not None
        names = [e.name for e in self.device_graph.exits]
        upto = names[: names.index(planned) + 1]
        costs = {e: self._local_cost_ms(e, have) for e in upto}
        for e in reversed(upto):
            if elapsed_ms + costs[e] <= budget:
                return e
        return min(upto, key=costs.__getitem__)

    # ---- frames ---------------------------------------------------------------------------

    async def infer(self, x: torch.Tensor, label: int | None = None) -> FrameRecord:
        """Classify one frame [1,C,H,W] with the current plan; never raises for edge trouble."""
        assert self.loaded is not None and self.plan is not None, "call start() first"
        plan = self.plan
        index = self._frame_counter
        self._frame_counter += 1
        t_start = time.perf_counter()
        inp = self.loaded.input_name
        exit_node = self.loaded.exit_node(plan.exit)
        url = self.edge_url
        edge_ok = bool(plan.edge_nodes) and url is not None and time.monotonic() >= self._edge_down_until
        rec = FrameRecord(
            index=index,
            plan_id=plan.id,
            exit=plan.exit,
            device_nodes=len(plan.device_nodes),
            bytes_sent=0,
            where="local",
            predicted_ms=plan.predicted_ms,
            measured_ms=0.0,
            device_ms=0.0,
            pred_class=-1,
            label=label,
            rate_mbps=self.shaper.rate_mbps if self.shaper is not None else None,
            slowdown=self.cfg.slowdown,
            bandwidth_est_mbps=round(self.bandwidth.estimate_mbps, 4),
            device_load=round(self.device_load, 3),
            started_at=t_start - self._perf_base,
        )
        if not plan.edge_nodes:
            vals, dms = await self._on_device({inp: x}, [exit_node], set(plan.device_nodes))
            logits = vals[exit_node]
            rec.device_ms = dms
        elif not edge_ok:
            # worker down (backing off) or unknown: the whole exit on the device
            fexit = self._fallback_exit(plan.exit, set(), 0.0)
            node = self.loaded.exit_node(fexit)
            vals, dms = await self._on_device({inp: x}, [node], None)
            logits = vals[node]
            rec.device_ms, rec.where, rec.exit = dms, "fallback", fexit
            rec.error = "edge backing off" if url is not None else "no edge worker"
            rec.device_nodes = len(self.device_graph.ancestors(node)) if self.device_graph else rec.device_nodes
            rec.bytes_sent = 0
            if url is None:
                self._replan_wanted = True
        else:
            targets = [n for n in plan.transfer if n != inp]
            vals, dms = {}, 0.0
            if targets:
                vals, dms = await self._on_device({inp: x}, targets, set(plan.device_nodes))
            rec.device_ms = dms
            sent = {n: (x if n == inp else vals[n]) for n in plan.transfer}
            try:
                res = await self._send(url, sent, plan.exit, self._timeout_s(plan), request_id=str(index))
                logits = res.logits
                rec.where, rec.bytes_sent = "edge", res.nbytes
                rec.edge_queue_ms = res.params.get("queue_ms")
                rec.edge_compute_ms = res.params.get("compute_ms")
                self._backoff_s = self.cfg.backoff_initial_s
            except EdgeFailure as exc:
                self._edge_failed(exc.reason)
                have = {inp, *vals}
                elapsed = (time.perf_counter() - t_start) * 1000.0
                fexit = self._fallback_exit(plan.exit, have, elapsed)
                node = self.loaded.exit_node(fexit)
                given = {inp: x, **vals}
                fvals, fms = await self._on_device(given, [node], None)
                logits = fvals[node]
                rec.device_ms += fms
                rec.where, rec.exit, rec.error = "fallback", fexit, exc.reason
                if self.device_graph is not None:
                    rec.device_nodes = len(self.device_graph.ancestors(node))
        rec.measured_ms = (time.perf_counter() - t_start) * 1000.0
        rec.pred_class = int(torch.as_tensor(logits).reshape(1, -1).argmax(dim=1)[0])
        if label is not None:
            rec.correct = rec.pred_class == int(label)
        self.records.append(rec)
        return rec

    async def run(self, frames: Iterable[Frame] | AsyncIterator[Frame], progress: Any = None) -> list[FrameRecord]:
        """Classify a stream of (x, label) frames. Sequential under light load; pipelined (at most
        `max_inflight` frames in flight, released at `frame_rate` when given) under heavy load.
        Returns the records in frame order."""
        out: list[FrameRecord] = []
        if not self.cfg.pipelined:
            async for x, y in _aiter(frames):
                out.append(await self.infer(x, y))
                if progress is not None:
                    progress(out[-1])
            return out
        sem = asyncio.Semaphore(max(1, self.cfg.max_inflight))
        tasks: list[asyncio.Task[FrameRecord]] = []
        period = 1.0 / self.cfg.frame_rate if self.cfg.frame_rate else 0.0
        t0 = time.monotonic()

        async def one(x: torch.Tensor, y: int | None) -> FrameRecord:
            try:
                rec = await self.infer(x, y)
            finally:
                sem.release()
            if progress is not None:
                progress(rec)
            return rec

        i = 0
        async for x, y in _aiter(frames):
            if period:
                delay = t0 + i * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await sem.acquire()
            tasks.append(asyncio.create_task(one(x, y)))
            i += 1
        return list(await asyncio.gather(*tasks))

    # ---- background: sensing and re-planning ----------------------------------------------

    def needs_replan(self) -> str | None:
        """Why the current plan should be replaced (None: it should not)."""
        p = self.plan
        if self.cfg.device_only:
            return None
        if p is None:
            return "no plan"
        if self._replan_wanted:
            return "edge trouble"
        if drifted(p.bandwidth_mbps, self.bandwidth.estimate_mbps, self.cfg.replan_threshold):
            return "bandwidth drift"
        if load_drifted(p.device_load, self.device_load, self.cfg.replan_threshold):
            return "load drift"
        if time.monotonic() - p.requested_at > self.cfg.plan_max_age_s:
            return "plan age"
        return None

    async def _replan(self, why: str) -> None:
        try:
            self._replan_wanted = False
            try:
                plan = await self.request_plan()
            except PlannerError as exc:
                # 404 / 409: the planner lost the model or this device's profile (a restart
                # without Redis): upload them again, then ask once more
                if exc.status not in (404, 409) or time.monotonic() - self._registered_at < 1.0:
                    raise
                await self._register()
                self.events.append(f"planner lacked the model or device profile (HTTP {exc.status}); registered again")
                plan = await self.request_plan()
            self.plan = plan
            log.info("re-planned (%s): exit %s, %d device nodes", why, plan.exit, len(plan.device_nodes))
        except PlannerError as exc:
            self.events.append(f"re-plan failed ({why}): {exc}")
            log.warning("re-plan failed: %s", exc)
            # keep the current plan; try again after the next age period
            if self.plan is not None:
                self.plan.requested_at = time.monotonic()

    async def _background(self) -> None:
        """Every 50 ms: update the load reading, probe the link when idle, and start a re-plan
        (never more than one at a time, at most every `MIN_REPLAN_S`) when `needs_replan`."""
        last_load = 0.0
        last_rtt = time.monotonic()
        last_replan = 0.0
        next_probe = 0.0
        while not self._closed:
            await asyncio.sleep(0.05)
            if self._closed:
                return
            try:
                now = time.monotonic()
                mon = self.load_monitor
                if isinstance(mon, LoadMonitor) and now - last_load >= 0.5:
                    mon.sample()
                    last_load = now
                elif (
                    isinstance(mon, ComputeLoadMonitor)
                    and min(now - mon.last_sample_at, now - last_load) > 1.0
                    and self._uploads_active == 0  # an in-process edge would count as load
                ):
                    last_load = now  # the device computed nothing for a while: take a reading
                    await asyncio.get_running_loop().run_in_executor(self._device_pool, mon.calibrate)
                quiet = now - self._last_edge_activity > self.cfg.probe_idle_s
                if self.bandwidth.suspect_change and now - self._last_edge_activity > 0.2:
                    # no frames are uploading to confirm a big change: probe now, not after idling
                    quiet, next_probe = True, min(next_probe, now)
                idle = quiet and self._uploads_active == 0
                if idle and self.edge_url and now >= self._edge_down_until:
                    if now - last_rtt > 5.0 or self.rtt.samples == 0:
                        await self.measure_rtt(1)
                        last_rtt = time.monotonic()
                    stale = self.bandwidth.age_s() > self.cfg.probe_idle_s or self.bandwidth.suspect_change
                    if stale and now >= next_probe:
                        t0 = time.monotonic()
                        await self.probe()
                        self._last_edge_activity = time.monotonic()
                        # probes take at most ~20 % of an idle link (slow links: fewer probes)
                        next_probe = self._last_edge_activity + 4 * (self._last_edge_activity - t0)
                why = self.needs_replan()
                busy = self._replan_task is not None and not self._replan_task.done()
                if why and not busy and time.monotonic() - last_replan >= MIN_REPLAN_S:
                    last_replan = time.monotonic()
                    self._replan_task = asyncio.create_task(self._replan(why))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # sensing must never stop; the frames go on regardless
                log.warning("device background task: %s: %s", type(exc).__name__, exc)


def emulation_clock() -> Callable[[], float]:
    """The clock the K x device emulation stretches: the compute thread's CPU time when torch
    computes on that one thread (waits for the CPU, e.g. for a co-located edge worker or the
    client's own event loop, are then added once instead of K times), else wall time."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def measure_device_profile(
    loaded: LoadedModel, slowdown: float, threads: int | None = 1, repeats: int = 10, runs: int = 15
) -> CostGraph:
    """This device tier's profile: `profile_model(loaded, "device", slowdown=K)` (medians of
    isolated, back-to-back node runs), then calibrated to how the device really runs a frame:
    the final exit run whole `runs` times through the K x emulation (compute, then sleep; after
    2 unrecorded warm-up runs), whose median over the summed node medians scales every node
    (clamped to [0.5, 4]; recorded in the profile's meta as `calibration`). The emulated device
    idles between frames, so caches are cold and the isolated medians alone under-predict a
    frame (here by up to ~2x).
    O((repeats + runs) x one forward pass)."""
    from dapdee.profiler import profile_model

    g = profile_model(loaded, "device", slowdown=slowdown, threads=threads, repeats=repeats, warmup=2)
    node = loaded.exit_node(None)
    anc = g.ancestors(node)
    summed = sum(g.node(n).device_ms or 0.0 for n in anc)
    x = loaded.example_input().zero_()
    ex = loaded.executor

    def fn() -> Any:
        with torch.inference_mode():
            return ex.compute({loaded.input_name: x}, [node])

    samples = []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        emulate_slowdown(fn, slowdown, emulation_clock())
        if i >= 2:  # the first runs pay for lazy initialisation
            samples.append((time.perf_counter() - t0) * 1000.0)
    if summed <= 0:
        return g
    ratio = min(4.0, max(0.5, statistics.median(samples) / summed))
    meta = {
        **g.meta.get("device", {}),
        "calibration": round(ratio, 4),
        "calibration_method": f"median of {runs} whole-frame runs (final exit) through the K x emulation "
        "/ sum of isolated node medians; every node scaled by it",
    }
    return g.with_timings("device", {n.name: (n.device_ms or 0.0) * ratio for n in g.nodes}, meta)


async def _aiter(frames: Iterable[Frame] | AsyncIterator[Frame]) -> AsyncIterator[Frame]:
    if hasattr(frames, "__aiter__"):
        async for f in frames:  # type: ignore[union-attr]
            yield f
    else:
        for f in frames:  # type: ignore[union-attr]
            yield f
            await asyncio.sleep(0)


# ---- frame sources ------------------------------------------------------------------------


def random_frames(loaded: LoadedModel, n: int, seed: int = 0) -> Iterator[Frame]:
    """`n` seeded random inputs of the model's shape, without labels."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield loaded.example_input(g), None


def dataset_frames(loaded: LoadedModel, source: str, n: int | None) -> Iterator[Frame]:
    """Test-split images of `source` (e.g. `fashion-mnist`), one per frame, with labels: the raw
    uint8 frame at the model's resolution when the graph takes frames (artifacts), else fully
    preprocessed; either way as the artifact's manifest says (else the dataset's default recipe)."""
    from dapdee import data as D

    shape = tuple(loaded.input_shape)
    pre = (loaded.manifest or {}).get("preprocess") or D.default_preprocess(source, shape)
    images, labels = D.load_raw(source, "test", n)
    prepare = D.capture_frames if loaded.graph.input.dtype == "uint8" else D.preprocess_images
    for i in range(len(labels)):
        yield prepare(images[i : i + 1], shape, pre), int(labels[i])


# ---- reporting ----------------------------------------------------------------------------


def summarize(records: list[FrameRecord], wall_s: float | None = None) -> dict[str, Any]:
    """Aggregates of a run: counts by place and exit, mean / p50 / p95 latencies, accuracy."""
    if not records:
        return {"frames": 0}
    meas = [r.measured_ms for r in records]
    pred = [r.predicted_ms for r in records if r.predicted_ms is not None]
    labelled = [r for r in records if r.correct is not None]
    out: dict[str, Any] = {
        "frames": len(records),
        "where": dict(Counter(r.where for r in records)),
        "exits": dict(Counter(r.exit for r in records)),
        "predicted_ms_mean": statistics.fmean(pred) if pred else None,
        "measured_ms_mean": statistics.fmean(meas),
        "measured_ms_p50": statistics.median(meas),
        "measured_ms_p95": sorted(meas)[max(0, math.ceil(0.95 * len(meas)) - 1)],
        "bytes_sent_mean": statistics.fmean(r.bytes_sent for r in records),
        "device_nodes_mean": statistics.fmean(r.device_nodes for r in records),
        "accuracy": (sum(bool(r.correct) for r in labelled) / len(labelled)) if labelled else None,
        "rate_mbps": records[-1].rate_mbps,
        "slowdown": records[-1].slowdown,
    }
    if wall_s:
        out["throughput_fps"] = len(records) / wall_s
    return out


def format_records_table(records: list[FrameRecord], limit: int = 40) -> str:
    """A per-frame table (the last `limit` frames)."""
    head = (
        f"{'#':>4} {'where':<8} {'exit':<6} {'dev':>4} {'bytes':>7} {'pred ms':>8} {'meas ms':>8} {'cls':>3} {'y':>3}"
    )
    lines = [head]
    for r in records[-limit:]:
        pred = f"{r.predicted_ms:8.1f}" if r.predicted_ms is not None else f"{'-':>8}"
        y = "" if r.label is None else str(r.label)
        lines.append(
            f"{r.index:>4} {r.where:<8} {r.exit:<6} {r.device_nodes:>4} {r.bytes_sent:>7} {pred} "
            f"{r.measured_ms:8.1f} {r.pred_class:>3} {y:>3}"
        )
    return "\n".join(lines)


def write_jsonl(records: list[FrameRecord], path: str) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
