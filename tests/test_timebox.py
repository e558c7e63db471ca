"""`dapdee.timebox.within`: a result within the limit, the builtin TimeoutError past it, and a
caller's cancellation never swallowed."""

from __future__ import annotations

import asyncio

import pytest

from dapdee import timebox


async def _after(seconds: float, value: int) -> int:
    await asyncio.sleep(seconds)
    return value


def test_a_result_within_the_limit_and_the_builtin_timeout_past_it() -> None:
    assert asyncio.run(timebox.within(_after(0.0, 7), 1.0)) == 7
    with pytest.raises(TimeoutError):  # the builtin one, whatever the Python
        asyncio.run(timebox.within(_after(5.0, 7), 0.05))


def test_the_callers_cancellation_goes_through() -> None:
    async def go() -> bool:
        task = asyncio.create_task(timebox.within(_after(5.0, 7), 10.0))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(go())
