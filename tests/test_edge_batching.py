"""The edge worker's dynamic batcher under load, with a real torch model: the gated test model
(`tests.edge_models:gated`) holds the one pool thread at its gate, so the test decides when the
thread frees up without any timing assumption about the compute itself."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import httpx
import pytest
import torch

from dapdee import wire
from dapdee.edge_worker.app import _worker_state, create_app
from dapdee.edge_worker.batching import STARVE_MS, Batcher, BatchResult, Expired
from dapdee.edge_worker.config import Settings
from dapdee.models import LoadedModel, load_model
from dapdee.testing import serve_app_in_thread
from dapdee.web import scrape
from dapdee.web.settings_load import load_settings
from tests import edge_models

WAIT_MS = 5.0
ARRIVAL_S = 3 * WAIT_MS / 1000.0  # each request arrives after the open batch's wait is over


@pytest.fixture(scope="module")
def gated() -> LoadedModel:
    return load_model("tests.edge_models:gated", input_shape=(1, 8))


async def _while_busy(m: LoadedModel, batch_max: int, wait_ms: float, n: int) -> tuple[list[BatchResult], int]:
    """Submit request 0, hold it at the gate on the only pool thread, then submit requests
    1..n-1 one by one, `ARRIVAL_S` apart; open the gate once all have arrived. Each caller's
    result, and the batches still open just before the gate opened."""
    batcher = Batcher(batch_max, wait_ms, max_rows=64, workers=1)
    key = (m.name, frozenset({m.input_name}), "final")
    target = m.exit_node()

    def submit(i: int) -> asyncio.Task[BatchResult]:
        x = torch.full((1, 8), float(i))
        return asyncio.create_task(batcher.submit(key, m.executor, target, {m.input_name: x}))

    edge_models.ENTERED.clear()
    edge_models.GATE.clear()
    try:
        tasks = [submit(0)]
        assert await asyncio.to_thread(edge_models.ENTERED.wait, 30.0)  # request 0 holds the thread
        for i in range(1, n):
            await asyncio.sleep(ARRIVAL_S)  # timers run in deadline order: the open batch is due by now
            tasks.append(submit(i))
        await asyncio.sleep(ARRIVAL_S)
        open_batches = batcher.stats()["open_batches"]
    finally:
        edge_models.GATE.set()
    try:
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 30.0)), open_batches
    finally:
        batcher.close()


@pytest.mark.parametrize(
    ("batch_max", "wait_ms", "sizes", "still_open"),
    [
        (8, WAIT_MS, [1, 4, 4, 4, 4], 1),  # due, no thread free: one batch keeps filling
        (3, WAIT_MS, [1, 3, 3, 3, 1], 1),  # a full batch runs at once (queued); the next one fills
        (8, 0.0, [1, 1, 1, 1, 1], 0),  # no wait configured: every request runs as it arrives
    ],
)
def test_a_due_batch_keeps_filling_until_a_thread_frees_up(
    gated: LoadedModel, batch_max: int, wait_ms: float, sizes: list[int], still_open: int
) -> None:
    """While the only pool thread is busy, requests arriving after a batch's wait is over join
    that batch (up to `batch_max` requests) instead of each arrival dispatching it, so batches
    grow with load; every caller still gets its own rows back."""
    results, open_batches = asyncio.run(_while_busy(gated, batch_max, wait_ms, len(sizes)))
    assert [r.batch_size for r in results] == sizes
    assert open_batches == still_open
    for i, r in enumerate(results):
        assert isinstance(r.output, torch.Tensor)
        assert torch.allclose(r.output, gated.run_exit(torch.full((1, 8), float(i))), atol=1e-6), i


def test_the_queue_depth_counts_the_requests_waiting_for_a_batch(gated: LoadedModel) -> None:
    """Request 0 fills a batch by rows, so request 1 sends it to the only thread (held there at
    the gate) and waits in the next batch, with requests 2 and 3. The queue depth a heartbeat
    reports is the requests waiting: 1, then 3; not the one running (it is counted in flight
    already), and none once the batcher has closed."""
    batcher = Batcher(8, 10_000.0, max_rows=4, workers=1)  # the wait never ends a batch here
    key = (gated.name, frozenset({gated.input_name}), "final")

    async def go() -> list[int]:
        def submit(i: int, rows: int = 1) -> asyncio.Task[BatchResult]:
            x = torch.full((rows, 8), float(i))
            return asyncio.create_task(batcher.submit(key, gated.executor, gated.exit_node(), {gated.input_name: x}))

        edge_models.ENTERED.clear()
        edge_models.GATE.clear()
        try:
            first = submit(0, rows=4)
            await asyncio.sleep(0)
            rest = [submit(1)]
            assert await asyncio.to_thread(edge_models.ENTERED.wait, 30.0)  # request 0 holds the thread
            depths = [batcher.stats()["queue_depth"]]
            rest += [submit(2), submit(3)]
            await asyncio.sleep(0.05)
            depths.append(batcher.stats()["queue_depth"])
        finally:
            edge_models.GATE.set()
        await asyncio.wait_for(first, 30.0)
        await batcher.aclose()  # fails the open batch, which would wait 10 s
        await asyncio.gather(*rest, return_exceptions=True)
        return [*depths, batcher.stats()["queue_depth"]]

    assert asyncio.run(go()) == [1, 3, 0]


def test_closing_fails_the_open_batches_on_the_event_loop() -> None:
    """Closing with requests waiting in an open batch fails each of them at once with "worker is
    shutting down", on the event loop: under asyncio's debug mode, which refuses a future
    resolved from another thread, nothing else is raised."""
    m = load_model("tests.edge_models:squares", input_shape=(1, 8))
    batcher = Batcher(8, 10_000.0, max_rows=64, workers=1)
    key = (m.name, frozenset({m.input_name}), "final")

    async def go() -> list[BaseException | BatchResult]:
        jobs = [
            asyncio.create_task(batcher.submit(key, m.executor, m.exit_node(), {m.input_name: torch.randn(1, 8)}))
            for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(batcher.aclose(), 10.0)
        return await asyncio.wait_for(asyncio.gather(*jobs, return_exceptions=True), 1.0)

    got = asyncio.run(go(), debug=True)
    assert all(isinstance(g, RuntimeError) and "shutting down" in str(g) for g in got), got


@pytest.mark.parametrize(
    ("starve_ms", "order"),
    [
        (10_000.0, [1, 2, 2, 1]),  # the rare batch has not waited long: full batches first
        (20.0, [1, 1, 2, 2]),  # it has waited past the bound (>= 30 ms here): it runs first
    ],
)
def test_full_batches_run_first_until_a_due_batch_has_waited_the_starvation_bound(
    gated: LoadedModel, starve_ms: float, order: list[int]
) -> None:
    """While request 0 holds the only thread, one request of a rarely used key (another exit)
    becomes due, then four requests of the busy key fill two batches of `batch_max` 2. When the
    thread frees up it takes full batches first (the worker's most efficient work), unless the
    rare batch's request has waited `starve_ms`: then that one first (a full batch used to go
    to the pool's queue at once, so under a steady stream of them the rare request waited for
    as long as the stream lasted). Meanwhile the queue depth a heartbeat reports counts all five
    waiting requests, the full batches' included."""
    started: list[int] = []  # batch sizes, in the order the only thread ran them
    batcher = Batcher(
        2, WAIT_MS, max_rows=64, workers=1, on_batch=lambda _m, size, _s: started.append(size), starve_ms=starve_ms
    )
    busy = (gated.name, frozenset({gated.input_name}), "final")
    rare = (gated.name, frozenset({gated.input_name}), "exit1")

    async def go() -> tuple[int, list[BatchResult]]:
        def submit(key: tuple[str, frozenset[str], str], i: int) -> asyncio.Task[BatchResult]:
            x = torch.full((1, 8), float(i))
            return asyncio.create_task(batcher.submit(key, gated.executor, gated.exit_node(), {gated.input_name: x}))

        edge_models.ENTERED.clear()
        edge_models.GATE.clear()
        try:
            tasks = [submit(busy, 0)]
            assert await asyncio.to_thread(edge_models.ENTERED.wait, 30.0)  # request 0 holds the thread
            tasks.append(submit(rare, 1))
            await asyncio.sleep(ARRIVAL_S)  # the rare batch is due by now, the thread still busy
            tasks += [submit(busy, i) for i in range(2, 6)]
            await asyncio.sleep(ARRIVAL_S)
            depth = batcher.stats()["queue_depth"]
        finally:
            edge_models.GATE.set()
        try:
            return depth, list(await asyncio.wait_for(asyncio.gather(*tasks), 30.0))
        finally:
            await batcher.aclose()

    depth, results = asyncio.run(go())
    assert depth == 5
    assert started == order
    assert [r.batch_size for r in results] == [1, 1, 2, 2, 2, 2]


def test_the_starvation_bound_is_the_workers_batch_starve_ms_setting() -> None:
    """The worker's `batch_starve_ms` setting (DAPDEE_EDGE_BATCH_STARVE_MS) is the bound of the
    batcher it builds (the ordering the bound decides is the test above); a bound of 0 is refused
    naming the setting."""
    for value, want_s in ((20.0, 0.020), (None, STARVE_MS / 1000)):
        settings = load_settings(Settings, "edge settings", **({} if value is None else {"batch_starve_ms": value}))
        state = _worker_state(settings, {})
        try:
            assert state.batcher.starve_s == pytest.approx(want_s)
        finally:
            asyncio.run(state.batcher.aclose())
    with pytest.raises(ValueError, match="batch_starve_ms"):
        load_settings(Settings, "edge settings", batch_starve_ms=0.0)


def test_a_request_past_its_deadline_or_given_up_is_left_out_of_its_batch(gated: LoadedModel) -> None:
    """While request 0 holds the only thread at the gate, requests 1-3 wait in one batch: 1's
    deadline passes meanwhile, 3's caller gives up (its task is cancelled), 2 has no deadline.
    When the thread frees up, 1 fails with Expired, the batch runs with request 2 alone (batch
    size 1, its own values) and nothing is left queued."""
    batcher = Batcher(8, WAIT_MS, max_rows=64, workers=1)
    key = (gated.name, frozenset({gated.input_name}), "final")

    async def go() -> tuple[list[BaseException | BatchResult], int]:
        def submit(i: int, deadline: float = math.inf) -> asyncio.Task[BatchResult]:
            x = {gated.input_name: torch.full((1, 8), float(i))}
            return asyncio.create_task(batcher.submit(key, gated.executor, gated.exit_node(), x, deadline))

        edge_models.ENTERED.clear()
        edge_models.GATE.clear()
        try:
            first = submit(0)
            assert await asyncio.to_thread(edge_models.ENTERED.wait, 30.0)
            late, kept, gone = submit(1, time.perf_counter() + 0.02), submit(2), submit(3)
            await asyncio.sleep(0.1)  # past request 1's deadline, and the batch's wait
            gone.cancel()
        finally:
            edge_models.GATE.set()
        await asyncio.wait_for(first, 30.0)
        got = await asyncio.wait_for(asyncio.gather(late, kept, gone, return_exceptions=True), 30.0)
        depth = batcher.stats()["queue_depth"]
        batcher.close()
        return got, depth

    (late, kept, gone), depth = asyncio.run(go())
    assert isinstance(late, Expired) and "not started within its timeout" in str(late), late
    assert isinstance(kept, BatchResult) and kept.batch_size == 1 and kept.batch_rows == 1
    assert isinstance(kept.output, torch.Tensor)
    assert torch.allclose(kept.output, gated.run_exit(torch.full((1, 8), 2.0)), atol=1e-6)
    assert isinstance(gone, asyncio.CancelledError)
    assert depth == 0


def test_a_request_queued_past_its_timeout_parameter_is_answered_503_and_not_computed(gated: LoadedModel) -> None:
    """Over HTTP, one compute thread, every request a batch alone: A holds the thread at the
    gate; B (parameter `timeout` 20 ms) and C (60 s) queue behind it. Once the gate opens, B
    is answered 503 naming `timeout`, without Retry-After (the worker is up), never computed
    (two batches ran, A's and C's, both answered 200) and counted as expired, its wait in the
    queue-time histogram with the others'. A timeout that is not an
    integer in [0, 2**63 - 1] is a 400 naming it; 0 is none."""
    settings = Settings(models="", batch_max=1, workers=1)
    with serve_app_in_thread(create_app(settings, [gated])) as url, httpx.Client(base_url=url, timeout=60) as client:

        def infer(timeout: object | None) -> httpx.Response:
            params = {} if timeout is None else {"timeout": timeout}
            body, headers = wire.encode_request({"x": torch.randn(1, 8)}, parameters=params)
            return client.post("/v2/models/gated/infer", content=body, headers=headers)

        answers: dict[str, httpx.Response] = {}

        def send(name: str, timeout: int | None) -> threading.Thread:
            t = threading.Thread(target=lambda: answers.__setitem__(name, infer(timeout)))
            t.start()
            return t

        edge_models.ENTERED.clear()
        edge_models.GATE.clear()
        try:
            threads = [send("A", None)]
            assert edge_models.ENTERED.wait(30)
            threads += [send("B", 20_000), send("C", 60_000_000)]
            deadline = time.monotonic() + 30
            while scrape.total(scrape.parse(client.get("/metrics").text), "dapdee_edge_inflight_requests") < 3:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)  # past B's timeout
        finally:
            edge_models.GATE.set()
        for t in threads:
            t.join(30)
        samples = scrape.parse(client.get("/metrics").text)
        batches = scrape.total(samples, "dapdee_edge_batch_size_count", model="gated")
        expired = scrape.total(samples, "dapdee_edge_expired_total", model="gated")
        waits = scrape.total(samples, "dapdee_edge_queue_duration_seconds_count", model="gated")
        bad = {str(v): infer(v) for v in (-1, 1.5, True, "100", 1 << 63)}
        zero = infer(0)
    assert answers["A"].status_code == 200 and answers["C"].status_code == 200, answers
    b = answers["B"]
    assert b.status_code == 503 and "retry-after" not in b.headers, b.text
    assert "parameter timeout: not started within its timeout" in b.json()["error"]
    assert batches == 2 and expired == 1 and waits == 3  # B's wait counts too
    for value, r in bad.items():
        assert r.status_code == 400 and r.json()["error"].startswith("parameter timeout:"), (value, r.text)
    assert zero.status_code == 200


def test_on_an_idle_worker_a_deadline_shorter_than_the_batch_window_does_not_wait_for_company(
    gated: LoadedModel,
) -> None:
    """A request whose deadline comes before its batch would be due (a 200 ms window, a 20 ms
    deadline) makes the batch due at once: an idle worker answers it, where waiting for company
    would have made it expire. A request with time to spare still waits the window."""
    batcher = Batcher(8, 200.0, max_rows=64, workers=1)
    key = (gated.name, frozenset({gated.input_name}), "final")
    x = {gated.input_name: torch.ones(1, 8)}

    async def go() -> tuple[BatchResult, float, float]:
        t0 = time.perf_counter()
        hurried = await batcher.submit(key, gated.executor, gated.exit_node(), x, t0 + 0.02)
        t1 = time.perf_counter()
        await batcher.submit(key, gated.executor, gated.exit_node(), x, t1 + 10.0)
        t2 = time.perf_counter()
        batcher.close()
        return hurried, t1 - t0, t2 - t1

    hurried, hurried_s, patient_s = asyncio.run(go())
    assert hurried.batch_size == 1 and hurried_s < 0.2 <= patient_s


def test_a_request_expired_on_arrival_joins_no_batch(gated: LoadedModel) -> None:
    """A (no deadline) opens a batch with a 300 ms window; T arrives already past its deadline
    and fails with Expired at once, without sealing A's batch; B then joins A's batch, and the
    two run together."""
    batcher = Batcher(8, 300.0, max_rows=64, workers=1)
    key = (gated.name, frozenset({gated.input_name}), "final")
    x = {gated.input_name: torch.ones(1, 8)}

    async def go() -> tuple[list[BatchResult], BaseException | None]:
        a = asyncio.create_task(batcher.submit(key, gated.executor, gated.exit_node(), x))
        await asyncio.sleep(0.01)
        late: BaseException | None = None
        try:
            await batcher.submit(key, gated.executor, gated.exit_node(), x, time.perf_counter() - 1e-3)
        except Expired as exc:
            late = exc
        b = asyncio.create_task(batcher.submit(key, gated.executor, gated.exit_node(), x))
        got = list(await asyncio.wait_for(asyncio.gather(a, b), 30.0))
        batcher.close()
        return got, late

    (a, b), late = asyncio.run(go())
    assert isinstance(late, Expired)
    assert a.batch_size == b.batch_size == 2


def test_on_a_busy_worker_a_short_deadline_batch_runs_when_the_thread_frees(gated: LoadedModel) -> None:
    """With a 30 s window, request 0 (deadline 10 s) makes its batch due at once and holds the
    only thread at the gate; request 1 (deadline 2 s, another key) waits in a batch that is due
    at once too, so it runs as soon as the gate opens (50 ms later), not at its window's end."""
    batcher = Batcher(8, 30_000.0, max_rows=64, workers=1)
    x = {gated.input_name: torch.ones(1, 8)}

    def submit(key: tuple[str, frozenset[str], str], deadline_s: float) -> asyncio.Task[BatchResult]:
        deadline = time.perf_counter() + deadline_s
        return asyncio.create_task(batcher.submit(key, gated.executor, gated.exit_node(), x, deadline))

    async def go() -> float:
        edge_models.ENTERED.clear()
        edge_models.GATE.clear()
        try:
            first = submit((gated.name, frozenset({gated.input_name}), "final"), 10.0)
            assert await asyncio.to_thread(edge_models.ENTERED.wait, 30.0)  # request 0 holds the thread
            second = submit((gated.name, frozenset({gated.input_name}), "final", "other"), 2.0)
            await asyncio.sleep(0.05)
        finally:
            edge_models.GATE.set()
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(first, second), 5.0)
        batcher.close()
        return time.perf_counter() - t0

    assert asyncio.run(go()) < 1.0
