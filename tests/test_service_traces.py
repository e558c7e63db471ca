"""Traces and logs across the real services: a planner and an edge worker (their own apps under
uvicorn on 127.0.0.1, the worker registered with the planner, tracing on with the SDK's
in-memory exporter). A traceparent sent on POST /plan and on infer comes back and names the
same trace in both services' JSON access logs; one device frame (made here as the device
runtime makes it) is one trace holding the planner's `planner.plan` and the edge's
`edge.queue` and `edge.compute` spans with the frame's exit, cut, bytes and milliseconds; an
unsampled caller gets no spans; tracing off, the services record none."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dapdee import wire
from dapdee.client import EdgeClient, PlannerClient
from dapdee.edge_worker.app import create_app as create_edge
from dapdee.edge_worker.config import Settings as EdgeSettings
from dapdee.models import LoadedModel, load_model
from dapdee.planner.app import create_app as create_planner
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.testing import ServerThread, bind_free_socket, wait_registered
from dapdee.tracecontext import parse_traceparent
from dapdee.web import otel
from dapdee.web.access_log import ACCESS_LOGGER
from dapdee.web.logs import configure_logging

SPEC = "zoo:alexnet?width=0.25&in_channels=1"
CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CALLER_TRACE, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
DEVICE_TIER = "device-k10"


@dataclass
class Stack:
    planner: str
    edge: str
    model: LoadedModel  # the device's copy
    exporter: InMemorySpanExporter


def _edge_app(planner_url: str, sock: Any, model: LoadedModel, tracing: otel.Tracing) -> Any:
    port = sock.getsockname()[1]
    settings = EdgeSettings(
        models=SPEC, planner_url=planner_url, public_url=f"http://127.0.0.1:{port}", port=port,
        profile_repeats=1, profile_warmup=0, heartbeat_s=1.0, workers=1, batch_wait_ms=0.0,
    )  # fmt: skip
    return create_edge(settings, [model], tracing=tracing)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Planner and edge (tracing to one in-memory exporter); the worker registered its graph
    and edge profile; a device profile uploaded whose every node takes 20 ms (the edge's timings
    x 10 were under a ms a node once torch was warm, and the frame then stayed on the device)."""
    device_copy, edge_copy = load_model(SPEC), load_model(SPEC)  # traced before any server runs
    exporter = InMemorySpanExporter()
    planner_tracing = otel.tracer("planner", enabled=True, exporter=exporter)
    edge_tracing = otel.tracer("edge", enabled=True, exporter=exporter)
    with ServerThread(create_planner(PlannerSettings(redis_url=None), tracing=planner_tracing)) as planner:
        sock = bind_free_socket()
        with ServerThread(_edge_app(planner.url, sock, edge_copy, edge_tracing), sock=sock) as edge:
            wait_registered(planner.url, device_copy.name, [edge.url])
            with PlannerClient(planner.url) as client:
                graph = client.get_model(device_copy.name).graph
                timings = {n.name: 20.0 for n in graph.nodes}
                client.put_profile(device_copy.name, DEVICE_TIER, "device", timings)
            yield Stack(planner.url, edge.url, device_copy, exporter)
    planner_tracing.shutdown()
    edge_tracing.shutdown()


@pytest.fixture
def exporter(stack: Stack) -> InMemorySpanExporter:
    stack.exporter.clear()
    return stack.exporter


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The process's log lines as JSON, into a StringIO; the root logger restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    stream = io.StringIO()
    configure_logging("test", "json", "info", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def plan_body(model: str) -> dict[str, Any]:
    return {"model": model, "bandwidth_mbps": 20.0, "rtt_ms": 5.0, "device_tier": DEVICE_TIER, "mode": "latency"}


def infer_inputs(stack: Stack, plan: Any) -> dict[str, torch.Tensor]:
    """The tensors a device sends for `plan`: its transfer nodes computed locally from a frame."""
    x = stack.model.example_input()
    names = [t.node for t in plan.transfer]
    given = {stack.model.graph.input.name: x}
    with torch.inference_mode():
        values = stack.model.executor.compute(given, [n for n in names if n not in given])
    return {n: (given[n] if n in given else values[n]) for n in names}


def access(stream: io.StringIO, service: str, path_part: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [r for r in records if r["logger"] == ACCESS_LOGGER and r["service"] == service and path_part in r["path"]]


def test_traceparent_comes_back_and_is_in_both_services_json_logs(
    stack: Stack, json_log: io.StringIO, exporter: InMemorySpanExporter
) -> None:
    with PlannerClient(stack.planner) as planner:
        plan = planner.plan(plan_body(stack.model.name), traceparent=CALLER)
    r_plan = httpx.post(f"{stack.planner}/plan", json=plan_body(stack.model.name), headers={"traceparent": CALLER})
    assert r_plan.status_code == 200, r_plan.text
    with EdgeClient(stack.edge) as edge:
        edge.infer(stack.model.name, infer_inputs(stack, plan), exit=plan.exit.name, traceparent=CALLER)
    content, headers = wire.encode_request({stack.model.graph.input.name: stack.model.example_input()})
    raw = httpx.post(
        f"{stack.edge}/v2/models/{stack.model.name}/infer", content=content, headers={**headers, "traceparent": CALLER}
    )
    assert raw.status_code == 200, raw.text
    for r in (r_plan, raw):  # the same trace, a new span: the server's
        back = parse_traceparent(r.headers["traceparent"])
        assert back is not None and back.trace_id == CALLER_TRACE and back.span_id != CALLER_SPAN
    planner_lines = access(json_log, "planner", "/plan")
    edge_lines = access(json_log, "edge", "/infer")
    assert len(planner_lines) == 2 and len(edge_lines) == 2, json_log.getvalue()[-3000:]
    for line in planner_lines + edge_lines:
        assert line["trace_id"] == CALLER_TRACE and line["parent_id"] == CALLER_SPAN and line["status"] == 200
    assert planner_lines[-1]["span_id"] == parse_traceparent(r_plan.headers["traceparent"]).span_id
    assert edge_lines[-1]["span_id"] == parse_traceparent(raw.headers["traceparent"]).span_id
    assert planner_lines[-1]["route"] == "/plan" and edge_lines[-1]["route"] == "/v2/models/{model}/infer"


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def test_one_device_frame_is_one_trace_through_planner_and_edge(stack: Stack, exporter: InMemorySpanExporter) -> None:
    device = otel.tracer("device", enabled=True, exporter=exporter)
    with device.span(otel.FRAME, {otel.ATTR_MODEL: stack.model.name}) as frame:
        with PlannerClient(stack.planner) as planner:
            plan = planner.plan(plan_body(stack.model.name))  # carries the current context: the frame's
        inputs = infer_inputs(stack, plan)
        with device.span(otel.UPLINK, {otel.ATTR_EXIT: plan.exit.name}), EdgeClient(stack.edge) as edge:
            answer = edge.infer(stack.model.name, inputs, exit=plan.exit.name)
    device.flush()  # not shutdown: that would stop the exporter the services share
    spans = by_name(exporter)
    (frame_span,) = spans[otel.FRAME]
    (plan_server,) = spans["POST /plan"]
    (plan_span,) = spans[otel.PLANNER]
    (infer_server,) = spans["POST /v2/models/{model}/infer"]
    (queue,) = spans[otel.EDGE_QUEUE]
    (compute,) = spans[otel.EDGE_COMPUTE]
    everything = [s for group in spans.values() for s in group]
    assert {s.context.trace_id for s in everything} == {frame_span.context.trace_id}
    assert f"{frame_span.context.trace_id:032x}" == frame.context.trace_id
    # each span under the one that caused it
    assert plan_server.parent.span_id == frame_span.context.span_id
    assert plan_span.parent.span_id == plan_server.context.span_id
    (uplink,) = spans[otel.UPLINK]
    assert infer_server.parent.span_id == uplink.context.span_id
    assert queue.parent.span_id == compute.parent.span_id == infer_server.context.span_id
    assert {s.resource.attributes["service.name"] for s in (plan_span, queue, compute)} == {
        "dapdee-planner",
        "dapdee-edge",
    }
    # the planner's span: what it decided and predicted
    a = plan_span.attributes
    assert a[otel.ATTR_MODEL] == stack.model.name and a[otel.ATTR_MODE] == "latency"
    assert a[otel.ATTR_EXIT] == plan.exit.name and a[otel.ATTR_CUT] == len(plan.device_nodes)
    assert a[otel.ATTR_PREDICTED_MS] == pytest.approx(plan.predicted.latency_ms)
    assert a[otel.ATTR_TRANSFER_BYTES] == sum(t.bytes for t in plan.transfer)
    assert a[otel.ATTR_WORKER] == stack.edge == plan.edge_worker
    # the edge's spans: the same exit and cut, what it received, and what it measured
    for span in (queue, compute):
        e = span.attributes
        assert e[otel.ATTR_EXIT] == plan.exit.name and e[otel.ATTR_CUT] == len(plan.device_nodes)
        assert e[otel.ATTR_BYTES_RECEIVED] == infer_server.attributes["http.request.body.size"]
        assert e[otel.ATTR_BYTES_RECEIVED] == answer.request_bytes
        assert e[otel.ATTR_BATCH_SIZE] == answer.parameters.batch_size and e[otel.ATTR_BATCH_ROWS] == 1
        assert e[otel.ATTR_EDGE_NODES] >= 1
    assert queue.attributes[otel.ATTR_MEASURED_MS] == pytest.approx(answer.queue_ms, abs=1e-3)
    assert compute.attributes[otel.ATTR_MEASURED_MS] == pytest.approx(answer.compute_ms, abs=1e-3)
    assert queue.end_time == compute.start_time and compute.end_time >= compute.start_time
    assert infer_server.start_time <= queue.start_time and compute.end_time <= infer_server.end_time


def test_a_mid_network_cut_is_the_edge_spans_cut(stack: Stack, exporter: InMemorySpanExporter) -> None:
    """Tensors sent from inside the network: the edge's spans count the nodes upstream of them
    (the device side they imply) and the nodes the edge ran, which together make the exit's."""
    g = stack.model.graph
    exit_node = g.exits[-1].node
    upstream = g.ancestors(exit_node)
    cut_node = upstream[len(upstream) // 2]
    with torch.inference_mode():
        value = stack.model.executor.compute({g.input.name: stack.model.example_input()}, [cut_node])[cut_node]
    with EdgeClient(stack.edge) as edge:
        edge.infer(stack.model.name, {cut_node: value}, exit=g.exits[-1].name, traceparent=CALLER)
    (compute,) = by_name(exporter)[otel.EDGE_COMPUTE]
    device_side = set(g.ancestors(cut_node))
    assert compute.attributes[otel.ATTR_CUT] == len(device_side) > 0
    assert compute.attributes[otel.ATTR_EDGE_NODES] >= len(set(upstream) - device_side) > 0


def test_an_unsampled_caller_gets_no_service_spans(stack: Stack, exporter: InMemorySpanExporter) -> None:
    unsampled = CALLER[:-2] + "00"
    r = httpx.post(f"{stack.planner}/plan", json=plan_body(stack.model.name), headers={"traceparent": unsampled})
    assert r.status_code == 200
    assert parse_traceparent(r.headers["traceparent"]).trace_id == CALLER_TRACE
    assert exporter.get_finished_spans() == ()


def test_tracing_off_records_nothing() -> None:
    """Off (the default): no span is current, so the services' span code is skipped outright."""
    assert otel.active() is otel.NO_TRACING and otel.recording() is None
    on = otel.tracer("edge", enabled=True, exporter=InMemorySpanExporter())
    with on.span("outer"):
        assert otel.active() is on and otel.recording() is on
    assert otel.recording() is None
    on.shutdown()
