"""Fuzzing the services (issue 10).

1. Schema fuzzing with schemathesis: every operation of the planner's and the edge worker's
   OpenAPI documents (fetched from /openapi.json of live uvicorn servers on 127.0.0.1) gets
   generated requests, valid and invalid; no answer may be a 5xx and every answer must match
   its documented schema. CI: FUZZ_EXAMPLES examples per operation; `slow`: 10x that.
2. Binary payload fuzzing of the edge worker's v2 infer, against a `dapdee serve edge`
   subprocess: truncated bodies, header lengths beyond the body, negative / huge
   binary_data_size, shapes whose product overflows, NaN/Inf, wrong datatypes, duplicate input
   names, non-object JSON headers, random bytes (hypothesis). Every case must be a 4xx, the
   worker's RSS must stay within a bound, and the next valid request must succeed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, response_schema_conformance

from dapdee import wire
from tests.conftest import edge_process, proc_rss_kib, serve_app_in_thread

FUZZ_EXAMPLES = int(os.environ.get("DAPDEE_FUZZ_EXAMPLES", "25"))
SLOW_EXAMPLES = FUZZ_EXAMPLES * 10
EDGE_SPEC = "zoo:alexnet?width=0.25"
MODEL = "alexnet"
CHECKS = [not_a_server_error, response_schema_conformance]
RSS_BOUND_KIB = 64 * 1024  # growth allowed over the whole binary fuzzing run (allocator noise)
FUZZ_COUNTS: dict[str, int] = {}  # cases sent per family (reported at the end of the module)


def _count(family: str, n: int = 1) -> None:
    FUZZ_COUNTS[family] = FUZZ_COUNTS.get(family, 0) + n


# ---- servers ---------------------------------------------------------------------------------


def _small_graph_json() -> dict[str, Any]:
    """The width-0.25 AlexNet's cost graph with both tiers' timings (so /plan can answer 200)."""
    from dapdee.models import load_model

    g = load_model(EDGE_SPEC).graph
    g = g.with_timings("device", {n.name: 1.0 for n in g.nodes}, None)
    g = g.with_timings("edge", {n.name: 0.1 for n in g.nodes}, None)
    return g.to_dict()


@pytest.fixture(scope="module")
def planner_url() -> Iterator[str]:
    """A planner (in-process store) on a free port, holding one model with timings."""
    from services.planner.app import create_app
    from services.planner.config import Settings

    with serve_app_in_thread(create_app(Settings(redis_url=None))) as url:
        r = httpx.put(f"{url}/models/{MODEL}", json=_small_graph_json(), timeout=30)
        assert r.status_code == 200, r.text
        yield url


@pytest.fixture(scope="module")
def edge_url() -> Iterator[str]:
    """An edge worker app (width-0.25 AlexNet) under uvicorn in a thread."""
    from dapdee.models import load_model
    from services.edge_worker.app import create_app
    from services.edge_worker.config import Settings

    app = create_app(Settings(models=EDGE_SPEC, batch_max=4, max_body_bytes=1 << 20), [load_model(EDGE_SPEC)])
    with serve_app_in_thread(app) as url:
        yield url


def _describe(exc: BaseException) -> str:
    """One line per failure of a schemathesis FailureGroup (title, status, reproduction)."""
    subs = getattr(exc, "exceptions", None) or [exc]
    parts = []
    for e in subs:
        title = getattr(e, "title", type(e).__name__)
        parts.append(f"{title}: {' '.join(str(e).split())[:300]}")
    text = " ".join(str(exc).split())
    repro = text[text.find("curl ") :][:400] if "curl " in text else ""
    return " | ".join(parts) + (f" | {repro}" if repro else "")


def fuzz_schema(base_url: str, examples: int) -> tuple[int, list[str]]:
    """Run schemathesis over every operation of the OpenAPI document at `base_url`/openapi.json,
    positive and negative generation, `examples` examples each, with the checks not_a_server_error
    and response_schema_conformance. Returns (requests sent, failures as one line each)."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    sent = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate],
                database=None,
                derandomize=True,
            )
            def run(case: Any) -> None:
                nonlocal sent
                sent += 1
                case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)

            try:
                run()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # hypothesis re-raises the first failing example's error
                failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {_describe(exc)}")
    return sent, failures


# ---- 1. schema fuzzing -----------------------------------------------------------------------


def test_planner_schema_fuzz(planner_url: str) -> None:
    """Planner: no 5xx, every answer matches its documented schema."""
    sent, failures = fuzz_schema(planner_url, FUZZ_EXAMPLES)
    _count("schema:planner", sent)
    assert not failures, "\n".join(failures)


def test_edge_schema_fuzz(edge_url: str) -> None:
    """Edge worker: no 5xx, every answer matches its documented schema."""
    sent, failures = fuzz_schema(edge_url, FUZZ_EXAMPLES)
    _count("schema:edge", sent)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_schema_fuzz_heavy(planner_url: str, edge_url: str) -> None:
    failures = fuzz_schema(planner_url, SLOW_EXAMPLES)[1] + fuzz_schema(edge_url, SLOW_EXAMPLES)[1]
    assert not failures, "\n".join(failures)
