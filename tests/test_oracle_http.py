"""POST /plan of a real planner (uvicorn on 127.0.0.1, in-process store) against the independent
oracle of tests/oracle.py, on seeded random DAGs uploaded with PUT /models/{model}."""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dapdee.testing import ServerThread, bind_free_socket
from tests import oracle

N_GRAPHS = 12
REQS_PER_GRAPH = 5


@pytest.fixture(scope="module")
def planner() -> Iterator[httpx.Client]:
    """A planner app with no Redis; a bearer token when its settings take one."""
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    token = secrets.token_urlsafe(16)
    kw: dict[str, Any] = {"redis_url": None}
    headers = {}
    if "api_token" in Settings.model_fields:
        kw["api_token"] = token
        headers["Authorization"] = f"Bearer {token}"
    server = ServerThread(create_app(Settings(**kw)), sock=bind_free_socket("127.0.0.1"), name="planner").start(60)
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
            yield client
    finally:
        server.stop(30)


def test_http_plans_agree_with_oracle(planner: httpx.Client, record_property: Any) -> None:
    rng = random.Random(4242)
    checked = 0
    modes: dict[str, int] = {}
    for i in range(N_GRAPHS):
        g = oracle.random_graph(rng, name=f"oracle-http-{i}")
        r = planner.put(f"/models/{g['model']}", json=g)
        assert r.status_code in (200, 201), r.text
        n = 0
        while n < REQS_PER_GRAPH:
            req = oracle.random_request(rng)
            want = oracle.decide(g, req)
            if want.fragile:
                continue
            resp = planner.post("/plan", json={"model": g["model"], **req.body()})
            assert resp.status_code == 200, resp.text
            plan = resp.json()
            oracle.check_plan(g, plan, req, want)
            assert plan["model"] == g["model"] and plan["approximate"] is False
            modes[plan["mode"]] = modes.get(plan["mode"], 0) + 1
            n += 1
            checked += 1
    record_property("http_oracle_plans_by_mode", json.dumps(modes))
    assert checked == N_GRAPHS * REQS_PER_GRAPH and set(modes) == {"latency", "throughput"}
