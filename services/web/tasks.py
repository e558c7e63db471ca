"""Stopping a service's background task for sure.

`task.cancel()` asks once. A cancellation that lands inside an HTTP connection attempt can come
back out of the HTTP stack as a connection error instead (anyio's happy-eyeballs connect reports
"All connection attempts failed"), and a loop that retries on connection errors then runs on:
the lifespan that awaited it never ends, and the task heartbeats to nowhere for the rest of the
process's life. `stop_task` cancels until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Task[Any], retry_s: float = 0.5) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again every `retry_s` seconds
    while it runs on; its result or error is consumed. Cost: one wait per swallowed cancel."""
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=retry_s)
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
