"""The edge worker's secure defaults, against real uvicorn servers on 127.0.0.1 and real torch
models: roles per route (closed unless opened), auth and size limits before any parsing, the
per-model body limit derived from `max_batch_rows`, body read timeouts that hold no slot, the
concurrency limit (503 + Retry-After, health still answering), row caps in requests and
batches, an executor whose memory is its live frontier, finite answers (422, never 500),
registration with the right token per call, and the exposure rule of `dapdee serve edge`.
See docs/THREAT_MODEL.md."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from torch import fx, nn

from dapdee import wire
from dapdee.api.oip import InferResponse
from dapdee.client import ApiError, PlannerClient
from dapdee.costmodel import partition
from dapdee.edge_worker.app import create_app
from dapdee.edge_worker.batching import Batcher
from dapdee.edge_worker.config import Settings
from dapdee.edge_worker.limits import HEADER_BYTES, JSON_VALUE_BYTES
from dapdee.executor import GraphExecutor
from dapdee.models import LoadedModel, load_model
from dapdee.planner.app import create_app as create_planner
from dapdee.planner.config import Settings as PlannerSettings
from dapdee.testing import end_process, free_port, serve_app_in_thread, wait_until_ready
from dapdee.web import scrape
from tests import edge_models

REPO = Path(__file__).resolve().parent.parent
EDGE_SPEC = "zoo:alexnet?width=0.25"
MODEL = "alexnet"
TOKENS = {"admin": "adm-" + "a" * 20, "device": "dev-" + "d" * 20, "worker": "wrk-" + "w" * 20}
BODY_TIMEOUT_S = 1.0


def _auth(role: str | None) -> dict[str, str]:
    return {} if role is None else {"Authorization": f"Bearer {TOKENS.get(role, role)}"}


@pytest.fixture(scope="module")
def alexnet() -> LoadedModel:
    return load_model(EDGE_SPEC)


@pytest.fixture(scope="module")
def edge(alexnet: LoadedModel) -> Iterator[tuple[httpx.Client, FastAPI]]:
    """A worker with the three role tokens, ONE concurrency slot, a 1 s body timeout, serving
    width-0.25 AlexNet and the gated and squares test models."""
    settings = Settings(
        admin_token=TOKENS["admin"],
        device_token=TOKENS["device"],
        worker_token=TOKENS["worker"],
        max_concurrency=1,
        body_timeout_s=BODY_TIMEOUT_S,
        batch_max=4,
    )
    gated = load_model("tests.edge_models:gated", input_shape=(1, 8))
    squares = load_model("tests.edge_models:squares", input_shape=(1, 8))
    app = create_app(settings, [alexnet, gated, squares])
    with serve_app_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, app


def _x_request(rows: int = 1, **kw: Any) -> tuple[bytes, dict[str, str]]:
    return wire.encode_request({"x": torch.randn(rows, 3, 32, 32)}, parameters={"exit": "final"}, **kw)


def _infer(client: httpx.Client, role: str | None, path: str = f"/v2/models/{MODEL}/infer") -> httpx.Response:
    body, headers = _x_request()
    return client.post(path, content=body, headers={**headers, **_auth(role)})


def _metric(client: httpx.Client, name: str, **labels: str) -> float:
    return scrape.total(scrape.parse(client.get("/metrics").text), name, **labels)


def _answer_to_head(url: str, head: bytes) -> bytes:
    """Send only a request head on a fresh connection; what the server answers (a refusal
    that does not wait for the body is one small packet on loopback)."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(head)
        return s.recv(65536)


# ---- roles, before anything is parsed ---------------------------------------------------------


def test_infer_needs_the_device_role_on_both_paths(edge: tuple[httpx.Client, FastAPI]) -> None:
    """401 (WWW-Authenticate: Bearer) without a token or with an unknown one, 403 for the
    admin and worker roles (admin is no superuser), 200 for the device role; OIP error bodies."""
    client, _ = edge
    for path in (f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer"):
        for role, want in ((None, 401), ("nope", 401), ("admin", 403), ("worker", 403), ("device", 200)):
            r = _infer(client, role, path)
            assert r.status_code == want, (path, role, r.text)
            if want != 200:
                assert isinstance(r.json()["error"], str)
            if want == 401:
                assert r.headers["www-authenticate"] == "Bearer"
        r = client.post(path, content=b"x", headers={"Authorization": "Basic " + TOKENS["device"]})
        assert r.status_code == 401


def test_reads_need_any_role_and_health_is_public(edge: tuple[httpx.Client, FastAPI]) -> None:
    client, _ = edge
    reads = ["/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"]
    reads += [f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"]
    for path in reads:
        assert client.get(path).status_code == 401, path
        for role in TOKENS:
            assert client.get(path, headers=_auth(role)).status_code == 200, (path, role)
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v2/models/{model}/infer"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/v2/health/ready"]["get"]


def test_the_fallback_token_grants_every_role(alexnet: LoadedModel) -> None:
    with serve_app_in_thread(create_app(Settings(api_token="all-" + "x" * 20), [alexnet])) as url:
        with httpx.Client(base_url=url) as c:
            body, headers = _x_request()
            auth = {"Authorization": "Bearer all-" + "x" * 20}
            assert c.post(f"/v2/models/{MODEL}/infer", content=body, headers={**headers, **auth}).status_code == 200
            assert c.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers).status_code == 401


def test_both_services_run_open_answer_only_loopback_hosts(alexnet: LoadedModel) -> None:
    """The planner and the edge worker started with no token (loopback, no --insecure) refuse a
    request for another Host (DNS rebinding: 403) and serve one for 127.0.0.1; with --insecure
    (run open on purpose, e.g. on a LAN address) the Host is not checked."""
    apps = [create_app(Settings(), [alexnet]), create_planner(PlannerSettings(redis_url=None))]
    rebound = {"Host": "rebind.attacker.example"}
    for app in apps:
        with serve_app_in_thread(app) as url, httpx.Client(base_url=url) as c:
            path = "/v2/health/ready" if app is apps[0] else "/healthz"
            assert c.get(path, headers=rebound).status_code == 403, path
            assert c.get(path).status_code == 200, path
    with serve_app_in_thread(create_app(Settings(insecure=True), [alexnet])) as url:
        assert httpx.get(f"{url}/v2/health/ready", headers=rebound).status_code == 200


def _deeply_nested(parameter: str, depth: int = 970, pad: int = 300 << 10) -> tuple[bytes, dict[str, str]]:
    """An infer request whose `parameter` is an array nested `depth` deep, padded past the size
    the worker decodes off the event loop (where the recursion headroom is larger)."""
    body, headers = _x_request()
    n = int(headers[wire.HEADER_LENGTH])
    head = json.loads(body[:n])
    head["parameters"] = {}
    nested = f'"parameters": {{"{parameter}": ' + "[" * depth + "]" * depth + "}"
    text = json.dumps(head).replace('"parameters": {}', nested).encode() + b" " * pad
    return text + body[n:], {**headers, wire.HEADER_LENGTH: str(len(text))}


def test_a_deeply_nested_parameter_is_a_400_not_a_500(alexnet: LoadedModel) -> None:
    """`exit` or `confidence` given as an array nested 970 deep, in a body large enough to be
    decoded in a thread: 400 naming the parameter. Before, turning the value into text for the
    message on the event loop (less stack left than the decoding thread) raised RecursionError:
    a 500 and a dropped connection."""
    with serve_app_in_thread(create_app(Settings(), [alexnet])) as url, httpx.Client(base_url=url) as c:
        for parameter in ("exit", "confidence"):
            body, headers = _deeply_nested(parameter)
            r = c.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
            assert r.status_code == 400 and f"parameter {parameter}" in r.json()["error"], r.text[:300]
            assert "a JSON array" in r.json()["error"]
        assert c.get("/v2/health/ready").status_code == 200


def test_a_coding_on_a_second_content_encoding_line_is_refused(edge: tuple[httpx.Client, FastAPI]) -> None:
    """`Content-Encoding: identity` then `Content-Encoding: gzip`: 415 naming the coding, as for
    one line (before, only the first line was read: a gzip body reached the decoder)."""
    client, _ = edge
    body, headers = _x_request()
    raw = [(k, v) for k, v in {**headers, **_auth("device")}.items()]
    raw += [("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]
    r = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=httpx.Headers(raw))
    assert r.status_code == 415 and "gzip" in r.json()["error"], r.text


def test_tokens_and_sizes_are_checked_before_the_body_is_parsed(edge: tuple[httpx.Client, FastAPI]) -> None:
    """A garbage body without a token is a 401, not a 400: the handler never ran (no infer
    request was counted), only the guard's refusal was."""
    client, _ = edge
    before = _metric(client, "dapdee_edge_requests_total")
    refused = _metric(client, "dapdee_edge_rejected_total", reason="unauthenticated")
    r = client.post(f"/v2/models/{MODEL}/infer", content=b"\xff not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 401
    assert _metric(client, "dapdee_edge_requests_total") == before
    assert _metric(client, "dapdee_edge_rejected_total", reason="unauthenticated") == refused + 1


def test_a_request_no_route_takes_is_answered_without_its_body_being_read(edge: tuple[httpx.Client, FastAPI]) -> None:
    """Without a token, requests that only look like an infer (another method, a path under a
    prefix) announce a 200 KB body (over the 64 KiB of other paths, within the model's limit)
    and send none of it: each is answered 404/405 at once with `Connection: close`, rather than
    holding a share of the body buffer while its body trickles in (it used to wait for the body,
    then answer 408)."""
    client, _ = edge
    url = str(client.base_url)
    for method, path, status in (
        ("PUT", f"/v2/models/{MODEL}/infer", b"405"),
        ("GET", f"/v2/models/{MODEL}/infer", b"405"),
        ("POST", f"/x/v2/models/{MODEL}/infer", b"404"),
    ):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {200_000}\r\n\r\n".encode()
        reply = _answer_to_head(url, head)
        assert reply.startswith(b"HTTP/1.1 " + status), (method, path, reply[:200])
        assert b"\r\nconnection: close\r\n" in reply.lower(), (method, path, reply[:300])
    assert _infer(client, "device").status_code == 200


def test_public_routes_answer_without_reading_a_body(edge: tuple[httpx.Client, FastAPI]) -> None:
    """Health, metrics and the docs take no body: without a token, requests to them announcing
    one (within the 64 KiB of other paths) and sending none are answered at once, unread, with
    `Connection: close`, holding no share of the body buffer (read, they filled it, and every
    device's infer got 503)."""
    client, _ = edge
    url = str(client.base_url)
    for method, path, status in (
        ("GET", "/v2/health/live", b"200"),
        ("GET", "/metrics", b"200"),
        ("POST", "/openapi.json", b"405"),
    ):
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {60_000}\r\n\r\n".encode()
        reply = _answer_to_head(url, head)
        assert reply.startswith(b"HTTP/1.1 " + status), (method, path, reply[:200])
        assert b"\r\nconnection: close\r\n" in reply.lower(), (method, path, reply[:300])
    assert _infer(client, "device").status_code == 200


# ---- limits derived from the model -------------------------------------------------------------


def test_the_json_value_bound_covers_every_float64_spelling() -> None:
    """JSON_VALUE_BYTES bounds what one value takes in a JSON body: the longest shortest-repr of
    a float64 (an FP64 tensor's data) plus the ", " separator; random bit patterns and the
    longest known spellings."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**64, 200_000, dtype=np.uint64).view(np.float64)
    values = [float(v) for v in values[np.isfinite(values)]] + [-2.2250738585072014e-308, -1.7976931348623157e308]
    longest = max(len(json.dumps(v)) for v in values)
    assert longest == 24 and longest + len(", ") <= JSON_VALUE_BYTES


def test_body_limit_is_derived_from_rows_and_the_largest_boundary(
    edge: tuple[httpx.Client, FastAPI], alexnet: LoadedModel
) -> None:
    """The metadata states the limits; the per-row bound covers every single node and every cut
    the tests make, and the body limit is max_batch_rows of it as JSON text plus the header."""
    client, _ = edge
    p = client.get(f"/v2/models/{MODEL}", headers=_auth("worker")).json()["parameters"]
    assert p["max_batch_rows"] == 16
    per_row = (p["max_body_bytes"] - HEADER_BYTES) // (16 * JSON_VALUE_BYTES)
    assert p["max_body_bytes"] == HEADER_BYTES + 16 * per_row * JSON_VALUE_BYTES
    g = alexnet.graph
    sizes = {n.name: n.out_bytes // 4 for n in g.nodes if n.shape is not None}
    assert max(sizes.values()) <= per_row <= sum(sizes.values()) + g.input.bytes // 4
    for e in g.exits:
        needed = g.ancestors(e.node)
        for k in range(0, len(needed), 3):
            cut = partition(g, e.name, needed[:k])
            assert sum(b for _, b in cut.transfer) // 4 <= per_row, (e.name, k)
    url = str(client.base_url)
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['device']}\r\n"
        f"Content-Length: {p['max_body_bytes'] + 1}\r\n\r\n"
    ).encode()
    answer = _answer_to_head(url, head)  # no body sent: refused up front
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in answer

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked, counted while streaming
        for _ in range(p["max_body_bytes"] // (1 << 20) + 1):
            yield b" " * (1 << 20)

    r = client.post(f"/v2/models/{MODEL}/infer", content=chunks(), headers=_auth("device"))
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def test_rows_shapes_and_value_counts_are_bounded(edge: tuple[httpx.Client, FastAPI], alexnet: LoadedModel) -> None:
    client, _ = edge
    path = f"/v2/models/{MODEL}/infer"
    dev = _auth("device")

    def post(body: bytes, headers: dict[str, str]) -> httpx.Response:
        return client.post(path, content=body, headers={**headers, **dev})

    r = post(*_x_request(16))
    assert r.status_code == 200, r.text
    assert wire.decode_response(r.content, r.headers).parameters["batch_rows"] == 16
    r = post(*_x_request(17))
    assert r.status_code == 413 and "max_batch_rows=16" in r.json()["error"]
    # a huge row count declared in the header is refused before any data is read
    head = json.dumps({"inputs": [{"name": "x", "shape": [10**9, 3, 32, 32], "datatype": "UINT8"}]}).encode()
    r = post(head, {wire.HEADER_LENGTH: str(len(head))})
    assert r.status_code == 413 and "rows exceed" in r.json()["error"]
    # per-sample shapes must be the traced ones, and all inputs the same rows
    r = post(*wire.encode_request({"x": torch.randn(1, 3, 64, 64)}))
    assert r.status_code == 400 and "[batch, 3, 32, 32]" in r.json()["error"]
    first = next(n for n in alexnet.graph.nodes if n.shape is not None)
    both = {"x": torch.randn(2, 3, 32, 32), first.name: torch.randn(1, *first.shape[1:])}
    r = post(*wire.encode_request(both))
    assert r.status_code == 400 and "differs" in r.json()["error"]
    # a JSON body under the byte limit that holds far more values than a request may carry
    bomb = b'{"inputs":[{"name":"x","shape":[1,3,32,32],"datatype":"FP32","data":[' + b"0," * 1_000_000 + b"0]}]}"
    r = post(bomb, {"Content-Type": "application/json"})
    assert r.status_code == 413 and "tensor values" in r.json()["error"]
    assert post(*_x_request(1)).status_code == 200


def test_the_batcher_never_concatenates_past_max_rows() -> None:
    """Requests queued together are grouped by count: never more than `max_rows` rows or
    `batch_max` requests in one computation, and every caller gets its own rows back."""
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3)))
    ex = GraphExecutor(gm)
    target = list(ex.nodes)[-1]
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(8)]

    async def scenario(batch_max: int, max_rows: int) -> tuple[list[tuple[int, int]], list[Any]]:
        groups: list[tuple[int, int]] = []
        batcher = Batcher(batch_max, 10_000.0, max_rows, workers=1)  # the wait never ends a batch here
        try:
            key = ("m", frozenset("x"), "f")
            results = await asyncio.gather(*(batcher.submit(key, ex, target, {ex.placeholders[0]: x}) for x in xs))
        finally:
            batcher.close()
        for r in results:
            groups.append((r.batch_size, r.batch_rows))
        return groups, results

    groups, results = asyncio.run(scenario(batch_max=8, max_rows=16))
    assert [g for g in groups] == [(3, 15)] * 6 + [(2, 10)] * 2
    for x, r in zip(xs, results, strict=True):
        with torch.inference_mode():
            assert torch.allclose(r.output, gm(x), atol=1e-6)
    groups, _ = asyncio.run(scenario(batch_max=2, max_rows=16))
    assert groups == [(2, 10)] * 8
    with pytest.raises(ValueError, match="batch limit"):
        asyncio.run(scenario(batch_max=8, max_rows=4))


class _Step(nn.Module):
    """Records how many outputs of earlier steps are still alive when it runs."""

    def __init__(self, alive: list[weakref.ref], seen: list[int]) -> None:
        super().__init__()
        self.alive, self.seen = alive, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sum(1 for r in self.alive if r() is not None))
        out = x * 2 + 1
        self.alive.append(weakref.ref(out))
        return out


class _StepTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _Step) or super().is_leaf_module(m, qualname)


def test_the_executor_keeps_only_the_live_frontier() -> None:
    """On a 12-step chain, every step sees only its own input alive, plus a requested target
    once computed (intermediates are dropped after their last reader; keeping them all would
    show k alive at step k)."""
    alive: list[weakref.ref] = []
    seen: list[int] = []
    chain = nn.Sequential(*(_Step(alive, seen) for _ in range(12)))
    gm = fx.GraphModule(chain, _StepTracer().trace(chain))
    ex = GraphExecutor(gm)
    names = list(ex.nodes)
    x = torch.randn(2, 3)
    with torch.inference_mode():
        out = ex.compute({names[0]: x}, [names[3], names[-1]])
    # step k sees its input (k >= 1) and, once computed, the kept target (step 2's output)
    assert seen == [0, 1, 1, 1] + [2] * 8, seen
    assert torch.allclose(out[names[-1]], chain(x)) and torch.allclose(out[names[3]], chain[:3](x))


# ---- slots, timeouts and overload ----------------------------------------------------------------


def test_a_slow_upload_gets_408_and_holds_no_slot(edge: tuple[httpx.Client, FastAPI]) -> None:
    """With ONE slot, a client trickling its body does not block anyone: a normal infer is
    answered meanwhile, and the slow one gets 408 once the body timeout has passed."""
    client, _ = edge
    u = urlsplit(str(client.base_url))
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKENS['device']}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"in'.encode()
        )
        assert _infer(client, "device").status_code == 200  # the one slot is free
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"not received within" in reply
    assert _metric(client, "dapdee_edge_rejected_total", reason="timeout") >= 1


def test_past_the_concurrency_limit_503_with_retry_after_and_health_answers(
    edge: tuple[httpx.Client, FastAPI],
) -> None:
    """A request held inside the gated model takes the one slot: the next gets 503 with
    Retry-After and an OIP error, probes and metrics still answer, and once the held request
    finishes the worker serves again."""
    client, _ = edge
    body, headers = wire.encode_request({"x": torch.randn(1, 8)})
    held: list[httpx.Response] = []
    edge_models.GATE.clear()
    edge_models.ENTERED.clear()
    try:
        t = threading.Thread(
            target=lambda: held.append(
                client.post("/v2/models/gated/infer", content=body, headers={**headers, **_auth("device")})
            )
        )
        t.start()
        assert edge_models.ENTERED.wait(30)
        r = _infer(client, "device")
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/health/live").status_code == 200
        assert _metric(client, "dapdee_edge_inflight_requests") == 1
    finally:
        edge_models.GATE.set()
    t.join(30)
    assert held and held[0].status_code == 200, held
    assert _infer(client, "device").status_code == 200


# ---- answers are well-typed and finite ------------------------------------------------------------


def test_non_finite_outputs_are_422_never_500(edge: tuple[httpx.Client, FastAPI]) -> None:
    """A finite FP32 input of 3e38 overflows the `squares` test model (x·x = inf, whatever its
    weights) to non-finite logits: JSON or binary, the answer is 422 naming the output, and the
    worker keeps serving."""
    client, _ = edge
    x = torch.full((2, 8), 3e38)
    for binary in (False, True):
        body, headers = wire.encode_request({"x": x}, binary=binary, binary_output=binary)
        r = client.post("/v2/models/squares/infer", content=body, headers={**headers, **_auth("device")})
        assert r.status_code == 422, r.text
        assert "output 'logits'" in r.json()["error"] and "not finite" in r.json()["error"]
    r = _infer(client, "device")
    assert r.status_code == 200


def test_answer_fields_are_typed_and_finite(edge: tuple[httpx.Client, FastAPI]) -> None:
    client, _ = edge
    body, headers = _x_request(3, binary_output=False)
    r = client.post(f"/v2/models/{MODEL}/infer", content=body, headers={**headers, **_auth("device")})
    answer = InferResponse.model_validate_json(r.content)  # finite, non-negative numbers
    p = answer.parameters
    assert p.exit == "final" and p.batch_rows >= 3 and p.queue_ms >= 0 and p.compute_ms >= 0
    assert answer.model_version == "1" and [o.name for o in answer.outputs] == ["logits", "class"]


# ---- names, paths and CORS (moved from tests/test_security.py) ----------------------------------


def test_unknown_model_names_and_versions_are_404(edge: tuple[httpx.Client, FastAPI]) -> None:
    client, _ = edge
    for name in ("..%2F..%2Fetc%2Fpasswd", "x" * 300, "%00", "alexnet.."):
        r = client.get(f"/v2/models/{name}", headers=_auth("worker"))
        assert r.status_code == 404, (name, r.text)
        assert len(r.text) < 600  # long names are shortened in the message
    for path in (f"/v2/models/{MODEL}/versions/2", f"/v2/models/{MODEL}/versions/2/ready"):
        r = client.get(path, headers=_auth("worker"))
        assert r.status_code == 404 and "version" in r.json()["error"]
    body, headers = _x_request()
    r = client.post(f"/v2/models/{MODEL}/versions/7/infer", content=body, headers={**headers, **_auth("device")})
    assert r.status_code == 404 and "'1'" in r.json()["error"]


def test_profile_cache_paths_stay_inside_the_cache(tmp_path: Path) -> None:
    """The only place a model name meets the file system (the edge's profile cache) uses names
    that passed check_model_name, so the path never leaves the cache directory."""
    from dapdee.edge_worker.registration import profile_path
    from dapdee.models import check_model_name

    for name in ("resnet18", "vgg16.v2", "a-b_c"):
        p = profile_path(str(tmp_path), check_model_name(name), "edge").resolve()
        assert p.parent == tmp_path.resolve()


def test_cors_is_off(edge: tuple[httpx.Client, FastAPI]) -> None:
    """No Access-Control-Allow-* header on a cross-origin request or a preflight."""
    client, _ = edge
    origin = {"Origin": "http://evil.example"}
    pre = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    for r in (
        client.get(f"/v2/models/{MODEL}", headers={**origin, **_auth("worker")}),
        client.options(f"/v2/models/{MODEL}/infer", headers=pre),
    ):
        assert not any(h.lower().startswith("access-control-allow") for h in r.headers), dict(r.headers)


# ---- registration tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("with_admin", [True, False])
def test_registration_uses_the_admin_token_and_heartbeats_the_worker_token(
    alexnet: LoadedModel, with_admin: bool
) -> None:
    """Against a real planner holding the same role tokens (admin is no superuser there, so a
    call made with the wrong token is refused and leaves no trace): graph and profile arrive
    only with the admin token, heartbeats with the worker token either way."""
    roles = {f"{r}_token": TOKENS[r] for r in ("admin", "device", "worker")}
    with (
        serve_app_in_thread(create_planner(PlannerSettings(redis_url=None, **roles))) as purl,
        PlannerClient(purl, TOKENS["device"]) as reader,
    ):
        settings = Settings(
            planner_url=purl,
            heartbeat_s=0.1,
            profile=False,
            admin_token=TOKENS["admin"] if with_admin else None,
            worker_token=TOKENS["worker"],
            device_token=TOKENS["device"],
            workers=2,
        )
        app = create_app(settings, [alexnet])
        with serve_app_in_thread(app):
            assert wait_until(lambda: app.state.worker.registration.get("heartbeats", 0) >= 2)
            (worker,) = reader.workers().workers
            assert worker.url == f"http://{settings.host}:{settings.port}"  # its public URL
            assert worker.capacity_ms_per_s == 2000.0  # 1000 per compute thread
            if with_admin:
                assert wait_until(lambda: "alexnet" in app.state.worker.registration["registered"])
                assert reader.get_model(MODEL).graph.structure_key() == alexnet.graph.structure_key()
                with PlannerClient(purl, TOKENS["admin"]) as admin:  # the planner loses the model
                    admin.delete_model(MODEL)
                assert wait_until(lambda: MODEL in {m.model for m in reader.list_models().models})
                assert app.state.worker.registration["registered"] == ["alexnet"]  # listed once
            else:
                with pytest.raises(ApiError) as err:  # registering needs the admin token: heartbeats only
                    reader.get_model(MODEL)
                assert err.value.status == 404
                assert app.state.worker.registration["registered"] == []


def wait_until(condition: Any, timeout_s: float = 30.0) -> bool:
    """Poll `condition()` every 50 ms until true (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ---- exposure of `dapdee serve edge` ---------------------------------------------------------------


def test_serve_refuses_an_open_non_loopback_host(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from dapdee.cli import main

    for var in list(os.environ):
        if var.startswith("DAPDEE_"):
            monkeypatch.delenv(var)
    assert main(["serve", "edge", "--host", "0.0.0.0", "--models", EDGE_SPEC, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--insecure" in err and "DAPDEE_DEVICE_TOKEN" in err


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            out.add(local.split(":")[0])
    return out


def test_serve_runs_open_on_loopback_only_with_a_warning(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAPDEE_")}
    log = tmp_path / "edge.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dapdee.cli", "serve", "edge", "--port", str(port), "--models", EDGE_SPEC],
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, 90, "edge worker")
        assert _listening(port) == {"0100007F"}  # 127.0.0.1 only
        assert "runs OPEN on loopback only" in log.read_text()
        body, headers = _x_request()
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert r.status_code == 200  # open: no token needed
    finally:
        end_process(proc, wait_s=15)
