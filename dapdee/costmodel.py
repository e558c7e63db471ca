"""The cost model: what `predicted` in a plan means (docs/DESIGN.md, "Cost model").

Every planner, baseline, service, client and benchmark prices a partition through
`Partition.predict` (from node sets) or `predict_sums` (from the three sums the plan map keeps),
so there is exactly one definition of latency, bottleneck and throughput.

Version 2 adds the graph's per-request `overheads` to the device and edge sums of every
partition that uses the edge (`request_sums`); with zero overheads it is exactly version 1.

A node of `sendable: false` (a value that is not a tensor) cannot cross the uplink: a
partition with such a node on the device and one of its consumers on the edge is infeasible,
its sent bytes infinite (`predict_sums` then gives infinite latency and bottleneck, so no
planner picks it: the device-only and edge-only partitions are always feasible). `partition`
refuses to build one, as it refuses a set that is not downward closed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dapdee.costgraph import NO_OVERHEADS, CostGraph, CostGraphError, Overheads, is_finite_number


@dataclass(frozen=True)
class Conditions:
    """Run-time conditions: uplink Mbit/s, round trip ms, device and edge load in [0, 1)."""

    bandwidth_mbps: float
    rtt_ms: float = 0.0
    device_load: float = 0.0
    edge_load: float = 0.0

    def __post_init__(self) -> None:
        check_conditions(self.bandwidth_mbps, self.rtt_ms, self.device_load, self.edge_load)


def check_conditions(bandwidth_mbps: float, rtt_ms: float, device_load: float, edge_load: float) -> None:
    """Raise ValueError naming the first out-of-range field."""
    if not is_finite_number(bandwidth_mbps) or bandwidth_mbps <= 0:
        raise ValueError(f"bandwidth_mbps: must be a finite number > 0, got {bandwidth_mbps!r}")
    if not is_finite_number(rtt_ms) or rtt_ms < 0:
        raise ValueError(f"rtt_ms: must be a finite number >= 0, got {rtt_ms!r}")
    for name, v in (("device_load", device_load), ("edge_load", edge_load)):
        if not is_finite_number(v) or not 0.0 <= v < 1.0:
            raise ValueError(f"{name}: must be in [0, 1), got {v!r}")


@dataclass(frozen=True)
class Predicted:
    latency_ms: float
    device_ms: float
    transfer_ms: float
    uplink_ms: float
    edge_ms: float
    bottleneck_ms: float
    throughput_fps: float
    sent_bytes: int

    def as_dict(self, accuracy: float | None) -> dict[str, float | None]:
        """The `predicted` object of the plan JSON: every number finite; `throughput_fps` is null
        when it has no finite value: `bottleneck_ms` is 0 (no stage takes any time) or so close
        to 0 (below ~5.6e-306 ms, subnormal timings) that 1000 / bottleneck_ms overflows."""
        fps = self.throughput_fps
        return {
            "latency_ms": self.latency_ms,
            "device_ms": self.device_ms,
            "transfer_ms": self.transfer_ms,
            "edge_ms": self.edge_ms,
            "bottleneck_ms": self.bottleneck_ms,
            "throughput_fps": fps if math.isfinite(fps) else None,
            "accuracy": accuracy,
        }


def uplink_ms(sent_bytes: Any, bandwidth_mbps: float) -> Any:
    """The uplink time of `sent_bytes` at `bandwidth_mbps` Mbit/s: 8·bytes / (1000·B) ms (the
    transfer term without the round trip). Elementwise. O(1)."""
    return sent_bytes * 8.0 / (bandwidth_mbps * 1000.0)


def stage_weights(cond: Conditions) -> tuple[float, float, float]:
    """The factors that turn zero-load (device ms, bytes sent, edge ms) into stage times under
    `cond`: 1/(1 − ℓd), 8/(1000·B), 1/(1 − ℓe). O(1)."""
    return (1.0 / (1.0 - cond.device_load), uplink_ms(1.0, cond.bandwidth_mbps), 1.0 / (1.0 - cond.edge_load))


def stage_ms(device_sum_ms: Any, sent_bytes: Any, edge_sum_ms: Any, cond: Conditions) -> tuple[Any, Any, Any]:
    """(device_ms, uplink_ms, edge_ms) under `cond` from zero-load sums. Elementwise, so numpy
    arrays of sums are priced by this same formula."""
    wd, wb, we = stage_weights(cond)
    return device_sum_ms * wd, sent_bytes * wb, edge_sum_ms * we


def latency_ms(device_ms: Any, uplink_ms: Any, edge_ms: Any, uses_edge: Any, rtt_ms: float) -> Any:
    """A partition's latency from its stage times: device + (uplink + round trip where the edge
    is used) + edge, added in this order (`uses_edge` a 0/1 number, or a 0/1 array for vectorised
    scans: another order differs in the last bit, and a budget equal to the best latency may then
    be missed by one scan and met by another). Elementwise. O(1)."""
    return device_ms + (uplink_ms + uses_edge * rtt_ms) + edge_ms


def request_sums(device_sum_ms: Any, edge_sum_ms: Any, uses_edge: Any, overheads: Overheads) -> tuple[Any, Any]:
    """(device sum, edge sum) with the v2 per-request overheads added where the partition uses
    the edge (`uses_edge` a bool, or a 0/1 array for vectorised scans). O(1) elementwise."""
    return (
        device_sum_ms + uses_edge * overheads.device_request_ms,
        edge_sum_ms + uses_edge * overheads.edge_request_ms,
    )


def predict_sums(
    device_sum_ms: float,
    sent_bytes: int,
    edge_sum_ms: float,
    edge_empty: bool,
    cond: Conditions,
    overheads: Overheads = NO_OVERHEADS,
) -> Predicted:
    """Price a partition from its zero-load sums (Σ device_ms over D, bytes sent, Σ edge_ms over E)
    and the graph's per-request overheads. O(1)."""
    uses_edge = 0.0 if edge_empty else 1.0
    device_sum_ms, edge_sum_ms = request_sums(device_sum_ms, edge_sum_ms, uses_edge, overheads)
    device_ms, uplink_ms, edge_ms = stage_ms(device_sum_ms, sent_bytes, edge_sum_ms, cond)
    transfer_ms = 0.0 if edge_empty else uplink_ms + cond.rtt_ms
    bottleneck = max(device_ms, uplink_ms, edge_ms)
    return Predicted(
        latency_ms=latency_ms(device_ms, uplink_ms, edge_ms, uses_edge, cond.rtt_ms),
        device_ms=device_ms,
        transfer_ms=transfer_ms,
        uplink_ms=uplink_ms,
        edge_ms=edge_ms,
        bottleneck_ms=bottleneck,
        throughput_fps=1000.0 / bottleneck if bottleneck > 0 else math.inf,
        sent_bytes=sent_bytes,
    )


@dataclass(frozen=True)
class Partition:
    """A downward-closed device set D of A(exit) and what it implies."""

    exit: str
    device_nodes: tuple[str, ...]  # topological order
    edge_nodes: tuple[str, ...]
    transfer: tuple[tuple[str, int], ...]  # (producer, bytes) sent uplink
    device_sum_ms: float
    edge_sum_ms: float
    overheads: Overheads = NO_OVERHEADS

    @property
    def sent_bytes(self) -> int:
        return sum(b for _, b in self.transfer)

    def predict(self, cond: Conditions) -> Predicted:
        return predict_sums(
            self.device_sum_ms, self.sent_bytes, self.edge_sum_ms, not self.edge_nodes, cond, self.overheads
        )


def partition(graph: CostGraph, exit_name: str | None, device_nodes: Iterable[str]) -> Partition:
    """Build the partition of A(exit) whose device side is `device_nodes` (the rest of A(exit)
    runs on the edge). Raises CostGraphError if the set is not downward closed, names nodes
    outside A(exit), or is infeasible: a node of `sendable: false` on the device with a consumer
    on the edge (its value would have to cross, which the cost model prices at infinite bytes;
    a partition is only built for plans, whose numbers are finite). O(V + E)."""
    ex = graph.exit(exit_name)
    needed = graph.ancestors(ex.node)
    needed_set = set(needed)
    dev = set(device_nodes)
    extra = dev - needed_set
    if extra:
        raise CostGraphError(f"device_nodes: {sorted(extra)[:5]} are not needed by exit {ex.name!r}")
    for name in needed:
        if name in dev:
            for u in graph.node(name).inputs:
                if u != graph.input.name and u not in dev:
                    raise CostGraphError(
                        f"device_nodes: not downward closed ({name!r} needs {u!r}, which is not on the device)"
                    )
    edge = [n for n in needed if n not in dev]
    edge_set = set(edge)
    transfer = []
    consumers = graph.consumers()
    for u in [graph.input.name, *[n for n in needed if n in dev]]:
        readers = [c for c in consumers.get(u, ()) if c in edge_set]
        if not readers:
            continue
        if u != graph.input.name and not graph.node(u).sendable:
            raise CostGraphError(
                f"device_nodes: infeasible ({u!r} is not sendable, a value that cannot cross the network, and "
                f"edge node {readers[0]!r} reads it; run both on the same side)"
            )
        transfer.append((u, graph.input.bytes if u == graph.input.name else graph.node(u).out_bytes))
    return Partition(
        exit=ex.name,
        device_nodes=tuple(n for n in needed if n in dev),
        edge_nodes=tuple(edge),
        transfer=tuple(transfer),
        # in topological order (as the plan map sums): a set's order follows string hashing,
        # so replicas would disagree in the last bit
        device_sum_ms=sum(graph.node(n).device_ms or 0.0 for n in needed if n in dev),
        edge_sum_ms=sum(graph.node(n).edge_ms or 0.0 for n in edge),
        overheads=graph.overheads,
    )
