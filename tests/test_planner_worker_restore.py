"""Workers after Redis restarts empty: a replica that knows a live worker writes it back, with the
expiry of its last heartbeat, so it stays listed and planned onto (by this replica and by others)
until its TTL from that heartbeat ends, and not after (DESIGN §7, §13). Real uvicorn planners on
loopback, a private redis-server restarted without its data, real HTTP heartbeats."""

from __future__ import annotations

import time
from typing import Any

import httpx
import redis

from tests.conftest import RedisProcess
from tests.test_planner_service import CONDITIONS, beat, planner, toy_graph, wait_for

TTL_S = 6.0
WORKER = "http://edge:1"
FAST = {"redis_timeout_s": 0.2, "redis_backoff_s": 0.3, "refresh_s": 0.2, "worker_ttl_s": TTL_S}


def plan_with_lease(c: httpx.Client, device: str) -> dict[str, Any]:
    """POST /plan for `device` (a leased plan); the answer's JSON."""
    r = c.post("/plan", json={"model": "toy", "device_id": device, "frame_rate": 10.0, **CONDITIONS[1]})
    assert r.status_code == 200, r.text
    return r.json()


def listed(c: httpx.Client) -> dict[str, float]:
    """GET /workers as {url: expires_in_s}."""
    r = c.get("/workers")
    assert r.status_code == 200, r.text
    return {w["url"]: w["expires_in_s"] for w in r.json()["workers"]}


def test_live_workers_are_written_back_after_an_empty_restart_until_their_ttl(
    planner_prefix: str, redis_process: RedisProcess
) -> None:
    kw = {"redis_url": redis_process.url, **FAST}
    p = f"{planner_prefix}:v1"
    with planner(planner_prefix, **kw) as a:
        assert a.put("/models/toy", json=toy_graph()).status_code == 201
        sent = time.monotonic()
        r = beat(a, WORKER, ["toy"], "gpu", 0.1)
        assert r.status_code == 200 and r.json()["shared"] is True, r.text
        got = time.monotonic()  # Redis started the TTL between `sent` and `got`
        first = plan_with_lease(a, "d1")
        assert first["edge_worker"] == WORKER and first["lease"]["worker"] == WORKER

        redis_process.stop()
        redis_process.start()  # same port, empty (no persistence)
        raw = redis.Redis.from_url(redis_process.url)
        try:
            # the planner has found Redis again and written its models back ...
            assert wait_for(lambda: raw.exists(f"{p}:graph:toy"), timeout=5), "model not written back"
            time.sleep(1.0)  # ... and several refreshes have run since
            assert time.monotonic() - got < TTL_S - 2.0, "test too slow to check the worker within its TTL"
            workers = listed(a)
            assert WORKER in workers, f"worker lost after an empty restart: GET /workers -> {workers}"
            assert workers[WORKER] <= TTL_S - (time.monotonic() - sent) + 0.05  # its last heartbeat's expiry
            after = plan_with_lease(a, "d2")
            assert after["edge_worker"] == WORKER and after["lease"]["worker"] == WORKER, after
            # written back to Redis with that expiry (by Redis's clock), so other replicas see it
            score = raw.zscore(f"{p}:workers:exp", WORKER)
            assert score is not None, "worker not written back to Redis"
            secs, micros = raw.time()
            left_s = (score - (secs * 1000 + micros // 1000)) / 1000.0
            assert 0 < left_s <= TTL_S - (time.monotonic() - sent) + 0.05, left_s
            with planner(planner_prefix, **kw) as b:  # a replica that never saw the heartbeat
                assert WORKER in listed(b)
                assert plan_with_lease(b, "d3")["edge_worker"] == WORKER

            # and not past the TTL of the last heartbeat
            time.sleep(max(0.0, got + TTL_S + 0.3 - time.monotonic()))
            assert listed(a) == {}
            assert raw.zscore(f"{p}:workers:exp", WORKER) is None
            gone = plan_with_lease(a, "d4")
            assert gone["edge_worker"] is None, gone
        finally:
            raw.close()
