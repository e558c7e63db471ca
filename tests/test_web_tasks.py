"""`dapdee.web.tasks`: `stop_task` stops a background task that swallows a cancellation (as a
retry loop does when the cancel lands inside a connection attempt that reports it as a
connection error) all the same, and a well-behaved one at the first cancel; `run_every` runs a
step on its period, outlives the step's errors (logging all but the quiet ones) and ends on
its stop event; `all_or_stop` waits for every task, and the first failure stops the others."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from dapdee.web.tasks import all_or_stop, run_every, stop_task


def test_a_task_that_swallows_a_cancel_is_stopped_all_the_same() -> None:
    async def go() -> tuple[int, int]:
        swallowed = 0
        ticks = 0

        async def stubborn() -> None:
            nonlocal swallowed, ticks
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    if swallowed < 2:  # reported as something else, and retried
                        swallowed += 1
                        continue
                    raise
                ticks += 1

        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0.05)
        await asyncio.wait_for(stop_task(task, retry_s=0.05), 5.0)
        assert task.done() and task.cancelled()
        return swallowed, ticks

    swallowed, ticks = asyncio.run(go())
    assert swallowed == 2 and ticks > 0


def test_a_task_that_ends_on_its_own_or_fails_is_consumed() -> None:
    async def go() -> None:
        async def fails() -> None:
            raise RuntimeError("boom")

        task = asyncio.create_task(fails())
        await asyncio.sleep(0)
        await stop_task(task)  # its error is consumed, not raised
        assert task.done()

    asyncio.run(go())


class Outage(Exception):
    """An expected failure of a step (what `quiet` is for)."""


def test_run_every_outlives_its_steps_errors_and_ends_on_stop(caplog: pytest.LogCaptureFixture) -> None:
    """Steps 1-6 every 10 ms: the 2nd raises Outage (quiet: not logged), the 4th a ValueError
    (logged with what failed); the loop goes on, and setting the event ends it within a period."""
    log = logging.getLogger("test.run_every")

    async def go() -> tuple[list[int], float]:
        stop = asyncio.Event()
        calls: list[int] = []

        async def step() -> None:
            calls.append(len(calls) + 1)
            if calls[-1] == 2:
                raise Outage
            if calls[-1] == 4:
                raise ValueError("surprise")
            if calls[-1] == 6:
                stop.set()

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(run_every(0.01, stop, step, "the test step", log, quiet=(Outage,)), 5.0)
        return calls, loop.time() - t0

    with caplog.at_level(logging.ERROR, logger="test.run_every"):
        calls, took = asyncio.run(go())
    assert calls == [1, 2, 3, 4, 5, 6] and took >= 0.06 - 0.005
    logged = [r for r in caplog.records if r.name == "test.run_every"]
    assert [r.getMessage() for r in logged] == ["the test step failed"]
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is ValueError


def test_all_or_stop_waits_for_all_and_the_first_failure_stops_the_rest() -> None:
    """No task: it returns. Three tasks that end: all ran to the end. One that fails while two
    still sleep: its error is raised at once (not after the sleepers' 30 s), and the sleepers
    were stopped, where `asyncio.gather` would leave them running on."""

    async def go() -> tuple[list[int], float, list[str]]:
        ended: list[int] = []
        stopped: list[str] = []

        async def quick(i: int) -> None:
            await asyncio.sleep(0.01 * i)
            ended.append(i)

        async def sleeper(name: str) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                stopped.append(name)
                raise

        async def failing() -> None:
            await asyncio.sleep(0.02)
            raise ValueError("the second request failed")

        await all_or_stop([])  # nothing to run: returns (asyncio.wait would refuse an empty set)
        await all_or_stop(quick(i) for i in range(3))
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="second request"):
            await all_or_stop([sleeper("a"), failing(), sleeper("b")])
        return sorted(ended), time.monotonic() - t0, sorted(stopped)

    ended, waited_s, stopped = asyncio.run(go())
    assert ended == [0, 1, 2]
    assert waited_s < 5.0
    assert stopped == ["a", "b"]
