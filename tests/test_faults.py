"""Fault injection, every component a real process or server on 127.0.0.1:

1. Redis killed and restarted during a planning load (a private redis-server, the planner
   pointed at it): zero failed plans; a profile and a model PUT during the outage are written
   through to Redis once it is back.
2. An edge worker killed (SIGKILL) during a device stream: zero lost frames (the device runtime
   finishes them locally, re-plans, and moves to the surviving worker), every answer the model's.
3. A worker that answers slowly (a real HTTP proxy written here that answers the device's frames
   3 s late): those frames time out and are finished on the device, each counted.
4. The planner restarted (SIGKILL, then started again on the same port): devices keep running
   on their last plan meanwhile and get new plans afterwards; with the in-process store the
   planner forgot everything, so edge workers and devices must register again.

The edge workers serve an artifact written here and the device loads the same one, so every
answer, from the edge or from a fallback, is checked against the device's copy of the model.
(Pipelined streams under an edge kill: tests/test_device_runtime.py.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch

from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig
from dapdee.device.session import DeviceSettings, open_device
from dapdee.device.types import Frame, FrameRecord
from dapdee.testing import ServiceProcess, wait_registered
from tests.conftest import RedisProcess, planner_process, serve_app_in_thread
from tests.device_stack import ForwardingProxy

SPEC = "zoo:alexnet?width=0.25"
MODEL = "alexnet"
K = 100.0  # the device is K x slower: the edge pays off even with a poor uplink estimate


def planner_service(redis_url: str | None = None, env: dict[str, str] | None = None) -> ServiceProcess:
    return ServiceProcess("planner", ["--redis-url", redis_url or "none"], "/readyz", env)


def edge_service(models: str, planner_url: str) -> ServiceProcess:
    args = ["--models", models, "--threads", "1", "--profile-repeats", "3", "--planner", planner_url]
    return ServiceProcess("edge", args, "/v2/health/ready", {"DAPDEE_EDGE_HEARTBEAT_S": "1"})


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded untrained alexnet as an artifact: the edge workers serve it, the device loads it."""
    from safetensors.torch import save_file

    from dapdee.models import MANIFEST, WEIGHTS, load_model, sha256_file

    directory = tmp_path_factory.mktemp("alexnet")
    torch.manual_seed(0)
    m = load_model(SPEC)
    save_file({k: v.contiguous() for k, v in m.module.state_dict().items()}, str(directory / WEIGHTS))
    manifest = {"model": SPEC, "name": MODEL, "input_shape": list(m.input_shape)}
    manifest["weights_sha256"] = sha256_file(directory / WEIGHTS)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def device_model(artifact: Path) -> tuple[Any, Any]:
    """The device's loaded model and its K x device profile (shared by the tests' devices)."""
    from dapdee.models import load_model
    from dapdee.profiler import profile_model

    loaded = load_model("", weights=artifact)
    with torch.inference_mode():  # warm every exit path: a cold first run costs K x its stall
        for e in loaded.graph.exits:
            loaded.executor.compute({loaded.input_name: torch.zeros(loaded.input_shape)}, [e.node])
    dev = profile_model(loaded, "device", slowdown=K, threads=1, repeats=3, warmup=1)
    # 10x pessimistic device timings: plans use the edge whatever the uplink estimate says, so
    # the faults below hit frames that are on their way to the edge
    return loaded, dev.with_timings("device", {n.name: n.device_ms * 10 for n in dev.nodes}, None)


def _device(planner_url: str, device_model: tuple[Any, Any], edge_url: str | None = None, **kw: Any) -> Any:
    """A planner-backed device runtime (an async context manager) on the shared model."""
    req = Requirements(kw.pop("latency_budget_ms", None), None, None, "latency")
    cfg = RuntimeConfig(
        req, plan_max_age_s=kw.pop("plan_max_age_s", 0.5), backoff_initial_s=kw.pop("backoff_initial_s", 0.2),
        backoff_max_s=kw.pop("backoff_max_s", 1.0), timeout_floor_ms=kw.pop("timeout_floor_ms", 1000.0),
        replan_threshold=kw.pop("replan_threshold", 0.2),
    )  # fmt: skip
    settings = DeviceSettings(
        runtime=cfg, planner=PlannerConfig(planner_url, "device-k100", ready_timeout_s=60.0),
        model=MODEL, slowdown=K, device_load=0.0, edge_url=edge_url, **kw,
    )  # fmt: skip
    return open_device(settings, device_model[0], device_model[1])


def _frames(loaded: Any, n: int) -> list[Frame]:
    g = torch.Generator().manual_seed(0)
    return [Frame(torch.randn(loaded.input_shape, generator=g)) for _ in range(n)]


async def paced(frames: list[Frame], period_s: float) -> AsyncIterator[Frame]:
    """`frames`, one every `period_s` seconds."""
    for frame in frames:
        yield frame
        await asyncio.sleep(period_s)


def _answered(records: list[FrameRecord], frames: list[Frame], loaded: Any) -> None:
    """Every frame answered, in order, with the model's class at the exit it left at."""
    assert len(records) == len(frames), f"{len(frames) - len(records)} frames lost"
    assert [r.index for r in records] == sorted(r.index for r in records)
    for frame, rec in zip(frames, records, strict=True):
        assert rec.pred_class == int(loaded.run_exit(frame.x, rec.exit).argmax(dim=1)[0]), rec


# ---- 1. Redis killed and restarted during a planning load ---------------------------------


def _graph_json(loaded: Any) -> dict[str, Any]:
    g = loaded.graph
    g = g.with_timings("device", {n.name: 1.0 for n in g.nodes}, None)
    g = g.with_timings("edge", {n.name: 0.1 for n in g.nodes}, None)
    return g.to_dict()


class PlanLoad:
    """Closed-loop POST /plan traffic from `threads` threads until stopped; counts outcomes."""

    def __init__(self, url: str, bodies: list[dict[str, Any]], threads: int = 3) -> None:
        self.url = url
        self.bodies = bodies
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            k = i
            while not self._stop.is_set() and self.ok + len(self.failed) < 20_000:
                body = self.bodies[k % len(self.bodies)]
                k += 1
                try:
                    r = c.post("/plan", json=body)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.002)

    def __enter__(self) -> PlanLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def test_redis_outage_during_planning_load(device_model: tuple[Any, Any]) -> None:
    loaded = device_model[0]
    rp = RedisProcess()
    rp.start()
    prefix = "faults"
    env = {
        "DAPDEE_REDIS_URL": rp.url,
        "DAPDEE_KEY_PREFIX": prefix,
        "DAPDEE_REDIS_BACKOFF_S": "0.2",
        "DAPDEE_REFRESH_S": "0.2",
        "DAPDEE_REDIS_TIMEOUT_S": "0.2",
    }
    graph = _graph_json(loaded)
    timings = {n["name"]: 2.0 for n in graph["nodes"]}
    try:
        with planner_process(env) as url:
            assert httpx.put(f"{url}/models/{MODEL}", json=graph, timeout=30).status_code == 201  # created
            bodies = [
                {"model": MODEL, "bandwidth_mbps": bw, "rtt_ms": 10.0, "device_load": load}
                for bw in (0.13, 1.1, 5.85, 18.88)
                for load in (0.0, 0.5)
            ]
            r = httpx.post(f"{url}/plan", json=bodies[0], timeout=30)  # builds the plan map
            assert r.status_code == 200, r.text
            with PlanLoad(url, bodies) as load:
                time.sleep(0.5)
                rp.stop()  # SIGKILL: Redis is gone mid-load
                time.sleep(0.5)
                # changes during the outage: answered, kept, queued for write-through
                r1 = httpx.put(
                    f"{url}/models/{MODEL}/profiles/dev-outage",
                    json={"kind": "device", "timings_ms": timings},
                    timeout=10,
                )
                # a model this replica has not cached may be stored: its create is refused (retry)
                r2 = httpx.put(f"{url}/models/m2", json={**graph, "model": "m2"}, timeout=10)
                assert r1.status_code == 201, r1.text  # created (PUT answers 201 for a new model or tier)
                assert r2.status_code == 404 and r2.headers["Retry-After"] == "1", r2.text
                during = httpx.post(f"{url}/plan", json={**bodies[2], "device_tier": "dev-outage"}, timeout=10)
                assert during.status_code == 200, during.text
                assert httpx.get(f"{url}/readyz", timeout=5).json()["redis"] == "down"
                time.sleep(0.5)
                rp.start()  # a fresh, empty Redis on the same port
                r = redis.Redis(port=rp.port, socket_timeout=2)
                deadline = time.monotonic() + 15
                while True:
                    stored = r.hget(f"{prefix}:v1:profiles:{MODEL}", "dev-outage")
                    if stored is not None:
                        break
                    assert time.monotonic() < deadline, "outage writes never reached Redis"
                    time.sleep(0.1)
                time.sleep(0.5)
            ready = httpx.get(f"{url}/readyz", timeout=5).json()
        print(f"redis outage: {load.ok} plans answered, {len(load.failed)} failed")
        assert not load.failed, load.failed[:5]
        assert load.ok > 50
        assert ready["redis"] == "up" and ready["pending_writes"] == 0, ready
        assert r.hget(f"{prefix}:v1:models", MODEL) is not None  # the model written back too
    finally:
        rp.stop()


# ---- 2. an edge worker killed during a device stream ----------------------------------------


@pytest.fixture
def two_edges(artifact: Path) -> Iterator[tuple[ServiceProcess, list[ServiceProcess]]]:
    # leased devices come back only after the run (15 s), so no re-plan but the kill's moves them
    env = {"DAPDEE_WORKER_TTL_S": "1.5", "DAPDEE_REFRESH_S": "0.2", "DAPDEE_REPLAN_AFTER_S": "15"}
    planner = planner_service(env=env).start()
    edges: list[ServiceProcess] = []
    try:
        for _ in range(2):
            edges.append(edge_service(f"@{artifact}", planner.url).start())
        wait_registered(planner.url, MODEL, [e.url for e in edges])
        yield planner, edges
    finally:
        for e in edges:
            e.kill()
        planner.kill()


def test_edge_worker_killed_mid_stream(
    two_edges: tuple[ServiceProcess, list[ServiceProcess]], device_model: tuple[Any, Any]
) -> None:
    planner, edges = two_edges
    frames = _frames(device_model[0], 80)

    async def go() -> tuple[list[FrameRecord], list[str]]:
        # plans neither age nor follow a bandwidth drift here: the device keeps its worker until
        # that worker fails (a drift re-plan right after the kill could move it first: no frame
        # would fail)
        async with _device(planner.url, device_model, plan_max_age_s=100.0, replan_threshold=1e9) as rt:

            async def killer() -> None:
                while len(rt.records) < 20:
                    await asyncio.sleep(0.01)
                victim = next(e for e in edges if e.url == rt.plan.edge_worker)
                victim.kill()

            k = asyncio.create_task(killer())
            records = await rt.run(paced(frames, 0.05))
            await k
            return records, rt.events

    records, events = asyncio.run(go())
    _answered(records, frames, device_model[0])
    where = "".join(r.where[0] for r in records)
    print("edge killed: where per frame", where, "events", events[-4:])
    assert set(where[:20]) == {"e"}, where
    # the frames right after the kill were finished on the device, later ones reached the survivor
    assert "f" in where[20:], where
    assert "e" in where[-20:], f"never moved to the surviving worker: {where}"


# ---- 3. a worker that answers slowly --------------------------------------------------------


class SlowProxy(ForwardingProxy):
    """Forwards to `target`; infer requests that carry a request id (the device's frames, not
    its id-less bandwidth probes) are answered `delay_s` late, so the device keeps believing in
    the edge while its frames are stuck there."""

    def __init__(self, target: str, delay_s: float) -> None:
        super().__init__(target)
        self.delay_s = delay_s
        self.delayed = 0

    async def answer(
        self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: httpx.Response
    ) -> tuple[int, dict[str, str], bytes]:
        hlen = int(headers.get("inference-header-content-length", len(body)))
        if scope["path"].endswith("/infer") and b'"id"' in body[:hlen]:
            self.delayed += 1
            await asyncio.sleep(self.delay_s)
        return await super().answer(scope, headers, body, response)


def test_slow_worker_frames_time_out_to_local_fallback(artifact: Path, device_model: tuple[Any, Any]) -> None:
    """Frames sent to a worker that answers 6 s late time out (the timeout is finite: 3 x the
    prediction, at least 150 ms) and are finished on the device: every frame the proxy held
    back is a timed-out fallback, and every answer is the model's."""
    loaded, dev = device_model
    frames = _frames(loaded, 30)
    planner = planner_service().start()
    edge = edge_service(f"@{artifact}", planner.url).start()
    try:
        wait_registered(planner.url, MODEL, [edge.url])
        proxy = SlowProxy(edge.url, delay_s=6.0)  # past any frame's timeout (3 x its prediction), loaded host too
        with serve_app_in_thread(proxy) as slow_url:

            async def go() -> list[FrameRecord]:
                device = _device(
                    planner.url, (loaded, dev), edge_url=slow_url, latency_budget_ms=1500.0,
                    timeout_floor_ms=150.0, backoff_initial_s=0.2, backoff_max_s=0.4,
                )  # fmt: skip
                async with device as rt:
                    return await rt.run(paced(frames, 0.03))

            records = asyncio.run(go())
    finally:
        edge.kill()
        planner.kill()
    _answered(records, frames, loaded)
    counts = {w: sum(r.where == w for r in records) for w in ("edge", "local", "fallback")}
    timed_out = [r for r in records if r.where == "fallback" and (r.error or "").startswith("timeout")]
    print("slow worker:", counts, "timed out", len(timed_out), "delayed", proxy.delayed)
    assert proxy.delayed >= 1 and len(timed_out) == proxy.delayed, (counts, proxy.delayed)
    # the rest of the fallbacks never reached the worker: it was resting after a timeout
    assert all(r.error == "edge backing off" for r in records if r.where == "fallback" and r not in timed_out)


# ---- 4. the planner restarted -----------------------------------------------------------------


def _restart_scenario(
    device_model: tuple[Any, Any], planner: ServiceProcess, edges: list[ServiceProcess]
) -> tuple[list[FrameRecord], list[Any], float, float]:
    """Stream frames; kill the planner after 15, start it again on the same port after 30."""
    frames = _frames(device_model[0], 90)
    marks: dict[str, float] = {}

    async def go() -> tuple[list[FrameRecord], list[Any]]:
        async with _device(planner.url, device_model, plan_max_age_s=0.3) as rt:

            async def chaos() -> None:
                while len(rt.records) < 15:
                    await asyncio.sleep(0.01)
                planner.kill()
                marks["down"] = time.monotonic()
                while len(rt.records) < 30:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(planner.start)
                marks["up"] = time.monotonic()

            t = asyncio.create_task(chaos())
            records = await rt.run(paced(frames, 0.05))
            await t
            return records, list(rt.plans)

    records, plans = asyncio.run(go())
    _answered(records, frames, device_model[0])
    return records, plans, marks["down"], marks["up"]


def test_planner_restart_with_redis(artifact: Path, device_model: tuple[Any, Any]) -> None:
    """Redis-backed planner: after the restart it reloads models and profiles from Redis; the
    device runs on its last plan while it is down and gets fresh plans after."""
    rp = RedisProcess()
    rp.start()
    planner = planner_service(rp.url, env={"DAPDEE_REFRESH_S": "0.2", "DAPDEE_WORKER_TTL_S": "3"}).start()
    edge = edge_service(f"@{artifact}", planner.url).start()
    try:
        wait_registered(planner.url, MODEL, [edge.url])
        records, plans, t_down, t_up = _restart_scenario(device_model, planner, [edge])
    finally:
        edge.kill()
        planner.kill()
        rp.stop()
    where = "".join(r.where[0] for r in records)
    print("planner restart (redis): where per frame", where)
    # the last plan kept working while the planner was away
    assert set(where[15:30]) == {"e"}, where
    assert any(p.requested_at > t_up for p in plans), "no new plan after the planner came back"


@pytest.fixture(scope="module")
def in_process_restart(artifact: Path, device_model: tuple[Any, Any]) -> dict[str, Any]:
    """The restart scenario against a planner with the in-process store (it forgets everything):
    frames, plans, restart time and what the planner holds once both registered again (or 10 s
    after the stream ended)."""
    planner = planner_service(env={"DAPDEE_WORKER_TTL_S": "3"}).start()
    edge = edge_service(f"@{artifact}", planner.url).start()
    try:
        wait_registered(planner.url, MODEL, [edge.url])
        records, plans, t_down, t_up = _restart_scenario(device_model, planner, [edge])
        deadline = time.monotonic() + 10  # give registration a few heartbeats
        while True:
            profiles = httpx.get(f"{planner.url}/models/{MODEL}/profiles", timeout=5)
            kinds = set()
            if profiles.status_code == 200:
                kinds = {p["kind"] for p in profiles.json()["profiles"].values()}
            if kinds >= {"edge", "device"} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        workers = httpx.get(f"{planner.url}/workers", timeout=5).json()["workers"]
    finally:
        edge.kill()
        planner.kill()
    return {"records": records, "plans": plans, "t_up": t_up, "profiles": profiles, "workers": workers}


def test_planner_restart_in_process_store_edge_reregisters(in_process_restart: dict[str, Any]) -> None:
    """The device runs on its last plan while the planner is away; the edge worker notices the
    restarted planner forgot its model and registers graph and edge profile again."""
    records = in_process_restart["records"]
    assert len(records) == 90  # each answer was checked against the model in the scenario
    where = "".join(r.where[0] for r in records)
    print("planner restart (in-process): where per frame", where)
    assert set(where[15:30]) == {"e"}, where  # the last plan kept working while the planner was down
    profiles = in_process_restart["profiles"]
    assert profiles.status_code == 200, f"the model was never registered again: {profiles.text}"
    kinds = {t: p["kind"] for t, p in profiles.json()["profiles"].items()}
    assert "edge" in kinds.values(), kinds
    assert in_process_restart["workers"], "the edge worker's heartbeats did not re-register it"


def test_planner_restart_in_process_store_device_reregisters(in_process_restart: dict[str, Any]) -> None:
    """The device notices the restarted planner lacks its model / device profile (404 / 409 on
    POST /plan), uploads them again and gets new plans."""
    profiles = in_process_restart["profiles"]
    assert profiles.status_code == 200, profiles.text
    kinds = {t: p["kind"] for t, p in profiles.json()["profiles"].items()}
    assert "device" in kinds.values(), f"the device never re-uploaded its device profile: {kinds}"
    assert any(p.requested_at > in_process_restart["t_up"] for p in in_process_restart["plans"]), (
        "no new plan after the planner came back"
    )
