"""Reading a /metrics scrape in the metrics tests (tests/test_metrics_*.py), and the small cost
graph their planners plan for."""

from __future__ import annotations

import math
from typing import Any

from dapdee.web.scrape import Samples, parse

__all__ = ["Samples", "buckets", "check_histogram", "parse", "value"]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample `name` whose labels include `labels` (AssertionError unless exactly one)."""
    found = [v for got, v in samples.get(name, []) if all(got.get(k) == x for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in {samples.get(name)}"
    return found[0]


def buckets(samples: Samples, name: str, **labels: str) -> list[tuple[float, float]]:
    """The (upper bound, cumulative count) pairs of histogram `name`, in bound order."""
    rows = [
        (float(got["le"]), v)
        for got, v in samples.get(f"{name}_bucket", [])
        if all(got.get(k) == x for k, x in labels.items())
    ]
    return sorted(rows)


def check_histogram(
    samples: Samples,
    name: str,
    bounds: tuple[float, ...],
    count: int,
    **labels: str,
) -> list[tuple[float, float]]:
    """Assert histogram `name` has exactly `bounds` (+Inf last), cumulative counts, `count`
    observations in `_count` and in +Inf, and a positive sum; its buckets."""
    rows = buckets(samples, name, **labels)
    assert [b for b, _ in rows] == [*bounds, math.inf], f"{name}: bounds {[b for b, _ in rows]}"
    counts = [c for _, c in rows]
    assert counts == sorted(counts), f"{name}: not cumulative: {counts}"
    assert counts[-1] == count == value(samples, f"{name}_count", **labels), f"{name}: {counts} vs {count}"
    assert value(samples, f"{name}_sum", **labels) > 0 or count == 0
    return rows


def tiny_graph(model: str) -> dict[str, Any]:
    """A three-node chain with one exit and both tiers' timings (a device 10x slower)."""
    nodes = []
    prev = "x"
    for i, (out, dev) in enumerate(((4096, 2.0), (1024, 3.0), (40, 0.5))):
        name = f"n{i}"
        nodes.append(
            {"name": name, "op": "conv2d", "inputs": [prev], "out_bytes": out, "flops": 1000,
             "device_ms": dev, "edge_ms": dev / 10}
        )  # fmt: skip
        prev = name
    return {
        "model": model,
        "input": {"name": "x", "shape": [1, 1, 32, 32], "dtype": "uint8", "bytes": 1024},
        "nodes": nodes,
        "exits": [{"name": "final", "node": prev, "accuracy": 0.9}],
    }
