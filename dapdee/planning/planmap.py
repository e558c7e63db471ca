"""The plan map: per exit, the Pareto front of (Σdevice_ms, sent_bytes, Σedge_ms) over all
downward-closed partitions of A(e); a request is a vectorised scan of those small arrays.

Why it is exact: under the cost model every partition's device_ms, uplink_ms and edge_ms are
the three sums scaled by 1/(1−ℓd), 8/(1000·B) and 1/(1−ℓe), so latency_ms (E non-empty) and
bottleneck_ms are monotone in the sums; a dominated partition is never strictly better in
either mode. The device-only partition (E empty, no rtt) is always kept as a candidate. Only
feasible partitions are candidates (no value of `sendable: false` crosses the cut; the cost
model prices one that does at infinite bytes, so it can never be optimal).

Where an exit has more than `cap` downward-closed sets, its latency answers come from a
per-request min-cut (exact) and its throughput answers from a candidate set of prefix splits
and weight-grid min-cuts (plan says `"approximate": true`). A build given a time budget
(`deadline_s`) treats an exit whose enumeration runs out of time the same way, and computes
only as many weight-grid min-cuts as the budget leaves room for (prefix splits always).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dapdee.costgraph import CostGraph, GraphLimits
from dapdee.costmodel import Conditions, Predicted, latency_ms, predict_sums, request_sums, stage_ms, stage_weights
from dapdee.planning.enumerate import (
    ExitStructure,
    enumerate_ideals,
    feasible_ideals,
    pareto_indices,
    pareto_scan,
    prefix_masks,
    prefix_sums,
)
from dapdee.planning.mincut import GRID, min_cut_mask, min_latency_mask
from dapdee.planning.request import PlanRequest

DEFAULT_CAP = 100_000
MAP_SCHEMA = 1
TIE_RTOL = 1e-9
# fronts up to this many candidates are scanned in plain Python: numpy's fixed cost per call (and
# its code falling out of the CPU caches between requests) outweighs the loop there
SMALL_FRONT = 48

Lists = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, int], ...]]


class PlanMapError(ValueError):
    """Serialised plan map that cannot be read; the message names the field."""


# ---- candidate sets and their vectorised pricing -----------------------------------------------


class CandSet:
    """Candidate device sets of one exit with their zero-load sums as numpy arrays.

    Pricing a request is O(n) numpy work; node lists per candidate are built once on demand.
    The device-only set, when given, is always the first candidate: every scan keeps the first
    of equals, so it wins an exact latency tie (DESIGN §5.2) whoever built the set."""

    def __init__(
        self,
        st: ExitStructure,
        masks: Sequence[int],
        sums: tuple[Sequence[float], Sequence[int], Sequence[float]] | None = None,
        exact: bool = True,
        count: int | None = None,
    ) -> None:
        self.st = st
        self.masks = list(masks)
        if sums is None:
            sums = mask_sums(st, self.masks)
        if self.masks and self.masks[0] != st.full and st.full in self.masks:
            order = _device_only_first(self.masks.index(st.full), len(self.masks))
            self.masks = [self.masks[i] for i in order]
            sums = ([sums[0][i] for i in order], [sums[1][i] for i in order], [sums[2][i] for i in order])
        self.dev_l = [float(x) for x in sums[0]]
        self.bytes_l = [int(x) for x in sums[1]]
        self.edge_l = [float(x) for x in sums[2]]
        if not (len(self.dev_l) == len(self.bytes_l) == len(self.edge_l) == len(self.masks)) or not self.masks:
            raise PlanMapError(f"exit {st.exit_name!r}: candidate arrays are empty or of unequal length")
        self.exact = exact
        self.count = count
        full = st.full
        self.dev = np.array(self.dev_l, dtype=np.float64)
        self.byts = np.array(self.bytes_l, dtype=np.float64)
        self.edge = np.array(self.edge_l, dtype=np.float64)
        self.nonempty = np.array([0.0 if m == full else 1.0 for m in self.masks])
        self._lists: dict[int, Lists] = {}
        self._cols: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._row_list: list[tuple[float, float, float, float]] | None = None

    def __len__(self) -> int:
        return len(self.masks)

    def lists(self, i: int) -> Lists:
        got = self._lists.get(i)
        if got is None:
            got = self._lists[i] = self.st.lists(self.masks[i])
        return got

    def predict(self, i: int, cond: Conditions) -> Predicted:
        return predict_sums(
            self.dev_l[i], self.bytes_l[i], self.edge_l[i], self.masks[i] == self.st.full, cond, self.st.overheads
        )

    def stages(self, cond: Conditions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(device_ms, uplink_ms, edge_ms) of every candidate under `cond`, overheads included. O(n)."""
        d, b, e, _ = self._columns()
        return stage_ms(d, b, e, cond)

    def _columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The zero-load device ms and edge ms with the v2 overheads added where the edge is
        used, the bytes sent, and the 0/1 "uses the edge" flag, as arrays. Built once."""
        if self._cols is None:
            dev, edge = request_sums(self.dev, self.edge, self.nonempty, self.st.overheads)
            self._cols = (dev, self.byts, edge, self.nonempty)
        return self._cols

    def _rows(self) -> list[tuple[float, float, float, float]]:
        """`_columns` as one (device ms, bytes, edge ms, flag) tuple per candidate. Built once."""
        if self._row_list is None:
            self._row_list = list(zip(*(c.tolist() for c in self._columns()), strict=True))
        return self._row_list

    def latencies(self, cond: Conditions) -> np.ndarray:
        """latency_ms of every candidate: the cost model's stage weights and `latency_ms`,
        elementwise (the small-front scan prices each candidate by the same two). O(n)."""
        wd, wb, we = stage_weights(cond)
        d, b, e, f = self._columns()
        return latency_ms(d * wd, b * wb, e * we, f, cond.rtt_ms)

    def best_latency(self, cond: Conditions, allowed: np.ndarray | None = None) -> int:
        """Index of minimum latency_ms, the first on exact ties (among `allowed` candidates, a
        boolean mask that must admit at least one). O(n)."""
        if len(self.masks) <= SMALL_FRONT:
            return _scan_latency(self._rows(), cond, allowed)
        lat = self.latencies(cond)
        if allowed is not None:
            lat[~allowed] = np.inf
        return int(lat.argmin())

    def bottlenecks(self, cond: Conditions) -> np.ndarray:
        """bottleneck_ms of every candidate: the slowest of its device, uplink and edge stages.
        O(n)."""
        wd, wb, we = stage_weights(cond)
        d, b, e, _ = self._columns()
        return np.maximum(np.maximum(d * wd, b * wb), e * we)

    def best_throughput(self, cond: Conditions, allowed: np.ndarray | None = None) -> int:
        """Index of minimum bottleneck_ms, ties (relative 1e-9) broken by lower latency_ms, then
        the first (among `allowed` candidates, as in `best_latency`). O(n)."""
        if len(self.masks) <= SMALL_FRONT:
            return _scan_throughput(self._rows(), cond, allowed)
        bott = self.bottlenecks(cond)
        if allowed is not None:
            bott[~allowed] = np.inf
        i = int(bott.argmin())
        tied = bott <= bott[i] * (1.0 + TIE_RTOL)
        if np.count_nonzero(tied) == 1:
            return i
        lat = self.latencies(cond)
        lat[~tied] = np.inf
        return int(lat.argmin())

    def best(self, objective: str, cond: Conditions, allowed: np.ndarray | None = None) -> int:
        if objective == "latency":
            return self.best_latency(cond, allowed)
        return self.best_throughput(cond, allowed)


def _scan_latency(rows: list[tuple[float, float, float, float]], cond: Conditions, allowed: Any) -> int:
    """`CandSet.best_latency` over a small front in plain Python: the same float operations in
    the same order as the numpy scan, so the same index. O(n)."""
    wd, wb, we = stage_weights(cond)
    rtt = cond.rtt_ms
    best, at = np.inf, -1
    for i, (d, b, e, f) in enumerate(rows):
        if allowed is not None and not allowed[i]:
            continue
        lat = latency_ms(d * wd, b * wb, e * we, f, rtt)
        if lat < best or at < 0:
            best, at = lat, i
    return at


def _scan_throughput(rows: list[tuple[float, float, float, float]], cond: Conditions, allowed: Any) -> int:
    """`CandSet.best_throughput` over a small front in plain Python (as `_scan_latency`). O(n)."""
    wd, wb, we = stage_weights(cond)
    rtt = cond.rtt_ms
    bott = [
        max(d * wd, b * wb, e * we) if allowed is None or allowed[i] else np.inf for i, (d, b, e, _) in enumerate(rows)
    ]
    limit = min(bott) * (1.0 + TIE_RTOL)
    best, at = np.inf, -1
    for i, (d, b, e, f) in enumerate(rows):
        if bott[i] <= limit:
            lat = latency_ms(d * wd, b * wb, e * we, f, rtt)
            if lat < best or at < 0:
                best, at = lat, i
    return at


def _device_only_first(k: int, n: int) -> list[int]:
    """Indices 0..n-1 with index k moved first, the others in order. O(n)."""
    return [k, *range(k), *range(k + 1, n)]


def pareto_candset(
    st: ExitStructure,
    masks: list[int],
    sums: tuple[Sequence[float], Sequence[int], Sequence[float]],
    exact: bool,
    count: int | None,
) -> CandSet:
    """Device-Only plus the Pareto front, in (Σ_D device_ms, bytes, Σ_E edge_ms), of the other
    device sets in `masks`, one per equal sums (the first): the brute force's front, bit for bit.
    `sums`: each mask's Σ_D device_ms and bytes as `st.sums` gives them, and its Σ_E within
    `edge_error(st)` of `st.sums`' (the enumeration's is the exit's total minus Σ_D edge_ms,
    cheap, but it cancels small terms beside a large one). A first pass filters on `sums`; the
    points it keeps, and those it drops by a margin that error could undo, are priced node by
    node (`mask_sums`, as the brute force adds them) and filtered again. O(n log n), plus
    O(k · (m + E)) numpy work for the k points of the second pass (about the front)."""
    full = st.full
    others = [k for k, m in enumerate(masks) if m != full]
    chosen, rows = [full], [st.sums(full)]
    if others:
        first = [np.array([col[k] for k in others], dtype=t) for col, t in zip(sums, _SUM_TYPES, strict=True)]
        kept, near = pareto_scan(*first, 2 * edge_error(st))
        second = [masks[others[k]] for k in sorted(kept + near)]  # enumeration order: the first of equals
        priced = mask_sums(st, second)
        front = pareto_indices(*(np.array(col, dtype=t) for col, t in zip(priced, _SUM_TYPES, strict=True)))
        front.sort(key=lambda i: (second[i].bit_count(), second[i]))
        chosen += [second[i] for i in front]
        rows += [(priced[0][i], priced[1][i], priced[2][i]) for i in front]
    cols = ([r[0] for r in rows], [int(r[1]) for r in rows], [r[2] for r in rows])
    return CandSet(st, chosen, cols, exact=exact, count=count)


_SUM_TYPES = (np.float64, np.int64, np.float64)


def edge_error(st: ExitStructure) -> float:
    """A bound on how far the exit's total edge_ms minus a Σ_D edge_ms (each summed in
    topological order) can be from Σ_E summed node by node: each of the three float sums of at
    most m terms errs by at most m units of 2⁻⁵³ of the total, the subtraction by one. O(m)."""
    return (3 * st.m + 1) * 2.0**-53 * sum(st.edge)


# ---- choices, the deepest-first walk and the plan JSON ------------------------------------------


@dataclass
class Choice:
    """One exit's selected partition under one objective; with leases also the worker it uses
    and its zero-load edge cost per frame (`e_i`: Σ_E edge_ms + edge_request_ms, 0 device-only)."""

    exit_index: int
    pred: Predicted
    lists: Callable[[], Lists]
    approximate: bool = False
    worker: str | None = None
    edge_ms_per_frame: float = 0.0


def mask_choice(st: ExitStructure, mask: int, cond: Conditions) -> Choice:
    """The choice of one device set `mask` of the exit's A(exit), priced under `cond` (the
    min-cut's answer, or a baseline's). O(m + E)."""
    d, b, e = st.sums(mask)
    pred = predict_sums(d, b, e, mask == st.full, cond, st.overheads)
    return Choice(st.exit_index, pred, lambda: st.lists(mask))


def acc_ok(accuracy: float | None, req: PlanRequest) -> bool:
    """min_accuracy semantics: an exit of unknown (null) accuracy never meets a set minimum."""
    return req.min_accuracy is None or (accuracy is not None and accuracy >= req.min_accuracy)


def meets(accuracy: float | None, req: PlanRequest, pred: Predicted, objective: str) -> bool:
    """A plan's `constraints_met` in `objective`'s mode: min_accuracy, and the latency budget
    (latency) or the frame rate (throughput); the other mode's requirement is not its to meet.
    O(1)."""
    if not acc_ok(accuracy, req):
        return False
    if objective == "latency":
        return req.latency_budget_ms is None or pred.latency_ms <= req.latency_budget_ms
    return req.frame_rate is None or pred.bottleneck_ms <= 1000.0 / req.frame_rate


def walk(
    accuracies: Sequence[float | None],
    exit_indices: Sequence[int],
    get: Callable[[int, str], Choice],
    objective: str,
    req: PlanRequest,
) -> tuple[Choice, bool, bool]:
    """DESIGN.md's inverse search: exits deepest -> shallowest (`exit_indices` in any order),
    each exit's best partition under `objective`; the first that meets the requirements wins.
    Nothing meets: the best (lowest latency, or lowest bottleneck then latency) among exits
    meeting min_accuracy (else among all), deeper exit on exact ties.
    Returns (choice, constraints_met, approximate-any-consulted). O(#exits) calls of `get`."""
    order = sorted(exit_indices, reverse=True)
    seen: list[Choice] = []
    for i in order:
        c = get(i, objective)
        seen.append(c)
        if meets(accuracies[i], req, c.pred, objective):
            return c, True, any(s.approximate for s in seen)
    pool = [c for c in seen if acc_ok(accuracies[c.exit_index], req)] or seen
    if objective == "latency":
        best = min(pool, key=lambda c: (c.pred.latency_ms, -c.exit_index))
    else:
        best = min(pool, key=lambda c: (c.pred.bottleneck_ms, c.pred.latency_ms, -c.exit_index))
    return best, False, any(s.approximate for s in seen)


def decide(
    accuracies: Sequence[float | None],
    exit_indices: Sequence[int],
    get: Callable[[int, str], Choice],
    req: PlanRequest,
) -> tuple[Choice, str, bool, bool]:
    """Apply `req.mode`: latency, throughput, or auto (the latency plan if it sustains
    frame_rate or none is given, else the throughput plan). Returns (choice, mode, met, approx)."""
    if req.mode in ("latency", "throughput"):
        c, met, approx = walk(accuracies, exit_indices, get, req.mode, req)
        return c, req.mode, met, approx
    c, met, approx = walk(accuracies, exit_indices, get, "latency", req)
    if req.frame_rate is None or c.pred.throughput_fps >= req.frame_rate:
        return c, "latency", met, approx
    c, met, approx = walk(accuracies, exit_indices, get, "throughput", req)
    return c, "throughput", met, approx


def plan_id(content_hash: str, req: PlanRequest, planner: str) -> str:
    """Deterministic short id: a 64-bit BLAKE2b digest of the graph's content hash, the planner
    and the request (the repr of floats is exact and canonical). O(1)."""
    text = f"{content_hash}|{planner}|{req.key()!r}"
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def plan_dict(
    graph: CostGraph,
    content_hash: str,
    req: PlanRequest,
    planner: str,
    choice: Choice,
    mode: str,
    met: bool,
    approximate: bool,
) -> dict[str, Any]:
    """The plan JSON object of DESIGN.md (edge_worker left None for the service to fill)."""
    ex = graph.exits[choice.exit_index]
    dev, edge, transfer = choice.lists()
    return {
        "plan_id": plan_id(content_hash, req, planner),
        "model": graph.model,
        "mode": mode,
        "planner": planner,
        "exit": {"name": ex.name, "accuracy": ex.accuracy},
        "device_nodes": list(dev),
        "edge_nodes": list(edge),
        "transfer": [{"node": n, "bytes": b} for n, b in transfer],
        "predicted": choice.pred.as_dict(ex.accuracy),
        "constraints_met": met,
        "approximate": approximate,
        "edge_worker": None,
    }


# ---- the plan map ----------------------------------------------------------------------------------


@dataclass
class PlanMap:
    """Per exit of `graph`, the candidate partitions that can be optimal (see module doc)."""

    graph: CostGraph
    cands: list[CandSet]
    cap: int = DEFAULT_CAP
    _hash: str = field(default="", repr=False)
    # the build ran out of its time budget: some exit fell back (or kept fewer weight-grid
    # min-cuts) for lack of time, not because of the cap; never serialised
    over_budget: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self._hash:
            self._hash = self.graph.content_hash()
        self._acc = [e.accuracy for e in self.graph.exits]
        self._exits = list(range(len(self.graph.exits) - 1, -1, -1))  # deepest first: the walk's order
        self._exact = all(cs.exact for cs in self.cands)  # asked on every request

    @classmethod
    def build(cls, graph: CostGraph, cap: int = DEFAULT_CAP, deadline_s: float | None = None) -> PlanMap:
        """Enumerate each exit's downward-closed partitions (up to `cap`, infeasible ones counted)
        and keep the Pareto front of the feasible ones; beyond the cap, keep an approximate
        candidate set (prefix splits + weight-grid min-cuts) and answer latency requests by
        min-cut. O(Σ_e #ideals(e) · (width + log #ideals(e))).

        With `deadline_s` (seconds), each remaining exit gets an equal share of the time left:
        an enumeration that outlives its share falls back like one over the cap, and the
        fallback's weight-grid min-cuts stop when the next would end past its share (prefix splits
        are always kept); an exit reached after `deadline_s` gets only device-only and edge-only.
        The build then overruns `deadline_s` by about one exit's prefix splits and Pareto
        filtering plus, for each exit left, the O(V + E) indexing of its sub-graph; `over_budget`
        says whether time cut anything short. Without a deadline the result is exactly the
        unbudgeted map."""
        graph.validate()
        graph.require_timings()
        if not isinstance(cap, int) or cap < 1:
            raise ValueError(f"cap: must be a positive integer, got {cap!r}")
        if deadline_s is not None and not deadline_s >= 0:
            raise ValueError(f"deadline_s: must be >= 0 seconds, got {deadline_s!r}")
        end = None if deadline_s is None else time.monotonic() + deadline_s
        cands = []
        short = False
        k = len(graph.exits)
        for i in range(k):
            st = ExitStructure.build(graph, i)
            if _past(end):  # no time left for this exit: device-only and edge-only
                cands.append(CandSet(st, ends_only(st), exact=False))
                short = True
                continue
            share = _share(end, k - i)
            got = enumerate_ideals(st, cap, share)
            if got is not None:
                devs, byts, eds, masks = feasible_ideals(st, got)
                total = sum(st.edge)
                sums = (devs, byts, [total - e for e in eds])  # Σ_E estimated: `pareto_candset` checks it
                cands.append(pareto_candset(st, masks, sums, exact=True, count=len(got[3])))
                continue
            short = short or (share is not None and time.monotonic() >= share)
            cs, complete = _approximate_candset(st, _share(end, k - i))
            cands.append(cs)
            short = short or not complete
        return cls(graph, cands, cap, over_budget=short)

    # ---- requests ---------------------------------------------------------------------------
    def _get(self, cond: Conditions, cache: dict[tuple[int, str], Choice]) -> Callable[[int, str], Choice]:
        def get(i: int, objective: str) -> Choice:
            key = (i, objective)
            c = cache.get(key)
            if c is not None:
                return c
            cs = self.cands[i]
            j = cs.best(objective, cond)
            pred = cs.predict(j, cond)
            c = Choice(
                i,
                pred,
                lambda cs=cs, j=j: cs.lists(j),
                approximate=objective == "throughput" and not cs.exact,
            )
            if objective == "latency" and not cs.exact:
                exact = mask_choice(cs.st, min_latency_mask(cs.st, cond), cond)
                if exact.pred.latency_ms < pred.latency_ms:
                    c = exact
            cache[key] = c
            return c

        return get

    def plan(self, req: PlanRequest) -> dict[str, Any]:
        """The plan JSON for `req` (validated; ValueError naming the field, and naming
        `confidence_exits` for a request with them, which `dapdee.planning.progressive` answers).
        O(front) numpy work per exit consulted when every exit was enumerated; one max-flow per
        consulted exit for latency requests on capped exits."""
        if req.confidence_exits:  # a plain plan would carry the progressive request's plan_id
            raise ValueError("confidence_exits: answered by dapdee.planning.progressive, not by a plan map")
        cond = req.conditions()  # validates the conditions' fields
        req.check_requirements()
        get = self._get(cond, {})
        c, mode, met, approx = decide(self._acc, self._exits, get, req)
        return plan_dict(self.graph, self._hash, req, "dapdee", c, mode, met, approx)

    # ---- introspection -------------------------------------------------------------------------
    @property
    def graph_hash(self) -> str:
        """Content hash of the graph this map was built from (plan ids derive from it)."""
        return self._hash

    def front_sizes(self) -> dict[str, int]:
        return {cs.st.exit_name: len(cs) for cs in self.cands}

    def ideal_counts(self) -> dict[str, int | None]:
        """Number of downward-closed partitions per exit, feasible or not (what the cap bounds;
        None: more than the cap)."""
        return {cs.st.exit_name: cs.count for cs in self.cands}

    @property
    def exact(self) -> bool:
        """Every exit's candidate set is exact (no min-cut is ever needed). O(1)."""
        return self._exact

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MAP_SCHEMA,
            "cap": self.cap,
            "graph_hash": self._hash,
            "graph": self.graph.to_dict(),
            "exits": [
                {
                    "name": cs.st.exit_name,
                    "exact": cs.exact,
                    "count": cs.count,
                    "masks": [format(m, "x") for m in cs.masks],
                    "device_ms": cs.dev_l,
                    "bytes": cs.bytes_l,
                    "edge_ms": cs.edge_l,
                }
                for cs in self.cands
            ],
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON (no pickle); `from_bytes(to_bytes())` gives an identical map. O(size)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, limits: GraphLimits | None = None) -> PlanMap:
        """Parse `to_bytes` output; PlanMapError (a ValueError) naming the bad field. O(size)."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PlanMapError(f"plan map: not valid JSON ({exc})") from None
        if not isinstance(d, dict):
            raise PlanMapError("plan map: expected a JSON object")
        if d.get("schema") != MAP_SCHEMA:
            raise PlanMapError(f"schema: expected {MAP_SCHEMA}, got {d.get('schema')!r}")
        graph = CostGraph.from_dict(d.get("graph"), limits)
        graph.require_timings()
        h = graph.content_hash()
        if d.get("graph_hash") != h:
            raise PlanMapError("graph_hash: does not match the embedded graph")
        cap = d.get("cap")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise PlanMapError("cap: expected a positive integer")
        exits = d.get("exits")
        if not isinstance(exits, list) or len(exits) != len(graph.exits):
            raise PlanMapError("exits: expected one entry per graph exit")
        cands = []
        for i, ed in enumerate(exits):
            where = f"exits[{i}]"
            if not isinstance(ed, dict) or ed.get("name") != graph.exits[i].name:
                raise PlanMapError(f"{where}.name: does not match the graph's exit")
            st = ExitStructure.build(graph, i)
            try:
                masks = [int(m, 16) for m in ed["masks"]]
                sums = (ed["device_ms"], ed["bytes"], ed["edge_ms"])
                if not all(isinstance(x, list) for x in sums):
                    raise TypeError("sums")
                exact = ed["exact"]
                count = ed["count"]
                if not isinstance(exact, bool) or not (count is None or isinstance(count, int)):
                    raise TypeError("flags")
                cs = CandSet(st, masks, sums, exact=exact, count=count)  # TypeError on non-numeric sums
            except (KeyError, TypeError, ValueError) as exc:
                raise PlanMapError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None
            _verify(cs, where)
            cands.append(cs)
        return cls(graph, cands, cap, h)


def _as_words(values: Sequence[int], nw: int) -> np.ndarray:
    """len(values) × `nw` matrix of uint64: row k holds the bit mask values[k] as little-endian
    64-bit words (bit i is bit i % 64 of word i // 64). O(len(values) · nw)."""
    raw = b"".join(x.to_bytes(nw * 8, "little") for x in values)
    return np.frombuffer(raw, dtype="<u8").reshape(len(values), nw)


def _words(st: ExitStructure, masks: Sequence[int]) -> np.ndarray:
    """The device sets `masks` of A(e) as n × W words (`_as_words`, W = ⌈m / 64⌉). O(n · m / 64)."""
    return _as_words(masks, max(1, (st.m + 63) // 64))


def _bits(words: np.ndarray, m: int) -> np.ndarray:
    """n × m boolean matrix of `_words` output: row k, column i = node i is in the k-th mask. O(n · m)."""
    return np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :m].astype(bool)


def _bit_matrix(st: ExitStructure, masks: Sequence[int]) -> np.ndarray:
    """n × m boolean matrix: row k, column i = node i of A(e) is in masks[k]. O(n · m)."""
    return _bits(_words(st, masks), st.m)


def _all_in(words: np.ndarray, related: Sequence[int], m: int) -> np.ndarray:
    """n × m boolean matrix: row k, column i = every node of the bit mask `related[i]` is in the
    k-th mask of `words` (`_words`); true where `related[i]` is 0. Word by word, over the nodes
    whose related set touches that word: O(n · Σ_i #words of related[i]) numpy work (at most
    n · (m + E)), O(n · m) memory, O(W) Python steps."""
    rel = _as_words(related, words.shape[1])
    nw = words.shape[1]
    out = np.ones((words.shape[0], m), dtype=bool)
    for w in range(nw):
        nodes = np.flatnonzero(rel[:, w])
        if nodes.size:
            bits = rel[nodes, w]
            out[:, nodes] &= (words[:, w, None] & bits) == bits
    return out


def mask_sums(st: ExitStructure, masks: Sequence[int]) -> tuple[list[float], list[int], list[float]]:
    """`st.sums` for many masks at once, vectorised over masks; the float sums are accumulated in
    topological order, so the results are bit-identical to `st.sums`; a node is sent when it is
    in the mask and a consumer is not (`_all_in`). O(n · (m + E)) numpy work, O(n · m) memory."""
    words = _words(st, masks)
    on = _bits(words, st.m)
    return _sums(st, words, on, on & ~_all_in(words, st.cons_mask, st.m))


def _sums(
    st: ExitStructure, words: np.ndarray, on: np.ndarray, crossing: np.ndarray
) -> tuple[list[float], list[int], list[float]]:
    """`mask_sums` from the masks' words, bit matrix and crossing nodes (in the mask, a consumer
    not). O(n · m) numpy work."""
    n = len(on)
    dev = np.zeros(n)
    edge = np.zeros(n)
    sent = np.zeros(n, dtype=np.int64)
    if st.input_cons_mask:
        sent += ~_all_in(words, [st.input_cons_mask], 1)[:, 0] * st.input_bytes
    for i in range(st.m):
        dev += on[:, i] * st.dev[i]
        edge += ~on[:, i] * st.edge[i]
        if st.cons_mask[i]:
            sent += crossing[:, i] * st.out[i]
    return dev.tolist(), sent.tolist(), edge.tolist()


def _verify(cs: CandSet, where: str) -> None:
    """Check a deserialised candidate set against its exit: every mask a feasible downward-closed
    subset of A(e), sums equal to the cost model's. Vectorised over candidates: O(n · (m + E))
    numpy work, O(n · m) memory."""
    st = cs.st
    if any(x < 0 or x > st.full for x in cs.masks):
        raise PlanMapError(f"{where}.masks: not subsets of the exit's nodes")
    words = _words(st, cs.masks)
    on = _bits(words, st.m)
    if bool(np.any(on & ~_all_in(words, st.preds_mask, st.m))):
        raise PlanMapError(f"{where}.masks: not downward-closed device sets of the exit")
    crossing = on & ~_all_in(words, st.cons_mask, st.m)
    for u in st.unsendable:
        if bool(np.any(crossing[:, u])):
            raise PlanMapError(f"{where}.masks: node {st.nodes[u]!r} is not sendable but would cross to the edge")
    if _sums(st, words, on, crossing) != (cs.dev_l, cs.bytes_l, cs.edge_l):
        raise PlanMapError(f"{where}: device_ms/bytes/edge_ms do not match the masks under the graph")


def _past(end: float | None) -> bool:
    """Whether the deadline `end` (monotonic; None: none) has passed."""
    return end is not None and time.monotonic() >= end


def ends_only(st: ExitStructure) -> list[int]:
    """The device sets of an exit given no time: device-only and edge-only (both always
    feasible)."""
    return [st.full, 0]


def _share(end: float | None, exits_left: int) -> float | None:
    """The deadline (monotonic) of the next exit: an equal share of the time left until `end`."""
    if end is None:
        return None
    now = time.monotonic()
    return now + max(0.0, end - now) / exits_left


BYTE_GRID = tuple(10.0**k for k in range(-3, 4))
# grid indices coarse to fine: the middle, the extremes, then between (used when time is short)
_COARSE_FIRST = (3, 0, 6, 1, 5, 2, 4)


def _grid_by_priority() -> list[tuple[int, int]]:
    """(edge-weight index, byte-weight index) pairs of GRID × BYTE_GRID, coarse to fine."""
    rank = {ix: r for r, ix in enumerate(_COARSE_FIRST)}
    pairs = [(a, b) for a in range(len(GRID)) for b in range(len(BYTE_GRID))]
    return sorted(pairs, key=lambda p: (max(rank[p[0]], rank[p[1]]), rank[p[0]], rank[p[1]]))


def _approximate_candset(st: ExitStructure, deadline: float | None = None) -> tuple[CandSet, bool]:
    """Candidates for an exit too large to enumerate: every prefix split of the topological order,
    device-only, edge-only, and min-cuts over a weight grid (device weight 1, edge and transfer
    weights spread over several orders of magnitude), Pareto-filtered. Not exact for throughput.
    With `deadline` (monotonic), grid points are cut coarse to fine and no cut is started that
    the last one's duration says would end past it. Returns (candidates, every grid point cut).
    O(m² + |grid| max-flows)."""
    masks = prefix_masks(st)
    devs, byts, edges = prefix_sums(st)
    found = set(masks)
    total_dev = max(sum(st.dev), 1e-300)
    total_edge = max(sum(st.edge), 1e-300)
    max_bytes = max([st.input_bytes, *st.out, 1])
    cuts: dict[tuple[int, int], int] = {}
    last = 0.0
    for a, b in _grid_by_priority():
        t0 = time.monotonic()
        if deadline is not None and t0 + last > deadline:
            break
        cuts[(a, b)] = min_cut_mask(st, 1.0 / total_dev, BYTE_GRID[b] / max_bytes, GRID[a] / total_edge)
        last = time.monotonic() - t0
    for a in range(len(GRID)):  # the grid's own order: with every point cut, the unbudgeted set
        for b in range(len(BYTE_GRID)):
            mask = cuts.get((a, b))
            if mask is not None and mask not in found:
                found.add(mask)
                masks.append(mask)
                d, nb, e = st.sums(mask)
                devs.append(d)
                byts.append(nb)
                edges.append(e)
    complete = len(cuts) == len(GRID) * len(BYTE_GRID)
    return pareto_candset(st, masks, (devs, byts, edges), exact=False, count=None), complete


def make_plan(graph: CostGraph, req: PlanRequest, cap: int = DEFAULT_CAP) -> dict[str, Any]:
    """One-shot: build the plan map of `graph` and answer `req`."""
    req.validate()
    return PlanMap.build(graph, cap).plan(req)
