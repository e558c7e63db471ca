"""The edge's per-request cost outside node compute (cost model v2's `edge_request_ms`).

Measured by the worker on itself right after it has profiled its nodes: `samples` sequential
infer requests at batch 1, over real HTTP to its own URL, each asking for the final exit with
the exit node's own inputs as the cut, so that node compute is one small node. The worker
process's CPU time over those requests, minus the CPU time of the client thread that sends
them, is what the server spent (HTTP, the guard, decoding, dispatch to the batcher, the
compute, encoding); minus the profiled compute of the node it ran, it is the per-request cost.
CPU time, not wall time: it is what one request takes from the worker's capacity, which is
what the planner books per frame. The worker publishes it in its edge profile's
`meta.edge_request_ms`, and the planner puts it into the graph it plans on.
"""

from __future__ import annotations

import logging
import time

import torch

from dapdee.client import ClientError, EdgeClient
from dapdee.edge_worker.deps import ModelEntry

log = logging.getLogger("dapdee.edge.request_cost")

WARMUP = 5


def exit_node_inputs(entry: ModelEntry) -> dict[str, torch.Tensor]:
    """The values feeding the final exit's node (batch 1), computed once from a sample input:
    the cut with the least edge compute that still runs the request path. O(one forward pass)."""
    loaded = entry.loaded
    node = entry.graph.node(entry.graph.exits[-1].node)
    producers = list(node.inputs)
    with torch.inference_mode():
        values = loaded.executor.compute({loaded.input_name: loaded.example_input()}, producers)
    return {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}


def measure_request_ms(url: str, token: str | None, entry: ModelEntry, samples: int = 50) -> float | None:
    """The worker's CPU milliseconds per batch-1 request outside node compute (see the module
    docstring); None when the requests fail (e.g. no device token to call itself with).
    Blocking: run it in a thread. O(samples) requests."""
    inputs = exit_node_inputs(entry)
    exit_name = entry.graph.exits[-1].name
    node_ms = entry.graph.node(entry.graph.exits[-1].node).edge_ms or 0.0
    try:
        with EdgeClient(url, token, timeout=30.0) as client:
            _wait_live(client)
            for _ in range(WARMUP):
                client.infer(entry.name, inputs, exit=exit_name)
            process0, thread0 = time.process_time(), time.thread_time()
            for _ in range(samples):
                client.infer(entry.name, inputs, exit=exit_name)
            server_s = (time.process_time() - process0) - (time.thread_time() - thread0)
    except ClientError as exc:
        log.warning("model %s: cannot measure the per-request cost on %s (%s)", entry.name, url, exc)
        return None
    return max(0.0, 1000.0 * server_s / samples - node_ms)


def _wait_live(client: EdgeClient, timeout_s: float = 15.0) -> None:
    """Wait until the worker's own server answers (registration starts while it starts up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.live():
                return
        except ClientError:
            pass
        if time.monotonic() > deadline:
            return  # the requests that follow fail and say why
        time.sleep(0.1)
