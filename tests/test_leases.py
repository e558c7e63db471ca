"""Leases in a real Redis (dapdee.planner.leases): atomic admission across replicas, expiry by
Redis's clock, moving between workers, releasing, the lease cap, rebalance application."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from dapdee.planner.config import Settings
from dapdee.planner.keys import Keys
from dapdee.planner.lease_view import LeaseView
from dapdee.planner.leases import Heartbeat, LeaseBook, ReservationView, View
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.redis_link import RedisLink
from dapdee.planner.workers import CapacityBelowLeases, Worker, WorkerRegistry

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"test-leases-{uuid.uuid4().hex[:10]}:v1"
    yield p
    import redis

    r = redis.Redis.from_url(URL)
    keys = list(r.scan_iter(match=f"{p}:*"))
    if keys:
        r.delete(*keys)
    r.close()


async def _books(prefix: str, n: int, ttl_s: float = 30.0, max_leases: int = 1000) -> list[LeaseBook]:
    """`n` lease books on separate Redis links: replicas sharing one Redis (ρ_max 0.9)."""
    books = []
    for _ in range(n):
        link = RedisLink(Settings(redis_url=URL, redis_timeout_s=5.0), PlannerMetrics())
        link.connect()
        books.append(LeaseBook(link, prefix, ttl_s, max_leases, 0.9))
    return books


def _basis(record: dict) -> str:
    """The SHA-1 of what a rebalance solves a lease from, computed here: the compact JSON array
    of the device, model, tier, frame rate, worker and graph hash, the request's pairs sorted
    by key, the plan's exit and its device nodes."""
    plan = record.get("plan") or {}
    inputs = [record.get(k) for k in ("device_id", "model", "device_tier", "frames_per_s", "worker", "graph_hash")]
    inputs += [sorted(record["request"].items()) if "request" in record else None]
    inputs += [(plan.get("exit") or {}).get("name"), plan.get("device_nodes")]
    return hashlib.sha1(json.dumps(inputs, separators=(",", ":")).encode()).hexdigest()


def _tag(record: dict) -> str:
    """The SHA-1 of a record as the planner stores it (compact JSON, its basis first), computed here."""
    text = json.dumps({"basis": _basis(record), **record}, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()


def _lease(fps: float = 10.0, exit_name: str = "exit3", nodes: tuple[str, ...] = ("a", "b"), **more: object) -> dict:
    """A lease record of device d on http://w shaped as the planner writes it."""
    plan = {"exit": {"name": exit_name}, "device_nodes": list(nodes), "predicted_latency_ms": 50.0}
    record = {"device_id": "d", "model": "m", "device_tier": None, "worker": "http://w", "frames_per_s": fps}
    record |= {"graph_hash": "g1"}
    return record | {"request": {"frame_rate": fps, "bandwidth_mbps": 10.0}, "plan": plan} | more


async def _tagged(book: LeaseBook, assignments: dict[str, tuple[float, dict]]) -> dict[str, tuple[float, dict, str]]:
    """`assignments` with the basis of each device's record as Redis holds it now ('' for none)."""
    now = await book.records(list(assignments))
    return {d: (load, rec, now[d].basis if d in now else "") for d, (load, rec) in assignments.items()}


async def _apply(book: LeaseBook, assignments: dict[str, tuple[float, dict]], limit: float = 900.0) -> str:
    """Apply a rebalance of worker http://w over the records Redis holds now; the outcome's status."""
    return (await book.apply("http://w", await _tagged(book, assignments), limit)).status


async def _close(books: list[LeaseBook]) -> None:
    for b in books:
        await b.link.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_lease_of_a_model_the_registry_lacks_is_not_written(prefix: str) -> None:
    """With the model named, a reservation (with or without a view to verify) writes nothing
    while the model is not in the registry hash ("gone": deleted as the request was planned);
    once it is, the same reservation is granted. Without the model named, nothing is checked."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        r = redis.Redis.from_url(URL)
        view = View("", {"http://w": 0.0})
        for v in (None, view):
            got = await book.reserve("a", "http://w", 500.0, 900.0, {"device_id": "a"}, v, model="m")
            assert got.status == "gone"
        assert await book.loads() == {} and await book.devices() == [] and await book.record("a") is None
        r.hset(book.k_models, "m", "hash")
        got = await book.reserve("a", "http://w", 500.0, 900.0, {"device_id": "a"}, view, model="m")
        assert got.status == "reserved" and await book.loads() == {"http://w": {"a": 500.0}}
        assert (await book.reserve("b", None, 0.0, 900.0, {"device_id": "b"}, model="")).status == "reserved"
        r.close()
        await _close([book])

    run(scenario())


def test_admission_refuses_past_the_limit_and_reports_the_others(prefix: str) -> None:
    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        r = await book.reserve("a", "http://w", 500.0, 900.0, {"device_id": "a"})
        assert (r.status, r.others_ms_per_s) == ("reserved", 0.0)
        r = await book.reserve("b", "http://w", 400.0, 900.0, {"device_id": "b"})
        assert (r.status, r.others_ms_per_s) == ("reserved", 500.0)
        r = await book.reserve("c", "http://w", 0.5, 900.0, {"device_id": "c"})
        assert (r.status, r.others_ms_per_s) == ("refused", 900.0)
        # refreshing one's own lease does not count oneself among the others
        r = await book.reserve("a", "http://w", 500.0, 900.0, {"device_id": "a"})
        assert (r.status, r.others_ms_per_s) == ("reserved", 400.0)
        # a Device-Only lease (no worker) is always granted and reserves nothing
        assert (await book.reserve("c", None, 0.0, 900.0, {"device_id": "c"})).status == "reserved"
        assert await book.loads() == {"http://w": {"a": 500.0, "b": 400.0}}
        record, ttl = await book.record("c")  # type: ignore[misc]
        assert record == {"device_id": "c"} and 0 < ttl <= 30
        # a view that is not Redis's: nothing written, the true figures come back
        view = View(_tag({"device_id": "a"}), {"http://w": 0.0, "http://none": 0.0})
        r = await book.reserve("a", "http://w", 450.0, 900.0, {"device_id": "a", "v": 2}, view)
        assert r.status == "stale" and r.figures is not None and r.figures.record is not None
        assert r.figures.record.fields == {"device_id": "a"} and r.figures.record.tag == _tag({"device_id": "a"})
        assert r.figures.loads == {"http://w": {"a": 500.0, "b": 400.0}, "http://none": {}}
        adopted = ReservationView()
        adopted.replace(r.figures.loads)
        assert (adopted.others("http://w", "a"), adopted.others("http://none", "a")) == (400.0, 0.0)
        assert await book.loads() == {"http://w": {"a": 500.0, "b": 400.0}}
        # the view Redis holds: reserved in the same step
        view = View(_tag({"device_id": "a"}), {"http://w": 400.0, "http://none": 0.0})
        r = await book.reserve("a", "http://w", 450.0, 900.0, {"device_id": "a", "v": 2}, view)
        assert (r.status, r.others_ms_per_s, r.tag) == ("reserved", 400.0, _tag({"device_id": "a", "v": 2}))
        assert (await book.record("a"))[0] == {"device_id": "a", "v": 2}  # type: ignore[index]
        assert sorted(await book.devices()) == ["a", "b", "c"]
        assert set(await book.records(["a", "zz"])) == {"a"}
        await _close([book])

    run(scenario())


def test_admission_through_a_verified_view_counts_the_others_on_the_worker_it_verified(prefix: str) -> None:
    """A view Redis holds is verified and admitted in one step: the others' sum read while
    verifying is the one admission adds to (a refusal states it, a device's own reservation is
    never among its others), and a worker the view does not name is read for admission."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        for device, load in (("a", 500.0), ("b", 380.0)):
            assert (await book.reserve(device, "http://w", load, 900.0, {"device_id": device})).status == "reserved"
        assert (await book.reserve("x", "http://v", 70.0, 900.0, {"device_id": "x"})).status == "reserved"
        # 500 + 380 + 30 > 900: refused, the others as verified
        r = await book.reserve("c", "http://w", 30.0, 900.0, {"device_id": "c"}, View("", {"http://w": 880.0}))
        assert (r.status, r.others_ms_per_s) == ("refused", 880.0)
        # b grows by 15 on top of the others (500): 895 <= 900, reserved
        r = await book.reserve(
            "b", "http://w", 395.0, 900.0, {"device_id": "b"}, View(_tag({"device_id": "b"}), {"http://w": 500.0})
        )
        assert (r.status, r.others_ms_per_s) == ("reserved", 500.0)
        # the view names w only; admission on v reads v (70 + 835 > 900: refused)
        r = await book.reserve("c", "http://v", 835.0, 900.0, {"device_id": "c"}, View("", {"http://w": 895.0}))
        assert (r.status, r.others_ms_per_s) == ("refused", 70.0)
        assert await book.loads() == {"http://w": {"a": 500.0, "b": 395.0}, "http://v": {"x": 70.0}}
        await _close([book])

    run(scenario())


def test_fifty_devices_leasing_at_once_from_two_replicas_never_overbook(prefix: str) -> None:
    async def scenario() -> None:
        books = await _books(prefix, 2)
        # each device wants 37 ms/s; 900 / 37 = 24.3, so exactly 24 fit
        results = await asyncio.gather(
            *(books[i % 2].reserve(f"d{i}", "http://w", 37.0, 900.0, {"i": i}) for i in range(50))
        )
        granted = [r for r in results if r.status == "reserved"]
        assert len(granted) == 24
        assert all(r.others_ms_per_s + 37.0 <= 900.0 for r in granted)
        loads = await books[1].loads()
        assert sum(loads["http://w"].values()) == pytest.approx(24 * 37.0)
        await _close(books)

    run(scenario())


def test_leases_expire_by_redis_clock_and_free_their_reservation(prefix: str) -> None:
    async def scenario() -> None:
        (book,) = await _books(prefix, 1, ttl_s=0.3)
        assert (await book.reserve("a", "http://w", 800.0, 900.0, {})).status == "reserved"
        assert (await book.reserve("b", "http://w", 200.0, 900.0, {})).status == "refused"
        await asyncio.sleep(0.5)
        assert await book.record("a") is None
        assert (await book.reserve("b", "http://w", 200.0, 900.0, {})).status == "reserved"
        assert await book.loads() == {"http://w": {"b": 200.0}}
        await _close([book])

    run(scenario())


def test_moving_to_another_worker_frees_the_old_one_and_release_ends_the_lease(prefix: str) -> None:
    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        await book.reserve("a", "http://w1", 300.0, 900.0, {})
        await book.reserve("a", "http://w2", 100.0, 900.0, {})
        loads = await book.loads()
        assert loads.get("http://w1", {}) == {} and loads["http://w2"] == {"a": 100.0}
        assert await book.release("a") is True
        assert await book.release("a") is False
        assert await book.record("a") is None
        assert all(not v for v in (await book.loads()).values())
        await _close([book])

    run(scenario())


def test_ending_a_deleted_models_leases_ends_those_and_only_while_it_is_deleted(prefix: str) -> None:
    """`end_model` ends the leases whose record names the model (the one a rebalance rewrote
    too, an unreadable record is skipped), frees their reservations and keeps the others; while
    the registry holds the model again (created anew), it ends nothing."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        models = f"{prefix}:models"
        await book.reserve("a", "http://w", 100.0, 900.0, {"model": "gone"})
        await book.reserve("b", "http://w", 200.0, 900.0, {"model": "kept"})
        await book.reserve("c", None, 0.0, 900.0, {"model": "gone"})
        assert (await _apply(book, {"a": (150.0, {"model": "gone", "assigned": True})})) == "applied"
        await book.reserve("d", "http://w", 50.0, 900.0, {"model": "gone"})
        raw = redis.Redis.from_url(URL)
        raw.set(book.k_lease("d"), b"{not json", keepttl=True)
        raw.hset(models, "gone", "1")
        assert await book.end_model("gone", models) == []
        raw.hdel(models, "gone")
        assert sorted(await book.end_model("gone", models)) == ["a", "c"]
        assert await book.record("a") is None and await book.record("c") is None
        assert (await book.loads())["http://w"] == {"b": 200.0, "d": 50.0}
        assert sorted(await book.devices()) == ["b", "d"]
        raw.close()
        await _close([book])

    run(scenario())


def test_the_lease_cap_refuses_new_devices_but_refreshes_known_ones(prefix: str) -> None:
    async def scenario() -> None:
        (book,) = await _books(prefix, 1, max_leases=2)
        assert (await book.reserve("a", None, 0.0, 900.0, {})).status == "reserved"
        assert (await book.reserve("b", None, 0.0, 900.0, {})).status == "reserved"
        assert (await book.reserve("c", None, 0.0, 900.0, {})).status == "full"
        assert (await book.reserve("a", "http://w", 10.0, 900.0, {})).status == "reserved"
        assert await book.count() == 2
        await _close([book])

    run(scenario())


def test_a_rebalance_applies_atomically_or_not_at_all(prefix: str) -> None:
    async def scenario() -> None:
        books = await _books(prefix, 2)
        a, b = books
        await a.reserve("d1", "http://w", 400.0, 900.0, {"v": 1})
        await a.reserve("d2", "http://w", 400.0, 900.0, {"v": 1})
        # meanwhile another replica admitted d3
        await b.reserve("d3", "http://w", 100.0, 900.0, {"v": 1})
        # a rebalance computed before d3 wants d1 at 500 and d2 at 350: 500 + 350 + 100 > 900
        assert await _apply(a, {"d1": (500.0, {"v": 2}), "d2": (350.0, {"v": 2})}) == "over"
        assert (await a.record("d1"))[0] == {"v": 1}  # type: ignore[index]
        # d2 to Device-Only makes room: applied, d2 no longer reserves anything there
        assert await _apply(a, {"d1": (500.0, {"v": 2}), "d2": (0.0, {"v": 2})}) == "applied"
        assert await b.loads() == {"http://w": {"d1": 500.0, "d3": 100.0}}
        assert (await b.record("d2"))[0] == {"v": 2}  # type: ignore[index]
        # a Device-Only lease may be brought onto the worker, expiring with its lease
        await b.reserve("d4", None, 0.0, 900.0, {"v": 1})
        assert await _apply(a, {"d4": (100.0, {"v": 2}), "d1": (400.0, {"v": 3})}) == "applied"
        assert await b.loads() == {"http://w": {"d1": 400.0, "d3": 100.0, "d4": 100.0}}
        # a device that left the worker meanwhile refuses the whole rebalance
        await b.reserve("d3", "http://other", 50.0, 900.0, {"v": 1})
        assert await _apply(a, {"d3": (10.0, {"v": 3})}) == "changed"
        await _close(books)

    run(scenario())


def test_a_partial_apply_leaves_a_device_that_changed_as_it_is_and_counts_what_it_reserves(prefix: str) -> None:
    """A rebalance solved d1, d2 and d3 on http://w; meanwhile d2 re-planned (a record of another
    basis, at 300 ms/s) and d3 moved elsewhere. All or nothing refuses; partial applies d1's
    plan, leaves d2's reservation and record as they are (they count with the others': 500 +
    300 fits 900, 700 + 300 does not) and names both it left."""
    first, solved_plan, replanned = _lease(exit_name="exit1"), _lease(exit_name="exit2"), _lease(exit_name="exit3")

    async def scenario() -> None:
        books = await _books(prefix, 2)
        a, b = books
        for d in ("d1", "d2", "d3"):
            await a.reserve(d, "http://w", 200.0, 900.0, first)
        solved = await _tagged(a, {d: (load, solved_plan) for d, load in (("d1", 500.0), ("d2", 100.0), ("d3", 100.0))})
        await b.reserve("d2", "http://w", 300.0, 900.0, replanned)  # re-planned meanwhile
        await b.reserve("d3", "http://other", 50.0, 900.0, replanned)  # moved meanwhile
        assert (await a.apply("http://w", solved, 900.0)).status == "changed"
        too_much = {**solved, "d1": (700.0, solved_plan, solved["d1"][2])}
        over = await a.apply("http://w", too_much, 900.0, partial=True)
        assert over.status == "over" and (await a.record("d1"))[0] == first  # type: ignore[index]
        done = await a.apply("http://w", solved, 900.0, partial=True)
        assert done.status == "applied" and set(done.left) == {"d2", "d3"}
        assert await b.loads() == {"http://w": {"d1": 500.0, "d2": 300.0}, "http://other": {"d3": 50.0}}
        held = [(await b.record(d))[0] for d in ("d1", "d2", "d3")]  # type: ignore[index]
        assert held == [solved_plan, replanned, replanned]
        await _close(books)

    run(scenario())


def test_the_replica_that_applied_a_rebalance_sees_the_leases_it_wrote_as_redis_holds_them(prefix: str) -> None:
    """Five leases of 100 ms/s on http://w; a rebalance solves them (d1 at 500, d4 Device-Only, d5
    a zero-cost edge plan) while d2 re-plans and d3 moves through another replica. After the
    partial apply, the applying replica's view holds each lease it wrote as Redis does: d1 at
    500, d4 on no worker, d5 listed at 0, their records under the tags Redis stores (computed
    here too). The devices the apply left, and an apply refused as over, change nothing in it."""
    first, solved_plan, replanned = _lease(exit_name="exit1"), _lease(exit_name="exit2"), _lease(exit_name="exit3")

    async def no_workers() -> list[Worker]:
        return []

    def seen(view: LeaseView, device: str) -> float:  # what the view has the device reserve on http://w
        return view.others("http://w", None) - view.others("http://w", device)

    async def scenario() -> None:
        books = await _books(prefix, 2)
        a, b = books
        for d in ("d1", "d2", "d3", "d4", "d5"):
            assert (await a.reserve(d, "http://w", 100.0, 900.0, first)).status == "reserved"
        view = LeaseView(a, PlannerMetrics(), no_workers, 60.0, 1000)
        await view.refresh()
        assert view.leased("http://w") == (500.0, 5) and not view.held
        wanted = {"d1": (500.0, solved_plan), "d2": (100.0, solved_plan), "d3": (100.0, solved_plan)}
        solved = await _tagged(a, wanted | {"d4": (0.0, solved_plan | {"worker": None}), "d5": (0.0, solved_plan)})
        await b.reserve("d2", "http://w", 300.0, 900.0, replanned)  # re-planned meanwhile
        await b.reserve("d3", "http://other", 50.0, 900.0, replanned)  # moved meanwhile
        too_much = {**solved, "d1": (800.0, solved_plan, solved["d1"][2])}
        over = await a.apply("http://w", too_much, 900.0, partial=True)
        view.applied("http://w", too_much, over)
        assert over.status == "over" and view.leased("http://w") == (500.0, 5) and not view.held
        done = await a.apply("http://w", solved, 900.0, partial=True)
        assert done.status == "applied" and set(done.left) == {"d2", "d3"}
        view.applied("http://w", solved, done)
        assert (await a.loads())["http://w"] == {"d1": 500.0, "d2": 300.0, "d5": 0.0}
        assert (seen(view, "d1"), seen(view, "d5")) == (500.0, 0.0)
        assert view.leased("http://w") == (700.0, 4)  # d4 left the worker; d2 and d3 as the view had them
        stored = await a.records(["d1", "d4", "d5"])
        assert {d: view.held[d][0] for d in stored} == {d: r.tag for d, r in stored.items()}
        assert view.held["d1"][0] == _tag(solved_plan) and view.held["d4"][0] == _tag(solved_plan | {"worker": None})
        assert "d2" not in view.held and "d3" not in view.held
        await _close(books)

    run(scenario())


def test_reservations_stay_within_the_capacity_the_workers_last_heartbeat_states(prefix: str) -> None:
    """The caller's limit assumes 1000 ms/s; the registry holds the worker's last heartbeat, 100
    ms/s. Admission and rebalances are checked against ρ_max x 100 = 90 and the refusals say
    100; a worker the registry does not hold keeps the caller's limit."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        settings = Settings(redis_url=URL, redis_timeout_s=5.0)
        registry = WorkerRegistry(settings, PlannerMetrics(), book.link, Keys(prefix))
        assert await registry.heartbeat(Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=100.0))
        r = await book.reserve("a", "http://w", 80.0, 900.0, {"v": 1})
        assert (r.status, r.capacity_ms_per_s) == ("reserved", 100.0)
        r = await book.reserve("b", "http://w", 20.0, 900.0, {"v": 1})
        assert (r.status, r.others_ms_per_s, r.capacity_ms_per_s) == ("refused", 80.0, 100.0)
        assert (await book.reserve("b", "http://w", 10.0, 900.0, {"v": 1})).status == "reserved"
        outcome = await book.apply("http://w", await _tagged(book, {"a": (81.0, {"v": 2})}), 900.0)
        assert (outcome.status, outcome.capacity_ms_per_s) == ("over", 100.0)
        assert await book.loads() == {"http://w": {"a": 80.0, "b": 10.0}}
        assert await _apply(book, {"a": (60.0, {"v": 2}), "b": (30.0, {"v": 2})}) == "applied"
        # the caller's own limit still holds where it is the lower one
        assert (await book.reserve("b", "http://w", 31.0, 85.0, {"v": 3})).status == "refused"
        # the worker measures itself faster: the new heartbeat's capacity is what counts
        assert await registry.heartbeat(Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=200.0))
        assert (await book.reserve("b", "http://w", 100.0, 900.0, {"v": 3})).status == "reserved"
        # a worker without a heartbeat in the registry: the caller's limit
        r = await book.reserve("c", "http://unregistered", 500.0, 900.0, {"v": 1})
        assert (r.status, r.capacity_ms_per_s) == ("reserved", None)
        await _close([book])

    run(scenario())


def test_a_capacity_below_the_leases_is_registered_only_with_a_rebalance_that_fits_it(prefix: str) -> None:
    """Two devices reserve 400 ms/s of a 1000 ms/s worker. Checked against ρ_max = 0.9, the
    registry refuses a heartbeat at 300 ms/s (nothing recorded). A rebalance applied with it
    registers both in one step when its loads fit ρ_max x 300 = 270, and neither when they do
    not; it is refused for a worker the registry does not hold, and keeps a heartbeat registered
    after the refusal (newer: 500 ms/s, and the limit is its). Unchecked, a heartbeat is
    recorded whatever the leases book."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        settings = Settings(redis_url=URL, redis_timeout_s=5.0)
        registry = WorkerRegistry(settings, PlannerMetrics(), book.link, Keys(prefix))

        async def registered() -> tuple[float, dict]:
            (w,) = await registry.live()
            return w.capacity_ms_per_s, await book.loads()

        fast = Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=1000.0)
        slow = replace(fast, capacity_ms_per_s=300.0)
        assert await registry.heartbeat(fast, 0.9)
        for d in "ab":
            assert (await book.reserve(d, "http://w", 200.0, 900.0, {"v": 1})).status == "reserved"
        with pytest.raises(CapacityBelowLeases) as refused:
            await registry.heartbeat(slow, 0.9)
        assert await registered() == (1000.0, {"http://w": {"a": 200.0, "b": 200.0}})
        hb = Heartbeat(slow.info_json(), 300.0, registry.ttl_ms, refused.value.refused_at_ms)
        over = await book.apply(
            "http://w", await _tagged(book, {"a": (200.0, {"v": 2}), "b": (100.0, {"v": 2})}), 900.0, hb
        )
        assert (over.status, over.capacity_ms_per_s) == ("over", 300.0)
        assert await registered() == (1000.0, {"http://w": {"a": 200.0, "b": 200.0}})
        fits = await book.apply(
            "http://w", await _tagged(book, {"a": (200.0, {"v": 2}), "b": (0.0, {"v": 2})}), 900.0, hb
        )
        assert fits.status == "applied"
        assert await registered() == (300.0, {"http://w": {"a": 200.0}})
        elsewhere = Heartbeat(replace(slow, url="http://x").info_json(), 300.0, registry.ttl_ms, 0)
        assert (await book.apply("http://x", {}, 900.0, elsewhere)).status == "changed"
        # a heartbeat registered after the refusal is newer: a late apply of the refused one keeps
        # it (a re-solve that outlived the worker's next heartbeat), and its capacity counts
        await asyncio.sleep(0.01)  # a later millisecond of Redis's clock
        assert await registry.heartbeat(replace(fast, capacity_ms_per_s=500.0), 0.9)  # 200 <= 450
        late = await book.apply("http://w", await _tagged(book, {"a": (400.0, {"v": 3})}), 900.0, hb)
        assert (late.status, late.capacity_ms_per_s) == ("applied", 500.0)
        assert await registered() == (500.0, {"http://w": {"a": 400.0}})
        assert await registry.heartbeat(replace(fast, capacity_ms_per_s=10.0))
        assert (await registered())[0] == 10.0
        await _close([book])

    run(scenario())


def test_a_refused_heartbeat_keeps_its_worker_live_and_its_capacity_pending_until_registered(prefix: str) -> None:
    """Two devices reserve 400 ms/s of a 1000 ms/s worker whose heartbeats live 0.6 s. A
    heartbeat at 300 ms/s is refused 0.3 s later; 0.4 s after that (past the registered
    heartbeat's expiry) the worker is still live, registered at 1000 ms/s. Meanwhile the
    capacity refused counts: a device re-planning is booked within ρ_max x 300 (refused, told
    300), and a rebalance solved for 1000 ms/s does not apply. The refused heartbeat's re-solve
    registers it with its leases; after that, rebalances apply again."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        settings = Settings(redis_url=URL, redis_timeout_s=5.0, worker_ttl_s=0.6)
        registry = WorkerRegistry(settings, PlannerMetrics(), book.link, Keys(prefix))
        fast = Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=1000.0)
        slow = replace(fast, capacity_ms_per_s=300.0)
        assert await registry.heartbeat(fast, 0.9)
        for d in "ab":
            assert (await book.reserve(d, "http://w", 200.0, 900.0, {"v": 1})).status == "reserved"
        await asyncio.sleep(0.3)
        with pytest.raises(CapacityBelowLeases) as refused:
            await registry.heartbeat(slow, 0.9)
        await asyncio.sleep(0.4)
        assert [w.capacity_ms_per_s for w in await registry.live()] == [1000.0]
        joining = await book.reserve("c", "http://w", 10.0, 900.0, {"v": 1})
        assert (joining.status, joining.capacity_ms_per_s) == ("refused", 300.0)
        stale = await book.apply("http://w", await _tagged(book, {"a": (300.0, {"v": 2})}), 900.0)
        assert stale.status == "changed"
        hb = Heartbeat(slow.info_json(), 300.0, registry.ttl_ms, refused.value.refused_at_ms)
        resolved = await _tagged(book, {"a": (200.0, {"v": 2}), "b": (0.0, {"v": 2})})
        assert (await book.apply("http://w", resolved, 900.0, hb, partial=True)).status == "applied"
        assert [w.capacity_ms_per_s for w in await registry.live()] == [300.0]
        again = await _tagged(book, {"a": (250.0, {"v": 3})})
        assert (await book.apply("http://w", again, 900.0)).status == "applied"
        assert await book.loads() == {"http://w": {"a": 250.0}}
        await _close([book])

    run(scenario())


def test_a_refused_heartbeat_registered_as_it_is_never_overwrites_a_newer_one(prefix: str) -> None:
    """The fallback when a refused heartbeat's leases cannot be re-solved: the heartbeat is
    registered as it is, but only while its refusal is still the one pending and its worker live.
    A heartbeat registered since (the worker leaving: no models) stays; of two refused in turn,
    the earlier one is not registered and the later one is, and stays live until its arrival +
    TTL; a worker that expired meanwhile is not brought back. Before, the fallback wrote the
    old heartbeat over all three (a departed worker served its model again, a newer capacity
    drop was lost, an expired worker came back for a whole TTL)."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        settings = Settings(redis_url=URL, redis_timeout_s=5.0, worker_ttl_s=0.5)
        registry = WorkerRegistry(settings, PlannerMetrics(), book.link, Keys(prefix))
        fast = Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=1000.0)

        async def refused_at(capacity: float) -> int:
            await asyncio.sleep(0.01)  # a later millisecond of Redis's clock
            with pytest.raises(CapacityBelowLeases) as refused:
                await registry.heartbeat(replace(fast, capacity_ms_per_s=capacity), 0.9)
            return refused.value.refused_at_ms

        assert await registry.heartbeat(fast, 0.9)
        assert (await book.reserve("a", "http://w", 400.0, 900.0, {"v": 1})).status == "reserved"
        at = await refused_at(300.0)
        leaving = replace(fast, models=())
        assert await registry.heartbeat(leaving, 0.9)  # newer: registered, the refusal ends
        assert not await registry.register_refused(replace(fast, capacity_ms_per_s=300.0), at)
        assert [(w.models, w.capacity_ms_per_s) for w in await registry.live()] == [((), 1000.0)]

        first, second = await refused_at(300.0), await refused_at(250.0)
        assert not await registry.register_refused(replace(fast, capacity_ms_per_s=300.0), first)
        assert await registry.register_refused(replace(fast, capacity_ms_per_s=250.0), second)
        (w,) = await registry.live()
        assert w.capacity_ms_per_s == 250.0 and 0.3 < w.expires_in_s <= 0.5

        at = await refused_at(200.0)
        await asyncio.sleep(0.7)  # past the refusal's arrival + TTL: the worker expired
        assert not await registry.register_refused(replace(fast, capacity_ms_per_s=200.0), at)
        assert await registry.live() == []
        await _close([book])

    run(scenario())


def test_of_two_refused_heartbeats_applied_in_either_order_the_later_ones_capacity_stays(prefix: str) -> None:
    """Two heartbeats of one worker are refused in turn (300, then 250 ms/s, below what its
    leases book), as two replicas would each take one. Each replica's re-solve is applied with
    its heartbeat: whichever order the applies come in, the later heartbeat's capacity is the
    one registered at the end (the earlier one, applied last, must not bring back its own)."""

    async def scenario(later_first: bool) -> None:
        (book,) = await _books(f"{prefix}:{later_first}", 1)
        registry = WorkerRegistry(
            Settings(redis_url=URL, redis_timeout_s=5.0), PlannerMetrics(), book.link, Keys(f"{prefix}:{later_first}")
        )
        fast = Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=1000.0)
        assert await registry.heartbeat(fast, 0.9)
        assert (await book.reserve("a", "http://w", 400.0, 900.0, {"v": 1})).status == "reserved"
        beats = []
        for capacity in (300.0, 250.0):
            await asyncio.sleep(0.01)  # a later millisecond of Redis's clock
            with pytest.raises(CapacityBelowLeases) as refused:
                await registry.heartbeat(replace(fast, capacity_ms_per_s=capacity), 0.9)
            info = replace(fast, capacity_ms_per_s=capacity).info_json()
            beats.append(Heartbeat(info, capacity, registry.ttl_ms, refused.value.refused_at_ms))
        for version, hb in enumerate(reversed(beats) if later_first else beats, start=2):
            await asyncio.sleep(0.01)
            outcome = await book.apply("http://w", await _tagged(book, {"a": (100.0, {"v": version})}), 900.0, hb)
            assert outcome.status == "applied", outcome
        (w,) = await registry.live()
        assert w.capacity_ms_per_s == 250.0
        await _close([book])

    run(scenario(later_first=False))
    run(scenario(later_first=True))


def test_a_view_names_the_record_redis_holds_and_a_rebalance_its_basis(prefix: str) -> None:
    """A record is known by its tag (SHA-1 of the stored text) and its basis (SHA-1 of what a
    rebalance solves it from), both computed here independently. A replica planning from another
    record than Redis's gets "stale" with Redis's record. A rebalance computed from a record its
    device replaced meanwhile (a new frame rate, another plan, a move to Device-Only) is refused
    as a whole and writes nothing; one whose device only re-priced the same plan applies.
    Expiry takes the record along."""

    async def scenario() -> None:
        a, b = await _books(prefix, 2, ttl_s=1.0)
        first = _lease()
        assert (await a.reserve("d", "http://w", 100.0, 900.0, first)).tag == _tag(first)
        assert (await a.records(["d"]))["d"].basis == _basis(first)
        assigned = _lease(exit_name="exit4", assigned=True)
        assert await _apply(a, {"d": (200.0, assigned)}) == "applied"
        # replica b still plans from the record it wrote before the rebalance
        r = await b.reserve("d", "http://w", 100.0, 900.0, _lease(11.0), View(_tag(first), {"http://w": 0.0}))
        assert r.status == "stale" and r.figures is not None and r.figures.record is not None
        assert (r.figures.record.fields, r.figures.record.tag) == (assigned, _tag(assigned))
        assert r.figures.loads == {"http://w": {"d": 200.0}}
        again = _lease(exit_name="exit4", assigned=True, v=3)
        assert (await b.reserve("d", "http://w", 200.0, 900.0, again, View(_tag(assigned), {}))).status == "reserved"
        # a rebalance read that record; meanwhile the device re-plans the same plan at another
        # price: the solve's inputs are unchanged, so the apply goes through
        read = await a.records(["d"])
        repriced = again | {"plan": again["plan"] | {"predicted_latency_ms": 61.0}, "edge_ms_per_frame": 9.0}
        assert (await b.reserve("d", "http://w", 210.0, 900.0, repriced)).status == "reserved"
        assert _tag(repriced) != read["d"].tag and _basis(repriced) == read["d"].basis
        assert (
            await a.apply("http://w", {"d": (190.0, _lease(exit_name="exit2"), read["d"].basis)}, 900.0)
        ).status == "applied"
        assert await a.loads() == {"http://w": {"d": 190.0}}
        # ... but not once it asks for 30 frames/s, takes another plan, is planned on another
        # graph (a new version, new timings), or moves to Device-Only
        for replaced, worker, load in (
            (_lease(30.0, exit_name="exit2"), "http://w", 600.0),
            (_lease(exit_name="exit1"), "http://w", 150.0),
            (_lease(exit_name="exit1", graph_hash="g2"), "http://w", 150.0),
            (_lease(exit_name="exit2", worker=None), None, 0.0),
        ):
            read = await a.records(["d"])
            assert (await b.reserve("d", worker, load, 900.0, replaced)).status == "reserved"
            stale = {"d": (50.0, _lease(exit_name="exit3"), read["d"].basis)}
            assert (await a.apply("http://w", stale, 900.0)).status == "changed"
            assert (await a.loads()).get("http://w", {}) == ({"d": load} if load else {})
            assert (await a.record("d"))[0] == replaced  # type: ignore[index]
        # the lease expires: no record, so no tag; a view naming the old one is stale
        await asyncio.sleep(1.2)
        r = await a.reserve("d", None, 0.0, 900.0, {}, View(_tag(_lease(worker=None)), {}))
        assert r.status == "stale" and r.figures is not None and r.figures.record is None
        assert (await a.reserve("d", None, 0.0, 900.0, {}, View("", {}))).status == "reserved"
        await _close([a, b])

    run(scenario())


def test_a_lease_record_expires_with_its_reservation_and_an_apply_checks_before_it_writes(prefix: str) -> None:
    """The record and its entry in the lease index expire at the same instant, after a reserve and
    after an apply (never a record without expiry). An apply naming a device whose index entry is
    gone while its record is still readable (the instant they expire) is refused before it
    writes anything: earlier devices in the same apply are not written either."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        raw = redis.Redis.from_url(URL)
        for d in ("d1", "d2"):
            assert (await book.reserve(d, "http://w", 100.0, 900.0, {"v": 1})).status == "reserved"

        def same_expiry(d: str) -> bool:
            return raw.pexpiretime(f"{prefix}:lease:{d}") == int(raw.zscore(f"{prefix}:leases", d))

        assert same_expiry("d1") and same_expiry("d2")
        assert await _apply(book, {"d1": (150.0, {"v": 2})}) == "applied"
        assert same_expiry("d1") and raw.pexpiretime(f"{prefix}:lease:d1") > 0
        tagged = await _tagged(book, {"d1": (300.0, {"v": 3}), "d2": (300.0, {"v": 3})})
        raw.zrem(f"{prefix}:leases", "d2")  # the index entry is purged a moment before the record
        assert (await book.apply("http://w", tagged, 900.0)).status == "changed"
        assert await book.loads() == {"http://w": {"d1": 150.0, "d2": 100.0}}
        assert (await book.record("d1"))[0] == {"v": 2}  # type: ignore[index]
        raw.close()
        await _close([book])

    run(scenario())


def test_limits_allow_for_float_summation_order_and_refusals_state_the_exact_others(prefix: str) -> None:
    """0.1 + 0.2 + 0.3 is 0.6000000000000001 in floating point (0.3 + 0.2 + 0.1 is 0.6): within a
    0.6 limit up to the summation order, so admitted; anything really over it is refused. A refusal states the
    others' reservations to the last bit (the caller plans again against that figure)."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        for d, load in (("a", 0.1), ("b", 0.2)):
            assert (await book.reserve(d, "http://w", load, 0.6, {})).status == "reserved"
        assert 0.1 + 0.2 + 0.3 > 0.6 and 0.2 + 0.1 + 0.3 > 0.6
        assert (await book.reserve("c", "http://w", 0.3 + 1e-6, 0.6, {})).status == "refused"
        assert (await book.reserve("c", "http://w", 0.3, 0.6, {})).status == "reserved"
        odd = 123.45678901234432
        assert (await book.reserve("e", "http://x", odd, 900.0, {})).status == "reserved"
        r = await book.reserve("f", "http://x", 900.0, 900.0, {})
        assert (r.status, r.others_ms_per_s) == ("refused", odd)
        await _close([book])

    run(scenario())


async def _others_seen(book: LeaseBook, worker: str) -> float:
    """What admission on `worker` counts as the others' reservations: a device holding no lease
    asks for more than any limit and is refused with that figure (nothing is written)."""
    res = await book.reserve("probe", worker, 1e12, 1e9, {})
    assert res.status == "refused"
    return res.others_ms_per_s


def test_admission_counts_exactly_what_the_reservations_book_after_any_writes(prefix: str) -> None:
    """Random reserves, moves, Device-Only leases, releases, rebalances and expiries on two
    workers, checked after each step against a dict of the reservations kept here: the others'
    figure admission uses on each worker (the total Redis keeps beside the reservations) is
    their sum, and the reservations read back are that dict."""
    rng = random.Random(11)
    workers, devices = ["http://w1", "http://w2"], [f"d{i}" for i in range(8)]

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        (brief,) = await _books(prefix, 1, ttl_s=0.25)  # leases that expire mid-run, by Redis's clock
        truth: dict[str, dict[str, float]] = {w: {} for w in workers}
        short: set[str] = set()
        for step in range(240):
            d, w, op = rng.choice(devices), rng.choice(workers), rng.random()
            load = rng.choice([0.0, rng.uniform(0.1, 120.0)])
            if step == 160:
                await asyncio.sleep(0.4)
                for per in truth.values():
                    for gone in short & set(per):
                        del per[gone]
                short.clear()
            if op < 0.5:
                via = brief if step < 120 and rng.random() < 0.3 else book
                target = rng.choice([w, None])
                assert (await via.reserve(d, target, load, 1e9, {"v": step})).status == "reserved"
                for per in truth.values():
                    per.pop(d, None)
                if target is not None and load > 0:
                    truth[target][d] = load
                (short.add if via is brief else short.discard)(d)
            elif op < 0.65:
                await book.release(d)
                for per in truth.values():
                    per.pop(d, None)
            else:
                mine = [x for x in truth[w] if x not in short]
                picked = {x: (rng.choice([0.0, rng.uniform(0.1, 120.0)]), {"v": -step}) for x in mine[:3]}
                assert (await book.apply(w, await _tagged(book, picked), 1e9)).status == "applied"
                for x, (new, _) in picked.items():
                    truth[w].pop(x, None)
                    if new > 0:
                        truth[w][x] = new
            for url in workers:
                assert await _others_seen(book, url) == pytest.approx(sum(truth[url].values()), abs=1e-9)
            assert {u: v for u, v in (await book.loads()).items() if v} == {u: v for u, v in truth.items() if v}
        await _close([book, brief])

    run(scenario())


def test_a_workers_kept_total_is_summed_from_its_reservations_again_after_many_writes(prefix: str) -> None:
    """The total kept beside a worker's reservations is only a running sum: after enough
    writes it is summed from the reservations again, so a total gone wrong in Redis (written
    here) heals within that many writes, and one that is lost is summed at the next read. A
    reservation that expired leaves it, also when the worker's heartbeat (which reads that
    worker's reservations only) is what finds it expired."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        (brief,) = await _books(prefix, 1, ttl_s=0.25)
        registry = WorkerRegistry(Settings(redis_url=URL), PlannerMetrics(), book.link, Keys(prefix))
        r = redis.Redis.from_url(URL)
        worker = Worker("http://w", ("m",), "t", 0.0, 0, 0, capacity_ms_per_s=1000.0)
        assert await registry.heartbeat(worker, rho_max=0.9)
        for d, load in (("a", 100.0), ("b", 50.0)):
            assert (await book.reserve(d, "http://w", load, 900.0, {})).status == "reserved"
        assert (await brief.reserve("c", "http://w", 200.0, 900.0, {})).status == "reserved"
        assert await _others_seen(book, "http://w") == 350.0
        await asyncio.sleep(0.4)
        assert await registry.heartbeat(worker, rho_max=0.9)
        assert await _others_seen(book, "http://w") == 150.0
        total_key = f"{prefix}:wsum:http://w"
        r.delete(total_key)
        assert await _others_seen(book, "http://w") == 150.0
        r.hset(total_key, mapping={"total": "7", "writes": "5"})
        assert await _others_seen(book, "http://w") == 7.0  # the running sum is what admission reads
        writes, load = 5, 100.0
        while await _others_seen(book, "http://w") != 50.0 + load:
            load = 100.5 if load == 100.0 else 100.0  # a renewal at another load updates the total
            assert (await book.reserve("a", "http://w", load, 900.0, {})).status == "reserved"
            writes += 1
            assert writes <= 1000
        assert writes == 1000
        for d in ("a", "b", "probe"):
            await book.release(d)
        assert await _others_seen(book, "http://w") == 0.0
        assert not r.exists(total_key)  # a worker left without reservations keeps no total
        r.close()
        await _close([book, brief])

    run(scenario())


def test_the_reservation_view_matches_summing_over_every_device() -> None:
    rng = random.Random(7)
    view = ReservationView()
    truth: dict[str, dict[str, float]] = {}
    workers, devices = ["http://a", "http://b", "http://c"], [f"d{i}" for i in range(12)]
    for step in range(400):
        if step % 97 == 0:  # a refresh replaces the whole view, an adopted answer some workers
            truth = {w: {d: rng.uniform(0, 50) for d in rng.sample(devices, 4)} for w in workers}
            view.replace(truth, every=True)
        elif step % 31 == 0:
            truth["http://b"] = {d: rng.uniform(0, 50) for d in rng.sample(devices, 3)}
            view.replace({"http://b": truth["http://b"]})
        d, w = rng.choice(devices), rng.choice([*workers, None])
        load = rng.choice([0.0, rng.uniform(0, 80)])
        for per in truth.values():
            per.pop(d, None)
        if w is not None and load > 0:
            truth.setdefault(w, {})[d] = load
        view.set(d, w, load)
        for url in [*workers, "http://none"]:
            per = truth.get(url, {})
            for who in (*devices, None):
                want = sum(v for k, v in per.items() if k != who)
                assert view.others(url, who) == pytest.approx(want, abs=1e-9)
            assert view.leased(url)[1] == len(per)


def test_the_view_keeps_the_records_of_devices_that_renew_when_expired_ones_fill_it(prefix: str) -> None:
    """Past `max_leases` records, the view drops the one remembered longest ago: a device that
    renews keeps its record (and plans without a read), where clearing every record at the cap
    sent each live device back through a read and a stale re-plan."""
    from dapdee.planner.lease_view import LeaseView

    async def no_workers() -> list[Worker]:
        return []

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        view = LeaseView(book, PlannerMetrics(), no_workers, refresh_s=1.0, max_leases=4)
        for i in range(4):
            view.remember(f"d{i}", _lease(), f"tag{i}")
        view.remember("d0", _lease(fps=5.0), "tag0b")  # d0 renews
        view.remember("d4", _lease(), "tag4")  # d1 is now the oldest: it goes
        assert list(view.held) == ["d2", "d3", "d0", "d4"]
        assert view.as_seen("d0", [])[0].tag == "tag0b" and view.as_seen("d1", [])[1] is None
        await _close([book])

    run(scenario())


def test_a_whole_view_read_keeps_the_reservations_made_while_it_was_in_flight() -> None:
    """A refresh's answer may have been read by Redis before a reservation this replica made
    while waiting for it: `replace` with the read's mark makes those `set`s again on top, so
    the view does not forget them until the next refresh; a `set` with no read in flight is
    not kept, and a read that ended leaves nothing to replay."""
    view = ReservationView()
    view.set("a", "http://w", 42.0)
    mark = view.read_started()
    view.set("b", "http://w", 42.0)  # reserved while the read was in flight
    view.replace({"http://w": {"a": 42.0}}, every=True, mark=mark)  # read before b's reservation
    view.read_ended(mark)
    assert view.leased("http://w") == (84.0, 2)
    view.replace({"http://w": {"a": 42.0}}, every=True)  # the next refresh: b's lease ended
    assert view.leased("http://w") == (42.0, 1)
    mark = view.read_started()
    view.set("a", None, 0.0)  # released while a read was in flight
    view.replace({"http://w": {"a": 42.0}, "http://v": {"c": 5.0}}, every=True, mark=mark)
    view.read_ended(mark)
    assert view.leased("http://w") == (0.0, 0) and view.leased("http://v") == (5.0, 1)


def test_a_registry_sync_keeps_a_heartbeat_noted_while_it_read(prefix: str) -> None:
    """A heartbeat noted while a sync's read is in flight is kept over the copy in the read's
    answer, which Redis may have read before it (a worker that just began serving a model was
    forgotten until the next sync, and a device planning that model got no worker)."""

    async def scenario() -> None:
        (book,) = await _books(prefix, 1)
        settings = Settings(redis_url=URL, redis_timeout_s=5.0)
        registry = WorkerRegistry(settings, PlannerMetrics(), book.link, Keys(prefix))
        old = Worker("http://w", ("m1",), "t", 0.0, 0, 0, capacity_ms_per_s=1000.0)
        assert await registry.heartbeat(old)
        syncing = asyncio.create_task(registry.sync())
        await asyncio.sleep(0)  # the sync has sent its read
        registry.noted(replace(old, models=("m1", "m2")), shared=True)  # registered meanwhile
        await syncing
        assert [w.url for w in registry.serving("m2")] == ["http://w"]
        await registry.sync()  # a sync that began after it: Redis's copy (old here) holds
        assert registry.serving("m2") == []
        await _close([book])

    run(scenario())
