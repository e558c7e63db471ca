"""The access log and the process log format (dapdee.web.access_log, dapdee.web.logs) on real
apps under real uvicorn servers on 127.0.0.1: one JSON line per request with the request's W3C
trace context, the traceparent sent back, application lines carrying the same ids, outgoing
calls joining the trace, the guard's refusals logged, and the plain-text format."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response

from dapdee.testing import ServerThread, free_port
from dapdee.tracecontext import (
    TraceContext,
    ainject_traceparent,
    current,
    inject_traceparent,
    outgoing_headers,
    parse_traceparent,
    use,
)
from dapdee.web.access_log import ACCESS_LOGGER, AccessLog
from dapdee.web.guard import RequestGuard
from dapdee.web.logs import configure_logging
from dapdee.web.security import DEVICE, PUBLIC, TokenSet, require

TOKEN = "d" * 24
CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HEX32, HEX16 = re.compile(r"[0-9a-f]{32}"), re.compile(r"[0-9a-f]{16}")


def make_app(service: str, downstream: str | None = None) -> FastAPI:
    """A small app like the services: the guard inside, the access log outermost."""
    app = FastAPI()
    app.state.tokens = TokenSet.of(device=TOKEN)
    app.state.seen_traceparent = []

    @app.get("/health", dependencies=[require(PUBLIC)])
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/work/{name}", dependencies=[require(DEVICE)])
    async def work(name: str) -> dict[str, Any]:
        logging.getLogger("dapdee.test.app").info("working on %s", name, extra={"item": name})
        if downstream is not None:
            async with httpx.AsyncClient() as client:
                r = await client.get(f"{downstream}/health", headers=outgoing_headers())
            return {"downstream": r.headers["traceparent"]}
        ctx = current()
        return {"trace_id": ctx.trace_id if ctx else None}

    @app.get("/boom", dependencies=[require(PUBLIC)])
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/busy", dependencies=[require(PUBLIC)])
    async def busy() -> Response:
        return Response(status_code=503, headers={"Retry-After": "1"})

    @app.get("/broken", dependencies=[require(PUBLIC)])
    async def broken() -> Response:
        return Response(status_code=502)

    app.add_middleware(
        RequestGuard,
        routes_app=app,
        tokens=app.state.tokens,
        render=lambda status, msg: (json.dumps({"error": msg}).encode(), "application/json"),
        max_body_bytes=1000,
        body_timeout_s=2.0,
        max_concurrency=4,
    )
    app.add_middleware(AccessLog, service=service)  # added last: outermost, so refusals are logged
    return app


@pytest.fixture
def log_to() -> Iterator[Any]:
    """`log_to(fmt, level)` -> a StringIO receiving the process's log lines; root restored after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    streams: list[io.StringIO] = []

    def configure(fmt: str = "json", level: str = "info") -> io.StringIO:
        stream = io.StringIO()
        configure_logging("svc", fmt, level, stream=stream)
        streams.append(stream)
        return stream

    yield configure
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def access_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [r for r in json_lines(stream) if r["logger"] == ACCESS_LOGGER]


@pytest.fixture
def server() -> Iterator[str]:
    with ServerThread(make_app("svc")) as s:
        yield s.url


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_sent_traceparent_comes_back_with_the_same_trace_and_a_new_span(log_to: Any, server: str) -> None:
    stream = log_to("json")
    r = httpx.post(f"{server}/work/a", headers={**AUTH, "traceparent": CALLER}, content=b"12345")
    assert r.status_code == 200, r.text
    back = parse_traceparent(r.headers["traceparent"])
    assert back is not None
    assert back.trace_id == "0af7651916cd43dd8448eb211c80319c" and back.span_id != "b7ad6b7169203331"
    assert r.json()["trace_id"] == back.trace_id  # the route saw the request's context
    (line,) = access_lines(stream)
    assert line["trace_id"] == back.trace_id and line["span_id"] == back.span_id
    assert line["parent_id"] == "b7ad6b7169203331"
    assert (line["method"], line["path"], line["route"], line["status"]) == ("POST", "/work/a", "/work/{name}", 200)
    assert line["service"] == "svc" and line["level"] == "info"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["client"].startswith("127.0.0.1:")
    assert line["bytes_in"] == 5 and line["bytes_out"] == len(r.content)
    assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).tzinfo is not None
    assert line["msg"].startswith("POST /work/a 200 ")


def test_without_a_valid_traceparent_each_request_starts_a_trace(log_to: Any, server: str) -> None:
    stream = log_to("json")
    ids = []
    for headers in ({}, {}, {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"}):
        r = httpx.get(f"{server}/health", headers=headers)
        ctx = parse_traceparent(r.headers["traceparent"])
        assert ctx is not None and HEX32.fullmatch(ctx.trace_id) and HEX16.fullmatch(ctx.span_id)
        ids.append(ctx.trace_id)
    # two traceparent headers are invalid too: a new trace
    r = httpx.get(f"{server}/health", headers=[("traceparent", CALLER), ("traceparent", CALLER)])
    ids.append(parse_traceparent(r.headers["traceparent"]).trace_id)
    assert len(set(ids)) == 4 and "0af7651916cd43dd8448eb211c80319c" not in ids
    lines = access_lines(stream)
    assert [line["trace_id"] for line in lines] == ids
    assert all(line["parent_id"] is None for line in lines)


def test_application_lines_carry_the_request_ids(log_to: Any, server: str) -> None:
    stream = log_to("json")
    httpx.post(f"{server}/work/b", headers={**AUTH, "traceparent": CALLER})
    records = json_lines(stream)
    (app_line,) = [r for r in records if r["logger"] == "dapdee.test.app"]
    (access,) = [r for r in records if r["logger"] == ACCESS_LOGGER]
    assert app_line["msg"] == "working on b" and app_line["item"] == "b"
    assert (app_line["trace_id"], app_line["span_id"]) == (access["trace_id"], access["span_id"])
    logging.getLogger("dapdee.test.app").warning("outside any request")
    outside = json_lines(stream)[-1]
    assert outside["msg"] == "outside any request" and outside["trace_id"] is None


def test_guard_refusals_are_logged_with_their_trace(log_to: Any, server: str) -> None:
    stream = log_to("json")
    r = httpx.post(f"{server}/work/c", headers={"traceparent": CALLER})  # no token
    assert r.status_code == 401
    assert parse_traceparent(r.headers["traceparent"]).trace_id == "0af7651916cd43dd8448eb211c80319c"
    r = httpx.post(f"{server}/work/c", headers=AUTH, content=b"x" * 2000)  # over the body limit
    assert r.status_code == 413
    assert [(line["status"], line["route"]) for line in access_lines(stream)] == [(401, None), (413, None)]


def test_an_exception_is_logged_as_an_error_500(log_to: Any, server: str) -> None:
    stream = log_to("json")
    assert httpx.get(f"{server}/boom").status_code == 500
    (line,) = access_lines(stream)
    assert (line["status"], line["level"], line["error"]) == (500, "error", "RuntimeError")


def test_a_503_is_a_warning_and_another_5xx_an_error(log_to: Any, server: str) -> None:
    """A 503 tells the caller to retry (load shed, a budget passed): a warning, not an error."""
    stream = log_to("json")
    assert httpx.get(f"{server}/busy").status_code == 503
    assert httpx.get(f"{server}/broken").status_code == 502
    assert [(line["status"], line["level"]) for line in access_lines(stream)] == [(503, "warning"), (502, "error")]


def test_an_outgoing_call_joins_the_trace(log_to: Any) -> None:
    stream = log_to("json")
    with ServerThread(make_app("down")) as down, ServerThread(make_app("up", downstream=down.url)) as up:
        r = httpx.post(f"{up.url}/work/d", headers={**AUTH, "traceparent": CALLER})
    assert r.status_code == 200, r.text
    upstream = parse_traceparent(r.headers["traceparent"])
    downstream = parse_traceparent(r.json()["downstream"])
    assert downstream.trace_id == upstream.trace_id == "0af7651916cd43dd8448eb211c80319c"
    by_service = {line["service"]: line for line in access_lines(stream)}
    assert by_service["down"]["parent_id"] == upstream.span_id  # the callee's parent is the caller's span
    assert by_service["down"]["span_id"] == downstream.span_id
    assert by_service["up"]["parent_id"] == "b7ad6b7169203331"


def test_client_hooks_carry_the_current_context(log_to: Any, server: str) -> None:
    """httpx event hooks put the current context on every request; outside one, none (the
    server starts a trace of its own, with no parent)."""
    stream = log_to("json")
    ctx = TraceContext.root()

    async def async_call() -> None:
        async with httpx.AsyncClient(event_hooks={"request": [ainject_traceparent]}) as client:
            await client.get(f"{server}/health")

    with httpx.Client(event_hooks={"request": [inject_traceparent]}) as client:
        with use(ctx):
            client.get(f"{server}/health")
            asyncio.run(async_call())
        no_context = client.get(f"{server}/health")  # no context: no header, a trace of the server's
        client.get(f"{server}/health", headers={"traceparent": CALLER})  # an explicit header wins
    lines = access_lines(stream)
    assert [(line["trace_id"], line["parent_id"]) for line in lines[:2]] == [(ctx.trace_id, ctx.span_id)] * 2
    assert "traceparent" not in no_context.request.headers
    assert lines[2]["trace_id"] != ctx.trace_id and lines[2]["parent_id"] is None
    assert no_context.headers["traceparent"].split("-")[1] == lines[2]["trace_id"]  # the answer names it
    assert (lines[3]["trace_id"], lines[3]["parent_id"]) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")


def test_a_non_finite_number_in_a_record_still_gives_a_json_line(log_to: Any) -> None:
    """JSON has no NaN or infinity: such a value in `extra` is written as its string, and the
    line stays JSON that a strict parser reads."""
    stream = log_to("json")
    logging.getLogger("dapdee.test").info("odd", extra={"ratio": float("nan"), "ms": [1.5, float("inf")]})
    (line,) = [r for r in stream.getvalue().splitlines() if '"odd"' in r]
    rec = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert rec["ratio"] == "nan" and rec["ms"] == [1.5, "inf"]


def test_text_format_still_works(log_to: Any, server: str) -> None:
    stream = log_to("text")
    r = httpx.get(f"{server}/health", headers={"traceparent": CALLER})
    span = parse_traceparent(r.headers["traceparent"]).span_id
    lines = [line for line in stream.getvalue().splitlines() if ACCESS_LOGGER in line]
    assert len(lines) == 1
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z INFO \[svc\] dapdee\.access "
        rf"trace=0af7651916cd43dd8448eb211c80319c/{span}: GET /health 200 [0-9.]+ ms",
        lines[0],
    ), lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_level_filters_access_lines_but_errors_still_come(log_to: Any, server: str) -> None:
    stream = log_to("json", "warning")
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/boom").status_code == 500
    assert [line["status"] for line in access_lines(stream)] == [500]


def test_bad_format_or_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("svc", "xml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("svc", "json", "loud")


EDGE_SPEC = "zoo:alexnet?width=0.25&in_channels=1"
SERVE = {  # `dapdee serve` arguments, readiness path, path probed with a traceparent
    "edge": (["edge", "--models", EDGE_SPEC, "--tier", "edge"], "/v2/health/ready", "/v2/health/live"),
    "planner": (["planner", "--redis-url", "none"], "/readyz", "/healthz"),
}


def serve_once(service: str, log_format: str, tmp_path: Path) -> tuple[str, str]:
    """Run `dapdee serve SERVICE --log-format F` on a free 127.0.0.1 port, send one request with a
    traceparent (and X-Forwarded-For, which it must not believe), stop it; (its traceparent
    answer, everything it wrote on stderr)."""
    args, ready, probe = SERVE[service]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAPDEE_", "OTEL_"))}
    env.update({"OMP_NUM_THREADS": "1", "DAPDEE_EDGE_PROFILE_REPEATS": "1", "DAPDEE_EDGE_PROFILE_WARMUP": "0"})
    argv = [sys.executable, "-m", "dapdee.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / f"{service}-{log_format}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*argv, "--log-format", log_format], stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"{service} exited {proc.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{service} not ready: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}  # a loopback peer's claim
        r = httpx.get(f"http://127.0.0.1:{port}{probe}", headers={"traceparent": CALLER, **forged})
        assert r.status_code == 200
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return r.headers["traceparent"], log.read_text()


@pytest.mark.parametrize("service", sorted(SERVE))
def test_dapdee_serve_logs_json_lines(service: str, tmp_path: Path) -> None:
    traceparent, text = serve_once(service, "json", tmp_path)
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    assert {r["service"] for r in records} == {service}
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own lines too
    probe = SERVE[service][2]
    (line,) = [r for r in records if r["logger"] == ACCESS_LOGGER and r["path"] == probe]
    ctx = parse_traceparent(traceparent)
    assert (line["trace_id"], line["span_id"], line["parent_id"]) == (ctx.trace_id, ctx.span_id, "b7ad6b7169203331")
    assert line["status"] == 200 and line["method"] == "GET"
    assert line["client"].startswith("127.0.0.1:"), line  # the peer, not what its header claims


def test_dapdee_serve_logs_text_when_asked(tmp_path: Path) -> None:
    traceparent, text = serve_once("planner", "text", tmp_path)
    ctx = parse_traceparent(traceparent)
    lines = [line for line in text.splitlines() if f"trace={ctx.trace_id}/{ctx.span_id}" in line]
    assert len(lines) == 1 and lines[0].endswith(" ms") and "GET /healthz 200" in lines[0]
    assert not any(line.startswith("{") for line in text.splitlines())
