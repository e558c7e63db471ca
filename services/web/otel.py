"""Opt-in OpenTelemetry tracing, joined to the W3C trace context of `dapdee.tracecontext`.

`tracer(service)` gives a `Tracing`. It is enabled when asked (`enabled=True`, i.e. `--otel`)
or when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and
never when `OTEL_SDK_DISABLED=true`. Enabled, it has its own SDK `TracerProvider` (service name
`dapdee-<service>` unless `OTEL_SERVICE_NAME` says otherwise) exporting over OTLP/HTTP in a
batch thread, or to the `exporter` given (synchronously: the tests use the SDK's in-memory
exporter). The global tracer provider is left alone. Disabled, every call is a constant no-op and
the SDK is never imported (install it with the `otel` extra: `pip install 'dapdee[otel]'`).

Spans are children of the current W3C context (the request's span, set by the access-log
middleware), so a span's trace id is the request's; inside a span, the span is the current
context, so log lines and outgoing calls (`tracecontext.outgoing_headers()`) name it.

Inside a span of an enabled `Tracing` (the request's server span, for application code),
`active()` is that tracing and `recording()` returns it when the span is sampled: a service
records its own spans through it without holding the app, and with tracing off `recording()`
is one context-variable read returning None, so a caller builds nothing.

One device frame is one trace: `device.frame` with `device.compute` and `uplink`, the edge's
HTTP server span under the uplink with `edge.queue` and `edge.compute`, and, when the frame
asked for a plan, the planner's server span with `planner.plan`. The `ATTR_*` names are the
attributes those spans carry: the planner's span has the model, mode, exit, cut (device
nodes), predicted latency, transfer bytes and the edge worker chosen; the edge's have the model,
exit, cut (the device-side nodes the request's tensors imply), the nodes the edge ran, the bytes
received, batch size and rows, and the measured milliseconds of the queue wait or the compute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from dapdee.tracecontext import (
    KNOWN_FLAGS,
    RANDOM,
    TraceContext,
    activate,
    current,
    deactivate,
    parse_traceparent,
)

ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
DISABLED_ENV = "OTEL_SDK_DISABLED"

# span names of a device frame's trace
FRAME = "device.frame"
DEVICE_COMPUTE = "device.compute"
UPLINK = "uplink"
EDGE_QUEUE = "edge.queue"
EDGE_COMPUTE = "edge.compute"
PLANNER = "planner.plan"
# attributes those spans carry
ATTR_MODEL = "dapdee.model"
ATTR_EXIT = "dapdee.exit"
ATTR_CUT = "dapdee.cut"  # number of device nodes
ATTR_BYTES_SENT = "dapdee.bytes_sent"
ATTR_PREDICTED_MS = "dapdee.predicted_ms"
ATTR_MEASURED_MS = "dapdee.measured_ms"
ATTR_WHERE = "dapdee.where"  # edge | local | fallback
ATTR_BATCH_SIZE = "dapdee.batch_size"
ATTR_BATCH_ROWS = "dapdee.batch_rows"
ATTR_MODE = "dapdee.mode"  # latency | throughput
ATTR_WORKER = "dapdee.worker"  # the edge worker's URL a plan names (its lease's)
ATTR_TRANSFER_BYTES = "dapdee.transfer_bytes"  # bytes a plan's transfer tensors take
ATTR_BYTES_RECEIVED = "dapdee.bytes_received"  # infer request body bytes the edge received
ATTR_EDGE_NODES = "dapdee.edge_nodes"  # nodes the edge ran for the request


def requested(explicit: bool | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is on: never with `OTEL_SDK_DISABLED=true`; else `explicit` when given;
    else whether an OTLP endpoint variable is set. O(1)."""
    env = os.environ if environ is None else environ
    if env.get(DISABLED_ENV, "").strip().lower() == "true":
        return False
    if explicit is not None:
        return explicit
    return any(env.get(name, "").strip() for name in ENDPOINT_ENV)


class _NoSpan:
    """The span handle of disabled tracing: attributes go nowhere; `context` is the current one."""

    __slots__ = ()

    @property
    def context(self) -> TraceContext | None:
        return current()

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        return None

    def rename(self, name: str) -> None:
        return None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


class Tracing:
    """Disabled tracing (the base of the enabled one): each method costs a call and returns a
    shared constant. `span(...)` is a context manager yielding a handle with `context` (the
    span's `TraceContext`), `set_attribute`, `set_attributes` and `rename`."""

    enabled = False

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        parent: TraceContext | None = None,
        start_ns: int | None = None,
    ) -> AbstractContextManager[Any]:
        """A span named `name` under `parent` (default: the current context), current inside
        the block; it ends with the block (an exception marks it failed)."""
        return _NO_SPAN

    def server_span(
        self, name: str, traceparent: str | None, tracestate: str | None = None
    ) -> AbstractContextManager[Any]:
        """The server span of a request whose caller sent `traceparent` (None/invalid: a new trace)."""
        return _NO_SPAN

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        parent: TraceContext | None = None,
    ) -> TraceContext | None:
        """A span measured after the fact (epoch nanoseconds, `time.time_ns()`), e.g. a queue
        wait; returns its context (None when disabled)."""
        return None

    def flush(self) -> None:
        """Export the spans that have ended and wait for it (no-op when disabled)."""
        return None

    def shutdown(self) -> None:
        """Export what is pending and stop (no-op when disabled)."""
        return None


NO_TRACING = Tracing()
_ACTIVE: ContextVar[Tracing] = ContextVar("dapdee_tracing", default=NO_TRACING)


def active() -> Tracing:
    """The enabled tracing whose span is current in this task or thread, else `NO_TRACING`. O(1)."""
    return _ACTIVE.get()


def recording() -> Tracing | None:
    """`active()` when it is enabled and the current span is sampled (its spans are exported),
    else None: with tracing off, one context-variable read. O(1)."""
    tracing = _ACTIVE.get()
    if not tracing.enabled:
        return None
    ctx = current()
    return tracing if ctx is not None and ctx.sampled else None


class _OtelSpan:
    """An SDK span with the W3C context it stands for."""

    __slots__ = ("span", "context")

    def __init__(self, span: Any, context: TraceContext) -> None:
        self.span, self.context = span, context

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        self.span.set_attributes(attributes)

    def rename(self, name: str) -> None:
        self.span.update_name(name)


class OtelTracing(Tracing):
    """Enabled tracing over the OpenTelemetry SDK (see the module docstring). Each span: an SDK
    span start and end, O(#attributes); export happens in the processor's thread."""

    enabled = True

    def __init__(self, service: str, exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"dapdee-{service}"}
        self.provider = TracerProvider(resource=Resource.create(attributes))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer(f"dapdee.{service}")
        self._trace = trace

    def _start(
        self, name: str, parent: TraceContext | None, remote: bool, server: bool, **kw: Any
    ) -> tuple[Any, TraceContext]:
        """Start an SDK span under `parent` (None: a new trace) and the W3C context it stands for."""
        from opentelemetry.context import Context
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

        if parent is None:
            otel_parent = Context()  # not the SDK's own current span: ours is the one current context
        else:
            state = TraceState.from_header([parent.tracestate]) if parent.tracestate else None
            span_context = SpanContext(
                int(parent.trace_id, 16), int(parent.span_id, 16), remote, TraceFlags(parent.flags), state
            )
            otel_parent = self._trace.set_span_in_context(NonRecordingSpan(span_context), Context())
        kind = SpanKind.SERVER if server else SpanKind.INTERNAL
        span = self.tracer.start_span(name, context=otel_parent, kind=kind, **kw)
        sc = span.get_span_context()
        random = (parent.flags if parent is not None else RANDOM) & RANDOM
        ctx = TraceContext(
            f"{sc.trace_id:032x}",
            f"{sc.span_id:016x}",
            (int(sc.trace_flags) | random) & KNOWN_FLAGS,
            parent.span_id if parent is not None else None,
            parent.tracestate if parent is not None else "",
        )
        return span, ctx

    @contextmanager
    def _scope(self, span: Any, ctx: TraceContext) -> Iterator[_OtelSpan]:
        from opentelemetry.trace import Status, StatusCode

        token = activate(ctx)
        active_token = _ACTIVE.set(self)
        try:
            yield _OtelSpan(span, ctx)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            _ACTIVE.reset(active_token)
            deactivate(token)
            span.end()

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        parent: TraceContext | None = None,
        start_ns: int | None = None,
    ) -> AbstractContextManager[Any]:
        span, ctx = self._start(name, parent or current(), False, False, attributes=attributes, start_time=start_ns)
        return self._scope(span, ctx)

    def server_span(
        self, name: str, traceparent: str | None, tracestate: str | None = None
    ) -> AbstractContextManager[Any]:
        span, ctx = self._start(name, parse_traceparent(traceparent, tracestate), True, True)
        return self._scope(span, ctx)

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        parent: TraceContext | None = None,
    ) -> TraceContext | None:
        span, ctx = self._start(name, parent or current(), False, False, attributes=attributes, start_time=start_ns)
        span.end(end_time=end_ns)
        return ctx

    def flush(self) -> None:
        self.provider.force_flush()

    def shutdown(self) -> None:
        self.provider.shutdown()


def add_otel_argument(parser: Any) -> None:
    """`--otel` on an argparse parser: None when absent, so the environment decides (`requested`)."""
    parser.add_argument(
        "--otel",
        action="store_true",
        default=None,
        help="export OpenTelemetry traces over OTLP/HTTP (also on when OTEL_EXPORTER_OTLP_ENDPOINT is set)",
    )


def check_endpoints(environ: Mapping[str, str] | None = None) -> None:
    """ValueError naming the variable when an OTLP endpoint variable that is set is not an
    http(s) URL with a host (the exporter would only fail at each export, much later). O(1)."""
    env = os.environ if environ is None else environ
    for name in ENDPOINT_ENV:
        value = env.get(name, "").strip()
        if not value:
            continue
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{name}: expected an http(s) URL such as http://collector:4318, got {value!r}")


def tracer(service: str, enabled: bool | None = None, exporter: Any = None) -> Tracing:
    """The tracing of `service`: `OtelTracing` when `requested(enabled)`, else `NO_TRACING`
    (nothing imported, nothing started). ValueError when asked for but the SDK is missing, or
    an endpoint variable is not a URL (`check_endpoints`)."""
    if not requested(enabled):
        return NO_TRACING
    check_endpoints()
    try:
        return OtelTracing(service, exporter)
    except ImportError as exc:
        raise ValueError(
            f"tracing was asked for (--otel or OTEL_EXPORTER_OTLP_ENDPOINT) but {exc.name} is not installed: "
            "pip install 'dapdee[otel]'"
        ) from None
