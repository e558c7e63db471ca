"""Two planner replicas (stores with their own refresh loops) on the real Redis at 127.0.0.1:6379,
one of them behind a TCP proxy the test cuts: writes interleaved between both replicas during
the outage; afterwards no newer write is lost, and the stale queued writes are counted."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import redis

from dapdee.planner.errors import ModelUnreachable
from dapdee.planner.store import Store
from tests.redis_proxy import RedisProxy
from tests.test_planner_store import chain_graph, device_profile, running, sample, settings


def test_interleaved_writes_during_one_replicas_outage(planner_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        proxy = await RedisProxy().start()
        try:
            async with running(settings(planner_prefix, proxy.url)) as a, running(settings(planner_prefix)) as b:
                await interleaved_outage(planner_prefix, a, b, proxy, caplog)
        finally:
            await proxy.close()

    asyncio.run(go())


async def interleaved_outage(
    planner_prefix: str, a: Store, b: Store, proxy: RedisProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Replica `a` (behind `proxy`) and `b` interleave writes while `a` is cut off; then `a`'s
    refresh loop replays its queue."""
    g = chain_graph("shared")
    await b.model_writer.put_graph(g)
    await b.model_writer.put_profile("shared", device_profile(g, "p0"))
    solo = chain_graph("solo")
    await b.model_writer.put_graph(solo)
    assert (await a.model_cache.get("shared")).version == 2  # type: ignore[union-attr]
    assert (await a.model_cache.get("solo")).version == 1  # type: ignore[union-attr]

    proxy.cut()
    g2 = chain_graph("shared", scale=3.0)  # same structure, other timings
    b2_theirs = device_profile(g, "b2", 7.0)
    steps = [
        (a.model_writer.put_profile, ("shared", device_profile(g, "a1"))),
        (b.model_writer.put_profile, ("shared", device_profile(g, "b1"))),
        (a.model_writer.put_profile, ("solo", device_profile(solo, "a-solo"))),
        (b.model_writer.put_graph, (g2,)),
        (a.model_writer.delete_profile, ("shared", "p0")),
        (b.model_writer.put_profile, ("shared", b2_theirs)),
        (b.model_writer.delete_profile, ("shared", "b1")),
        (a.model_writer.put_profile, ("shared", device_profile(g, "b2", 1.5))),  # would overwrite b's newer b2
    ]
    for fn, args in steps:
        res = await fn(*args)
        assert res is not None and res is not False
    # a new model: a cannot tell that Redis lacks it, so the create is refused (retry), not queued
    with pytest.raises(ModelUnreachable):
        await a.model_writer.put_graph(chain_graph("only-a"))
    assert a.link.state == "down" and a.model_sync.pending_count == 4
    want = await b.model_cache.get("shared")  # the newest state: b's writes only
    assert want is not None and want.version == 6

    with caplog.at_level(logging.WARNING, logger="dapdee.planner"):
        proxy.restore()
        deadline = time.monotonic() + 10
        while a.model_sync.pending_count or a.link.state != "up":  # a's own refresh loop replays
            assert time.monotonic() < deadline, (a.model_sync.pending_count, a.link.state)
            await asyncio.sleep(0.05)

    r = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_timeout=2)
    p = f"{planner_prefix}:v1"
    profiles = {t.decode(): json.loads(v) for t, v in r.hgetall(f"{p}:profiles:shared").items()}
    assert set(profiles) == {"p0", "b2"}  # a1 not added, p0 not deleted, b1 stays deleted
    assert profiles["b2"]["timings_ms"] == b2_theirs.timings_ms  # b's newer b2 kept
    assert json.loads(r.get(f"{p}:graph:shared")) == g2.to_dict()
    assert int(r.hget(f"{p}:versions", "shared")) == 6
    assert set(r.hkeys(f"{p}:profiles:solo")) == {b"a-solo"}  # nobody else wrote solo
    assert r.hget(f"{p}:models", "only-a") is None  # refused during the outage, never queued
    assert sample(a, "dapdee_planner_write_conflicts_total", reason="version") == 3
    assert sample(b, "dapdee_planner_write_conflicts_total", reason="version") == 0
    warned = [rec.getMessage() for rec in caplog.records if "queued write not applied" in rec.getMessage()]
    assert len(warned) == 3 and all("'shared'" in m for m in warned), warned
    assert "Redis holds version 6" in warned[0]
    # both replicas converge on Redis's state
    mine = await a.model_cache.get("shared")
    assert mine is not None and (mine.version, set(mine.profiles)) == (6, {"p0", "b2"})
    await b.sync()
    theirs = await b.model_cache.get("solo")
    assert theirs is not None and set(theirs.profiles) == {"a-solo"}
