"""Calibrating isolated per-node timings to how a device really runs a part of the network.

A profile's node times are medians of each node run on its own, many times in a row (warm
caches). A device runs a frame's part once, after idling since the last frame, so a run costs
more than the sum of its nodes, and not by a fixed factor: the first nodes after the idle pay the
most (cold caches, clocks ramping up), later ones less. The cost model is additive over nodes,
so the calibration has to be too:

- **Measure** a few whole device parts: every exit's, plus the backbone's *single-tensor cuts*
  (a node `v` whose part `A(v)` — `v` and its ancestors — sends only `v`'s output onward), the
  device parts a plan most often ends at (`checkpoints`).
- **Fit** the measured run time T as a non-decreasing piecewise-linear function F of the
  part's summed isolated medians S, through the origin (`fit_monotone`: pool-adjacent-violators,
  then straight lines between the pooled points; beyond the last point F keeps the slope of the
  line from the origin to it).
- **Apply** F node by node (`calibrated_timings`): node `v`, whose part sums to S(v), gets
  F(S(v)) − F(S(v) − t(v)). On a chain the calibrated parts then sum to F(S) exactly, so every
  measured single-tensor cut is priced at its measured time; a node on a parallel branch (a
  shortcut convolution, an exit head) is priced at F's slope where it starts, an approximation.

With one measured point this is the earlier scale-only calibration (F a line through the origin).
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from dapdee.costgraph import CostGraph


def part_sums(graph: CostGraph, tier: str = "device") -> dict[str, float]:
    """S(v) for every node: the summed `{tier}_ms` of `v` and its ancestors (missing timings
    count 0). O(V · (V + E))."""
    ms = {n.name: getattr(n, f"{tier}_ms") or 0.0 for n in graph.nodes}
    return {n.name: sum(ms[u] for u in graph.ancestors(n.name)) for n in graph.nodes}


def single_tensor_cuts(graph: CostGraph) -> list[str]:
    """The backbone's single-tensor cuts: the nodes `v` (topological order) of the deepest
    exit's part whose own part A(v) sends nothing else onward within it — every consumer
    there of the input and of each node of A(v) but `v` lies inside A(v) (exit heads branching
    off do not count against a cut). O(V · (V + E))."""
    parts = [set(graph.ancestors(e.node)) for e in graph.exits]
    scope = max(parts, key=len) if parts else set()
    consumers = {u: [c for c in cs if c in scope] for u, cs in graph.consumers().items()}
    out = []
    for n in graph.nodes:
        if n.name not in scope:
            continue
        part = set(graph.ancestors(n.name))
        leaving = (u for u in (graph.input.name, *part) if u != n.name)
        if all(c in part for u in leaving for c in consumers[u]):
            out.append(n.name)
    return out


def checkpoints(graph: CostGraph, limit: int = 12) -> list[str]:
    """The nodes whose device parts a calibration measures: every exit's node and up to `limit`
    single-tensor cuts, evenly spaced along the topological order (the first and the last
    kept). O(V · (V + E))."""
    exits = [e.node for e in graph.exits]
    cuts = [v for v in single_tensor_cuts(graph) if v not in exits]
    if len(cuts) > limit:
        step = (len(cuts) - 1) / max(1, limit - 1)
        cuts = [cuts[round(i * step)] for i in range(limit)]
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    return sorted(set(cuts) | set(exits), key=order.__getitem__)


@dataclass(frozen=True)
class MonotoneFit:
    """F: a non-decreasing piecewise-linear map through (0, 0) and `knots` (S ascending, T
    non-decreasing); beyond the last knot, the slope of the line from the origin to it."""

    knots: tuple[tuple[float, float], ...]

    def __call__(self, s: float) -> float:
        """F(s) for s >= 0. O(log #knots)."""
        if s <= 0:
            return 0.0
        if not self.knots:
            return s
        i = bisect.bisect_left(self._xs, s)
        if i == len(self.knots):
            x1, y1 = self.knots[-1]
            return y1 * s / x1
        x1, y1 = self.knots[i]
        x0, y0 = self.knots[i - 1] if i > 0 else (0.0, 0.0)
        return y0 + (y1 - y0) * (s - x0) / (x1 - x0) if x1 > x0 else y1

    @cached_property
    def _xs(self) -> list[float]:
        return [k[0] for k in self.knots]

    def to_list(self) -> list[list[float]]:
        return [[round(s, 4), round(t, 4)] for s, t in self.knots]


def fit_monotone(points: Sequence[tuple[float, float]]) -> MonotoneFit:
    """The least-squares non-decreasing fit of T over S (pool-adjacent-violators on the points
    sorted by S, the points of one S pooled from the start, since a function has one value
    there; points with S <= 0 ignored), pooled blocks placed at their mean (S, T), then joined
    by lines through the origin first. No points: the identity. O(n log n)."""
    pts = sorted((float(s), max(float(t), 0.0)) for s, t in points if s > 0)
    blocks: list[list[float]] = []  # [sum S, sum T, count]
    for s, same in itertools.groupby(pts, key=operator.itemgetter(0)):
        ts = [t for _, t in same]
        blocks.append([s * len(ts), sum(ts), float(len(ts))])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            s2, t2, n2 = blocks.pop()
            blocks[-1][0] += s2
            blocks[-1][1] += t2
            blocks[-1][2] += n2
    return MonotoneFit(tuple((s / n, t / n) for s, t, n in blocks))


def calibrated_timings(
    graph: CostGraph, fit: MonotoneFit, tier: str = "device", sums: dict[str, float] | None = None
) -> dict[str, float]:
    """Every node's `{tier}_ms` through F: F(S(v)) − F(S(v) − t(v)) (see the module doc), >= 0
    since F is non-decreasing. `sums`: `part_sums(graph, tier)` when the caller has them.
    O(V · (V + E)) without `sums`, else O(V log #knots)."""
    sums = sums if sums is not None else part_sums(graph, tier)
    out = {}
    for n in graph.nodes:
        t = getattr(n, f"{tier}_ms") or 0.0
        s = sums[n.name]
        out[n.name] = max(0.0, fit(s) - fit(max(0.0, s - t)))
    return out
