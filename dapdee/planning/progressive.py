"""Progressive (confidence) exits: plans priced by their *expected* cost, exactly optimal.

A request with `confidence_exits` plans on a cost graph whose `progressive` field holds the
artifact's calibrated thresholds and, per exit e, the outcome of progressive inference
truncated at e (`ExitOutcome`: fraction q_k of frames leaving at each active exit k < e, the
rest q_e at e, and the accuracy of the answers). `dapdee calibrate` records these per planned
exit on the calibration and the test split; `load_model(..., weights=ARTIFACT)` puts the split
the exits' own accuracies are measured on (the held-out test split) into the graph.

Execution model (the run time must follow it for the prediction to hold)
------------------------------------------------------------------------
Planned exit e, trunk T = A(e), device set D ⊆ T downward closed, E = T \\ D.

- Active heads K = {k < e : threshold of k not null}, in exit order. Head k needs the nodes
  A(k); its own nodes are H_k = A(k) \\ T minus the nodes of shallower heads (a node two heads
  share belongs to the shallower one, so every node runs once).
- Sides. Head k runs on the device iff A(k) ∩ T ⊆ D (every trunk node it reads is computed
  there; equivalently all its producers outside H_k are in D ∪ {input}) **and** every shallower
  active head runs on the device; else on the edge. The second condition (a refinement of the
  per-head rule) keeps the order in which heads are checked equal to the exit order the
  fractions were calibrated in: the device checks a prefix of K, the edge the rest. In chains
  and in the zoo's DAGs A(j) ∩ T ⊆ A(k) ∩ T for j < k, so it never binds there.
- Device side S_dev = D ∪ its heads' nodes; edge side S_edge = E ∪ its heads' nodes. Sent
  uplink (once, after the device finishes): every u ∈ S_dev ∪ {input} with a consumer in
  S_edge, and the exit node of an edge head that S_dev computed (the edge checks its logits).
- Each side walks the nodes in graph (topological) order, computing its own, and checks a head
  of its side once its exit node and those of all shallower heads of that side are passed; a
  confident frame leaves there. So head k on the device answers after t_k = Σ device_ms of
  S_dev up to position P_k = max_{j ≤ k on the device} pos(x_j) (no request, no transfer, no
  edge); a frame reaching the edge has paid the whole device side plus device_request_ms, the
  uplink of everything sent and rtt, then the edge's time up to its head's position (plus
  edge_request_ms), or the whole edge side for e. With E empty there is no edge at all and
  frames that pass every head leave at e after the whole device side.

Why a front is exact
--------------------
With q_k the fractions and loads/bandwidth applied, a partition's expected latency is
`A/(1−ℓd) + 8·S/(1000·B) + rtt·P + C/(1−ℓe)` where, at zero load,

- A = Σ_{device heads} q_k·t_k + P_rest·(Σ device_ms(S_dev) + [E≠∅]·device_request_ms),
  P_rest = q_e + Σ_{edge heads} q_k (frames that do not leave on the device);
- P = [E≠∅]·P_rest (probability a frame reaches the edge), S = P·sent_bytes;
- C = Σ_{edge heads} q_k·(c_k + edge_request_ms) + q_e·(Σ edge_ms(S_edge) + edge_request_ms),
  c_k = Σ edge_ms of S_edge up to head k's check position.

(A calibration in which no frame passes the device's heads, q_e = 0 with every head on the
device, makes P = 0: the expected cost then ignores the unreachable edge part, and the worst
case below shows it.)

Pipelined, the sustained rate of stages whose time varies from frame to frame is set by their
mean times, so the expected bottleneck is max(A/(1−ℓd), 8·S/(1000·B), C/(1−ℓe)). Both are
non-decreasing in (A, S, C, P), so per planned exit only the Pareto front of (A, S, C, P) over
all downward-closed D can be optimal (ties: equal values). `ProgressiveMap.build` enumerates
each exit's D with the plan map's enumerator, prices all of them with numpy (`expected_sums`)
and keeps that front; a request is a vectorised scan of it.

Requirements and the walk
-------------------------
The walk is the plan map's (deepest exit first, the first that meets wins, same fallbacks) on
expected values: latency mode meets when expected_latency_ms ≤ latency_budget_ms, throughput
mode when expected_bottleneck_ms ≤ 1000/frame_rate; auto uses the latency plan when its
expected throughput sustains frame_rate; min_accuracy is compared with the outcome's accuracy
(progressive inference truncated at e; null never meets a minimum). Throughput ties (relative
1e-9) go to the lower expected latency.

The plan carries the worst case beside the expectation: `predicted.latency_ms` etc. price the
frame that passes every head (S_dev on the device, everything sent, S_edge on the edge) under
the cost model v2; `predicted.expected_*` are the expectations above; `predicted.accuracy` is
the outcome's accuracy; `progressive` names each head's side, nodes, threshold and fraction.
An exit with more downward-closed sets than the cap (or past the build's time budget) is priced
over the plan map's approximate candidates and every plan consulting it says `approximate`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dapdee.costgraph import CostGraph, GraphLimits
from dapdee.costmodel import Conditions, Predicted, predict_sums, stage_ms
from dapdee.planning.enumerate import ExitStructure, enumerate_ideals, pareto_indices, prefix_masks
from dapdee.planning.planmap import (
    DEFAULT_CAP,
    TIE_RTOL,
    Choice,
    PlanMapError,
    _approximate_candset,
    _bit_matrix,
    _past,
    _share,
    decide,
    ends_only,
    make_plan,
    plan_dict,
)
from dapdee.planning.request import PlanRequest

MAP_SCHEMA = 1
CHUNK_CELLS = 1 << 21  # masks × nodes per vectorised block (bounds the build's memory)


def require_progressive(graph: CostGraph) -> None:
    """ValueError naming `confidence_exits` when `graph` carries no calibrated confidence exits."""
    if graph.progressive is None:
        raise ValueError(
            f"confidence_exits: model {graph.model!r} has no calibrated confidence exits (its cost graph "
            "has no `progressive` field; run `dapdee calibrate` on the artifact and export the graph again)"
        )


@dataclass(frozen=True)
class Head:
    """One active head of a planned exit: its exit, threshold and fraction q_k, the trunk nodes it
    depends on (`needs`: A(k) ∩ A(e), local indices of A(e)), its own nodes (`cols`, columns of the union) and the
    column of its exit node (`check`)."""

    exit_name: str
    node: str
    threshold: float
    fraction: float
    needs: tuple[int, ...]
    cols: tuple[int, ...]
    check: int


@dataclass(frozen=True, eq=False)
class HeadStructure:
    """A planned exit e with its heads: the trunk `st` (A(e)) and the union U = A(e) ∪ heads in
    graph order (`names`), per column device/edge ms and out_bytes, consumers inside U, the
    trunk's columns, the outcome (q_e, accuracy), and the columns of `sendable: false`
    (`unsendable`: values that may never be sent)."""

    st: ExitStructure
    heads: tuple[Head, ...]
    exit_fraction: float
    accuracy: float | None
    names: tuple[str, ...]
    dev: np.ndarray
    edge: np.ndarray
    out: np.ndarray
    cons: tuple[tuple[int, ...], ...]
    input_cons: tuple[int, ...]
    trunk_cols: np.ndarray
    unsendable: tuple[int, ...] = ()

    @classmethod
    def build(cls, graph: CostGraph, exit_index: int) -> HeadStructure:
        """Index exit `exit_index` of `graph` (which must carry `progressive`). O(#heads·(V + E))."""
        require_progressive(graph)
        assert graph.progressive is not None
        st = ExitStructure.build(graph, exit_index)
        outcome = graph.progressive.outcome(st.exit_name)
        q = dict(outcome.fractions)
        local = {n: i for i, n in enumerate(st.nodes)}
        taken = set(st.nodes)
        raw = []
        for ex in graph.exits[:exit_index]:
            t = graph.progressive.threshold(ex.name)
            if t is None:
                continue
            anc = graph.ancestors(ex.node)
            own = [v for v in anc if v not in taken]
            taken.update(own)
            raw.append((ex, t, tuple(local[v] for v in anc if v in local), own))
        names = [n.name for n in graph.nodes if n.name in taken]
        col = {v: i for i, v in enumerate(names)}
        cons: list[list[int]] = [[] for _ in names]
        input_cons = []
        for i, v in enumerate(names):
            for u in dict.fromkeys(graph.node(v).inputs):
                if u == graph.input.name:
                    input_cons.append(i)
                else:
                    cons[col[u]].append(i)
        heads = tuple(
            Head(ex.name, ex.node, t, float(q[ex.name]), needs, tuple(col[v] for v in own), col[ex.node])
            for ex, t, needs, own in raw
        )
        nodes = [graph.node(v) for v in names]
        return cls(
            st=st,
            heads=heads,
            exit_fraction=float(q[st.exit_name]),
            accuracy=outcome.accuracy,
            names=tuple(names),
            dev=np.array([float(n.device_ms or 0.0) for n in nodes]),
            edge=np.array([float(n.edge_ms or 0.0) for n in nodes]),
            out=np.array([int(n.out_bytes) for n in nodes], dtype=np.float64),
            cons=tuple(tuple(c) for c in cons),
            input_cons=tuple(input_cons),
            trunk_cols=np.array([col[v] for v in st.nodes], dtype=np.int64),
            unsendable=tuple(i for i, n in enumerate(nodes) if not n.sendable),
        )

    # ---- sides and transfers of many device sets at once --------------------------------------
    def sides(self, masks: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For each device set: (number of heads on the device p, S_dev and S_edge membership
        [n, |U|], sent [n, |U|]: column u's output goes uplink). The device runs the first p
        heads. O(n · (|U| + E_U)) numpy work."""
        on = _bit_matrix(self.st, masks)
        n, r = len(masks), len(self.heads)
        ok = np.ones((n, r), dtype=bool)
        for i, h in enumerate(self.heads):
            if h.needs:
                ok[:, i] = on[:, list(h.needs)].all(axis=1)
        p = np.cumprod(ok, axis=1).sum(axis=1) if r else np.zeros(n, dtype=np.int64)
        dev_in = np.zeros((n, len(self.names)), dtype=bool)
        dev_in[:, self.trunk_cols] = on
        edge_in = np.zeros_like(dev_in)
        edge_in[:, self.trunk_cols] = ~on
        for i, h in enumerate(self.heads):
            if h.cols:
                dev_in[:, list(h.cols)] = (p > i)[:, None]
                edge_in[:, list(h.cols)] = (p <= i)[:, None]
        sent = np.zeros_like(dev_in)
        producers = [u for u, cs in enumerate(self.cons) if cs]
        if producers:  # any consumer on the edge, per producer: one gather, one segmented OR
            flat = [c for u in producers for c in self.cons[u]]
            starts = np.cumsum([0] + [len(self.cons[u]) for u in producers[:-1]])
            sent[:, producers] = dev_in[:, producers] & np.logical_or.reduceat(edge_in[:, flat], starts, axis=1)
        for i, h in enumerate(self.heads):  # an edge head's logits computed on the device
            sent[:, h.check] |= dev_in[:, h.check] & (p <= i)
        return p, dev_in, edge_in, sent

    def feasible(self, masks: Sequence[int]) -> np.ndarray:
        """Per device set, whether it sends no value of `sendable: false` (one computed on the
        device that an edge-side node reads, or the logits of an edge head). All true without
        such columns. O(n · (|U| + E_U)) numpy work in blocks of CHUNK_CELLS cells."""
        if not self.unsendable:
            return np.ones(len(masks), dtype=bool)
        rows = max(1, CHUNK_CELLS // max(1, len(self.names)))
        cols = list(self.unsendable)
        parts = [~self.sides(masks[i : i + rows])[3][:, cols].any(axis=1) for i in range(0, len(masks), rows)]
        return np.concatenate(parts) if parts else np.ones(0, dtype=bool)

    def input_sent(self, edge_in: np.ndarray) -> np.ndarray:
        """Whether the input goes uplink, per row of `edge_in`. O(n · |input consumers|)."""
        if not self.input_cons:
            return np.zeros(len(edge_in), dtype=bool)
        return edge_in[:, list(self.input_cons)].any(axis=1)


@dataclass(frozen=True, eq=False)
class Sums:
    """Per device set: the expected zero-load sums (a, s, c, p) of the module doc, the worst-case
    sums of a frame passing every head (device, bytes, edge: node times only), and `heads_dev`,
    the number of heads on the device. Arrays of equal length."""

    a: np.ndarray
    s: np.ndarray
    c: np.ndarray
    p: np.ndarray
    dev_total: np.ndarray
    sent: np.ndarray
    edge_total: np.ndarray
    heads_dev: np.ndarray

    def take(self, idx: Sequence[int]) -> Sums:
        """The sums of the device sets at positions `idx`. O(len(idx))."""
        return Sums(*(getattr(self, f)[np.asarray(idx, dtype=np.int64)] for f in Sums.__dataclass_fields__))


def expected_sums(hs: HeadStructure, masks: Sequence[int]) -> Sums:
    """`Sums` of every device set in `masks`, vectorised in blocks of CHUNK_CELLS cells.
    O(n · (|U| · #heads + E_U)) numpy work, O(CHUNK_CELLS) memory."""
    rows = max(1, CHUNK_CELLS // max(1, len(hs.names)))
    parts = [_block_sums(hs, masks[i : i + rows]) for i in range(0, len(masks), rows)]
    return Sums(*(np.concatenate([getattr(b, f) for b in parts]) for f in Sums.__dataclass_fields__))


def _check_columns(heads: Sequence[Head]) -> tuple[list[int], np.ndarray]:
    """Check positions: on the device, head i at max(check_j, j ≤ i); on the edge with the first
    s heads on the device, head i ≥ s at max(check_j, s ≤ j ≤ i) (table [s, i]). O(#heads²)."""
    r = len(heads)
    dev_pos = list(np.maximum.accumulate([h.check for h in heads])) if r else []
    edge_pos = np.zeros((r + 1, max(r, 1)), dtype=np.int64)
    for s in range(r):
        edge_pos[s, s:] = np.maximum.accumulate([h.check for h in heads[s:]])
    return [int(x) for x in dev_pos], edge_pos


def _block_sums(hs: HeadStructure, masks: Sequence[int]) -> Sums:
    """`expected_sums` of one block of masks (see the module doc for the formulas)."""
    p, dev_in, edge_in, sent_cols = hs.sides(masks)
    n = len(masks)
    full = hs.st.full
    nonempty = np.array([m != full for m in masks], dtype=np.float64)
    dcum = np.cumsum(dev_in * hs.dev, axis=1)
    ecum = np.cumsum(edge_in * hs.edge, axis=1)
    dev_total, edge_total = dcum[:, -1], ecum[:, -1]
    sent = sent_cols.astype(np.float64) @ hs.out + hs.input_sent(edge_in) * float(hs.st.input_bytes)
    dev_pos, edge_pos = _check_columns(hs.heads)
    rows = np.arange(n)
    a = np.zeros(n)
    c = np.zeros(n)
    rest = np.full(n, hs.exit_fraction)
    for i, h in enumerate(hs.heads):
        on_dev = p > i
        a += np.where(on_dev, h.fraction * dcum[:, dev_pos[i]], 0.0)
        c += np.where(on_dev, 0.0, h.fraction * ecum[rows, edge_pos[np.minimum(p, i), i]])
        rest += np.where(on_dev, 0.0, h.fraction)
    ov = hs.st.overheads
    a += rest * (dev_total + nonempty * ov.device_request_ms)
    c = nonempty * (c + rest * ov.edge_request_ms + hs.exit_fraction * edge_total)
    reach = nonempty * rest
    return Sums(a, reach * sent, c, reach, dev_total, sent, edge_total, p)


def pareto4(sums: Sums) -> list[int]:
    """Indices of the points not weakly dominated in (a, s, c, p) (of equal points one is kept):
    the 3-D filter (`pareto_indices`) within each value of p, then, in increasing p, removal of
    points dominated in (a, s, c) by a point kept at a lower p. O(n log n + front²)."""
    keep: list[int] = []
    for pv in np.unique(sums.p):
        idx = np.flatnonzero(sums.p == pv)
        cand = idx[pareto_indices(sums.a[idx], sums.s[idx], sums.c[idx])]
        if keep:
            k = np.array(keep)
            dominated = np.zeros(len(cand), dtype=bool)
            for lo in range(0, len(cand), 1024):
                part = cand[lo : lo + 1024]
                dominated[lo : lo + 1024] = (
                    (sums.a[k][None, :] <= sums.a[part][:, None])
                    & (sums.s[k][None, :] <= sums.s[part][:, None])
                    & (sums.c[k][None, :] <= sums.c[part][:, None])
                ).any(axis=1)
            cand = cand[~dominated]
        keep.extend(int(i) for i in cand)
    return keep


# ---- one exit's candidates and their pricing --------------------------------------------------------


class ProgressiveCands:
    """Candidate device sets of one planned exit with their `Sums`; pricing a request is O(n)."""

    def __init__(
        self, hs: HeadStructure, masks: Sequence[int], exact: bool, count: int | None, sums: Sums | None = None
    ) -> None:
        if not masks:
            raise PlanMapError(f"exit {hs.st.exit_name!r}: no candidates")
        self.hs = hs
        self.masks = list(masks)
        self.sums = sums if sums is not None else expected_sums(hs, self.masks)
        self.exact = exact
        self.count = count

    @classmethod
    def front(cls, hs: HeadStructure, masks: Sequence[int], exact: bool, count: int | None) -> ProgressiveCands:
        """The Pareto-optimal subset (`pareto4`) of the feasible `masks` (`HeadStructure.feasible`:
        the device-only set always is): the device-only set first, the rest in increasing size,
        so that `best` (the first of equals) gives Device-Only an exact latency tie, as the
        ordinary plan does. O(n log n + front²)."""
        if hs.unsendable:
            masks = [m for m, ok in zip(masks, hs.feasible(masks).tolist(), strict=True) if ok]
        full = hs.st.full
        # of equal points pareto4 keeps the first (its sorts are stable): the device-only set
        # first, so that a split priced exactly like it (every frame leaving at a head before
        # the cut) does not push it out of the front
        masks = sorted(masks, key=lambda m: m != full)
        sums = expected_sums(hs, masks)
        keep = sorted(pareto4(sums), key=lambda i: (masks[i] != full, masks[i].bit_count(), masks[i]))
        return cls(hs, [masks[i] for i in keep], exact, count, sums.take(keep))

    def __len__(self) -> int:
        return len(self.masks)

    def stages(self, cond: Conditions) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Expected (device_ms, uplink_ms, edge_ms, latency_ms) of every candidate. O(n)."""
        d, u, e = stage_ms(self.sums.a, self.sums.s, self.sums.c, cond)
        return d, u, e, d + u + e + self.sums.p * cond.rtt_ms

    def best(self, objective: str, cond: Conditions) -> int:
        """Index of minimum expected latency, or of minimum expected bottleneck with ties
        (relative 1e-9) broken by lower expected latency. O(n)."""
        d, u, e, lat = self.stages(cond)
        if objective == "latency":
            return int(lat.argmin())
        bott = np.maximum(np.maximum(d, u), e)
        tied = bott <= bott.min() * (1.0 + TIE_RTOL)
        return int(np.where(tied, lat, np.inf).argmin())

    def expected(self, i: int, cond: Conditions) -> Predicted:
        """Candidate i's expected per-frame numbers in the cost model's shape: its stages,
        bottleneck and throughput from the expected sums (overheads are inside them), transfer =
        expected uplink + rtt · P, sent_bytes = expected bytes, rounded. O(1)."""
        s = float(self.sums.s[i])
        pred = predict_sums(float(self.sums.a[i]), s, float(self.sums.c[i]), True, cond)  # s: fractional bytes
        transfer = pred.uplink_ms + float(self.sums.p[i]) * cond.rtt_ms
        return replace(
            pred, transfer_ms=transfer, latency_ms=pred.device_ms + transfer + pred.edge_ms, sent_bytes=round(s)
        )

    def worst(self, i: int, cond: Conditions) -> Predicted:
        """The cost model v2 for a frame that passes every head. O(1)."""
        s = self.sums
        edge_empty = self.masks[i] == self.hs.st.full
        return predict_sums(
            float(s.dev_total[i]), int(s.sent[i]), float(s.edge_total[i]), edge_empty, cond, self.hs.st.overheads
        )

    def describe(self, i: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, int], ...], list[dict]]:
        """(trunk device nodes, trunk edge nodes, transfer [(producer, bytes)] with the input
        first, heads [{exit, node, threshold, fraction, side, nodes}]) of candidate i. O(|U| + E_U)."""
        hs = self.hs
        p, _, edge_in, sent = hs.sides([self.masks[i]])
        dev, edge, _ = hs.st.lists(self.masks[i])
        transfer = [(hs.st.input_name, hs.st.input_bytes)] if hs.input_sent(edge_in)[0] else []
        transfer += [(v, int(hs.out[u])) for u, v in enumerate(hs.names) if sent[0, u]]
        heads = [
            {
                "exit": h.exit_name,
                "node": h.node,
                "threshold": h.threshold,
                "fraction": h.fraction,
                "side": "device" if int(p[0]) > k else "edge",
                "nodes": [hs.names[c] for c in h.cols],
            }
            for k, h in enumerate(hs.heads)
        ]
        return dev, edge, tuple(transfer), heads


@dataclass
class ProgressiveChoice(Choice):
    """A walk choice whose `pred` holds the expected numbers; `cands`/`index` name the candidate."""

    cands: ProgressiveCands | None = None
    index: int = 0


# ---- the map ------------------------------------------------------------------------------------------


@dataclass
class ProgressiveMap:
    """Per planned exit of `graph`, the candidates that can minimise an expected cost."""

    graph: CostGraph
    cands: list[ProgressiveCands]
    cap: int = DEFAULT_CAP
    over_budget: bool = field(default=False, compare=False)
    _hash: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self._hash = self._hash or self.graph.content_hash()
        self._acc = [cs.hs.accuracy for cs in self.cands]
        self._exits = list(range(len(self.graph.exits)))

    @classmethod
    def build(cls, graph: CostGraph, cap: int = DEFAULT_CAP, deadline_s: float | None = None) -> ProgressiveMap:
        """Enumerate each exit's downward-closed sets (up to `cap`; `deadline_s` shared over the
        exits as in `PlanMap.build`), price them all and keep the (a, s, c, p) front; an exit past
        the cap or its time share gets the plan map's approximate candidates plus every prefix
        split. ValueError naming `confidence_exits` without `progressive`.
        O(Σ_e #ideals(e) · (width + |U_e| · #heads)) plus the fronts' filtering."""
        graph.validate()
        graph.require_timings()
        require_progressive(graph)
        if not isinstance(cap, int) or cap < 1:
            raise ValueError(f"cap: must be a positive integer, got {cap!r}")
        if deadline_s is not None and not deadline_s >= 0:
            raise ValueError(f"deadline_s: must be >= 0 seconds, got {deadline_s!r}")
        end = None if deadline_s is None else time.monotonic() + deadline_s
        cands, short, k = [], False, len(graph.exits)
        for i in range(k):
            hs = HeadStructure.build(graph, i)
            if _past(end):  # no time left for this exit (as in `PlanMap.build`)
                cands.append(ProgressiveCands.front(hs, ends_only(hs.st), False, None))
                short = True
                continue
            share = _share(end, k - i)
            got = enumerate_ideals(hs.st, cap, share)
            if got is not None:
                cands.append(ProgressiveCands.front(hs, got[3], True, len(got[3])))
                continue
            short = short or (share is not None and time.monotonic() >= share)
            approx, complete = _approximate_candset(hs.st, _share(end, k - i))
            masks = list(dict.fromkeys([*prefix_masks(hs.st), *approx.masks]))
            cands.append(ProgressiveCands.front(hs, masks, False, None))
            short = short or not complete
        return cls(graph, cands, cap, over_budget=short)

    def _get(self, cond: Conditions) -> Callable[[int, str], Choice]:
        cache: dict[tuple[int, str], Choice] = {}

        def get(i: int, objective: str) -> Choice:
            if (i, objective) not in cache:
                cs = self.cands[i]
                j = cs.best(objective, cond)
                cache[(i, objective)] = ProgressiveChoice(
                    i, cs.expected(j, cond), lambda cs=cs, j=j: cs.describe(j)[:3], not cs.exact, cands=cs, index=j
                )
            return cache[(i, objective)]

        return get

    def plan(self, req: PlanRequest) -> dict[str, Any]:
        """The plan JSON for a request with `confidence_exits` (ValueError naming the field
        otherwise or for bad values). O(front) numpy work per exit consulted."""
        cond = req.conditions()
        req.check_requirements()
        if not req.confidence_exits:
            raise ValueError("confidence_exits: this map answers only requests with confidence_exits true")
        c, mode, met, approx = decide(self._acc, self._exits, self._get(cond), req)
        assert isinstance(c, ProgressiveChoice) and c.cands is not None
        cs, j = c.cands, c.index
        plan = plan_dict(self.graph, self._hash, req, "dapdee", c, mode, met, approx)
        exp = c.pred
        fps = exp.throughput_fps
        plan["predicted"] = {
            **cs.worst(j, cond).as_dict(cs.hs.accuracy),
            "expected_latency_ms": exp.latency_ms,
            "expected_device_ms": exp.device_ms,
            "expected_transfer_ms": exp.transfer_ms,
            "expected_edge_ms": exp.edge_ms,
            "expected_bottleneck_ms": exp.bottleneck_ms,
            "expected_throughput_fps": fps if math.isfinite(fps) else None,
        }
        plan["progressive"] = {
            "rule": self.graph.progressive.rule if self.graph.progressive else None,
            "split": self.graph.progressive.split if self.graph.progressive else None,
            "accuracy": cs.hs.accuracy,
            "exit_fraction": cs.hs.exit_fraction,
            "edge_fraction": min(1.0, float(cs.sums.p[j])),  # a sum of fractions: at most 1 + rounding
            "heads": cs.describe(j)[3],
        }
        return plan

    # ---- introspection and (de)serialisation ------------------------------------------------------
    @property
    def graph_hash(self) -> str:
        return self._hash

    @property
    def exact(self) -> bool:
        return all(cs.exact for cs in self.cands)

    def front_sizes(self) -> dict[str, int]:
        return {cs.hs.st.exit_name: len(cs) for cs in self.cands}

    def to_bytes(self) -> bytes:
        """Canonical JSON (no pickle): the graph and each exit's front masks. O(size)."""
        d = {
            "schema": MAP_SCHEMA,
            "kind": "progressive",
            "cap": self.cap,
            "graph_hash": self._hash,
            "graph": self.graph.to_dict(),
            "exits": [
                {
                    "name": cs.hs.st.exit_name,
                    "exact": cs.exact,
                    "count": cs.count,
                    "masks": [format(m, "x") for m in cs.masks],
                }
                for cs in self.cands
            ],
        }
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, limits: GraphLimits | None = None) -> ProgressiveMap:
        """Parse `to_bytes` output, re-deriving every number from the graph and checking each
        mask is a downward-closed set of its exit; PlanMapError naming the field. O(size · m)."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PlanMapError(f"progressive map: not valid JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("schema") != MAP_SCHEMA or d.get("kind") != "progressive":
            raise PlanMapError(f"schema: expected a progressive map of schema {MAP_SCHEMA}")
        graph = CostGraph.from_dict(d.get("graph"), limits)
        graph.require_timings()
        require_progressive(graph)
        if d.get("graph_hash") != graph.content_hash():
            raise PlanMapError("graph_hash: does not match the embedded graph")
        cap, exits = d.get("cap"), d.get("exits")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise PlanMapError("cap: expected a positive integer")
        if not isinstance(exits, list) or len(exits) != len(graph.exits):
            raise PlanMapError("exits: expected one entry per graph exit")
        return cls(graph, [_read_exit(graph, i, ed) for i, ed in enumerate(exits)], cap)


def _read_exit(graph: CostGraph, i: int, ed: Any) -> ProgressiveCands:
    """One serialised exit of a progressive map, checked against the graph."""
    where = f"exits[{i}]"
    hs = HeadStructure.build(graph, i)
    try:
        if ed["name"] != hs.st.exit_name:
            raise ValueError("name does not match the graph's exit")
        masks = [int(m, 16) for m in ed["masks"]]
        exact, count = ed["exact"], ed["count"]
        if not isinstance(exact, bool) or not (count is None or isinstance(count, int)):
            raise TypeError("exact/count")
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanMapError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None
    if not masks or any(m < 0 or m > hs.st.full or not hs.st.is_closed(m) for m in masks):
        raise PlanMapError(f"{where}.masks: not downward-closed device sets of the exit")
    if not hs.feasible(masks).all():
        raise PlanMapError(f"{where}.masks: a device set sends a value that is not sendable")
    return ProgressiveCands(hs, masks, exact, count)


def device_mask(hs: HeadStructure, exit_name: str, device_nodes: Collection[str]) -> int:
    """The trunk mask of `device_nodes`: ValueError naming the nodes when they are not a
    downward-closed part of exit `exit_name`'s ancestors. O(V + E)."""
    local = {v: i for i, v in enumerate(hs.st.nodes)}
    outside = [v for v in device_nodes if v not in local]
    if outside:
        raise ValueError(f"device nodes {outside[:5]}: not ancestors of exit {exit_name!r}'s node")
    mask = sum(1 << local[v] for v in set(device_nodes))
    if not hs.st.is_closed(mask):
        raise ValueError(f"device nodes of exit {exit_name!r}: not downward closed (a producer is missing)")
    return mask


def priced(
    graph: CostGraph, exit_name: str, device_nodes: Collection[str], cond: Conditions
) -> tuple[Predicted, Predicted]:
    """(worst case, expected) of the plan (`exit_name`, `device_nodes`) made with confidence
    exits under `cond`, as the planner prices its candidates: a pinned cut priced like a planned
    one. ValueError naming `confidence_exits` without thresholds, or naming a bad exit or device
    set. O(#heads · (V + E))."""
    require_progressive(graph)
    names = [e.name for e in graph.exits]
    if exit_name not in names:
        raise ValueError(f"exit {exit_name!r}: not an exit of model {graph.model!r}; it has {names}")
    hs = HeadStructure.build(graph, names.index(exit_name))
    cands = ProgressiveCands(hs, [device_mask(hs, exit_name, device_nodes)], exact=True, count=None)
    return cands.worst(0, cond), cands.expected(0, cond)


def plan(graph: CostGraph, req: PlanRequest, cap: int = DEFAULT_CAP) -> dict[str, Any]:
    """One-shot: the progressive plan when `req.confidence_exits`, else the ordinary plan."""
    req.validate()
    if not req.confidence_exits:
        return make_plan(graph, req, cap)
    require_progressive(graph)
    return ProgressiveMap.build(graph, cap).plan(req)
