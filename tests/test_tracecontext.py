"""W3C Trace Context `traceparent`: the specification's examples, its invalid cases, and the
current-context helpers (`dapdee.tracecontext`)."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from dapdee.tracecontext import (
    TraceContext,
    current,
    new_span_id,
    new_trace_id,
    outgoing_headers,
    parse_traceparent,
    server_context,
    use,
)

VALID_HEADER = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

# the examples of the specification (section "traceparent Header Field Values")
SPEC_EXAMPLES = [
    (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        1,
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        1,
    ),
    (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "00f067aa0ba902b7",
        0,
    ),
]

GOOD = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

INVALID = {
    "empty": "",
    "all-zero trace id": "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "all-zero parent id": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
    "version ff": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "uppercase trace id": "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    "uppercase parent id": "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
    "uppercase version": "0A-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "non-hex trace id": "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
    "non-hex flags": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0x",
    "short trace id": "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
    "long parent id": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333100-01",
    "one-digit flags": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
    "version 00 with trailing data": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "version 00 with a trailing dash": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
    "underscores for dashes": "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
    "one-digit version": "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "higher version, no dash after the flags": "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01.what",
    "higher version, too short": "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
    "garbage": "not a traceparent at all, but long enough to pass a length check!!",
}


@pytest.mark.parametrize(("header", "trace_id", "span_id", "flags"), SPEC_EXAMPLES)
def test_spec_examples_parse(header: str, trace_id: str, span_id: str, flags: int) -> None:
    ctx = parse_traceparent(header)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.flags) == (trace_id, span_id, flags)
    assert ctx.sampled is bool(flags)
    assert ctx.traceparent == header  # formatting is the exact inverse for version 00


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_headers_are_refused(name: str) -> None:
    assert parse_traceparent(INVALID[name]) is None, name
    ctx = server_context(INVALID[name])  # a server starts a new trace instead
    assert ctx.parent_id is None and ctx.trace_id != "0af7651916cd43dd8448eb211c80319c"
    assert VALID_HEADER.fullmatch(ctx.traceparent)


def test_absent_header_starts_a_new_trace() -> None:
    assert parse_traceparent(None) is None
    a, b = server_context(None), server_context(None)
    assert a.trace_id != b.trace_id and a.span_id != b.span_id
    assert a.parent_id is None and not a.sampled and a.traceparent.endswith("-02")  # random, not sampled
    assert parse_traceparent(a.traceparent) == TraceContext(a.trace_id, a.span_id, a.flags)


def test_higher_version_is_read_by_its_version_00_prefix() -> None:
    ctx = parse_traceparent("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-will-be-like")
    assert ctx is not None and ctx.trace_id == "0af7651916cd43dd8448eb211c80319c" and ctx.span_id == "b7ad6b7169203331"
    assert ctx.traceparent.startswith("00-")  # passed on as the version we speak
    assert parse_traceparent("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") is not None


def test_surrounding_whitespace_is_tolerated_and_unknown_flags_dropped() -> None:
    ctx = parse_traceparent(f"  {GOOD}\t")
    assert ctx is not None and ctx.trace_id == "0af7651916cd43dd8448eb211c80319c"
    ctx = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff")
    assert ctx is not None and ctx.flags == 0x03  # sampled + random kept; reserved bits not passed on
    assert ctx.traceparent.endswith("-03")


def test_server_context_continues_the_callers_trace() -> None:
    ctx = server_context(GOOD)
    assert ctx.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert ctx.parent_id == "b7ad6b7169203331" and ctx.span_id != "b7ad6b7169203331"
    assert ctx.flags == 0x01
    unsampled = server_context("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert not unsampled.sampled and unsampled.traceparent.endswith("-00")


def test_child_keeps_trace_and_flags_and_names_its_parent() -> None:
    root = TraceContext.root()
    child = root.child()
    assert child.trace_id == root.trace_id and child.flags == root.flags
    assert child.parent_id == root.span_id and child.span_id != root.span_id
    assert root.child("00f067aa0ba902b7").span_id == "00f067aa0ba902b7"


def test_tracestate_travels_with_a_valid_parent_only() -> None:
    ctx = server_context(GOOD, "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")
    assert ctx.tracestate == "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"
    assert outgoing_headers(ctx)["tracestate"] == ctx.tracestate
    assert server_context(INVALID["version ff"], "congo=t61rcWkgMzE").tracestate == ""
    assert parse_traceparent(GOOD, "x=" + "a" * 600).tracestate == ""  # oversized: dropped whole
    assert parse_traceparent(GOOD, "x=a\nb").tracestate == ""  # control characters: dropped


def test_ids_are_lowercase_hex_and_never_zero() -> None:
    for _ in range(200):
        t, s = new_trace_id(), new_span_id()
        assert re.fullmatch(r"[0-9a-f]{32}", t) and t != "0" * 32
        assert re.fullmatch(r"[0-9a-f]{16}", s) and s != "0" * 16


def test_current_context_and_outgoing_headers() -> None:
    assert current() is None
    # no context: no header (the callee starts the trace and its sampler decides)
    assert outgoing_headers() == {}
    explicit = TraceContext.root(sampled=False)
    assert VALID_HEADER.fullmatch(outgoing_headers(explicit)["traceparent"])
    ctx = server_context(GOOD)
    with use(ctx):
        assert current() is ctx
        assert outgoing_headers() == {"traceparent": ctx.traceparent}
        with use(ctx.child()) as inner:
            assert current() is inner
        assert current() is ctx
    assert current() is None


def test_context_is_per_task_and_follows_copied_contexts_into_threads() -> None:
    async def handle(ctx: TraceContext) -> tuple[TraceContext | None, TraceContext | None]:
        with use(ctx):
            await asyncio.sleep(0.01)  # the other task runs meanwhile with its own context
            in_thread = await asyncio.to_thread(current)
            return current(), in_thread

    async def both() -> list[tuple[TraceContext | None, TraceContext | None]]:
        return await asyncio.gather(handle(a), handle(b))

    a, b = TraceContext.root(), TraceContext.root()
    assert asyncio.run(both()) == [(a, a), (b, b)]
    with use(a), ThreadPoolExecutor(1) as pool:  # a plain thread pool does not copy the context
        assert pool.submit(current).result() is None


@pytest.mark.parametrize(
    "tracestate",
    [
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "fw529a3039@dt=abc, 0vendor@sys=x y",  # multi-tenant keys; a space inside a value
        " a=1 ,, b=2 ",  # optional whitespace and empty members
        ",".join(f"k{i}=v" for i in range(32)),
    ],
)
def test_a_valid_tracestate_list_is_kept(tracestate: str) -> None:
    assert parse_traceparent(GOOD, tracestate).tracestate == tracestate.strip(" \t")


@pytest.mark.parametrize(
    "tracestate",
    [
        "foo@@=bar",  # two tenants
        "Rojo=1",  # uppercase key
        "1a=b",  # a simple key starts with a letter
        "a=",  # empty value
        "a=b=c",  # '=' in a value
        "a=b ,a=c",  # duplicate key
        "a=1,x",  # a member without '='
        ",".join(f"k{i}=v" for i in range(33)),  # over 32 members
    ],
)
def test_a_malformed_tracestate_list_is_dropped_whole(tracestate: str) -> None:
    assert parse_traceparent(GOOD, tracestate).tracestate == ""
