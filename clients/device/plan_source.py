"""Where the runtime's plans come from. Two sources, chosen explicitly:

- `FixedPlanSource`: one plan, never replaced (benchmarks, a pinned cut, `--plan FILE`).
- `PlannerPlanSource`: `POST /plan` through the SDK (`dapdee.client.AsyncPlannerClient`) with
  the device's sensed conditions, its requirements, its profile tier, when it has one its
  `device_id` (so the plan carries a lease; the runtime re-plans at the lease's
  `replan_after_s`), and the workers it rests after failures as `avoid_workers` (so a worker
  that heartbeats but that this device cannot use is not handed back to it). Every answer is
  checked against the device's cost graph (`plans.plan_from_answer`) before it is used. While
  no new plan is in hand (the planner cannot be asked, or a re-plan is still waiting for its
  answer), `meanwhile` keeps the current plan while its lease lasts (forever when it has none,
  or the planner could not store it: `expires_in_s` 0) and then answers the Device-Only plan;
  the runtime asks it on every tick and every frame, so the device never leans on an edge
  reservation that has lapsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from dapdee.client import ApiError, AsyncPlannerClient, ClientError, ProtocolError, TransportError
from dapdee.client.transport import DEFAULT_TIMEOUT_S
from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions
from dapdee.device.config import Requirements
from dapdee.device.edge import WorkerEntry
from dapdee.device.plans import device_only_plan, plan_from_answer
from dapdee.device.types import DeviceError, Plan, PlanError, PlannerUnavailable
from dapdee.web import otel
from dapdee.web.otel import NO_TRACING, Tracing

log = logging.getLogger("dapdee.device.plans")

RETRY_S = 0.3  # spacing of first-plan retries while the edge registers
RETRY_AFTER_MAX_S = 5.0  # a first-plan retry waits the answer's Retry-After, at most this
REREGISTER_SPACING_S = 1.0
TRANSIENT = (None, 409, 503)  # no answer, timings not registered yet, busy: worth asking again


class PlanSource(Protocol):
    """What the runtime asks of a plan source. `replans`: whether asking again can give
    another plan (False: the runtime never re-plans)."""

    replans: bool

    async def first(self, cond: Conditions) -> Plan:
        """The plan to start with (DeviceError when there cannot be one)."""
        ...

    async def plan(self, cond: Conditions) -> Plan:
        """A new plan for `cond`: PlannerUnavailable or PlanError when there is none."""
        ...

    def meanwhile(self, current: Plan, cond: Conditions, now: float) -> Plan:
        """The plan to run while no new one can be had."""
        ...

    async def aclose(self) -> None: ...


class FixedPlanSource:
    """Always `plan`: no planner, no re-planning."""

    replans = False

    def __init__(self, plan: Plan) -> None:
        self.fixed = plan

    async def first(self, cond: Conditions) -> Plan:
        return self.fixed

    async def plan(self, cond: Conditions) -> Plan:
        return self.fixed

    def meanwhile(self, current: Plan, cond: Conditions, now: float) -> Plan:
        return current

    async def aclose(self) -> None:
        return None


async def listed_workers(planner: AsyncPlannerClient) -> list[WorkerEntry]:
    """The planner's live workers (`GET /workers`): URL and models of each."""
    listed = await planner.workers()
    return [WorkerEntry(w.url, tuple(w.models)) for w in listed.workers]


def unavailable(exc: ClientError) -> PlannerUnavailable:
    """The SDK error as PlannerUnavailable, with the answer's status and Retry-After. O(1)."""
    if isinstance(exc, ApiError):
        reason = f"POST /plan: HTTP {exc.status}: {exc.detail[:200] or exc.title}"
        return PlannerUnavailable(reason, exc.status, exc.retry_after_s)
    return PlannerUnavailable(str(exc)[:240])


def transient(exc: PlannerUnavailable) -> bool:
    """Whether asking again soon may give a plan: no answer, a 409 or 503, or any answer with
    `Retry-After` (e.g. the 404 of a replica that cannot read the model while Redis is away:
    the model may exist, DESIGN §9). O(1)."""
    return exc.status in TRANSIENT or exc.retry_after_s is not None


def retry_delay(retry_after_s: float | None, left_s: float) -> float:
    """How long to wait before asking the planner again at start-up: the answer's Retry-After
    (at least RETRY_S, at most RETRY_AFTER_MAX_S) or RETRY_S, never past a deadline `left_s`
    away. O(1)."""
    wait = RETRY_S if retry_after_s is None else max(RETRY_S, min(retry_after_s, RETRY_AFTER_MAX_S))
    return max(0.0, min(wait, left_s))


class PlannerPlanSource:
    """Plans from the planner (see the module docstring). `avoid` (optional) names the workers
    each request asks the planner to avoid. `reregister` (optional) uploads the device profile
    again; it is called once when the planner answers 404/409 without
    `Retry-After` (it lost the model or this tier's profile, e.g. a restart without Redis), at
    most every REREGISTER_SPACING_S. A 404 with `Retry-After` is a replica that cannot read the
    model while Redis is away: the model may well exist, so it is asked again later, never
    uploaded again (with an admin token that would queue the device's graph over the stored
    one)."""

    replans = True

    def __init__(
        self,
        planner: AsyncPlannerClient,
        graph: CostGraph,
        requirements: Requirements,
        tier: str | None = None,
        device_id: str | None = None,
        ready_timeout_s: float = 60.0,
        worker_wait_s: float = 5.0,
        reregister: Callable[[], Awaitable[None]] | None = None,
        tracing: Tracing = NO_TRACING,
        avoid: Callable[[], list[str]] | None = None,
    ) -> None:
        if device_id is not None and requirements.frame_rate is None:
            raise ValueError("a device id (a lease) needs a frame rate: give --frame-rate")
        self.planner = planner
        self.graph = graph
        self.requirements = requirements
        self.tier = tier
        self.device_id = device_id
        self.ready_timeout_s = ready_timeout_s
        self.worker_wait_s = worker_wait_s
        self.reregister = reregister
        self.tracing = tracing
        self.avoid = avoid
        self._registered_at = time.monotonic()
        self.landing_until = 0.0  # a POST /plan cut off unanswered may reach the planner until then

    def body(self, cond: Conditions) -> dict[str, Any]:
        """The plan request for `cond`: the model, the conditions, the tier, the device id, the
        requirements and the workers to avoid (`avoid()`, those resting after failures)."""
        body: dict[str, Any] = {
            "model": self.graph.model,
            "bandwidth_mbps": min(max(cond.bandwidth_mbps, 1e-3), 1e6),
            "rtt_ms": min(cond.rtt_ms, 1e6),
            "device_load": min(cond.device_load, 0.95),
        }
        if self.tier is not None:
            body["device_tier"] = self.tier
        if self.device_id is not None:
            body["device_id"] = self.device_id
        avoid = self.avoid() if self.avoid is not None else []
        if avoid:
            body["avoid_workers"] = avoid
        return body | self.requirements.plan_fields()

    async def _ask(self, cond: Conditions) -> Plan:
        """One POST /plan for `cond`, checked against the graph. Raises PlannerUnavailable or
        PlanError. O(V + E) beyond the request."""
        body = self.body(cond)
        with self.tracing.span(otel.PLANNER, {otel.ATTR_MODEL: self.graph.model}) as span:
            # the planner starts the lease's TTL before it answers: count it from the request
            sent = time.monotonic()
            try:
                answer = await self.planner.plan(body)
            except ProtocolError as exc:
                raise PlanError(f"planner answer breaks the contract: {exc.detail[:200]}") from None
            except (ApiError, TransportError) as exc:
                if isinstance(exc, TransportError) and exc.may_have_been_sent:
                    self._unanswered(sent)
                raise unavailable(exc) from None
            except asyncio.CancelledError:  # the re-planner stops at close: the request may be on its way
                self._unanswered(sent)
                raise
            plan = plan_from_answer(
                answer.model_dump(mode="json"), self.graph, body["bandwidth_mbps"], body["device_load"], now=sent
            )
            span.set_attributes({otel.ATTR_EXIT: plan.exit, otel.ATTR_CUT: plan.cut})
        return plan

    async def plan(self, cond: Conditions) -> Plan:
        """POST /plan; on a 404/409 without Retry-After the profile is uploaded again (when it
        can be) and the plan asked for once more. Raises PlannerUnavailable or PlanError."""
        try:
            return await self._ask(cond)
        except PlannerUnavailable as exc:
            recent = time.monotonic() - self._registered_at < REREGISTER_SPACING_S
            lost = exc.status in (404, 409) and exc.retry_after_s is None  # else: ask again later
            if not lost or self.reregister is None or recent:
                raise
            log.warning("the planner lacks the model or this device's profile (HTTP %s); uploading again", exc.status)
            self._registered_at = time.monotonic()
            try:
                await self.reregister()
            except (ClientError, DeviceError) as again:
                raise PlannerUnavailable(f"uploading the device profile again failed: {again}") from None
            return await self._ask(cond)

    async def first(self, cond: Conditions) -> Plan:
        """The first plan. A transient refusal (`transient`: a 409 while the edge has not
        registered its profile yet, a refused connection, a 503, a 404 with Retry-After while
        the planner's Redis is away) is retried until `ready_timeout_s`; a plan naming no worker
        (one may be registering) for up to `worker_wait_s`. DeviceError when the planner
        refuses."""
        start = time.monotonic()
        while True:
            try:
                plan = await self.plan(cond)
            except PlannerUnavailable as exc:
                left = self.ready_timeout_s - (time.monotonic() - start)
                if not transient(exc) or left <= 0:
                    raise DeviceError(f"planner {self.planner.base_url}: {exc.reason}") from None
                await asyncio.sleep(retry_delay(exc.retry_after_s, left))
                continue
            except PlanError as exc:
                raise DeviceError(f"planner {self.planner.base_url}: {exc}") from None
            if plan.edge_worker or not plan.uses_edge or time.monotonic() - start > self.worker_wait_s:
                return plan
            await asyncio.sleep(RETRY_S)

    def meanwhile(self, current: Plan, cond: Conditions, now: float) -> Plan:
        """`current` while its lease lasts (or it has none, or the planner stored none, or it
        needs no edge); after the lease's expiry the Device-Only plan. O(1)."""
        lease = current.lease
        if lease is None or not current.uses_edge or now < lease.expires_at:
            return current
        return device_only_plan(self.graph, cond)

    def _unanswered(self, sent: float) -> None:
        """Note a POST /plan sent at `sent` that ended without an answer (cancelled, or its
        connection lost after it may have gone out): the planner may still act on it, storing a
        lease, until the call's own deadline (the planner client's `timeout_s`). O(1)."""
        timeout_s = getattr(self.planner, "timeout_s", DEFAULT_TIMEOUT_S)
        self.landing_until = max(self.landing_until, sent + timeout_s)

    async def aclose(self) -> None:
        """End the lease when the SDK offers `release` (else it lapses at its expiry). A POST
        /plan cut off without an answer (a renewal the re-planner cancelled at close) could
        reach the planner after the release and store a lease for a device that has gone: the
        release waits for that request's deadline first (`landing_until`: at most the planner
        client's `timeout_s` after it was sent). A planner that acts on a request after the
        device's deadline for it is not covered: that lease lapses at its expiry. The planner
        client stays open: its owner closes it."""
        release = getattr(self.planner, "release", None)
        if self.device_id is None or release is None:
            return
        wait_s = self.landing_until - time.monotonic()
        if wait_s > 0:
            log.info(
                "releasing the lease of %s in %.1f s, after a cut-off plan request's deadline", self.device_id, wait_s
            )
            await asyncio.sleep(wait_s)
        try:
            await release(self.device_id)
        except ClientError as exc:
            log.info("could not release the lease of %s: %s", self.device_id, exc)
