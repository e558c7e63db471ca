"""Min-cut partitioning (DADS-style) of one exit's sub-graph A(e).

Construction (source side = device, sink side = edge; the input *is* the source, so it is
pinned to the device):

- source -> v, capacity w_edge · edge_ms(v)   (paid when v runs on the edge)
- v -> sink,   capacity w_dev · device_ms(v)  (paid when v runs on the device)
- consumer -> producer, infinite               (D must be downward closed)
- producer u with one consumer c in A(e): u -> c, capacity w_bytes · out_bytes(u);
  with several: u -> helper_u (w_bytes · out_bytes(u)) and helper_u -> c (infinite) for each
  consumer, so u's tensor is paid once however many edge-side consumers it has;
- a producer u of `sendable: false`: u -> c, infinite, for each consumer c (its value would
  cost infinite bytes to send), so a finite cut keeps u's consumers on the device with u; the
  edge-only cut is always finite (the input is sendable), so the minimum is a feasible set.

The minimum cut minimises w_dev·Σ_D device_ms + w_bytes·sent_bytes + w_edge·Σ_E edge_ms over
all feasible downward-closed D. The round trip `rtt_ms` and the v2 per-request overheads are paid only
when E is non-empty (the same constants for every such D, so they do not move the cut), so the
latency optimum is the better of the min-cut's D (plus those constants unless D = A(e)) and
device-only.
"""

from __future__ import annotations

import math

import networkx as nx

from dapdee.costmodel import Conditions, stage_ms
from dapdee.planning.enumerate import ExitStructure


def min_cut_mask(st: ExitStructure, w_dev: float, w_bytes: float, w_edge: float) -> int:
    """Device-set mask minimising w_dev·Σdevice_ms(D) + w_bytes·sent_bytes(D) + w_edge·Σedge_ms(E)
    over feasible downward-closed D ⊆ A(e) (see the module doc). One networkx max-flow
    (preflow-push) on m + helpers + 2 nodes: O(V'^2 · sqrt(E')) worst case."""
    # the argmin is invariant to scaling the weights: normalise so no capacity overflows
    ws = (w_dev, w_bytes, w_edge)
    top = max(ws)
    if math.isinf(top):
        w_dev, w_bytes, w_edge = (1.0 if math.isinf(w) else 0.0 for w in ws)
    elif top > 0:
        w_dev, w_bytes, w_edge = (w / top for w in ws)
    m = st.m
    src, sink = m, m + 1
    caps: dict[tuple[int, int], float] = {}

    def add(u: int, v: int, c: float) -> None:
        caps[(u, v)] = caps.get((u, v), 0.0) + c

    nxt = m + 2
    producers: list[tuple[int, int, tuple[int, ...]]] = [
        (src, st.input_bytes, tuple(i for i in range(m) if st.uses_input[i]))
    ]
    for i in range(m):
        add(src, i, w_edge * st.edge[i])
        add(i, sink, w_dev * st.dev[i])
        for u in st.preds[i]:
            caps[(i, u)] = math.inf
        producers.append((i, st.out[i], st.cons[i]))
    blocked = set(st.unsendable)
    for u, nbytes, consumers in producers:
        if not consumers:
            continue
        if u in blocked:
            for c in consumers:
                caps[(u, c)] = math.inf
        elif len(consumers) == 1:
            add(u, consumers[0], w_bytes * nbytes)
        else:
            h = nxt
            nxt += 1
            add(u, h, w_bytes * nbytes)
            for c in consumers:
                caps[(h, c)] = math.inf
    g = nx.DiGraph()
    g.add_nodes_from(range(nxt))
    for (u, v), c in caps.items():
        if math.isinf(c):
            g.add_edge(u, v)  # no capacity attribute: infinite for networkx
        else:
            g.add_edge(u, v, capacity=c)
    mask = 0
    for v in _source_side(g, src, sink):
        if v < m:
            mask |= 1 << v
    return mask


def _source_side(g: nx.DiGraph, src: int, sink: int) -> set[int]:
    """The source side of a minimum `src`-`sink` cut of `g`: every node that cannot reach `sink`
    over edges with residual capacity left, after preflow-push's first phase (a maximum
    preflow, which is what networkx's own `minimum_cut` reads too). networkx counts an edge as
    saturated only when its float flow equals its capacity exactly, so an edge left a few ulps
    short by the arithmetic moved nodes across the cut and its value off the minimum; here a
    residual within a relative 1e-12 (of the flow's value and the edge's capacity) counts as
    none, so the cut's value is the flow's up to that tolerance per edge. Where preflow-push's
    float arithmetic fails inside networkx (timings 15 orders of magnitude apart can leave a node
    with excess and no residual edge), Edmonds-Karp's augmenting paths give the flow instead.
    One preflow-push: O(V^2 · sqrt(E)) worst case (Edmonds-Karp: O(V · E^2)), plus O(V + E)."""
    try:
        residual = nx.algorithms.flow.preflow_push(g, src, sink, value_only=True)
    except (ValueError, KeyError):
        residual = nx.algorithms.flow.edmonds_karp(g, src, sink)
    scale = 1.0 + residual.graph["flow_value"]
    reaches, stack = {sink}, [sink]
    while stack:
        v = stack.pop()
        for u, attr in residual.pred[v].items():
            if u not in reaches and attr["capacity"] - attr["flow"] > 1e-12 * (scale + abs(attr["capacity"])):
                reaches.add(u)
                stack.append(u)
    return set(residual) - reaches


def latency_weights(cond: Conditions) -> tuple[float, float, float]:
    """(w_dev, w_bytes, w_edge) that make the cut value the latency (without rtt) under `cond`."""
    return stage_ms(1.0, 1.0, 1.0, cond)


def min_latency_mask(st: ExitStructure, cond: Conditions) -> int:
    """The device set of minimum latency_ms for A(e) under `cond` (exact): the latency min-cut,
    compared with device-only because rtt is only paid when something runs on the edge.
    One max-flow plus O(m)."""
    from dapdee.costmodel import predict_sums

    mask = min_cut_mask(st, *latency_weights(cond))
    if mask == st.full:
        return mask
    d, b, e = st.sums(mask)
    cut = predict_sums(d, b, e, False, cond, st.overheads).latency_ms
    dd, _, _ = st.sums(st.full)
    local = predict_sums(dd, 0, 0.0, True, cond, st.overheads).latency_ms
    return st.full if local <= cut else mask


GRID = tuple(2.0**k for k in range(-3, 4))


def weight_grid_masks(st: ExitStructure, cond: Conditions, grid: tuple[float, ...] = GRID) -> set[int]:
    """DADS's heavy-load search: min-cuts with the device and edge costs re-weighted by α, γ over
    `grid` × `grid` (transfer weight fixed), plus device-only. The caller keeps the cut of best
    bottleneck; this is a heuristic (DADS proves a 3-approximation), not exact.
    O(|grid|² max-flows)."""
    w_dev, w_bytes, w_edge = latency_weights(cond)
    found = {st.full}
    for alpha in grid:
        for gamma in grid:
            found.add(min_cut_mask(st, alpha * w_dev, w_bytes, gamma * w_edge))
    return found
