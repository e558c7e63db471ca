"""The edge's per-request cost outside node compute (cost model v2's `edge_request_ms`).

Measured by the worker on itself right after it has profiled its nodes: `samples` sequential
infer requests at batch 1, over real HTTP to its own URL, each asking for the final exit with
the exit node's own inputs as the cut, so that node compute is one small node. The worker
process's CPU time over those requests, minus the CPU time of the client thread that sends
them, is what the server spent (HTTP, the guard, decoding, dispatch to the batcher, the
compute, encoding); minus the profiled compute of the node it ran, it is the per-request cost.
(A worker emulating a K x slower edge sleeps the rest of each compute, which takes no CPU: the
node's own CPU is its profiled time / K.)
CPU time, not wall time: it is what one request takes from the worker's capacity, which is
what the planner books per frame. The worker publishes it in its edge profile's
`meta.edge_request_ms`, and the planner puts it into the graph it plans on.

The same way, `measure_frame_ms` sends whole frames (the model's input to the final exit) and
takes the median compute time the worker reports for them: what a frame's nodes take in the
worker, against which the profile's isolated per-node medians are calibrated (`calibrated`),
as the device calibrates its own profile to whole frames.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from typing import Any

import torch

from dapdee.client import ClientError, EdgeClient
from dapdee.costgraph import CostGraph
from dapdee.edge_worker.deps import ModelEntry

log = logging.getLogger("dapdee.edge.request_cost")

WARMUP = 5
CALIBRATION_CLAMP = (0.5, 4.0)  # as the device profile's


def exit_node_inputs(entry: ModelEntry) -> dict[str, torch.Tensor]:
    """The values feeding the final exit's node (batch 1), computed once from a sample input:
    the cut with the least edge compute that still runs the request path. O(one forward pass)."""
    loaded = entry.loaded
    node = entry.graph.node(entry.graph.exits[-1].node)
    producers = list(node.inputs)
    with torch.inference_mode():
        values = loaded.executor.compute({loaded.input_name: loaded.example_input()}, producers)
    return {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}


class Stopped(Exception):
    """The measurement was asked to stop (its `stop` event was set)."""


def _go_on(stop: threading.Event | None) -> None:
    """Raise Stopped when `stop` is set. O(1)."""
    if stop is not None and stop.is_set():
        raise Stopped


def measure_request_ms(
    url: str,
    token: str | None,
    entry: ModelEntry,
    samples: int = 50,
    stop: threading.Event | None = None,
    slowdown: float = 1.0,
) -> float | None:
    """The worker's CPU milliseconds per batch-1 request outside node compute (see the module
    docstring; `slowdown`: the worker's K, by which its profile's times are stretched); None
    when the requests fail (e.g. no device token to call itself with) or when `stop` is set
    (checked before every request). Blocking: run it in a thread. O(samples) requests."""
    inputs = exit_node_inputs(entry)
    exit_name = entry.graph.exits[-1].name
    node_ms = (entry.graph.node(entry.graph.exits[-1].node).edge_ms or 0.0) / slowdown
    try:
        with EdgeClient(url, token, timeout=30.0) as client:
            _wait_live(client, stop=stop)
            for _ in range(WARMUP):
                _go_on(stop)
                client.infer(entry.name, inputs, exit=exit_name)
            process0, thread0 = time.process_time(), time.thread_time()
            for _ in range(samples):
                _go_on(stop)
                client.infer(entry.name, inputs, exit=exit_name)
            server_s = (time.process_time() - process0) - (time.thread_time() - thread0)
    except ClientError as exc:
        log.warning("model %s: cannot measure the per-request cost on %s (%s)", entry.name, url, exc)
        return None
    except Stopped:
        return None
    return max(0.0, 1000.0 * server_s / samples - node_ms)


def measure_frame_ms(
    url: str, token: str | None, entry: ModelEntry, samples: int = 50, stop: threading.Event | None = None
) -> float | None:
    """The median compute ms the worker reports for a whole frame at batch 1 (the model's input
    to the final exit, over real HTTP to itself); None when the requests fail or when `stop` is
    set (checked before every request). Blocking: run it in a thread. O(samples) requests."""
    loaded = entry.loaded
    inputs = {loaded.input_name: loaded.example_input()}
    exit_name = entry.graph.exits[-1].name
    try:
        with EdgeClient(url, token, timeout=30.0) as client:
            _wait_live(client, stop=stop)
            times = []
            for i in range(WARMUP + samples):
                _go_on(stop)
                ms = client.infer(entry.name, inputs, exit=exit_name).compute_ms
                if i >= WARMUP:
                    times.append(ms)
    except ClientError as exc:
        log.warning("model %s: cannot measure whole-frame compute on %s (%s)", entry.name, url, exc)
        return None
    except Stopped:
        return None
    return statistics.median(times)


def calibrated(graph: CostGraph, frame_ms: float) -> CostGraph:
    """`graph` with every node's edge_ms scaled by `frame_ms` / Σ edge_ms over the final exit's
    nodes (clamped to CALIBRATION_CLAMP; recorded as meta `calibration`). O(V)."""
    summed = sum(graph.node(n).edge_ms or 0.0 for n in graph.ancestors(graph.exits[-1].node))
    if summed <= 0:
        return graph
    ratio = min(CALIBRATION_CLAMP[1], max(CALIBRATION_CLAMP[0], frame_ms / summed))
    meta: dict[str, Any] = {
        **graph.meta.get("edge", {}),
        "calibration": round(ratio, 4),
        "calibration_method": "median compute of whole frames (final exit, batch 1) the worker reports over "
        "HTTP to itself / sum of isolated node medians; every node scaled by it",
    }
    return graph.with_timings("edge", {n.name: (n.edge_ms or 0.0) * ratio for n in graph.nodes}, meta)


def _wait_live(client: EdgeClient, timeout_s: float = 15.0, stop: threading.Event | None = None) -> None:
    """Wait until the worker's own server answers (registration starts while it starts up);
    Stopped as soon as `stop` is set."""
    deadline = time.monotonic() + timeout_s
    while True:
        _go_on(stop)
        try:
            if client.live():
                return
        except ClientError:
            pass
        if time.monotonic() > deadline:
            return  # the requests that follow fail and say why
        time.sleep(0.1)
