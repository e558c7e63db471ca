"""The planner's HTTP contract against real uvicorn servers on 127.0.0.1: roles per route, RFC 9457
problem documents for every error, typed bodies (unknown fields named), status codes and versions,
names, cost-graph caps, finite numbers, limits before parsing (memory bounded), /plan as an
ordinary route, planning off the event loop, the worker URL allow-list and the OpenAPI document."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import os
import select
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import Request
from jsonschema import Draft202012Validator

from dapdee.api.planner import PlanAnswer
from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from dapdee.planner.deps import get_planning
from dapdee.testing import end_process
from tests.conftest import SHARED_REDIS, free_port, proc_rss_kib, serve_app_in_thread, wait_until_ready
from tests.metrics_scrape import parse, value
from tests.test_planner_service import toy_graph
from tests.test_planning_budget import deep_graph

REPO = Path(__file__).resolve().parent.parent
TOKENS = {"admin": "admin-token-0123456789", "device": "device-token-0123456789", "worker": "worker-token-0123456789"}
PROBLEM = Draft202012Validator(json.loads((REPO / "docs" / "schemas" / "problem.schema.json").read_text()))


def role(name: str | None) -> dict[str, str]:
    return {} if name is None else {"Authorization": f"Bearer {TOKENS[name]}"}


def role_settings(**kw: Any) -> Settings:
    """In-process planner settings with one token per role."""
    kw.setdefault("redis_url", None)
    return Settings(admin_token=TOKENS["admin"], device_token=TOKENS["device"], worker_token=TOKENS["worker"], **kw)


@contextmanager
def served(settings: Settings, guard: bool = True) -> Iterator[tuple[httpx.Client, Any]]:
    app = create_app(settings, guard=guard)
    with serve_app_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c, app


@pytest.fixture(scope="module")
def api() -> Iterator[httpx.Client]:
    """A planner with role tokens holding the toy model."""
    with served(role_settings()) as (c, _):
        assert c.put("/models/toy", json=toy_graph(), headers=role("admin")).status_code == 201
        yield c


def assert_problem(r: httpx.Response, status: int, *named: str) -> dict[str, Any]:
    """`r` is a problem document of `status` (valid against docs/schemas/problem.schema.json)
    whose text names each of `named`."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json", r.headers
    doc = r.json()
    errors = [e.message for e in PROBLEM.iter_errors(doc)]
    assert not errors, (errors, doc)
    assert doc["status"] == status
    for word in named:
        assert word in r.text, (word, doc)
    return doc


# ---- roles ---------------------------------------------------------------------------------------


def _routes() -> list[tuple[str, str, Any, set[str]]]:
    """(method, path, body, roles that may call it) for every planner route."""
    beat = {"url": "http://127.0.0.1:9", "models": ["toy"], "tier": "t", "load": 0.1}
    reads = {"admin", "device", "worker"}
    return [
        ("GET", "/models", None, reads),
        ("GET", "/models/toy", None, reads),
        ("GET", "/models/toy/profiles", None, reads),
        ("GET", "/workers", None, reads),
        ("POST", "/plan", {"model": "toy", "bandwidth_mbps": 1.0}, {"device"}),
        ("POST", "/workers/heartbeat", beat, {"worker"}),
        ("PUT", "/models/toy2", toy_graph("toy2"), {"admin"}),
        ("PUT", "/models/toy2/profiles/p", {"kind": "device", "timings_ms": {"stem": 1.0}}, {"admin"}),
        ("DELETE", "/models/toy2/profiles/p", None, {"admin"}),
        ("DELETE", "/models/toy2", None, {"admin"}),
    ]


def test_each_route_admits_exactly_its_roles(api: httpx.Client) -> None:
    """Reads: any role; /plan: device; heartbeat: worker; writes: admin (not a superuser). No
    token or an unknown one: 401 with WWW-Authenticate; another role: 403 naming the one needed."""
    for method, path, body, allowed in _routes():
        for who in (None, "admin", "device", "worker"):
            r = api.request(method, path, json=body, headers=role(who))
            if who is None:
                assert_problem(r, 401, "bearer token")
                assert r.headers["www-authenticate"] == "Bearer"
            elif who in allowed:
                assert r.status_code < 300, (method, path, who, r.text)
            else:
                assert_problem(r, 403, sorted(allowed)[0] if len(allowed) == 1 else "")
        r = api.request(method, path, json=body, headers={"Authorization": "Bearer not-a-token"})
        assert_problem(r, 401, "unknown bearer token")
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert api.get(path).status_code == 200, path


def test_invalid_json_without_a_token_is_401_not_422(api: httpx.Client) -> None:
    """Tokens are checked before the body is parsed."""
    bad = b'{"model": "toy", not json'
    headers = {"content-type": "application/json"}
    assert_problem(api.post("/plan", content=bad, headers=headers), 401)
    assert_problem(api.post("/plan", content=bad, headers={**headers, **role("worker")}), 403, "device")
    assert_problem(api.post("/plan", content=bad, headers={**headers, **role("device")}), 422, "json")
    assert_problem(api.put("/models/toy", content=bad, headers=headers), 401)


def test_a_body_that_is_not_json_gets_the_same_error_on_every_route(api: httpx.Client) -> None:
    """POST /plan parses its body in its own pass; the other typed-body routes through
    FastAPI. A body that is not JSON is the same 422 on each: one `json_invalid` error at the
    body, with the parser's reason."""
    bad = b'{"model": "toy", not json'
    json_type = {"content-type": "application/json"}
    seen = []
    for method, path, who in (
        ("POST", "/plan", "device"),
        ("PUT", "/models/toy2", "admin"),
        ("PUT", "/models/toy/profiles/p", "admin"),
        ("POST", "/workers/heartbeat", "worker"),
    ):
        doc = assert_problem(api.request(method, path, content=bad, headers={**json_type, **role(who)}), 422, "JSON")
        seen.append((doc["detail"], doc["errors"]))
    assert seen[0][1] == [{"loc": ["body"], "msg": seen[0][1][0]["msg"], "type": "json_invalid"}], seen[0]
    assert all(s == seen[0] for s in seen), seen
    assert api.get("/models/toy2", headers=role("admin")).status_code == 404


def test_a_compressed_body_is_415_naming_the_coding_on_every_route(api: httpx.Client) -> None:
    """A gzip body (a valid plan request once inflated) is refused before it is read: 415 naming
    Content-Encoding, `Accept-Encoding: identity`, nothing stored; the same body sent as is works."""
    body = json.dumps({"model": "toy", "bandwidth_mbps": 5.0}).encode()
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    for method, path, who in (("POST", "/plan", "device"), ("PUT", "/models/toy3", "admin")):
        r = api.request(method, path, content=gzip.compress(body), headers={**headers, **role(who)})
        assert_problem(r, 415, "Content-Encoding 'gzip'")
        assert r.headers["accept-encoding"] == "identity"
    assert api.get("/models/toy3", headers=role("admin")).status_code == 404
    ok = api.post("/plan", content=body, headers={"content-type": "application/json", **role("device")})
    assert ok.status_code == 200, ok.text


def test_a_plan_waits_for_a_map_build_no_longer_than_its_budgets() -> None:
    """The first plan of a graph whose map takes seconds to build (past its own budget) is a
    503 plan-budget with Retry-After once the build budget plus the plan budget have passed;
    the build goes on, and the planner keeps answering."""
    with served(role_settings(planmap_build_budget_s=0.3, plan_budget_s=0.2)) as (c, _):
        assert c.put("/models/deep", json=deep_graph("deep"), headers=role("admin")).status_code == 201
        t0 = time.perf_counter()
        r = c.post("/plan", json={"model": "deep", "bandwidth_mbps": 5.0}, headers=role("device"))
        waited = time.perf_counter() - t0
        doc = assert_problem(r, 503, "still being built; retry")
        assert doc["type"] == "urn:dapdee:problem:plan-budget" and r.headers["retry-after"] == "1"
        assert waited < 0.5 + 2.0, waited  # the budgets, plus scheduling on a loaded host
        assert c.get("/healthz").status_code == 200


# ---- problem documents ------------------------------------------------------------------------------


def test_every_error_is_a_problem_document(api: httpx.Client) -> None:
    admin = role("admin")
    assert_problem(api.get("/nowhere", headers=admin), 404, "/nowhere")
    assert_problem(api.get("/nowhere"), 404)
    long = "/" + "x" * 5000  # a path is repeated cut, not whole
    doc = assert_problem(api.get(long, headers=admin), 404, "/xxx")
    assert len(doc["detail"]) < 300 and doc["detail"].endswith("...")
    assert_problem(api.delete("/healthz"), 405, "DELETE")
    assert_problem(api.patch("/models/toy", headers=admin), 405)
    assert_problem(api.get("/models/ghost", headers=admin), 404, "ghost")
    assert_problem(api.post("/plan", json={"model": "ghost", "bandwidth_mbps": 1}, headers=role("device")), 404)
    doc = assert_problem(
        api.post("/plan", json={"model": "toy", "bandwidth_mbps": 0, "device_load": 2}, headers=role("device")),
        422,
        "bandwidth_mbps",
        "device_load",
    )
    assert doc["type"] == "urn:dapdee:problem:validation"
    assert {tuple(e["loc"]) for e in doc["errors"]} == {("body", "bandwidth_mbps"), ("body", "device_load")}
    auth = f"Authorization: Bearer {TOKENS['admin']}\r\n"
    head = f"PUT /models/toy HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {10 << 20}\r\n\r\n".encode()
    status, headers, body = raw_request(str(api.base_url), head)
    assert status == 413 and headers["content-type"] == "application/problem+json"
    assert not list(PROBLEM.iter_errors(json.loads(body)))


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/plan", {"model": "toy", "bandwidth_mbps": 1.0, "min_acc": 0.9}, "min_acc"),
        ("/models/toy/profiles/p", {"kind": "device", "timings_ms": {}, "hardware": "x"}, "hardware"),
        ("/workers/heartbeat", {"url": "http://127.0.0.1:9", "models": [], "tier": "t", "load": 0, "cpu": 1}, "cpu"),
    ],
)
def test_unknown_fields_are_named(api: httpx.Client, path: str, body: dict[str, Any], field: str) -> None:
    who = {"/plan": "device", "/workers/heartbeat": "worker"}.get(path, "admin")
    method = "POST" if path in ("/plan", "/workers/heartbeat") else "PUT"
    doc = assert_problem(api.request(method, path, json=body, headers=role(who)), 422, field)
    assert ["body", field] in [e["loc"] for e in doc["errors"]]
    assert doc["errors"][0]["type"] == "extra_forbidden"


def test_unknown_fields_in_a_cost_graph_are_named(api: httpx.Client) -> None:
    g = toy_graph("toy3")
    g["nodes"][2]["device_msec"] = 1.0
    g["exits"][0]["acc"] = 0.5
    doc = assert_problem(api.put("/models/toy3", json=g, headers=role("admin")), 422, "device_msec", "acc")
    assert {tuple(e["loc"]) for e in doc["errors"]} == {
        ("body", "nodes", 2, "device_msec"),
        ("body", "exits", 0, "acc"),
    }
    assert api.get("/models/toy3", headers=role("admin")).status_code == 404


def test_a_graph_with_null_meta_progressive_and_overheads_is_stored_as_without_them(api: httpx.Client) -> None:
    """DESIGN's cost graph: `meta`, `progressive` and `overheads` absent or null mean none, in the
    library and the schema; the service takes the nulls too, and stores what it would without
    them."""
    g = toy_graph("toy-nulls")
    r = api.put(
        "/models/toy-nulls", json={**g, "meta": None, "progressive": None, "overheads": None}, headers=role("admin")
    )
    assert r.status_code == 201, r.text
    stored = api.get("/models/toy-nulls", headers=role("admin")).json()
    assert not {"meta", "progressive", "overheads"} & set(stored), stored
    assert api.delete("/models/toy-nulls", headers=role("admin")).status_code == 204


LEASED = {"model": "toy", "bandwidth_mbps": 1.0, "device_id": "cam-1", "frame_rate": 10.0}


@pytest.mark.parametrize(
    "method, path, body, errors",
    [
        ("POST", "/plan", {**LEASED, "frame_rate": None}, {("body", "frame_rate"): "device_id"}),
        ("POST", "/plan", {**LEASED, "confidence_exits": True}, {("body", "confidence_exits"): "device_id"}),
        ("POST", "/plan", {**LEASED, "baseline": "dads"}, {("body", "baseline"): "device_id"}),
        (
            "POST",
            "/plan",
            {**LEASED, "frame_rate": None, "baseline": "dads", "confidence_exits": True},
            {
                ("body", "frame_rate"): "device_id",
                ("body", "baseline"): "device_id",
                ("body", "confidence_exits"): "device_id",
            },
        ),
        (
            "POST",
            "/plan",
            {"model": "toy", "bandwidth_mbps": 1.0, "baseline": "dads", "confidence_exits": True},
            {("body", "baseline"): "confidence exits"},
        ),
        (
            "POST",
            "/workers/heartbeat",
            {
                "url": "http://127.0.0.1:9",
                "models": [],
                "tier": "t",
                "load": 0,
                "capacity_ms_per_s": 600.0,
                "nominal_ms_per_s": 500.0,
            },
            {("body", "nominal_ms_per_s"): "capacity_ms_per_s"},
        ),
        (
            "PUT",
            "/models/toy/profiles/p",
            {"kind": "device", "timings_ms": {}, "meta": {"device_request_ms": 1.0, "edge_request_ms": -1}},
            {("body", "meta", "edge_request_ms"): "meta.edge_request_ms"},
        ),
    ],
)
def test_checks_across_fields_name_the_field_to_change(
    api: httpx.Client, method: str, path: str, body: dict[str, Any], errors: dict[tuple[str, ...], str]
) -> None:
    """A check that reads several fields reports, like any other, the path to the field to
    change (POST /plan validates its own body; the other routes through FastAPI), with a message
    naming the field it conflicts with; the detail names the first."""
    who = {"/plan": "device", "/workers/heartbeat": "worker"}.get(path, "admin")
    body = {k: v for k, v in body.items() if v is not None}
    doc = assert_problem(api.request(method, path, json=body, headers=role(who)), 422)
    assert {tuple(e["loc"]): e["type"] for e in doc["errors"]} == dict.fromkeys(errors, "value_error"), doc
    for e in doc["errors"]:
        assert e["loc"][-1] in e["msg"] and errors[tuple(e["loc"])] in e["msg"], e
    assert doc["detail"].startswith(".".join(doc["errors"][0]["loc"]) + ": "), doc


# ---- status codes and versions ------------------------------------------------------------------------


def test_created_replaced_deleted_and_versions(api: httpx.Client) -> None:
    """201 created / 200 replaced / 204 deleted; every change moves the model's version by one
    (in the answer and the ETag); a write with a stale If-Match is 409 and changes nothing."""
    admin = role("admin")
    g = toy_graph("vers")
    r = api.put("/models/vers", json=g, headers=admin)
    assert r.status_code == 201 and r.json()["version"] == 1 and r.headers["etag"] == '"1"'
    assert r.headers["location"] == "/models/vers"
    r = api.put("/models/vers", json=g, headers=admin)  # the same graph: replaced, nothing changed
    assert r.status_code == 200 and not r.json()["created"] and r.json()["version"] == 1
    g["exits"][0]["accuracy"] = 0.7
    r = api.put("/models/vers", json=g, headers=admin)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.headers["etag"] == '"2"'
    assert api.get("/models/vers", headers=admin).headers["etag"] == '"2"'
    # a stale If-Match changes nothing
    g2 = {**g, "exits": g["exits"][:1]}
    doc = assert_problem(api.put("/models/vers", json=g2, headers={**admin, "If-Match": '"1"'}), 409, "version 2")
    assert doc["type"] == "urn:dapdee:problem:version-conflict"
    assert len(api.get("/models/vers", headers=admin).json()["exits"]) == 2
    r = api.put("/models/vers", json=g2, headers={**admin, "If-Match": '"2"'})
    assert r.status_code == 200 and r.json()["version"] == 3
    assert_problem(api.put("/models/vers", json=g, headers={**admin, "If-Match": "3"}), 422, "If-Match")
    # profiles: 201 created, 200 replaced, each change a new version of the model
    p = {"kind": "device", "timings_ms": {"stem": 1.0}}
    r = api.put("/models/vers/profiles/phone", json=p, headers=admin)
    assert r.status_code == 201 and r.json()["version"] == 4 and r.json()["created"] is True
    assert r.json()["stored"] == "memory"  # this planner runs without Redis
    p["timings_ms"]["stem"] = 2.0
    r = api.put("/models/vers/profiles/phone", json=p, headers=admin)
    assert r.status_code == 200 and r.json()["version"] == 5 and r.json()["created"] is False
    summary = next(m for m in api.get("/models", headers=admin).json()["models"] if m["model"] == "vers")
    assert summary["version"] == 5 and summary["profiles"] == {"phone": "device"}
    listed = api.get("/models/vers/profiles", headers=admin)
    assert listed.json()["version"] == 5 and listed.headers["etag"] == '"5"'
    assert listed.json()["profiles"]["phone"]["timings_ms"] == {"stem": 2.0}
    assert_problem(api.delete("/models/vers/profiles/phone", headers={**admin, "If-Match": '"4"'}), 409)
    r = api.delete("/models/vers/profiles/phone", headers=admin)
    assert r.status_code == 204 and r.content == b""
    assert_problem(api.delete("/models/vers/profiles/phone", headers=admin), 404, "phone")
    assert_problem(api.delete("/models/vers", headers={**admin, "If-Match": '"1"'}), 409)
    assert api.delete("/models/vers", headers={**admin, "If-Match": '"6"'}).status_code == 204
    assert_problem(api.delete("/models/vers", headers=admin), 404, "vers")


# ---- names ---------------------------------------------------------------------------------------------


def renamed(graph: dict[str, Any], suffix: str) -> dict[str, Any]:
    """`graph` with every node's name (and the inputs and exits naming it) suffixed."""
    new = {n["name"]: n["name"] + suffix for n in graph["nodes"]}
    nodes = [{**n, "name": new[n["name"]], "inputs": [new.get(i, i) for i in n["inputs"]]} for n in graph["nodes"]]
    return {**graph, "nodes": nodes, "exits": [{**e, "node": new[e["node"]]} for e in graph["exits"]]}


def test_a_profile_is_checked_against_the_stored_graph_not_a_replicas_cache(planner_prefix: str) -> None:
    """Replica b caches the toy graph; replica a replaces it with one whose nodes are renamed.
    Before b refreshes, a profile b receives is checked against the graph its write finds in
    Redis: one for the new graph is stored (201), one for the old graph is 422 naming
    timings_ms, as on a (not a 409 that would send the client to read and retry)."""
    admin = role("admin")
    kw = {"redis_url": SHARED_REDIS, "key_prefix": planner_prefix, "refresh_s": 3600.0}
    with served(role_settings(**kw)) as (a, _), served(role_settings(**kw)) as (b, _):
        old, new = toy_graph(), renamed(toy_graph(), "_v2")
        assert a.put("/models/toy", json=old, headers=admin).status_code == 201
        assert b.get("/models/toy", headers=admin).json()["nodes"][0]["name"] == "stem"  # cached by b
        assert a.put("/models/toy", json=new, headers=admin).status_code == 200

        def profile(graph: dict[str, Any]) -> dict[str, Any]:
            return {"kind": "device", "timings_ms": {n["name"]: 1.0 for n in graph["nodes"]}}

        r = b.put("/models/toy/profiles/phone", json=profile(new), headers=admin)
        assert r.status_code == 201, r.text
        for replica in (b, a):
            assert_problem(replica.put("/models/toy/profiles/tab", json=profile(old), headers=admin), 422, "timings_ms")
    with served(role_settings(**kw)) as (fresh, _):  # what Redis holds
        stored = fresh.get("/models/toy/profiles", headers=admin).json()
        assert sorted(stored["profiles"]) == ["phone"] and stored["version"] == 3


def test_names_must_match_as_a_whole(api: httpx.Client) -> None:
    """A name followed by a newline (`m%0A`) matched `^...$` before; every route refuses it."""
    admin = role("admin")
    before = api.get("/models", headers=admin).json()
    assert_problem(api.put("/models/m%0A", json=toy_graph("m\n"), headers=admin), 422, "model name")
    assert_problem(api.put("/models/m%0A", json=toy_graph("m"), headers=admin), 422, "path")
    assert_problem(api.get("/models/m%0A", headers=admin), 422, "model name")
    assert_problem(api.delete("/models/m%0A", headers=admin), 422, "model name")
    assert_problem(api.get("/models/toy%0A/profiles", headers=admin), 422, "model name")
    profile = {"kind": "device", "timings_ms": {}}
    assert_problem(api.put("/models/toy/profiles/t%0A", json=profile, headers=admin), 422, "tier")
    plan = {"model": "toy\n", "bandwidth_mbps": 1.0}
    assert_problem(api.post("/plan", json=plan, headers=role("device")), 422, "model")
    plan = {"model": "toy", "bandwidth_mbps": 1.0, "device_tier": "a..b"}
    assert_problem(api.post("/plan", json=plan, headers=role("device")), 422, "device_tier")
    beat = {"url": "http://127.0.0.1:9", "models": ["toy\n"], "tier": "t", "load": 0.1}
    assert_problem(api.post("/workers/heartbeat", json=beat, headers=role("worker")), 422, "models")
    assert api.get("/models", headers=admin).json() == before


# ---- cost graphs: caps and bounds ---------------------------------------------------------------------


def _mutations() -> list[tuple[str, Any, str]]:
    """(what, a mutation of the toy graph, a word the 422 must name)."""

    def node(i: int, **kw: Any) -> Any:
        def f(g: dict[str, Any]) -> None:
            g["nodes"][i].update(kw)

        return f

    def wide(g: dict[str, Any]) -> None:  # 40 producers into one node (cap 32)
        g["nodes"][1:1] = [
            {"name": f"w{i}", "op": "c", "inputs": ["stem"], "out_bytes": 1, "device_ms": 0.1, "edge_ms": 0.1}
            for i in range(40)
        ]
        g["nodes"][41]["inputs"] = [f"w{i}" for i in range(40)]

    def many_nodes(g: dict[str, Any]) -> None:
        g["nodes"] += [
            {"name": f"n{i}", "op": "c", "inputs": ["fc"], "out_bytes": 1, "device_ms": 0.1, "edge_ms": 0.1}
            for i in range(200)
        ]

    def many_exits(g: dict[str, Any]) -> None:
        g["exits"] = [{"name": f"e{i}", "node": "fc", "accuracy": None} for i in range(9)]

    return [
        ("out_bytes 2^63", node(2, out_bytes=2**63), "out_bytes"),
        ("out_bytes 2^40+1", node(2, out_bytes=2**40 + 1), "out_bytes"),
        ("flops 2^63", node(2, flops=2**63), "flops"),
        ("timing 1e308", node(3, device_ms=1e308), "device_ms"),
        ("timing just over 1e7", node(3, edge_ms=1.0000001e7), "edge_ms"),
        ("negative bytes", node(0, out_bytes=-1), "out_bytes"),
        ("float bytes", node(0, out_bytes=1.5), "out_bytes"),
        ("bool timing", node(0, device_ms=True), "device_ms"),
        ("node shape", node(0, shape=[2**41]), "shape"),
        ("input bytes", lambda g: g["input"].update(bytes=2**40 + 1), "bytes"),
        ("input shape", lambda g: g["input"].update(shape=[0]), "shape"),
        ("input batch", lambda g: g["input"].update(shape=[2, 3, 32, 32]), "batch and must be 1"),
        ("overheads", lambda g: g.update(overheads={"edge_request_ms": 1e308}), "edge_request_ms"),
        ("accuracy", lambda g: g["exits"][0].update(accuracy=1.5), "accuracy"),
        ("in-degree", wide, "producers exceed the limit of 32"),
        ("nodes", many_nodes, "exceed the limit of 100"),
        ("exits", many_exits, "exceed the limit of 8"),
        ("meta NaN", lambda g: g.update(meta={"x": math.nan}), "meta"),
        # not UTF-8 text: refused by the JSON parser (pydantic-core, as /plan), naming the body
        ("lone surrogate", node(0, op="\ud800"), "JSON"),
    ]


def test_cost_graph_bounds_are_422_at_put_and_nothing_breaks_later() -> None:
    """Each out-of-bounds graph is refused when stored (not a 500 at a later /plan: an out_bytes of
    2^63 used to be stored and make every plan of the model fail); the stored model still plans."""
    with served(role_settings(max_nodes=100, max_exits=8, max_in_degree=32)) as (c, _):
        admin, device = role("admin"), role("device")
        assert c.put("/models/toy", json=toy_graph(), headers=admin).status_code == 201
        stored = c.get("/models/toy", headers=admin).json()
        for what, mutate, word in _mutations():
            g = toy_graph()
            mutate(g)
            body = json.dumps(g, allow_nan=True).encode()
            r = c.put("/models/toy", content=body, headers={**admin, "content-type": "application/json"})
            assert_problem(r, 422, word)
            assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}, headers=device).status_code == 200, (
                what
            )
        assert c.get("/models/toy", headers=admin).json() == stored
        assert c.get("/models/toy", headers=admin).headers["etag"] == '"1"'


def test_profile_bounds(api: httpx.Client) -> None:
    admin = role("admin")
    for body, word in (
        ({"kind": "device", "timings_ms": {"stem": 1e308}}, "timings_ms"),
        ({"kind": "device", "timings_ms": {"stem": 1}, "meta": {"pad": "x" * 70000}}, "meta"),
        ({"kind": "device", "timings_ms": {"stem": "1"}}, "timings_ms"),
    ):
        assert_problem(api.put("/models/toy/profiles/big", json=body, headers=admin), 422, word)
    assert "big" not in api.get("/models/toy/profiles", headers=admin).json()["profiles"]


def _nested(depth: int) -> str:
    """A JSON value nested `depth` objects deep."""
    return '{"a": ' * depth + "1" + "}" * depth


def _with(body: dict[str, Any], field: str, raw: str) -> str:
    """`body` as JSON with `field` set to the raw JSON text `raw`."""
    return json.dumps({**body, field: None}).replace(f'"{field}": null', f'"{field}": {raw}')


def test_deeply_nested_bodies_are_422_naming_the_body_and_change_nothing() -> None:
    """A body nested thousands of levels deep (Python's json: RecursionError, FastAPI's generic
    400) is a 422 validation problem naming the body on every typed-body route, as on /plan; the
    model, its profile and the workers stay as they were, and the planner keeps answering."""
    admin, json_type = role("admin"), {"content-type": "application/json"}
    profile = {"kind": "device", "timings_ms": {"stem": 2.0}, "meta": {"v": 1}}
    beat = {"url": "http://127.0.0.1:9", "models": ["toy"], "tier": "edge", "load": 0}
    with served(role_settings()) as (c, _):
        assert c.put("/models/toy", json=toy_graph(), headers=admin).status_code == 201
        assert c.put("/models/toy/profiles/phone", json=profile, headers=admin).status_code == 201
        before = [c.get(p, headers=admin) for p in ("/models/toy", "/models/toy/profiles", "/workers")]
        deep = _nested(3000)
        for method, path, body, who in (
            ("PUT", "/models/toy", _with(toy_graph(), "meta", deep), admin),
            ("PUT", "/models/toy/profiles/phone", _with(profile, "meta", deep), admin),
            ("POST", "/workers/heartbeat", _with(beat, "models", "[" * 3000 + "]" * 3000), role("worker")),
        ):
            r = c.request(method, path, content=body, headers={**who, **json_type})
            doc = assert_problem(r, 422, "body", "JSON")
            assert doc["type"] == "urn:dapdee:problem:validation" and doc["errors"][0]["loc"] == ["body"], doc
        after = [c.get(p, headers=admin) for p in ("/models/toy", "/models/toy/profiles", "/workers")]
        assert [(r.status_code, r.headers.get("etag"), r.json()) for r in after] == [
            (r.status_code, r.headers.get("etag"), r.json()) for r in before
        ]
        assert after[2].json()["workers"] == [] and c.get("/healthz").status_code == 200
        # nesting within the parser's bound (200 levels, the body's object included) is stored, and read
        r = c.put("/models/toy/profiles/phone", json={**profile, "meta": json.loads(_nested(199))}, headers=admin)
        assert r.status_code == 200, r.text
        assert c.get("/models/toy/profiles", headers=admin).status_code == 200


# ---- numbers in plans ------------------------------------------------------------------------------------


def extreme_graph(model: str, ms: float, nbytes: int, n: int = 60) -> dict[str, Any]:
    """A chain of `n` nodes, every timing `ms` and every size `nbytes` (both at a bound), with an
    exit halfway and one at the end."""
    nodes = [
        {
            "name": f"n{i}",
            "op": "c",
            "inputs": [f"n{i - 1}" if i else "x"],
            "out_bytes": nbytes,
            "flops": 2**63 - 1,
            "device_ms": ms,
            "edge_ms": ms,
        }
        for i in range(n)
    ]
    exits = [
        {"name": "half", "node": f"n{n // 2}", "accuracy": 0.5},
        {"name": "final", "node": f"n{n - 1}", "accuracy": 1.0},
    ]
    return {
        "model": model,
        "input": {"name": "x", "shape": [1], "bytes": nbytes},
        "nodes": nodes,
        "exits": exits,
        "overheads": {"device_request_ms": ms, "edge_request_ms": ms},
    }


def finite_numbers(doc: Any) -> bool:
    if isinstance(doc, float):
        return math.isfinite(doc)
    if isinstance(doc, dict):
        return all(finite_numbers(v) for v in doc.values())
    if isinstance(doc, list):
        return all(finite_numbers(v) for v in doc)
    return True


def test_plans_at_the_bounds_carry_only_finite_numbers(api: httpx.Client) -> None:
    admin, device = role("admin"), role("device")
    assert api.put("/models/huge", json=extreme_graph("huge", 1e7, 2**40), headers=admin).status_code == 201
    assert api.put("/models/free", json=extreme_graph("free", 0.0, 0), headers=admin).status_code == 201
    worst = {"bandwidth_mbps": 1e-3, "rtt_ms": 1e6, "device_load": 0.999999, "edge_load": 0.999999}
    best = {"bandwidth_mbps": 1e6, "latency_budget_ms": 1e7, "frame_rate": 1e5, "min_accuracy": 1.0}
    for model in ("huge", "free"):
        for cond in (worst, best):
            for mode in ("auto", "latency", "throughput"):
                r = api.post("/plan", json={"model": model, "mode": mode, **cond}, headers=device)
                assert r.status_code == 200, r.text
                assert finite_numbers(json.loads(r.text)), r.text  # json.loads accepts NaN/Infinity
                plan = PlanAnswer.model_validate_json(r.content)
                if model == "free":  # nothing takes any time: no finite frame rate
                    assert plan.predicted.bottleneck_ms == 0 and plan.predicted.throughput_fps is None
                else:
                    assert plan.predicted.latency_ms > 1e7 and plan.predicted.throughput_fps is not None


def test_a_calibrated_graph_round_trips(api: httpx.Client) -> None:
    """A trained artifact's cost graph (calibrated `progressive` exits, uint8 frame input) is
    stored and served back unchanged, and plans."""
    from dapdee.models import load_model

    graph = load_model("", weights=REPO / "artifacts" / "fmnist-resnet18").graph
    graph = graph.with_timings("device", {n.name: 0.02 + n.flops / 2e7 for n in graph.nodes})
    graph = graph.with_timings("edge", {n.name: 0.002 + n.flops / 2e8 for n in graph.nodes})
    doc = graph.to_dict()
    assert "progressive" in doc
    r = api.put(f"/models/{graph.model}", json=doc, headers=role("admin"))
    assert r.status_code == 201, r.text
    assert api.get(f"/models/{graph.model}", headers=role("device")).json() == doc
    r = api.post("/plan", json={"model": graph.model, "bandwidth_mbps": 1.1, "rtt_ms": 20.0}, headers=role("device"))
    assert r.status_code == 200, r.text
    assert finite_numbers(json.loads(r.text)) and PlanAnswer.model_validate_json(r.content).model == graph.model


# ---- limits before parsing ------------------------------------------------------------------------------


def raw_request(url: str, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, dict[str, str], bytes]:
    """Send `head`, then `chunks` until the server answers (it may answer before reading them),
    on a new connection; the answer's status, headers and body."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(head)
        return read_answer(s, chunks)


def read_answer(s: socket.socket, chunks: Iterable[bytes] = ()) -> tuple[int, dict[str, str], bytes]:
    """Send `chunks` on the open connection `s` until the server answers, then read the answer:
    (status, headers, body)."""
    for chunk in chunks:
        if select.select([s], [], [], 0)[0]:
            break  # answered already
        try:
            s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            break
    out = b""
    while True:
        head_end = out.find(b"\r\n\r\n")
        if head_end >= 0 and len(out) - head_end - 4 >= _length(out[:head_end]):
            break
        got = s.recv(65536)
        if not got:
            break
        out += got
    head_text, _, body = out.partition(b"\r\n\r\n")
    lines = head_text.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@contextmanager
def planner_subprocess(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`dapdee serve planner` as its own process on a free port (DAPDEE_* from `env` only);
    yields (base URL, process) once /readyz answers; terminates it afterwards."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")} | env
    full_env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "dapdee.cli", "serve", "planner", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", proc, 60, "planner process")
        yield url, proc
    finally:
        end_process(proc, wait_s=15)


def test_a_huge_body_is_refused_before_parsing_and_memory_stays_bounded() -> None:
    """7.7 MiB of `{},{},…` (millions of objects once parsed): 413 from Content-Length before a
    byte is read, and 413 after at most 2 MiB when streamed chunked; the process's RSS barely
    moves and it keeps answering."""
    env = {"DAPDEE_REDIS_URL": "none", "DAPDEE_DEVICE_TOKEN": TOKENS["device"], "DAPDEE_ADMIN_TOKEN": TOKENS["admin"]}
    item = b"{},"
    body = b"[" + item * (int(7.7 * 2**20) // len(item)) + b"{}]"
    with planner_subprocess(env) as (url, proc):
        auth = f"Authorization: Bearer {TOKENS['device']}\r\n"
        warm = f"POST /plan HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 2\r\n\r\n{{}}".encode()
        assert raw_request(url, warm)[0] == 422
        rss0 = proc_rss_kib(proc.pid)
        for _ in range(3):
            head = f"POST /plan HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len(body)}\r\n\r\n".encode()
            status, headers, _ = raw_request(url, head, (body[i : i + 65536] for i in range(0, len(body), 65536)))
            assert status == 413 and headers["content-type"] == "application/problem+json"
            head = f"POST /plan HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n".encode()
            chunks = (b"%x\r\n%s\r\n" % (65536, body[i : i + 65536]) for i in range(0, len(body), 65536))
            assert raw_request(url, head, chunks)[0] == 413
        growth_mib = (proc_rss_kib(proc.pid) - rss0) / 1024
        assert growth_mib < 24, f"RSS grew by {growth_mib:.1f} MiB"  # parsing it would take hundreds
        assert httpx.get(f"{url}/healthz").status_code == 200


# ---- /plan is an ordinary route ---------------------------------------------------------------------------


def test_plan_runs_the_route_dependencies() -> None:
    """Without the guard, POST /plan's own role dependency refuses a worker token (403) before any
    other dependency runs; with the right token its dependencies run (a counting override of
    the planning dependency sees every plan). With the guard, the same counter counts plans too."""

    def counting(calls: list[str]) -> Any:
        async def store(request: Request) -> Any:
            calls.append(request.url.path)
            return request.app.state.planning

        return store

    for guard in (False, True):
        with served(role_settings(), guard=guard) as (c, app):
            calls: list[str] = []
            assert c.put("/models/toy", json=toy_graph(), headers=role("admin")).status_code == 201
            app.dependency_overrides[get_planning] = counting(calls)
            body = {"model": "toy", "bandwidth_mbps": 1.0}
            assert_problem(c.post("/plan", json=body, headers=role("worker")), 403, "device")
            assert_problem(c.post("/plan", json=body), 401)
            assert calls == []
            for _ in range(3):
                assert c.post("/plan", json=body, headers=role("device")).status_code == 200
            assert calls == ["/plan"] * 3


# ---- planning off the event loop ------------------------------------------------------------------------


def parallel_graph(model: str, width: int = 300) -> dict[str, Any]:
    """A stem, `width` parallel nodes and a join: 2^width partitions, so with a small enumeration
    cap its plan map is not exact and each latency plan needs a max-flow."""
    nodes = [{"name": "stem", "op": "c", "inputs": ["x"], "out_bytes": 1000, "device_ms": 1.0, "edge_ms": 0.1}]
    nodes += [
        {
            "name": f"p{i}",
            "op": "c",
            "inputs": ["stem"],
            "out_bytes": 100 + i,
            "device_ms": 0.1 + 0.001 * i,
            "edge_ms": 0.01,
        }
        for i in range(width)
    ]
    nodes.append(
        {
            "name": "join",
            "op": "cat",
            "inputs": [f"p{i}" for i in range(width)],
            "out_bytes": 10,
            "device_ms": 0.5,
            "edge_ms": 0.05,
        }
    )
    return {
        "model": model,
        "input": {"name": "x", "shape": [1, 3], "bytes": 12},
        "nodes": nodes,
        "exits": [{"name": "final", "node": "join", "accuracy": 0.9}],
    }


STORM = 8  # min-cut plans sent at once (each ~0.4 s of max-flow here; 2 plan threads)
STORM_WIDTH = 3000  # the parallel block of their graph
PROBE_TIMEOUT_S = 2.0  # a hang guard; what is checked is the probes' latency against a plan's


async def probe(client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    """`method url` answered within PROBE_TIMEOUT_S. When a stall of the whole (busy) host outlasts
    uvicorn's keep-alive timeout between two probes, the server closes the idle connection just as
    the next request goes out (a ReadError on a reused connection). That race is not what is
    checked, so such a request goes once more, on a new connection, under the same timeout."""
    try:
        return await client.request(method, url, timeout=PROBE_TIMEOUT_S, **kw)
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return await client.request(method, url, timeout=PROBE_TIMEOUT_S, **kw)


def test_min_cut_plans_run_off_the_event_loop() -> None:
    """A storm of plans that each need a max-flow (a 3000-wide parallel block over the enumeration
    cap) runs in the bounded thread pool of a planner process: meanwhile /healthz and an exact
    model's plans keep answering, the median health check in under a quarter of one such plan's
    time (on the event loop, each probe would wait for the plan running there: about one plan's
    time); every storm request ends 200 or 503 (never hangs); /metrics counts the offloaded
    plans, and exact plans stay inline. The planner runs as its own process, as deployed: in this
    process its event loop would share the GIL with the test's client and time its work too."""
    env = {f"DAPDEE_{r.upper()}_TOKEN": TOKENS[r] for r in TOKENS} | {
        "DAPDEE_REDIS_URL": "",
        "DAPDEE_PLANMAP_CAP": "64",
        "DAPDEE_MAX_IN_DEGREE": "4096",
        "DAPDEE_PLAN_BUDGET_S": "60",
        "DAPDEE_PLAN_THREADS": "2",
    }
    with planner_subprocess(env) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        admin, device = role("admin"), role("device")
        assert c.put("/models/wide", json=parallel_graph("wide", STORM_WIDTH), headers=admin).status_code == 201
        assert c.put("/models/toy", json=toy_graph(), headers=admin).status_code == 201
        first = c.post("/plan", json={"model": "wide", "bandwidth_mbps": 1.0, "mode": "latency"}, headers=device)
        assert first.status_code == 200, first.text  # builds the (inexact) plan map
        plan_s = min(_timed_plan(c, {"model": "wide", "bandwidth_mbps": bw, "mode": "latency"}) for bw in (2.0, 3.0))
        assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}, headers=device).status_code == 200

        def offloaded() -> float:
            return value(parse(c.get("/metrics").text), "dapdee_planner_offloaded_plans_total")

        offloaded0 = offloaded()
        assert offloaded0 >= 3  # the three plans of "wide" so far
        statuses, health_s = asyncio.run(_storm_with_probes(url))
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
        assert health_s, "no probe started during the storm"
        assert statistics.median(health_s) < plan_s / 4, (statistics.median(health_s), plan_s, health_s)
        during = offloaded() - offloaded0
        assert statuses.count(200) <= during <= STORM, (during, statuses.count(200))
        for i in range(5):  # exact plan maps answer inline
            assert c.post("/plan", json={"model": "toy", "bandwidth_mbps": 3.0 + i}, headers=device).status_code == 200
        assert offloaded() - offloaded0 == during


def test_fleet_plans_over_a_capped_plan_map_run_under_the_plan_budget() -> None:
    """With a live worker serving the model, `POST /plan` takes the fleet's plan choice (per
    worker, a min-cut for a latency plan over a capped map). It runs on the plan threads under
    the plan budget like a plan without a worker: past a budget of 1 ms it is refused with the
    plan-budget 503, with and without a device id, and an exact model's plan still answers
    inline (not offloaded). (On the event loop the min-cut took its ~0.3 s there,
    every other request waiting, and answered 200 past the budget.)"""
    env = {f"DAPDEE_{r.upper()}_TOKEN": TOKENS[r] for r in TOKENS} | {
        "DAPDEE_REDIS_URL": "",
        "DAPDEE_PLANMAP_CAP": "64",
        "DAPDEE_MAX_IN_DEGREE": "4096",
        "DAPDEE_PLAN_BUDGET_S": "0.001",
        "DAPDEE_WORKER_URL_PATTERN": "http://w[0-9]:1",
        "DAPDEE_REBALANCE_S": "0",
    }
    with planner_subprocess(env) as (url, _), httpx.Client(base_url=url, timeout=60) as c:
        admin, device, worker = role("admin"), role("device"), role("worker")
        assert c.put("/models/wide", json=parallel_graph("wide", STORM_WIDTH), headers=admin).status_code == 201
        assert c.put("/models/toy", json=toy_graph(), headers=admin).status_code == 201
        beat = {"url": "http://w1:1", "models": ["wide", "toy"], "tier": "edge", "load": 0.0}
        assert c.post("/workers/heartbeat", json=beat, headers=worker).status_code == 200
        body = {"model": "wide", "bandwidth_mbps": 1.0, "mode": "latency"}
        c.post("/plan", json=body, headers=device)  # builds the (inexact) plan map, answered or refused
        for extra in ({}, {"device_id": "cam-1", "frame_rate": 10.0}):
            r = c.post("/plan", json={**body, "bandwidth_mbps": 2.0, **extra}, headers=device)
            assert r.status_code == 503, r.text[:300]
            assert r.json()["type"] == "urn:dapdee:problem:plan-budget" and r.headers["retry-after"] == "1"
        offloaded = value(parse(c.get("/metrics").text), "dapdee_planner_offloaded_plans_total")
        assert offloaded >= 1  # the budget may end before a thread takes the plan up
        toy = c.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}, headers=device)
        assert toy.status_code == 200 and toy.json()["edge_worker"] == "http://w1:1"
        assert value(parse(c.get("/metrics").text), "dapdee_planner_offloaded_plans_total") == offloaded


def _timed_plan(c: httpx.Client, body: dict[str, Any]) -> float:
    """Seconds one plan request took, alone (asserting it answered 200)."""
    t0 = time.perf_counter()
    r = c.post("/plan", json=body, headers=role("device"))
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


async def _storm_with_probes(url: str) -> tuple[list[int], list[float]]:
    """STORM min-cut plans sent at once; while any runs, a health check then an exact plan (which
    must answer 200), over and over. Returns the storm's statuses and each health check's seconds."""
    device = role("device")
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, headers=device) as sc,
        httpx.AsyncClient(base_url=url, headers=device) as ac,  # probes never wait for the storm's pool
    ):
        # the probe holds a keep-alive connection, as a monitor would: what is timed is the
        # requests, not the connect
        assert (await probe(ac, "GET", "/healthz")).status_code == 200
        bodies = [{"model": "wide", "bandwidth_mbps": 10.5 + i, "mode": "latency"} for i in range(STORM)]
        tasks = [asyncio.create_task(sc.post("/plan", json=body)) for body in bodies]
        await asyncio.sleep(0.2)  # the storm's requests are in
        health_s: list[float] = []  # each probe starts while min-cut plans are still running
        while not all(t.done() for t in tasks):
            t0 = time.perf_counter()
            assert (await probe(ac, "GET", "/healthz")).status_code == 200
            health_s.append(time.perf_counter() - t0)
            r = await probe(ac, "POST", "/plan", json={"model": "toy", "bandwidth_mbps": 2.0 + len(health_s)})
            assert r.status_code == 200, r.text
        return [(await t).status_code for t in tasks], health_s


def test_a_plan_over_its_budget_is_503_with_retry_after() -> None:
    settings = role_settings(planmap_cap=64, max_in_degree=512, plan_budget_s=0.001, plan_threads=1)
    with served(settings) as (c, app):
        assert c.put("/models/wide", json=parallel_graph("wide", 200), headers=role("admin")).status_code == 201
        deadline = time.monotonic() + 30
        while True:  # on a busy host the map's build may run past its own wait first: also plan-budget
            body = {"model": "wide", "bandwidth_mbps": 1.0, "mode": "latency"}
            r = c.post("/plan", json=body, headers=role("device"))
            doc = assert_problem(r, 503, "budget")
            assert doc["type"] == "urn:dapdee:problem:plan-budget" and r.headers["retry-after"] == "1"
            if app.state.plan_runner.refused >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert app.state.plan_runner.refused >= 1
        assert c.get("/healthz").status_code == 200


# ---- workers -----------------------------------------------------------------------------------------------


def test_worker_urls_must_match_the_allow_list(api: httpx.Client) -> None:
    """Default: loopback http only; a refused heartbeat names the setting and registers nothing."""
    worker = role("worker")
    for url in ("http://127.0.0.1:8000", "http://localhost:8001/", "http://[::1]:8002"):
        beat = {"url": url, "models": ["toy"], "tier": "t", "load": 0.1}
        assert api.post("/workers/heartbeat", json=beat, headers=worker).status_code == 200, url
    for url in (
        "http://10.0.0.7:8000",
        "http://evil.example:8000",
        "https://127.0.0.1:8000",
        "http://127.0.0.1:8000/x",
        "http://127.0.0.1.evil.example:80",
        "http://127.0.0.1:8000@evil.example",
        "ftp://127.0.0.1:21",
    ):
        beat = {"url": url, "models": ["toy"], "tier": "t", "load": 0.1}
        doc = assert_problem(api.post("/workers/heartbeat", json=beat, headers=worker), 422, "url")
        if url.startswith("http"):
            assert "worker_url_pattern" in doc["detail"], doc
    urls = {w["url"] for w in api.get("/workers", headers=worker).json()["workers"]}
    assert {"http://127.0.0.1:8000", "http://localhost:8001", "http://[::1]:8002"} <= urls
    assert not any("evil" in u or "10.0.0.7" in u or u.startswith(("https", "ftp")) for u in urls)
    w = next(w for w in api.get("/workers", headers=worker).json()["workers"] if w["url"].endswith("8000"))
    assert w["capacity_ms_per_s"] == 1000.0 and 0 < w["expires_in_s"] <= 10


def test_a_malformed_worker_url_is_a_422_naming_it(api: httpx.Client) -> None:
    """URLs the parser itself refuses (an unclosed or non-IP bracketed host, a port out of
    range), and ports written so that one worker could have two URLs (0, leading zeros), are a
    422 on `url`, whatever the allow-list; nothing is registered."""
    worker = role("worker")
    for url in ("http://[::1", "http://[zz]:8000", "http://[::1]:99999", "http://127.0.0.1:port"):
        beat = {"url": url, "models": ["toy"], "tier": "t", "load": 0.1}
        doc = assert_problem(api.post("/workers/heartbeat", json=beat, headers=worker), 422, "url")
        assert "not a valid URL" in doc["detail"], doc
    for url in ("http://127.0.0.1:0", "http://127.0.0.1:08000", "http://[::1]:00080"):  # one worker, one URL
        beat = {"url": url, "models": ["toy"], "tier": "t", "load": 0.1}
        doc = assert_problem(api.post("/workers/heartbeat", json=beat, headers=worker), 422, "url")
        assert "without leading zeros" in doc["detail"], doc
    urls = {w["url"] for w in api.get("/workers", headers=worker).json()["workers"]}
    assert not any("99999" in u or "zz" in u or "port" in u or ":0" in u for u in urls)


def test_a_compose_pattern_admits_its_workers() -> None:
    with served(role_settings(worker_url_pattern=r"http://edge-[0-9]+:8000")) as (c, _):
        ok = {"url": "http://edge-1:8000", "models": ["toy"], "tier": "t", "load": 0.1, "capacity_ms_per_s": 4000.0}
        assert c.post("/workers/heartbeat", json=ok, headers=role("worker")).status_code == 200
        bad = {**ok, "url": "http://127.0.0.1:8000"}
        assert_problem(c.post("/workers/heartbeat", json=bad, headers=role("worker")), 422, "worker_url_pattern")
        assert [w["capacity_ms_per_s"] for w in c.get("/workers", headers=role("device")).json()["workers"]] == [4000.0]


# ---- OpenAPI ---------------------------------------------------------------------------------------------------


def test_openapi_types_every_body_answer_and_error(api: httpx.Client) -> None:
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    ref = "#/components/schemas/"
    assert "application/problem+json" in spec["info"]["description"]
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    bodies = {
        ("POST", "/plan"): "PlanRequestBody",
        ("PUT", "/models/{model}"): "CostGraphBody",
        ("PUT", "/models/{model}/profiles/{tier}"): "ProfileBody",
        ("POST", "/workers/heartbeat"): "HeartbeatBody",
    }
    for key, name in bodies.items():
        schema = ops[key]["requestBody"]["content"]["application/json"]["schema"]
        target = schema if "$ref" not in schema else schemas[schema["$ref"].removeprefix(ref)]
        assert target["additionalProperties"] is False and target.get("examples"), (key, name)
    answers = {
        ("POST", "/plan"): "PlanAnswer",
        ("GET", "/models"): "ModelList",
        ("PUT", "/models/{model}"): "ModelWritten",
        ("GET", "/models/{model}"): "CostGraphBody",
        ("GET", "/models/{model}/profiles"): "ProfileList",
        ("PUT", "/models/{model}/profiles/{tier}"): "ProfileWritten",
        ("GET", "/workers"): "WorkerList",
        ("POST", "/workers/heartbeat"): "HeartbeatAnswer",
    }
    for key, name in answers.items():
        ok = ops[key]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": ref + name}, (key, ok)
        assert schemas[name].get("examples"), name
    for key, op in ops.items():
        errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
        assert "4XX" in errors and "5XX" in errors, key
        for r in errors.values():
            assert r["content"] == {"application/problem+json": {"schema": {"$ref": ref + "Problem"}}}, key
        public = key[1] in ("/healthz", "/readyz", "/metrics")
        assert ("security" in op) != public, key
    assert "HTTPValidationError" not in schemas and "errors" in schemas["Problem"]["properties"]
    assert ops[("DELETE", "/models/{model}")]["responses"].get("204")
    assert ops[("PUT", "/models/{model}")]["responses"].get("201")


@pytest.mark.parametrize("fleet", [True, False])
def test_the_edge_load_a_plan_is_priced_at_is_the_one_described(fleet: bool) -> None:
    """Without `edge_load` a plan is priced at the default the field's description states: with
    fleet planning, the load the other devices' leases put on the worker (none here: 0, whatever
    its heartbeat says); with DAPDEE_FLEET_PLANNING=false, the worker's heartbeat load."""
    with served(role_settings(fleet_planning=fleet)) as (c, _):
        spec = c.get("/openapi.json").json()["paths"]["/plan"]["post"]["requestBody"]["content"]
        described = spec["application/json"]["schema"]["properties"]["edge_load"]["description"]
        assert "leases" in described and "nominal_ms_per_s" in described, described
        assert "DAPDEE_FLEET_PLANNING=false" in described and "heartbeat load" in described, described
        assert c.put("/models/toy", json=toy_graph(), headers=role("admin")).status_code == 201
        beat = {"url": "http://127.0.0.1:9", "models": ["toy"], "tier": "t", "load": 0.5}
        assert c.post("/workers/heartbeat", json=beat, headers=role("worker")).status_code == 200
        body = {"model": "toy", "bandwidth_mbps": 1000.0, "mode": "latency"}
        implicit, given = (
            c.post("/plan", json={**body, **load}, headers=role("device")).json()
            for load in ({}, {"edge_load": 0.0 if fleet else 0.5})
        )
        assert implicit["edge_worker"] == "http://127.0.0.1:9" and implicit["edge_nodes"], implicit
        assert implicit["predicted"] == given["predicted"], (implicit, given)


def test_an_open_planner_warns_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="dapdee.planner"):
        with served(Settings(redis_url=None)) as (c, _):
            assert c.put("/models/toy", json=toy_graph()).status_code == 201
    assert any("runs OPEN" in r.getMessage() for r in caplog.records)


def test_serve_refuses_an_open_planner_beyond_loopback() -> None:
    """No token and a non-loopback host: exit 2 before binding, the message names the fix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")} | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "dapdee.cli", "serve", "planner", "--host", "0.0.0.0", "--port", str(free_port())]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "no token is configured" in out.stderr and "--insecure" in out.stderr and "DAPDEE_ADMIN_TOKEN" in out.stderr


def test_a_large_graph_upload_is_checked_as_a_small_one(api: httpx.Client) -> None:
    """A PUT body past PARSE_INLINE_BYTES (parsed off the event loop) answers as a small one:
    201 stored and readable; a bad field a 422 naming it (its `loc` under `body`); a body naming
    another model, or not JSON, a 422 too; and what was stored is unchanged by the refusals."""
    from dapdee.planner.modelstate import PARSE_INLINE_BYTES

    nodes = [{"name": f"n{i}", "op": "conv", "inputs": [f"n{i - 1}" if i else "x"], "out_bytes": 1000 + i,
              "device_ms": 1.0, "edge_ms": 0.1} for i in range(1200)]  # fmt: skip
    graph = {"model": "big", "input": {"name": "x", "shape": [1, 4], "bytes": 16}, "nodes": nodes,
             "exits": [{"name": "final", "node": "n1199", "accuracy": 0.9}]}  # fmt: skip
    assert len(json.dumps(graph)) > PARSE_INLINE_BYTES
    admin = role("admin")
    assert api.put("/models/big", json=graph, headers=admin).status_code == 201
    bad = json.loads(json.dumps(graph))
    bad["nodes"][700]["device_ms"] = -1.0
    doc = assert_problem(api.put("/models/big", json=bad, headers=admin), 422, "device_ms")
    assert ["body", "nodes", 700, "device_ms"] in [e["loc"] for e in doc["errors"]], doc
    assert_problem(api.put("/models/big", json={**graph, "model": "other"}, headers=admin), 422, "model")
    raw = json.dumps(graph).encode()[:-1]
    assert_problem(api.put("/models/big", content=raw, headers={**admin, "Content-Type": "application/json"}), 422)
    stored = api.get("/models/big", headers=admin)
    assert stored.headers["ETag"] == '"1"' and stored.json()["nodes"][700]["device_ms"] == 1.0
    assert api.delete("/models/big", headers=admin).status_code == 204
