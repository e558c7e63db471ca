"""The planner's refusal metrics and trace sampling: its request guard counts its refusals in
`dapdee_planner_rejected_total{reason}` (every reason at 0 from the start, like the edge's), a
fresh planner shows every lease admission result at 0, an SDK call made outside any trace
context sends no `traceparent` (so the callee's head sampler decides, not a made-up sampled
parent), and the dashboard's ms-per-second panel is not drawn as a duration. Real planners under
uvicorn on 127.0.0.1, real HTTP, real scrapes of /metrics, the OpenTelemetry SDK's own sampler
and in-memory exporter.

(The multiprocess runtime series are checked in tests/test_metrics_multiprocess.py; the alert
that reads the refusals in deploy/prometheus/rules.test.yml, run by tests/test_alert_rules.py.)"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

# the SDK comes with the `otel` extra, which `dev` includes
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dapdee.client import PlannerClient
from dapdee.client.transport import trace_headers
from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from dapdee.testing import ServerThread
from dapdee.tracecontext import TraceContext, inject_traceparent, parse_traceparent, use
from dapdee.web import otel
from tests.metrics_scrape import Samples, parse

ADMIN, DEVICE, WORKER = "a" * 24, "d" * 24, "w" * 24
# the reasons the planner's guard can refuse for (it has no `before_body` check: no not_found)
GUARD_REASONS = ("unauthenticated", "forbidden", "too_large", "timeout", "bad_request", "disconnected", "overloaded")
ADMISSION_RESULTS = ("reserved", "device_only", "refused", "stale", "departed", "full", "unleased", "unstored")
BODY_LIMIT = 1000
BODY_TIMEOUT_S = 1.5
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "dapdee.json"
# Grafana's duration units: a value drawn in one reads as an amount of time
DURATION_UNITS = frozenset(
    {"ns", "µs", "ms", "s", "m", "h", "d", "dtdurationms", "dtdurations", "dthms", "dtdhms", "clockms", "clocks"}
)


def scrape(url: str) -> Samples:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200
    return parse(r.text)


def rejected(samples: Samples, route: str = "/plan") -> dict[str, float]:
    """reason -> dapdee_planner_rejected_total of a scrape, on `route` (a path template)."""
    got = samples.get("dapdee_planner_rejected_total", [])
    return {labels["reason"]: v for labels, v in got if labels["route"] == route}


@pytest.fixture
def guarded_planner() -> Iterator[str]:
    """A planner (in-process store) with a token per role, a 1000-byte body limit, a body buffer
    that holds one such body, and a 1.5 s body timeout."""
    settings = Settings(
        redis_url=None,
        admin_token=ADMIN,
        device_token=DEVICE,
        worker_token=WORKER,
        max_body_bytes=BODY_LIMIT,
        max_buffered_bytes=BODY_LIMIT,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    with ServerThread(create_app(settings)) as server:
        yield server.url


def start_slow_upload(url: str) -> socket.socket:
    """A POST /plan (device token) announcing a body of BODY_LIMIT bytes and sending 10 of them:
    the guard reserves the whole buffer for it and answers 408 once the body timeout passes."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /plan HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {DEVICE}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {BODY_LIMIT}\r\n\r\n"
    )
    sock.sendall(head.encode() + b"{" * 10)
    return sock


def post_plan_until_refused(url: str, timeout_s: float) -> httpx.Response:
    """POST a small plan request (device token) until the guard answers 503 (the slow upload's
    reservation fills the buffer once the server has read its headers); the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = httpx.post(f"{url}/plan", json={"model": "m", "bandwidth_mbps": 1.0}, headers=_bearer(DEVICE))
        if r.status_code == 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.02)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_planner_counts_its_guards_refusals_by_reason(guarded_planner: str) -> None:
    """Every guard reason of the plan route is exported at 0 before any request; then 2 x 401,
    1 x 403, 1 x 413, one 503 (buffer full) and one 408 (a body too slow), all on POST /plan,
    are counted under their reasons, the others stay 0, and none of them is a plan outcome
    (they never reached the route); a refused heartbeat counts under its own route, not the
    plan route's (which the plan error alert reads)."""
    url = guarded_planner
    before = scrape(url)
    assert rejected(before) == dict.fromkeys(GUARD_REASONS, 0.0)
    assert httpx.post(f"{url}/workers/heartbeat", json={}, headers=_bearer(DEVICE)).status_code == 403
    body = {"model": "m", "bandwidth_mbps": 1.0}
    assert httpx.post(f"{url}/plan", json=body).status_code == 401
    assert httpx.post(f"{url}/plan", json=body, headers=_bearer("x" * 24)).status_code == 401
    assert httpx.post(f"{url}/plan", json=body, headers=_bearer(WORKER)).status_code == 403
    big = json.dumps({"model": "m", "pad": "x" * BODY_LIMIT})
    assert httpx.post(f"{url}/plan", content=big, headers=_bearer(DEVICE)).status_code == 413
    slow = start_slow_upload(url)
    try:
        busy = post_plan_until_refused(url, timeout_s=BODY_TIMEOUT_S / 2)
        assert busy.status_code == 503, busy.text
        answer = slow.recv(4096)  # the guard's 408, once the body timeout has passed
    finally:
        slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    after = scrape(url)
    want = dict.fromkeys(GUARD_REASONS, 0.0)
    want.update(unauthenticated=2.0, forbidden=1.0, too_large=1.0, overloaded=1.0, timeout=1.0)
    assert rejected(after) == want
    assert rejected(after, "/workers/heartbeat") == {"forbidden": 1.0}
    for labels, v in after["dapdee_planner_plans_total"]:
        if labels["outcome"] != "unknown_model":  # the 503 loop's tries before the buffer filled
            assert v == 0, labels


def test_a_fresh_planner_shows_every_admission_result_at_zero() -> None:
    """Each lease admission result, `stale` (a replica's out-of-date view, re-planned) included,
    is exported at 0 by a planner that has planned nothing, so a rate sees its first one."""
    with ServerThread(create_app(Settings(redis_url=None))) as server:
        s = scrape(server.url)
    got = {labels["result"]: v for labels, v in s.get("dapdee_planner_admissions_total", [])}
    assert got == dict.fromkeys(ADMISSION_RESULTS, 0.0)


@pytest.fixture
def ratio_zero_planner(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, InMemorySpanExporter, otel.Tracing]]:
    """A planner exporting its spans to memory under the documented head sampler
    `parentbased_traceidratio` at ratio 0: a new trace is never recorded, a request whose caller
    says "sampled" always is (the SDK reads the sampler from the environment)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    exporter = InMemorySpanExporter()
    tracing = otel.OtelTracing("planner", exporter)
    try:
        with ServerThread(create_app(Settings(redis_url=None), tracing=tracing)) as server:
            yield server.url, exporter, tracing
    finally:
        tracing.shutdown()


def test_untraced_sdk_calls_leave_sampling_to_the_service(
    ratio_zero_planner: tuple[str, InMemorySpanExporter, otel.Tracing],
) -> None:
    """Outside any trace context the SDK sends no traceparent, so the planner's sampler decides
    (ratio 0: no span recorded for 20 calls) and the answer still names the trace the request
    started; inside `use(ctx)` the calls still join ctx's trace (recorded: ctx is sampled), as
    children of ctx's span."""
    url, exporter, tracing = ratio_zero_planner
    with PlannerClient(url) as client:
        for _ in range(20):
            client.healthz()
    tracing.flush()
    assert exporter.get_finished_spans() == ()
    with httpx.Client(event_hooks={"request": [inject_traceparent]}) as http:
        r = http.get(f"{url}/healthz")
    assert "traceparent" not in r.request.headers
    started = parse_traceparent(r.headers.get("traceparent"))
    assert started is not None and not started.sampled
    ctx = TraceContext.root()
    with use(ctx), PlannerClient(url) as client:
        client.healthz()
        client.healthz()
    tracing.flush()
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    for span in spans:
        assert f"{span.context.trace_id:032x}" == ctx.trace_id
        assert span.parent is not None and f"{span.parent.span_id:016x}" == ctx.span_id


def test_the_sdk_trace_headers_outside_a_context() -> None:
    """The SDK's headers for a call: none outside a context, the context's inside one, a given
    traceparent as given."""
    assert trace_headers(None) == {}
    ctx = TraceContext.root(sampled=False)
    with use(ctx):
        assert trace_headers(None) == {"traceparent": ctx.traceparent}
    given = TraceContext.root().traceparent
    assert trace_headers(given) == {"traceparent": given}


def test_rate_panels_of_ms_per_second_are_not_drawn_as_durations() -> None:
    """A panel showing a `*_ms_per_second` gauge (ms of compute per second: a rate) has a unit
    that says so (or a ratio's, for one divided by another), not a duration unit that would
    label 900 ms/s as "900 ms"."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels = [p for row in panels for p in (row, *row.get("panels", []))]
    rate_panels = [p for p in panels if any("_ms_per_second" in t.get("expr", "") for t in p.get("targets", []))]
    assert rate_panels, "no panel reads a *_ms_per_second gauge"
    for p in rate_panels:
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit not in DURATION_UNITS, f"{p['title']!r}: unit {unit!r} draws a rate as a duration"
        ratio = unit in ("percentunit", "percent")  # e.g. leased / capacity
        assert ratio or (unit is not None and "ms/s" in unit), f"{p['title']!r}: unit {unit!r} does not say ms/s"
