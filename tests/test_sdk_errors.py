"""The SDK's error classes at the edges of the contract, sync and async alike, against a stand-in
HTTP server on 127.0.0.1 sending the bytes a broken service or proxy might: JSON nested too deep,
a non-numeric `Retry-After` (an HTTP-date one reads as seconds from now), an HTML 503 on
`/readyz`, a 200 where 204 is the answer, a 0-row infer. Base URLs, tokens and headers the SDK
must refuse are RequestErrors when the client is built, before anything is sent."""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import pytest
import torch

from dapdee.api.planner import LEASE_EXAMPLE, PLAN_EXAMPLE
from dapdee.client import (
    ApiError,
    AsyncEdgeClient,
    AsyncPlannerClient,
    EdgeClient,
    PlannerClient,
    ProtocolError,
    RequestError,
)
from dapdee.client.errors import retry_after_seconds
from dapdee.testing import serve_app_in_thread
from tests.standin import Standin

DEEP = b"[" * 100_000 + b"]" * 100_000
Sync = type[PlannerClient] | type[EdgeClient]
Async = type[AsyncPlannerClient] | type[AsyncEdgeClient]


@pytest.fixture(scope="module")
def standin_url() -> Iterator[tuple[Standin, str]]:
    standin = Standin()
    with serve_app_in_thread(standin.app) as base:
        yield standin, base


def raised_both(sync: Sync, aio: Async, base: str, method: str, *args: Any, **kw: Any) -> list[BaseException]:
    """What `method(*args, **kw)` raises on the sync client and on the async one (each must
    raise something)."""
    got: list[BaseException] = []
    with sync(base) as client:
        try:
            getattr(client, method)(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 - the test judges the class
            got.append(exc)

    async def run() -> None:
        async with aio(base) as client:
            await getattr(client, method)(*args, **kw)

    try:
        asyncio.run(run())
    except BaseException as exc:  # noqa: BLE001 - the test judges the class
        got.append(exc)
    assert len(got) == 2, f"{method}: expected both clients to raise, got {got}"
    return got


def planner_raises(base: str, method: str, *args: Any) -> list[BaseException]:
    return raised_both(PlannerClient, AsyncPlannerClient, base, method, *args)


# ---- 1. JSON nested too deep ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 500])
def test_json_nested_too_deep_is_a_protocol_or_api_error(standin_url: tuple[Standin, str], status: int) -> None:
    standin, base = standin_url
    standin.answer(DEEP, status, etag='"1"')
    for method, args in (("get_model", ("m1",)), ("healthz", ()), ("list_models", ())):
        for exc in planner_raises(base, method, *args):
            want = ProtocolError if status == 200 else ApiError
            assert isinstance(exc, want), f"{method} {status}: {exc!r}"
            assert exc.status == status
            if isinstance(exc, ApiError):
                assert exc.detail.startswith("[[[")  # the body as text, not a parse


# ---- 2. Retry-After that is not ASCII digits ------------------------------------------------------


@pytest.mark.parametrize(("header", "seconds"), [("\xb2", None), ("7", 7.0), ("1.5", None), ("soon", None)])
def test_retry_after_is_read_only_from_ascii_digits(
    standin_url: tuple[Standin, str], header: str, seconds: float | None
) -> None:
    standin, base = standin_url
    standin.answer(b"{}", 503, retry_after=header)
    for exc in planner_raises(base, "healthz"):
        assert isinstance(exc, ApiError) and exc.status == 503
        assert exc.headers["retry-after"] == header
        assert exc.retry_after_s == seconds


def test_retry_after_http_date_is_seconds_from_now(standin_url: tuple[Standin, str]) -> None:
    """RFC 9110 allows an HTTP-date: it reads as the seconds until then, 0 once it has passed."""
    standin, base = standin_url
    for ahead, low, high in ((30.0, 25.0, 30.0), (-30.0, 0.0, 0.0)):
        standin.answer(b"{}", 503, retry_after=formatdate(time.time() + ahead, usegmt=True))
        for exc in planner_raises(base, "healthz"):
            assert isinstance(exc, ApiError) and exc.retry_after_s is not None
            assert low <= exc.retry_after_s <= high, (ahead, exc.retry_after_s)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("Sun, 06 Nov 1994 08:49:37 GMT", 10.0),  # IMF-fixdate
        ("Sunday, 06-Nov-94 08:49:37 GMT", 10.0),  # the obsolete RFC 850 form
        ("Sun Nov  6 08:49:37 1994", 10.0),  # asctime, no zone: GMT
        ("Sun, 06 Nov 1994 08:49:27 GMT", 0.0),
        ("Sun, 06 Nov 1994 08:49:17 GMT", 0.0),  # passed: no wait, never negative
        ("Sun, 36 Nov 1994 08:49:37 GMT", None),
        ("Sun, 06 Nov 1994", None),
        ("soon", None),
        ("12s", None),
        ("", None),
        ("120", 120.0),
        ("9" * 400, None),  # digits past a float's range: no infinite wait
    ],
)
def test_retry_after_seconds_reads_delay_seconds_and_http_dates(header: str, seconds: float | None) -> None:
    now = 784111777.0 - 10.0  # 10 s before Sun, 06 Nov 1994 08:49:37 GMT
    assert retry_after_seconds(header, now=now) == seconds


# ---- 3. tokens and headers ------------------------------------------------------------------------


BAD_TOKENS = ["t\xf6k", "abc ", " abc", "a\xa0b", "a\u2028b", "a\tb", ""]
BAD_HEADERS: list[dict[str, str]] = [{"X-A": "\xe9"}, {"X-A": " v"}, {"X-A": "v\r\nX-B: 1"}, {"X A": "v"}, {"": "v"}]
# framing headers the client sets for each request: an extra one broke every call with h11's own error
BAD_HEADERS += [{"Content-Length": "7"}, {"transfer-encoding": "chunked"}, {"Host": "x"}, {"Connection": "close"}]


@pytest.mark.parametrize("cls", [PlannerClient, AsyncPlannerClient, EdgeClient, AsyncEdgeClient])
def test_bad_tokens_and_headers_are_refused_when_built(
    cls: Callable[..., Any], standin_url: tuple[Standin, str]
) -> None:
    standin, base = standin_url
    standin.requests.clear()
    for token in BAD_TOKENS:
        with pytest.raises(RequestError, match="token"):
            cls(base, token)
    for headers in BAD_HEADERS:
        with pytest.raises(RequestError, match="header"):
            cls(base, headers=headers)
    assert standin.requests == []


def test_a_good_token_and_headers_travel(standin_url: tuple[Standin, str]) -> None:
    standin, base = standin_url
    standin.answer(b'{"status": "ok"}')
    standin.requests.clear()
    with PlannerClient(base, "tok-1.2_3~", headers={"X-Tenant": "a b", "user-agent": "cam/2"}) as c:
        c.healthz()
    assert standin.requests[-1].headers["authorization"] == "Bearer tok-1.2_3~"
    assert standin.requests[-1].headers["x-tenant"] == "a b"
    assert standin.requests[-1].headers["user-agent"] == "cam/2"  # replaced, whatever its case


def test_headers_that_would_clash_with_the_clients_own_are_refused() -> None:
    """Header names are case-insensitive: an `authorization` header beside a token was sent as a
    second Authorization, and an `Accept-Encoding` replaced identity, so every compressed
    answer was then refused."""
    with pytest.raises(RequestError, match="'Authorization'"):
        PlannerClient("http://127.0.0.1:9", "tok-1.2_3~", headers={"authorization": "Bearer other"})
    for cls in (PlannerClient, EdgeClient):
        with pytest.raises(RequestError, match="'Accept-Encoding'"):
            cls("http://127.0.0.1:9", headers={"accept-encoding": "gzip"})
    with PlannerClient("http://127.0.0.1:9", headers={"Authorization": "Bearer own"}) as c:  # no token: the header
        assert c.default_headers["Authorization"] == "Bearer own"


# ---- 4. base URLs ---------------------------------------------------------------------------------


BAD_URLS = [
    "http://127.0.0.1:1/?",
    "http://127.0.0.1:1/#",
    "http://127.0.0.1:1/p?a=1",
    "http://127.0.0.1:notaport",
    "http://127.0.0.1:99999",
    "http://[::1",
    "http://127.0.0.1:1\n",
    "http://127.0.0.1:1/pre fix",
    "http://127.0.0.1:1/\x00",
    " http://127.0.0.1:1",
    "ftp://127.0.0.1",
    "http://u:p@127.0.0.1:1",
    "http:///p",
]


@pytest.mark.parametrize("cls", [PlannerClient, AsyncPlannerClient, EdgeClient, AsyncEdgeClient])
@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_base_urls_are_request_errors(cls: Callable[..., Any], url: str) -> None:
    with pytest.raises(RequestError, match="base URL"):
        cls(url)


@pytest.mark.parametrize(
    "url",
    ["http://admin:S3cret@127.0.0.1:1", "http://admin:S3cret@127.0.0.1:99999", "ftp://admin:S3cret@h",
     "http://admin:S3cret@h/pre fix"],
)  # fmt: skip
def test_a_refused_base_url_never_repeats_its_password(url: str) -> None:
    """However the URL is refused, the message masks its user info."""
    with pytest.raises(RequestError, match=r"base URL.*\*\*\*@") as exc:
        PlannerClient(url)
    assert "S3cret" not in str(exc.value) and "admin" not in str(exc.value)


def test_a_base_url_with_a_path_prefix_is_kept(standin_url: tuple[Standin, str]) -> None:
    standin, base = standin_url
    standin.answer(b'{"status": "ok"}')
    with PlannerClient(base + "/prefix/") as c:
        c.healthz()
    assert standin.requests[-1].path == "/prefix/healthz"


# ---- 5. 0-row infer --------------------------------------------------------------------------------


def test_zero_row_inputs_are_refused_before_sending(standin_url: tuple[Standin, str]) -> None:
    standin, base = standin_url
    standin.requests.clear()
    for inputs in ({"x": torch.zeros(0, 4)}, {"x": torch.zeros(0, 3, 8, 8), "y": torch.zeros(0)}):
        for exc in raised_both(EdgeClient, AsyncEdgeClient, base, "infer", "m", inputs, exit="final"):
            assert isinstance(exc, RequestError) and "row" in str(exc)
    assert standin.requests == []


def test_badly_typed_call_arguments_are_request_errors_before_sending(standin_url: tuple[Standin, str]) -> None:
    """A traceparent that is not a string, a request id that is not one (it is echoed as a
    string, so an int made the right answer a ProtocolError), a tensor with no values to send
    (meta) or not one block of them (sparse): RequestError, nothing sent."""
    standin, base = standin_url
    standin.requests.clear()
    for exc in planner_raises(base, "plan", {"model": "m", "bandwidth_mbps": 1.0}, 5):
        assert isinstance(exc, RequestError) and "traceparent" in str(exc), exc
    x = torch.zeros(1, 4)
    for exc in raised_both(EdgeClient, AsyncEdgeClient, base, "infer", "m", {"x": x}, request_id=5):
        assert isinstance(exc, RequestError) and "request_id" in str(exc), exc
    for t in (torch.empty(1, 4, device="meta"), x.to_sparse()):
        for exc in raised_both(EdgeClient, AsyncEdgeClient, base, "infer", "m", {"x": t}):
            assert isinstance(exc, RequestError) and "cannot be sent" in str(exc), exc
    assert standin.requests == []


def test_an_error_answer_past_the_size_limit_is_still_an_api_error_with_its_retry_after(
    standin_url: tuple[Standin, str],
) -> None:
    """A 503 with Retry-After and a large page (a proxy's) is cut at `max_response_bytes`, not
    refused as a broken answer: ApiError, its status and Retry-After kept (a device backs off
    by them)."""
    standin, base = standin_url
    standin.answer(b"<html>" + b"busy " * 20_000 + b"</html>", 503, content_type="text/html", retry_after="3")
    small = functools.partial(PlannerClient, max_response_bytes=4096)
    asmall = functools.partial(AsyncPlannerClient, max_response_bytes=4096)
    for exc in raised_both(small, asmall, base, "plan", {"model": "m", "bandwidth_mbps": 1.0}):
        assert isinstance(exc, ApiError) and exc.status == 503 and exc.retry_after_s == 3.0, exc


PLAN_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "as published": lambda p: None,
    "bytes as a string": lambda p: p["transfer"][0].update(bytes="32768"),
    "constraints_met as a string": lambda p: p.update(constraints_met="true"),
    "constraints_met as 1": lambda p: p.update(constraints_met=1),
    "latency_ms as a string": lambda p: p["predicted"].update(latency_ms="41.2"),
    "edge_worker not http": lambda p: p.update(edge_worker="ftp://x"),
    "edge_worker with a space": lambda p: p.update(edge_worker="http://a b"),
    "plan_id not hex": lambda p: p.update(plan_id="x"),
    "model not a name": lambda p: p.update(model="../x"),
    "exit name empty": lambda p: p["exit"].update(name=""),
    "exit accuracy missing": lambda p: p["exit"].pop("accuracy"),
    "a device node twice": lambda p: p.update(device_nodes=["conv1", "conv1"]),
    "expected_latency_ms null": lambda p: p["predicted"].update(expected_latency_ms=None),
    "a lease's numbers as ints": lambda p: p.update(lease={**LEASE_EXAMPLE, "frames_per_s": 10}),
}


@pytest.mark.parametrize("name", list(PLAN_MUTATIONS))
def test_a_plan_answer_is_read_as_its_schema_reads_it(name: str, standin_url: tuple[Standin, str]) -> None:
    """The SDK accepts a plan answer exactly when plan.schema.json does (the schema is the
    oracle): wrong types ("true", "32768") are not converted, and the bounds the schema states
    (ids, names, URLs, unique nodes, required fields) are checked."""
    from tests.test_schemas import validator

    plan = copy.deepcopy(PLAN_EXAMPLE)
    PLAN_MUTATIONS[name](plan)
    valid = validator("plan").is_valid(plan)
    standin, base = standin_url
    standin.answer(json.dumps(plan).encode())
    with PlannerClient(base) as client:
        try:
            client.plan({"model": "resnet18", "bandwidth_mbps": 1.0})
            accepted = True
        except ProtocolError:
            accepted = False
    assert accepted == valid, (name, valid)


# ---- 6. readyz 503 that is not a Readiness -----------------------------------------------------------


def test_readyz_503_from_a_proxy_is_an_api_error(standin_url: tuple[Standin, str]) -> None:
    standin, base = standin_url
    standin.answer(b"<html>bad gateway</html>", 503, content_type="text/html")
    for exc in planner_raises(base, "readyz"):
        assert isinstance(exc, ApiError) and exc.status == 503
        assert exc.body == "<html>bad gateway</html>" and "bad gateway" in exc.detail
    standin.answer(b'{"ready": 3}', 200)  # a 200 off the contract stays a ProtocolError
    for exc in planner_raises(base, "readyz"):
        assert isinstance(exc, ProtocolError) and exc.status == 200


def test_readyz_503_readiness_is_an_answer(standin_url: tuple[Standin, str]) -> None:
    standin, base = standin_url
    standin.answer(b'{"ready": false, "redis": "down", "pending_writes": 2}', 503)
    with PlannerClient(base) as c:
        ready = c.readyz()

    async def aio() -> Any:
        async with AsyncPlannerClient(base) as ac:
            return await ac.readyz()

    assert ready == asyncio.run(aio())
    assert ready.ready is False and ready.pending_writes == 2


# ---- 7. an unexpected 2xx ---------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "method", "args"), [(200, "release", ("d1",)), (202, "healthz", ())])
def test_an_unexpected_2xx_is_a_protocol_error(
    standin_url: tuple[Standin, str], status: int, method: str, args: tuple[str, ...]
) -> None:
    standin, base = standin_url
    standin.answer(b"{}", status)
    for exc in planner_raises(base, method, *args):
        assert isinstance(exc, ProtocolError) and not isinstance(exc, ApiError)
        assert exc.status == status and "unexpected status" in exc.detail
    standin.answer(b'{"detail": "no live lease"}', 404)  # an error status stays an ApiError
    for exc in planner_raises(base, "release", "d1"):
        assert isinstance(exc, ApiError) and exc.status == 404 and exc.detail == "no live lease"
