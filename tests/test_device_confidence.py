"""Confidence exits in the device runtime: a planner and an edge worker under uvicorn on
127.0.0.1 serving the shipped ResNet-18 artifact (calibrated thresholds), the device runtime on
Fashion-MNIST test frames.

- A plan with heads on both sides (exit1 on the device, exit2 and exit3 on the edge): every
  frame leaves where the core run of both sides (`run_sides`) says, on that side, with its
  class; the per-frame log record names the exit and the side.
- Without an edge to send to (its worker rests, or the plan names none) the device heads
  still answer the frames they are confident about; only the others fall back.
- A plan answer whose heads or transfer are not the device's split of the cut is refused.
- `--confidence-exits` through a planner: the plan carries its heads and frames leave early.
- Thresholds missing while confidence exits are asked for: a one-line error naming the flag.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph
from dapdee.costmodel import partition
from dapdee.device.compute import TorchCompute
from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig
from dapdee.device.edge import Backoff, EdgeLink, WorkerTrust
from dapdee.device.frames import DatasetSource, FrameFormat
from dapdee.device.plan_source import FixedPlanSource
from dapdee.device.plans import plan_from_answer
from dapdee.device.runtime import DeviceRuntime
from dapdee.device.sensing import Sensing
from dapdee.device.session import DeviceSettings, open_device
from dapdee.device.types import Frame, PlanError
from dapdee.models import LoadedModel, load_model
from dapdee.profiler import profile_model
from dapdee.progressive_run import Sides, run_sides, split_sides
from dapdee.testing import ServerThread, wait_registered
from tests.device_stack import start_edge, write_artifact
from tests.test_progressive_run import RESNET

K = 2.0


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model("", weights=RESNET)


@pytest.fixture(scope="module")
def graph(loaded: LoadedModel) -> CostGraph:
    """The device profile (a quick one: the runtime only needs timings to exist)."""
    return profile_model(loaded, "device", slowdown=K, threads=1, repeats=1, warmup=0)


@pytest.fixture(scope="module")
def services(loaded: LoadedModel) -> Iterator[tuple[str, str]]:
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    edge_loaded = load_model("", weights=RESNET)
    planner = ServerThread(create_app(Settings(redis_url=None)), name="planner").start()
    edge = start_edge(RESNET, planner.url, edge_loaded)
    try:
        wait_registered(planner.url, loaded.name, [edge.url], timeout_s=120.0)
        yield planner.url, edge.url
    finally:
        edge.stop()
        planner.stop()


@pytest.fixture(scope="module")
def frames(loaded: LoadedModel) -> list[Frame]:
    return list(DatasetSource("fashion-mnist", FrameFormat.of(loaded), 40))


def mid_cut(graph: CostGraph) -> tuple[Any, Sides]:
    """The cut after layer1: exit1's head on the device, exit2 and exit3 on the edge."""
    dev = set(graph.ancestors(graph.exit("exit1").node)) & set(graph.ancestors(graph.exit("final").node))
    part = partition(graph, "final", [n.name for n in graph.nodes if n.name in dev])
    return part, split_sides(graph, "final", part.device_nodes)


def answer(graph: CostGraph, part: Any, sides: Sides, heads: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The planner's answer for the cut, made with confidence exits."""
    sizes = {n.name: n.out_bytes for n in graph.nodes} | {graph.input.name: graph.input.bytes}
    return {
        "plan_id": "0123456789abcdef",
        "model": graph.model,
        "mode": "latency",
        "exit": {"name": "final", "accuracy": 0.9324},
        "device_nodes": list(part.device_nodes),
        "edge_nodes": list(part.edge_nodes),
        "transfer": [{"node": n, "bytes": sizes[n]} for n in sides.transfer],
        "predicted": {"latency_ms": 50.0, "bottleneck_ms": 20.0},
        "progressive": {"heads": heads if heads is not None else sides.as_dict()["heads"]},
        "edge_worker": None,
    }


def test_frames_leave_at_the_first_confident_head_on_its_side(
    loaded: LoadedModel,
    graph: CostGraph,
    services: tuple[str, str],
    frames: list[Frame],
    caplog: pytest.LogCaptureFixture,
) -> None:
    part, sides = mid_cut(graph)
    plan = plan_from_answer(answer(graph, part, sides), graph, 18.88, 0.0)
    assert plan.progressive == sides and plan.edge_confidence
    edge_url = services[1]
    sensing = Sensing(prior_mbps=18.88, fixed_load=0.0)
    edge = EdgeLink(graph, WorkerTrust(None, [edge_url]), sensing, backoff=Backoff(0.5, 8.0))
    runtime = DeviceRuntime(
        graph, TorchCompute(loaded, K), FixedPlanSource(plan), sensing=sensing, edge=edge, edge_url=edge_url, slowdown=K
    )

    with caplog.at_level(logging.INFO, logger="dapdee.device.frame"):
        records = asyncio.run(run_frames(runtime, edge, frames))
    with torch.inference_mode():
        want = run_sides(loaded.executor, sides, loaded.input_name, torch.cat([f.x for f in frames]))
    assert [r.exit for r in records] == want.exits
    assert {r.plan_exit for r in records} == {plan.exit} == {"final"}  # the plan's exit, whichever head answered
    assert [("edge" if r.where == "edge" else "device") for r in records] == want.sides
    assert [r.pred_class for r in records] == want.logits.argmax(1).tolist()
    assert {"exit1", "exit2", "final"} <= set(want.exits) and all(r.error is None for r in records)
    assert all(r.bytes_sent == 0 for r in records if r.exit == "exit1")  # left on the device: nothing sent
    logged = [(rec.exit, rec.side) for rec in caplog.records if hasattr(rec, "side")]
    assert logged == list(zip(want.exits, want.sides, strict=True))


async def run_frames(runtime: DeviceRuntime, edge: EdgeLink, frames: list[Frame]) -> list[Any]:
    """`frames` through a started `runtime`, which is then closed with its edge link and compute."""
    await runtime.start()
    try:
        return await runtime.run(frames)
    finally:
        await runtime.aclose()
        await edge.aclose()
        runtime.compute.close()


@pytest.mark.parametrize("edge_state", ["resting", "no worker"])
def test_without_an_edge_the_device_heads_still_answer(
    loaded: LoadedModel, graph: CostGraph, frames: list[Frame], edge_state: str
) -> None:
    """The plan's worker rests after a failure (or the plan names none): a frame the device's
    exit1 head is confident about still leaves there, on the device, as in a split; only the
    others fall back, from the values the device part computed, naming why."""
    part, sides = mid_cut(graph)
    worker = "http://127.0.0.1:9" if edge_state == "resting" else None  # never contacted: it rests
    plan = plan_from_answer({**answer(graph, part, sides), "edge_worker": worker}, graph, 18.88, 0.0)
    sensing = Sensing(prior_mbps=18.88, fixed_load=0.0)
    edge = EdgeLink(graph, WorkerTrust(None, [worker] if worker else []), sensing, backoff=Backoff(600.0, 600.0))
    if worker is not None:
        edge.backoff_of(worker).failed(0)  # the worker failed just before: it rests 600 s
    runtime = DeviceRuntime(
        graph, TorchCompute(loaded, K), FixedPlanSource(plan), sensing=sensing, edge=edge, slowdown=K
    )

    records = asyncio.run(run_frames(runtime, edge, frames))
    with torch.inference_mode():
        want = run_sides(loaded.executor, sides, loaded.input_name, torch.cat([f.x for f in frames]))
    on_device = [i for i, side in enumerate(want.sides) if side == "device"]
    assert on_device, "no frame for the device head: the test checks nothing"
    reason = "edge backing off" if worker else "no edge worker"
    for i, (rec, frame) in enumerate(zip(records, frames, strict=True)):
        if i in on_device:
            assert (rec.where, rec.exit, rec.error) == ("local", want.exits[i], None), (i, rec)
            assert rec.pred_class == int(want.logits[i].argmax())
        else:
            assert (rec.where, rec.error) == ("fallback", reason), (i, rec)
            assert rec.pred_class == int(loaded.run_exit(frame.x, rec.exit).argmax(dim=1)[0])


def test_the_emulated_device_pays_for_the_heads_it_checks(loaded: LoadedModel, graph: CostGraph) -> None:
    """An emulated device's progressive part (no head answers: every frame goes on) takes the
    time of its trunk and of its heads' own nodes, as the planner's worst case prices it, not
    of the trunk alone."""
    from dapdee.device.compute import BoundaryValues, EmulatedCompute

    _, sides = mid_cut(graph)
    values = BoundaryValues(loaded)
    given = {graph.input.name: values.x}
    targets, heads = list(sides.device_targets), [h.node for h in sides.device.heads]
    unit = EmulatedCompute(graph, values)
    heads_ms = unit.part_ms(given, [*targets, *heads]) - unit.part_ms(given, targets)
    assert heads and heads_ms > 0
    emu = EmulatedCompute(graph, values, scale=200.0 / heads_ms)  # the heads' own nodes: 200 ms
    trunk_ms = emu.part_ms(given, targets)

    async def go() -> float:
        done = await emu.progressive(given, sides.device, targets, set(sides.device.nodes))
        return done.ms

    assert asyncio.run(go()) >= trunk_ms + 200.0 - 1e-6


def test_answers_off_the_devices_split_are_refused(graph: CostGraph) -> None:
    part, sides = mid_cut(graph)
    swapped = [{"exit": "exit1", "side": "edge"}, {"exit": "exit2", "side": "edge"}, {"exit": "exit3", "side": "edge"}]
    with pytest.raises(PlanError, match="plan.progressive.heads"):
        plan_from_answer(answer(graph, part, sides, swapped), graph, 5.0, 0.0)
    static = answer(graph, part, sides)
    static["transfer"] = [{"node": n, "bytes": b} for n, b in part.transfer] + [{"node": "x", "bytes": 1024}]
    with pytest.raises(PlanError, match="plan.transfer"):
        plan_from_answer(static, graph, 5.0, 0.0)


def test_device_asks_the_planner_for_confidence_exits(
    loaded: LoadedModel, graph: CostGraph, services: tuple[str, str], frames: list[Frame]
) -> None:
    runtime = RuntimeConfig(Requirements(mode="latency", confidence_exits=True), plan_max_age_s=100.0)
    settings = DeviceSettings(
        runtime=runtime, planner=PlannerConfig(services[0], "device-k2", ready_timeout_s=60.0),
        weights=str(RESNET), slowdown=K, device_load=0.0, rate_mbps=0.13, rtt_ms=0.0, bandwidth_prior_mbps=0.13,
    )  # fmt: skip

    async def go() -> tuple[Any, list[Any]]:
        async with open_device(settings, loaded, graph) as rt:
            return rt.plan, await rt.run(frames[:12])

    plan, records = asyncio.run(go())
    assert plan.origin == "planner" and plan.progressive is not None
    heads = [h.exit for p in (plan.progressive.device, plan.progressive.edge) for h in p.heads]
    assert heads == ["exit1", "exit2", "exit3"]
    assert {r.exit for r in records} - {"final"}  # some frames left early
    assert all(r.correct is not None for r in records)


@pytest.mark.parametrize("pinned", ["device-only", "plan made with confidence exits", "plan made without"])
def test_a_pinned_plan_checks_its_heads_with_confidence_exits(
    loaded: LoadedModel, graph: CostGraph, services: tuple[str, str], frames: list[Frame], pinned: str
) -> None:
    """`--device-only` and `--plan FILE` with `--confidence-exits` stop each frame at its first
    confident head as a planner's plan does (the flag was accepted and every frame ran to the
    final exit): a plan file made with confidence exits keeps its sides, one made without gets
    its cut's."""
    part, sides = mid_cut(graph)
    if pinned == "device-only":
        part = partition(graph, "final", graph.ancestors(graph.exit("final").node))
        sides = split_sides(graph, "final", part.device_nodes)
    raw = answer(graph, part, sides) | {"edge_worker": services[1]}
    if pinned == "plan made without":
        del raw["progressive"]
        raw["transfer"] = [{"node": n, "bytes": b} for n, b in part.transfer]
    runtime = RuntimeConfig(Requirements(confidence_exits=True), plan_max_age_s=100.0)
    settings = DeviceSettings(
        runtime=runtime, weights=str(RESNET), slowdown=K, device_load=0.0, rate_mbps=18.88, rtt_ms=0.0,
        bandwidth_prior_mbps=18.88, device_only=pinned == "device-only",
        plan_json=None if pinned == "device-only" else raw, edge_url=None if pinned == "device-only" else services[1],
    )  # fmt: skip

    async def go() -> tuple[Any, list[Any]]:
        async with open_device(settings, loaded, graph) as rt:
            return rt.plan, await rt.run(frames[:16])

    plan, records = asyncio.run(go())
    assert plan.progressive == sides
    with torch.inference_mode():
        want = run_sides(loaded.executor, sides, loaded.input_name, torch.cat([f.x for f in frames[:16]]))
    assert [r.exit for r in records] == want.exits and set(want.exits) - {"final"}
    assert [("edge" if r.where == "edge" else "device") for r in records] == want.sides
    assert [r.pred_class for r in records] == want.logits.argmax(1).tolist()


def test_missing_thresholds_are_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact = write_artifact(tmp_path)  # seeded untrained weights, never calibrated: no thresholds
    code = cli_main(
        ["device", "run", "--weights", str(artifact), "--device-only", "--confidence-exits", "--frames", "1",
         "--slowdown", "1", "--profile", str(tmp_path / "p.json"), "--quiet"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--confidence-exits" in err and "calibrate" in err, err
