"""The device's plan source against a real planner (uvicorn on 127.0.0.1, the real Redis, a
TCP proxy that cuts the planner's Redis link): the transient 404 of a replica whose Redis is
away is retried, never answered by uploading the model again; a lease the planner could not
store is still renewed at `replan_after_s`, so a stored one follows soon after Redis returns;
a lease is counted from when the plan was asked for, never past the planner's own expiry; a
lease lapsing while its renewal is in flight asks for no second plan once the renewal lands; and
the leases the contract allows (`replan_after_s` 0, no `device_id`) start a device."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from dapdee.client import ApiError, AsyncPlannerClient
from dapdee.costmodel import Conditions
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.plan_source import REREGISTER_SPACING_S, PlannerPlanSource
from dapdee.device.profile import publish_profile
from dapdee.device.replanner import Replanner
from dapdee.device.sensing import Sensing
from dapdee.device.types import Plan, PlannerUnavailable
from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from dapdee.testing import ServerThread, serve_app_in_thread
from tests import metrics_scrape
from tests.device_stack import ForwardingProxy
from tests.redis_proxy import RedisProxy
from tests.standin import Standin, answer_bytes
from tests.test_device_plans import ANSWER, TINY, G
from tests.test_planner_service import ANY_WORKER_URL, TOKEN, planner

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
COND = Conditions(8.0, 5.0, 0.0, 0.0)
OUTAGE = {"redis_timeout_s": 2.0, "redis_backoff_s": 0.2, "refresh_s": 0.1}  # cut links fail at once


@asynccontextmanager
async def replica(prefix: str, redis_url: str, **kw: Any) -> AsyncIterator[AsyncPlannerClient]:
    """A planner (all-roles token) on `redis_url`, started off the event loop so that a
    RedisProxy running on this loop keeps forwarding; its async client."""
    settings = Settings(
        redis_url=redis_url, key_prefix=prefix, api_token=TOKEN, worker_url_pattern=ANY_WORKER_URL, **{**OUTAGE, **kw}
    )
    server = ServerThread(create_app(settings), name="planner-replica")
    await asyncio.to_thread(server.start)
    try:
        async with AsyncPlannerClient(server.url, TOKEN, timeout=10.0) as client:
            yield client
    finally:
        await asyncio.to_thread(server.stop)


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Await until the coroutine `pred()` returns true, polling every 0.05 s; fails the test
    after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await pred():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(0.05)


def no_plan(plan: Plan) -> None:
    """A Replanner's `on_plan` that does nothing (the tests read `plans`)."""


async def redis_up(client: AsyncPlannerClient) -> bool:
    return (await client.readyz()).redis == "up"


def test_the_first_plan_waits_out_a_replica_that_cannot_read_the_model(planner_prefix: str) -> None:
    """The model is in Redis (another replica uploaded it); this replica starts while its Redis
    link is cut, so it answers the device's first POST /plan with 404 + `Retry-After: 1` (the
    model may exist). The device retries within its start-up deadline instead of refusing to
    start, uploads nothing, and starts once the link is back."""
    with planner(planner_prefix) as other:
        assert other.put("/models/tiny", json=TINY).status_code == 201
    uploads: list[float] = []

    async def reregister() -> None:
        uploads.append(time.monotonic())

    async def go() -> tuple[Plan, float, PlannerUnavailable]:
        proxy = await RedisProxy().start()
        proxy.cut()
        try:
            async with replica(planner_prefix, proxy.url) as client:
                source = PlannerPlanSource(client, G, Requirements(), ready_timeout_s=30.0, reregister=reregister)
                with pytest.raises(PlannerUnavailable) as refused:
                    await source.plan(COND)  # what the device meets first
                t0 = time.monotonic()
                loop = asyncio.get_running_loop()
                loop.call_later(1.5, proxy.restore)  # past REREGISTER_SPACING_S: a re-upload could run
                plan = await source.first(COND)
                return plan, time.monotonic() - t0, refused.value
        finally:
            await proxy.close()

    plan, waited, refused = asyncio.run(go())
    assert (refused.status, refused.retry_after_s) == (404, 1.0), refused.reason
    assert "Redis is unavailable" in refused.reason
    assert plan.origin == "planner" and plan.model == "tiny"
    assert waited >= 1.4  # it was the retries that got the plan, after the link came back
    assert uploads == []  # a model that may exist is not uploaded again


def test_a_replan_meeting_the_transient_404_does_not_upload_the_model_again(planner_prefix: str) -> None:
    """A re-plan on a replica whose Redis is away and which never cached the model: the 404
    with Retry-After is a failed re-plan (retried later), not a lost model. The device's
    re-register (with an admin token: PUT the graph and the profile) must not run: the planner
    would queue the device's graph and write it over the stored one when Redis returns. A 404
    without Retry-After (a planner that really lost the model) still re-registers."""
    with planner(planner_prefix) as other:
        assert other.put("/models/tiny", json=TINY).status_code == 201
        profile = {"kind": "device", "timings_ms": {n.name: n.device_ms for n in G.nodes}}
        assert other.put("/models/tiny/profiles/phone", json=profile).status_code == 201

    async def go() -> tuple[PlannerUnavailable, int, int, Plan, int]:
        proxy = await RedisProxy().start()
        proxy.cut()
        calls = [0]
        try:
            async with replica(planner_prefix, proxy.url) as client:

                async def reregister() -> None:
                    calls[0] += 1
                    await publish_profile(client, client, G, "phone", {})

                source = PlannerPlanSource(client, G, Requirements(), "phone", reregister=reregister)
                await asyncio.sleep(REREGISTER_SPACING_S)  # a re-upload is allowed again
                with pytest.raises(PlannerUnavailable) as refused:
                    await source.plan(COND)
                pending = (await client.readyz()).pending_writes
                during = calls[0]
                proxy.restore()
                await until(lambda: redis_up(client), 10.0, "the replica's Redis link back")
                plan = await source.plan(COND)
                return refused.value, during, pending, plan, calls[0]
        finally:
            await proxy.close()

    refused, during, pending, plan, after = asyncio.run(go())
    assert (refused.status, refused.retry_after_s) == (404, 1.0), refused.reason
    assert during == 0 and pending == 0, "the device uploaded its model to a replica that could not read it"
    assert plan.origin == "planner" and after == 0

    async def lost() -> tuple[Plan, int]:
        calls = [0]
        async with replica("unused", "none") as client:  # no Redis: an unknown model is unknown

            async def reregister() -> None:
                calls[0] += 1
                await publish_profile(client, client, G, "phone", {})

            source = PlannerPlanSource(client, G, Requirements(), "phone", reregister=reregister)
            await asyncio.sleep(REREGISTER_SPACING_S)
            return await source.plan(COND), calls[0]

    plan, calls = asyncio.run(lost())
    assert plan.origin == "planner" and calls == 1


def test_publishing_waits_out_a_replica_that_cannot_read_the_model(planner_prefix: str) -> None:
    """A device with an admin token starting against a replica whose Redis link is cut: its
    GET /models/tiny is a 404 with Retry-After (the model is stored; the replica cannot read it).
    Publishing waits that out instead of uploading its graph (which the replica would queue and
    write over the stored one), then uploads only its profile once the link is back."""
    with planner(planner_prefix) as other:
        stored = other.put("/models/tiny", json=TINY).json()

    async def go() -> tuple[int, float, int]:
        proxy = await RedisProxy().start()
        proxy.cut()
        try:
            async with replica(planner_prefix, proxy.url) as client:
                t0 = time.monotonic()
                asyncio.get_running_loop().call_later(1.5, proxy.restore)
                await publish_profile(client, client, G, "phone", {})
                waited = time.monotonic() - t0
                version = (await client.list_profiles("tiny")).version
                return (await client.readyz()).pending_writes, waited, version
        finally:
            await proxy.close()

    pending, waited, version = asyncio.run(go())
    assert pending == 0 and waited >= 1.4
    assert version == stored["version"] + 1  # the profile only: the graph was not written again


def test_a_lease_not_stored_is_renewed_at_replan_after_s_and_never_lapses(planner_prefix: str) -> None:
    """While the planner's Redis is away its leased plans say `expires_in_s` 0 (not stored).
    The device keeps such a plan (it holds no reservation that could lapse: never Device-Only
    because of it) but still asks again after `replan_after_s`, so once Redis is back it holds
    a stored lease within about that time, without waiting for drift or plan age."""

    async def go() -> tuple[Plan, list[Plan], bool, dict[str, Any]]:
        proxy = await RedisProxy().start()
        try:
            async with replica(planner_prefix, proxy.url, lease_ttl_s=4.0, replan_after_s=0.3) as client:
                await client.put_graph(G)  # cached by the replica before the outage
                proxy.cut()
                cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6, plan_max_age_s=1e6)
                source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-unstored")
                first = await source.first(COND)
                rp = Replanner(source, Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0), cfg, first, no_plan)
                t_cut = time.monotonic()
                kept = True
                while time.monotonic() - t_cut < 1.0:  # Redis away: re-plans come back unstored
                    rp.tick()
                    kept = kept and rp.in_force().origin == "planner"
                    await asyncio.sleep(0.05)
                proxy.restore()
                deadline = time.monotonic() + 10.0
                while not _stored(rp.current):  # the next renewal after Redis is back stores it
                    assert time.monotonic() < deadline, "no plan holding a stored lease within 10 s"
                    rp.tick()
                    await asyncio.sleep(0.05)
                await rp.aclose()
                state = (await client.device("cam-unstored")).model_dump()
                return first, list(rp.plans), kept, state
        finally:
            await proxy.close()

    first, plans, kept, state = asyncio.run(go())
    assert first.lease is not None and not first.lease.stored and first.lease.replan_after_s == pytest.approx(0.3)
    assert kept, "a plan whose lease was not stored was dropped for Device-Only"
    unstored = [p for p in plans if p.lease is not None and not p.lease.stored]
    assert len(unstored) >= 3, [p.lease for p in plans]  # renewed every ~0.3 s during the outage
    assert plans[-1].lease is not None and plans[-1].lease.expires_in_s == pytest.approx(4.0)
    assert state["lease"]["device_id"] == "cam-unstored" and state["lease"]["expires_in_s"] > 0


def _stored(plan: Plan) -> bool:
    return plan.lease is not None and plan.lease.stored


class SlowAnswers(ForwardingProxy):
    """Forwards to the planner and holds each answer `delay_s` before sending it on: a slow
    link back to the device, after the planner stored the lease."""

    def __init__(self, target: str, delay_s: float) -> None:
        super().__init__(target)
        self.delay_s = delay_s

    async def answer(self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: Any) -> Any:
        await asyncio.sleep(self.delay_s)
        return await super().answer(scope, headers, body, response)


def test_a_lease_ends_on_the_device_no_later_than_on_the_planner(planner_prefix: str) -> None:
    """The planner starts the lease's TTL when it stores it, before it answers; the answer then
    takes 0.5 s to reach the device. The device counts the lease from when it sent the request,
    so it believes it ends no later than the planner's own copy says (GET /devices/{id})."""
    delay_s = 0.5

    async def go(url: str) -> tuple[Plan, float, float, float]:
        front = ServerThread(SlowAnswers(url, delay_s), name="slow-answers")
        await asyncio.to_thread(front.start)
        try:
            async with (
                AsyncPlannerClient(front.url, TOKEN, timeout=10.0) as slow,
                AsyncPlannerClient(url, TOKEN, timeout=10.0) as direct,
            ):
                await direct.put_graph(G)
                source = PlannerPlanSource(slow, G, Requirements(frame_rate=10.0), device_id="cam-slow")
                plan = await source.plan(COND)
                before = time.monotonic()
                left = (await direct.device("cam-slow")).lease.expires_in_s
                return plan, before, time.monotonic(), left
        finally:
            await asyncio.to_thread(front.stop)

    with planner(planner_prefix, lease_ttl_s=30.0) as c:
        plan, before, after, left = asyncio.run(go(str(c.base_url).rstrip("/")))
    lease = plan.lease
    assert lease is not None and lease.stored and lease.expires_in_s == 30.0
    # the planner's expiry lies in [before + left, after + left] (+ 1 ms of PTTL rounding)
    assert lease.expires_at <= after + left + 0.002, (lease.expires_at - (after + left), after - before)
    assert lease.expires_at >= before + left - delay_s - 1.0  # counted from the request, not earlier


def renewal_in_flight_when_the_lease_lapses(drive: Callable[[Replanner], Awaitable[None]]) -> tuple[list[Plan], int]:
    """Every answer takes 1 s to reach the device. Its first lease (1.5 s, renew after 0.5 s)
    is due for renewal when it arrives and lapses while that renewal is in flight; the renewal
    brings a fresh lease (30 s, renew after 20 s), as does any later plan. `drive(replanner)`
    ticks it; then: the plans it put in use and the POST /plan requests the planner got."""
    standin = Standin()
    lease = {**ANSWER["lease"], "expires_in_s": 1.5, "replan_after_s": 0.5}
    standin.answer(answer_bytes({**ANSWER, "lease": lease}))
    renewed = {**ANSWER["lease"], "expires_in_s": 30.0, "replan_after_s": 20.0}

    async def go(url: str) -> tuple[list[Plan], int]:
        cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6, plan_max_age_s=1e6, min_replan_s=0.1)
        async with AsyncPlannerClient(url, timeout=10.0) as client:
            source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-7")
            first = await source.plan(COND)
            standin.answer(answer_bytes({**ANSWER, "lease": renewed}))
            rp = Replanner(source, Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0), cfg, first, no_plan)
            await drive(rp)
            await rp.aclose()
            return list(rp.plans), sum(r.method == "POST" and r.path == "/plan" for r in standin.requests)

    with serve_app_in_thread(standin.app) as target:
        front = ServerThread(SlowAnswers(target, 1.0), name="slow-answers").start()
        try:
            return asyncio.run(go(front.url))
        finally:
            front.stop()


async def tick_until(rp: Replanner, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Tick `rp` every 10 ms until `done()` (AssertionError, with its events, after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, list(rp.events)
        rp.tick()
        await asyncio.sleep(0.01)


def test_a_lease_lapsing_while_its_renewal_is_in_flight_asks_no_second_plan() -> None:
    """The device runs Device-Only once its lease lapses, its renewal in flight. The renewal
    answers the lapse: no further POST /plan follows it."""

    async def drive(rp: Replanner) -> None:
        await tick_until(rp, lambda: rp.current.lease is not None and rp.current.lease.expires_in_s == 30.0)
        landed = time.monotonic()
        await tick_until(rp, lambda: time.monotonic() - landed >= 1.5)  # a second request would go at once

    plans, asked = renewal_in_flight_when_the_lease_lapses(drive)
    assert [p.origin for p in plans] == ["planner", "device-only", "planner"], plans  # lapsed while in flight
    assert asked == 2, asked  # the first plan and its renewal


def test_edge_trouble_reported_while_a_renewal_is_in_flight_still_asks_once_its_lease_lapses_meanwhile() -> None:
    """As above, but the device reports edge trouble just after the renewal is sent, before its
    lease lapses: the lapse must not take the place of that request. The renewal answers the
    lapse, and one more POST /plan follows for the trouble."""

    async def drive(rp: Replanner) -> None:
        await tick_until(rp, lambda: rp.busy)  # the renewal is sent
        assert rp.request("edge trouble")
        await tick_until(rp, lambda: len(rp.plans) >= 4)  # the lapse, the renewal, the trouble's plan

    plans, asked = renewal_in_flight_when_the_lease_lapses(drive)
    assert [p.origin for p in plans] == ["planner", "device-only", "planner", "planner"], plans
    assert asked == 3, asked  # the first plan, its renewal, and the plan the trouble asked for


def test_closing_the_replanner_passes_its_callers_cancellation_on_and_stops_the_replan() -> None:
    """A close waiting for the renewal in flight (it may take 5 s) is itself cancelled, as a
    shutdown's timeout would: the close ends cancelled at once, and the renewal is stopped
    first, not left running."""

    async def drive(rp: Replanner) -> None:
        await tick_until(rp, lambda: rp.busy)  # the renewal is sent
        closing = asyncio.create_task(rp.aclose(wait_s=5.0))
        await asyncio.sleep(0.05)
        closing.cancel()
        t0 = time.monotonic()
        await asyncio.wait({closing}, timeout=3.0)
        assert closing.cancelled(), "the close swallowed its caller's cancellation"
        assert time.monotonic() - t0 < 1.0 and not rp.busy

    renewal_in_flight_when_the_lease_lapses(drive)


# ---- leases the contract allows ----------------------------------------------------------------


LEASE_SCHEMA = json.loads((SCHEMA_DIR / "lease.schema.json").read_text())
SCHEMAS = Registry().with_resources(
    (p.name, Resource.from_contents(json.loads(p.read_text()))) for p in SCHEMA_DIR.glob("*.schema.json")
)


@pytest.mark.parametrize(
    "change",
    [
        {"replan_after_s": 0.0},
        {"device_id": None, "model": None},  # None: the field is left out
        {"expires_in_s": 0.0, "replan_after_s": 0.0},
    ],
)
def test_a_device_starts_on_every_lease_the_schema_allows(change: dict[str, Any]) -> None:
    """A real HTTP server answers POST /plan with a plan whose lease the schema allows but the
    planner never sends (a real planner cannot be made to): the SDK accepts it and the device
    starts with it. With `replan_after_s` 0 the device asks again at once: every `min_replan_s`
    (here 0.1 s), not in a busy loop."""
    lease = {k: v for k, v in {**ANSWER["lease"], **change}.items() if v is not None}
    assert not list(Draft202012Validator(LEASE_SCHEMA, registry=SCHEMAS).iter_errors(lease))
    standin = Standin()
    standin.answer(answer_bytes({**ANSWER, "lease": lease}))

    async def go(url: str) -> tuple[Plan, int]:
        cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6, plan_max_age_s=1e6, min_replan_s=0.1)
        async with AsyncPlannerClient(url) as client:
            source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-7", ready_timeout_s=0.5)
            first = await source.first(COND)
            asked = len(standin.requests)
            rp = Replanner(source, Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0), cfg, first, no_plan)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                rp.tick()
                await asyncio.sleep(0.01)
            await rp.aclose()
            return first, len(standin.requests) - asked

    with serve_app_in_thread(standin.app) as url:
        first, replans = asyncio.run(go(url))
    assert first.lease is not None and first.lease.replan_after_s == lease["replan_after_s"]
    assert first.lease.stored == (lease["expires_in_s"] > 0)
    if lease["replan_after_s"] == 0:
        assert 5 <= replans <= 12, replans  # about 1 s / min_replan_s


def test_a_failed_replan_waits_the_planners_retry_after() -> None:
    """The planner answers the re-plans of a device that must re-plan at once (`replan_after_s`
    0) with 503 and `Retry-After: 4`: the next re-plan waits those 4 s, not the 2 s a failure
    waits by itself, and then asks again."""
    standin = Standin()
    standin.answer(answer_bytes({**ANSWER, "lease": {**ANSWER["lease"], "replan_after_s": 0.0}}))
    busy = {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": "busy"}

    async def go(url: str) -> list[float]:
        cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6, plan_max_age_s=1e6, min_replan_s=0.1)
        async with AsyncPlannerClient(url) as client:
            source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-7", ready_timeout_s=0.5)
            first = await source.first(COND)
            standin.answer(json.dumps(busy), status=503, retry_after="4")
            asked, seen = [], len(standin.requests)
            rp = Replanner(source, Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0), cfg, first, no_plan)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5.0:
                rp.tick()
                await asyncio.sleep(0.01)
                if len(standin.requests) > seen:
                    asked.append(time.monotonic())
                    seen = len(standin.requests)
            await rp.aclose()
            return asked

    with serve_app_in_thread(standin.app) as url:
        asked = asyncio.run(go(url))
    assert len(asked) == 2, asked  # the first re-plan, and one more after the Retry-After
    assert asked[1] - asked[0] >= 3.9, asked


class Outage(ForwardingProxy):
    """Forwards to the planner, or, while `down` is set, answers every request 503 itself (a
    planner outage behind a load balancer). Polled, so any thread may set it."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.down = False

    async def answer(self, scope: dict[str, Any], headers: dict[str, str], body: bytes, response: Any) -> Any:
        if self.down:
            problem = {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": "outage"}
            return 503, {"content-type": "application/problem+json"}, json.dumps(problem).encode()
        return await super().answer(scope, headers, body, response)


def test_a_device_left_device_only_by_an_outage_replans_soon_after_the_planner_is_back(
    planner_prefix: str,
) -> None:
    """A leased device (lease 1 s, renewed every 0.3 s) loses its planner: the renewals fail,
    the lease lapses and the device runs Device-Only (which holds no lease of its own). The
    re-plan the lapse asks for fails too; that failure must not drop the reason, or the device
    would wait for the plan's age (`plan_max_age_s`, 10 s) once the planner is back. It asks
    again after the short quiet time of a failed re-plan."""

    async def go(url: str) -> tuple[float, list[str]]:
        outage = Outage(url)
        front = ServerThread(outage, name="outage")
        await asyncio.to_thread(front.start)
        try:
            async with AsyncPlannerClient(front.url, TOKEN, timeout=5.0) as client:
                await client.put_graph(G)
                cfg = RuntimeConfig(Requirements(frame_rate=10.0), replan_threshold=1e6)  # plan_max_age_s 10
                source = PlannerPlanSource(client, G, cfg.requirements, device_id="cam-outage", worker_wait_s=0.1)
                first = await source.first(COND)
                rp = Replanner(source, Sensing(prior_mbps=COND.bandwidth_mbps, fixed_load=0.0), cfg, first, no_plan)
                outage.down = True
                deadline = time.monotonic() + 8.0
                while not any(e.startswith("re-plan failed (lease expired)") for e in rp.events):
                    assert time.monotonic() < deadline, list(rp.events)
                    rp.tick()
                    await asyncio.sleep(0.05)
                assert rp.in_force().origin == "device-only"
                outage.down = False
                back = time.monotonic()
                while rp.in_force().origin != "planner" and time.monotonic() - back < 8.0:
                    rp.tick()
                    await asyncio.sleep(0.05)
                await rp.aclose()
                return time.monotonic() - back, list(rp.events)
        finally:
            await asyncio.to_thread(front.stop)

    with planner(planner_prefix, lease_ttl_s=1.0, replan_after_s=0.3) as c:
        waited, events = asyncio.run(go(str(c.base_url).rstrip("/")))
    # the retry follows a failed re-plan by min(plan_max_age_s, RETRY_MAX_S) = 2 s; the plan's age would be 10 s
    assert waited < 5.0, (waited, events)


def test_a_reservation_whose_reply_timed_out_may_land_and_the_leaving_device_releases_it(planner_prefix: str) -> None:
    """Redis runs the reservation but its reply is held past `redis_timeout_s`: the planner
    answers `expires_in_s` 0 (not confirmed, counted as `unstored`), and the reservation lands
    all the same. The device releases its lease on leaving whatever `expires_in_s` said, so
    the lease does not outlive it."""

    async def go() -> tuple[Plan, float, int, int]:
        proxy = await RedisProxy().start()
        settings = Settings(
            redis_url=proxy.url,
            key_prefix=planner_prefix,
            api_token=TOKEN,
            worker_url_pattern=ANY_WORKER_URL,
            **{**OUTAGE, "redis_timeout_s": 0.5},
        )
        server = ServerThread(create_app(settings), name="planner-held-reply")
        await asyncio.to_thread(server.start)
        try:
            async with AsyncPlannerClient(server.url, TOKEN, timeout=10.0) as client:
                await client.put_graph(G)
                beat = {"url": "http://edge-held:8000", "models": [G.model], "tier": "gpu", "load": 0.0}
                await client.heartbeat({**beat, "capacity_ms_per_s": 1000.0})
                before = await _unstored(server.url)
                proxy.hold_reply_to(b"cam-held")  # the reservation script names the device
                source = PlannerPlanSource(client, G, Requirements(frame_rate=10.0), device_id="cam-held")
                first = await source.first(COND)
                proxy.release()
                counted = await _unstored(server.url) - before
                landed = await _device_status(client, "cam-held")  # the reservation ran in Redis
                await source.aclose()
                return first, counted, landed, await _device_status(client, "cam-held")
        finally:
            await asyncio.to_thread(server.stop)
            await proxy.close()

    first, counted, landed, after = asyncio.run(go())
    assert first.lease is not None and not first.lease.stored
    assert counted == 1
    assert landed == 200, "the held reservation did not land: the test shows nothing"
    assert after == 404


async def _unstored(url: str) -> float:
    """The planner's `dapdee_planner_admissions_total{result="unstored"}`."""
    async with httpx.AsyncClient(timeout=5.0) as c:
        text = (await c.get(f"{url}/metrics")).text
    return metrics_scrape.value(metrics_scrape.parse(text), "dapdee_planner_admissions_total", result="unstored")


async def _device_status(client: AsyncPlannerClient, device_id: str) -> int:
    """The status of `GET /devices/{device_id}` once the planner's Redis link answers (its
    back-off after the timeout over): 200 with a live lease, 404 without."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            await client.device(device_id)
            return 200
        except ApiError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                return exc.status
        await asyncio.sleep(0.1)
