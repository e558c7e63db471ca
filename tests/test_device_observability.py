"""What the device runtime tells operators, on the real stack: Prometheus metrics on its own
registry, served on 127.0.0.1 (checked in /proc/net/tcp); one OpenTelemetry trace per frame
joined by the edge worker's spans through the traceparent it sends; a planner span per plan;
and one log record per frame naming the exit and the side it left on."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dapdee.device.config import PlannerConfig, Requirements, RuntimeConfig
from dapdee.device.metrics import DeviceMetrics, serve_metrics
from dapdee.device.session import DeviceSettings, open_device
from dapdee.device.types import FrameRecord
from dapdee.testing import free_port
from dapdee.web import otel
from dapdee.web.logs import JsonFormatter
from tests.device_stack import K, Stack, fixed_runtime, open_stack, running

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    edge_tracing = otel.tracer("edge", enabled=True, exporter=EXPORTER)
    with open_stack(tmp_path_factory.mktemp("artifact"), tracing=edge_tracing) as s:
        yield s
    edge_tracing.shutdown()


def _listening_on(port: int) -> set[str]:
    """Local addresses (hex ip:port of /proc/net/tcp) listening on `port`."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            out.add(local)
    return out


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


def test_metrics_are_served_on_loopback_from_a_private_registry(stack: Stack) -> None:
    metrics, port = DeviceMetrics(), free_port()
    server, thread = serve_metrics(metrics, port)
    frames = stack.frames(3, seed=21)
    plan = stack.mid_cut(stack.edge.url)

    async def go() -> list[FrameRecord]:
        rt = fixed_runtime(stack, plan, stack.edge.url, runtime_kw={"metrics": metrics})
        async with running(rt):
            return await rt.run(frames)

    try:
        records = asyncio.run(go())
        assert _listening_on(port) == {f"0100007F:{port:04X}"}  # 127.0.0.1 only
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
        thread.join(5)
    assert [r.where for r in records] == ["edge"] * 3
    assert _sample(text, 'dapdee_device_frames_total{where="edge"}') == 3
    assert _sample(text, 'dapdee_device_frames_total{where="fallback"}') == 0
    assert _sample(text, "dapdee_device_frame_latency_seconds_count") == 3
    assert _sample(text, "dapdee_device_prediction_error_ratio_count") == 3
    assert _sample(text, f'dapdee_device_plan_info{{cut="{plan.cut}",exit="final"}}') == 1
    assert text.count("dapdee_device_plan_info{") == 1
    assert "dapdee_planner_" not in text and "python_gc" not in text  # its own registry only


def test_each_frame_is_one_trace_joined_by_the_edge(stack: Stack) -> None:
    EXPORTER.clear()
    tracing = otel.tracer("device", enabled=True, exporter=EXPORTER)
    frames = stack.frames(2, seed=22)
    plan = stack.mid_cut(stack.edge.url)

    async def go() -> list[FrameRecord]:
        async with running(fixed_runtime(stack, plan, stack.edge.url, runtime_kw={"tracing": tracing})) as rt:
            return await rt.run(frames)

    records = asyncio.run(go())
    tracing.flush()
    spans = EXPORTER.get_finished_spans()
    by_trace: dict[int, dict[str, object]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, {})[span.name] = span
    traces = [t for t in by_trace.values() if otel.FRAME in t]
    assert len(traces) == 2 and {f"{s.context.trace_id:032x}" for s in spans if s.name == otel.FRAME} == {
        r.trace_id for r in records
    }
    for trace in traces:
        frame, compute, uplink = trace[otel.FRAME], trace[otel.DEVICE_COMPUTE], trace[otel.UPLINK]
        assert compute.parent.span_id == uplink.parent.span_id == frame.context.span_id  # type: ignore[union-attr]
        server = next(s for s in trace.values() if s.parent is not None and s.parent.span_id == uplink.context.span_id)
        assert server.resource.attributes["service.name"] == "dapdee-edge"  # type: ignore[union-attr]
        attrs = frame.attributes  # type: ignore[union-attr]
        assert attrs[otel.ATTR_EXIT] == "final" and attrs[otel.ATTR_WHERE] == "edge"
        assert attrs[otel.ATTR_CUT] == plan.cut and attrs[otel.ATTR_BYTES_SENT] > 0
        assert attrs[otel.ATTR_PREDICTED_MS] == plan.predicted_ms and attrs[otel.ATTR_MEASURED_MS] > 0
        assert uplink.attributes[otel.ATTR_BYTES_SENT] == attrs[otel.ATTR_BYTES_SENT]  # type: ignore[union-attr]


def test_plans_from_the_planner_are_traced(stack: Stack) -> None:
    EXPORTER.clear()
    tracing = otel.tracer("device", enabled=True, exporter=EXPORTER)
    settings = DeviceSettings(
        runtime=RuntimeConfig(Requirements(mode="latency")), planner=PlannerConfig(stack.planner.url, "device-k10"),
        weights=str(stack.artifact), slowdown=K, device_load=0.0,
    )  # fmt: skip

    async def go() -> str:
        async with open_device(settings, stack.loaded, stack.graph, tracing=tracing) as rt:
            return rt.plan.exit

    exit_name = asyncio.run(go())
    tracing.flush()
    planned = [s for s in EXPORTER.get_finished_spans() if s.name == otel.PLANNER]
    assert planned and planned[0].attributes[otel.ATTR_EXIT] == exit_name  # type: ignore[index]


def test_each_frame_logs_its_exit_and_side(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    frames = stack.frames(2, seed=23)

    async def go() -> list[FrameRecord]:
        async with running(fixed_runtime(stack, stack.mid_cut(stack.edge.url), stack.edge.url)) as rt:
            return await rt.run(frames)

    with caplog.at_level(logging.INFO, logger="dapdee.device.frame"):
        records = asyncio.run(go())
    lines = [json.loads(JsonFormatter("device").format(r)) for r in caplog.records if r.name == "dapdee.device.frame"]
    assert len(lines) == 2
    for line, rec in zip(lines, records, strict=True):
        assert line["msg"] == f"frame {rec.index} left at exit final on the edge"
        got = (line["exit"], line["where"], line["frame"], line["cut"])
        assert got == ("final", "edge", rec.index, rec.device_nodes)
