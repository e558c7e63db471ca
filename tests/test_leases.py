"""Leases in a real Redis (dapdee.planner.leases): atomic admission across replicas, expiry by
Redis's clock, moving between workers, releasing, the lease cap, rebalance application."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from dapdee.planner.config import Settings
from dapdee.planner.leases import LeaseBook
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.redis_link import RedisLink

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
    """`n` lease books on separate Redis links: replicas sharing one Redis."""
    books = []
    for _ in range(n):
        link = RedisLink(Settings(redis_url=URL, redis_timeout_s=5.0), PlannerMetrics())
        link.connect()
        books.append(LeaseBook(link, prefix, ttl_s, max_leases))
    return books


async def _close(books: list[LeaseBook]) -> None:
    for b in books:
        await b.link.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


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
        record, others = await book.read("a", ["http://w", "http://none"])
        assert record == {"device_id": "a"} and others == {"http://w": 400.0, "http://none": 0.0}
        assert sorted(await book.devices()) == ["a", "b", "c"]
        assert set(await book.records(["a", "zz"])) == {"a"}
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
        assert not await a.apply("http://w", {"d1": (500.0, {"v": 2}), "d2": (350.0, {"v": 2})}, 900.0)
        assert (await a.record("d1"))[0] == {"v": 1}  # type: ignore[index]
        # d2 to Device-Only makes room: applied, d2 no longer reserves anything there
        assert await a.apply("http://w", {"d1": (500.0, {"v": 2}), "d2": (0.0, {"v": 2})}, 900.0)
        assert await b.loads() == {"http://w": {"d1": 500.0, "d3": 100.0}}
        assert (await b.record("d2"))[0] == {"v": 2}  # type: ignore[index]
        # a Device-Only lease may be brought onto the worker, expiring with its lease
        await b.reserve("d4", None, 0.0, 900.0, {"v": 1})
        assert await a.apply("http://w", {"d4": (100.0, {"v": 2}), "d1": (400.0, {"v": 3})}, 900.0)
        assert await b.loads() == {"http://w": {"d1": 400.0, "d3": 100.0, "d4": 100.0}}
        # a device that left the worker meanwhile refuses the whole rebalance
        await b.reserve("d3", "http://other", 50.0, 900.0, {"v": 1})
        assert not await a.apply("http://w", {"d3": (10.0, {"v": 3})}, 900.0)
        await _close(books)

    run(scenario())
