"""Which plan a leased device gets, given its lease record, its request and what the other
devices reserve on each candidate worker.

A device whose lease carries a plan assigned by a rebalance gets that plan back while its
conditions have not drifted (`lease_drift`), re-priced at the load the others put on its worker.
Otherwise it keeps the plan it holds while that is still admissible and within the switching
margin of the exact plan (`switch_margin` μ: as many requirements met, no less accuracy, and
its time t·(1 − μ) <= the exact plan's), so near-ties do not move devices back and forth; the
rebalance credits held plans the same way. Otherwise it gets the exact plan of
`dapdee.fleet.assign`.

Rebalancing, which re-solves every worker's leases together and assigns the plans this module
hands back, is `dapdee.planner.rebalancing`.

The reservations come in as figures: nothing here reads Redis or counts metrics
(`dapdee.planner.fleet` reserves what is chosen here).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dapdee.costgraph import CostGraphError
from dapdee.fleet.assign import DevicePlan, EdgeSlot, edge_load_of, plan_for_device, plan_of, within_limit
from dapdee.planner.workers import Worker
from dapdee.planning import PlanMap, PlanRequest

REQUIREMENT_FIELDS = ("device_tier", "latency_budget_ms", "min_accuracy", "frame_rate", "mode")


@dataclass(frozen=True)
class Candidate:
    """A worker a device may use and its plan map (under the worker tier's edge profile)."""

    worker: Worker
    planmap: PlanMap


@dataclass(frozen=True)
class Ask:
    """One `POST /plan` in the forms the plan choice and the fleet read: the validated body
    (`PlanRequestBody`), its fields as a dict (dumped once: the lease record keeps them) and its
    `PlanRequest`."""

    body: Any
    fields: dict[str, Any]
    req: PlanRequest

    @classmethod
    def of(cls, body: Any) -> Ask:
        """The forms of `body`. O(fields)."""
        fields = body.model_dump()
        return cls(body, fields, request_of(fields))


def request_of(fields: dict[str, Any]) -> PlanRequest:
    """The `PlanRequest` of a lease record's `request` (edge load left 0: the fleet sets it)."""
    return PlanRequest(
        bandwidth_mbps=fields["bandwidth_mbps"],
        rtt_ms=fields.get("rtt_ms", 0.0),
        device_load=fields.get("device_load", 0.0),
        latency_budget_ms=fields.get("latency_budget_ms"),
        min_accuracy=fields.get("min_accuracy"),
        frame_rate=fields.get("frame_rate"),
        mode=fields.get("mode", "auto"),
    )


def requirements_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether the device's tier, any requirement or the workers it avoids (a plan assigned
    while it avoided one is not the best once it does not) differ between two requests.
    O(1) plus the avoided lists."""
    if any(old.get(key) != new.get(key) for key in REQUIREMENT_FIELDS):
        return True
    return (old.get("avoid_workers") or []) != (new.get("avoid_workers") or [])


def within_margin(held: dict[str, Any], best: dict[str, Any], margin: float, sustain_fps: float | None = None) -> bool:
    """Whether a held plan is as good as `best` up to the switching margin: the same resolved
    mode, its requirements met if `best` meets them, no less accuracy, and its time (latency in
    latency mode, bottleneck in throughput mode) t·(1 − margin) <= best's. With `sustain_fps`
    (an auto-mode request's frame rate), a held plan in latency mode must also sustain it, as
    auto's latency plan has to (`planmap.decide`). O(1)."""
    if held["mode"] != best["mode"] or (best["constraints_met"] and not held["constraints_met"]):
        return False
    if sustain_fps is not None and best["mode"] == "latency" and held["predicted"]["throughput_fps"] < sustain_fps:
        return False
    if (held["exit"]["accuracy"] or 0.0) < (best["exit"]["accuracy"] or 0.0):
        return False
    key = "latency_ms" if best["mode"] == "latency" else "bottleneck_ms"
    return held["predicted"][key] * (1.0 - margin) <= best["predicted"][key]


def drifted(old: dict[str, Any], new: dict[str, Any], threshold: float) -> bool:
    """Whether the device's conditions moved past the re-plan threshold since `old` (relative
    change of bandwidth or round trip over `threshold`, device load over `threshold / 2`; a
    move of exactly the threshold is within it, up to float rounding, either way), or its
    requirements changed at all. O(1)."""
    if requirements_changed(old, new):
        return True
    b0, b1 = old["bandwidth_mbps"], new["bandwidth_mbps"]
    r0, r1 = old.get("rtt_ms", 0.0), new.get("rtt_ms", 0.0)
    load_move = abs(new.get("device_load", 0.0) - old.get("device_load", 0.0))
    return (
        _past(abs(b1 - b0), threshold * b0)
        or _past(abs(r1 - r0), threshold * max(r0, 1.0))
        or _past(load_move, threshold / 2)
    )


def _past(move: float, limit: float) -> bool:
    """`move` > `limit` beyond float rounding (|0.7 - 0.8| is 0.10000000000000009). O(1)."""
    return move > limit * (1 + 1e-9) + 1e-12


def usable(workers: Sequence[Worker], avoid: Iterable[str]) -> tuple[list[Worker], list[str]]:
    """`workers` without those a device asked to avoid (URLs compared without a trailing '/'),
    or all of them when it avoids every one (the device's own back-off then decides when it
    tries a worker again; a plan naming none would only idle the edge); and the URLs of those
    left out, sorted, as the workers name themselves (what a lease records). O(workers + avoid)."""
    avoided = {url.rstrip("/") for url in avoid}
    if not avoided:
        return list(workers), []
    kept = [w for w in workers if w.url.rstrip("/") not in avoided]
    if not kept:
        return list(workers), []
    return kept, sorted(w.url for w in workers if w.url.rstrip("/") in avoided)


def tiebreak(worker: Worker) -> float:
    """What orders equally leased workers: the lower heartbeat load (traffic without leases),
    then the fewer requests in flight and queued. O(1)."""
    return worker.load + 1e-6 * (worker.inflight + worker.queue_depth)


def slots_of(candidates: Sequence[Candidate], others: Mapping[str, float]) -> list[EdgeSlot]:
    """The edge slots a device is planned over: per candidate its plan map, capacity and what
    the other devices reserve there (`others`, by worker URL, naming every candidate). O(candidates)."""
    return [
        EdgeSlot(
            c.worker.url,
            c.planmap,
            c.worker.capacity_ms_per_s,
            others[c.worker.url],
            tiebreak(c.worker),
            c.worker.nominal,
        )
        for c in candidates
    ]


def load_order(worker: Worker, reserved_ms_per_s: float) -> tuple[float, float, str]:
    """How workers rank for a device, least loaded first, as `plan_for_device` orders them: the
    edge load ℓe the others' reservations put on `worker` (`edge_load_of`), then `tiebreak`,
    then the URL. O(1)."""
    return edge_load_of(reserved_ms_per_s, worker.nominal), tiebreak(worker), worker.url


def least_loaded(candidates: Sequence[Candidate], others: Mapping[str, float]) -> Candidate:
    """Of `candidates` (at least one), the first by `load_order` (`others`, by worker URL, naming
    every candidate): the worker a Device-Only plan names. O(candidates)."""
    return min(candidates, key=lambda c: load_order(c.worker, others[c.worker.url]))


def repriced(
    record: dict[str, Any],
    ask: Ask,
    candidates: Sequence[Candidate],
    others: Mapping[str, float],
    edge_load: float | None = None,
) -> DevicePlan | None:
    """The plan in the device's lease record re-priced now, at the load the others put on its
    worker (`others`, by worker URL, naming every candidate), or at the request's explicit
    `edge_load`, which overrides it as it does for the exact plan; None when it no longer applies
    (another model, its worker gone, the graph changed, or an edge plan the device was given
    while no worker served the model: it reserves nothing, so handing it back now would send
    work to a worker without booking it). A Device-Only plan keeps naming the worker it named
    while that one is a candidate (the device probes its link there), else the least loaded.
    O(V + E) (`plan_of`)."""
    body = ask.body
    if record.get("model") != body.model:
        return None
    worker = record.get("worker")
    held = record["plan"]
    by_url = {c.worker.url: c for c in candidates}
    if worker is not None:
        if worker not in by_url:
            return None
        c = by_url[worker]
    elif held.get("edge_nodes"):
        return None
    else:
        c = by_url.get(held.get("edge_worker") or "") or least_loaded(candidates, others)
    load = edge_load if edge_load is not None else edge_load_of(others[c.worker.url], c.worker.nominal)
    try:
        name, nodes, approximate = held["exit"]["name"], held["device_nodes"], bool(held.get("approximate"))
        plan, e_i = plan_of(c.planmap, ask.req, name, nodes, load, held["mode"], approximate)
    except (CostGraphError, KeyError, StopIteration):
        return None  # the graph changed under the plan
    plan["edge_worker"] = c.worker.url
    return DevicePlan(plan, worker, e_i, load if worker is not None else 0.0)


@dataclass(frozen=True)
class PlanChooser:
    """The plan choice (module docstring) under the fleet's settings: the admission bound
    `rho_max`, the switching margin μ (`switch_margin`) and the re-plan threshold (`lease_drift`).
    Every method takes `others`: per candidate worker URL (every candidate named), what the other
    devices reserve there (ms/s)."""

    rho_max: float
    switch_margin: float
    lease_drift: float

    def choose(
        self,
        record: dict[str, Any] | None,
        ask: Ask,
        candidates: Sequence[Candidate],
        others: Mapping[str, float],
        edge_load: float | None,
    ) -> tuple[DevicePlan, bool]:
        """The device's plan and whether it is the one a rebalance assigned it: that one while it
        still applies (`repriced`), else the plan it holds while within the switching margin of
        the exact plan (`kept`), else the exact plan. Cost: one `plan_for_device` and at most two
        re-pricings (O(V + E) each)."""
        if (
            record is not None
            and record.get("assigned")
            and not drifted(record["request"], ask.fields, self.lease_drift)
        ):
            dp = repriced(record, ask, candidates, others, edge_load)
            if dp is not None:
                return dp, True
        best = self.exact(candidates, ask.req, ask.body.frame_rate, others, edge_load)
        return self.kept(record, ask, candidates, others, best, edge_load) or best, False

    def exact(
        self,
        candidates: Sequence[Candidate],
        req: PlanRequest,
        frames_per_s: float | None,
        others: Mapping[str, float],
        edge_load: float | None,
    ) -> DevicePlan:
        """The exact plan over `candidates` (at least one) at `frames_per_s` (None: no lease, so no
        admission), `edge_load` given: every worker priced at it. Cost: `plan_for_device`."""
        return plan_for_device(slots_of(candidates, others), req, frames_per_s, self.rho_max, edge_load)

    def kept(
        self,
        record: dict[str, Any] | None,
        ask: Ask,
        candidates: Sequence[Candidate],
        others: Mapping[str, float],
        best: DevicePlan,
        edge_load: float | None = None,
    ) -> DevicePlan | None:
        """The plan the device holds, re-priced now (`repriced`: at the request's `edge_load` when
        it gives one, as `best` is), when its requirements are unchanged, it is
        still admissible, and it is within the switching margin of `best` (`within_margin`).
        None at once (no re-pricing) when `best` is that plan. O(V + E) (one re-pricing)."""
        margin = self.switch_margin
        if record is None or margin <= 0 or requirements_changed(record["request"], ask.fields):
            return None
        held_plan = record["plan"]
        same_plan = held_plan["exit"]["name"] == best.plan["exit"]["name"]
        if same_plan and held_plan["device_nodes"] == best.plan["device_nodes"] and record.get("worker") == best.worker:
            return None
        held = repriced(record, ask, candidates, others, edge_load)
        sustain = ask.req.frame_rate if ask.req.mode == "auto" else None
        if held is None or not within_margin(held.plan, best.plan, margin, sustain):
            return None
        if held.worker is None:
            return held
        capacity = next(c.worker.capacity_ms_per_s for c in candidates if c.worker.url == held.worker)
        reserved = others[held.worker]
        if not within_limit(reserved + ask.body.frame_rate * held.edge_ms_per_frame, self.rho_max * capacity):
            return None
        return held
