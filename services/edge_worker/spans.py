"""The edge's spans of one infer request: `edge.queue` (waiting for its batch to start) and
`edge.compute` (its batch running), children of the request's server span, recorded once the
batch result is back from the times the batcher measured. Only called when tracing records
(`dapdee.web.otel.recording()`), so an untraced request pays nothing here."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from dapdee.edge_worker.batching import BatchResult
from dapdee.edge_worker.deps import ModelEntry
from dapdee.web import otel


def device_side(entry: ModelEntry, inputs: Collection[str]) -> int:
    """The number of graph nodes the sender must have computed to produce `inputs` (the sent
    nodes and everything upstream of them; 0 for the graph input): the request's cut.
    O(V + E) per input."""
    graph = entry.graph
    upstream: set[str] = set()
    for name in inputs:
        if name != graph.input.name and name not in upstream:
            upstream.update(graph.ancestors(name))
    return len(upstream)


def record_infer(
    tracing: otel.Tracing,
    entry: ModelEntry,
    inputs: Collection[str],
    node: str,
    exit_name: str,
    received_bytes: int,
    result: BatchResult,
    submit_ns: int,
) -> None:
    """Record the request's `edge.queue` span from `submit_ns` (epoch ns, when it was handed to
    the batcher) for `result.queue_s`, then its `edge.compute` span for `result.compute_s`, both
    carrying the model, exit, cut, the nodes the edge ran to reach `node`, the bytes received,
    the batch's size and rows, and their own measured ms. O(V + E) for the cut."""
    attributes: dict[str, Any] = {
        otel.ATTR_MODEL: entry.name,
        otel.ATTR_EXIT: exit_name,
        otel.ATTR_CUT: device_side(entry, inputs),
        otel.ATTR_EDGE_NODES: len(entry.loaded.executor.schedule(list(inputs), [node])),
        otel.ATTR_BYTES_RECEIVED: received_bytes,
        otel.ATTR_BATCH_SIZE: result.batch_size,
        otel.ATTR_BATCH_ROWS: result.batch_rows,
    }
    started_ns = submit_ns + round(result.queue_s * 1e9)
    tracing.record(
        otel.EDGE_QUEUE, submit_ns, started_ns, {**attributes, otel.ATTR_MEASURED_MS: result.queue_s * 1000.0}
    )
    tracing.record(
        otel.EDGE_COMPUTE,
        started_ns,
        started_ns + round(result.compute_s * 1e9),
        {**attributes, otel.ATTR_MEASURED_MS: result.compute_s * 1000.0},
    )
