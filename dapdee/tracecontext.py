"""W3C Trace Context: the `traceparent` header, read, made and passed on.

A `traceparent` is `VERSION-TRACEID-PARENTID-FLAGS`: version `00`, 32 lowercase hex digits of
trace id, 16 of parent (span) id, 2 of flags (bit 0: sampled; bit 1: the trace id is random).
An invalid header (wrong lengths, uppercase or non-hex digits, an all-zero id, version `ff`,
trailing data on version `00`) is ignored and a new trace starts, as the specification says;
a higher version is read by its version-00 prefix. `tracestate` travels with a valid parent
unchanged (bounded to 512 characters and a valid list of at most 32 members, else dropped).

The context of the request being handled lives in a `ContextVar` (`current()`); the services'
access-log middleware sets it, application code reads it, and outgoing calls carry it with
`outgoing_headers()`. A call made outside any context (a device without tracing, an edge
worker's heartbeat loop) carries no `traceparent`: the callee starts the trace, and its head
sampler (e.g. `parentbased_traceidratio`) decides whether it is recorded, rather than following
a sampled flag that no recorded span stands behind. Everything here is pure and O(header length).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
SAMPLED = 0x01
RANDOM = 0x02
KNOWN_FLAGS = SAMPLED | RANDOM  # the flags this version defines; others are not passed on
MAX_TRACESTATE = 512  # the specification's length a vendor must propagate
MAX_TRACESTATE_MEMBERS = 32
# a tracestate list-member, `key=value` (W3C Trace Context, "tracestate Header Field Values")
TRACESTATE_MEMBER = re.compile(
    r"([a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_V00_LENGTH = 55  # 2 + 1 + 32 + 1 + 16 + 1 + 2


@dataclass(frozen=True)
class TraceContext:
    """One span's place in a trace: `trace_id` (32 hex), `span_id` (16 hex), `flags`, the span it
    descends from (`parent_id`, None for a root) and the vendors' `tracestate` (passed on as is)."""

    trace_id: str
    span_id: str
    flags: int = SAMPLED | RANDOM
    parent_id: str | None = None
    tracestate: str = ""

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    @property
    def traceparent(self) -> str:
        """The `traceparent` header naming this span as the parent. O(1)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags & KNOWN_FLAGS:02x}"

    def child(self, span_id: str | None = None) -> TraceContext:
        """A span of the same trace whose parent is this one (a fresh span id unless given). O(1)."""
        return replace(self, span_id=span_id or new_span_id(), parent_id=self.span_id)

    @classmethod
    def root(cls, sampled: bool = True) -> TraceContext:
        """The first span of a new trace (random ids, so the random flag is set). O(1)."""
        return cls(new_trace_id(), new_span_id(), (SAMPLED if sampled else 0) | RANDOM)


def new_trace_id() -> str:
    """32 random lowercase hex digits, never all zero. O(1)."""
    while True:
        value = os.urandom(16).hex()
        if value != _ZERO_TRACE:
            return value


def new_span_id() -> str:
    """16 random lowercase hex digits, never all zero. O(1)."""
    while True:
        value = os.urandom(8).hex()
        if value != _ZERO_SPAN:
            return value


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX.issuperset(text)


def parse_traceparent(value: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The caller's span named by a `traceparent` header value (None: absent or invalid, so a
    new trace starts). The result's `span_id` is the caller's span, to become the parent of
    ours (see `server_context`). `tracestate` is kept when valid-looking and bounded. O(len)."""
    if value is None:
        return None
    value = value.strip(" \t")
    if len(value) < _V00_LENGTH:
        return None
    version = value[:2]
    if not _is_hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(value) != _V00_LENGTH:
        return None
    if len(value) > _V00_LENGTH and value[_V00_LENGTH] != "-":  # a higher version adds fields after a dash
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, span_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_is_hex(trace_id, 32) and _is_hex(span_id, 16) and _is_hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16) & KNOWN_FLAGS, None, _clean_tracestate(tracestate))


def _clean_tracestate(value: str | None) -> str:
    """`tracestate` as passed on: stripped, at most MAX_TRACESTATE characters, and a valid list
    (each non-empty member `TRACESTATE_MEMBER`, keys unique, at most MAX_TRACESTATE_MEMBERS),
    else dropped whole: never cut inside an entry, and a client's malformed list never reaches a
    tracing library that would log it per request. O(len)."""
    if not value:
        return ""
    value = value.strip(" \t")
    if len(value) > MAX_TRACESTATE:
        return ""
    members = [m.strip(" \t") for m in value.split(",")]
    matches = [TRACESTATE_MEMBER.fullmatch(m) for m in members if m]
    if len(matches) > MAX_TRACESTATE_MEMBERS or not all(matches):
        return ""
    keys = [m.group(1) for m in matches if m is not None]
    return value if len(set(keys)) == len(keys) else ""


def server_context(traceparent: str | None, tracestate: str | None = None) -> TraceContext:
    """The context of a request served without tracing: a new span of the caller's trace when
    the caller sent a valid `traceparent` (its sampled flag kept), else the root of a new trace,
    not sampled: nothing records it, and a client taking the response's `traceparent` as its
    parent must not be told that a recorded span stands behind it. O(header length)."""
    parent = parse_traceparent(traceparent, tracestate)
    return parent.child() if parent is not None else TraceContext.root(sampled=False)


_CURRENT: ContextVar[TraceContext | None] = ContextVar("dapdee_trace_context", default=None)


def current() -> TraceContext | None:
    """The trace context of the request (or span) being handled in this task or thread. O(1)."""
    return _CURRENT.get()


def activate(ctx: TraceContext | None) -> Token[TraceContext | None]:
    """Make `ctx` current; hand the token to `deactivate` to restore the previous one. O(1)."""
    return _CURRENT.set(ctx)


def deactivate(token: Token[TraceContext | None]) -> None:
    """Restore the context that was current before `activate` returned `token`. O(1)."""
    _CURRENT.reset(token)


@contextmanager
def use(ctx: TraceContext | None) -> Iterator[TraceContext | None]:
    """`with use(ctx):` — `ctx` is current inside the block (threads started with a copied
    context, e.g. `asyncio.to_thread`, see it too). O(1)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def outgoing_headers(ctx: TraceContext | None = None) -> dict[str, str]:
    """The headers an outgoing call carries so the callee joins the trace: `traceparent` naming
    `ctx` (default: the current context) and `tracestate` when there is one. With no context,
    none: a caller outside any trace has no span to be the callee's parent, so the callee starts
    the trace and its own sampler decides whether to record it (a made-up parent would have to
    claim a sampling decision nobody took). The callee's response `traceparent` names that
    trace. O(1)."""
    ctx = ctx or _CURRENT.get()
    if ctx is None:
        return {}
    headers = {TRACEPARENT: ctx.traceparent}
    if ctx.tracestate:
        headers[TRACESTATE] = ctx.tracestate
    return headers


def inject_traceparent(request: Any) -> None:
    """An httpx request event hook (`httpx.Client(event_hooks={"request": [inject_traceparent]})`):
    each request carries `outgoing_headers()` (nothing outside a context) unless it sets a
    `traceparent` itself. O(1)."""
    if TRACEPARENT not in request.headers:
        request.headers.update(outgoing_headers())


async def ainject_traceparent(request: Any) -> None:
    """`inject_traceparent` for `httpx.AsyncClient(event_hooks={"request": [ainject_traceparent]})`."""
    inject_traceparent(request)
