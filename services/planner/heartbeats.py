"""Heartbeat intake: a worker's heartbeat registered in the worker registry
(`dapdee.planner.workers.WorkerRegistry`) and, where it states less capacity than the worker's
leases book, those leases re-solved for it (`dapdee.planner.rebalancing.Rebalancer.shed`).

Where rebalancing is periodic, the registry refuses a heartbeat whose capacity the worker's
leases book past ρ_max of (CapacityBelowLeases); it is then registered together with those
leases re-solved for it. Failing that, it is registered as it is (counted in
`dapdee_planner_rebalances_total{result="forced"}`) unless a newer heartbeat stands by then. The
rebalance after a capacity drop (`Rebalancer.note_capacity`) is the route's to call.
"""

from __future__ import annotations

import logging

from dapdee.planner.config import Settings
from dapdee.planner.errors import RedisUnavailable
from dapdee.planner.metrics import PlannerMetrics
from dapdee.planner.rebalancing import Rebalancer
from dapdee.planner.workers import CapacityBelowLeases, Worker, WorkerRegistry

log = logging.getLogger("dapdee.planner")


class HeartbeatIntake:
    """Registers workers' heartbeats in `registry`, re-solving a worker's leases through
    `rebalancer` when its capacity drops below them (module docstring)."""

    def __init__(
        self, settings: Settings, metrics: PlannerMetrics, registry: WorkerRegistry, rebalancer: Rebalancer
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.rebalancer = rebalancer

    async def record(self, worker: Worker) -> bool:
        """Record a heartbeat; True if Redis has it (CapacityExceeded for a new worker past the cap).
        Where rebalancing is periodic, a heartbeat whose capacity the worker's leases book past
        ρ_max of is recorded together with those leases re-solved for it (`Rebalancer.shed`);
        failing that, as it is (counted as `forced`) unless a newer heartbeat stands by then
        (`_register_refused`), and the rebalance after a capacity drop follows
        (`Rebalancer.note_capacity`, called by the route)."""
        rho = self.settings.rho_max if self.settings.fleet_planning and self.settings.rebalance_s else None
        for _ in range(2):  # again once after waiting for another re-solve of this worker
            try:
                return await self.registry.heartbeat(worker, rho)
            except CapacityBelowLeases as refused:
                refused_at_ms = refused.refused_at_ms
            shed = await self._shed(worker, refused_at_ms)
            if shed:  # registered with its leases, or kept out by a newer heartbeat: read which
                try:
                    await self.registry.sync()
                except RedisUnavailable:
                    self.registry.noted(worker, shared=True)
                return True
            if shed is False:
                break
        return await self._register_refused(worker, refused_at_ms)

    async def _register_refused(self, worker: Worker, refused_at_ms: int) -> bool:
        """The refused heartbeat registered as it is, over its leases (counted as `forced`),
        unless a heartbeat registered or refused since is newer or the worker expired meanwhile:
        then this replica reads what the registry holds instead. True if Redis holds the outcome
        (without Redis the heartbeat is kept here, as any heartbeat then is)."""
        try:
            registered = await self.registry.register_refused(worker, refused_at_ms)
            if not registered:
                log.info("worker %s: a newer heartbeat stands; the refused one is not registered", worker.url)
                await self.registry.sync()
                return True
        except RedisUnavailable:
            self.registry.noted(worker, shared=False)
            return False
        self.metrics.rebalances.labels("forced").inc()
        log.warning("worker %s: %.1f ms/s registered over its leases (not re-solved with it)", worker.url,
                    worker.capacity_ms_per_s)  # fmt: skip
        return True

    async def _shed(self, worker: Worker, refused_at_ms: int) -> bool | None:
        """`Rebalancer.shed`, with any failure a False (the heartbeat is still recorded)."""
        try:
            return await self.rebalancer.shed(worker, self.registry.ttl_ms, refused_at_ms)
        except RedisUnavailable:
            return False
        except Exception:
            log.exception("worker %s: re-solving its leases for the capacity it states failed", worker.url)
            return False
