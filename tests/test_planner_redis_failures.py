"""How the planner answers when its Redis fails in ways other than going away cleanly: a Redis
frozen (SIGSTOP) while a replica that never read a model writes it, and a Redis that refuses
writes (out of memory under `maxmemory` + `noeviction`, a read-only replica) while it still
serves reads. Real private redis-server processes, real planners under uvicorn, real HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from dapdee.planner.config import Settings
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.redis_link import RedisLink
from dapdee.testing import RedisProcess
from dapdee.web import scrape
from tests.test_planner_service import CONDITIONS, beat, planner, toy_graph, wait_for

TIMINGS = {n["name"]: 1.0 for n in toy_graph()["nodes"]}
HB = {"url": "http://edge:1", "models": ["toy"], "tier": "gpu", "load": 0.1}


def fast(rp: RedisProcess) -> dict[str, Any]:
    """Planner settings for these tests: `rp`'s Redis, short timeouts, a quick refresh, a back-off
    long enough that a link put into it is seen by the polls, no periodic rebalance."""
    return {
        "redis_url": rp.url,
        "redis_timeout_s": 0.3,
        "redis_backoff_s": 1.0,
        "refresh_s": 0.2,
        "rebalance_s": 0,
    }


@contextmanager
def frozen(rp: RedisProcess) -> Iterator[None]:
    """Redis stopped (SIGSTOP: connections stay open, nothing answers) inside the block; cost:
    two signals."""
    assert rp.proc is not None
    os.kill(rp.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(rp.proc.pid, signal.SIGCONT)


def fill_to_oom(r: redis.Redis) -> None:
    """Set Redis's maxmemory just above what it uses and fill it until it refuses writes (OOM
    under noeviction). O(1 KiB writes until full)."""
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 64 * 1024)
    i = 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        while i < 100_000:
            r.set(f"filler:{i}", "x" * 1024)
            i += 1


def metric(c: httpx.Client, name: str) -> float:
    """The sum of a planner metric's samples (0 when absent), from /metrics. One request."""
    return scrape.total(scrape.parse(c.get("/metrics").text), name)


# ---- an offline PUT of a model this replica has not cached ---------------------------


def test_offline_put_of_a_model_not_cached_here_is_refused_not_queued(
    planner_prefix: str, redis_process: RedisProcess
) -> None:
    """Replica a stores m at version 3 with two profiles. Replica b never read m; while Redis is
    frozen b cannot know m exists, so its PUT of m (with or without `If-Match: "3"`) is answered
    like a read of m: 404 saying Redis is unavailable, Retry-After: 1, nothing queued. Once Redis
    answers, m is still version 3 with its profiles, and no queued write was dropped. A PUT of
    a model b holds is still queued during the outage."""
    kw = fast(redis_process)
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        assert a.put("/models/m", json=toy_graph("m")).status_code == 201
        for tier, kind in (("phone", "device"), ("gpu", "edge")):
            assert a.put(f"/models/m/profiles/{tier}", json={"kind": kind, "timings_ms": TIMINGS}).status_code == 201
        assert a.get("/models/m").headers["ETag"] == '"3"'
        assert b.put("/models/mine", json=toy_graph("mine")).status_code == 201
        with frozen(redis_process):
            for headers in ({}, {"If-Match": '"3"'}):
                r = b.put("/models/m", json=toy_graph("m"), headers=headers)
                assert r.status_code == 404 and r.headers.get("Retry-After") == "1", (headers, r.text)
                assert "Redis is unavailable" in r.json()["detail"]
            assert b.get("/models/m").status_code == 404
            queued = b.put("/models/mine/profiles/phone", json={"kind": "device", "timings_ms": TIMINGS})
            assert queued.status_code == 201 and queued.json()["version"] == 2
            assert b.get("/readyz").json()["pending_writes"] == 1
        assert wait_for(lambda: b.get("/readyz").json()["pending_writes"] == 0, timeout=10)
        r = redis.Redis.from_url(redis_process.url)
        p = f"{planner_prefix}:v1"
        assert int(r.hget(f"{p}:versions", "m")) == 3
        assert set(r.hkeys(f"{p}:profiles:m")) == {b"phone", b"gpu"}
        assert set(r.hkeys(f"{p}:profiles:mine")) == {b"phone"}
        got = b.get("/models/m/profiles")
        assert got.status_code == 200 and set(got.json()["profiles"]) == {"phone", "gpu"}
        assert metric(b, "dapdee_planner_write_conflicts_total") == 0
        r.close()


# ---- a Redis that refuses writes but serves reads -----------------------------------


def test_reads_keep_working_and_the_link_stays_up_while_redis_is_out_of_memory(
    planner_prefix: str, redis_process: RedisProcess
) -> None:
    """Under OOM Redis still serves reads: a lease is read (GET /devices), a model another replica
    never read is loaded, and neither readiness nor `dapdee_planner_redis_up` flaps (the
    refresh's epoch check and reads write nothing)."""
    kw = fast(redis_process)
    with planner(planner_prefix, **kw) as a, planner(planner_prefix, **kw) as b:
        assert a.put("/models/toy", json=toy_graph("toy")).status_code == 201
        assert beat(a, HB["url"], HB["models"], HB["tier"], HB["load"]).status_code == 200
        plan = a.post("/plan", json={"model": "toy", "device_id": "d1", "frame_rate": 10.0, **CONDITIONS[1]})
        assert plan.status_code == 200, plan.text
        r = redis.Redis.from_url(redis_process.url)
        fill_to_oom(r)
        seen: list[tuple[int, str, float]] = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            dev = a.get("/devices/d1").status_code
            seen.append((dev, a.get("/readyz").json()["redis"], metric(a, "dapdee_planner_redis_up")))
            time.sleep(0.1)
        assert set(seen) == {(200, "up", 1.0)}, sorted(set(seen))
        got = b.get("/models/toy")  # b never read it: loaded from Redis under OOM
        assert got.status_code == 200 and got.headers["ETag"] == '"1"', got.text
        assert b.get("/readyz").json()["redis"] == "up"
        r.close()


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
def test_a_write_redis_refuses_is_a_503_not_a_queued_write_nor_an_outage(
    planner_prefix: str, redis_process: RedisProcess, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A model write that Redis refuses (out of memory, or a read-only replica) changes nothing:
    503 with Retry-After naming the reason, nothing queued, the link stays up (reads go on), and
    the refusal, which Redis's OOM reply inside the write script also names `user_script:`, is
    not logged as a script bug."""
    with planner(planner_prefix, **fast(redis_process)) as c:
        assert c.put("/models/toy", json=toy_graph("toy")).status_code == 201
        r = redis.Redis.from_url(redis_process.url)
        if refusal == "oom":
            fill_to_oom(r)
        else:
            r.replicaof("127.0.0.1", "1")  # a replica of nothing: keeps its data, refuses writes
        with caplog.at_level(logging.WARNING, logger="dapdee.planner"):
            for method, path, body in (
                ("PUT", "/models/toy/profiles/phone", {"kind": "device", "timings_ms": TIMINGS}),
                ("PUT", "/models/new", toy_graph("new")),
            ):
                got = c.request(method, path, json=body)
                assert got.status_code == 503 and got.headers.get("Retry-After"), (path, got.text)
                reason = "out of memory" if refusal == "oom" else "read-only"
                assert reason in got.json()["detail"], got.text
            ready = c.get("/readyz").json()
            assert ready["redis"] == "up" and ready["pending_writes"] == 0, ready
            assert c.get("/models/toy/profiles").json()["profiles"] == {}
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text
        if refusal == "readonly":
            r.replicaof("NO", "ONE")
        else:
            r.config_set("maxmemory", 0)
        ok = c.put("/models/toy/profiles/phone", json={"kind": "device", "timings_ms": TIMINGS})
        assert ok.status_code == 201 and ok.json()["version"] == 2, ok.text
        r.close()


def test_the_link_tells_a_refusal_from_an_outage_and_from_a_script_bug(
    redis_process: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """`RedisLink`: an OOM reply (from a command, or from inside a Lua script) and a BUSY reply
    raise RedisRefused (a RedisUnavailable whose `reason` names the refusal); the link stays up
    with no back-off (the next read goes through at once) and nothing is logged at ERROR."""

    async def go() -> None:
        s = Settings(redis_url=redis_process.url, redis_timeout_s=2.0, redis_backoff_s=30.0)
        link = RedisLink(s, PlannerMetrics())
        link.connect()
        try:
            await link.call("set", lambda r: r.set("k", "v"))
            r = redis.Redis.from_url(redis_process.url)
            fill_to_oom(r)
            with caplog.at_level(logging.WARNING, logger="dapdee.planner"):
                with pytest.raises(RedisUnavailable, match="out of memory") as got:
                    await link.script("w", "redis.call('SET', KEYS[1], 'x'); return 1", ["k2"], [])
                assert getattr(got.value, "reason", None) == "out of memory"
                with pytest.raises(RedisUnavailable, match="out of memory"):
                    await link.call("setnx", lambda r: r.set("k3", "x", nx=True))
                assert link.state == "up" and await link.call("get", lambda r: r.get("k")) == b"v"
                r.config_set("maxmemory", 0)
                await busy(r, link)
            assert link.state == "up" and not [x for x in caplog.records if x.levelno >= logging.ERROR], caplog.text
            r.close()
        finally:
            await link.close()

    asyncio.run(go())


async def busy(r: redis.Redis, link: RedisLink) -> None:
    """Make Redis BUSY (a script running past `busy-reply-threshold`), check that `link` reads it
    as a refusal, then kill the script. About 0.5 s."""
    r.config_set("busy-reply-threshold", 50)
    spin = "local t = redis.call('TIME'); while true do local n = redis.call('TIME'); " + (
        "if n[1] - t[1] >= 2 then break end end; return 1"
    )
    other = redis.Redis(port=r.connection_pool.connection_kwargs["port"], socket_timeout=5)
    task = asyncio.create_task(asyncio.to_thread(other.eval, spin, 0))
    await asyncio.sleep(0.3)
    try:
        with pytest.raises(RedisUnavailable, match="busy") as got:
            await link.call("get", lambda c: c.get("k"))
        assert getattr(got.value, "reason", None) == "busy"
    finally:
        r.script_kill()
        with pytest.raises(redis.exceptions.ResponseError):
            await task
        other.close()
    assert await link.call("get", lambda c: c.get("k")) == b"v"
