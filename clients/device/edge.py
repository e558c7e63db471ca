"""Edge access of one device: v2 infer requests through the SDK (`dapdee.client.AsyncEdgeClient`),
over an optionally shaped uplink, with the answer checked, a finite timeout, the token sent only
to trusted workers, and a back-off after failures.

- `WorkerTrust`: the worker URLs this device may send its token to: the ones the user named
  (`--edge`) and the ones the planner lists (`GET /workers`, re-read at most every
  `refresh_s`, and once more when a plan names a URL not on the list; one read at a time,
  which concurrent frames wait for). A URL on neither list is never contacted; a frame that
  finds its worker not listed falls back without resting the worker (`EdgeFailure.worker_fault`).
- `Backoff`: after a failure the worker rests `initial_s`, doubling up to `max_s`, and at
  least the `Retry-After` the worker answered with (up to `max_s`); a success of a frame that
  started after the last rest began resets it. One outage doubles it once: the failures of
  frames already under way when a rest began (with `max_inflight` frames in flight, they all
  fail together) do not double it again, and the late success of such a frame does not undo
  the doubling. Each worker URL has its own (`EdgeLink.backoff_of`): a plan that moves to
  another worker does not wait out the rest of the one that failed.
- `EdgeLink`: the requests. Every failure (refused, unreachable, timed out, an answer off
  contract: wrong types, negative or non-finite timings, logits of another shape) is an
  `EdgeFailure` naming it and the bytes of the request that left the device (`Upload.sent`),
  which the runtime turns into that frame's local fallback. Each upload feeds the bandwidth
  estimate (`Sensing`), unless its server time is implausible; one that times out alone on
  the link lowers it to the rate its bytes prove (a censored sample). A shaped uplink carries
  one request body at a time, in frame order (`Upload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from dapdee import timebox
from dapdee.api.planner import MAX_AVOIDED_WORKERS
from dapdee.client import (
    ApiError,
    AsyncEdgeClient,
    ClientError,
    InferResult,
    ProtocolError,
    RequestError,
    TransportError,
    infer_call,
)
from dapdee.client.transport import Call
from dapdee.costgraph import CostGraph
from dapdee.device.sensing import Sensing
from dapdee.device.types import EdgeAnswer, EdgeFailure
from dapdee.netem import ShapedUplink

log = logging.getLogger("dapdee.device.edge")

MAX_CLIENTS = 16  # idle edge clients kept open (one per worker URL)
MAX_BACKOFFS = 64  # workers' back-offs kept (workers come and go): the least recently used go first
MAX_ANSWER_BYTES = 1 << 20  # an infer answer holds one row of logits: far below this


@dataclass(frozen=True)
class WorkerEntry:
    """A worker the planner lists: its URL and the models it serves."""

    url: str
    models: tuple[str, ...]


Fetch = Callable[[], Awaitable[list[WorkerEntry]]]


def normalize_url(url: str) -> str:
    return url.rstrip("/")


class WorkerTrust:
    """Which worker URLs may receive the device token (see the module docstring). `fetch`
    reads the planner's worker list (None: only `explicit` URLs are trusted). A failed read
    keeps the last list. One read at a time: callers that ask while one is under way wait for
    it and use its list (pipelined frames to a worker just listed are not refused while the
    first of them reads). `allows` is O(1) unless it re-reads the list."""

    def __init__(self, fetch: Fetch | None, explicit: Iterable[str] = (), refresh_s: float = 5.0) -> None:
        self.fetch = fetch
        self.explicit = frozenset(normalize_url(u) for u in explicit)
        self.refresh_s = refresh_s
        self.listed: dict[str, WorkerEntry] = {}
        self.read_at = -math.inf  # when the last read ended (answered or failed)
        self._reading = asyncio.Lock()

    async def refresh(self, force: bool = False, strict: bool = False) -> None:
        """Re-read the planner's list when it is older than `refresh_s` (or `force`); when a
        read is under way, wait for it instead and keep its list. A failed read keeps the last
        list; with `strict` (at start-up) a refusal (401, 403) is raised. Cost: one GET
        /workers at most."""
        if self.fetch is None:
            return
        seen = self.read_at
        async with self._reading:
            if self.read_at != seen:  # a read ended while this one waited: its list is as new
                return
            if not force and time.monotonic() - self.read_at < self.refresh_s:
                return
            try:
                entries = await self.fetch()
            except ClientError as exc:
                self.read_at = time.monotonic()  # a failed read spaces the next one too
                if strict and isinstance(exc, ApiError) and exc.status in (401, 403):
                    raise
                log.warning("could not read the planner's worker list (%s); keeping the last one", exc)
                return
            self.listed = {normalize_url(e.url): e for e in entries}
            self.read_at = time.monotonic()

    async def allows(self, url: str) -> bool:
        """Whether `url` is named by the user or listed by the planner (the list is re-read,
        at most every `refresh_s`, and at most every second when it does not hold `url`; a
        read under way is waited for)."""
        url = normalize_url(url)
        if url in self.explicit or url in self.listed:
            return True
        await self.refresh(force=time.monotonic() - self.read_at >= min(self.refresh_s, 1.0))
        return url in self.listed

    def serving(self, model: str) -> list[str]:
        """URLs that serve `model`: the user's first, then the planner's listed ones."""
        listed = [u for u, e in self.listed.items() if model in e.models and u not in self.explicit]
        return sorted(self.explicit) + listed


class Backoff:
    """Rest after edge failures: `initial_s`, doubling up to `max_s`, at least the worker's
    `Retry-After` (bounded by `max_s`); reset by a success. `rests` counts the rests begun: a
    frame reads it when it starts and reports its outcome with it. A failure doubles the rest
    only when no rest began since (else it is the same outage, already counted); a success
    resets it only then too (a frame under way when a rest began proves nothing about the
    worker after that failure). O(1)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.rest_s = initial_s
        self.until = 0.0
        self.rests = 0

    def resting(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.until

    def began_since(self, since: int) -> bool:
        """Whether a rest began after a frame that read `rests` as `since` started: its
        failure is then part of an outage already counted. O(1)."""
        return since < self.rests

    def failed(self, since: int, retry_after_s: float | None = None) -> float:
        """Note a failed request of a frame that started when `rests` was `since`; returns how
        long the device now rests (s, from now). A fresh failure begins a rest of the current
        length, or the worker's `retry_after_s` when longer (at most `max_s`), and doubles the
        next; a failure of a frame under way when a rest began only makes the rest reach
        `retry_after_s`: with several frames in flight, one outage fails them all, and doubling
        per frame would rest 2 s after a 0.5 s blip. O(1)."""
        now = time.monotonic()
        floor = min(max(retry_after_s or 0.0, 0.0), self.max_s)  # the worker knows when it can take more
        if self.began_since(since):
            rest = max(self.until - now, floor, 0.0)
        else:
            rest = max(self.rest_s, floor)
            self.rest_s = min(self.rest_s * 2.0, self.max_s)
            self.rests += 1
        self.until = max(self.until, now + rest)
        return rest

    def succeeded(self, since: int) -> None:
        """Note an answered request of a frame that started when `rests` was `since`: the rest
        goes back to `initial_s` unless a rest began after the frame started (a slow frame
        answered late in an outage leaves the doubling that the outage's failures set). O(1)."""
        if not self.began_since(since):
            self.rest_s = self.initial_s


def _failure(exc: ClientError, timeout_s: float) -> EdgeFailure:
    if isinstance(exc, ApiError):
        return EdgeFailure(f"HTTP {exc.status}: {exc.detail[:120]}", exc.retry_after_s)
    if isinstance(exc, ProtocolError):
        return EdgeFailure(f"bad answer: {exc.detail[:160]}")
    if isinstance(exc, TransportError):
        if exc.timeout:
            return EdgeFailure(f"timeout after {timeout_s * 1000:.0f} ms")
        return EdgeFailure(f"{type(exc.cause).__name__}: {str(exc.cause)[:80] or 'no answer'}")
    if isinstance(exc, RequestError):  # made on the device and never sent: not the worker's fault
        return EdgeFailure(f"request not sent: {exc}", worker_fault=False)
    return EdgeFailure(f"{type(exc).__name__}: {exc}")


def _sent_and_timed_out(exc: BaseException) -> bool:
    """Whether `exc` is a timeout of a request whose sending had begun."""
    return isinstance(exc, TransportError) and exc.timeout and exc.may_have_been_sent


class Upload:
    """One infer request's body on its way to a worker: its size, and over a shaped uplink the
    bytes the shaper has released to the connection (each chunk counted once the connection
    has taken it).

    A shaped uplink (the device paces its own bytes) carries one body at a time, in the order
    frames asked for it (`link`, a lock shared by the device's uploads): bodies sharing a link
    all finish late, each taking as long as all of them together, so a slow link with several
    frames in flight would deliver none within a worker's body timeout, while one at a time
    delivers them at the link's rate, in turn. The body holds the link from its turn
    (`take_turn`) until its last chunk has been handed to the connection, not while it waits
    for the answer, so the next body follows at once. A body that waited for its turn paces on
    from where the one before it ended (`ShapedUplink.shaped_body`'s `queued`): the hand-over
    itself (the next frame's task waking up on a busy event loop, its request's headers) would
    otherwise idle the link on every body, and a fast stream's uplink ran at half its rate
    (AlexNet at 4G: 1.2 KB bodies, 3 ms apart where the link takes 1.6 ms). Without a shaper
    the body goes to the kernel at once (a socket buffer takes it before its bytes leave, so a
    turn would pass early and order nothing) and the network shares the link; the content is
    then sent as it is, which keeps the SDK's repeat of a request that never connected."""

    def __init__(self, shaper: ShapedUplink | None, link: asyncio.Lock) -> None:
        self.shaper = shaper
        self.link = link
        self.holding = False
        self.queued = False  # it waited for the link behind another body
        self.size = 0
        self.released = 0

    async def take_turn(self, timeout_s: float) -> None:
        """Over a shaped uplink, wait for it: the emulated round trip first (propagation, which
        holds no link), then for the bodies ahead of this one. EdgeFailure (nothing sent, the
        worker not at fault) when that takes more than `timeout_s`. Without a shaper, nothing
        to wait for."""
        if self.shaper is None:
            return
        try:
            await timebox.within(self._wait_turn(), timeout_s)
        except TimeoutError:
            reason = f"timeout after {timeout_s * 1000:.0f} ms waiting for the uplink; nothing sent"
            raise EdgeFailure(reason, worker_fault=False) from None

    async def _wait_turn(self) -> None:
        assert self.shaper is not None
        await self.shaper.delay()
        self.queued = self.link.locked()
        await self.link.acquire()
        self.holding = True

    def release(self) -> None:
        """Hand the uplink to the next body (once; a no-op when not holding it). O(1)."""
        if self.holding:
            self.holding = False
            self.link.release()

    def body(self, content: bytes) -> AsyncIterator[bytes] | None:
        """What the request sends for `content`: over a shaped uplink its chunks at the link's
        rate (counted; the link released after the last), else None (the content as it is).
        O(1)."""
        self.size = len(content)
        return None if self.shaper is None else self._paced(content)

    async def _paced(self, content: bytes) -> AsyncIterator[bytes]:
        assert self.shaper is not None
        try:
            async for chunk in self.shaper.shaped_body(content, delay=False, queued=self.queued):
                yield chunk
                self.released += len(chunk)
        finally:
            self.release()

    def sent(self, exc: BaseException) -> int:
        """The body's bytes that left the device before `exc` ended the request (a failed
        frame's `bytes_sent`: what it put on the uplink, answered or not). Over a shaped uplink,
        those the shaper released (part of the body when the upload was cut off); otherwise the
        whole body once the request had its connection (the body is written at once: the device
        cannot tell how much of it the network carried), and none when it never connected or
        was never made. O(1)."""
        if self.shaper is not None:
            return self.released
        if isinstance(exc, (ApiError, ProtocolError)):
            return self.size
        return self.size if isinstance(exc, TransportError) and exc.may_have_been_sent else 0


class EdgeLink:
    """Infer requests to edge workers for model `graph.model` (see the module docstring). One
    SDK client per worker URL (at most MAX_CLIENTS kept: past it while requests use them, the
    extra ones closed at a later opening once idle, `_using`), the token only for trusted URLs, and
    one back-off per worker URL (`backoff_of`; `backoff` gives their `initial_s` and `max_s`).
    `uploads_active` and `last_activity` tell the sensing loop when the link is idle."""

    def __init__(
        self,
        graph: CostGraph,
        trust: WorkerTrust,
        sensing: Sensing,
        token: str | None = None,
        shaper: ShapedUplink | None = None,
        fp16: bool = False,
        backoff: Backoff | None = None,
    ) -> None:
        self.graph = graph
        self.trust = trust
        self.sensing = sensing
        self.token = token
        self.shaper = shaper
        self.wire_dtype = "FP16" if fp16 else "FP32"
        rests = backoff or Backoff(0.5, 8.0)
        self.backoff_initial_s, self.backoff_max_s = rests.initial_s, rests.max_s
        self._backoffs: OrderedDict[str, Backoff] = OrderedDict()
        self.uploads_active = 0
        self.last_activity = 0.0
        self.last_server_ms = 0.0  # queue + compute of the last answer (a busy worker times out too)
        self._clients: OrderedDict[str, AsyncEdgeClient] = OrderedDict()
        self._users: dict[str, int] = {}  # worker URL -> requests using its client now
        self._uplink = asyncio.Lock()  # one body on the uplink at a time (`Upload`)

    def backoff_of(self, url: str) -> Backoff:
        """The back-off of worker `url` (a fresh one for a worker not seen, or forgotten: at
        most MAX_BACKOFFS are kept, the least recently used dropped first). O(1)."""
        url = normalize_url(url)
        backoff = self._backoffs.get(url)
        if backoff is None:
            backoff = self._backoffs[url] = Backoff(self.backoff_initial_s, self.backoff_max_s)
            while len(self._backoffs) > MAX_BACKOFFS:
                self._backoffs.popitem(last=False)
        self._backoffs.move_to_end(url)
        return backoff

    def resting(self, url: str, now: float | None = None) -> bool:
        """Whether worker `url` rests after a failure (keeps no back-off for it). O(1)."""
        backoff = self._backoffs.get(normalize_url(url))
        return backoff is not None and backoff.resting(now)

    def resting_urls(self, now: float | None = None) -> list[str]:
        """The workers resting after failures now, the most recently used first, at most
        MAX_AVOIDED_WORKERS: the ones a plan request asks the planner to avoid (a worker that
        heartbeats but that this device cannot use would otherwise be handed back at every
        re-plan). O(back-offs kept)."""
        now = time.monotonic() if now is None else now
        resting = [url for url, b in reversed(self._backoffs.items()) if b.resting(now)]
        return resting[:MAX_AVOIDED_WORKERS]

    @contextlib.asynccontextmanager
    async def _using(self, url: str) -> AsyncIterator[AsyncEdgeClient]:
        """The SDK client of worker `url` (opened on first use), held open while the block runs:
        opening one past MAX_CLIENTS closes the least recently used clients no request is using
        (closing one in use would fail its requests, and the worker would rest for nothing).
        O(clients) when one opens, O(1) otherwise."""
        url = normalize_url(url)
        if not await self.trust.allows(url):
            raise EdgeFailure(f"worker {url[:80]} is not listed by the planner; not contacted", worker_fault=False)
        client = self._clients.get(url)
        if client is None:
            try:
                client = AsyncEdgeClient(url, self.token, max_response_bytes=MAX_ANSWER_BYTES)
            except RequestError as exc:
                raise EdgeFailure(f"worker URL {url[:80]!r}: {exc}") from None
            self._clients[url] = client
        self._clients.move_to_end(url)
        self._users[url] = self._users.get(url, 0) + 1  # before any await: no one closes it now
        try:
            if len(self._clients) > MAX_CLIENTS:
                await self._close_idle_clients()
            yield client
        finally:
            self._users[url] -= 1
            if not self._users[url]:
                del self._users[url]

    async def _close_idle_clients(self) -> None:
        """Close the least recently used clients no request is using while more than MAX_CLIENTS
        are open. They leave the cache before any close is awaited: meanwhile another request
        must not pick one up, nor another closing take it again. O(clients)."""
        idle = [u for u in self._clients if u not in self._users]
        closing = [self._clients.pop(u) for u in idle[: max(0, len(self._clients) - MAX_CLIENTS)]]
        if closing:  # shielded: a frame cancelled meanwhile must not leave any of them open
            await asyncio.shield(asyncio.gather(*(c.aclose() for c in closing), return_exceptions=True))

    def _expected_logits(self, exit_name: str) -> tuple[int, ...] | None:
        shape = self.graph.node(self.graph.exit(exit_name).node).shape
        return tuple(shape) if shape else None

    async def infer(
        self,
        url: str,
        inputs: Mapping[str, torch.Tensor],
        exit_name: str,
        timeout_s: float,
        request_id: str | None = None,
        traceparent: str | None = None,
        observe: bool = True,
        confidence: bool = False,
    ) -> EdgeAnswer:
        """Send the cut's tensors to `url` for `exit_name` and wait at most `timeout_s` (finite),
        the wait for the uplink's turn (`Upload`) included.
        With `observe`, the upload feeds the bandwidth estimate; without (a probe, timed by its
        caller), the uploads that share the link with it give no sample; a timeout of a request
        alone on the link bounds it in any case (`_censor`). With `confidence`, the worker checks its
        confidence heads and the answer says which exit answered. Raises EdgeFailure, whose
        `bytes_sent` are the request's bytes that left the device (`Upload.sent`)."""
        async with self._using(url) as client:
            self.uploads_active += 1
            overlapped = self.uploads_active > 1
            t0, c0 = time.perf_counter(), time.thread_time()
            # an unobserved upload (a probe) takes a ticket too: its bytes share the link with the
            # frames that start meanwhile, whose timings then give no sample (`upload_failed`)
            ticket = self.sensing.bandwidth.upload_started(t0)
            deadline = time.monotonic() + timeout_s
            upload = Upload(self.shaper, self._uplink)
            try:
                call = self._infer_call(inputs, exit_name, timeout_s, request_id, traceparent, confidence)
                await upload.take_turn(timeout_s)
                left_s = max(deadline - time.monotonic(), 1e-3)  # the turn's wait counts against the timeout
                res = await client.run(replace(call, timeout_s=left_s), upload.body(call.content))
            except BaseException as exc:  # a cancelled frame too: an open ticket would hold back every later sample
                self.sensing.bandwidth.upload_failed(ticket)
                if _sent_and_timed_out(exc) and not overlapped and self.uploads_active == 1:
                    self._censor(upload.size, t0)
                if isinstance(exc, ClientError):
                    failure = _failure(exc, timeout_s)
                    failure.bytes_sent = upload.sent(exc)
                    raise failure from None
                raise
            finally:
                upload.release()
                self.uploads_active -= 1
                self.last_activity = time.monotonic()
            cpu_ms = (time.thread_time() - c0) * 1000.0
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            overlapped = overlapped or self.uploads_active > 0
            return self._accept(res, exit_name, ticket, observe, t0, elapsed_ms, cpu_ms, overlapped)

    def _infer_call(
        self,
        inputs: Mapping[str, torch.Tensor],
        exit_name: str,
        timeout_s: float,
        request_id: str | None,
        traceparent: str | None,
        confidence: bool,
    ) -> Call[InferResult]:
        """The infer call of one frame, its floats as `wire_dtype`; a frame FP16 cannot carry
        (a value beyond ±65504) goes as FP32: `--fp16` halves the uplink's bytes, it must not
        lose a frame the worker could answer. RequestError when FP32 cannot carry it either.
        O(input bytes), twice for such a frame."""
        options: dict[str, Any] = dict(
            exit=exit_name, request_id=request_id, timeout=timeout_s, traceparent=traceparent, confidence=confidence
        )
        try:
            return infer_call(self.graph.model, inputs, wire_dtype=self.wire_dtype, **options)
        except RequestError:
            if self.wire_dtype == "FP32":
                raise
        return infer_call(self.graph.model, inputs, wire_dtype="FP32", **options)

    def _censor(self, nbytes: int, t0: float) -> None:
        """A request alone on the link timed out: the link is at most as fast as its body's
        `nbytes` (as sent: a frame FP16 cannot carry goes as FP32) over the time waited
        (`BandwidthEstimator.censor`). Without this a link far slower than the estimate would
        give no sample at all: every upload would time out. Not when the worker's last answer
        spent half that time or more in its queue and compute: the wait may have been the
        worker's, and the link fast."""
        waited_ms = (time.perf_counter() - t0) * 1000.0
        if self.last_server_ms * 2.0 >= waited_ms:
            return
        bound = self.sensing.bandwidth.censor(nbytes, waited_ms, self.sensing.rtt.estimate_ms)
        if bound is not None:
            log.info("upload of %d bytes timed out after %.0f ms: uplink at most %.3g Mbit/s", nbytes, waited_ms, bound)

    def _accept(
        self,
        res: Any,
        exit_name: str,
        ticket: int,
        observe: bool,
        t0: float,
        elapsed_ms: float,
        cpu_ms: float,
        overlapped: bool,
    ) -> EdgeAnswer:
        """The checked answer; the upload (`ticket`) folded into the bandwidth estimate when
        `observe`, else dropped from it as giving no timing."""
        want = self._expected_logits(exit_name)
        if want is not None and tuple(res.logits.shape) != want:
            self.sensing.bandwidth.upload_failed(ticket)
            shape = f"logits {list(res.logits.shape)}, expected {list(want)}"
            raise EdgeFailure(f"bad answer: {shape}", bytes_sent=res.request_bytes)
        server_ms = res.queue_ms + res.compute_ms
        self.last_server_ms = server_ms
        sample = None
        if observe:
            end = t0 + elapsed_ms / 1000.0
            rtt = self.sensing.rtt.estimate_ms
            sample = self.sensing.bandwidth.upload_finished(ticket, res.request_bytes, end, server_ms, rtt)
        else:
            self.sensing.bandwidth.upload_failed(ticket)
        return EdgeAnswer(
            logits=res.logits,
            queue_ms=res.queue_ms,
            compute_ms=res.compute_ms,
            request_bytes=res.request_bytes,
            elapsed_ms=elapsed_ms,
            cpu_ms=cpu_ms,
            overlapped=overlapped,
            sample_mbps=sample,
            exits_taken=res.exits_taken,
        )

    async def round_trip_ms(self, url: str) -> float | None:
        """One `GET /v2/health/live` round trip (ms) through the emulated delay, or None when
        it fails or the worker is not live."""
        try:
            async with self._using(url) as client:
                t0 = time.perf_counter()
                if self.shaper is not None:
                    await self.shaper.delay()
                live = await client.live()
        except (ClientError, EdgeFailure):
            return None
        return (time.perf_counter() - t0) * 1000.0 if live else None

    async def aclose(self) -> None:
        while self._clients:
            await self._clients.popitem()[1].aclose()
