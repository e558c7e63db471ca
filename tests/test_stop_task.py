"""`dapdee.web.tasks.stop_task`: a background task that swallows a cancellation (as a retry loop
does when the cancel lands inside a connection attempt that reports it as a connection error)
is stopped all the same, and a well-behaved one at the first cancel."""

from __future__ import annotations

import asyncio

from dapdee.web.tasks import stop_task


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
