"""Re-planning in the background: frames never wait for it.

`ReplanPolicy.reason` says why the current plan should be replaced (None: it should not):
edge trouble, the lease's `replan_after_s` reached (also for a lease the planner could not
store, so the device holds a stored one soon after the planner's Redis is back; 0 means at
once, so the device re-plans every `min_replan_s`), the lease expired, the uplink estimate or
the device speed 1/(1 − load) drifted past the threshold (relative) since the plan was asked
for, or the plan aged. `Replanner.tick` starts at most one re-plan at a time, at most every
`min_replan_s`, and after a failed one waits before the next (longer when the planner's
`Retry-After` says so); a failure (any error of the source's, an unexpected one logged with
its traceback) keeps the current plan and the trouble that asked for it (edge trouble, a
lapsed lease), so it is asked again then; a success answers a lapse of the lease that came
while it ran (its plan replaces the lapsed one), so no second request follows for it.
`Replanner.in_force` honours the lease on every tick and every frame, whether or not a re-plan
is in flight (a hanging planner holds one for its whole timeout): once the current plan's lease
has lapsed, the plan the source says to run meanwhile (Device-Only) is put in use at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from dapdee.costmodel import Conditions
from dapdee.device.config import RuntimeConfig
from dapdee.device.plan_source import RETRY_AFTER_MAX_S, PlanSource
from dapdee.device.sensing import Sensing, drifted, load_drifted
from dapdee.device.types import Plan, PlanError, PlannerUnavailable
from dapdee.web.tasks import finish_or_stop

log = logging.getLogger("dapdee.device.replan")

MAX_EVENTS = 200
MAX_PLANS = 1000  # plans kept for people and tests (a leased device re-plans every few seconds)
RETRY_MAX_S = 2.0  # after a failed re-plan, the next one waits min(plan_max_age_s, this)
LEASE_EXPIRED = "lease expired"  # the reason a lapsed lease asks for a plan


class ReplanPolicy:
    """Why a plan should be replaced (see the module docstring). Pure; O(1)."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config

    def reason(self, plan: Plan, sensing: Sensing, now: float, trouble: str | None) -> str | None:
        """Why `plan` should be replaced at monotonic time `now`, or None. O(1)."""
        c = self.config
        if trouble is not None:
            return trouble
        lease = plan.lease
        if lease is not None and now >= lease.replan_at:
            if not lease.stored:
                return "lease not stored"  # the planner's Redis was away: ask for a stored one
            return "lease replan_after_s" if now < lease.expires_at else LEASE_EXPIRED
        if drifted(plan.bandwidth_mbps, sensing.bandwidth_mbps, c.replan_threshold):
            return "bandwidth drift"
        if load_drifted(plan.device_load, sensing.device_load, c.replan_threshold):
            return "load drift"
        if now - plan.requested_at > c.plan_max_age_s:
            return "plan age"
        return None


def quiet_after_failure(exc: Exception, plan_max_age_s: float) -> float:
    """How long a failed re-plan holds off the next (s): min(`plan_max_age_s`, RETRY_MAX_S), or
    the planner's `Retry-After` when longer (at most RETRY_AFTER_MAX_S, as at start-up: a
    lapsed lease runs Device-Only meanwhile, so the device must not wait on a proxy's hour)."""
    quiet = min(plan_max_age_s, RETRY_MAX_S)
    retry_after = exc.retry_after_s if isinstance(exc, PlannerUnavailable) else None
    return max(quiet, min(retry_after, RETRY_AFTER_MAX_S)) if retry_after is not None else quiet


def conditions(sensing: Sensing) -> Conditions:
    """The sensed conditions a plan request states."""
    return Conditions(sensing.bandwidth_mbps, sensing.request_rtt_ms, sensing.device_load, 0.0)


class Replanner:
    """Keeps `current` fresh from `source` (see the module docstring); `on_plan(plan)` is told
    of each plan put in use. `events` keeps the last notable happenings for people."""

    def __init__(
        self,
        source: PlanSource,
        sensing: Sensing,
        config: RuntimeConfig,
        current: Plan,
        on_plan: Callable[[Plan], None],
    ) -> None:
        self.source = source
        self.sensing = sensing
        self.config = config
        self.policy = ReplanPolicy(config)
        self.current = current
        self.on_plan = on_plan
        self.plans: deque[Plan] = deque([current], maxlen=MAX_PLANS)
        self.events: deque[str] = deque(maxlen=MAX_EVENTS)
        self._trouble: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_start = 0.0
        self._quiet_until = 0.0

    def request(self, reason: str) -> bool:
        """Ask for a re-plan at the next tick (e.g. after edge trouble). Whether this asks anew:
        False while an earlier request still waits for its re-plan to start. A lapsed lease's
        request never replaces another reason: a re-plan in flight answers the lapse (its plan
        replaces the lapsed one) but not the other trouble, which must still ask."""
        anew = self._trouble is None
        if anew or self._trouble == LEASE_EXPIRED:
            self._trouble = reason
        return anew

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def in_force(self) -> Plan:
        """The plan to run now: `current`, unless its lease has lapsed; then the source's plan
        for meanwhile (Device-Only), put in use here, re-plan in flight or not, and a re-plan
        asked for (the Device-Only plan holds no lease that would ask). O(1) while the lease
        lasts."""
        meanwhile = self.source.meanwhile(self.current, conditions(self.sensing), time.monotonic())
        if meanwhile is not self.current:
            self._use(meanwhile, LEASE_EXPIRED)
            self.request(LEASE_EXPIRED)
        return self.current

    def tick(self) -> None:
        """Honour the lease (`in_force`), then start a re-plan when one is due and none is
        running. O(1)."""
        self.in_force()
        if not self.source.replans or self.busy:
            return
        now = time.monotonic()
        if now < self._quiet_until or now - self._last_start < self.config.min_replan_s:
            return
        trouble = self._trouble
        why = self.policy.reason(self.current, self.sensing, now, trouble)
        if why is not None:
            self._last_start = now
            self._trouble = None  # a request arriving while this re-plan runs asks again
            self._task = asyncio.create_task(self._replan(why, trouble))

    def _use(self, plan: Plan, why: str) -> None:
        old = self.current
        self.current = plan
        self.plans.append(plan)
        if (old.exit, old.device_nodes, old.edge_worker) != (plan.exit, plan.device_nodes, plan.edge_worker):
            self.events.append(
                f"plan {plan.plan_id} ({why}): exit {plan.exit}, {plan.cut} device nodes, "
                f"bw {plan.bandwidth_mbps:.3g} Mbit/s, load {plan.device_load:.2f}"
            )
        self.on_plan(plan)

    async def _replan(self, why: str, trouble: str | None) -> None:
        """Ask the source for a plan and put it in use; on failure keep the current plan and
        the `trouble` that asked for this one, so it is asked again after the quiet time (not
        only at the plan's age: a Device-Only plan after a lapsed lease holds no lease to ask).
        On success a "lease expired" request that `in_force` made meanwhile is dropped: the new
        plan replaces the lapsed one (should it lapse too, `in_force` asks again). O(1) plus
        the plan request."""
        cond = conditions(self.sensing)
        try:
            plan = await self.source.plan(cond)
        except (PlannerUnavailable, PlanError) as exc:
            log.warning("re-plan failed (%s): %s", why, exc)
            self._failed(why, trouble, exc)
            return
        except Exception as exc:  # a bug on the way must not end re-planning, nor make it spin
            log.exception("re-plan failed unexpectedly (%s)", why)
            self._failed(why, trouble, exc)
            return
        log.info("re-planned (%s): exit %s, %d device nodes", why, plan.exit, plan.cut)
        if self._trouble == LEASE_EXPIRED:  # the lease lapsed while this re-plan ran: its plan replaces it
            self._trouble = None
        self._use(plan, why)

    def _failed(self, why: str, trouble: str | None, exc: Exception) -> None:
        """A re-plan that failed: told in `events`, the next one held off for the quiet time
        (`quiet_after_failure`), and the `trouble` that asked for it kept so it asks again."""
        self.events.append(f"re-plan failed ({why}): {exc}")
        self._quiet_until = time.monotonic() + quiet_after_failure(exc, self.config.plan_max_age_s)
        if self._trouble is None:
            self._trouble = trouble

    async def aclose(self, wait_s: float = 2.0) -> None:
        """Let a re-plan in flight finish (at most `wait_s`), then cancel it. A plan request
        so cut off may still reach the planner: the source's `aclose` (which releases the
        lease) waits for its deadline first (`PlannerPlanSource.aclose`)."""
        if self._task is not None:
            await finish_or_stop(self._task, wait_s)
