"""The shared edge through the planner's HTTP API, against a real Redis: leases in POST /plan,
GET/DELETE /devices, GET /workers, POST /fleet/rebalance, replicas and restarts, concurrent
admission, cost model v2 from profile meta, and the bad input the fleet adds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import redis

from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from dapdee.planner.fleet import Fleet
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.plan_choice import drifted, request_of
from dapdee.planner.rebalancing import Rebalancer
from dapdee.planner.store import Store
from dapdee.planner.workers import Worker
from dapdee.planning.planmap import plan_id
from dapdee.testing.redis_tools import clear_prefix
from tests import oracle
from tests.conftest import serve_app_in_thread
from tests.test_planner_service import ANY_WORKER_URL, AUTH, SHARED_REDIS, TOKEN, beat, planner, wait_for
from tests.test_schemas import assert_valid

RHO = 0.9


def chain_graph(model: str = "cam") -> dict[str, Any]:
    """x -(1000 B)-> a -(100 B)-> b, one exit. Device 60 + 60 ms; the graph's own edge timings
    2 + 2 ms; the edge profile (tier "t") says 2 + 2 ms too; edge request 4 ms (profile meta)."""
    return {
        "model": model,
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 1000},
        "nodes": [
            {"name": "a", "op": "", "inputs": ["x"], "out_bytes": 100, "device_ms": 60.0, "edge_ms": 2.0},
            {"name": "b", "op": "", "inputs": ["a"], "out_bytes": 10, "device_ms": 60.0, "edge_ms": 2.0},
        ],
        "exits": [{"name": "final", "node": "b", "accuracy": 0.9}],
    }


def setup_model(
    c: httpx.Client,
    capacity: float = 1000.0,
    workers: tuple[str, ...] = ("http://w1:1",),
    graph: dict[str, Any] | None = None,
) -> None:
    assert c.put("/models/cam", json=graph or chain_graph()).status_code in (200, 201)
    edge = {"kind": "edge", "timings_ms": {"a": 2.0, "b": 2.0}, "meta": {"edge_request_ms": 4.0}}
    assert c.put("/models/cam/profiles/t", json=edge).status_code in (200, 201)
    dev = {"kind": "device", "timings_ms": {"a": 60.0, "b": 60.0}, "meta": {"device_request_ms": 1.0}}
    assert c.put("/models/cam/profiles/phone", json=dev).status_code in (200, 201)
    for url in workers:
        assert beat(c, url, ["cam"], "t", 0.0, capacity_ms_per_s=capacity).status_code == 200


def setup_two_models(c: httpx.Client) -> None:
    """`setup_model`, a second model "cam2" with the same graph and profiles, and worker
    http://w1:1 (1000 ms/s) serving both."""
    setup_model(c)
    assert c.put("/models/cam2", json=chain_graph("cam2")).status_code == 201
    for tier in ("t", "phone"):
        profile = c.get("/models/cam/profiles").json()["profiles"][tier]
        assert c.put(f"/models/cam2/profiles/{tier}", json=profile).status_code == 201
    assert beat(c, "http://w1:1", ["cam", "cam2"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200


def setup_two_tiers(c: httpx.Client) -> None:
    """`setup_model` without a worker, an edge profile of tier t2 (faster than t), and two
    workers: http://w1:1 of tier t (heartbeat load 0.5) and http://w2:1 of tier t2 (load 0)."""
    setup_model(c, workers=())
    fast = {"kind": "edge", "timings_ms": {"a": 1.0, "b": 1.0}, "meta": {"edge_request_ms": 4.0}}
    assert c.put("/models/cam/profiles/t2", json=fast).status_code in (200, 201)
    assert beat(c, "http://w1:1", ["cam"], "t", 0.5, capacity_ms_per_s=1000.0).status_code == 200
    assert beat(c, "http://w2:1", ["cam"], "t2", 0.0, capacity_ms_per_s=1000.0).status_code == 200


def leased(device: str, fps: float = 10.0, **kw: Any) -> dict[str, Any]:
    body = {"model": "cam", "device_tier": "phone", "bandwidth_mbps": 10.0, "rtt_ms": 5.0, "mode": "latency"}
    return {**body, "device_id": device, "frame_rate": fps, **kw}


def workers(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {w["url"]: w for w in c.get("/workers").json()["workers"]}


def test_a_lease_reserves_its_edge_cost_and_the_plan_prices_the_v2_overheads(planner_prefix: str) -> None:
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c)
        r = c.post("/plan", json=leased("cam-1"))
        assert r.status_code == 200, r.text
        plan = r.json()
        # Edge-Only with the profiles' overheads: device 1 ms (request), uplink 1000 B at 10 Mbit/s
        # = 0.8 ms, rtt 5, edge 2 + 2 + 4 = 8 ms: 14.8 ms; Device-Only 120 ms
        g = {**chain_graph(), "overheads": {"device_request_ms": 1.0, "edge_request_ms": 4.0}}
        cond = oracle.Cond(10.0, 5.0, 0.0, 0.0)
        assert plan["device_nodes"] == [] and oracle.check_consistent(g, plan, cond).latency_ms == pytest.approx(14.8)
        lease = plan["lease"]
        assert lease["worker"] == plan["edge_worker"] == "http://w1:1"
        assert lease["edge_ms_per_frame"] == pytest.approx(8.0) and lease["frames_per_s"] == 10.0
        assert lease["expires_in_s"] > 0 and lease["replan_after_s"] > 0 and lease["assigned"] is False
        w = workers(c)["http://w1:1"]
        assert w["leased_ms_per_s"] == pytest.approx(80.0) and w["leases"] == 1
        state = c.get("/devices/cam-1").json()
        assert state["lease"]["worker"] == "http://w1:1" and state["plan"]["plan_id"] == plan["plan_id"]
        assert_valid("plan", plan)  # the published schemas describe the real answers
        assert_valid("lease#/$defs/device", state)
        # a second device is priced at the load of the first: edge 8 / (1 - 0.08)
        other = c.post("/plan", json=leased("cam-2")).json()
        assert other["predicted"]["edge_ms"] == pytest.approx(8.0 / (1 - 80.0 / 1000.0))
        assert c.delete("/devices/cam-1").status_code == 204
        assert c.delete("/devices/cam-1").status_code == 404
        assert c.get("/devices/cam-1").status_code == 404
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(80.0)  # cam-2's


def test_admission_pushes_devices_onto_their_own_cpu_when_the_worker_is_full(planner_prefix: str) -> None:
    # capacity 100 ms/s, ρ 0.9: room for one device at 80 ms/s (Edge-Only: 8 ms x 10 frames/s)
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, capacity=100.0)
        first = c.post("/plan", json=leased("d1")).json()
        second = c.post("/plan", json=leased("d2")).json()
        assert first["lease"]["worker"] == "http://w1:1"
        # the mid cut (a on the device) books 6 ms x 10 = 60 > 90 - 80 too: Device-Only
        assert second["lease"]["worker"] is None and second["device_nodes"] == ["a", "b"]
        assert second["edge_worker"] == "http://w1:1"  # the worker to probe, reserving nothing
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(80.0)
        # a request without device_id reserves nothing: the edge is open to it while the leases
        # stay within ρ_max·C_w (80 <= 90), whatever frame rate it asks for (a requirement only)
        unleased = {k: v for k, v in leased("d3").items() if k != "device_id"}
        for fps in (10.0, 1000.0, None):
            assert c.post("/plan", json={**unleased, "frame_rate": fps}).json()["device_nodes"] == []
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(80.0)
        # the first device leaving frees the room
        assert c.delete("/devices/d1").status_code == 204
        assert c.post("/plan", json=leased("d2")).json()["lease"]["worker"] == "http://w1:1"


def test_leases_are_shared_by_replicas_and_survive_a_restart(planner_prefix: str) -> None:
    kw = {"rebalance_s": 0, "worker_ttl_s": 120.0}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a)
        assert a.post("/plan", json=leased("cam-1")).json()["lease"]["worker"] == "http://w1:1"
        assert b.get("/devices/cam-1").json()["lease"]["edge_ms_per_frame"] == pytest.approx(8.0)
        assert workers(b)["http://w1:1"]["leases"] == 1
        # b prices its own devices at a's lease
        plan = b.post("/plan", json=leased("cam-2")).json()
        assert plan["predicted"]["edge_ms"] == pytest.approx(8.0 / (1 - 0.08))
    with planner(planner_prefix, **kw) as again:
        assert again.get("/devices/cam-1").status_code == 200
        assert workers(again)["http://w1:1"]["leases"] == 2


def _counted(c: httpx.Client, metric: str, result: str) -> float:
    """The planner's `dapdee_planner_{metric}_total{result=...}` now (0 when absent)."""
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(f'dapdee_planner_{metric}_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def _admissions(c: httpx.Client, result: str) -> float:
    return _counted(c, "admissions", result)


def _rebalances(c: httpx.Client, result: str) -> float:
    return _counted(c, "rebalances", result)


def test_a_leased_plan_is_one_reservation_while_the_view_holds(planner_prefix: str) -> None:
    """A replica plans against its own view of the leases and reserves with that view verified in
    the same step: while nobody else changed the leases there is no second round trip (no
    "stale" admission); a lease another replica made is noticed, adopted and priced."""
    kw = {"rebalance_s": 0, "refresh_s": 60.0, "worker_ttl_s": 120.0}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a)
        assert beat(b, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        for _ in range(3):
            for d in ("d1", "d2"):
                assert a.post("/plan", json=leased(d)).json()["lease"]["worker"] == "http://w1:1"
        assert _admissions(a, "stale") == 0 and _admissions(a, "reserved") == 6
        # b has not seen a's leases: its first reservation finds its view stale and plans again
        plan = b.post("/plan", json=leased("d3")).json()
        assert plan["predicted"]["edge_ms"] == pytest.approx(8.0 / (1 - 160.0 / 1000.0))
        assert _admissions(b, "stale") == 1
        b.post("/plan", json=leased("d3"))  # the adopted view holds now
        assert _admissions(b, "stale") == 1 and _admissions(b, "reserved") == 2
        # and a, whose view lacks d3, notices it once
        assert a.post("/plan", json=leased("d1")).json()["predicted"]["edge_ms"] == pytest.approx(
            8.0 / (1 - 160.0 / 1000.0)
        )
        assert _admissions(a, "stale") == 1


def test_after_a_rebalance_each_device_gets_its_assigned_plan_in_one_reservation(planner_prefix: str) -> None:
    """A rebalance rewrites the lease records it solves; the replica that applied it keeps them in
    its view, so each device's next request gets its assigned plan in one round trip (no "stale"
    admission). Another replica learns them from Redis (one "stale" each), as it learns any
    write it did not make."""
    kw = {"rebalance_s": 0, "refresh_s": 60.0, "worker_ttl_s": 120.0}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a, capacity=50.0)
        assert beat(b, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=50.0).status_code == 200
        idle = leased("idle", fps=5.0, latency_budget_ms=200.0)
        busy = leased("busy", fps=5.0, latency_budget_ms=200.0, device_load=0.8)
        for body in (idle, busy, idle, busy):
            a.post("/plan", json=body)
        assert _admissions(a, "stale") == 0
        (report,) = a.post("/fleet/rebalance").json()["workers"]
        assert report["applied"] and (report["before"]["devices_met"], report["after"]["devices_met"]) == (1, 2)
        for body, worker in ((busy, "http://w1:1"), (idle, None)):
            got = a.post("/plan", json=body).json()
            assert got["lease"]["assigned"] and got["lease"]["worker"] == worker and got["constraints_met"]
        assert _admissions(a, "stale") == 0
        for body in (busy, idle):
            assert b.post("/plan", json=body).json()["lease"]["assigned"]
        assert _admissions(b, "stale") == 2


def test_fifty_devices_leasing_at_once_through_two_replicas_never_overbook(planner_prefix: str) -> None:
    def settings() -> Settings:
        return Settings(
            key_prefix=planner_prefix,
            redis_url=SHARED_REDIS,
            api_token=TOKEN,
            worker_url_pattern=ANY_WORKER_URL,
            rebalance_s=0,
        )

    with serve_app_in_thread(create_app(settings())) as u1, serve_app_in_thread(create_app(settings())) as u2:
        with httpx.Client(base_url=u1, headers=AUTH, timeout=30) as c:
            setup_model(c, capacity=500.0)  # room for 450 ms/s: 5 devices at 80 ms/s (8 ms x 10)

        async def lease(client: httpx.AsyncClient, i: int) -> httpx.Response:
            """As a device does: an answer with Retry-After (a replica that has not cached the
            model while Redis is slow to answer) is retried after it."""
            for _ in range(3):
                r = await client.post(f"{(u1, u2)[i % 2]}/plan", json=leased(f"d{i}"))
                if "Retry-After" not in r.headers:
                    break
                await asyncio.sleep(float(r.headers["Retry-After"]))
            return r

        async def lease_all() -> list[dict[str, Any]]:
            async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
                rs = await asyncio.gather(*(lease(client, i) for i in range(50)))
            assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200][:2]
            return [r.json() for r in rs]

        plans = asyncio.run(lease_all())
        with httpx.Client(base_url=u2, headers=AUTH, timeout=30) as c:
            booked = workers(c)["http://w1:1"]
    on_edge = [p for p in plans if p["lease"]["worker"] == "http://w1:1"]
    reserved = sum(p["lease"]["frames_per_s"] * p["lease"]["edge_ms_per_frame"] for p in on_edge)
    assert reserved <= RHO * 500.0 + 1e-9
    assert booked["leases"] == len(on_edge) and booked["leased_ms_per_s"] == pytest.approx(reserved)
    assert len(on_edge) >= 5  # the room was used (mid cuts may fit a few more)


def test_a_rebalance_gives_the_edge_to_the_device_that_needs_it_and_devices_get_their_plan_back(
    planner_prefix: str,
) -> None:
    """Both want 5 frames/s within 200 ms. Room for one Edge-Only device (40 of 45 ms/s: 8 ms x 5).
    The idle device asks first and gets the edge, though Device-Only (120 ms, 120 ms a frame <=
    200) meets its requirements; the busy device (load 0.8: 600 ms on its own CPU, its mid cut
    316 ms) then misses. The rebalance swaps them: both are served."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, capacity=50.0)
        idle = leased("idle", fps=5.0, latency_budget_ms=200.0)
        busy = leased("busy", fps=5.0, latency_budget_ms=200.0, device_load=0.8)
        assert c.post("/plan", json=idle).json()["lease"]["worker"] == "http://w1:1"
        before = c.post("/plan", json=busy).json()
        assert before["lease"]["worker"] is None and before["constraints_met"] is False
        r = c.post("/fleet/rebalance")
        assert r.status_code == 200, r.text
        assert_valid("lease#/$defs/rebalance", r.json())
        assert r.json()["approximate"] is False
        (report,) = r.json()["workers"]
        assert report["applied"] and report["exact"]
        assert report["time_load"] == pytest.approx(RHO)  # 40 ms/s: above the next share down, 0.7875 of 50
        busy_new = next(d["new"] for d in report["devices"] if d["device_id"] == "busy")
        # Edge-Only timed at time_load: request 1 ms on a CPU 0.8 busy, uplink 0.8, rtt 5, edge 8 ms
        assert busy_new["objective_ms"] == pytest.approx(1 / 0.2 + 0.8 + 5 + 8 / (1 - RHO))
        assert (report["before"]["devices_met"], report["after"]["devices_met"]) == (1, 2)
        assert report["after"]["leased_ms_per_s"] <= RHO * 50.0
        state = c.get("/devices/busy").json()
        assert state["lease"]["assigned"] and state["lease"]["worker"] == "http://w1:1"
        # the devices pick up their assigned plans at their next request
        got = c.post("/plan", json=busy).json()
        assert got["lease"]["assigned"] and got["lease"]["worker"] == "http://w1:1" and got["constraints_met"]
        assert got["predicted"]["latency_ms"] == pytest.approx(1 / 0.2 + 0.8 + 5 + 8)  # ℓe 0: idle books nothing
        # an explicit edge_load prices the assigned plan, as it prices an exact one: 8 / (1 - 0.5)
        got = c.post("/plan", json={**busy, "edge_load": 0.5}).json()
        assert got["lease"]["assigned"] and got["predicted"]["latency_ms"] == pytest.approx(1 / 0.2 + 0.8 + 5 + 16)
        got = c.post("/plan", json=idle).json()
        assert got["lease"]["assigned"] and got["lease"]["worker"] is None and got["device_nodes"] == ["a", "b"]
        # conditions that drifted get a fresh plan instead
        moved = c.post("/plan", json={**idle, "bandwidth_mbps": 20.0}).json()
        assert moved["lease"]["assigned"] is False


def test_a_second_rebalance_with_nothing_changed_moves_no_device(planner_prefix: str) -> None:
    """Twenty-four cameras of one kind (round trips a little apart) want 10 frames/s within 150 ms.
    An early exit (accuracy 0.9261, 60 ms) meets on the device; the final exit (0.9324) takes 120
    ms a frame there, over the 100 ms of 10 frames/s, so it meets only with its second half on the
    edge, 60 ms/s a device: the worker (450 of 500 ms/s) takes seven. The
    rebalance picks seven; re-solved with nothing changed, it keeps them all where they are."""
    with planner(planner_prefix, rebalance_s=0) as c:
        graph = chain_graph()
        graph["exits"] = [
            {"name": "early", "node": "a", "accuracy": 0.9261},
            {"name": "final", "node": "b", "accuracy": 0.9324},
        ]
        setup_model(c, capacity=500.0, graph=graph)
        for i in range(24):
            body = leased(f"cam-{i:02d}", rtt_ms=5.0 + 0.37 * i, latency_budget_ms=150.0)
            assert c.post("/plan", json=body).status_code == 200
        first = c.post("/fleet/rebalance").json()["workers"][0]
        assert first["applied"] and sum(d["new"]["edge_ms_per_frame"] > 0 for d in first["devices"]) == 7
        second = c.post("/fleet/rebalance").json()["workers"][0]
        moved = [d["device_id"] for d in second["devices"] if d["old"] != d["new"]]
        assert second["applied"] and not moved, moved
        assert second["after"]["accuracy_frames_per_s"] == first["after"]["accuracy_frames_per_s"]


def test_a_move_of_exactly_the_drift_threshold_is_within_it_either_way() -> None:
    """Load 0.8 moving to 0.7 or 0.9 is a move of threshold/2 = 0.1 both ways (the first is
    0.10000000000000009 in floats): neither drifts; 0.69 does. Bandwidth and round trip alike."""
    base = {"bandwidth_mbps": 10.0, "rtt_ms": 20.0, "device_load": 0.8}
    for key, ok, past in (
        ("device_load", (0.7, 0.9), 0.69),
        ("bandwidth_mbps", (8.0, 12.0), 12.1),
        ("rtt_ms", (16.0, 24.0), 24.1),
    ):
        assert not any(drifted(base, {**base, key: v}, 0.2) for v in ok), key
        assert drifted(base, {**base, key: past}, 0.2), key


def test_a_lease_keeps_the_conditions_it_was_planned_at_until_they_drift(planner_prefix: str) -> None:
    """Estimates that move less than the drift threshold (20 %) are noise: the assigned plan comes
    back, and the lease record keeps the conditions that plan was made for, so drift is measured
    from them. Two steps of +15 % (32 % in all) drift, though neither step does alone."""
    with planner(planner_prefix, rebalance_s=0, lease_drift=0.2) as c:
        setup_model(c)
        body = leased("a", bandwidth_mbps=10.0)
        assert c.post("/plan", json=body).status_code == 200
        assert c.post("/fleet/rebalance").status_code == 200
        step = c.post("/plan", json={**body, "bandwidth_mbps": 11.5}).json()
        assert step["lease"]["assigned"] is True
        again = c.post("/plan", json={**body, "bandwidth_mbps": 13.225}).json()
        assert again["lease"]["assigned"] is False


def test_a_device_asking_through_two_replicas_is_planned_from_the_record_redis_holds(planner_prefix: str) -> None:
    """Replicas take turns answering a device. Each plans it from the lease record Redis holds,
    not from its own older copy: the recorded conditions stay anchored while within the drift
    threshold (20 %), whichever replica answers, and a creep past it is caught. A replica seeing
    another's record says so once ("stale") and then plans in one round trip."""
    kw = {"rebalance_s": 0, "refresh_s": 60.0, "worker_ttl_s": 120.0, "lease_drift": 0.2}
    r = redis.Redis.from_url(SHARED_REDIS)

    def recorded() -> float:
        return json.loads(r.get(f"{planner_prefix}:v1:lease:cam-1"))["request"]["bandwidth_mbps"]

    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a)
        assert beat(b, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        steps = [(a, 10.0, 10.0), (a, 11.0, 10.0), (b, 11.0, 10.0), (a, 11.5, 10.0), (b, 12.5, 12.5), (a, 14.0, 12.5)]
        for replica, reported, kept in steps:
            assert replica.post("/plan", json=leased("cam-1", bandwidth_mbps=reported)).status_code == 200
            assert recorded() == kept, (reported, kept)
        stale = _admissions(a, "stale") + _admissions(b, "stale")
        assert b.post("/plan", json=leased("cam-1", bandwidth_mbps=13.0)).status_code == 200
        assert b.post("/plan", json=leased("cam-1", bandwidth_mbps=13.0)).status_code == 200
        assert _admissions(a, "stale") + _admissions(b, "stale") == stale + 1
    r.close()


def test_a_rebalance_values_an_auto_device_in_the_mode_of_the_workers_load(planner_prefix: str) -> None:
    """Alone on the worker at 20 frames/s, the device's auto plan is Edge-Only in latency mode
    (edge stage 8 ms). The worker's booking before the rebalance is the device's own 160 ms/s of
    1000: at ℓe = 0.16 Edge-Only's edge stage (9.5 ms) sustains 50 ms a frame, so the rebalance
    values the device, and hands it its plan, in latency mode (at ℓe = ρ_max = 0.9 it would be
    80 ms, throughput mode). No option meets 20 frames/s at ρ_max, so the time decides: Edge-Only,
    timed at the smallest share of the worker it fits in (0.225 of it: 1 + 0.8 + 5 + 8 / 0.775 ms),
    and handed out at the load the others book (none): 14.8 ms."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c)
        first = c.post("/plan", json=leased("auto", fps=20.0, mode="auto")).json()
        assert first["mode"] == "latency" and first["device_nodes"] == []
        r = c.post("/fleet/rebalance")
        assert r.status_code == 200, r.text
        (device,) = r.json()["workers"][0]["devices"]
        assert device["new"]["met"] is False and device["new"]["objective_ms"] == pytest.approx(6.8 + 8 / 0.775)
        assert r.json()["workers"][0]["time_load"] == pytest.approx(0.225)
        state = c.get("/devices/auto").json()
        assert state["lease"]["assigned"] and state["plan"]["mode"] == "latency"
        assert state["plan"]["device_nodes"] == [] and state["plan"]["predicted"]["latency_ms"] == pytest.approx(14.8)


def test_a_rebalance_keeps_a_lone_device_on_the_plan_that_is_fastest_on_an_idle_worker(planner_prefix: str) -> None:
    """A fast device (20 + 20 ms a frame) alone on the worker at 10 frames/s: Edge-Only takes
    1 + 0.8 + 5 + 8 = 14.8 ms, its own CPU 1 + 40 = 41 ms; both meet the frame rate even at
    ℓe = ρ_max (edge stage 80 ms <= 100). The rebalance times Edge-Only at the smallest share of
    the worker it fits in (its 80 ms/s within 0.1125 of 1000: 6.8 + 8 / 0.8875 = 15.8 ms) and
    keeps it; timed at ρ_max (86.8 ms) it would have moved the device to its own CPU, 2.8 times
    slower, to keep a worker nobody else uses free."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c)
        fast = {"kind": "device", "timings_ms": {"a": 20.0, "b": 20.0}, "meta": {"device_request_ms": 1.0}}
        assert c.put("/models/cam/profiles/phone", json=fast).status_code == 200
        body = leased("fast", fps=10.0)
        assert c.post("/plan", json=body).json()["device_nodes"] == []
        r = c.post("/fleet/rebalance")
        assert r.status_code == 200, r.text
        (device,) = r.json()["workers"][0]["devices"]
        assert device["old"] == device["new"] and device["new"]["device_nodes"] == 0
        assert device["new"]["met"] and device["new"]["objective_ms"] == pytest.approx(6.8 + 8 / 0.8875)
        assert r.json()["workers"][0]["time_load"] == pytest.approx(0.1125)
        got = c.post("/plan", json=body).json()
        assert got["lease"]["assigned"] and got["device_nodes"] == [] and got["lease"]["worker"] == "http://w1:1"
        assert got["predicted"]["latency_ms"] == pytest.approx(14.8)


def test_the_fleet_refuses_bad_input_and_changes_nothing(planner_prefix: str) -> None:
    with planner(planner_prefix, rebalance_s=0, max_leases=2) as c:
        setup_model(c)
        r = c.post("/plan", json={k: v for k, v in leased("d0").items() if k != "frame_rate"})
        assert r.status_code == 422 and "frame_rate" in r.text
        r = c.post("/plan", json={**leased("d0"), "model": "nope"})
        assert r.status_code == 404 and "nope" in r.json()["detail"]
        for bad in (float("inf"), -1.0, 0.0):
            body = {"url": "http://w1:1", "models": ["cam"], "tier": "t", "load": 0.0, "capacity_ms_per_s": bad}
            r = c.post("/workers/heartbeat", content=_raw(body), headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and "capacity_ms_per_s" in r.text
        assert workers(c)["http://w1:1"]["capacity_ms_per_s"] == 1000.0
        assert c.post("/plan", json=leased("d1")).status_code == 200
        assert c.post("/plan", json=leased("d2")).status_code == 200
        r = c.post("/plan", json=leased("d3"))
        assert r.status_code == 409 and "lease" in r.json()["detail"]
        assert c.get("/devices/d3").status_code == 404 and workers(c)["http://w1:1"]["leases"] == 2
        # counted as the refusal it is (an alert names it), not as an internal error
        metrics = c.get("/metrics").text
        assert 'dapdee_planner_plans_total{mode="latency",outcome="lease_cap"} 1.0' in metrics
        assert not re.search(r'plans_total\{[^}]*outcome="error"\} [1-9]', metrics)
        assert c.post("/plan", json=leased("d1")).status_code == 200  # a known device may renew
        r = c.post("/plan", json={**leased("d1"), "device_id": "bad id!"})
        assert r.status_code == 422 and "device_id" in r.text
        r = c.post("/plan", json={**leased("d1"), "baseline": "dads"})
        assert r.status_code == 422
    with planner(planner_prefix, rebalance_s=0, api_token=None, device_token="dev-token-0123456789") as c:
        r = c.post("/fleet/rebalance", headers={"Authorization": "Bearer dev-token-0123456789"})
        assert r.status_code == 403


def test_what_the_others_reserve_never_reads_below_zero(planner_prefix: str) -> None:
    """Two devices reserve 80.8 and 26.4 ms/s (10.1 and 3.3 frames/s at 8 ms a frame); when the
    second leaves, 80.8 + 26.4 - 26.4 is not 80.8 in floating point, and the replica's view
    (not refreshed here) must not hand the first a negative edge load: every plan answers 200,
    leased or not, and the worker shows exactly nothing booked once both left."""
    with planner(planner_prefix, rebalance_s=0, refresh_s=60) as c:
        setup_model(c)
        assert c.post("/plan", json=leased("A", fps=10.1)).status_code == 200
        assert c.post("/plan", json=leased("B", fps=3.3)).status_code == 200
        assert c.delete("/devices/B").status_code == 204
        r = c.post("/plan", json=leased("A", fps=10.1))
        assert r.status_code == 200, r.text
        assert c.delete("/devices/A").status_code == 204
        r = c.post("/plan", json={k: v for k, v in leased("X").items() if k != "device_id"})
        assert r.status_code == 200, r.text
        w = workers(c)["http://w1:1"]
        assert (w["leases"], w["leased_ms_per_s"]) == (0, 0.0)


def _raw(body: dict[str, Any]) -> bytes:
    """JSON with non-finite numbers as Python writes them (Infinity), which strict JSON refuses."""
    return json.dumps(body).encode()


def test_a_model_no_worker_serves_gets_a_lease_on_no_worker(planner_prefix: str) -> None:
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, workers=())
        plan = c.post("/plan", json=leased("solo")).json()
        assert plan["edge_worker"] is None and plan["lease"]["worker"] is None
        assert c.get("/devices/solo").json()["lease"]["edge_ms_per_frame"] == 0.0


def test_an_edge_plan_leased_on_no_worker_is_admitted_and_booked_once_a_worker_serves_the_model(
    planner_prefix: str,
) -> None:
    """A device leased while no worker serves the model gets Edge-Only on the graph's own edge
    timings, booked nowhere. Once a worker (100 ms/s, room for 90) serves it, the same request
    (the held plan would be within the switching margin) gets a plan admitted and booked there:
    Edge-Only, 8 ms x 10 frames/s = 80 ms/s on the worker. A second device then fits in what is
    left; the held plan used to come back unbooked, naming the worker, so both sent 80 ms/s to it."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, workers=())
        early = c.post("/plan", json=leased("early")).json()
        assert early["edge_nodes"] == ["a", "b"] and early["lease"]["worker"] is None
        assert beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=100.0).status_code == 200
        again = c.post("/plan", json=leased("early")).json()
        assert again["edge_nodes"] == ["a", "b"] and again["lease"]["worker"] == again["edge_worker"] == "http://w1:1"
        assert again["lease"]["edge_ms_per_frame"] == pytest.approx(8.0)
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(80.0)
        late = c.post("/plan", json=leased("late")).json()
        assert late["lease"]["worker"] is None or late["lease"]["edge_ms_per_frame"] * 10.0 <= 10.0 + 1e-9
        for plan in (again, late):  # every plan that sends work to the worker books it
            assert not plan["edge_nodes"] or plan["lease"]["worker"] == "http://w1:1"
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] <= 90.0 + 1e-9


def test_a_device_only_plan_handed_back_names_a_live_worker(planner_prefix: str) -> None:
    """A Device-Only plan assigned by a rebalance is handed back while the device's conditions
    hold; it names the worker the device probes its link to. When that worker expires (only the
    other keeps beating), the plan handed back names the live one, not the expired one."""
    with planner(planner_prefix, rebalance_s=0, worker_ttl_s=1.0, refresh_s=0.2) as c:
        setup_model(c, workers=("http://w1:1", "http://w2:1"))
        slow = leased("d", bandwidth_mbps=0.001)  # an uplink too slow for any edge plan
        assert c.post("/plan", json=slow).json()["edge_nodes"] == []
        assert c.post("/fleet/rebalance").status_code == 200
        held = c.post("/plan", json=slow).json()
        assert held["edge_nodes"] == [] and held["lease"]["assigned"] is True
        named = held["edge_worker"]
        alive = "http://w1:1" if named == "http://w2:1" else "http://w2:1"

        def only_alive_listed() -> bool:
            assert beat(c, alive, ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
            return list(workers(c)) == [alive]

        assert wait_for(only_alive_listed, timeout=10.0, step=0.2)
        time.sleep(0.5)  # the planner's view of the live workers refreshes every 0.2 s
        again = c.post("/plan", json=slow).json()
        assert again["edge_nodes"] == [] and again["lease"]["assigned"] is True
        assert again["edge_worker"] == alive


def test_get_workers_lists_the_least_loaded_first_as_plans_rank_them(planner_prefix: str) -> None:
    """w2 reports the lower heartbeat load, but a device's lease books 100 ms/s of it: plans
    rank workers by the edge load the leases put on them first, and GET /workers lists them
    in that order, so its first worker is the one a Device-Only plan names."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, workers=())
        assert beat(c, "http://w1:1", ["cam"], "t", 0.3, capacity_ms_per_s=1000.0).status_code == 200
        assert beat(c, "http://w2:1", ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        assert c.post("/plan", json=leased("big", fps=12.5)).json()["lease"]["worker"] == "http://w2:1"
        listed = workers(c)
        assert listed["http://w2:1"]["leased_ms_per_s"] == pytest.approx(100.0)
        assert list(listed) == ["http://w1:1", "http://w2:1"]
        slow = c.post("/plan", json=leased("d", bandwidth_mbps=0.001)).json()
        assert slow["edge_nodes"] == [] and slow["edge_worker"] == "http://w1:1"


def test_deleting_a_model_ends_its_leases_and_frees_what_they_booked(planner_prefix: str) -> None:
    """Two devices of "cam2" and one of "cam" lease the worker; DELETE /models/cam2 ends the two
    leases at once (GET /devices 404, the worker's booking down to the "cam" device's 80 ms/s)
    and leaves the other; the deleted model's devices then get 404 from POST /plan."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_two_models(c)
        for device, model in (("x0", "cam2"), ("x1", "cam2"), ("d0", "cam")):
            assert c.post("/plan", json=leased(device, model=model)).json()["lease"]["worker"] == "http://w1:1"
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(240.0)
        assert c.delete("/models/cam2").status_code == 204
        assert [c.get(f"/devices/{d}").status_code for d in ("x0", "x1", "d0")] == [404, 404, 200]
        w = workers(c)["http://w1:1"]
        assert w["leases"] == 1 and w["leased_ms_per_s"] == pytest.approx(80.0)
        assert c.post("/plan", json=leased("x0", model="cam2")).status_code == 404
        assert "dapdee_planner_leases 1.0" in c.get("/metrics").text


def test_a_replica_that_still_caches_a_deleted_model_admits_no_lease_of_it(planner_prefix: str) -> None:
    """b deletes the model while a still caches it (a's next refresh is an hour away), as when a
    plan request is under way while the delete lands: a still plans, but its reservation finds
    the model gone from the registry and writes nothing, so no lease outlives the delete (its
    device gets 404), and a lease of a model that exists is still admitted after it."""
    kw = {"rebalance_s": 0, "refresh_s": 3600.0}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_two_models(a)
        assert a.post("/plan", json=leased("d0", model="cam2")).status_code == 200  # a caches cam2
        assert b.delete("/models/cam2").status_code == 204
        r = a.post("/plan", json=leased("d1", model="cam2"))
        # Retry-After: after a Redis that lost its state the replica writes the model back
        assert r.status_code == 404 and "cam2" in r.json()["detail"] and r.headers["retry-after"] == "1", r.text
        assert b.get("/devices/d1").status_code == 404 and b.get("/devices/d0").status_code == 404
        assert workers(b)["http://w1:1"]["leased_ms_per_s"] == 0.0
        assert a.post("/plan", json=leased("d2")).json()["lease"]["worker"] == "http://w1:1"


def test_leases_expire(planner_prefix: str) -> None:
    with planner(planner_prefix, rebalance_s=0, lease_ttl_s=2.0, replan_after_s=1.0) as c:
        setup_model(c)
        assert c.post("/plan", json=leased("short")).json()["lease"]["worker"] == "http://w1:1"
        time.sleep(1.2)  # less than 1 s left: GET /devices says to re-plan by the expiry, not later
        lease = c.get("/devices/short").json()["lease"]
        assert lease["replan_after_s"] <= lease["expires_in_s"] < 1.0, lease
        assert wait_for(lambda: c.get("/devices/short").status_code == 404, timeout=10)
        assert workers(c)["http://w1:1"]["leases"] == 0


def test_the_periodic_rebalance_runs_on_its_own_and_the_metrics_show_the_fleet(planner_prefix: str) -> None:
    with planner(planner_prefix, rebalance_s=0.5, refresh_s=0.2) as c:
        setup_model(c, capacity=50.0)
        assert c.post("/plan", json=leased("idle", fps=5.0, latency_budget_ms=200.0)).status_code == 200
        busy = leased("busy", fps=5.0, latency_budget_ms=200.0, device_load=0.8)
        assert c.post("/plan", json=busy).json()["lease"]["worker"] is None
        assert wait_for(lambda: c.get("/devices/busy").json()["lease"]["worker"] == "http://w1:1", timeout=15)
        m = c.get("/metrics").text
        assert 'dapdee_planner_worker_leased_ms_per_second{worker="http://w1:1"} 40.0' in m
        assert "dapdee_planner_leases 2.0" in m and "dapdee_planner_redis_up 1.0" in m
        assert 'dapdee_planner_rebalances_total{result="applied"}' in m
        assert 'dapdee_planner_admissions_total{result="reserved"} 1.0' in m


def test_the_sdk_reads_and_ends_leases_and_rebalances(planner_prefix: str) -> None:
    from dapdee.client import ApiError, PlannerClient

    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c)
        with PlannerClient(str(c.base_url), TOKEN) as sdk:
            plan = sdk.plan(leased("cam-sdk"))
            assert plan.lease is not None and plan.lease.worker == "http://w1:1"
            state = sdk.device("cam-sdk")
            assert state.lease.edge_ms_per_frame == pytest.approx(8.0) and state.plan.plan_id == plan.plan_id
            report = sdk.rebalance()
            assert report.workers and report.workers[0].worker == "http://w1:1"
            sdk.release("cam-sdk")
            with pytest.raises(ApiError) as err:
                sdk.device("cam-sdk")
            assert err.value.status == 404


def test_a_device_keeps_its_plan_while_the_best_is_within_the_switching_margin(planner_prefix: str) -> None:
    """One device alone on the worker, 10 frames/s, rtt 5 ms. At 0.13 Mbit/s Edge-Only takes
    1 + 8/0.13 + 5 + 8 = 75.5 ms and the cut after `a` 60 + 1 + 0.8/0.13 + 5 + 6 = 78.2 ms; at
    0.12 Mbit/s they take 80.7 and 78.7 ms: the cut is 2.5 % faster, within the 5 % margin, so
    the device keeps Edge-Only (a planner without a margin moves it); at 0.08 Mbit/s the cut
    (82 ms against 114) is far better and the device moves."""
    for margin, moves_at_012 in ((0.05, False), (0.0, True)):
        with planner(planner_prefix, rebalance_s=0, switch_margin=margin) as c:
            setup_model(c)
            first = c.post("/plan", json=leased("s", bandwidth_mbps=0.13)).json()
            assert first["device_nodes"] == []
            near = c.post("/plan", json=leased("s", bandwidth_mbps=0.12)).json()
            assert near["lease"]["assigned"] is False
            assert near["device_nodes"] == (["a"] if moves_at_012 else [])
            cut, whole = 60 + 1 + 0.8 / 0.12 + 5 + 6, 1 + 8 / 0.12 + 5 + 8
            assert near["predicted"]["latency_ms"] == pytest.approx(cut if moves_at_012 else whole)
            far = c.post("/plan", json=leased("s", bandwidth_mbps=0.08)).json()
            assert far["device_nodes"] == ["a"]
            assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(60.0)  # the cut's 6 ms x 10
            assert c.delete("/devices/s").status_code == 204


def test_the_switching_margin_keeps_no_plan_that_no_longer_sustains_an_auto_requests_rate(
    planner_prefix: str,
) -> None:
    """Auto mode, 49 frames/s. A graph x (25 kB) -> a (10 MB out) -> b, device 10 ms a node,
    edge 0.1. At 20 Mbit/s Edge-Only (latency 10.2 ms, 100 frames/s) is the latency plan. At
    9.75 Mbit/s it takes 20.7 ms, 48.75 frames/s: below the rate, while Device-Only (20 ms,
    50 frames/s) sustains it, so auto's latency plan is Device-Only, as a new device gets. The
    held Edge-Only is within 5 % of it in latency but does not sustain the rate: the device
    moves. Before, the margin kept it, answered as latency mode, its requirements "met"."""
    graph = {"model": "marg", "input": {"name": "x", "shape": [1, 3, 32, 32], "dtype": "float32", "bytes": 25000},
             "nodes": [{"name": "a", "op": "conv2d", "inputs": ["x"], "out_bytes": 10**7, "flops": 1,
                        "device_ms": 10.0, "edge_ms": 0.1},
                       {"name": "b", "op": "conv2d", "inputs": ["a"], "out_bytes": 40, "flops": 1,
                        "device_ms": 10.0, "edge_ms": 0.1}],
             "exits": [{"name": "final", "node": "b", "accuracy": 0.9}]}  # fmt: skip
    with planner(planner_prefix, rebalance_s=0, switch_margin=0.05) as c:
        assert c.put("/models/marg", json=graph).status_code == 201
        assert beat(c, "http://w1:1", ["marg"], "t", 0.0, capacity_ms_per_s=5000.0).status_code == 200

        def ask(device: str, mbps: float) -> dict[str, Any]:
            body = {"model": "marg", "bandwidth_mbps": mbps, "frame_rate": 49.0, "mode": "auto", "device_id": device}
            return c.post("/plan", json=body).json()

        assert ask("cam-m", 20.0)["device_nodes"] == []
        held, fresh = ask("cam-m", 9.75), ask("cam-fresh", 9.75)
        assert fresh["device_nodes"] == ["a", "b"] and fresh["mode"] == "latency"
        assert held["device_nodes"] == ["a", "b"], held
        assert held["predicted"]["throughput_fps"] >= 49.0


def test_a_slowdown_limits_admission_while_the_edge_load_is_taken_over_the_nominal_capacity(
    planner_prefix: str,
) -> None:
    """A worker that measured itself twice as slow as profiled: nominal 1000 ms/s, capacity 500.
    Five Edge-Only devices book 5 x 80 = 400 <= 0.9 x 500; a sixth would book 480 (or 460 with
    its mid cut) and runs on its own CPU. Each plan is priced at the others' load over the
    nominal capacity (edge 8 / (1 - others / 1000)), before and after a rebalance, whose time
    load is at most 0.9 x 500 / 1000."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, capacity=500.0)
        r = beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=500.0, nominal_ms_per_s=1000.0)
        assert r.status_code == 200
        w = workers(c)["http://w1:1"]
        assert w["capacity_ms_per_s"] == 500.0 and w["nominal_ms_per_s"] == 1000.0
        for i in range(5):
            plan = c.post("/plan", json=leased(f"d{i}")).json()
            assert plan["lease"]["worker"] == "http://w1:1" and plan["device_nodes"] == []
            assert plan["predicted"]["edge_ms"] == pytest.approx(8.0 / (1 - 80.0 * i / 1000.0))
        plan = c.post("/plan", json=leased("d5")).json()
        assert plan["lease"]["worker"] is None and plan["predicted"]["edge_ms"] == 0.0
        answer = c.post("/fleet/rebalance").json()
        (report,) = answer["workers"]
        assert 0 < report["time_load"] <= RHO * 500.0 / 1000.0 + 1e-9
        assert report["after"]["leased_ms_per_s"] <= RHO * 500.0 + 1e-9
        booked = workers(c)["http://w1:1"]["leased_ms_per_s"]
        for i in range(6):
            state = c.get(f"/devices/d{i}").json()
            if state["lease"]["worker"] is not None and state["plan"]["device_nodes"] == []:
                want = 8.0 / (1 - (booked - 80.0) / 1000.0)
                assert state["plan"]["predicted"]["edge_ms"] == pytest.approx(want), i
        body = {"url": "http://w1:1", "models": ["cam"], "tier": "t", "load": 0.0}
        for bad in ({"capacity_ms_per_s": 600.0, "nominal_ms_per_s": 500.0}, {"nominal_ms_per_s": -1.0}):
            r = c.post("/workers/heartbeat", json={**body, **bad})
            assert r.status_code == 422 and "nominal_ms_per_s" in r.text, r.text
        assert workers(c)["http://w1:1"]["nominal_ms_per_s"] == 1000.0


def test_a_worker_whose_capacity_drops_below_its_leases_is_registered_with_its_leases_resolved(
    planner_prefix: str,
) -> None:
    """Five Edge-Only devices book 5 x 80 = 400 ms/s of a 1000 ms/s worker. Its heartbeat then
    says 300 ms/s (it measured itself slower): the leases book more than ρ_max x 300 = 270, so
    the planner re-solves them for 300 and registers the heartbeat with their new plans in one
    step. When the heartbeat's answer arrives the registry already states 300 ms/s and the leases
    book at most 270 of it, long before the (hour-long) period. Without periodic rebalancing
    the heartbeat is registered as it is and nothing moves."""
    for period, rebalanced in ((3600.0, True), (0.0, False)):
        with planner(planner_prefix, rebalance_s=period) as c:
            setup_model(c)
            for i in range(5):
                assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
            assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(400.0)
            assert beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=300.0).status_code == 200
            w = workers(c)["http://w1:1"]
            assert w["capacity_ms_per_s"] == 300.0
            if rebalanced:
                assert w["leased_ms_per_s"] <= RHO * 300.0 + 1e-9
                states = [c.get(f"/devices/d{i}").json() for i in range(5)]
                assert all(s["lease"]["assigned"] for s in states)
                assert _rebalances(c, "shed") == 1 and _rebalances(c, "forced") == 0
            else:
                time.sleep(1.5)
                assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(400.0)
                assert _rebalances(c, "shed") == 0 and _rebalances(c, "forced") == 0
            for i in range(5):
                assert c.delete(f"/devices/d{i}").status_code == 204


def test_a_capacity_drop_re_solves_the_device_only_leases_with_the_worker_s(planner_prefix: str) -> None:
    """Five devices on the worker and one Device-Only (its uplink too slow for any edge plan).
    The worker's heartbeat at 300 ms/s is re-solved as a rebalance would solve it: with the
    Device-Only lease among the candidates (its lease is then assigned). Solved without it, the
    next rebalance had a larger problem and moved devices again a few seconds after the drop
    (in the fleet benchmark, 21-41 of 64 devices, twice in a row). The rebalance right after
    moves nobody."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_model(c)
        for i in range(5):
            assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
        assert c.post("/plan", json=leased("j", bandwidth_mbps=0.01)).json()["lease"]["worker"] is None
        assert beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=300.0).status_code == 200
        assert _rebalances(c, "shed") == 1 and _rebalances(c, "forced") == 0
        assert c.get("/devices/j").json()["lease"]["assigned"]  # the shed solved it too
        (report,) = c.post("/fleet/rebalance").json()["workers"]
        assert report["applied"] and report["leases"] == 6
        moved = [d["device_id"] for d in report["devices"] if d["old"] != d["new"]]
        assert moved == []


def test_a_heartbeat_whose_leases_cannot_be_resolved_is_still_registered(planner_prefix: str) -> None:
    """Five devices book 400 ms/s of the worker, and their device profile is deleted: the planner
    can no longer price their plans. The worker's heartbeat at 300 ms/s is still answered and
    registered (as it is: counted as forced), and the rebalance after a capacity drop follows."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_model(c)
        for i in range(5):
            assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
        assert c.delete("/models/cam/profiles/phone").status_code == 204
        assert beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=300.0).status_code == 200
        w = workers(c)["http://w1:1"]
        assert w["capacity_ms_per_s"] == 300.0 and w["leased_ms_per_s"] == pytest.approx(400.0)
        assert _rebalances(c, "forced") == 1 and _rebalances(c, "shed") == 0


def test_leases_that_cannot_be_priced_keep_their_booking_and_the_others_fit_around_them(
    planner_prefix: str,
) -> None:
    """Two devices of a second model book 160 ms/s of the worker, five of "cam" 400, and the
    second model's device profile is deleted: the planner can no longer price its two leases. The worker's
    heartbeat at 400 ms/s (ρ_max x 400 = 360) is registered with the five re-solved within the
    200 the two leave, and a rebalance on request fits them there too: applied, with the two
    leases left as they were."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_two_models(c)
        for i in range(2):
            assert c.post("/plan", json=leased(f"x{i}", model="cam2")).json()["lease"]["worker"] == "http://w1:1"
        for i in range(5):
            assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(560.0)
        assert c.delete("/models/cam2/profiles/phone").status_code == 204
        assert beat(c, "http://w1:1", ["cam", "cam2"], "t", 0.0, capacity_ms_per_s=400.0).status_code == 200
        w = workers(c)["http://w1:1"]
        assert w["capacity_ms_per_s"] == 400.0 and w["leased_ms_per_s"] <= RHO * 400.0 + 1e-9
        assert _rebalances(c, "shed") == 1 and _rebalances(c, "forced") == 0
        kept = [c.get(f"/devices/x{i}").json()["lease"] for i in range(2)]
        assert all(k["worker"] == "http://w1:1" and not k["assigned"] for k in kept)
        (report,) = c.post("/fleet/rebalance").json()["workers"]
        assert report["applied"] and report["leases"] == 5
        assert 160.0 < report["after"]["leased_ms_per_s"] <= RHO * 400.0 + 1e-9
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(report["after"]["leased_ms_per_s"])


def test_no_moment_shows_the_leases_past_rho_max_of_the_registered_capacity(planner_prefix: str) -> None:
    """Two replicas on one Redis: devices keep leasing through b while the worker's heartbeats,
    through a, state 1000 and then 300 or 200 ms/s in turn. A watcher reads the worker's
    reservations and its registered capacity in one Redis transaction, as fast as it can: no
    reading shows the reservations past ρ_max of the capacity, and every drop was registered
    with the leases re-solved for it."""
    stop = threading.Event()
    readings: list[tuple[float, float]] = []
    r = redis.Redis.from_url(SHARED_REDIS)
    base = f"{planner_prefix}:v1"

    def watch() -> None:
        while not stop.is_set():
            pipe = r.pipeline(transaction=True)
            pipe.hvals(f"{base}:wload:http://w1:1")
            pipe.hget(f"{base}:workers:info", "http://w1:1")
            loads, info = pipe.execute()
            if info is not None:
                readings.append((sum(float(v) for v in loads), json.loads(info)["capacity_ms_per_s"]))

    kw = {"rebalance_s": 3600.0, "refresh_s": 0.2}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a)
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for k, drop in enumerate((300.0, 200.0, 300.0)):
                assert beat(a, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
                assert workers(b)["http://w1:1"]["capacity_ms_per_s"] == 1000.0  # b synced the registry
                devices = [leased(f"d{k}-{i}", bandwidth_mbps=1.0 + i) for i in range(8)]
                for body in devices:
                    assert b.post("/plan", json=body).status_code == 200
                assert workers(b)["http://w1:1"]["leased_ms_per_s"] > RHO * drop  # the drop overbooks
                assert beat(a, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=drop).status_code == 200
                for body in devices:  # devices plan again against the capacity now
                    assert b.post("/plan", json=body).status_code == 200
        finally:
            stop.set()
            watcher.join()
            r.close()
        sheds = (_rebalances(a, "shed"), _rebalances(a, "forced"))
    assert len(readings) > 100
    over = [(load, cap) for load, cap in readings if load > RHO * cap + 1e-6]
    assert not over, over[:5]
    assert min(cap for _, cap in readings) == 200.0  # the drops were read
    assert sheds == (3, 0)


def test_a_replica_with_an_old_view_of_a_workers_capacity_admits_only_what_it_has_now(planner_prefix: str) -> None:
    """b last saw the worker at 1000 ms/s; the worker's next heartbeat, through a, says 50. b
    plans the device Edge-Only (80 ms/s) from its view; the reservation, checked against the
    registry inside Redis, is refused and states 50 ms/s; b plans again with it: ρ_max x 50 = 45
    holds neither Edge-Only nor the mid cut (60), so the device runs on its own CPU. b keeps the
    50 ms/s for its next plans until it syncs the registry."""
    kw = {"rebalance_s": 0, "refresh_s": 3600.0, "worker_ttl_s": 120.0}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a)
        assert beat(b, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        assert beat(a, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=50.0).status_code == 200
        plan = b.post("/plan", json=leased("d1")).json()
        assert plan["lease"]["worker"] is None and plan["device_nodes"] == ["a", "b"]
        assert _admissions(b, "refused") == 1  # b's view did offer the edge first
        assert workers(a)["http://w1:1"]["leased_ms_per_s"] == 0.0
        # b keeps what the refusal said: the next device is planned at 50 ms/s, no refused try
        assert b.post("/plan", json=leased("d2")).json()["lease"]["worker"] is None
        assert _admissions(b, "refused") == 1
        # within the capacity now, b's edge plans are admitted as before, once b syncs the
        # registry (GET /workers reads it)
        assert beat(a, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=100.0).status_code == 200
        assert workers(b)["http://w1:1"]["capacity_ms_per_s"] == 100.0
        assert b.post("/plan", json=leased("d1")).json()["lease"]["worker"] == "http://w1:1"
        assert workers(a)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(80.0)


def test_a_rebalance_solved_before_the_worker_measured_itself_slower_is_solved_again(planner_prefix: str) -> None:
    """Five Edge-Only devices book 5 x 80 = 400 ms/s of a 1000 ms/s worker, whose heartbeat then
    says 300 ms/s. A rebalance that read the worker before that heartbeat (a solve racing it;
    here its replica's fleet reads an older copy of the registry) solves for 1000 ms/s and keeps
    all five on the edge. Redis refuses that apply (400 > ρ_max x 300 = 270) and states 300; the
    rebalance solves again for 300 and applies the best plans within 270."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c)
        for i in range(5):
            assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
        assert beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=300.0).status_code == 200
        report = asyncio.run(_rebalance_with_an_old_capacity(planner_prefix, 1000.0))
        (w,) = report["workers"]
        assert w["applied"] and w["after"]["leased_ms_per_s"] <= RHO * 300.0 + 1e-9
        # the best within 270: four devices on the edge meet 10 frames/s (three mid cuts at 60 ms/s
        # and one Edge-Only at 80: 260); the fifth alone (120 ms a frame) cannot
        assert w["after"]["devices_met"] == 4
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == pytest.approx(260.0)
        assert workers(c)["http://w1:1"]["leases"] == 4


async def _rebalance_with_an_old_capacity(prefix: str, capacity: float) -> dict[str, Any]:
    """One rebalance by a replica on `prefix` whose fleet sees every worker at `capacity`."""
    settings = Settings(key_prefix=prefix, redis_url=SHARED_REDIS, rebalance_s=0, refresh_s=3600.0)
    store = Store(settings, PlannerMetrics())
    await store.start()
    try:

        async def old_view() -> list[Worker]:
            return [replace(w, capacity_ms_per_s=capacity) for w in await store.registry.live()]

        fleet = Fleet(settings, store.metrics, store.link, store.keys, store.candidates.by_name, old_view)
        return await Rebalancer(fleet, store.keys).rebalance()
    finally:
        await store.close()


def test_a_heartbeat_sent_again_during_its_re_solve_waits_for_it(planner_prefix: str) -> None:
    """Two heartbeats of the worker at 300 ms/s under 400 ms/s of leases reach one replica at once
    (a worker sending again after a timeout). The first re-solves the leases and registers
    itself with them; the second waits for that instead of solving too, and is then recorded
    as it is, fitting. One re-solve, no forced registration, leases within ρ_max x 300, and
    nothing of the re-solve kept afterwards (workers come and go under new URLs)."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_model(c)
        for i in range(5):
            assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
        shared, counts, kept = asyncio.run(_two_heartbeats_at_once(planner_prefix))
        assert shared == [True, True] and kept == 0
        assert counts == {"shed": 1.0, "shed_refused": 0.0, "forced": 0.0}
        w = workers(c)["http://w1:1"]
        assert w["capacity_ms_per_s"] == 300.0 and w["leased_ms_per_s"] <= RHO * 300.0 + 1e-9


async def _two_heartbeats_at_once(prefix: str) -> tuple[list[bool], dict[str, float], int]:
    settings = Settings(key_prefix=prefix, redis_url=SHARED_REDIS, rebalance_s=3600.0, refresh_s=3600.0)
    metrics = PlannerMetrics()
    store = Store(settings, metrics)
    await store.start()
    try:
        w = Worker("http://w1:1", ("cam",), "t", 0.0, 0, 0, capacity_ms_per_s=300.0)
        shared = list(await asyncio.gather(store.heartbeats.record(w), store.heartbeats.record(w)))
        counts = {r: metrics.registry.get_sample_value("dapdee_planner_rebalances_total", {"result": r}) or 0.0
                  for r in ("shed", "shed_refused", "forced")}  # fmt: skip
        return shared, counts, len(store.rebalancer._shedding)
    finally:
        await store.close()


def test_a_capacity_drop_during_another_rebalance_is_resolved_at_once(planner_prefix: str) -> None:
    """The worker's heartbeat says 300 ms/s under 400 ms/s of leases while another rebalance
    holds the lock (here: another replica's, set by hand). Re-solving the worker for the
    heartbeat takes no lock (its apply is checked in Redis), so the heartbeat is registered
    with the leases within ρ_max x 300 at once."""
    with _five_leases_under_another_replicas_lock(planner_prefix) as (c, r, _):
        assert beat(c, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=300.0).status_code == 200
        w = workers(c)["http://w1:1"]
        assert w["capacity_ms_per_s"] == 300.0 and w["leased_ms_per_s"] <= RHO * 300.0 + 1e-9
        assert r.get(f"{planner_prefix}:v1:rebalance-lock") == b"other"


@contextlib.contextmanager
def _five_leases_under_another_replicas_lock(prefix: str) -> Iterator[tuple[httpx.Client, redis.Redis, str]]:
    """A planner on `prefix` (an hour-long rebalance period) whose worker w1 holds five Edge-Only
    leases (400 of 1000 ms/s), with the rebalance lock held by another replica (set by hand):
    the client, a Redis client and the lock's key. The lock is removed afterwards."""
    with planner(prefix, rebalance_s=3600.0) as c:
        setup_model(c)
        for i in range(5):
            assert c.post("/plan", json=leased(f"d{i}")).json()["lease"]["worker"] == "http://w1:1"
        r = redis.Redis.from_url(SHARED_REDIS)
        lock = f"{prefix}:v1:rebalance-lock"
        try:
            assert r.set(lock, b"other", nx=True, px=60_000)
            yield c, r, lock
        finally:
            r.delete(lock)
            r.close()


def test_a_capacity_drop_registered_as_it_is_is_rebalanced_when_the_lock_frees(planner_prefix: str) -> None:
    """A heartbeat of 300 ms/s under 400 ms/s of leases was registered as it is (what happens when
    its leases cannot be re-solved with it), while another rebalance holds the lock. The
    rebalance after the drop waits for the lock, not for the next heartbeat or the hour-long
    period, and brings the leases within ρ_max x 300 once the lock is released."""
    with _five_leases_under_another_replicas_lock(planner_prefix) as (_, r, lock):
        waiting, after = asyncio.run(_drop_registered_as_it_is(planner_prefix, r, lock))
        assert waiting == pytest.approx(400.0)
        assert after <= RHO * 300.0 + 1e-9


async def _drop_registered_as_it_is(prefix: str, r: redis.Redis, lock: str) -> tuple[float, float]:
    """On a replica of `prefix`: register w1's heartbeat at 300 ms/s unchecked, start the rebalance
    after a capacity drop, and read the worker's leases 1 s later; then release `lock` and read
    them once they fit (within 10 s)."""
    settings = Settings(key_prefix=prefix, redis_url=SHARED_REDIS, rebalance_s=3600.0, refresh_s=3600.0)
    store = Store(settings, PlannerMetrics())
    await store.start()
    try:
        w = Worker("http://w1:1", ("cam",), "t", 0.0, 0, 0, capacity_ms_per_s=300.0)
        assert await store.registry.heartbeat(w)  # no ρ_max: unchecked
        await store.fleet.refresh()
        store.rebalancer.note_capacity(w.url, w.capacity_ms_per_s)
        await asyncio.sleep(1.0)
        await store.fleet.refresh()
        waiting = store.fleet.leased(w.url)[0]
        r.delete(lock)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            await store.fleet.refresh()
            if store.fleet.leased(w.url)[0] <= RHO * 300.0 + 1e-9:
                break
            await asyncio.sleep(0.1)
        return waiting, store.fleet.leased(w.url)[0]
    finally:
        await store.close()


def test_a_rebalance_releases_only_its_own_lock(planner_prefix: str) -> None:
    """A rebalance that outlived its lock's TTL, while another replica took the lock, leaves
    that replica's lock in place when it ends; its own it releases."""
    assert asyncio.run(_lock_holders(planner_prefix)) == [True, False, b"other", None]


async def _lock_holders(prefix: str) -> list[Any]:
    settings = Settings(key_prefix=prefix, redis_url=SHARED_REDIS, rebalance_s=0, refresh_s=3600.0)
    store = Store(settings, PlannerMetrics())
    await store.start()
    r = redis.Redis.from_url(SHARED_REDIS)
    try:
        fleet = Fleet(settings, store.metrics, store.link, store.keys, store.candidates.by_name, store.registry.live)
        rebalancer = Rebalancer(fleet, store.keys)
        token = await rebalancer.lock.acquire()
        out: list[Any] = [token is not None, await rebalancer.lock.acquire() is not None]
        r.set(rebalancer.lock.key, b"other", px=60_000)  # its lock expired; another replica's now
        await rebalancer.lock.release(token or "")
        out.append(r.get(rebalancer.lock.key))
        r.delete(rebalancer.lock.key)
        token = await rebalancer.lock.acquire()
        await rebalancer.lock.release(token or "")
        out.append(r.get(rebalancer.lock.key))
        return out
    finally:
        r.delete(f"{prefix}:v1:rebalance-lock")
        r.close()
        await store.close()


def test_a_requested_rebalance_waits_for_the_one_that_holds_the_lock(planner_prefix: str) -> None:
    """Another replica's rebalance holds the lock (for 1.5 s more): POST /fleet/rebalance runs
    only once the lock is free, one rebalance at a time as the periodic ones, and then applies."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c)
        assert c.post("/plan", json=leased("d1")).status_code == 200
        r = redis.Redis.from_url(SHARED_REDIS)
        try:
            r.set(f"{planner_prefix}:v1:rebalance-lock", b"another-replica", px=1500)
            t0 = time.monotonic()
            got = c.post("/fleet/rebalance")
            waited = time.monotonic() - t0
        finally:
            r.close()
        assert got.status_code == 200 and got.json()["workers"][0]["applied"], got.text
        assert waited >= 1.0, waited


def test_a_device_only_lease_two_workers_solve_does_not_refuse_the_second_apply(planner_prefix: str) -> None:
    """Two workers of different tiers serve the model; one device is Device-Only (its uplink too
    slow for any edge plan to meet its frame rate). A rebalance solves it with each worker's leases in turn: the first
    worker's apply rewrites its record (that worker's graph, so another basis), and the second
    worker's apply, checked against the records as read at the start, refused everything it
    had solved. Both applies land now, and the lease stays Device-Only."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        # w1 sorts first by URL but is listed after w2 (busier), so the lease is first planned on w2's graph
        setup_two_tiers(c)
        assert c.post("/plan", json=leased("j", bandwidth_mbps=0.001)).json()["lease"]["worker"] is None
        reports = c.post("/fleet/rebalance").json()["workers"]
        assert [r["worker"] for r in reports] == ["http://w1:1", "http://w2:1"], reports
        assert all(r["applied"] for r in reports), reports
        assert c.get("/devices/j").json()["lease"]["worker"] is None
        assert c.delete("/devices/j").status_code == 204


def test_a_lease_of_a_model_its_worker_stopped_serving_is_not_solved_onto_it(planner_prefix: str) -> None:
    """A device leases w1 for model cam; w1's heartbeats then list another model only. A
    rebalance does not plan the lease onto w1 again (the worker would refuse its frames): it is
    in no report, and its booking stays until its device plans again."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_model(c)
        assert c.put("/models/cam2", json=chain_graph("cam2")).status_code in (200, 201)
        assert c.post("/plan", json=leased("d")).json()["lease"]["worker"] == "http://w1:1"
        assert beat(c, "http://w1:1", ["cam2"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        reports = c.post("/fleet/rebalance").json()["workers"]
        assert not any(d["device_id"] == "d" for r in reports for d in r["devices"]), reports
        assert not c.get("/devices/d").json()["lease"]["assigned"]
        assert c.delete("/devices/d").status_code == 204


def test_a_device_only_lease_record_names_the_graph_its_plan_was_planned_on(planner_prefix: str) -> None:
    """Two workers of different tiers (so different graphs to plan on). Device k leases the faster
    worker w2, whose heartbeat load is the lower; Device-Only device j is then planned on the
    worker with the fewer leases, w1, and its plan names w1. Its lease record must name w1's
    graph (the one its plan id was computed from), not that of the worker listed first by
    heartbeat load (w2): a rebalance compares records by that basis."""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_two_tiers(c)
        assert c.post("/plan", json=leased("k")).json()["lease"]["worker"] == "http://w2:1"
        body = leased("j", bandwidth_mbps=0.001)
        plan = c.post("/plan", json=body).json()
        assert plan["lease"]["worker"] is None and plan["edge_worker"] == "http://w1:1", plan
        r = redis.Redis.from_url(SHARED_REDIS)
        records = {d: json.loads(r.get(f"{planner_prefix}:v1:lease:{d}")) for d in ("j", "k")}
        request = request_of({k: v for k, v in body.items() if k != "device_id"})
        assert plan_id(records["j"]["graph_hash"], request, "dapdee") == plan["plan_id"]
        assert records["j"]["graph_hash"] != records["k"]["graph_hash"]  # k's is w2's graph


def _with_confidence_exits(g: dict[str, Any]) -> dict[str, Any]:
    """`g` (chain_graph) with an early exit head h1 on node a and calibrated confidence exits."""
    head = {"name": "h1", "op": "", "inputs": ["a"], "out_bytes": 10, "device_ms": 1.0, "edge_ms": 0.1}
    by_exit = {
        "exit1": {"fractions": {"exit1": 1.0}, "accuracy": 0.8},
        "final": {"fractions": {"exit1": 0.4, "final": 0.6}, "accuracy": 0.9},
    }
    return {
        **g,
        "nodes": [g["nodes"][0], head, *g["nodes"][1:]],
        "exits": [{"name": "exit1", "node": "h1", "accuracy": 0.8}, *g["exits"]],
        "progressive": {
            "rule": "max_softmax",
            "split": "test",
            "thresholds": {"exit1": 0.9, "final": None},
            "by_exit": by_exit,
        },
    }


def test_baselines_and_confidence_exit_plans_are_priced_at_the_load_the_leases_put_on_the_worker(
    planner_prefix: str,
) -> None:
    """Plans against one worker (a baseline, confidence exits) hold no lease, but the worker they
    send to is as busy as the leases make it: without `edge_load` they are priced at ℓe = the
    leases' reservations / the nominal capacity (here 800 / 1000), exactly as with that load
    given, and not as on an idle worker; of several workers, on the one the leases load least."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, graph=_with_confidence_exits(chain_graph()))
        lease = c.post("/plan", json=leased("busy", fps=100.0)).json()["lease"]
        assert lease["worker"] == "http://w1:1" and lease["frames_per_s"] * lease["edge_ms_per_frame"] == pytest.approx(
            800.0
        )
        unleased = {k: v for k, v in leased("x").items() if k not in ("device_id", "frame_rate")}
        for extra in ({"baseline": "edge-only"}, {"baseline": "dads"}, {"confidence_exits": True}):
            plans = [
                c.post("/plan", json={**unleased, **extra, **load}).json()
                for load in ({}, {"edge_load": 0.8}, {"edge_load": 0.0})
            ]
            implicit, busy, idle = (p["predicted"] for p in plans)
            assert plans[0]["edge_worker"] == "http://w1:1", plans[0]
            assert implicit == busy and implicit != idle, (extra, implicit, idle)
        edge_only = c.post("/plan", json={**unleased, "baseline": "edge-only"}).json()["predicted"]
        assert edge_only["edge_ms"] == pytest.approx(8.0 / (1 - 0.8))  # (2 + 2 + 4 ms) at ℓe 0.8
        # a second worker, busier by heartbeat but holding no lease: the one the leases load least
        assert beat(c, "http://w2:1", ["cam"], "t", 0.5, capacity_ms_per_s=1000.0).status_code == 200
        plan = c.post("/plan", json={**unleased, "baseline": "edge-only"}).json()
        assert plan["edge_worker"] == "http://w2:1" and plan["predicted"]["edge_ms"] == pytest.approx(8.0)


def test_a_device_avoiding_a_worker_is_planned_on_another_and_its_lease_moves(planner_prefix: str) -> None:
    """Two idle workers serve the model (w1 first by URL). A device that names w1 in
    `avoid_workers` (with a trailing '/': the same worker) is planned and leased on w2, and its
    reservation leaves w1; a plan without a lease, and a baseline, avoid it too. A request that
    avoids every live worker is planned as if it avoided none. A malformed list is a 422 naming
    it, and nothing stored changes."""
    with planner(planner_prefix, rebalance_s=0) as c:
        setup_model(c, workers=("http://w1:1", "http://w2:1"))
        assert c.post("/plan", json=leased("d")).json()["lease"]["worker"] == "http://w1:1"
        plan = c.post("/plan", json=leased("d", avoid_workers=["http://w1:1/"])).json()
        assert plan["lease"]["worker"] == plan["edge_worker"] == "http://w2:1"
        booked = {url: w["leased_ms_per_s"] for url, w in workers(c).items()}
        assert booked == {"http://w1:1": 0.0, "http://w2:1": pytest.approx(80.0)}
        unleased = {k: v for k, v in leased("x").items() if k != "device_id"}
        assert (
            c.post("/plan", json={**unleased, "avoid_workers": ["http://w2:1"]}).json()["edge_worker"] == "http://w1:1"
        )
        baseline = {**unleased, "baseline": "edge-only", "avoid_workers": ["http://w1:1"]}
        assert c.post("/plan", json=baseline).json()["edge_worker"] == "http://w2:1"
        both = {**unleased, "avoid_workers": ["http://w1:1", "http://w2:1"]}
        assert c.post("/plan", json=both).json() == c.post("/plan", json=unleased).json()
        for bad, field in ((["ftp://w1:1"], "avoid_workers"), ([f"http://w{i}:1" for i in range(17)], "avoid_workers")):
            r = c.post("/plan", json=leased("d", avoid_workers=bad))
            assert r.status_code == 422 and field in r.text, r.text
        assert c.get("/devices/d").json()["plan"]["plan_id"] == plan["plan_id"]
        assert {url: w["leased_ms_per_s"] for url, w in workers(c).items()} == booked


def test_workers_without_timings_are_passed_over_by_every_kind_of_plan(planner_prefix: str) -> None:
    """The graph has no edge timings of its own; w1 (tier t, busier by heartbeat) has an edge
    profile, w2 (tier "none", idle) has none. Every plan goes to w1, as the leased plan does:
    a baseline (Device-Only too) or a planner without leases, which used to pick w2 alone and
    answer 409; and a device avoiding w1, the only worker it can use, is planned on w1 as if it
    avoided none (it used to be told to upload a profile)."""
    graph = chain_graph()
    for node in graph["nodes"]:
        node.pop("edge_ms")
    for fleet_planning in (True, False):
        with planner(planner_prefix, rebalance_s=0, fleet_planning=fleet_planning) as c:
            setup_model(c, workers=(), graph=graph)
            assert beat(c, "http://w1:1", ["cam"], "t", 0.5, capacity_ms_per_s=1000.0).status_code == 200
            assert beat(c, "http://w2:1", ["cam"], "none", 0.0, capacity_ms_per_s=1000.0).status_code == 200
            plain = {k: v for k, v in leased("x").items() if k not in ("device_id", "frame_rate")}
            bodies = [plain, {**plain, "avoid_workers": ["http://w1:1"]}]
            bodies += [{**plain, "baseline": b} for b in ("device-only", "edge-only", "neurosurgeon")]
            if fleet_planning:
                bodies.append(leased("d", avoid_workers=["http://w1:1"]))
            for body in bodies:
                r = c.post("/plan", json=body)
                assert r.status_code == 200 and r.json()["edge_worker"] == "http://w1:1", (body, r.text)
            if fleet_planning:  # the lease is on w1, recorded as avoiding none
                assert c.get("/devices/d").json()["lease"]["worker"] == "http://w1:1"
        clear_prefix(SHARED_REDIS, planner_prefix)  # the next planner starts from an empty store


def test_a_rebalance_does_not_bring_a_device_onto_a_worker_it_avoids(planner_prefix: str) -> None:
    """w1 has room; w2 (10 ms/s) admits no edge plan. A device avoiding w1 is planned on w2:
    Device-Only. A rebalance leaves it off w1 (it solves it with w2's leases only), and its next
    request keeps it there. (Before, the rebalance took the Device-Only lease onto w1, where the
    device had failed.)"""
    with planner(planner_prefix, rebalance_s=3600.0) as c:
        setup_model(c, workers=("http://w1:1",))
        assert beat(c, "http://w2:1", ["cam"], "t", 0.0, capacity_ms_per_s=10.0).status_code == 200
        avoiding = leased("j", avoid_workers=["http://w1:1"])
        plan = c.post("/plan", json=avoiding).json()
        assert plan["lease"]["worker"] is None and plan["edge_worker"] == "http://w2:1"
        reports = {r["worker"]: r for r in c.post("/fleet/rebalance").json()["workers"]}
        assert all(d["device_id"] != "j" for d in reports.get("http://w1:1", {"devices": []})["devices"]), reports
        assert c.get("/devices/j").json()["lease"]["worker"] is None
        assert c.post("/plan", json=avoiding).json()["lease"]["worker"] is None
        # without the list it is brought onto w1 (the worker with room) as before
        assert c.post("/plan", json=leased("j")).json()["lease"]["worker"] == "http://w1:1"


def test_a_worker_whose_solve_runs_past_the_budget_is_left_as_it_was_and_named(planner_prefix: str) -> None:
    """With a rebalance budget shorter than any solve, POST /fleet/rebalance answers at once:
    the worker is named in `over_budget`, has no report, its leases keep what they booked, and
    the metric counts it."""
    with planner(planner_prefix, rebalance_s=3600.0, rebalance_budget_s=1e-9) as c:
        setup_model(c)
        for i in range(3):
            assert c.post("/plan", json=leased(f"d{i}")).status_code == 200
        before = workers(c)["http://w1:1"]["leased_ms_per_s"]
        answer = c.post("/fleet/rebalance").json()
        assert_valid("lease#/$defs/rebalance", answer)
        assert answer["over_budget"] == ["http://w1:1"] and answer["workers"] == [], answer
        assert workers(c)["http://w1:1"]["leased_ms_per_s"] == before
        assert not c.get("/devices/d0").json()["lease"]["assigned"]
        assert _rebalances(c, "over_budget") == 1


def test_a_replica_that_missed_a_workers_departure_books_no_lease_on_it(planner_prefix: str) -> None:
    """A stopping worker's last heartbeat lists no model; it reaches replica a. Replica b still
    holds the worker serving the model and plans the device onto it: the reservation, which
    reads the worker's last heartbeat inside Redis, refuses it ("departed"), and b plans again
    without the worker (here the device's own CPU), storing no lease on the departed worker. A
    worker that serves the model again is planned onto as before."""
    kw = {"rebalance_s": 0, "refresh_s": 3600.0, "worker_ttl_s": 120.0}
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        setup_model(a)
        assert workers(b)["http://w1:1"]["models"] == ["cam"]  # b's registry: the worker serves cam
        assert beat(a, "http://w1:1", [], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        plan = b.post("/plan", json=leased("d1")).json()
        assert plan["lease"]["worker"] is None and plan["device_nodes"] == ["a", "b"], plan
        assert plan["edge_nodes"] == [] and _admissions(b, "departed") == 1
        assert workers(a)["http://w1:1"]["leases"] == 0
        assert b.get("/devices/d1").json()["lease"]["worker"] is None
        assert beat(a, "http://w1:1", ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        assert b.post("/plan", json=leased("d2")).json()["lease"]["worker"] == "http://w1:1"
        assert workers(a)["http://w1:1"]["leases"] == 1
