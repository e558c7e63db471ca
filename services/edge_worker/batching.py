"""Dynamic batching: concurrent requests with the same (model, input node names, exit) are
stacked on dim 0 into one `GraphExecutor.compute` call, run on a bounded thread pool off the
event loop, and split back per caller.

A batch is full when it holds `batch_max` requests, or when the next request's rows would take it
past `max_rows` rows (that request then opens the next batch: no batch ever concatenates more than
`max_rows` rows); it is due `batch_wait_ms` after its first request. When a pool thread is free it
takes, in this order: a due batch whose first request has waited `starve_ms` (oldest first), a
full batch (in the order they filled), a due batch (oldest first). Full batches first keep a busy
worker computing its largest batches (a compute slot's time per request falls with the batch),
and a due batch keeps filling while it waits, so batches grow with load; the starvation bound
keeps a rarely used cut or exit from waiting behind a busy one's stream of full batches for as
long as the stream lasts. With `batch_max == 1` or `batch_wait_ms == 0` every request is full
alone, as it arrives. A batch's output is a tensor, or a tuple of tensors (e.g. logits and the
exit that answered each row), split back by rows. A batch of several requests that fails as a
whole (one request's data makes the model raise, or its output is not rows first) is computed
again request by request, so each request gets its own answer or its own error. A request may
carry a deadline: one whose batch has not started by then is left out of it, not computed, and
fails with `Expired` (its client has given up: computing it would only delay the requests
behind it; one expired on arrival joins no batch); a request whose deadline comes before its open
batch would be due makes the batch due at once (waiting for company would make it expire on an
idle worker).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

BatchKey = tuple[str, frozenset[str], str] | tuple[str, frozenset[str], str, str]  # model, inputs, exit[, mode]
Output = torch.Tensor | tuple[torch.Tensor, ...]
# a due batch whose first request has waited this long runs before full batches: long enough that a
# busy worker keeps computing full batches, short next to a frame's latency budget (hundreds of ms)
STARVE_MS = 100.0
Outcome = Output | Exception  # one request's share of a batch, or why computing it failed


class ShuttingDown(RuntimeError):
    """The batcher is closed, or closed before the request's batch ran: the worker is going away
    (answered 503 with Retry-After, so the device retries elsewhere or later)."""


class Expired(RuntimeError):
    """The request's deadline passed before its batch started: it was not computed, after
    waiting `queued_s`."""

    def __init__(self, queued_s: float) -> None:
        super().__init__(f"not started within its timeout (queued {queued_s * 1000.0:.0f} ms)")
        self.queued_s = queued_s


class Computes(Protocol):
    """What a batch runs: `dapdee.executor.GraphExecutor`, or anything with its `compute`."""

    def compute(self, given: Mapping[str, Any], targets: Sequence[str]) -> Mapping[str, Any]: ...


@dataclass
class BatchResult:
    """One caller's share of a batch."""

    output: Output
    queue_s: float
    compute_s: float
    batch_size: int  # requests in the batch
    batch_rows: int  # rows in the batch


@dataclass
class _Pending:
    inputs: dict[str, torch.Tensor]
    rows: int
    future: asyncio.Future[BatchResult]
    deadline: float  # perf_counter time after which it is not started (inf: none)
    t_submit: float = field(default_factory=time.perf_counter)


@dataclass
class _Batch:
    executor: Computes
    target: str
    items: list[_Pending] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None
    state: str = "open"  # open -> due (waits, still filling) / full (waits, closed) -> started


class Batcher:
    """Groups requests by key and runs them on `workers` threads. All public methods are called
    from the event loop; `load()` reports the recent busy fraction of the pool."""

    def __init__(
        self,
        batch_max: int,
        batch_wait_ms: float,
        max_rows: int,
        workers: int = 1,
        slowdown: float = 1.0,
        on_batch: Callable[[str, int, float], None] | None = None,
        starve_ms: float = STARVE_MS,
    ) -> None:
        self.batch_max = batch_max
        self.max_rows = max_rows
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.starve_s = starve_ms / 1000.0
        self.immediate = batch_max == 1 or self.batch_wait_s <= 0  # every request runs as it arrives
        self.workers = workers
        self.slowdown = slowdown
        self.on_batch = on_batch  # (model, batch size, compute seconds), called on the loop
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dapdee-edge")
        self._open: dict[BatchKey, _Batch] = {}  # batches that still take requests (due ones included)
        self._full: deque[tuple[BatchKey, _Batch]] = deque()  # full batches, in the order they filled
        # due batches: (their first request's submit time, a tie-break, key, batch), a heap; an
        # entry whose batch filled up or started since is skipped
        self._due_heap: list[tuple[float, int, BatchKey, _Batch]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._busy_s = 0.0  # completed compute seconds
        self._running: dict[int, float] = {}  # thread id -> start time of the batch it runs
        self._last_load = (time.perf_counter(), 0.0)
        self.queued = 0  # requests waiting for their batch to start (open, due or full)
        self._active = 0  # batches handed to the pool and not finished
        self._closed = False

    # ---- submission ------------------------------------------------------------------
    async def submit(
        self,
        key: BatchKey,
        executor: Computes,
        target: str,
        inputs: dict[str, torch.Tensor],
        deadline: float = math.inf,
    ) -> BatchResult:
        """Compute `target` for `inputs` (first dim = rows, at most `max_rows`), batched with
        compatible requests, unless its batch has not started by `deadline` (perf_counter
        time): then it raises Expired. Raises ValueError for more rows than a batch may hold."""
        if self._closed:
            raise ShuttingDown("worker is shutting down")
        loop = asyncio.get_running_loop()
        rows = next(iter(inputs.values())).shape[0]
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed the batch limit of {self.max_rows}")
        if deadline <= time.perf_counter():  # expired on arrival: it joins no batch
            raise Expired(0.0)
        item = _Pending(inputs, rows, loop.create_future(), deadline)
        self.queued += 1
        batch = self._open.get(key)
        if batch is not None and batch.rows + rows > self.max_rows:
            self._seal(key, batch)  # full by rows: ready, this request opens the next one
            batch = None
        if batch is None:
            batch = _Batch(executor, target)
            self._open[key] = batch
            if not self.immediate:
                batch.timer = loop.call_later(self.batch_wait_s, self._due, key, batch)
        batch.items.append(item)
        batch.rows += rows
        if self.immediate or len(batch.items) >= self.batch_max:
            self._seal(key, batch)
        elif batch.state == "open" and deadline <= batch.items[0].t_submit + self.batch_wait_s:
            # it would expire while its batch waits for company: the batch is due now (it runs
            # when a thread is free, in its turn among the due ones, and fills until then)
            if batch.timer is not None:
                batch.timer.cancel()
            self._due(key, batch)
        return await item.future

    def _seal(self, key: BatchKey, batch: _Batch) -> None:
        """`batch` is full: it takes no more requests and waits behind the full batches before
        it (a due one leaves the due batches). O(1)."""
        if self._open.get(key) is batch:
            del self._open[key]
        if batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
        batch.state = "full"
        self._full.append((key, batch))
        self._dispatch()

    def _due(self, key: BatchKey, batch: _Batch) -> None:
        """`batch`'s wait is over: it runs when a thread is free and no full batch waits (or
        once it has waited `starve_ms`); it keeps taking requests until then. O(log due)."""
        batch.timer = None
        batch.state = "due"
        heapq.heappush(self._due_heap, (batch.items[0].t_submit, next(self._order), key, batch))
        self._dispatch()

    def _oldest_due(self) -> tuple[float, BatchKey, _Batch] | None:
        """The due batch whose first request is oldest, and that request's submit time (entries
        of batches that filled up or started since are dropped). O(log due) amortised."""
        while self._due_heap:
            t, _, key, batch = self._due_heap[0]
            if batch.state == "due":
                return t, key, batch
            heapq.heappop(self._due_heap)
        return None

    def _next(self) -> tuple[BatchKey, _Batch] | None:
        """The batch a free thread takes (module docstring): a starving due batch, else the first
        full batch, else the oldest due batch; None when none waits. O(log due)."""
        oldest = self._oldest_due()
        if oldest is not None and (not self._full or time.perf_counter() - oldest[0] >= self.starve_s):
            heapq.heappop(self._due_heap)
            return oldest[1], oldest[2]
        return self._full.popleft() if self._full else None

    def _dispatch(self) -> None:
        """Hand waiting batches to the pool while a thread is free (`_next` picks), so no batch
        waits in the pool's own queue, where nothing could pass it. O(log due) per batch."""
        while self._active < self.workers:
            got = self._next()
            if got is None:
                return
            key, batch = got
            if self._open.get(key) is batch:
                del self._open[key]  # a due batch: closed to requests now that it runs
            self._start(key, batch)

    def _start(self, key: BatchKey, batch: _Batch) -> None:
        """Run `batch` on the pool, less the requests past their deadline (failed with
        Expired) and those whose caller is gone (a cancelled future); nothing runs when no
        request is left. O(batch)."""
        batch.state = "started"
        items, batch.items, batch.rows = batch.items, [], 0
        self.queued -= len(items)
        now = time.perf_counter()
        for it in items:
            if now > it.deadline and not it.future.done():
                it.future.set_exception(Expired(now - it.t_submit))
        items = [it for it in items if not it.future.done()]
        if not items:
            return
        self._active += 1
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self._run, batch.executor, batch.target, items)
        fut.add_done_callback(lambda f: self._done(key[0], items, f))

    # ---- execution (pool thread) -------------------------------------------------------
    def _run(self, executor: Computes, target: str, items: list[_Pending]) -> tuple[list[Outcome], float, float]:
        """One batch on a pool thread: (each request's outcome, start time, compute seconds).
        A batch of several requests that fails as a whole is computed again request by request,
        so a request whose data makes the model fail fails alone; a failed request's outcome is
        its exception, so its compute time is still reported. O(the batch's compute), twice
        when it falls back."""
        t0 = time.perf_counter()
        tid = threading.get_ident()
        with self._lock:
            self._running[tid] = t0
        try:
            try:
                outcomes: list[Outcome] = _split(_compute(executor, target, _stacked(items)), items)
            except Exception as exc:
                outcomes = [exc] if len(items) == 1 else [_alone(executor, target, it) for it in items]
            compute_s = time.perf_counter() - t0
            if self.slowdown > 1.0:
                time.sleep(compute_s * (self.slowdown - 1.0))
                compute_s = time.perf_counter() - t0
            return outcomes, t0, compute_s
        finally:
            with self._lock:
                self._running.pop(tid, None)
                self._busy_s += time.perf_counter() - t0

    def _done(self, model: str, items: list[_Pending], f: asyncio.Future) -> None:
        self._active -= 1
        self._dispatch()
        exc = ShuttingDown("worker is shutting down") if f.cancelled() else f.exception()
        if exc is not None:
            for it in items:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        outcomes, t0, compute_s = f.result()
        if self.on_batch is not None:
            self.on_batch(model, len(items), compute_s)
        rows = sum(it.rows for it in items)
        for it, outcome in zip(items, outcomes, strict=True):
            if it.future.done():
                continue
            if isinstance(outcome, Exception):
                it.future.set_exception(outcome)
            else:
                queue_s = max(0.0, t0 - it.t_submit)
                it.future.set_result(BatchResult(outcome, queue_s, max(0.0, compute_s), len(items), rows))

    # ---- load and shutdown ------------------------------------------------------------------
    def reset_load(self) -> None:
        """Start the next `load()` window now: what ran before is not load (the worker's own
        measuring requests at start-up). O(batches running)."""
        self.load()

    def load(self) -> float:
        """Busy fraction of the compute pool since the previous call, in [0, 1)."""
        now = time.perf_counter()
        with self._lock:
            busy = self._busy_s + sum(now - s for s in self._running.values())
        last_t, last_busy = self._last_load
        self._last_load = (now, busy)
        span = (now - last_t) * self.workers
        if span <= 0:
            return 0.0
        return min(0.99, max(0.0, (busy - last_busy) / span))

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": self.queued, "open_batches": len(self._open), "full_batches": len(self._full)}

    def close(self) -> None:
        """Refuse new work, fail the requests of batches not yet started (open, due or full), and stop
        the pool without waiting for running batches (they finish; their requests get their
        answers). Call it on the event loop: it resolves the requests' futures and cancels
        timers, which are the loop's."""
        self._closed = True
        waiting = {id(b): b for b in self._open.values()} | {id(b): b for _, b in self._full}
        self._open.clear()
        self._full.clear()
        self._due_heap.clear()
        for batch in waiting.values():
            if batch.timer is not None:
                batch.timer.cancel()
            for it in batch.items:
                if not it.future.done():
                    it.future.set_exception(ShuttingDown("worker is shutting down"))
            self.queued -= len(batch.items)
            batch.items = []
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """`close`, then wait (off the loop) for the batches still running."""
        self.close()
        await asyncio.to_thread(self.pool.shutdown, wait=True)


def _stacked(items: Sequence[_Pending]) -> dict[str, torch.Tensor]:
    """The batch's inputs: each input name's tensors concatenated on dim 0, in item order (the
    items share their input names: they share a batch key). O(the batch's values)."""
    if len(items) == 1:
        return items[0].inputs
    return {n: torch.cat([it.inputs[n] for it in items], 0) for n in items[0].inputs}


def _compute(executor: Computes, target: str, given: Mapping[str, torch.Tensor]) -> Output:
    """`target` computed from `given` under inference mode: a tensor or a tuple of tensors
    (RuntimeError otherwise). O(the nodes it needs)."""
    with torch.inference_mode():
        out = executor.compute(given, [target])[target]
    parts = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(o, torch.Tensor) for o in parts):
        raise RuntimeError(f"exit node {target} did not produce a tensor")
    return out


def _split(out: Output, items: Sequence[_Pending]) -> list[Output]:
    """Each item's rows of a batch's output, in item order (views). ValueError when an output of
    a batch of several requests does not have the batch's rows first. O(items)."""
    if len(items) == 1:
        return [out]
    parts = out if isinstance(out, tuple) else (out,)
    rows = sum(it.rows for it in items)
    if not all(o.dim() > 0 and o.shape[0] == rows for o in parts):
        raise ValueError(f"a batch output is not {rows} rows first: {[list(o.shape) for o in parts]}")
    shares: list[Output] = []
    start = 0
    for it in items:
        end = start + it.rows
        shares.append(tuple(o[start:end] for o in parts) if isinstance(out, tuple) else out[start:end])
        start = end
    return shares


def _alone(executor: Computes, target: str, item: _Pending) -> Outcome:
    """One request computed on its own: its output, or the exception computing it raised."""
    try:
        return _compute(executor, target, item.inputs)
    except Exception as exc:  # this request's failure: handed to its caller alone
        return exc
