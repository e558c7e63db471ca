"""Upper bounds for the rebalance's DP: the LP relaxation of what the devices still to come can add.

The DP (`dapdee.fleet.rebalance`) adds devices one at a time; after device k, a state with load
ℓ can still take the devices after k within the room `R = limit − ℓ`. For each component c of
the value, no choice of one option per remaining device within R adds more than

    U_c(R) = Σ_i v_c(base_i) + the best fractional use of R − Σ_i load(base_i)

where base_i is device i's least-load option and the fractional use takes the segments of every
remaining device's upper concave hull in (load, v_c) by slope, steepest first (the LP optimum of
a multiple-choice knapsack, Sinha and Zemel 1979). Each component is bounded on its own: a
completion's value is below the bound vector in every component, hence lexicographically. So a
state whose value + U(R) is lexicographically below the value of an answer already in hand
cannot lead to a better one and the DP may drop it, still exact.

Cost: building the bounds of every suffix is O(n · S log S) for n devices and S hull segments in
all; evaluating m states against one suffix is O(m log S) per component.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Point = tuple[float, tuple[float, float, float]]  # (load, value vector) of one option
Weights = tuple[float, float, float]
COMPONENTS: tuple[Weights, ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
Segment = tuple[float, float, float]  # (slope, Δload, Δvalue) of one hull segment


def hull_segments(points: Sequence[tuple[float, float]]) -> list[Segment]:
    """The rising part of the upper concave hull of `points` (load ascending, loads distinct)
    from the first point: its segments as (slope, Δload, Δvalue), slopes strictly decreasing and
    positive. O(p)."""
    hull: list[tuple[float, float]] = []
    for x, y in points:
        # pop the last point while it lies on or below the line from the one before it to (x, y)
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (x - x1) <= (y - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append((x, y))
    out: list[Segment] = []
    for (x1, y1), (x2, y2) in zip(hull, hull[1:], strict=False):
        if y2 <= y1:
            break  # concave: nothing after this rises
        out.append(((y2 - y1) / (x2 - x1), x2 - x1, y2 - y1))
    return out


@dataclass(frozen=True)
class SuffixBound:
    """U(R) of the module docstring for one suffix of devices: its base load and value, and per
    bounded quantity (a weighting of the value vector) the cumulative (load, value) of its hull
    segments, steepest first."""

    base_load: float
    base_value: np.ndarray  # (q,)
    cum_load: tuple[np.ndarray, ...]  # per quantity, starting at 0
    cum_value: tuple[np.ndarray, ...]

    def upper(self, room: np.ndarray) -> np.ndarray:
        """(m, q): the bound on what the suffix adds to each state with room `room` (m,); −inf
        where the room does not hold even the base loads. O(m log S) per quantity."""
        free = room - self.base_load
        out = np.empty((len(room), len(self.base_value)))
        for c in range(len(self.base_value)):
            out[:, c] = self.base_value[c] + np.interp(free, self.cum_load[c], self.cum_value[c])
        out[free < -1e-9 * max(1.0, self.base_load)] = -np.inf
        return out


def suffix_bounds(chains: Sequence[Sequence[Point]], weights: Sequence[Weights] = COMPONENTS) -> list[SuffixBound]:
    """The bound of every suffix on each weighting `w·value` of `weights` (default: each
    component alone): entry k bounds devices k.. (entry n: none left, 0). Each device's points
    are its options, load ascending with distinct loads (a DP chain). O(q · n · S log S)."""
    per_device = []
    for points in chains:
        base_load = points[0][0]
        weighted = [[(load, sum(a * b for a, b in zip(w, v, strict=True))) for load, v in points] for w in weights]
        base_value = [ws[0][1] for ws in weighted]
        segments = [hull_segments(ws) for ws in weighted]
        per_device.append((base_load, base_value, segments))
    out = []
    for k in range(len(chains) + 1):
        rest = per_device[k:]
        cum_load, cum_value = [], []
        for c in range(len(weights)):
            segs = sorted((s for _, _, per_c in rest for s in per_c[c]), key=lambda s: -s[0])
            cum_load.append(np.concatenate(([0.0], np.cumsum([s[1] for s in segs]))))
            cum_value.append(np.concatenate(([0.0], np.cumsum([s[2] for s in segs]))))
        base = np.array([sum(d[1][c] for d in rest) for c in range(len(weights))], dtype=np.float64)
        out.append(SuffixBound(sum(d[0] for d in rest), base, tuple(cum_load), tuple(cum_value)))
    return out
