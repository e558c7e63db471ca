"""Planner service: real uvicorn servers on loopback, the real Redis at 127.0.0.1:6379 (a unique
key prefix per test) and private redis-server processes for outages."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dapdee.cli import main as dapdee_main
from dapdee.costgraph import CostGraph
from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from tests.conftest import RedisProcess, planner_process, serve_app_in_thread

SHARED_REDIS = "redis://127.0.0.1:6379/0"
TOKEN = "planner-service-test-token"  # DAPDEE_API_TOKEN: every role (role checks: tests/test_planner_api.py)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ANY_WORKER_URL = r"https?://[A-Za-z0-9.-]+:[0-9]{1,5}"  # these tests name workers that do not exist


def toy_graph(model: str = "toy", timings: bool = True) -> dict[str, Any]:
    """A small DAG: stem, two residual blocks (a skip edge each), an early exit and a final exit."""

    def node(name: str, inputs: list[str], out_bytes: int, dev: float) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": name,
            "op": "conv2d",
            "inputs": inputs,
            "out_bytes": out_bytes,
            "flops": 100,
        }
        if timings:
            d["device_ms"] = dev
            d["edge_ms"] = round(dev / 8, 4)
        return d

    nodes = [
        node("stem", ["x"], 32768, 2.0),
        node("b1_c1", ["stem"], 32768, 3.0),
        node("b1_c2", ["b1_c1"], 16384, 3.0),
        node("b1_add", ["b1_c2", "stem"], 16384, 0.1),
        node("exit1_fc", ["b1_add"], 40, 0.05),
        node("b2_c1", ["b1_add"], 8192, 4.0),
        node("b2_c2", ["b2_c1"], 4096, 4.0),
        node("b2_add", ["b2_c2", "b1_add"], 4096, 0.1),
        node("fc", ["b2_add"], 40, 0.05),
    ]
    return {
        "model": model,
        "input": {"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32", "bytes": 12288},
        "nodes": nodes,
        "exits": [
            {"name": "exit1", "node": "exit1_fc", "accuracy": 0.81},
            {"name": "final", "node": "fc", "accuracy": 0.9},
        ],
    }


CONDITIONS = [
    {"bandwidth_mbps": 0.13, "rtt_ms": 40.0, "device_load": 0.0},
    {"bandwidth_mbps": 5.85, "rtt_ms": 10.0, "device_load": 0.5, "edge_load": 0.2, "mode": "latency"},
    {"bandwidth_mbps": 18.88, "rtt_ms": 2.0, "device_load": 0.9, "mode": "throughput", "frame_rate": 200.0},
    {"bandwidth_mbps": 1.1, "rtt_ms": 20.0, "latency_budget_ms": 15.0, "min_accuracy": 0.8},
    {"bandwidth_mbps": 50.0, "device_load": 0.3, "frame_rate": 30.0, "mode": "auto"},
]

FLAGS = {
    "rtt_ms": "--rtt-ms",
    "device_load": "--device-load",
    "edge_load": "--edge-load",
    "latency_budget_ms": "--latency-budget-ms",
    "min_accuracy": "--min-accuracy",
    "frame_rate": "--frame-rate",
    "mode": "--mode",
}


def cli_plan(capsys: pytest.CaptureFixture[str], path: Path, cond: dict[str, Any]) -> dict[str, Any]:
    """What `dapdee plan --profile path ...` prints for `cond`."""
    argv = ["plan", "--profile", str(path), "--bandwidth-mbps", str(cond["bandwidth_mbps"])]
    for k, flag in FLAGS.items():
        if cond.get(k) is not None:
            argv += [flag, str(cond[k])]
    capsys.readouterr()
    assert dapdee_main(argv) == 0
    return json.loads(capsys.readouterr().out)


def without_worker(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plan.items() if k != "edge_worker"}


UNIT_TIMINGS = {n["name"]: 1.0 for n in toy_graph()["nodes"]}  # 1 ms per node of the toy graph


@contextmanager
def planner(prefix: str, **kw: Any) -> Iterator[httpx.Client]:
    """An in-thread uvicorn planner (shared Redis unless redis_url given; the all-roles token;
    any worker URL) and a client for it that sends the token."""
    kw.setdefault("redis_url", SHARED_REDIS)
    kw.setdefault("api_token", TOKEN)
    kw.setdefault("worker_url_pattern", ANY_WORKER_URL)
    settings = Settings(key_prefix=prefix, **kw)
    with serve_app_in_thread(create_app(settings)) as url:
        with httpx.Client(base_url=url, timeout=30, headers=AUTH) as c:
            yield c


def beat(c: httpx.Client, url: str, models: list[str], tier: str, load: float, **kw: Any) -> httpx.Response:
    body = {"url": url, "models": models, "tier": tier, "load": load, "inflight": 0, "queue_depth": 0, **kw}
    return c.post("/workers/heartbeat", json=body)


def wait_for(pred: Any, timeout: float = 5.0, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def redis_errors(c: httpx.Client) -> float:
    """Failed Redis operations so far, from the planner's metrics."""
    lines = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("dapdee_planner_cache_errors_total{")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


# ---- plans equal `dapdee plan` -----------------------------------------------------------------


def test_plans_equal_cli_and_profiles(planner_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = toy_graph()
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(g))
    with planner(planner_prefix) as c:
        r = c.put("/models/toy", json=g)
        assert r.status_code == 201, r.text
        assert r.json()["created"] is True and r.json()["version"] == 1
        for cond in CONDITIONS:
            r = c.post("/plan", json={"model": "toy", **cond})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["edge_worker"] is None
            assert without_worker(got) == without_worker(cli_plan(capsys, path, cond)), cond

        # per-tier profiles: device timings from device_tier, edge from the chosen worker's tier
        graph = CostGraph.from_dict(g)
        dev_t = {n.name: round((n.device_ms or 0) * 1.7, 4) for n in graph.nodes}
        edge_t = {n.name: round((n.edge_ms or 0) * 0.6, 4) for n in graph.nodes}
        dev_meta = {"hardware": "phone", "threads": 1}
        assert (
            c.put(
                "/models/toy/profiles/phone", json={"kind": "device", "timings_ms": dev_t, "meta": dev_meta}
            ).status_code
            == 201
        )
        assert c.put("/models/toy/profiles/gpu", json={"kind": "edge", "timings_ms": edge_t}).status_code == 201
        profs = c.get("/models/toy/profiles").json()["profiles"]
        assert profs["phone"]["kind"] == "device" and profs["gpu"]["timings_ms"] == edge_t
        assert beat(c, "http://edge-gpu:8000", ["toy"], "gpu", 0.3).status_code == 200
        merged = graph.with_timings("device", dev_t, dev_meta).with_timings("edge", edge_t)
        mpath = tmp_path / "merged.json"
        merged.save(str(mpath))
        for cond in CONDITIONS:
            r = c.post("/plan", json={"model": "toy", "device_tier": "phone", **cond})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["edge_worker"] == "http://edge-gpu:8000"
            # no edge_load: the load the other devices' leases put on the worker (none here), not
            # the worker's self-reported 0.3 (that lags and counts the device's own frames)
            want_cond = {"edge_load": 0.0, **cond}
            assert without_worker(got) == without_worker(cli_plan(capsys, mpath, want_cond)), cond
        m = c.get("/metrics").text
        assert 'dapdee_planner_plans_total{mode="latency",outcome="ok"}' in m
        assert "dapdee_planner_cache_hits_total" in m and "dapdee_planner_workers 1.0" in m

        # same structure again keeps profiles; a new structure drops them
        assert c.put("/models/toy", json=g).json()["dropped_profiles"] == []
        g2 = toy_graph()
        g2["nodes"] = g2["nodes"][:5]
        g2["exits"] = g2["exits"][:1]
        assert c.put("/models/toy", json=g2).json()["dropped_profiles"] == ["gpu", "phone"]


def test_zoo_model_plans_equal_cli(planner_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dapdee.models import load_model

    graph = load_model("zoo:resnet18?width=0.25").graph
    graph = graph.with_timings("device", {n.name: 1e-6 * n.flops + 0.01 for n in graph.nodes})
    graph = graph.with_timings("edge", {n.name: 1e-7 * n.flops + 0.002 for n in graph.nodes})
    path = tmp_path / "resnet.json"
    graph.save(str(path))
    with planner(planner_prefix) as c:
        r = c.put(f"/models/{graph.model}", content=path.read_bytes(), headers={"content-type": "application/json"})
        assert r.status_code == 201, r.text
        assert c.get(f"/models/{graph.model}").json() == json.loads(path.read_text())
        for cond in CONDITIONS[:3]:
            r = c.post("/plan", json={"model": graph.model, **cond})
            assert r.status_code == 200, r.text
            assert without_worker(r.json()) == without_worker(cli_plan(capsys, path, cond))


# ---- replicas and Redis ------------------------------------------------------------------------------


def test_two_planner_processes_share_redis(planner_prefix: str) -> None:
    env = {
        "DAPDEE_KEY_PREFIX": planner_prefix,
        "DAPDEE_REDIS_URL": SHARED_REDIS,
        "DAPDEE_REFRESH_S": "0.2",
        "DAPDEE_API_TOKEN": TOKEN,
        "DAPDEE_WORKER_URL_PATTERN": ANY_WORKER_URL,
    }
    g = toy_graph("shared")
    with planner_process(env) as a, planner_process(env) as b:
        ca = httpx.Client(base_url=a, timeout=30, headers=AUTH)
        cb = httpx.Client(base_url=b, timeout=30, headers=AUTH)
        assert ca.put("/models/shared", json=g).status_code == 201
        assert [m["model"] for m in cb.get("/models").json()["models"]] == ["shared"]
        assert cb.get("/models/shared").json() == ca.get("/models/shared").json()
        for cond in CONDITIONS:
            pa = ca.post("/plan", json={"model": "shared", **cond})
            pb = cb.post("/plan", json={"model": "shared", **cond})
            assert pa.status_code == pb.status_code == 200
            assert pa.json() == pb.json()
        # a profile uploaded through B is used by A at once (device_tier) ...
        t = {n["name"]: n["device_ms"] * 2 for n in g["nodes"]}
        assert cb.put("/models/shared/profiles/slow", json={"kind": "device", "timings_ms": t}).status_code == 201
        pa = ca.post("/plan", json={"model": "shared", "device_tier": "slow", **CONDITIONS[1]})
        pb = cb.post("/plan", json={"model": "shared", "device_tier": "slow", **CONDITIONS[1]})
        assert pa.status_code == 200, pa.text
        assert pa.json() == pb.json()
        # ... and a worker registered with A is seen by B
        assert beat(ca, "http://edge-a:8000", ["shared"], "gpu", 0.1).status_code == 200
        assert wait_for(lambda: cb.post("/plan", json={"model": "shared", **CONDITIONS[0]}).json()["edge_worker"])
        # a model deleted through A disappears from B
        assert ca.delete("/models/shared").status_code == 204
        assert wait_for(lambda: cb.post("/plan", json={"model": "shared", **CONDITIONS[0]}).status_code == 404)
        assert ca.put("/models/shared", json=g).status_code == 201
        ca.close()
        cb.close()
    # a restarted planner loses nothing
    with planner_process(env) as a2, httpx.Client(base_url=a2, timeout=30, headers=AUTH) as c:
        assert c.post("/plan", json={"model": "shared", **CONDITIONS[0]}).status_code == 200


def test_a_profile_written_to_redis_says_so(planner_prefix: str) -> None:
    """A profile PUT says where it is stored, as a graph PUT does (`pending` while Redis is away:
    `test_redis_outage_serves_and_writes_through`)."""
    with planner(planner_prefix) as c:
        assert c.put("/models/toy", json=toy_graph()).json()["stored"] == "redis"
        r = c.put("/models/toy/profiles/phone", json={"kind": "device", "timings_ms": UNIT_TIMINGS})
        assert r.status_code == 201 and r.json()["stored"] == "redis"


def test_redis_outage_serves_and_writes_through(planner_prefix: str, redis_process: RedisProcess) -> None:
    kw = {"redis_url": redis_process.url, "redis_timeout_s": 0.2, "redis_backoff_s": 0.3, "refresh_s": 0.2}
    with planner(planner_prefix, **kw) as c:
        assert c.put("/models/before", json=toy_graph("before")).status_code == 201
        assert c.put("/models/during", json=toy_graph("during")).status_code == 201  # changed during it
        for cond in CONDITIONS:  # every plan map cached before the outage
            assert c.post("/plan", json={"model": "before", **cond}).status_code == 200
        ok = c.post("/plan", json={"model": "before", **CONDITIONS[0]})
        assert ok.status_code == 200
        assert c.get("/readyz").json()["redis"] == "up"

        redis_process.stop()
        errors_before = redis_errors(c)
        plans = CONDITIONS * 4
        for cond in plans:
            r = c.post("/plan", json={"model": "before", **cond})
            assert r.status_code == 200, r.text
        assert c.post("/plan", json={"model": "before", **CONDITIONS[0]}).json() == ok.json()
        # a dead Redis does not slow plans down: plans never wait on it (at most the background
        # refresh tried it meanwhile; one Redis call per plan would count one error per plan)
        assert redis_errors(c) - errors_before < len(plans) / 2
        changed = toy_graph("during")
        changed["nodes"][0]["out_bytes"] += 1
        r = c.put("/models/during", json=changed)  # a model this replica holds: queued
        assert r.status_code == 200 and r.json()["stored"] == "pending" and r.json()["version"] == 2
        r = c.put("/models/during/profiles/phone", json={"kind": "device", "timings_ms": UNIT_TIMINGS})
        assert r.status_code == 201 and r.json()["stored"] == "pending"  # queued, as the graph is
        assert c.post("/plan", json={"model": "during", "device_tier": "phone", **CONDITIONS[1]}).status_code == 200
        assert beat(c, "http://edge:1", ["during"], "gpu", 0.2).json()["shared"] is False
        assert c.post("/plan", json={"model": "during", **CONDITIONS[1]}).json()["edge_worker"] == "http://edge:1"
        assert {m["model"] for m in c.get("/models").json()["models"]} == {"before", "during"}
        assert c.get("/workers").status_code == 200
        rz = c.get("/readyz")
        # two writes queued: the graph and the profile
        assert rz.status_code == 200 and rz.json()["redis"] == "down" and rz.json()["pending_writes"] == 2
        # a model this replica never cached may exist in Redis: no 5xx, but a 404 that says so,
        # for reads and for changes, a create included (not queued: "unknown" or "new" would be
        # a guess, and a queued create of a stored model would be dropped on replay)
        for missing in (
            c.get("/models/nothere"),
            c.put("/models/nothere", json=toy_graph("nothere")),
            c.post("/plan", json={"model": "nothere", **CONDITIONS[1]}),
            c.delete("/models/nothere"),
            c.delete("/models/nothere/profiles/phone"),
            c.put("/models/nothere/profiles/phone", json={"kind": "device", "timings_ms": {}}),
        ):
            assert missing.status_code == 404 and missing.headers["Retry-After"] == "1", missing.text
            assert "Redis is unavailable" in missing.json()["detail"]
        assert redis_errors(c) > 0

        redis_process.start()  # same port, empty (no persistence)
        r = redis.Redis.from_url(redis_process.url)
        p = f"{planner_prefix}:v1"

        def written() -> bool:
            return bool(r.exists(f"{p}:graph:during") and r.exists(f"{p}:graph:before"))

        assert wait_for(written, timeout=10), "pending models not written through"
        assert json.loads(r.hget(f"{p}:profiles:during", "phone"))["timings_ms"] == UNIT_TIMINGS
        assert wait_for(
            lambda: c.get("/readyz").json()["redis"] == "up" and not c.get("/readyz").json()["pending_writes"]
        )
        r.close()
    # another planner on that Redis sees both models
    with planner(planner_prefix, **kw) as c2:
        assert {m["model"] for m in c2.get("/models").json()["models"]} == {"before", "during"}
        assert c2.post("/plan", json={"model": "during", "device_tier": "phone", **CONDITIONS[1]}).status_code == 200


def test_in_process_only() -> None:
    with planner("unused", redis_url="none") as c:
        assert c.get("/readyz").json() == {"ready": True, "redis": "disabled", "pending_writes": 0}
        assert c.put("/models/toy", json=toy_graph()).json()["stored"] == "memory"
        assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}).status_code == 200


# ---- workers ---------------------------------------------------------------------------------------------


def test_without_fleet_planning_the_heartbeat_load_prices_plans(
    planner_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """DAPDEE_FLEET_PLANNING=false: each device against the least-loaded worker's self-reported
    load, no leases (the behaviour before fleets, kept for comparisons)."""
    g = toy_graph()
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(g))
    with planner(planner_prefix, fleet_planning=False) as c:
        c.put("/models/toy", json=g)
        assert beat(c, "http://busy:1", ["toy"], "t", 0.7).status_code == 200
        assert beat(c, "http://idle:1", ["toy"], "t", 0.2).status_code == 200
        r = c.post("/plan", json={"model": "toy", **CONDITIONS[0]}).json()
        assert r["edge_worker"] == "http://idle:1" and "lease" not in r
        assert without_worker(r) == without_worker(cli_plan(capsys, path, {**CONDITIONS[0], "edge_load": 0.2}))
        leased = {"model": "toy", "device_id": "cam-1", "frame_rate": 5.0, **CONDITIONS[0]}
        r = c.post("/plan", json=leased)
        assert r.status_code == 422 and "device_id" in r.json()["detail"]


def test_worker_choice_and_expiry(planner_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = toy_graph()
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(g))
    with planner(planner_prefix, worker_ttl_s=4.0, refresh_s=0.1) as c:  # long enough for a loaded machine
        c.put("/models/toy", json=g)
        assert beat(c, "http://busy:1", ["toy"], "t", 0.7).status_code == 200
        assert beat(c, "http://idle:1", ["toy", "other"], "t", 0.2, inflight=3).status_code == 200
        assert beat(c, "http://other:1", ["other"], "t", 0.0).status_code == 200
        ws = c.get("/workers").json()["workers"]
        assert [w["url"] for w in ws] == ["http://other:1", "http://idle:1", "http://busy:1"]
        r = c.post("/plan", json={"model": "toy", **CONDITIONS[0]}).json()
        # no leases on either worker: priced at their leased load (0); the lower heartbeat load
        # breaks the tie between them
        assert r["edge_worker"] == "http://idle:1"
        assert without_worker(r) == without_worker(cli_plan(capsys, path, {**CONDITIONS[0], "edge_load": 0.0}))
        # explicit edge_load wins over the worker's
        r2 = c.post("/plan", json={"model": "toy", **CONDITIONS[1]}).json()
        assert without_worker(r2) == without_worker(cli_plan(capsys, path, CONDITIONS[1]))
        # load changes reorder
        beat(c, "http://busy:1", ["toy"], "t", 0.1)
        assert c.post("/plan", json={"model": "toy", **CONDITIONS[0]}).json()["edge_worker"] == "http://busy:1"
        # expiry
        assert wait_for(lambda: c.get("/workers").json()["workers"] == [], timeout=15)
        assert c.post("/plan", json={"model": "toy", **CONDITIONS[0]}).json()["edge_worker"] is None
        assert "dapdee_planner_workers 0.0" in c.get("/metrics").text
        # bad heartbeats
        for bad in (
            {"load": 1.0},
            {"load": -0.1},
            {"url": "ftp://x"},
            {"url": "not a url"},
            {"models": ["../etc"]},
            {"tier": "a b"},
            {"inflight": -1},
            {"models": ["m"] * 5000},
            {"capacity_ms_per_s": 0},
            {"capacity_ms_per_s": -5.0},
            {"load_avg": 0.5},  # unknown field
        ):
            body = {
                "url": "http://w:1",
                "models": ["toy"],
                "tier": "t",
                "load": 0.1,
                "inflight": 0,
                "queue_depth": 0,
            }
            r = c.post("/workers/heartbeat", json={**body, **bad})
            assert r.status_code == 422, (bad, r.text)
            assert list(bad)[0] in r.text
        r = c.post(
            "/workers/heartbeat",
            content=b'{"url": "http://w:1", "models": [], "tier": "t", "load": NaN, "inflight": 0, "queue_depth": 0}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "load" in r.text
        assert c.get("/workers").json()["workers"] == []


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_inputs(planner_prefix: str) -> None:
    g = toy_graph()
    with planner(planner_prefix, max_body_bytes=20000) as c:
        assert c.put("/models/toy", json=g).status_code == 201
        stored = c.get("/models/toy").json()

        r = c.post("/plan", json={"model": "ghost", "bandwidth_mbps": 1.0})
        assert r.status_code == 404 and "ghost" in r.text
        bad_plans = [
            ({"bandwidth_mbps": 0}, "bandwidth_mbps"),
            ({"bandwidth_mbps": -3}, "bandwidth_mbps"),
            ({"bandwidth_mbps": 1e300}, "bandwidth_mbps"),
            ({"bandwidth_mbps": "fast"}, "bandwidth_mbps"),
            ({"device_load": 1.0}, "device_load"),
            ({"device_load": -0.5}, "device_load"),
            ({"edge_load": 1.5}, "edge_load"),
            ({"rtt_ms": -1}, "rtt_ms"),
            ({"latency_budget_ms": 0}, "latency_budget_ms"),
            ({"min_accuracy": 2}, "min_accuracy"),
            ({"frame_rate": -30}, "frame_rate"),
            ({"mode": "fastest"}, "mode"),
            ({"model": "x" * 100}, "model"),
            ({"bandwidth_mbps": 1e-4}, "bandwidth_mbps"),
            ({"bandwidth_mbps": True}, "bandwidth_mbps"),
            ({"bandwidth_mbps": "5"}, "bandwidth_mbps"),
            ({"min_acc": 0.9}, "min_acc"),
            ({"model": "toy\n"}, "model"),
        ]
        for patch, field in bad_plans:
            body = {"model": "toy", "bandwidth_mbps": 1.0, **patch}
            r = c.post("/plan", json=body)
            assert r.status_code == 422, (patch, r.text)
            assert field in r.text, (patch, r.text)
        for raw, field in (
            (b'{"model": "toy", "bandwidth_mbps": NaN}', "bandwidth_mbps"),
            (b'{"model": "toy", "bandwidth_mbps": Infinity}', "bandwidth_mbps"),
            (b'{"model": "toy", "bandwidth_mbps": 1, "device_load": NaN}', "device_load"),
            (b'{"model": "toy"}', "bandwidth_mbps"),
            (b"not json", "json"),
            (b"[1, 2]", ""),
        ):
            r = c.post("/plan", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422, (raw, r.text)
            assert field in r.text.lower()

        # cost graphs and names
        cyc = toy_graph()
        cyc["nodes"][1]["inputs"] = ["b1_c2"]
        r = c.put("/models/toy", json=cyc)
        assert r.status_code == 422 and "topological order" in r.text
        unknown = toy_graph()
        unknown["exits"][0]["node"] = "nope"
        r = c.put("/models/toy", json=unknown)
        assert r.status_code == 422 and "exits[0].node" in r.text
        nan = toy_graph()
        r = c.put(
            "/models/toy",
            content=json.dumps(nan).replace("3.0", "NaN", 1),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "device_ms" in r.text
        r = c.put("/models/other", json=g)
        assert r.status_code == 422 and "path" in r.text
        bad_name = toy_graph("bad name")
        r = c.put("/models/bad%20name", json=bad_name)
        assert r.status_code == 422 and "model name" in r.text
        assert c.put("/models/toy", content=b"{", headers={"content-type": "application/json"}).status_code == 422
        assert c.put("/models/toy", json=[1, 2]).status_code == 422

        # profiles
        for body, field in (
            ({"kind": "device", "timings_ms": {"nope": 1.0}}, "nope"),
            ({"kind": "device", "timings_ms": {"stem": -1.0}}, "timings_ms"),
            ({"kind": "gpu", "timings_ms": {"stem": 1.0}}, "kind"),
            ({"timings_ms": {"stem": 1.0}}, "kind"),
            ({"kind": "edge", "timings_ms": {"stem": 1e30}}, "timings_ms"),
        ):
            r = c.put("/models/toy/profiles/t1", json=body)
            assert r.status_code == 422, (body, r.text)
            assert field in r.text
        r = c.put(
            "/models/toy/profiles/t1",
            content=b'{"kind": "device", "timings_ms": {"stem": NaN}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422 and "timings_ms" in r.text
        assert c.put("/models/toy/profiles/bad%20tier", json={"kind": "device", "timings_ms": {}}).status_code == 422
        assert c.put("/models/ghost/profiles/t1", json={"kind": "device", "timings_ms": {}}).status_code == 404
        assert c.get("/models/ghost").status_code == 404
        assert c.get("/models/ghost/profiles").status_code == 404
        assert c.delete("/models/ghost").status_code == 404
        assert c.delete("/models/toy/profiles/none").status_code == 404

        # oversized bodies: announced and streamed (chunked, no Content-Length)
        big = {"model": "toy", "bandwidth_mbps": 1.0, "pad": "x" * 30000}
        r = c.post("/plan", json=big)
        assert r.status_code == 413
        r = c.put("/models/toy", content=iter([b'{"model": "toy", "pad": "', b"x" * 15000, b"y" * 15000, b'"}']))
        assert r.status_code == 413
        chunks = [b'{"model": "toy", "bandwidth_mbps": 1, "pad": "', b"x" * 25000, b'"}']
        assert c.post("/plan", content=iter(chunks)).status_code == 413
        chunked_ok = [b'{"model": "toy", ', b'"bandwidth_mbps": 1}']
        assert c.post("/plan", content=iter(chunked_ok)).status_code == 200

        # missing timings: 409 naming what to upload
        assert c.put("/models/bare", json=toy_graph("bare", timings=False)).status_code == 201
        r = c.post("/plan", json={"model": "bare", "bandwidth_mbps": 1.0})
        assert r.status_code == 409 and "device_ms" in r.text and "/models/bare/profiles/" in r.text
        r = c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0, "device_tier": "phone"})
        assert r.status_code == 409 and "phone" in r.text
        t = {n["name"]: 1.0 for n in g["nodes"]}
        assert c.put("/models/bare/profiles/phone", json={"kind": "device", "timings_ms": t}).status_code == 201
        r = c.post("/plan", json={"model": "bare", "bandwidth_mbps": 1.0, "device_tier": "phone"})
        assert r.status_code == 409 and "edge_ms" in r.text
        beat(c, "http://w:1", ["bare"], "gpu", 0.1)
        r = c.post("/plan", json={"model": "bare", "bandwidth_mbps": 1.0, "device_tier": "phone"})
        assert r.status_code == 409 and "'gpu'" in r.text
        partial = {"kind": "edge", "timings_ms": {"stem": 0.1}}
        assert c.put("/models/bare/profiles/gpu", json=partial).status_code == 201
        r = c.post("/plan", json={"model": "bare", "bandwidth_mbps": 1.0, "device_tier": "phone"})
        assert r.status_code == 409 and "b1_c1" in r.text
        assert c.put("/models/bare/profiles/gpu", json={"kind": "edge", "timings_ms": t}).status_code == 200
        r = c.post("/plan", json={"model": "bare", "bandwidth_mbps": 1.0, "device_tier": "phone"})
        assert r.status_code == 200 and r.json()["edge_worker"] == "http://w:1"
        r = c.post("/plan", json={"model": "bare", "bandwidth_mbps": 1.0, "device_tier": "gpu"})
        assert r.status_code == 409 and "edge profile" in r.text

        # nothing stored was touched; the service is up
        assert c.get("/models/toy").json() == stored
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}).status_code == 200
        m = c.get("/metrics").text
        assert 'outcome="invalid"' in m and 'outcome="unknown_model"' in m and 'outcome="missing_timings"' in m

        # deletes
        assert c.delete("/models/bare/profiles/gpu").status_code == 204
        assert "gpu" not in c.get("/models/bare/profiles").json()["profiles"]
        assert c.delete("/models/bare").status_code == 204
        assert c.get("/models/bare").status_code == 404
        assert [m["model"] for m in c.get("/models").json()["models"]] == ["toy"]


def test_uploads_are_checked_where_they_arrive(planner_prefix: str) -> None:
    """What a plan would trip over later is refused at upload, naming the field: a profile's
    per-request cost that is not a number of ms, an input dtype the wire cannot carry; and an
    If-Match whose digits are not ASCII ('²' passes str.isdigit). Nothing stored changes."""
    with planner(planner_prefix) as c:
        assert c.put("/models/toy", json=toy_graph()).status_code == 201
        stored = c.get("/models/toy").json()
        t = {n["name"]: 1.0 for n in toy_graph()["nodes"]}
        for key in ("device_request_ms", "edge_request_ms"):
            for bad in ("fast", -3, 1e300, True, None):
                body = {"kind": "edge", "timings_ms": t, "meta": {key: bad}}
                r = c.put("/models/toy/profiles/t1", json=body)
                if bad is None:  # absent in effect: the graph's own overheads hold
                    assert r.status_code in (200, 201), r.text
                    continue
                assert r.status_code == 422 and f"meta.{key}" in r.text, (bad, r.text)
        graph = toy_graph()
        graph["input"]["dtype"] = "banana"
        r = c.put("/models/toy", json=graph)
        assert r.status_code == 422 and "dtype" in r.text, r.text
        r = c.put("/models/toy", json=toy_graph(), headers={"If-Match": b'"\xb2"'})
        assert r.status_code == 422 and "If-Match" in r.text, r.text
        assert c.get("/models/toy").json() == stored
        assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}).status_code == 200


def test_tokens_docs_metrics(planner_prefix: str) -> None:
    """The all-roles token (DAPDEE_API_TOKEN) opens every route; without it only health, metrics
    and the docs answer (401 problem documents elsewhere). Role by role: tests/test_planner_api.py."""
    with planner(planner_prefix) as c:
        g = toy_graph()
        bare = {"authorization": ""}
        assert c.put("/models/toy", json=g, headers=bare).status_code == 401
        assert c.put("/models/toy", json=g, headers={"authorization": "Bearer nope"}).status_code == 401
        assert c.put("/models/toy", json=g, headers={"authorization": f"Basic {TOKEN}"}).status_code == 401
        assert c.put("/models/toy", json=g).status_code == 201
        assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 2.0}, headers=bare).status_code == 401
        assert c.get("/models", headers=bare).status_code == 401
        assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 2.0}).status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert c.get(path, headers=bare).status_code == 200, path
        spec = c.get("/openapi.json").json()
        assert {"/plan", "/models/{model}", "/workers/heartbeat", "/healthz", "/readyz", "/metrics"} <= set(
            spec["paths"]
        )
        assert "bandwidth_mbps" in json.dumps(spec["paths"]["/plan"])
        m = c.get("/metrics").text
        for name in (
            "dapdee_planner_plans_total",
            "dapdee_planner_plan_duration_seconds_bucket",
            "dapdee_planner_cache_hits_total",
            "dapdee_planner_cache_misses_total",
            "dapdee_planner_workers",
            "dapdee_planner_models 1.0",
        ):
            assert name in m
        dur = [ln for ln in m.splitlines() if ln.startswith("dapdee_planner_plan_duration_seconds_count")]
        assert dur and float(dur[0].split()[-1]) >= 1 and not math.isnan(float(dur[0].split()[-1]))


def test_redis_down_at_start(planner_prefix: str) -> None:
    rp = RedisProcess()  # a port nothing listens on yet
    kw = {"redis_url": rp.url, "redis_timeout_s": 0.2, "redis_backoff_s": 0.2, "refresh_s": 0.1}
    try:
        with planner(planner_prefix, **kw) as c:
            rz = c.get("/readyz")
            assert rz.status_code == 200 and rz.json()["ready"] and rz.json()["redis"] == "down"
            # Redis may hold "early" already: the create is refused (retry), not queued on a guess
            r = c.put("/models/early", json=toy_graph("early"))
            assert r.status_code == 404 and r.headers["Retry-After"] == "1", r.text
            assert c.get("/readyz").json()["pending_writes"] == 0
            rp.start()
            r = redis.Redis.from_url(rp.url)
            assert wait_for(lambda: c.get("/readyz").json()["redis"] == "up", timeout=10)
            got = c.put("/models/early", json=toy_graph("early"))
            assert got.status_code == 201 and got.json()["stored"] == "redis", got.text
            assert r.exists(f"{planner_prefix}:v1:graph:early")
            assert c.post("/plan", json={"model": "early", **CONDITIONS[0]}).status_code == 200
            r.close()
    finally:
        rp.stop()


def test_planmap_key_names_the_enumeration_cap() -> None:
    """Replicas with different DAPDEE_PLANMAP_CAP build different plan maps (beyond the cap a
    map is approximate): they must not read each other's from Redis."""
    from dapdee.planner.metrics import PlannerMetrics
    from dapdee.planner.store import Store

    key = ("g", "d", "e")
    default = Store(Settings(redis_url=None), PlannerMetrics()).planmaps.redis_key(key)
    capped = Store(Settings(redis_url=None, planmap_cap=50), PlannerMetrics()).planmaps.redis_key(key)
    assert default.endswith(":planmap:g:d:e") and capped == default + ":cap50"
