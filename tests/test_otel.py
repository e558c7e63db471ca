"""Opt-in OpenTelemetry tracing (dapdee.web.otel) on real apps under real uvicorn servers:
spans exported by the SDK (in-memory exporter; OTLP/HTTP to a real receiver on 127.0.0.1) carry
the incoming W3C trace, one device frame is one trace across device, planner and edge, and when
tracing is off no span is made and the SDK is never imported."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

# the SDK comes with the `otel` extra, which `dev` includes: missing, this module fails to import
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from dapdee.testing import ServerThread, free_port
from dapdee.tracecontext import outgoing_headers, parse_traceparent
from dapdee.web import otel
from dapdee.web.access_log import AccessLog

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
CALLER_TRACE, CALLER_SPAN = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331


def traced_app(service: str, tracing: otel.Tracing) -> FastAPI:
    """A service-like app: an infer route timing a queue wait and a compute step, a plan route,
    and a route that fails; the access log (with the tracing) outermost."""
    app = FastAPI()

    @app.post("/infer/{model}")
    async def infer(model: str) -> dict[str, Any]:
        arrived = time.time_ns()
        time.sleep(0.002)  # waiting in the batch queue
        tracing.record(otel.EDGE_QUEUE, arrived, time.time_ns(), {otel.ATTR_MODEL: model})
        with tracing.span(otel.EDGE_COMPUTE, {otel.ATTR_MODEL: model, otel.ATTR_EXIT: "exit1"}) as span:
            span.set_attribute(otel.ATTR_MEASURED_MS, 1.5)
        return {"ok": True}

    @app.post("/plan")
    async def plan() -> dict[str, Any]:
        with tracing.span(otel.PLANNER, {otel.ATTR_EXIT: "exit1", otel.ATTR_CUT: 3, otel.ATTR_PREDICTED_MS: 12.5}):
            return {"exit": "exit1", "cut": 3}

    @app.get("/fail")
    async def fail() -> None:
        with tracing.span("failing"):
            raise RuntimeError("nope")

    app.add_middleware(AccessLog, service=service, tracing=tracing)
    return app


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def edge(exporter: InMemorySpanExporter) -> Iterator[tuple[str, otel.Tracing]]:
    tracing = otel.tracer("edge", enabled=True, exporter=exporter)
    with ServerThread(traced_app("edge", tracing)) as server:
        yield server.url, tracing
    tracing.shutdown()


def by_name(exporter: InMemorySpanExporter) -> dict[str, Any]:
    spans = exporter.get_finished_spans()
    out = {s.name: s for s in spans}
    assert len(out) == len(spans), [s.name for s in spans]
    return out


def test_spans_carry_the_incoming_trace(edge: tuple[str, otel.Tracing], exporter: InMemorySpanExporter) -> None:
    url, _ = edge
    r = httpx.post(f"{url}/infer/m1", headers={"traceparent": CALLER})
    assert r.status_code == 200
    back = parse_traceparent(r.headers["traceparent"])
    spans = by_name(exporter)
    assert set(spans) == {"POST /infer/{model}", otel.EDGE_QUEUE, otel.EDGE_COMPUTE}
    server = spans["POST /infer/{model}"]
    assert server.kind == SpanKind.SERVER
    assert server.context.trace_id == CALLER_TRACE and server.parent.span_id == CALLER_SPAN
    assert server.parent.is_remote
    assert f"{server.context.span_id:016x}" == back.span_id  # the response names the exported span
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/infer/{model}" and server.attributes["url.path"] == "/infer/m1"
    for name in (otel.EDGE_QUEUE, otel.EDGE_COMPUTE):
        child = spans[name]
        assert child.context.trace_id == CALLER_TRACE and child.parent.span_id == server.context.span_id
    assert spans[otel.EDGE_QUEUE].end_time - spans[otel.EDGE_QUEUE].start_time >= 1_000_000  # the 2 ms wait
    assert spans[otel.EDGE_COMPUTE].attributes[otel.ATTR_EXIT] == "exit1"
    assert spans[otel.EDGE_COMPUTE].attributes[otel.ATTR_MEASURED_MS] == 1.5
    assert server.resource.attributes["service.name"] == "dapdee-edge"


def test_a_malformed_tracestate_is_dropped_before_the_sdk_sees_it(
    edge: tuple[str, otel.Tracing], exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's malformed `tracestate` keeps the trace, is not passed on, and makes the tracing
    library log nothing (it warned twice per request, echoing what the client sent)."""
    url, _ = edge
    with caplog.at_level(logging.DEBUG, logger="opentelemetry"):
        r = httpx.post(f"{url}/infer/m1", headers={"traceparent": CALLER, "tracestate": "foo@@=bar"})
    assert r.status_code == 200 and "tracestate" not in r.headers
    server = by_name(exporter)["POST /infer/{model}"]
    assert server.context.trace_id == CALLER_TRACE and server.parent.span_id == CALLER_SPAN
    assert not [rec for rec in caplog.records if rec.name.startswith("opentelemetry")], caplog.records


def test_a_request_without_traceparent_starts_an_exported_trace(
    edge: tuple[str, otel.Tracing], exporter: InMemorySpanExporter
) -> None:
    url, _ = edge
    r = httpx.post(f"{url}/infer/m1")
    back = parse_traceparent(r.headers["traceparent"])
    server = by_name(exporter)["POST /infer/{model}"]
    assert server.parent is None and f"{server.context.trace_id:032x}" == back.trace_id


def test_an_unsampled_caller_gets_no_spans_but_keeps_its_trace(
    edge: tuple[str, otel.Tracing], exporter: InMemorySpanExporter
) -> None:
    url, _ = edge
    r = httpx.post(f"{url}/infer/m1", headers={"traceparent": CALLER[:-2] + "00"})
    back = parse_traceparent(r.headers["traceparent"])
    assert back.trace_id == f"{CALLER_TRACE:032x}" and not back.sampled
    assert exporter.get_finished_spans() == ()


def test_a_failing_span_records_the_error(edge: tuple[str, otel.Tracing], exporter: InMemorySpanExporter) -> None:
    url, _ = edge
    assert httpx.get(f"{url}/fail").status_code == 500
    spans = by_name(exporter)
    assert spans["failing"].status.status_code == StatusCode.ERROR
    assert any(e.name == "exception" for e in spans["failing"].events)
    assert spans["GET /fail"].status.status_code == StatusCode.ERROR


def test_one_device_frame_is_one_trace(exporter: InMemorySpanExporter) -> None:
    """The device's spans (made here, as the device runtime makes them), the planner's and the
    edge's: one trace, each span under the one that caused it, with the frame's attributes."""
    device = otel.tracer("device", enabled=True, exporter=exporter)
    planner_tracing = otel.tracer("planner", enabled=True, exporter=exporter)
    edge_tracing = otel.tracer("edge", enabled=True, exporter=exporter)
    with (
        ServerThread(traced_app("planner", planner_tracing)) as planner,
        ServerThread(traced_app("edge", edge_tracing)) as edge,
    ):
        with device.span(otel.FRAME, {otel.ATTR_MODEL: "m1"}) as frame:
            plan = httpx.post(f"{planner.url}/plan", headers=outgoing_headers()).json()
            with device.span(otel.DEVICE_COMPUTE, {otel.ATTR_CUT: plan["cut"]}):
                payload = b"\0" * 1234
            with device.span(otel.UPLINK, {otel.ATTR_BYTES_SENT: len(payload)}):
                r = httpx.post(f"{edge.url}/infer/m1", headers=outgoing_headers(), content=payload)
            frame.set_attributes(
                {otel.ATTR_EXIT: plan["exit"], otel.ATTR_PREDICTED_MS: 12.5, otel.ATTR_MEASURED_MS: 14}
            )
    assert r.status_code == 200
    for t in (device, planner_tracing, edge_tracing):
        t.shutdown()
    spans = by_name(exporter)
    assert set(spans) == {
        otel.FRAME,
        otel.DEVICE_COMPUTE,
        otel.UPLINK,
        "POST /plan",
        otel.PLANNER,
        "POST /infer/{model}",
        otel.EDGE_QUEUE,
        otel.EDGE_COMPUTE,
    }
    assert len({s.context.trace_id for s in spans.values()}) == 1

    def parent_of(name: str) -> str | None:
        parent = spans[name].parent
        if parent is None:
            return None
        (found,) = [n for n, s in spans.items() if s.context.span_id == parent.span_id]
        return found

    assert parent_of(otel.FRAME) is None
    assert parent_of(otel.DEVICE_COMPUTE) == parent_of(otel.UPLINK) == parent_of("POST /plan") == otel.FRAME
    assert parent_of(otel.PLANNER) == "POST /plan"
    assert parent_of("POST /infer/{model}") == otel.UPLINK
    assert parent_of(otel.EDGE_QUEUE) == parent_of(otel.EDGE_COMPUTE) == "POST /infer/{model}"
    assert spans[otel.UPLINK].attributes[otel.ATTR_BYTES_SENT] == 1234
    assert spans[otel.PLANNER].attributes[otel.ATTR_CUT] == 3
    assert spans[otel.FRAME].attributes[otel.ATTR_PREDICTED_MS] == 12.5
    assert {spans[n].resource.attributes["service.name"] for n in (otel.FRAME, otel.PLANNER, otel.EDGE_COMPUTE)} == {
        "dapdee-device",
        "dapdee-planner",
        "dapdee-edge",
    }


def test_when_it_is_on() -> None:
    assert not otel.requested(environ={})
    assert otel.requested(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert otel.requested(environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert otel.requested(True, environ={})
    assert not otel.requested(False, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    off = {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert not otel.requested(None, environ=off) and not otel.requested(True, environ=off)


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps each POST /v1/traces body."""

    bodies: list[bytes]

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf":
            self.server.bodies.append(body)  # type: ignore[attr-defined]
            self.send_response(200)
        else:
            self.send_response(400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[bytes]]]:
    """A real OTLP/HTTP trace receiver on 127.0.0.1: (its endpoint, the bodies it got)."""
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    receiver.bodies = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{receiver.server_port}", receiver.bodies  # type: ignore[attr-defined]
    finally:
        receiver.shutdown()
        receiver.server_close()


def received(bodies: list[bytes]) -> tuple[list[Any], set[str]]:
    """The spans and service names of the OTLP export requests a receiver got."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    spans, services = [], set()
    for body in bodies:
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
            services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
            spans += [s for ss in rs.scope_spans for s in ss.spans]
    return spans, services


def test_the_endpoint_variable_exports_over_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    with otlp_receiver() as (endpoint, bodies):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        tracing = otel.tracer("planner")  # on: the endpoint is set
        assert tracing.enabled
        with ServerThread(traced_app("planner", tracing)) as planner:
            assert httpx.post(f"{planner.url}/plan", headers={"traceparent": CALLER}).status_code == 200
        tracing.shutdown()  # flushes the batch
    spans, services = received(bodies)
    assert services == {"dapdee-planner"}
    assert sorted(s.name for s in spans) == ["POST /plan", otel.PLANNER]
    assert {s.trace_id.hex() for s in spans} == {f"{CALLER_TRACE:032x}"}


def test_dapdee_serve_planner_otel_exports_request_spans(tmp_path: Path) -> None:
    """`dapdee serve planner --otel`: each request is a server span of the caller's trace,
    exported to the OTLP endpoint (flushed when the process stops)."""
    port = free_port()
    with otlp_receiver() as (endpoint, bodies):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAPDEE_", "OTEL_"))}
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        argv = [sys.executable, "-m", "dapdee.cli", "serve", "planner", "--redis-url", "none", "--otel"]
        log = tmp_path / "planner.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [*argv, "--host", "127.0.0.1", "--port", str(port)], stderr=err, env=env, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                time.sleep(0.2)
            r = httpx.get(f"http://127.0.0.1:{port}/models", headers={"traceparent": CALLER})
            assert r.status_code == 200, r.text
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        spans, services = received(bodies)
    assert services == {"dapdee-planner"}, log.read_text()[-2000:]
    (span,) = [s for s in spans if s.trace_id.hex() == f"{CALLER_TRACE:032x}"]
    assert span.name == "GET /models" and span.parent_span_id.hex() == f"{CALLER_SPAN:016x}"
    assert parse_traceparent(r.headers["traceparent"]).span_id == span.span_id.hex()


OFF_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import httpx
    from fastapi import FastAPI
    from dapdee.testing import ServerThread
    from dapdee.web import otel
    from dapdee.web.access_log import AccessLog

    tracing = otel.tracer("edge")
    app = FastAPI()

    @app.get("/x")
    async def x():
        with tracing.span(otel.EDGE_COMPUTE, {otel.ATTR_EXIT: "e"}) as span:
            span.set_attribute(otel.ATTR_MEASURED_MS, 1.0)
            return {"ctx": span.context.traceparent}

    app.add_middleware(AccessLog, service="edge", tracing=tracing)
    with ServerThread(app) as server:
        r = httpx.get(server.url + "/x", headers={"traceparent": sys.argv[1]})
    print(json.dumps({
        "enabled": tracing.enabled,
        "noop": tracing is otel.NO_TRACING,
        "record": tracing.record("q", 0, 1),
        "header": r.headers["traceparent"],
        "inside": r.json()["ctx"],
        "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
        "exporters": sorted(m for m in sys.modules if m.startswith("opentelemetry.exporter")),
    }))
    """
)


def test_off_makes_no_spans_and_never_imports_the_sdk() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    r = subprocess.run([sys.executable, "-c", OFF_SCRIPT, CALLER], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["enabled"] is False and out["noop"] is True and out["record"] is None
    assert out["sdk"] == [] and out["exporters"] == []
    # the W3C context still works without OpenTelemetry: the route saw the request's span
    assert out["inside"] == out["header"] and out["header"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
