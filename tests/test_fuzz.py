"""Fuzzing the services.

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
import string
import struct
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error, response_schema_conformance

from dapdee import wire
from tests.conftest import edge_process, proc_rss_kib, serve_app_in_thread

FUZZ_EXAMPLES = int(os.environ.get("DAPDEE_FUZZ_EXAMPLES", "25"))
SLOW_EXAMPLES = FUZZ_EXAMPLES * 10
EDGE_SPEC = "zoo:alexnet?width=0.25"
MODEL = "alexnet"
CHECKS = [not_a_server_error, response_schema_conformance]
HEADER_CHARS = string.ascii_letters + string.digits + "-+._"
RSS_BOUND_KIB = 64 * 1024  # growth allowed over the whole binary fuzzing run (allocator noise)
Record = Callable[[str, object], None]  # pytest's record_property: a junit property per test


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
    from dapdee.planner.app import create_app
    from dapdee.planner.config import Settings

    with serve_app_in_thread(create_app(Settings(redis_url=None))) as url:
        r = httpx.put(f"{url}/models/{MODEL}", json=_small_graph_json(), timeout=30)
        assert r.status_code in (200, 201), r.text
        yield url


@pytest.fixture(scope="module")
def edge_url() -> Iterator[str]:
    """An edge worker app (width-0.25 AlexNet) under uvicorn in a thread."""
    from dapdee.edge_worker.app import create_app
    from dapdee.edge_worker.config import Settings
    from dapdee.models import load_model

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


def fuzz_operation(op: Any, mode: Any, base_url: str, examples: int) -> tuple[int, str | None]:
    """One operation in one generation mode: (requests sent, failure line or None). Hypothesis
    raising Unsatisfiable (it found no case to generate) counts as 0 sent, no failure."""
    sent = 0

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
    except Unsatisfiable:
        return sent, None
    except BaseException as exc:  # hypothesis re-raises the first failing example's error
        return sent, _describe(exc)
    return sent, None


def fuzz_schema(base_url: str, examples: int) -> tuple[dict[str, int], list[str]]:
    """Run schemathesis over every operation of the OpenAPI document at `base_url`/openapi.json,
    positive and negative generation, `examples` examples each, with the checks not_a_server_error
    and response_schema_conformance. Returns (requests sent per "METHOD /path [mode]", failures
    as one line each)."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    counts: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            key = f"{op.method.upper()} {op.path} [{mode.value}]"
            counts[key], failure = fuzz_operation(op, mode, base_url, examples)
            if failure is not None:
                failures.append(f"{key}: {failure}")
    return counts, failures


def negatable(base_url: str) -> set[str]:
    """The "METHOD /path [negative]" keys whose operation has something a negative case can break:
    a request body, or a parameter whose schema is more than a free-form string (a type, bound,
    pattern or enum). Read from the OpenAPI document directly, not from schemathesis."""
    doc = httpx.get(f"{base_url}/openapi.json", timeout=30).json()
    out = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in ("get", "put", "post", "delete", "patch"):
                continue
            params = [p.get("schema", {}) for p in op.get("parameters", [])]
            constrained = [
                sc for sc in params if set(sc) - {"type", "title", "description"} or sc.get("type") != "string"
            ]
            if "requestBody" in op or constrained:
                out.add(f"{method.upper()} {path} [negative]")
    return out


def check_counts(base_url: str, counts: dict[str, int], record: Record) -> None:
    """Every operation got positive cases, every breakable one negative cases; the counts go to the
    test's output and its junit properties."""
    record("fuzz_cases", json.dumps(counts, sort_keys=True))
    print("fuzz cases per operation and mode:", json.dumps(counts, sort_keys=True, indent=1))
    assert counts, "no operations fuzzed"
    zero_positive = [k for k, n in counts.items() if k.endswith("[positive]") and n == 0]
    assert not zero_positive, f"no positive cases for {zero_positive}"
    zero_negative = [k for k in negatable(base_url) if counts.get(k, 0) == 0]
    assert not zero_negative, f"no negative cases for {zero_negative}"


# ---- 1. schema fuzzing -----------------------------------------------------------------------


def test_planner_schema_fuzz(planner_url: str, record_property: Record) -> None:
    """Planner: no 5xx, every answer matches its documented schema."""
    counts, failures = fuzz_schema(planner_url, FUZZ_EXAMPLES)
    assert not failures, "\n".join(failures)
    check_counts(planner_url, counts, record_property)


def test_edge_schema_fuzz(edge_url: str, record_property: Record) -> None:
    """Edge worker: no 5xx, every answer matches its documented schema."""
    counts, failures = fuzz_schema(edge_url, FUZZ_EXAMPLES)
    assert not failures, "\n".join(failures)
    check_counts(edge_url, counts, record_property)


@pytest.mark.slow
def test_schema_fuzz_heavy(planner_url: str, edge_url: str, record_property: Record) -> None:
    for url in (planner_url, edge_url):
        counts, failures = fuzz_schema(url, SLOW_EXAMPLES)
        assert not failures, "\n".join(failures)
        check_counts(url, counts, record_property)


# ---- 2. binary payload fuzzing of v2 infer -----------------------------------------------------


class EdgeTarget:
    """A `dapdee serve edge` subprocess and a client for it."""

    def __init__(self, url: str, pid: int) -> None:
        self.url = url
        self.pid = pid
        self.client = httpx.Client(base_url=url, timeout=30)
        self.infer_path = f"/v2/models/{MODEL}/infer"

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.client.post(self.infer_path, content=body, headers=headers or {})

    def valid(self) -> httpx.Response:
        body, headers = wire.encode_request({"x": torch.randn(1, 3, 32, 32)}, parameters={"exit": "final"})
        return self.post(body, headers)


@pytest.fixture(scope="module")
def edge_proc() -> Iterator[EdgeTarget]:
    """The worker in its own process (so its RSS is its own), 1 torch thread, 1 MiB body limit."""
    with edge_process(
        ["--models", EDGE_SPEC, "--threads", "1", "--max-body-bytes", str(1 << 20), "--batch-max", "1"]
    ) as (url, proc):
        t = EdgeTarget(url, proc.pid)
        for _ in range(5):  # warm-up, so allocator pools exist before the baseline
            assert t.valid().status_code == 200
        yield t
        t.client.close()


def _header(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"inputs": inputs, "parameters": {"exit": "final"}, **extra}


def _binary(header: dict[str, Any], payload: bytes, hlen: int | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    n = len(head) if hlen is None else hlen
    return head + payload, {wire.HEADER_LENGTH: str(n), "Content-Type": wire.BINARY_CONTENT_TYPE}


def _json(header: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(header).encode(), {"Content-Type": "application/json"}


X_BYTES = 3 * 32 * 32 * 4


def _x(**over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    e.update(over)
    return e


def malformed_cases() -> list[tuple[str, bytes, dict[str, str]]]:
    """(label, body, headers) of hand-written malformed infer requests, one per trap."""
    good_body, good_headers = wire.encode_request({"x": torch.randn(1, 3, 32, 32)}, parameters={"exit": "final"})
    hlen = int(good_headers[wire.HEADER_LENGTH])
    payload = torch.randn(X_BYTES // 4).numpy().tobytes()
    nan = struct.pack("<f", float("nan")) * (X_BYTES // 4)
    inf = struct.pack("<f", float("inf")) + payload[4:]
    big = 2**40
    cases: list[tuple[str, bytes, dict[str, str]]] = []
    # truncated bodies (the header still says the original length)
    for cut in (0, 1, hlen // 2, hlen, hlen + 1, hlen + X_BYTES // 2, len(good_body) - 1):
        cases.append((f"truncated@{cut}", good_body[:cut], dict(good_headers)))
    # header length beyond the body, zero, negative, not a number, absurd
    for v in (str(len(good_body) + 1), str(10**17), "0", "-5", "abc", "1e3", "1 2", "9" * 40, "0x10"):
        cases.append((f"header-length={v[:12]}", good_body, {**good_headers, wire.HEADER_LENGTH: v}))
    # binary_data_size: negative, huge, wrong, not an integer
    for size in (-1, -X_BYTES, 2**63, 2**64 + 1, X_BYTES + 4, X_BYTES - 4, 0, 1.5, "12288", True, None, [1]):
        h = _header([_x(parameters={"binary_data_size": size})])
        cases.append((f"binary_data_size={size!r}"[:40], *_binary(h, payload)))
    # shapes whose product overflows int64 / the element bound, negative, malformed
    for shape in (
        [big, big, big],
        [1, 3, big, big],
        [2**62, 2**62],
        [-1, 3, 32, 32],
        [1, -3, -32, 32],
        [2**63],
        [1.0, 3, 32, 32],
        "1,3,32,32",
        [[1], 3],
        [1] * 17,
        [True, 3, 32, 32],
        None,
        [0, 3, 32, 32],
    ):
        h = _header([_x(shape=shape, parameters={"binary_data_size": X_BYTES})])
        cases.append((f"shape={shape!r}"[:40], *_binary(h, payload)))
        cases.append((f"json-shape={shape!r}"[:40], *_json(_header([_x(shape=shape, data=[0.0] * 3072)]))))
    # NaN / Inf, binary and JSON
    cases.append(("binary NaN", *_binary(_header([_x(parameters={"binary_data_size": X_BYTES})]), nan)))
    cases.append(("binary Inf", *_binary(_header([_x(parameters={"binary_data_size": X_BYTES})]), inf)))
    for tok in ("NaN", "Infinity", "-Infinity"):
        data = ",".join([tok] + ["0.0"] * 3071)
        body = ('{"inputs":[{"name":"x","shape":[1,3,32,32],"datatype":"FP32","data":[' + data + "]}]}").encode()
        cases.append((f"json {tok}", body, {"Content-Type": "application/json"}))
    cases.append(("json 1e999", *_json_raw('{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1e999]}]}')))
    # wrong datatypes
    for dt in ("BYTES", "BOOL", "FP8", "fp32", "", 5, None, ["FP32"]):
        h = _header([_x(datatype=dt, parameters={"binary_data_size": X_BYTES})])
        cases.append((f"datatype={dt!r}", *_binary(h, payload)))
    cases.append(("json strings as FP32", *_json(_header([_x(data=["a"] * 3072)]))))
    cases.append(("json ragged data", *_json(_header([_x(data=[[0.0], [0.0, 1.0]])]))))
    cases.append(("json INT64 overflow", *_json(_header([_x(datatype="INT64", data=[2**70] * 3072)]))))
    cases.append(("json wrong element count", *_json(_header([_x(data=[0.0] * 100)]))))
    cases.append(("json data not a list", *_json(_header([_x(data="0.0")]))))
    cases.append(("int8 scale<0", *_json(_header([_x(datatype="INT8", data=[1] * 3072, parameters={"scale": -1})]))))
    cases.append(("fp32 with scale", *_json(_header([_x(data=[1.0] * 3072, parameters={"scale": 2.0})]))))
    cases.append(
        (
            "data and binary",
            *_binary(_header([_x(data=[0.0] * 3072, parameters={"binary_data_size": X_BYTES})]), payload),
        )
    )
    cases.append(("no data", *_json(_header([_x()]))))
    # duplicate input names
    h = _header([_x(parameters={"binary_data_size": X_BYTES}), _x(parameters={"binary_data_size": X_BYTES})])
    cases.append(("duplicate input (binary)", *_binary(h, payload + payload)))
    cases.append(("duplicate input (json)", *_json(_header([_x(data=[0.0] * 3072), _x(data=[0.0] * 3072)]))))
    # JSON headers that are not objects, or not JSON at all
    for hdr in ([], [1, 2], "inputs", 1, None, True, 1.5):
        cases.append((f"header={hdr!r}", *_json(hdr)))
        cases.append((f"binary header={hdr!r}", *_binary(hdr, payload)))  # type: ignore[arg-type]
    for raw in (
        b"",
        b"{",
        b"\xff\xfe\x00",
        b"\x00" * 64,
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        '{"inputs": "\u00e9"}'.encode("utf-16"),
    ):
        cases.append((f"raw {raw[:8]!r}", raw, {"Content-Type": "application/json"}))
    # structure: inputs / names / parameters / outputs / id
    for inputs in (
        None,
        [],
        {},
        "x",
        [1],
        [None],
        [{"shape": [1]}],
        [_x(name="")],
        [_x(name=5)],
        [_x(name="n" * 300, data=[0.0] * 3072)],
        [_x(name="no_such_node", data=[0.0] * 3072)],
        [_x(shape=[1, 3, 16, 16], data=[0.0] * 768)],
        [_x(shape=[1, 1, 32, 32], data=[0.0] * 1024)],
    ):
        cases.append((f"inputs={inputs!r}"[:40], *_json({"inputs": inputs})))
    base = [_x(data=[0.0] * 3072)]
    for extra in (
        {"parameters": []},
        {"parameters": "exit"},
        {"parameters": {"exit": "nope"}},
        {"parameters": {"exit": 5}},
        {"parameters": {"exit": {"a": 1}}},
        {"parameters": {"exit": ["final"]}},
        {"parameters": {"binary_data_output": "yes"}},
        {"id": 5},
        {"id": ["a"]},
        {"outputs": "logits"},
        {"outputs": [{"name": "nope"}]},
        {"outputs": [{"name": 1}]},
        {"outputs": [1]},
        {"outputs": [{"name": "logits", "parameters": {"binary_data_output": 3}}]},
        {"outputs": [{"name": "logits"}] * 65},
    ):
        cases.append((f"{extra!r}"[:40], *_json({"inputs": base, **extra})))
    # trailing bytes, two inputs at different batch sizes, batch zero
    cases.append(("trailing bytes", *_binary(_header([_x(parameters={"binary_data_size": X_BYTES})]), payload + b"zz")))
    return cases


def _raw_http(url: str, head: bytes, body: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to `url`'s host and port (one connection) and return what comes back."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
            if b"\r\n\r\n" in b"".join(chunks):
                break
    return b"".join(chunks)


def test_oversized_body_refused_up_front(edge_proc: EdgeTarget, record_property: Record) -> None:
    """A Content-Length over the limit is answered 413 before the body is sent; a chunked body
    that grows past the limit is cut off with 413 too."""
    path = edge_proc.infer_path
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {64 << 20}\r\n\r\n"
    ).encode()
    answer = _raw_http(edge_proc.url, head, b"{")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    answer = _raw_http(edge_proc.url, head, chunk * 20)  # 1.25 MiB > the 1 MiB limit
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    record_property("fuzz_cases", json.dumps({"binary:oversized": 2}))
    assert edge_proc.valid().status_code == 200


def test_a_request_head_over_its_limit_is_431_before_the_guard(edge_proc: EdgeTarget) -> None:
    """The worker's HTTP protocol bounds the head (dapdee.web.http_head): 431 for a header past
    MAX_HEAD_BYTES, and the worker keeps serving."""
    from dapdee.web.http_head import MAX_HEAD_BYTES

    head = f"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * MAX_HEAD_BYTES}\r\n\r\n".encode()
    answer = _raw_http(edge_proc.url, head, b"")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert edge_proc.valid().status_code == 200


def _json_raw(text: str) -> tuple[bytes, dict[str, str]]:
    return text.encode(), {"Content-Type": "application/json"}


def test_binary_infer_malformed_cases(edge_proc: EdgeTarget, record_property: Record) -> None:
    """Every hand-written malformed request is a 4xx with an `error` message; RSS stays bounded;
    valid requests keep working (checked after each family of traps)."""
    rss0 = proc_rss_kib(edge_proc.pid)
    bad = []
    cases = malformed_cases()
    for label, body, headers in cases:
        try:
            r = edge_proc.post(body, headers)
        except httpx.HTTPError as exc:
            bad.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        ok = 400 <= r.status_code < 500
        if ok:
            try:
                ok = isinstance(r.json().get("error"), str)
            except ValueError:
                ok = False
        if not ok:
            bad.append(f"{label}: HTTP {r.status_code} {r.text[:160]!r}")
    record_property("fuzz_cases", json.dumps({"binary:hand-written": len(cases)}))
    print("hand-written malformed infer requests sent:", len(cases))
    assert len(cases) >= 130, len(cases)  # 130 hand-written cases now: no family may silently vanish
    v = edge_proc.valid()
    assert v.status_code == 200, v.text
    rss1 = proc_rss_kib(edge_proc.pid)
    assert not bad, f"{len(bad)} of {len(cases)} malformed requests not answered 4xx:\n" + "\n".join(bad)
    assert rss1 - rss0 < RSS_BOUND_KIB, f"worker RSS grew {rss1 - rss0} KiB over {len(cases)} cases"


def _fuzz_random(edge_proc: EdgeTarget, examples: int) -> dict[str, int]:
    """Three hypothesis families against the worker; returns the cases each sent."""
    statuses: list[int] = []

    @given(
        body=st.binary(max_size=4096),
        hlen=st.one_of(st.none(), st.integers(0, 5000).map(str), st.text(HEADER_CHARS, min_size=1, max_size=8)),
    )
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def random_bytes(body: bytes, hlen: str | None) -> None:
        headers = {} if hlen is None else {wire.HEADER_LENGTH: hlen}
        r = edge_proc.post(body, headers)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (body[:80], hlen, r.status_code, r.text[:200])

    valid_head = json.dumps(_header([_x(parameters={"binary_data_size": X_BYTES})])).encode()
    payload = torch.randn(X_BYTES // 4).numpy().tobytes()

    @given(
        flips=st.lists(st.tuples(st.integers(0, len(valid_head) - 1), st.integers(0, 255)), min_size=1, max_size=8),
        cut=st.integers(0, X_BYTES - 1),
    )
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def mutated_header(flips: list[tuple[int, int]], cut: int) -> None:
        """A valid binary request with header bytes overwritten and the payload cut short: the
        payload is always short, so no mutation can make it valid."""
        head = bytearray(valid_head)
        for i, b in flips:
            head[i] = b
        r = edge_proc.post(bytes(head) + payload[:cut], {wire.HEADER_LENGTH: str(len(head))})
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (bytes(head)[:120], cut, r.status_code, r.text[:200])

    @given(
        entry=st.fixed_dictionaries(
            {},
            optional={
                "name": st.one_of(st.just("x"), st.text(max_size=8), st.integers()),
                "shape": st.one_of(st.lists(st.integers(-(2**64), 2**64), max_size=20), st.text(max_size=4)),
                "datatype": st.one_of(st.sampled_from([*wire.DATATYPES, "BYTES", "BOOL"]), st.integers()),
                "data": st.lists(
                    st.one_of(st.floats(allow_nan=True), st.integers(-(2**70), 2**70), st.text(max_size=3)),
                    max_size=64,
                ),
                "parameters": st.dictionaries(
                    st.sampled_from(["binary_data_size", "scale", "x"]),
                    st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=3), st.none()),
                ),
            },
        ),
        copies=st.integers(1, 3),
    )
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def random_entries(entry: dict[str, Any], copies: int) -> None:
        """Random tensor entries (at most 64 data values, never the 3072 a valid x needs)."""
        body = json.dumps({"inputs": [entry] * copies}).encode()
        r = edge_proc.post(body, {"Content-Type": "application/json"})
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (body[:200], r.status_code, r.text[:200])

    rss0 = proc_rss_kib(edge_proc.pid)
    counts: dict[str, int] = {}
    for fn in (random_bytes, mutated_header, random_entries):
        n0 = len(statuses)
        fn()
        counts[f"binary:{fn.__name__}"] = len(statuses) - n0
        v = edge_proc.valid()
        assert v.status_code == 200, (fn.__name__, v.text)
    rss1 = proc_rss_kib(edge_proc.pid)
    assert rss1 - rss0 < RSS_BOUND_KIB, f"worker RSS grew {rss1 - rss0} KiB over {len(statuses)} random cases"
    return counts


def _check_random_counts(counts: dict[str, int], examples: int, record: Record) -> None:
    record("fuzz_cases", json.dumps(counts, sort_keys=True))
    print("random infer cases per family:", json.dumps(counts, sort_keys=True))
    # no filters or assumptions: hypothesis runs every example it is asked for (its shrinking
    # phase may add more when a case fails, which fails the test anyway)
    assert set(counts) == {"binary:random_bytes", "binary:mutated_header", "binary:random_entries"}
    assert all(n >= examples for n in counts.values()), counts


def test_binary_infer_random(edge_proc: EdgeTarget, record_property: Record) -> None:
    """Hypothesis: random bytes, bit-flipped binary headers, random tensor entries: all 4xx."""
    _check_random_counts(_fuzz_random(edge_proc, FUZZ_EXAMPLES * 4), FUZZ_EXAMPLES * 4, record_property)


@pytest.mark.slow
def test_binary_infer_random_heavy(edge_proc: EdgeTarget, record_property: Record) -> None:
    _check_random_counts(_fuzz_random(edge_proc, SLOW_EXAMPLES * 4), SLOW_EXAMPLES * 4, record_property)
