"""Downward-closed partitions of one exit's sub-graph A(e): structure, enumeration, Pareto front.

A partition of A(e) is identified by its device set D, stored as a Python int bit mask over
A(e)'s nodes in topological order (bit i = i-th node of A(e) runs on the device).

A device set is *feasible* when no node of `sendable: false` in D has a consumer in E (its
value would have to cross the uplink; the cost model prices that at infinite bytes). Such a
node and its consumers in A(e) are then on the same side: D ∋ u implies its consumers are in
D, and downward closure gives the converse. The enumeration walks every downward-closed set
(the feasible ones are not closed under its single-node steps) and `feasible_ideals` keeps the
feasible ones; prefix splits are filtered the same way; the device-only and edge-only sets are
always feasible (the input is always sendable).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from dapdee.costgraph import NO_OVERHEADS, CostGraph, Overheads

DEADLINE_EVERY = 4096  # enumeration looks at the clock once per this many ideals


@dataclass(frozen=True)
class ExitStructure:
    """A(e) of one exit, with local indices 0..m-1 in topological order.

    `preds[i]`/`cons[i]`: local producers / consumers of node i inside A(e);
    `preds_mask`, `cons_mask`: the same as bit masks; `uses_input[i]`: i consumes the input;
    `input_cons_mask`: the input's consumers in A(e); `unsendable`: the local indices of the
    nodes of `sendable: false` that have a consumer in A(e) (empty for most graphs)."""

    exit_name: str
    exit_index: int
    accuracy: float | None
    input_name: str
    input_bytes: int
    nodes: tuple[str, ...]
    dev: tuple[float, ...]
    edge: tuple[float, ...]
    out: tuple[int, ...]
    preds: tuple[tuple[int, ...], ...]
    cons: tuple[tuple[int, ...], ...]
    preds_mask: tuple[int, ...]
    cons_mask: tuple[int, ...]
    uses_input: tuple[bool, ...]
    input_cons_mask: int
    overheads: Overheads = NO_OVERHEADS  # the graph's per-request costs (cost model v2)
    unsendable: tuple[int, ...] = ()

    @property
    def m(self) -> int:
        return len(self.nodes)

    @property
    def full(self) -> int:
        """Mask of D = A(e) (device only)."""
        return (1 << len(self.nodes)) - 1

    @classmethod
    def build(cls, graph: CostGraph, exit_index: int) -> ExitStructure:
        """Index A(e) of `graph.exits[exit_index]`. O(V + E)."""
        ex = graph.exits[exit_index]
        names = graph.ancestors(ex.node)
        local = {n: i for i, n in enumerate(names)}
        preds: list[list[int]] = [[] for _ in names]
        cons: list[list[int]] = [[] for _ in names]
        uses_input = [False] * len(names)
        in_mask = 0
        for i, n in enumerate(names):
            seen: set[int] = set()
            for u in graph.node(n).inputs:
                if u == graph.input.name:
                    uses_input[i] = True
                    in_mask |= 1 << i
                elif local[u] not in seen:
                    seen.add(local[u])
                    preds[i].append(local[u])
                    cons[local[u]].append(i)
        nodes = [graph.node(n) for n in names]
        return cls(
            exit_name=ex.name,
            exit_index=exit_index,
            accuracy=ex.accuracy,
            input_name=graph.input.name,
            input_bytes=graph.input.bytes,
            nodes=tuple(names),
            dev=tuple(float(n.device_ms or 0.0) for n in nodes),
            edge=tuple(float(n.edge_ms or 0.0) for n in nodes),
            out=tuple(int(n.out_bytes) for n in nodes),
            preds=tuple(tuple(sorted(p)) for p in preds),
            cons=tuple(tuple(sorted(c)) for c in cons),
            preds_mask=tuple(sum(1 << u for u in p) for p in preds),
            cons_mask=tuple(sum(1 << c for c in cs) for cs in cons),
            uses_input=tuple(uses_input),
            input_cons_mask=in_mask,
            overheads=graph.overheads,
            unsendable=tuple(i for i, n in enumerate(nodes) if not n.sendable and cons[i]),
        )

    # ---- one partition -------------------------------------------------------------------
    def is_closed(self, mask: int) -> bool:
        """True if the device set `mask` is downward closed. O(m)."""
        return all(not (mask >> i) & 1 or (self.preds_mask[i] & ~mask) == 0 for i in range(self.m))

    def feasible(self, mask: int) -> bool:
        """True unless a node of `sendable: false` in the device set `mask` has a consumer
        outside it (see the module doc). O(#unsendable)."""
        return all(not (mask >> i) & 1 or (self.cons_mask[i] & ~mask) == 0 for i in self.unsendable)

    def sums(self, mask: int) -> tuple[float, int | float, float]:
        """(Σ device_ms over D, sent bytes, Σ edge_ms over E) at zero load, sums in topological
        order (the same numbers `costmodel.partition` gives); the bytes are infinite for an
        infeasible `mask` (the cost model's price of a value that cannot cross). O(m + E)."""
        dev = 0.0
        edge = 0.0
        sent = self.input_bytes if (self.input_cons_mask & ~mask) else 0
        for i in range(self.m):
            if (mask >> i) & 1:
                dev += self.dev[i]
                if self.cons_mask[i] & ~mask:
                    sent += self.out[i]
            else:
                edge += self.edge[i]
        return dev, sent if self.feasible(mask) else math.inf, edge

    def lists(self, mask: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, int], ...]]:
        """(device nodes, edge nodes, transfer [(producer, bytes)]) of the device set `mask`, in
        topological order, the input first among producers (as `costmodel.partition`). O(m + E)."""
        dev = tuple(n for i, n in enumerate(self.nodes) if (mask >> i) & 1)
        edge = tuple(n for i, n in enumerate(self.nodes) if not (mask >> i) & 1)
        transfer: list[tuple[str, int]] = []
        if self.input_cons_mask & ~mask:
            transfer.append((self.input_name, self.input_bytes))
        for i, n in enumerate(self.nodes):
            if (mask >> i) & 1 and self.cons_mask[i] & ~mask:
                transfer.append((n, self.out[i]))
        return dev, edge, tuple(transfer)


def enumerate_ideals(
    st: ExitStructure, cap: int, deadline: float | None = None
) -> tuple[list[float], list[int], list[float], list[int]] | None:
    """All downward-closed device sets D of A(e) with their (Σdevice_ms, sent bytes, Σedge_ms over D).

    Each ideal is generated exactly once, by adding its nodes in increasing topological index
    (reverse search: a child adds one "available" node after the last one added). Returns
    (device sums, sent bytes, edge sums *of D*, masks), or None as soon as more than `cap`
    ideals exist, or once `deadline` (a `time.monotonic()` value; checked every
    `DEADLINE_EVERY` ideals) has passed. A stack frame keeps a reference to its parent's
    candidate list and materialises its own only when popped, so memory stays O(#ideals + m ·
    depth) however wide A(e) is. O(#ideals · (width + degree)) time."""
    m = st.m
    dev, edge, out = st.dev, st.edge, st.out
    preds, cons, pmask, cmask = st.preds, st.cons, st.preds_mask, st.cons_mask
    uses_input, in_mask, in_bytes = st.uses_input, st.input_cons_mask, st.input_bytes
    roots = [i for i in range(m) if pmask[i] == 0]
    b0 = in_bytes if in_mask else 0
    devs: list[float] = [0.0]
    byts: list[int] = [b0]
    eds: list[float] = [0.0]
    masks: list[int] = [0]
    # frame: (device set, parent's candidates, first of them still available, newly available
    # consumers, Σdevice, bytes, Σedge); its candidate list is sorted(parent[start:] + new)
    stack: list[tuple[int, list[int], int, list[int], float, int, float]] = [(0, roots, 0, [], 0.0, b0, 0.0)]
    count = 1
    while stack:
        d_mask, parent, start, extra, dv, by, ed = stack.pop()
        cand = sorted(parent[start:] + extra) if extra else parent[start:] if start else parent
        for p, v in enumerate(cand):
            d2 = d_mask | (1 << v)
            nd = dv + dev[v]
            ne = ed + edge[v]
            nb = by + out[v] if cmask[v] else by
            for u in preds[v]:
                if (cmask[u] & ~d2) == 0:
                    nb -= out[u]
            if uses_input[v] and (in_mask & ~d2) == 0:
                nb -= in_bytes
            devs.append(nd)
            byts.append(nb)
            eds.append(ne)
            masks.append(d2)
            count += 1
            if count > cap:
                return None
            if deadline is not None and not count % DEADLINE_EVERY and time.monotonic() > deadline:
                return None
            new = [c for c in cons[v] if (pmask[c] & ~d2) == 0]
            if new or p + 1 < len(cand):
                stack.append((d2, cand, p + 1, new, nd, nb, ne))
    return devs, byts, eds, masks


def feasible_ideals(
    st: ExitStructure, found: tuple[list[float], list[int], list[float], list[int]]
) -> tuple[list[float], list[int], list[float], list[int]]:
    """`enumerate_ideals`' lists restricted to the feasible device sets (unchanged, not copied,
    when A(e) has no unsendable node with a consumer). O(#ideals · #unsendable)."""
    if not st.unsendable:
        return found
    devs, byts, eds, masks = found
    keep = [k for k, m in enumerate(masks) if st.feasible(m)]
    return [devs[k] for k in keep], [byts[k] for k in keep], [eds[k] for k in keep], [masks[k] for k in keep]


def pareto_indices(dev: np.ndarray, sent: np.ndarray, edge: np.ndarray) -> list[int]:
    """Indices of the points not weakly dominated in (dev, sent, edge) (of equal points, the
    first is kept). `pareto_scan` without slack. O(n log n)."""
    return pareto_scan(dev, sent, edge, 0.0)[0]


def pareto_scan(dev: np.ndarray, sent: np.ndarray, edge: np.ndarray, slack: float) -> tuple[list[int], list[int]]:
    """(kept, near): the indices of the points not weakly dominated in (dev, sent, edge) (of
    equal points, the first is kept), and of the dropped points whose edge a dominating point's
    is within `slack` below (dropped by a margin an error of `slack` / 2 in `edge` could undo).
    Points are scanned in lexicographic (dev, sent, edge) order, ties in index order; a point is
    dominated iff a kept point has sent <= its sent and edge <= its edge, answered by a
    prefix-minimum Fenwick tree over the ranks of `sent`. O(n log n)."""
    n = len(dev)
    if n == 0:
        return [], []
    order = np.lexsort((edge, sent, dev)).tolist()
    ranks = np.searchsorted(np.unique(sent), sent).tolist()  # 0-based rank of each point's sent
    size = max(ranks) + 1
    tree = [float("inf")] * (size + 1)
    edge_l = edge.tolist()
    keep: list[int] = []
    near: list[int] = []
    for j in order:
        e = edge_l[j]
        r = ranks[j] + 1
        best = float("inf")
        i = r
        while i > 0:
            if tree[i] < best:
                best = tree[i]
            i -= i & -i
        if best <= e:
            if best > e - slack:
                near.append(j)
            continue
        keep.append(j)
        i = r
        while i <= size:
            if e < tree[i]:
                tree[i] = e
            i += i & -i
    return keep, near


def prefix_masks(st: ExitStructure) -> list[int]:
    """Device sets D = the first k nodes of A(e)'s topological order, k = 0..m, that are feasible
    (the single-split partitions Neurosurgeon and Edgent consider; each prefix is downward
    closed; k = 0 and k = m are always feasible). O(m · #unsendable)."""
    return [mask for mask in ((1 << k) - 1 for k in range(st.m + 1)) if st.feasible(mask)]


def prefix_sums(st: ExitStructure) -> tuple[list[float], list[int], list[float]]:
    """(Σdevice_ms over D, sent bytes, Σedge_ms over E) for each prefix mask of `prefix_masks`
    (the feasible prefixes), computed incrementally over every prefix. O(m + E) Python steps
    plus O(m²) vectorised additions."""
    m = st.m
    devs = [0.0]
    byts = [st.input_bytes if st.input_cons_mask else 0]
    d = 0
    for v in range(m):
        d |= 1 << v
        nb = byts[-1] + (st.out[v] if st.cons_mask[v] else 0)
        for u in st.preds[v]:
            if (st.cons_mask[u] & ~d) == 0:
                nb -= st.out[u]
        if st.uses_input[v] and (st.input_cons_mask & ~d) == 0:
            nb -= st.input_bytes
        devs.append(devs[-1] + st.dev[v])
        byts.append(nb)
    # Σ edge over E = suffix sums, each accumulated in topological order from its k (adding
    # edge[i] to every k <= i, i ascending, keeps that order: bit-identical to `st.sums`)
    acc = np.zeros(m + 1)
    for i in range(m):
        acc[: i + 1] += st.edge[i]
    eds = acc.tolist()
    if not st.unsendable:
        return devs, byts, eds
    keep = [k for k in range(m + 1) if st.feasible((1 << k) - 1)]
    return [devs[k] for k in keep], [byts[k] for k in keep], [eds[k] for k in keep]
