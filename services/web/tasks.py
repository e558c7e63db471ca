"""A service's background tasks: one step run on a period, stopping a task for sure, and
running several at once where the first failure stops the rest.

`task.cancel()` asks once. A cancellation that lands inside an HTTP connection attempt can come
back out of the HTTP stack as a connection error instead (anyio's happy-eyeballs connect reports
"All connection attempts failed"), and a loop that retries on connection errors then runs on:
the lifespan that awaited it never ends, and the task heartbeats to nowhere for the rest of the
process's life. `stop_task` cancels until the task has ended.

Neither swallows its caller's own cancellation: they wait with `asyncio.wait`, which never
raises the awaited task's outcome, where `task.cancel(); with suppress(CancelledError): await
task` cannot tell the task's CancelledError from one meant for the caller, and so ends the
caller's cancellation (a shutdown's, a timeout's) there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any


async def run_every(
    period_s: float,
    stop: asyncio.Event,
    step: Callable[[], Awaitable[object]],
    what: str,
    log: logging.Logger,
    quiet: tuple[type[Exception], ...] = (),
) -> None:
    """Await `step()` every `period_s` seconds until `stop` is set (a step in progress finishes
    first). A step that raises one of `quiet` is skipped silently (an expected outage); any other
    error is logged as "`what` failed" and the loop goes on: it must outlive any surprise.
    O(1) per period plus the step."""
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
            return
        try:
            await step()
        except quiet:
            pass
        except Exception:
            log.exception("%s failed", what)


async def stop_task(task: asyncio.Task[Any], retry_s: float = 0.5) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again every `retry_s` seconds
    while it runs on; its result or error is consumed. Cost: one wait per swallowed cancel."""
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=retry_s)
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


async def finish_or_stop(task: asyncio.Task[Any], wait_s: float, retry_s: float = 0.5) -> None:
    """Let `task` run on for at most `wait_s` seconds, then `stop_task` it; its result or error
    is consumed. Cancelled meanwhile, it stops `task` too before the cancellation goes on.
    Cost: at most `wait_s`, plus `stop_task`."""
    try:
        await asyncio.wait({task}, timeout=wait_s)
    finally:
        await stop_task(task, retry_s)


async def all_or_stop(coros: Iterable[Coroutine[Any, Any, Any]], retry_s: float = 0.5) -> None:
    """Run `coros` as tasks at once until all have ended; the first to raise stops the others
    (`stop_task`), then the error of one that failed is raised (`asyncio.gather` would leave
    the others running on). Cancelled meanwhile, it stops them all before the cancellation
    goes on. O(tasks)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                await stop_task(task, retry_s)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
