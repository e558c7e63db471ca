"""An independent oracle for the cost model and the planning semantics of the design, for tests.

Written from the formulas alone: it reads cost graphs as the plain JSON dicts of the public
contract and never imports `dapdee.costmodel` or `dapdee.planning`, so a formula error in the
core cannot hide in the test that is meant to find it. It enumerates every downward-closed set
of an exit's ancestors, so it is meant for graphs of about a dozen nodes.

For an exit e, A(e) is the exit node and its ancestors. A device set D ⊆ A(e) is downward
closed (every producer of a node in D is in D or is the input); E = A(e) \\ D runs on the edge.
With uplink B Mbit/s, round trip rtt, loads ld and le, and (cost model v2) per-request
overheads dr, er that apply only when E is not empty:

    device_ms   = (Σ_D device_ms + [E≠∅]·dr) / (1 − ld)
    edge_ms     = (Σ_E edge_ms   + [E≠∅]·er) / (1 − le)
    sent_bytes  = Σ out_bytes(u), u ∈ D ∪ {input} with a consumer in E (each producer once);
                  ∞ when such a u is a node of "sendable": false (its value cannot cross: the
                  partition is infeasible, and never optimal since device-only is finite)
    uplink_ms   = sent_bytes · 8 / (B · 1000)
    transfer_ms = 0 if E = ∅ else uplink_ms + rtt
    latency_ms  = device_ms + transfer_ms + edge_ms
    bottleneck_ms = max(device_ms, uplink_ms, edge_ms);  throughput_fps = 1000 / bottleneck_ms
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

Graph = dict[str, Any]

TIE_RTOL = 1e-9  # throughput mode: bottlenecks this close count as tied (then lower latency wins)
FRAGILE_RTOL = 1e-6  # a comparison this close to its threshold is a floating-point coin toss


@dataclass(frozen=True)
class Cond:
    """Run-time conditions: uplink Mbit/s, round trip ms, device and edge load in [0, 1)."""

    bandwidth_mbps: float
    rtt_ms: float = 0.0
    device_load: float = 0.0
    edge_load: float = 0.0


@dataclass(frozen=True)
class Req:
    """A planning request: conditions plus requirements and mode (auto | latency | throughput)."""

    cond: Cond
    latency_budget_ms: float | None = None
    min_accuracy: float | None = None
    frame_rate: float | None = None
    mode: str = "auto"

    def body(self) -> dict[str, Any]:
        """The request as the fields of `POST /plan` (without the model)."""
        out: dict[str, Any] = {
            "bandwidth_mbps": self.cond.bandwidth_mbps,
            "rtt_ms": self.cond.rtt_ms,
            "device_load": self.cond.device_load,
            "edge_load": self.cond.edge_load,
            "mode": self.mode,
        }
        for k in ("latency_budget_ms", "min_accuracy", "frame_rate"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def cli_args(self) -> list[str]:
        """The request as `dapdee plan` options."""
        return [f"--{k.replace('_', '-')}" + f"={v}" for k, v in self.body().items()]


@dataclass(frozen=True)
class Price:
    """One partition of A(exit) priced under the cost model."""

    exit: str
    device_nodes: frozenset[str]
    edge_nodes: frozenset[str]
    transfer: dict[str, int] = field(hash=False)  # producer -> bytes sent uplink
    device_ms: float
    edge_ms: float
    sent_bytes: float  # an int, or inf for an infeasible partition
    uplink_ms: float
    transfer_ms: float
    latency_ms: float
    bottleneck_ms: float
    throughput_fps: float


# ---- structure -----------------------------------------------------------------------------------


def _nodes(g: Graph) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in g["nodes"]}


def exit_node(g: Graph, exit_name: str) -> str:
    for e in g["exits"]:
        if e["name"] == exit_name:
            return e["node"]
    raise KeyError(exit_name)


def needed(g: Graph, exit_name: str) -> list[str]:
    """A(exit): the exit node and every node it depends on, in the graph's (topological) order."""
    nodes = _nodes(g)
    keep: set[str] = set()
    todo = [exit_node(g, exit_name)]
    while todo:
        v = todo.pop()
        if v in keep:
            continue
        keep.add(v)
        todo.extend(u for u in nodes[v]["inputs"] if u in nodes)
    return [n["name"] for n in g["nodes"] if n["name"] in keep]


def ideals(g: Graph, exit_name: str) -> Iterator[frozenset[str]]:
    """Every downward-closed D ⊆ A(exit), each once: walk A(exit) in topological order and decide
    for each node "device" (allowed only when all its producers are on the device) or "edge"."""
    order = needed(g, exit_name)
    nodes = _nodes(g)
    inp = g["input"]["name"]

    def rec(i: int, dev: frozenset[str]) -> Iterator[frozenset[str]]:
        if i == len(order):
            yield dev
            return
        v = order[i]
        yield from rec(i + 1, dev)
        if all(u == inp or u in dev for u in nodes[v]["inputs"]):
            yield from rec(i + 1, dev | {v})

    yield from rec(0, frozenset())


def is_ideal(g: Graph, exit_name: str, device_nodes: set[str] | frozenset[str]) -> bool:
    nodes = _nodes(g)
    inp = g["input"]["name"]
    need = set(needed(g, exit_name))
    return set(device_nodes) <= need and all(
        u == inp or u in device_nodes for v in device_nodes for u in nodes[v]["inputs"]
    )


def prefixes(g: Graph, exit_name: str) -> list[frozenset[str]]:
    """The single splits of A(exit)'s topological order (first k nodes on the device)."""
    order = needed(g, exit_name)
    return [frozenset(order[:k]) for k in range(len(order) + 1)]


# ---- pricing ---------------------------------------------------------------------------------


def price(
    g: Graph,
    exit_name: str,
    device_nodes: set[str] | frozenset[str],
    cond: Cond,
    overheads: dict[str, float] | None = None,
) -> Price:
    """The cost model, term by term (see the module doc). `overheads` defaults to the graph's
    own `overheads` field (v2), absent meaning zeros (v1)."""
    nodes = _nodes(g)
    inp = g["input"]["name"]
    dev = frozenset(device_nodes)
    edge = frozenset(needed(g, exit_name)) - dev
    oh = (g.get("overheads") or {}) if overheads is None else overheads
    uses_edge = bool(edge)
    dr = oh.get("device_request_ms", 0.0) if uses_edge else 0.0
    er = oh.get("edge_request_ms", 0.0) if uses_edge else 0.0
    device_ms = (sum(nodes[v]["device_ms"] for v in dev) + dr) / (1.0 - cond.device_load)
    edge_ms = (sum(nodes[v]["edge_ms"] for v in edge) + er) / (1.0 - cond.edge_load)
    transfer: dict[str, int] = {}
    for v in edge:
        for u in nodes[v]["inputs"]:
            if u == inp:
                transfer[u] = g["input"]["bytes"]
            elif u in dev:
                transfer[u] = nodes[u]["out_bytes"]
    sent: float = sum(transfer.values())
    if any(u != inp and nodes[u].get("sendable", True) is False for u in transfer):
        sent = math.inf  # a value that cannot cross: infeasible
    uplink_ms = sent * 8 / (cond.bandwidth_mbps * 1000)
    transfer_ms = uplink_ms + cond.rtt_ms if uses_edge else 0.0
    bottleneck = max(device_ms, uplink_ms, edge_ms)
    return Price(
        exit=exit_name,
        device_nodes=dev,
        edge_nodes=edge,
        transfer=transfer,
        device_ms=device_ms,
        edge_ms=edge_ms,
        sent_bytes=sent,
        uplink_ms=uplink_ms,
        transfer_ms=transfer_ms,
        latency_ms=device_ms + transfer_ms + edge_ms,
        bottleneck_ms=bottleneck,
        throughput_fps=1000 / bottleneck if bottleneck > 0 else math.inf,
    )


def best(parts: list[Price], objective: str) -> Price:
    """Minimum latency_ms; or minimum bottleneck_ms, ties broken by lower latency_ms."""
    if objective == "latency":
        return min(parts, key=lambda p: p.latency_ms)
    low = min(p.bottleneck_ms for p in parts)
    return min((p for p in parts if p.bottleneck_ms <= low * (1 + TIE_RTOL)), key=lambda p: p.latency_ms)


def all_prices(g: Graph, cond: Cond, sets: str = "ideals") -> dict[str, list[Price]]:
    """Every exit's partitions priced: all downward-closed sets, or only the `prefixes`."""
    pick = ideals if sets == "ideals" else prefixes
    return {e["name"]: [price(g, e["name"], d, cond) for d in pick(g, e["name"])] for e in g["exits"]}


# ---- planning semantics ---------------------------------------------------------------------------


@dataclass
class Decision:
    """What the design says a plan must be: mode used, exit, constraints met, and the optimal value
    (`value_key` of the plan's `predicted`). `fragile` is set when a deciding comparison was within
    FRAGILE_RTOL of its threshold, so floating-point rounding may legitimately go either way."""

    mode: str
    exit: str
    met: bool
    value_key: str
    value: float
    choice: Price
    fragile: bool = False


def _acc_ok(acc: float | None, req: Req) -> bool:
    return req.min_accuracy is None or (acc is not None and acc >= req.min_accuracy)


def _near(a: float, b: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):  # an infeasible (infinite) price is near nothing finite
        return a == b
    return abs(a - b) <= FRAGILE_RTOL * max(1.0, abs(a), abs(b))


def walk(g: Graph, prices: dict[str, list[Price]], req: Req, objective: str) -> Decision:
    """The inverse search: exits deepest -> shallowest, each exit's best partition under
    `objective`; the first meeting the requirements wins. Nothing meets: the best among the exits
    meeting min_accuracy (or among all), constraints not met."""
    key = "latency_ms" if objective == "latency" else "bottleneck_ms"
    if objective == "latency":
        limit = req.latency_budget_ms
    else:
        limit = None if req.frame_rate is None else 1000 / req.frame_rate
    fragile = False
    chosen = {e["name"]: best(prices[e["name"]], objective) for e in g["exits"]}
    acc = {e["name"]: e["accuracy"] for e in g["exits"]}
    for e in reversed(g["exits"]):
        c = chosen[e["name"]]
        if not _acc_ok(acc[e["name"]], req):
            continue
        v = getattr(c, key)
        if limit is not None and _near(v, limit):
            fragile = True
        if limit is None or v <= limit:
            return Decision(objective, e["name"], True, key, v, c, fragile)
    pool = [e["name"] for e in g["exits"] if _acc_ok(acc[e["name"]], req)] or [e["name"] for e in g["exits"]]
    order = sorted(pool, key=lambda n: (getattr(chosen[n], key), chosen[n].latency_ms))
    if len(order) > 1 and _near(getattr(chosen[order[0]], key), getattr(chosen[order[1]], key)):
        fragile = True
    top = order[0]
    return Decision(objective, top, False, key, getattr(chosen[top], key), chosen[top], fragile)


def decide(g: Graph, req: Req, prices: dict[str, list[Price]] | None = None) -> Decision:
    """Apply the request's mode. auto: the latency plan if it sustains frame_rate (throughput_fps
    >= frame_rate) or none is given, else the throughput plan."""
    prices = prices if prices is not None else all_prices(g, req.cond)
    if req.mode in ("latency", "throughput"):
        return walk(g, prices, req, req.mode)
    lat = walk(g, prices, req, "latency")
    if req.frame_rate is None:
        return lat
    fps = lat.choice.throughput_fps
    # partitions tied on latency may differ in throughput: then "its plan" is not one plan
    ties = [p for p in prices[lat.exit] if _near(p.latency_ms, lat.choice.latency_ms)]
    if _near(fps, req.frame_rate) or any((p.throughput_fps >= req.frame_rate) != (fps >= req.frame_rate) for p in ties):
        lat.fragile = True
    if fps >= req.frame_rate:
        return lat
    thr = walk(g, prices, req, "throughput")
    thr.fragile = thr.fragile or lat.fragile
    return thr


# ---- random graphs and requests (seeded, deterministic) ----------------------------------------


def chain_graph(device_ms: float, edge_ms: float, edge_request_ms: float) -> Graph:
    """x -(1000 B)-> a -(100 B)-> b, one exit at b (accuracy 0.9): each node takes `device_ms` on
    the device and `edge_ms` on the edge, and a request costs the edge `edge_request_ms`."""

    def node(name: str, inp: str, out_bytes: int) -> dict[str, Any]:
        timings = {"device_ms": device_ms, "edge_ms": edge_ms}
        return {"name": name, "op": "", "inputs": [inp], "out_bytes": out_bytes, **timings}

    return {
        "model": "m",
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": 1000},
        "nodes": [node("a", "x", 100), node("b", "a", 10)],
        "exits": [{"name": "final", "node": "b", "accuracy": 0.9}],
        "overheads": {"device_request_ms": 0.0, "edge_request_ms": edge_request_ms},
    }


def random_graph(rng: random.Random, max_nodes: int = 8, name: str = "rand", unsendable: float = 0.0) -> Graph:
    """A small DAG: each node consumes 1-3 earlier producers (the input included), positive
    timings, byte counts from 0 to 60 kB, 1-3 exits with accuracies rising with depth (or null);
    each node is `"sendable": false` with probability `unsendable` (0: the field is absent and
    the random stream is the one it always was)."""
    n = rng.randint(1, max_nodes)
    nodes = []
    for i in range(n):
        pool = ["x"] + [f"n{j}" for j in range(i)]
        k = rng.randint(1, min(3, len(pool)))
        nodes.append(
            {
                "name": f"n{i}",
                "op": "op",
                "inputs": rng.sample(pool, k),
                "out_bytes": rng.choice([0, rng.randint(1, 60_000), rng.randint(1, 60_000)]),
                "device_ms": round(rng.uniform(0.01, 20.0), 6),
                "edge_ms": round(rng.uniform(0.01, 5.0), 6),
            }
        )
    for nd in nodes:
        if unsendable and rng.random() < unsendable:
            nd["sendable"] = False
    picks = sorted(rng.sample(range(n), rng.randint(1, min(3, n))))
    exits = []
    for j, i in enumerate(picks):
        acc = None if rng.random() < 0.15 else round(0.5 + 0.1 * j + rng.uniform(0, 0.09), 4)
        exits.append({"name": f"e{j}", "node": f"n{i}", "accuracy": acc})
    return {
        "model": name,
        "input": {"name": "x", "shape": [1, 4], "dtype": "float32", "bytes": rng.randint(1, 60_000)},
        "nodes": nodes,
        "exits": exits,
    }


def random_request(rng: random.Random, mode: str | None = None) -> Req:
    """Log-uniform bandwidth, any loads and round trip; each requirement present half the time."""
    cond = Cond(
        bandwidth_mbps=round(10 ** rng.uniform(-1.3, 2.7), 6),
        rtt_ms=round(rng.choice([0.0, rng.uniform(0, 40)]), 6),
        device_load=round(rng.uniform(0, 0.9), 6),
        edge_load=round(rng.uniform(0, 0.9), 6),
    )
    return Req(
        cond,
        latency_budget_ms=round(rng.uniform(1, 120), 6) if rng.random() < 0.5 else None,
        min_accuracy=round(rng.uniform(0.4, 0.8), 4) if rng.random() < 0.5 else None,
        frame_rate=round(10 ** rng.uniform(0.5, 2.5), 6) if rng.random() < 0.5 else None,
        mode=mode or rng.choice(["auto", "latency", "throughput"]),
    )


# ---- checking a plan JSON ------------------------------------------------------------------------


def close(a: float, b: float, rtol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)


PREDICTED_KEYS = ("latency_ms", "device_ms", "transfer_ms", "edge_ms", "bottleneck_ms", "throughput_fps")


def check_consistent(g: Graph, plan: dict[str, Any], cond: Cond) -> Price:
    """The plan's node lists form a partition of A(exit) with a downward-closed device side, and its
    transfer list and predicted numbers are the oracle's for that partition. Returns that price."""
    ex = plan["exit"]["name"]
    dev = plan["device_nodes"]
    assert len(set(dev)) == len(dev) and is_ideal(g, ex, set(dev)), (ex, dev)
    assert set(dev) | set(plan["edge_nodes"]) == set(needed(g, ex)), plan["edge_nodes"]
    assert not set(dev) & set(plan["edge_nodes"])
    p = price(g, ex, set(dev), cond)
    unsendable = {n["name"] for n in g["nodes"] if n.get("sendable", True) is False}
    assert not unsendable & {t["node"] for t in plan["transfer"]}, ("an unsendable value crosses", plan["transfer"])
    got = {t["node"]: t["bytes"] for t in plan["transfer"]}
    assert len(got) == len(plan["transfer"]) and got == p.transfer, (got, p.transfer)
    for k in PREDICTED_KEYS:
        want = getattr(p, k)
        if not math.isfinite(want):  # a plan's numbers are finite: an unbounded rate is null
            assert k == "throughput_fps" and plan["predicted"][k] is None, (k, plan["predicted"][k])
            continue
        assert close(plan["predicted"][k], want), (k, plan["predicted"][k], want)
    acc = {e["name"]: e["accuracy"] for e in g["exits"]}[ex]
    assert plan["exit"]["accuracy"] == acc and plan["predicted"]["accuracy"] == acc
    return p


def check_plan(g: Graph, plan: dict[str, Any], req: Req, want: Decision | None = None) -> Decision:
    """The plan is consistent and exactly what the design's walk over all partitions gives."""
    want = want or decide(g, req)
    p = check_consistent(g, plan, req.cond)
    assert plan["mode"] == want.mode, (plan["mode"], want.mode)
    assert plan["exit"]["name"] == want.exit, (plan["exit"]["name"], want.exit, want.value)
    assert plan["constraints_met"] is want.met
    assert close(getattr(p, want.value_key), want.value), (want.value_key, getattr(p, want.value_key), want.value)
    if want.mode == "throughput":  # among the optimal bottlenecks, the lowest latency
        assert p.latency_ms <= want.choice.latency_ms * (1 + 1e-9) + 1e-12
    return want


# ---- capped plan maps: throughput answers between two bounds ---------------------------------------


def walk_values(g: Graph, values: dict[str, float], req: Req) -> tuple[str, bool, bool]:
    """The throughput walk over given per-exit bottlenecks: (exit, met, fragile)."""
    limit = None if req.frame_rate is None else 1000 / req.frame_rate
    acc = {e["name"]: e["accuracy"] for e in g["exits"]}
    fragile = False
    for e in reversed(g["exits"]):
        if not _acc_ok(acc[e["name"]], req):
            continue
        v = values[e["name"]]
        fragile = fragile or (limit is not None and _near(v, limit))
        if limit is None or v <= limit:
            return e["name"], True, fragile
    pool = [e["name"] for e in g["exits"] if _acc_ok(acc[e["name"]], req)] or [e["name"] for e in g["exits"]]
    return min(pool, key=lambda n: values[n]), False, fragile


def check_capped_throughput(
    g: Graph, plan: dict[str, Any], req: Req, exact: dict[str, float], upper: dict[str, float]
) -> bool:
    """A throughput plan from a plan map that could not enumerate every exit: consistent, and
    between two bounds. `exact`: each exit's optimal bottleneck over all partitions; `upper`: each
    exit's best over the partitions the capped map always keeps (every prefix split of the
    topological order). With the capped map's per-exit value a(e) in [exact(e), upper(e)], the
    exits meeting the frame rate nest (upper's ⊆ capped's ⊆ exact's), so the plan's exit lies between
    the two walks' exits. Returns False (checking nothing more) when a bound's walk is decided by
    floating-point rounding."""
    p = check_consistent(g, plan, req.cond)
    names = [e["name"] for e in g["exits"]]
    ex = plan["exit"]["name"]
    assert plan["mode"] == "throughput" and plan["approximate"] is True
    assert exact[ex] * (1 - 1e-9) <= p.bottleneck_ms <= upper[ex] * (1 + 1e-9) + 1e-12, (
        exact[ex],
        p.bottleneck_ms,
        upper[ex],
    )
    lo_exit, lo_met, lo_fragile = walk_values(g, upper, req)
    hi_exit, hi_met, hi_fragile = walk_values(g, exact, req)
    limit = None if req.frame_rate is None else 1000 / req.frame_rate
    if lo_fragile or hi_fragile or (limit is not None and _near(p.bottleneck_ms, limit)):
        return False
    i = names.index(ex)
    if lo_met:
        assert plan["constraints_met"] is True and i >= names.index(lo_exit), (ex, lo_exit)
    if plan["constraints_met"]:
        assert hi_met and i <= names.index(hi_exit), (ex, hi_exit)
    else:
        assert not lo_met
        acc = {e["name"]: e["accuracy"] for e in g["exits"]}
        pool = [n for n in names if _acc_ok(acc[n], req)] or names
        assert ex in pool
        low, high = min(exact[n] for n in pool), min(upper[n] for n in pool)
        assert low * (1 - 1e-9) <= p.bottleneck_ms <= high * (1 + 1e-9) + 1e-12
    return True
