"""One frame under a given plan: where it runs, and whether it may still go to the edge.

`FramePath.execute` runs one frame with the plan it is handed and answers an `Outcome`: the
plan's device part on the compute backend, the `transfer` tensors to the plan's worker
(`EdgeLink`), the exit's logits back. A plan without edge nodes runs wholly on the device. When
the edge fails, times out, answers something off contract, rests after a failure, or no trusted
worker is named, the frame is finished on the device from the values it already has, at the
planned exit or an earlier one when the latency budget demands it (`fallback`): no frame is
lost. A plan made with confidence exits (`Plan.progressive`) runs the device side with its heads
(`dapdee.device.progressive`): a frame a device head is confident about leaves at once, sending
nothing; the others go to the edge with `confidence: true` when the edge has heads to check.

`EdgeGate` keeps the edge failure bookkeeping and says whether a frame whose tensors are ready
may go to its worker. One outage of a worker (the failures of the frames in flight when it
began) asks for one new plan. A frame whose plan's lease lapsed while its device part ran (a
pipelined frame may wait for the compute thread) is finished on the device too, sending
nothing: the lease is checked again when the tensors are ready to go, unless a renewed plan in
force sends to the same worker; so is one whose worker began a rest meanwhile (another frame's
failure, a Retry-After), one whose plan was replaced by one booked on another worker, and one
still running when the runtime closed (its lease is released then). A plan naming no worker
asks for a new plan, spaced by a back-off (the planner names none while no live worker serves
the model).

Each frame's `device.compute` and `uplink` spans are opened here (with `--otel`), inside the
`device.frame` span of `DeviceRuntime.infer`; the `traceparent` sent with the infer request
joins the edge's spans to them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from dapdee.costgraph import CostGraph
from dapdee.device.compute import ComputeBackend
from dapdee.device.config import RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink
from dapdee.device.fallback import fallback_exit
from dapdee.device.progressive import device_answer, edge_exit
from dapdee.device.replanner import LEASE_EXPIRED, Replanner
from dapdee.device.sensing import Sensing
from dapdee.device.types import EdgeFailure, Plan
from dapdee.web import otel
from dapdee.web.otel import Tracing

# why a frame whose tensors were ready went no further than the device (its record's `error`)
BACKING_OFF = "edge backing off"
CLOSED = "runtime closed"
REPLANNED = "re-planned onto another worker"
REPLANNED_LOCAL = "re-planned to run on the device"  # a new plan that sends nothing

log = logging.getLogger("dapdee.device")


@dataclass(frozen=True)
class Outcome:
    """How a frame was answered, before it becomes a record."""

    logits: torch.Tensor
    where: str
    exit: str
    device_nodes: int
    device_ms: float
    bytes_sent: int = 0
    edge_queue_ms: float | None = None
    edge_compute_ms: float | None = None
    error: str | None = None


class EdgeGate:
    """Which worker a plan's frames go to, whether a frame whose tensors are ready may go there
    now (`refusal`), and the edge failure bookkeeping that rests a worker and asks the
    re-planner for a new plan (see the module docstring). `edge` is the edge access (None: no
    edge at all), `edge_url` a worker that overrides the plans' own, `closed` whether the
    runtime has closed. `replanner` is set by `DeviceRuntime.start` with the first plan: frames
    run only after that."""

    def __init__(
        self, edge: EdgeLink | None, edge_url: str | None, config: RuntimeConfig, closed: Callable[[], bool]
    ) -> None:
        self.edge = edge
        self.edge_url = edge_url
        self.config = config
        self.replanner: Replanner | None = None
        self._closed = closed
        self._no_worker = self._worker_wait()  # spaces the re-plans asked for while no worker is named

    def worker(self, plan: Plan) -> str | None:
        return self.edge_url or plan.edge_worker

    def worker_named(self) -> None:
        """A plan naming a worker was put in use: the no-worker back-off starts afresh. O(1)."""
        self._no_worker = self._worker_wait()

    def _worker_wait(self) -> Backoff:
        """A fresh back-off for the re-plans asked for while no worker is named."""
        return Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)

    def refusal(self, plan: Plan, url: str) -> str | None:
        """Why a frame of `plan` whose tensors are ready may not go to worker `url` now (None:
        it may): the runtime closed (the lease is released); the worker rests (another frame's
        failure or a Retry-After since this frame started); the booking is not there: the plan
        in force now (`plan` itself while its lease lasts, a renewal, or Device-Only once the
        lease lapsed with no renewal, or a new plan that sends nothing) does not send to `url`. O(1)."""
        assert self.edge is not None and self.replanner is not None
        if self._closed():
            return CLOSED
        if self.edge.backoff_of(url).resting():
            return BACKING_OFF
        in_force = self.replanner.in_force()
        if in_force is plan or (in_force.uses_edge and self.worker(in_force) == url):
            return None
        if in_force.uses_edge:
            return REPLANNED
        # Device-Only in force: the stand-in for a lapsed lease, or a planner's answer
        return LEASE_EXPIRED if in_force.origin == "device-only" else REPLANNED_LOCAL

    def failed(self, exc: EdgeFailure, url: str, since: int) -> None:
        """Rest worker `url` (its `Backoff.failed`: at least its Retry-After, doubled only by
        the first failure of an outage) and ask for a new plan, once per outage: the failures
        of frames in flight when its rest began (`Backoff.began_since`) ask for none, the first
        one's request covers them. A worker never contacted (`exc.worker_fault` false: the planner
        does not list it, or the request could not be made) is not rested: only a new plan is
        asked for. O(1)."""
        assert self.edge is not None and self.replanner is not None
        if not exc.worker_fault:  # told once per request for a plan, not once per frame
            if self.replanner.request("edge trouble"):
                self.replanner.events.append(f"edge refused ({exc.reason}); asking for a new plan")
                log.warning("edge refused: %s", exc.reason)
            return
        backoff = self.edge.backoff_of(url)
        counted = backoff.began_since(since)  # this outage already asked for a plan
        rest = backoff.failed(since, exc.retry_after_s)
        asked = "a new plan already asked for" if counted else "asking for a new plan"
        self.replanner.events.append(f"edge failure ({exc.reason}); local for {rest:.1f} s, {asked}")
        log.warning("edge failure: %s; backing off %.1f s", exc.reason, rest)
        if not counted:
            self.replanner.request("edge trouble")

    def ask_for_worker(self) -> None:
        """Ask for a plan naming a worker, at most once per rest of a back-off (`backoff_initial_s`
        doubling up to `backoff_max_s`, reset by a plan that names one): while no live worker
        serves the model the planner answers `edge_worker: null` again, and asking every
        `min_replan_s` for as long as frames flow would only load it. O(1)."""
        assert self.replanner is not None
        if self._no_worker.resting():
            return
        self._no_worker.failed(self._no_worker.rests)
        self.replanner.request("no edge worker")


class FramePath:
    """Runs one frame under a given plan (see the module docstring): `graph` is the device's
    cost graph (it prices fallbacks), `compute` the backend, `gate` the edge access (its
    `edge`; None: no edge at all), what says whether a ready frame may go to the edge and notes
    how it went; `sensing`'s device load prices a fallback's exit. Holds no per-frame state."""

    def __init__(
        self,
        graph: CostGraph,
        compute: ComputeBackend,
        config: RuntimeConfig,
        sensing: Sensing,
        gate: EdgeGate,
        tracing: Tracing,
    ) -> None:
        self.graph = graph
        self.frame_data = graph.input_dependent() | {graph.input.name}  # what a split sends the edge
        self.compute = compute
        self.config = config
        self.sensing = sensing
        self.gate = gate
        self.tracing = tracing

    async def execute(self, plan: Plan, x: torch.Tensor, index: int, t_start: float) -> Outcome:
        """Frame `x` (number `index`, begun at perf_counter `t_start`) answered under `plan`:
        wholly on the device, split with the edge, or finished on the device without it."""
        if not plan.uses_edge:
            return await self._local(plan, x)
        url = self.gate.worker(plan)
        if url is None or self.gate.edge is None:
            self.gate.ask_for_worker()
            return await self._without_edge(plan, x, t_start, "no edge worker")
        backoff = self.gate.edge.backoff_of(url)  # the rest of this worker: another's failures do not hold it
        if backoff.resting():
            return await self._without_edge(plan, x, t_start, BACKING_OFF)
        return await self._split(plan, x, url, index, t_start, backoff.rests)

    async def _local(self, plan: Plan, x: torch.Tensor) -> Outcome:
        node = self.graph.exit(plan.exit).node
        if plan.progressive is not None:
            _, _, early = await self._device_heads(plan, x, [node])
            assert early is not None  # with no edge part the planned exit answers on the device
            return early
        done = await self.compute.run({self.graph.input.name: x}, [node], set(plan.device_nodes))
        return Outcome(done.values[node], "local", plan.exit, plan.cut, done.ms)

    async def _device_heads(
        self, plan: Plan, x: torch.Tensor, targets: list[str]
    ) -> tuple[dict[str, Any], float, Outcome | None]:
        """The device side of a plan with confidence exits: (the targets' values, device ms,
        the frame's outcome when a device head, or the planned exit, answered it)."""
        sides = plan.progressive
        assert sides is not None
        inp = self.graph.input.name
        done = await self.compute.progressive({inp: x}, sides.device, targets, set(sides.device.nodes))
        answered = device_answer(done.result, sides)
        if answered is not None:
            return {}, done.ms, Outcome(answered[1], "local", answered[0], plan.cut, done.ms)
        return done.result.values, done.ms, None

    async def _fallback(
        self, plan: Plan, given: dict[str, Any], t_start: float, reason: str, device_ms: float = 0.0
    ) -> Outcome:
        """Finish the frame on the device from `given` (an earlier exit if the budget says so)."""
        elapsed = (time.perf_counter() - t_start) * 1000.0
        budget = self.config.requirements.latency_budget_ms
        # priced from the very values it then runs from: what `compute.run(given, ...)` runs
        exit_name = fallback_exit(self.graph, plan.exit, set(given), elapsed, budget, self.sensing.device_load)
        node = self.graph.exit(exit_name).node
        done = await self.compute.run(given, [node])
        cut = len(self.graph.ancestors(node))
        return Outcome(done.values[node], "fallback", exit_name, cut, device_ms + done.ms, error=reason)

    async def _device_part(self, plan: Plan, x: torch.Tensor) -> tuple[dict[str, Any], float, Outcome | None]:
        """The device part of a split plan: (the values of the tensors it sends, device ms, the
        frame's outcome when a device confidence head answered it). Values computed from
        parameters alone are left out: the edge computes them itself, and they carry no batch
        dimension to send. Cost: the device part's compute (to the first confident head)."""
        inp = self.graph.input.name
        targets = [n for n in plan.transfer_nodes if n in self.frame_data and n != inp]
        if plan.progressive is not None and (targets or plan.progressive.device.heads):
            with self.tracing.span(otel.DEVICE_COMPUTE, {otel.ATTR_CUT: plan.cut}):
                return await self._device_heads(plan, x, targets)
        if not targets:
            return {}, 0.0, None
        with self.tracing.span(otel.DEVICE_COMPUTE, {otel.ATTR_CUT: plan.cut}):
            done = await self.compute.run({inp: x}, targets, set(plan.device_nodes))
        return done.values, done.ms, None

    async def _without_edge(self, plan: Plan, x: torch.Tensor, t_start: float, reason: str) -> Outcome:
        """A split frame with no edge to send to (`reason`: none named, or it rests): its
        device confidence heads first when the plan has some (a confident head answers it as
        in a split, `where` local), else the local fallback, from the values the device part
        computed when it ran. Cost: at most the device part, then the fallback's compute."""
        inp = self.graph.input.name
        if plan.progressive is None or not plan.progressive.device.heads:
            return await self._fallback(plan, {inp: x}, t_start, reason)
        values, device_ms, early = await self._device_part(plan, x)
        if early is not None:
            return early
        return await self._fallback(plan, {inp: x, **values}, t_start, reason, device_ms)

    async def _split(self, plan: Plan, x: torch.Tensor, url: str, index: int, t_start: float, since: int) -> Outcome:
        """Device part, upload, edge answer; a failure on the way, or a frame that may no longer
        send when its device part is done (`EdgeGate.refusal`), is finished locally (`since`: the worker's
        back-off's `rests` when the frame started, so one outage doubles it once and a late answer does
        not undo that). A failed upload's outcome counts the bytes that left (`bytes_sent`)."""
        assert self.gate.edge is not None
        inp = self.graph.input.name
        # values computed from parameters alone are the same for every frame (`_device_part`)
        sent_nodes = [n for n in plan.transfer_nodes if n in self.frame_data]
        values, device_ms, early = await self._device_part(plan, x)
        if early is not None:
            return early
        refused = self.gate.refusal(plan, url)
        if refused is not None:
            return await self._fallback(plan, {inp: x, **values}, t_start, refused, device_ms)
        sent = {n: (x if n == inp else values[n]) for n in sent_nodes}
        timeout = self.config.edge_timeout_s(plan.predicted_ms)
        answer = None
        try:
            with self.tracing.span(otel.UPLINK, {otel.ATTR_EXIT: plan.exit}) as span:
                traceparent = span.context.traceparent if self.tracing.enabled and span.context else None
                answer = await self.gate.edge.infer(
                    url, sent, plan.exit, timeout, str(index), traceparent, confidence=plan.edge_confidence
                )
                span.set_attribute(otel.ATTR_BYTES_SENT, answer.request_bytes)
                taken = edge_exit(plan.progressive, plan.exit, answer.exits_taken)
        except EdgeFailure as exc:
            self.gate.failed(exc, url, since)
            out = await self._fallback(plan, {inp: x, **values}, t_start, exc.reason, device_ms)
            return replace(out, bytes_sent=exc.bytes_sent if answer is None else answer.request_bytes)
        self.gate.edge.backoff_of(url).succeeded(since)
        return Outcome(
            answer.logits, "edge", taken, plan.cut, device_ms, answer.request_bytes, answer.queue_ms,
            answer.compute_ms,
        )  # fmt: skip
