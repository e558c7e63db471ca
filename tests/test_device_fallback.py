"""Where a frame leaves when the device finishes it alone after an edge failure, on a real
width-0.25 ResNet-18 (zoo, seeded) with its device profile at K = 10 and real torch compute:

- the predicted cost of finishing an exit from the values the device holds is what the real
  executor schedules from them: the device part that produced the cut's tensors is not charged
  again, and an earlier exit whose trunk was not kept is charged for recomputing it;
- a frame whose worker refuses the connection, with a latency budget that finishing the planned
  exit from the cut meets (but redoing the device part would not), leaves at the planned exit
  with the local model's class, not at an earlier, less accurate one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from dapdee.costgraph import CostGraph
from dapdee.costmodel import Conditions, partition
from dapdee.device.compute import TorchCompute
from dapdee.device.config import Requirements, RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.fallback import fallback_exit, local_cost_ms
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.plans import fixed_plan
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.types import Frame, FrameRecord, Plan
from dapdee.models import LoadedModel, load_model
from dapdee.profiler import profile_model
from dapdee.testing import bind_free_socket
from tests.device_stack import SPEC, K

# A loaded device (its stated load, not its real speed): every local cost is 20 x its
# zero-load sum, so charging the device part again (~14 ms at K = 10) moves a cost by
# ~275 ms, far beyond the jitter of the frame's real elapsed time
LOAD = 0.95


@pytest.fixture(scope="module")
def device() -> tuple[LoadedModel, CostGraph]:
    """The device's model (seeded, untrained) and its profile at K."""
    torch.manual_seed(0)
    loaded = load_model(SPEC)
    return loaded, profile_model(loaded, "device", slowdown=K, threads=1, repeats=3, warmup=1)


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """A worker URL whose port is bound but not listening: every connection is refused."""
    sock = bind_free_socket()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def deep_cut(graph: CostGraph, url: str) -> Plan:
    """A split of `final` with all but the last nodes on the device, one tensor crossing."""
    anc = graph.ancestors(graph.exit("final").node)
    for i in range(len(anc) - 1, 0, -1):
        part = partition(graph, "final", anc[:i])
        if len(part.transfer) == 1 and part.transfer[0][0] != graph.input.name:
            return fixed_plan(graph, "final", part.device_nodes, url, Conditions(5.0), "test-deep-cut")
    raise AssertionError("no single-tensor cut")


def held(graph: CostGraph, plan: Plan) -> set[str]:
    """What the device holds when that plan's upload fails: the input and the cut's tensors."""
    return {graph.input.name, *(name for name, _ in plan.transfer)}


def test_the_local_cost_is_what_the_executor_runs_from_the_values_held(device: tuple[LoadedModel, CostGraph]) -> None:
    loaded, graph = device
    plan = deep_cut(graph, "http://127.0.0.1:1")
    have = held(graph, plan)
    device_part = sum(graph.node(n).device_ms or 0.0 for n in plan.device_nodes)
    for exit_ in graph.exits:
        scheduled = [n.name for n in loaded.executor.schedule(have, [exit_.node])]
        expected = sum(graph.node(n).device_ms or 0.0 for n in scheduled) / (1.0 - LOAD)
        assert local_cost_ms(graph, exit_.name, have, LOAD) == pytest.approx(expected), exit_.name
    # the planned exit costs only the nodes past the cut; exit1 recomputes the stem it needs
    final_nodes = [n for n in graph.ancestors(graph.exit("final").node) if n not in plan.device_nodes]
    rest = sum(graph.node(n).device_ms or 0.0 for n in final_nodes)
    assert local_cost_ms(graph, "final", have, 0.0) == pytest.approx(rest) and rest < 0.1 * device_part
    stem = graph.ancestors(graph.exit("exit1").node)
    assert local_cost_ms(graph, "exit1", have, 0.0) == pytest.approx(sum(graph.node(n).device_ms or 0.0 for n in stem))


def test_a_refused_frame_within_its_budget_leaves_at_the_planned_exit(
    device: tuple[LoadedModel, CostGraph], refusing_url: str
) -> None:
    """Budget 250 ms: finishing `final` from the cut is ~14 ms at the stated load, so the frame
    (its device part took some tens of ms) meets it at `final`; charged for the device part
    again (~290 ms) it would not, and an earlier exit would be chosen."""
    loaded, graph = device
    plan = deep_cut(graph, refusing_url)
    budget = 250.0
    x = loaded.example_input(torch.Generator().manual_seed(3))
    cfg = RuntimeConfig(Requirements(latency_budget_ms=budget, mode="latency"))

    async def go() -> FrameRecord:
        sensing = Sensing(prior_mbps=5.0, fixed_load=LOAD)
        edge = EdgeLink(graph, WorkerTrust(None, [refusing_url]), sensing, backoff=Backoff(0.5, 8.0))
        compute = TorchCompute(loaded, K)
        rt = DeviceRuntime(graph, compute, FixedPlanSource(plan), config=cfg, sensing=sensing, edge=edge,
                           edge_url=refusing_url, slowdown=K)  # fmt: skip
        try:
            await rt.start()
            return await rt.infer(Frame(x))
        finally:
            await rt.aclose()
            await edge.aclose()
            compute.close()

    rec = asyncio.run(go())
    assert rec.where == "fallback" and rec.error and "Connect" in rec.error, rec
    assert rec.exit == "final", (rec.exit, rec.measured_ms, rec.device_ms)
    assert rec.pred_class == int(loaded.run_exit(x, "final").argmax(dim=1)[0])
    # the same choice from the pure function, at the frame's elapsed time less its finishing
    elapsed = rec.measured_ms - 1.0
    assert fallback_exit(graph, "final", held(graph, plan), elapsed, budget, LOAD) == "final"
