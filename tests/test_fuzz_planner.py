"""Hypothesis against a real planner (uvicorn in a thread, in-process store): generated cost graphs,
profiles and plan requests (sizes and numbers at and past the limits, NaN and infinities, unicode
and malformed names, wrong types, unknown fields, garbage bytes). Never a 5xx; every error is a
problem document; every 2xx plan validates against the typed answer and carries finite numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from dapdee.api.planner import PlanAnswer
from dapdee.planner.app import create_app
from dapdee.planner.config import Settings
from tests.conftest import serve_app_in_thread
from tests.test_planner_service import toy_graph

TOKEN = "fuzz-token-0123456789"
PROBLEM = Draft202012Validator(
    json.loads((Path(__file__).resolve().parent.parent / "docs" / "schemas" / "problem.schema.json").read_text())
)
EXAMPLES = 120
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# ---- values at and past the limits ----------------------------------------------------------------

EDGE_FLOATS = [
    0.0,
    -0.0,
    1e-3,
    9.99e-4,
    1e-4,
    5e-324,
    0.5,
    0.999999,
    1.0,
    1e5,
    1e6,
    1.000001e6,
    1e7,
    1.0000001e7,
    1e308,
]
EDGE_INTS = [0, 1, -1, 2**40, 2**40 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63)]
ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.just({}))
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1e7),
    st.sampled_from(EDGE_FLOATS),
    st.integers(-5, 10**8),
)
INTS = st.one_of(st.integers(0, 2**40), st.sampled_from(EDGE_INTS), st.integers(-(2**70), 2**70))
NAMES = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True),
    st.text(max_size=70),
    st.sampled_from(["m\n", "m\r", "..", "a..b", "é", "x" * 64, "x" * 65, "-x", ".x", " ", "a/b", "\ud800", ""]),
)


def sometimes(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], odds: int = 6) -> Any:
    """Mostly a `good` value, one time in `odds` a `bad` one (never when `odds` is 0)."""
    return draw(bad) if odds and draw(st.integers(1, odds)) == 1 else draw(good)


@st.composite
def graph_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(path name, cost graph body): a random DAG of up to 14 nodes, each field sometimes broken."""
    odds = draw(st.sampled_from([0, 0, 40, 12]))  # half the graphs valid, the rest broken here and there
    name = sometimes(draw, st.from_regex(r"g[a-z0-9]{0,6}", fullmatch=True), NAMES, odds)
    n = draw(st.integers(1, 14))
    names = ["x"]
    nodes = []
    for i in range(n):
        node_name = sometimes(draw, st.just(f"n{i}"), st.text(max_size=6) | st.just("\ud800"), odds)
        node = {
            "name": node_name,
            "op": sometimes(draw, st.sampled_from(["conv2d", "relu", "add"]), st.text(max_size=10), odds),
            "inputs": sometimes(
                draw,
                st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True),
                st.lists(NAMES, max_size=3),
                odds,
            ),
            "out_bytes": sometimes(draw, st.integers(0, 2**40), INTS | ODD, odds),
            "flops": sometimes(draw, st.integers(0, 2**63 - 1), INTS | ODD, odds),
            "device_ms": sometimes(draw, st.floats(0, 1e7) | st.just(0.0), FLOATS | ODD, odds),
            "edge_ms": sometimes(draw, st.floats(0, 1e7) | st.just(0.0), FLOATS | ODD, odds),
        }
        if odds and draw(st.integers(0, 2 * odds)) == 0:
            node[draw(st.text(min_size=1, max_size=8))] = 1  # an unknown (or duplicated) field
        nodes.append(node)
        names.append(node_name if isinstance(node_name, str) else f"n{i}")
    exit_nodes = st.sampled_from(names[1:])
    exits = [
        {
            "name": f"e{j}",
            "node": sometimes(draw, exit_nodes, NAMES, odds),
            "accuracy": sometimes(draw, st.none() | st.floats(0, 1), FLOATS | ODD, odds),
        }
        for j in range(draw(st.integers(1, 3)))
    ]
    body: dict[str, Any] = {
        "model": sometimes(draw, st.just(name), NAMES, odds),
        "input": {"name": "x", "shape": sometimes(draw, st.just([1, 3, 8, 8]), st.lists(INTS, max_size=3), odds)},
        "nodes": nodes,
        "exits": exits,
    }
    body["input"]["bytes"] = sometimes(draw, st.integers(0, 2**40), INTS | ODD, odds)
    if draw(st.booleans()):
        body["overheads"] = {
            "device_request_ms": sometimes(draw, st.floats(0, 1e7), FLOATS | ODD, odds),
            "edge_request_ms": draw(st.floats(0, 1e7)),
        }
    if draw(st.booleans()):
        value = sometimes(draw, st.text(max_size=5) | st.floats(-1e300, 1e300), FLOATS | st.just("\ud800"), odds)
        body["meta"] = {draw(st.text(max_size=5)): value}
    return name, body


@st.composite
def plan_bodies(draw: st.DrawFn) -> bytes:
    """A POST /plan body: mostly well-formed, fields at and past their bounds, sometimes garbage."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.binary(max_size=64))
    body: dict[str, Any] = {
        "model": sometimes(draw, st.sampled_from(["toy", "wide", "free"]), NAMES),
        "bandwidth_mbps": sometimes(draw, st.floats(1e-3, 1e6), FLOATS | ODD),
    }
    optional = {
        "rtt_ms": st.floats(0, 1e6),
        "device_load": st.floats(0, 0.999999),
        "edge_load": st.floats(0, 0.999999),
        "latency_budget_ms": st.floats(1e-9, 1e7),
        "min_accuracy": st.floats(0, 1),
        "frame_rate": st.floats(1e-9, 1e5),
        "mode": st.sampled_from(["auto", "latency", "throughput"]),
        "device_tier": st.sampled_from(["phone"]),
    }
    for key, good in optional.items():
        if draw(st.booleans()):
            body[key] = sometimes(draw, good, FLOATS | ODD | NAMES)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(min_size=1, max_size=8))] = 0.5
    return json.dumps(body, allow_nan=True).encode()


# ---- the planner ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planner() -> Iterator[httpx.Client]:
    """An in-process planner with small caps (so they are reached) and three stored models: the
    toy DAG (with a device profile `phone`), a capped wide one and one where nothing takes time."""
    s = Settings(redis_url=None, api_token=TOKEN, max_nodes=12, max_exits=3, max_in_degree=3, planmap_cap=512)
    with serve_app_in_thread(create_app(s)) as url:
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            assert c.put("/models/toy", json=toy_graph()).status_code == 201
            timings = {n["name"]: 1.5 for n in toy_graph()["nodes"]}
            assert (
                c.put("/models/toy/profiles/phone", json={"kind": "device", "timings_ms": timings}).status_code == 201
            )
            wide = toy_graph("wide")
            wide["nodes"] = [{**nd, "inputs": ["x"] if nd["name"] != "fc" else nd["inputs"]} for nd in wide["nodes"]]
            assert c.put("/models/wide", json=wide).status_code == 201
            free = toy_graph("free")
            free["nodes"] = [{**nd, "out_bytes": 0, "device_ms": 0.0, "edge_ms": 0.0} for nd in free["nodes"]]
            free["input"]["bytes"] = 0
            assert c.put("/models/free", json=free).status_code == 201
            yield c


def strict_json(raw: bytes) -> Any:
    """Parse JSON refusing NaN and infinities (which Python's json accepts)."""

    def refuse(token: str) -> Any:
        raise ValueError(f"non-finite number {token} in an answer")

    return json.loads(raw, parse_constant=refuse)


def check_answer(r: httpx.Response) -> None:
    """Never a 5xx; a 4xx is a problem document; JSON answers hold only finite numbers."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert r.headers["content-type"] == "application/problem+json", r.headers
        doc = strict_json(r.content)
        assert not list(PROBLEM.iter_errors(doc)), doc
    elif r.content:
        strict_json(r.content)


def check_plan(r: httpx.Response) -> None:
    check_answer(r)
    if r.status_code == 200:
        plan = PlanAnswer.model_validate_json(r.content)
        fps = plan.predicted.throughput_fps
        # null exactly when the rate has no finite value: nothing takes time (or subnormal timings)
        bottleneck = plan.predicted.bottleneck_ms
        assert (fps is None) == (bottleneck == 0 or math.isinf(1000 / bottleneck)), plan.predicted
        assert all(math.isfinite(v) for v in plan.predicted.model_dump().values() if isinstance(v, float))


def test_fuzz_cost_graphs(planner: httpx.Client) -> None:
    """PUT generated graphs, then plan on every one stored; stored models keep planning."""
    counts = {"put": 0, "stored": 0, "planned": 0}

    @FUZZ
    @given(graph_bodies(), st.floats(1e-3, 1e6), st.sampled_from(["auto", "latency", "throughput"]))
    def one(case: tuple[str, dict[str, Any]], bandwidth: float, mode: str) -> None:
        name, body = case
        raw = json.dumps(body, allow_nan=True).encode()
        path = f"/models/{quote(name, safe='', errors='surrogatepass')}" if name else "/models/%20"
        r = planner.put(path, content=raw, headers={"content-type": "application/json"})
        counts["put"] += 1
        check_answer(r)
        if r.status_code in (200, 201):
            counts["stored"] += 1
            got = planner.get(path)
            check_answer(got)
            assert got.status_code == 200 and got.headers["etag"] == f'"{r.json()["version"]}"', got.text
            p = planner.post("/plan", json={"model": name, "bandwidth_mbps": bandwidth, "mode": mode})
            check_plan(p)
            assert p.status_code in (200, 409), p.text  # 409: a node without timings
            counts["planned"] += p.status_code == 200

    one()
    assert counts["put"] >= EXAMPLES // 2 and counts["stored"] > 0 and counts["planned"] > 0, counts
    assert planner.post("/plan", json={"model": "toy", "bandwidth_mbps": 1.0}).status_code == 200


def test_fuzz_plan_requests(planner: httpx.Client) -> None:
    counts = {"sent": 0, "planned": 0}

    @FUZZ
    @given(plan_bodies())
    def one(raw: bytes) -> None:
        r = planner.post("/plan", content=raw, headers={"content-type": "application/json"})
        counts["sent"] += 1
        check_plan(r)
        counts["planned"] += r.status_code == 200

    one()
    assert counts["sent"] >= EXAMPLES // 2 and counts["planned"] > 0, counts


def test_fuzz_profiles(planner: httpx.Client) -> None:
    counts = {"sent": 0, "stored": 0}
    nodes = [n["name"] for n in toy_graph()["nodes"]]

    @FUZZ
    @given(
        NAMES,
        st.sampled_from(["device", "edge"]) | ODD,
        st.dictionaries(st.sampled_from(nodes) | NAMES, FLOATS | ODD, max_size=6),
        st.dictionaries(st.text(max_size=4), FLOATS | st.text(max_size=4), max_size=3),
    )
    def one(tier: str, kind: Any, timings: dict[str, Any], meta: dict[str, Any]) -> None:
        body = json.dumps({"kind": kind, "timings_ms": timings, "meta": meta}, allow_nan=True).encode()
        path = f"/models/toy/profiles/{quote(tier, safe='', errors='surrogatepass') or '%20'}"
        r = planner.put(path, content=body, headers={"content-type": "application/json"})
        counts["sent"] += 1
        check_answer(r)
        counts["stored"] += r.status_code in (200, 201)
        check_plan(planner.post("/plan", json={"model": "toy", "bandwidth_mbps": 2.0, "device_tier": "phone"}))

    one()
    assert counts["sent"] >= EXAMPLES // 2 and counts["stored"] > 0, counts
