"""Awaiting with a time limit on every Python the project supports (3.10 included)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def within(aw: Coroutine[Any, Any, T], seconds: float) -> T:
    """`aw` awaited for at most `seconds` (TimeoutError past them, the builtin one on every
    version). `asyncio.timeout` where Python has it (3.11+): `asyncio.wait_for` before 3.12
    returns the result of an awaitable that completes as its caller is cancelled, so the
    caller's cancellation is lost (a device's SIGTERM or close, most often while an answer
    arrives). O(1) on top of `aw`."""
    timeout = getattr(asyncio, "timeout", None)
    if timeout is None:  # pragma: no cover - Python 3.10
        try:
            return await asyncio.wait_for(aw, seconds)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before 3.11
            raise TimeoutError from None
    async with timeout(seconds):
        return await aw
