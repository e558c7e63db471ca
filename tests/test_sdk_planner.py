"""The SDK's planner client (`dapdee.client.PlannerClient`, `AsyncPlannerClient`) against a real
planner (uvicorn on 127.0.0.1, the shared Redis under a key prefix of its own, one token per
role): every method round-trips; every error carries its status and problem document (401,
403, 404, 409 on a stale If-Match, 422 naming a misspelt field); requests the SDK must not send
never leave it; answers off the contract, answers too large, redirects, dead and silent
servers are ProtocolError / ApiError / TransportError; a lease is held to lease.schema.json;
trace context travels."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from dapdee.api.planner import HeartbeatBody, PlanAnswer, PlanRequestBody
from dapdee.client import (
    ApiError,
    AsyncPlannerClient,
    PlannerClient,
    ProtocolError,
    RequestError,
    TransportError,
)
from dapdee.costgraph import CostGraph
from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from dapdee.testing import bind_free_socket, clear_prefix, free_port, serve_app_in_thread, unique_prefix
from dapdee.tracecontext import TraceContext, parse_traceparent, use
from tests.standin import Standin, answer_bytes
from tests.test_planner_service import toy_graph

REPO = Path(__file__).resolve().parent.parent
REDIS = "redis://127.0.0.1:6379/0"
TOKENS = {"admin": "sdk-admin-" + "a" * 16, "device": "sdk-device-" + "d" * 16, "worker": "sdk-worker-" + "w" * 16}
PROBLEM = Draft202012Validator(json.loads((REPO / "docs" / "schemas" / "problem.schema.json").read_text()))
SCHEMAS = {
    n: json.loads((REPO / "docs" / "schemas" / f"{n}.schema.json").read_text()) for n in ("cost-graph", "plan", "lease")
}
REGISTRY = Registry().with_resources((f"{n}.schema.json", Resource.from_contents(d)) for n, d in SCHEMAS.items())
LEASE = Draft202012Validator({"$ref": "lease.schema.json"}, registry=REGISTRY)
DEVICE = Draft202012Validator({"$ref": "lease.schema.json#/$defs/device"}, registry=REGISTRY)
VERSION_CONFLICT = "urn:dapdee:problem:version-conflict"
VALIDATION = "urn:dapdee:problem:validation"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """A planner with one token per role, storing in the shared Redis under its own prefix."""
    prefix = unique_prefix("sdk")
    roles = {f"{r}_token": t for r, t in TOKENS.items()}
    settings = Settings(redis_url=REDIS, key_prefix=prefix, worker_ttl_s=30.0, **roles)
    try:
        with serve_app_in_thread(create_app(settings)) as base:
            yield base
    finally:
        clear_prefix(REDIS, prefix)


def client(url: str, role: str | None, **kw: Any) -> PlannerClient:
    return PlannerClient(url, TOKENS[role] if role else None, timeout=30.0, **kw)


def profiled(name: str) -> CostGraph:
    """The toy DAG with device timings and their provenance in meta."""
    g = CostGraph.from_dict(toy_graph(name))
    return g.with_timings("device", {n.name: n.device_ms for n in g.nodes}, {"hardware": "test-phone", "repeats": 3})


def api_error(call: Any, *args: Any, **kw: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args, **kw)
    return err.value


def assert_problem(err: ApiError, status: int, *named: str) -> None:
    """`err` is a `status` answer whose problem document fits docs/schemas/problem.schema.json
    and whose detail names each of `named`."""
    assert err.status == status and err.problem["status"] == status, err
    assert not [e.message for e in PROBLEM.iter_errors(err.problem)], err.problem
    assert err.detail and err.title
    for word in named:
        assert word in err.detail, (word, err.detail)
    assert f"HTTP {status}" in str(err) and err.path in str(err)


# ---- every method round-trips ---------------------------------------------------------------------


def test_every_method_round_trips(url: str) -> None:
    g = profiled("sdk_rt")
    with client(url, None) as public, client(url, "admin") as admin, client(url, "device") as device:
        assert public.healthz().status == "ok"
        ready = public.readyz()
        assert ready.ready and ready.redis == "up"
        written = admin.put_graph(g)
        assert written.created and written.model == "sdk_rt" and written.stored == "redis"
        stored = admin.get_model("sdk_rt")
        assert stored.graph.to_dict() == g.to_dict() and stored.version == written.version
        again = admin.put_graph(g.to_dict(), if_version=stored.version)  # the JSON form, conditional
        assert not again.created and device.get_model("sdk_rt").version == again.version
        prof = admin.upload_profile(g, "phone", "device", {"tier": "phone"})
        assert prof.created and prof.kind == "device" and prof.nodes_timed == len(g.nodes) and not prof.nodes_missing
        assert prof.version == again.version + 1
        edge_ms = {n.name: round(n.device_ms / 8, 4) for n in g.nodes}
        assert admin.put_profile("sdk_rt", "gpu", "edge", edge_ms, {"hardware": "gpu"}, if_version=prof.version).created
        profiles = device.list_profiles("sdk_rt")
        phone = profiles.profiles["phone"]
        assert phone.timings_ms == {n.name: n.device_ms for n in g.nodes}
        assert phone.meta == {"hardware": "test-phone", "repeats": 3, "tier": "phone"}  # graph.meta["device"] + extra
        assert profiles.profiles["gpu"].timings_ms == edge_ms and profiles.version == prof.version + 1
        (summary,) = [m for m in device.list_models().models if m.model == "sdk_rt"]
        assert summary.profiles == {"gpu": "edge", "phone": "device"} and summary.nodes == len(g.nodes)
        assert summary.version == profiles.version
        admin.delete_profile("sdk_rt", "gpu", if_version=profiles.version)
        assert set(device.list_profiles("sdk_rt").profiles) == {"phone"}
        admin.delete_model("sdk_rt")
        assert api_error(device.get_model, "sdk_rt").status == 404


def test_plan_heartbeat_and_workers_round_trip(url: str) -> None:
    """A typed plan request and the same as a mapping give the planner's own answer (what a
    plain HTTP client reads); a heartbeat makes the worker live and the plan name it."""
    g = profiled("sdk_plan")
    with client(url, "admin") as admin, client(url, "device") as device, client(url, "worker") as worker:
        admin.put_graph(g)
        admin.upload_profile(g, "phone", "device")
        body = PlanRequestBody(model="sdk_plan", bandwidth_mbps=5.85, rtt_ms=10.0, device_tier="phone")
        typed = device.plan(body)
        assert isinstance(typed, PlanAnswer) and typed.edge_worker is None
        as_mapping = device.plan({"model": "sdk_plan", "bandwidth_mbps": 5.85, "rtt_ms": 10.0, "device_tier": "phone"})
        raw = httpx.post(f"{url}/plan", json=body.model_dump(exclude_unset=True), headers=_bearer("device"))
        assert raw.status_code == 200 and typed == as_mapping == PlanAnswer.model_validate(raw.json())
        assert set(typed.device_nodes).isdisjoint(typed.edge_nodes)
        beat = HeartbeatBody(url="http://127.0.0.1:9", models=["sdk_plan"], tier="gpu", load=0.25, inflight=2)
        answer = worker.heartbeat(beat)
        assert answer.url == "http://127.0.0.1:9" and answer.shared and answer.ttl_s == 30.0
        (live,) = [w for w in device.workers().workers if w.url == "http://127.0.0.1:9"]
        assert live.tier == "gpu" and live.load == 0.25 and live.inflight == 2 and 0 < live.expires_in_s <= 30.0
        planned = device.plan(body)  # no gpu profile: the graph's own edge timings, and the worker named
        assert planned.edge_worker == "http://127.0.0.1:9"
        admin.delete_model("sdk_plan")


def test_a_confidence_exit_plan_keeps_every_expected_number(url: str) -> None:
    """A plan for calibrated confidence exits reads back with all six `expected_*` numbers of
    its prediction (DESIGN.md, the plan answer), as the planner sent them."""
    progressive = {
        "rule": "max_softmax",
        "thresholds": {"exit1": 0.9, "final": None},
        "by_exit": {
            "exit1": {"fractions": {"exit1": 1.0}, "accuracy": 0.81},
            "final": {"fractions": {"exit1": 0.4, "final": 0.6}, "accuracy": 0.88},
        },
    }
    body = {"model": "sdk_conf", "bandwidth_mbps": 5.85, "rtt_ms": 10.0, "confidence_exits": True}
    with client(url, "admin") as admin, client(url, "device") as device:
        admin.put_graph({**toy_graph("sdk_conf"), "progressive": progressive})
        typed = device.plan(body)
        raw = httpx.post(f"{url}/plan", json=body, headers=_bearer("device"))
        admin.delete_model("sdk_conf")
    assert raw.status_code == 200, raw.text
    sent = raw.json()["predicted"]
    assert {k for k in sent if k.startswith("expected_")} == {
        f"expected_{k}"
        for k in ("latency_ms", "device_ms", "transfer_ms", "edge_ms", "bottleneck_ms", "throughput_fps")
    }
    assert typed.predicted.model_dump(exclude_unset=True) == sent


def _bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


# ---- errors carry status and problem --------------------------------------------------------------


def test_errors_carry_status_and_problem(url: str) -> None:
    g = profiled("sdk_err")
    with client(url, "admin") as admin, client(url, "device") as device, client(url, "worker") as worker:
        version = admin.put_graph(g).version
        for anonymous in (client(url, None), PlannerClient(url, "not-a-token")):
            with anonymous:
                err = api_error(anonymous.list_models)
                assert_problem(err, 401, "bearer token")
                assert err.headers["www-authenticate"] == "Bearer"
        assert_problem(api_error(device.put_graph, g), 403, "admin")
        assert_problem(api_error(worker.plan, {"model": "sdk_err", "bandwidth_mbps": 1.0}), 403, "device")
        assert_problem(api_error(device.get_model, "sdk_nope"), 404, "sdk_nope")
        assert_problem(api_error(device.list_profiles, "sdk_nope"), 404, "sdk_nope")
        assert_problem(api_error(admin.delete_profile, "sdk_err", "nope"), 404, "nope")
        for stale in (
            lambda: admin.put_graph(g, if_version=version + 5),
            lambda: admin.upload_profile(g, "phone", "device", if_version=version + 5),
            lambda: admin.delete_model("sdk_err", if_version=version + 5),
        ):
            err = api_error(stale)
            assert_problem(err, 409, str(version))
            assert err.type == VERSION_CONFLICT
        assert admin.get_model("sdk_err").version == version  # the refused writes changed nothing
        err = api_error(device.plan, {"model": "sdk_err", "bandwidth_mbps": 1.0, "min_acc": 0.9})
        assert_problem(err, 422, "min_acc")
        assert err.type == VALIDATION and [e["loc"] for e in err.errors] == [["body", "min_acc"]]
        beat = {"url": "http://127.0.0.1:9", "models": ["sdk_err"], "tier": "gpu", "lod": 0.1}
        err = api_error(worker.heartbeat, beat)
        assert_problem(err, 422)
        assert ["body", "lod"] in [e["loc"] for e in err.errors] and ["body", "load"] in [e["loc"] for e in err.errors]
        err = api_error(device.plan, PlanRequestBody(model="sdk_err", bandwidth_mbps=1.0, device_tier="sdk_none"))
        assert_problem(err, 409, "sdk_none")
        assert err.type == "urn:dapdee:problem:missing-timings"
        admin.delete_model("sdk_err")


def test_requests_the_sdk_refuses_never_leave_it() -> None:
    """Nothing listens at the URL: a request that was sent would be a TransportError."""
    dead = f"http://127.0.0.1:{free_port()}"
    g = profiled("sdk_refused")
    with PlannerClient(dead, "t") as c:
        for call in (
            lambda: c.get_model("../admin"),
            lambda: c.list_profiles("a/b"),
            lambda: c.delete_profile("ok", "x?y"),
            lambda: c.put_graph({**g.to_dict(), "model": "bad name"}),
            lambda: c.put_graph(g, if_version=0),
            lambda: c.put_graph(g, if_version=True),
            lambda: c.plan({"model": "m", "bandwidth_mbps": float("nan")}),
            lambda: c.plan(["not", "a", "body"]),  # type: ignore[arg-type]
            lambda: c.plan({"model": "m", "bandwidth_mbps": 1.0}, traceparent="00-not-a-trace"),
            lambda: c.upload_profile(CostGraph.from_dict(toy_graph("untimed", timings=False)), "phone", "device"),
            lambda: c.upload_profile(g, "phone", "cloud"),  # type: ignore[arg-type]
        ):
            with pytest.raises(RequestError):
                call()
        with pytest.raises(TransportError) as err:  # a request that is sent
            c.healthz()
        assert not err.value.timeout and isinstance(err.value.cause, httpx.ConnectError)
    for bad in ("ftp://127.0.0.1:1", "http://", "http://h:1/?q=1", "http://u:p@h:1", "127.0.0.1:8080"):
        with pytest.raises(RequestError):
            PlannerClient(bad)
    for timeout in (float("inf"), float("nan"), 0, -1.0, 1e9):
        with pytest.raises(RequestError):
            PlannerClient(dead, timeout=timeout)
    assert isinstance(RequestError("x"), ValueError)


# ---- what the SDK trusts, and what it sends --------------------------------------------------------


NAN_PART = {"accuracy": float("nan"), "exit_fraction": 0.5, "edge_fraction": 0.5, "heads": []}
TOTALS = {"devices_met": 1, "accuracy_frames_per_s": 9.0, "frame_ms_per_s": 50.0, "leased_ms_per_s": 30.0}
WORKER_REBALANCE = {
    "worker": "http://e:1",
    "leases": 1,
    "exact": True,
    "time_load": 0.5,
    "applied": True,
    "before": TOTALS,
    "after": TOTALS,
    "devices": [],
}
BAD_REBALANCES = [
    {"approximate": False, "workers": [{**WORKER_REBALANCE, **change}]}
    for change in (
        {"after": {**TOTALS, "frame_ms_per_s": float("nan")}},
        {"after": {**TOTALS, "devices_met": "1"}},
        {"applied": "yes"},
        {"leases": 1.5},
    )
]


def test_answers_off_contract_are_protocol_errors() -> None:
    standin = Standin()
    good_plan = PlanAnswer.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    bad = dict(good_plan, predicted={**good_plan["predicted"], "latency_ms": -1.0})
    cases: list[tuple[Any, bytes, dict[str, str]]] = [
        (lambda c: c.list_models(), b'{"models": [{"model": "m"}]}', {}),
        (lambda c: c.plan({"model": "m", "bandwidth_mbps": 1}), answer_bytes(bad), {}),
        (lambda c: c.plan({"model": "m", "bandwidth_mbps": 1}), answer_bytes({**good_plan, "mode": "fastest"}), {}),
        (lambda c: c.plan({"model": "m", "bandwidth_mbps": 1}), b"not json", {}),
        (lambda c: c.workers(), answer_bytes({"workers": [{"url": "u", "load": float("nan")}]}), {}),
        (lambda c: c.get_model("m"), answer_bytes(toy_graph("m")), {}),  # no ETag
        (lambda c: c.get_model("m"), b'{"model": "m", "nodes": []}', {"etag": '"1"'}),
        # the planner's name is one of plan.schema.json's; a progressive part as it has it
        (lambda c: c.plan({"model": "m", "bandwidth_mbps": 1}), answer_bytes({**good_plan, "planner": "evil"}), {}),
        (
            lambda c: c.plan({"model": "m", "bandwidth_mbps": 1}),
            answer_bytes({**good_plan, "progressive": NAN_PART}),
            {},
        ),
        # a rebalance's numbers are JSON numbers and finite, its booleans JSON booleans
        *[(lambda c: c.rebalance(), answer_bytes(doc), {}) for doc in BAD_REBALANCES],
    ]
    with serve_app_in_thread(standin.app) as base, PlannerClient(base) as c:
        for call, body, headers in cases:
            standin.answer(body, 200, **headers)
            with pytest.raises(ProtocolError) as err:
                call(c)
            assert err.value.status == 200 and err.value.detail
        standin.answer(answer_bytes(toy_graph("m")), 200, etag='"7"')
        assert c.get_model("m").version == 7
        standin.answer(b"x" * 5000, 200)
        with PlannerClient(base, max_response_bytes=1000) as small, pytest.raises(ProtocolError) as err:
            small.list_models()
        assert "1000 bytes" in err.value.detail
        standin.answer(b"<html>bad gateway</html>", 502, content_type="text/html")
        err2 = api_error(c.list_models)
        assert err2.status == 502 and "bad gateway" in err2.detail and err2.body == "<html>bad gateway</html>"


GOOD_LEASE = {
    "device_id": "cam-7",
    "model": "tiny",
    "worker": "http://edge-1:8000",
    "frames_per_s": 10.0,
    "edge_ms_per_frame": 3.0,
    "expires_in_s": 30.0,
    "replan_after_s": 5.0,
    "assigned": False,
}
GONE = object()  # a field left out
# (field, value): the good lease with `field` set to `value`, or left out (GONE)
LEASE_CHANGES: list[tuple[str, Any]] = [
    *[(name, GONE) for name in ("device_id", "model", "assigned", "frames_per_s")],
    ("worker", None),
    ("worker", "https://edge-1.example/prefix"),
    ("expires_in_s", 0),
    ("replan_after_s", 0.0),
    ("device_id", "a.b_c-9"),
    ("device_id", "d" * 64),
    ("device_id", "null"),
    *[("device_id", v) for v in (None, "a/b", "..", "a..b", "-a", "", "d" * 65, 7)],
    *[("model", v) for v in (None, "x y", ".m")],
    *[("worker", v) for v in ("edge-1:8000", "http://a b", "ftp://e:1", "http://", "http://e:1\t", 8000)],
    *[("frames_per_s", v) for v in ("10", True, 0, -1.0, None)],
    ("edge_ms_per_frame", 0),
    *[("assigned", v) for v in (1, "true")],
]


def changed(doc: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    """`doc` with `field` set to `value`, or left out when `value` is GONE."""
    if value is GONE:
        return {k: v for k, v in doc.items() if k != field}
    return {**doc, field: value}


def plan_or_error(c: PlannerClient, standin: Standin, plan: dict[str, Any]) -> Any:
    """`c.plan(...)` answered `plan` by the stand-in: the answer, or the ProtocolError."""
    standin.answer(json.dumps(plan))
    try:
        return c.plan({"model": "m", "bandwidth_mbps": 1.0, "device_id": "cam-7"})
    except ProtocolError as exc:
        return exc


def test_a_plans_lease_is_refused_exactly_when_the_lease_schema_refuses_it() -> None:
    """lease.schema.json and the SDK (`LeaseInfo`) agree on every lease below: names and the worker URL
    checked against the schema's patterns, a name present as null refused, JSON types strict;
    a refusal names the field. (Unknown fields stay ignored, as in every answer model; a name or
    URL ending in a newline is refused, as JSON Schema's ECMA-262 `$` refuses it, although
    Python's `re.search` reading of the pattern lets it through.)"""
    standin = Standin()
    good_plan = PlanAnswer.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    verdicts = []
    with serve_app_in_thread(standin.app) as base, PlannerClient(base) as c:
        for field, value in LEASE_CHANGES:
            lease = changed(GOOD_LEASE, field, value)
            got = plan_or_error(c, standin, {**good_plan, "lease": lease})
            verdicts.append((LEASE.is_valid(lease), not isinstance(got, ProtocolError)))
            assert verdicts[-1][0] == verdicts[-1][1], (field, value, got)
            if isinstance(got, ProtocolError):
                assert field in got.detail, (field, got.detail)
            else:
                assert got.lease is not None
        assert {v for v, _ in verdicts} == {True, False}
        for lease in ({**GOOD_LEASE, "worker": "http://edge-1:8000\n"}, {**GOOD_LEASE, "device_id": "cam-7\n"}):
            assert isinstance(plan_or_error(c, standin, {**good_plan, "lease": lease}), ProtocolError)
        got = plan_or_error(c, standin, {**good_plan, "lease": {**GOOD_LEASE, "surprise": 1}})
        assert not isinstance(got, ProtocolError) and not LEASE.is_valid({**GOOD_LEASE, "surprise": 1})


def test_a_devices_state_is_refused_exactly_when_the_schema_refuses_it() -> None:
    """`GET /devices/{id}`: the device's names and its lease, as lease.schema.json's
    `$defs/device` has them."""
    standin = Standin()
    good_plan = PlanAnswer.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    good = {"device_id": "cam-7", "model": "tiny", "lease": GOOD_LEASE, "plan": good_plan, "assigned": False}
    docs = [
        good,
        {**good, "device_id": "a/b"},
        {**good, "model": None},
        {**good, "lease": {**GOOD_LEASE, "device_id": None}},
        {**good, "lease": {**GOOD_LEASE, "worker": "edge-1:8000"}},
        {**good, "lease": {**GOOD_LEASE, "replan_after_s": "5"}},
        {**good, "assigned": "true"},
    ]
    with serve_app_in_thread(standin.app) as base, PlannerClient(base) as c:
        for doc in docs:
            standin.answer(json.dumps(doc))
            try:
                accepted = c.device("cam-7").lease.device_id == "cam-7"
            except ProtocolError:
                accepted = False
            assert accepted == DEVICE.is_valid(doc), doc


def test_redirects_are_not_followed_and_the_token_stays_home() -> None:
    elsewhere, home = Standin(), Standin()
    with serve_app_in_thread(elsewhere.app) as other, serve_app_in_thread(home.app) as base:
        home.answer(b"", 307, location=f"{other}/models")
        with PlannerClient(base, "secret-token") as c:
            err = api_error(c.list_models)
        assert err.status == 307 and err.headers["location"] == f"{other}/models"
        assert [r.headers.get("authorization") for r in home.requests] == ["Bearer secret-token"]
        assert elsewhere.requests == []


def test_trace_context_travels() -> None:
    """A given traceparent is sent as is; inside `tracecontext.use(ctx)` calls join ctx's trace;
    otherwise none is sent (the server starts the trace and its sampler decides)."""
    standin = Standin()
    good_plan = PlanAnswer.model_config["json_schema_extra"]["examples"][0]  # type: ignore[index]
    standin.answer(answer_bytes(good_plan))
    given = TraceContext.root().traceparent
    ctx = TraceContext.root()
    with serve_app_in_thread(standin.app) as base, PlannerClient(base) as c:
        c.plan({"model": "m", "bandwidth_mbps": 1.0}, traceparent=given)
        with use(ctx):
            c.plan({"model": "m", "bandwidth_mbps": 1.0})
        c.plan({"model": "m", "bandwidth_mbps": 1.0})
    sent = [r.headers.get("traceparent") for r in standin.requests]
    assert sent[0] == given
    assert parse_traceparent(sent[1]).trace_id == ctx.trace_id  # type: ignore[union-attr]
    assert sent[2] is None
    assert all(r.headers["user-agent"].startswith("dapdee-sdk/") for r in standin.requests)


def test_a_silent_server_times_out_and_a_closed_keep_alive_is_retried_once() -> None:
    with bind_free_socket() as sock:
        sock.listen(8)  # accepts connections (the kernel does), never answers
        silent = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with PlannerClient(silent, timeout=0.3) as c, pytest.raises(TransportError) as err:
            c.healthz()
        assert err.value.timeout

        async def async_call() -> None:
            async with AsyncPlannerClient(silent, timeout=0.3) as ac:
                await ac.healthz()

        with pytest.raises(TransportError) as err:
            asyncio.run(async_call())
        assert err.value.timeout
    with ClosingThenAnsweringServer() as (base, connections):
        with PlannerClient(base) as c:
            assert c.healthz().status == "ok"
        assert connections == [1, 2]  # the first connection was dropped unanswered, the call repeated


class ClosingThenAnsweringServer:
    """A raw HTTP server whose first connection is closed after the request arrives, unanswered
    (as a kept-alive connection the server closed), and whose later ones answer a Health."""

    def __enter__(self) -> tuple[str, list[int]]:
        self.sock = bind_free_socket()
        self.sock.listen(4)
        self.connections: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}", self.connections

    def _serve(self) -> None:
        body = b'{"status": "ok"}'
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n" + body
        for n in (1, 2):
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                self.connections.append(n)
                if n == 2:
                    conn.sendall(answer)
                    conn.shutdown(socket.SHUT_WR)

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        self.thread.join(5)


# ---- async ------------------------------------------------------------------------------------------


def test_async_client_round_trips_and_errors(url: str) -> None:
    g = profiled("sdk_async")

    async def main() -> None:
        async with (
            AsyncPlannerClient(url, TOKENS["admin"], timeout=30.0) as admin,
            AsyncPlannerClient(url, TOKENS["device"], timeout=30.0) as device,
            AsyncPlannerClient(url, TOKENS["worker"], timeout=30.0) as worker,
        ):
            assert (await admin.healthz()).status == "ok" and (await admin.readyz()).ready
            written = await admin.put_graph(g)
            assert written.created and (await device.get_model("sdk_async")).version == written.version
            prof = await admin.upload_profile(g, "phone", "device")
            assert prof.version == written.version + 1
            await admin.put_profile("sdk_async", "gpu", "edge", {n.name: 0.1 for n in g.nodes})
            assert set((await device.list_profiles("sdk_async")).profiles) == {"gpu", "phone"}
            assert "sdk_async" in {m.model for m in (await device.list_models()).models}
            body = PlanRequestBody(model="sdk_async", bandwidth_mbps=1.1, device_tier="phone")
            plans = await asyncio.gather(*(device.plan(body) for _ in range(4)))
            assert len({p.plan_id for p in plans}) == 1
            await worker.heartbeat({"url": "http://127.0.0.1:10", "models": ["sdk_async"], "tier": "gpu", "load": 0.5})
            assert "http://127.0.0.1:10" in {w.url for w in (await device.workers()).workers}
            with pytest.raises(ApiError) as err:
                await device.plan({"model": "sdk_async", "bandwidth_mbps": 1.0, "latency_budget": 5})
            assert err.value.status == 422 and err.value.errors[0]["loc"] == ["body", "latency_budget"]
            with pytest.raises(ApiError) as err:
                await admin.put_graph(g, if_version=written.version)  # stale: the profiles moved it on
            assert err.value.status == 409 and err.value.type == VERSION_CONFLICT
            await admin.delete_profile("sdk_async", "gpu")
            await admin.delete_model("sdk_async")
            with pytest.raises(ApiError) as err:
                await device.get_model("sdk_async")
            assert err.value.status == 404

    asyncio.run(main())
