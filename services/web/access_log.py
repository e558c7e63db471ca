"""The access log: one record per HTTP request, in the request's W3C trace context.

`AccessLog` is a pure-ASGI middleware (installed with `app.add_middleware`; it answers nothing
itself). For each HTTP request it:

1. reads the caller's `traceparent` (and `tracestate`); the request's span is a new span of
   that trace, or the root of a new trace when the header is absent, repeated or invalid
   (with tracing on, `dapdee.web.otel` makes that span a real server span and exports it);
2. makes that context current (`dapdee.tracecontext.current()`) while the app handles the
   request, so application log lines and outgoing calls carry it;
3. adds `traceparent` naming the request's span to the response headers;
4. at the end, writes one record to the `dapdee.access` logger: `method`, `path` (as sent, still
   percent-encoded), `route` (the matched route's template), `status`, `duration_ms`, `client`,
   `bytes_in`, `bytes_out`, `service`, `trace_id`, `span_id`, `parent_id` (the caller's span).
   Level INFO; WARNING for a 503 (the service sheds load or ran past a budget: the caller is
   told to retry, nothing failed); ERROR for another 5xx or an exception. Nothing is built
   when the logger is off.

With tracing on, it also exports the pending spans when the app's lifespan shuts down.

Installed outside the request guard (added after it, so it wraps it), it logs the guard's
refusals (401, 403, 408, 413, 415, 503) too, and its duration includes reading the body. Cost per
request: a header scan, 8 random bytes, two clock reads and the log record: O(#headers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dapdee.tracecontext import TRACEPARENT, TraceContext, activate, deactivate, server_context
from dapdee.web.otel import Tracing

ACCESS_LOGGER = "dapdee.access"
MAX_LOGGED_PATH = 2048  # characters of the path a record keeps
_TRACEPARENT = TRACEPARENT.encode()
_TRACESTATE = b"tracestate"


class _Exchange:
    """What one request did, filled in while it runs (status 500 until a response starts)."""

    __slots__ = ("status", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.status = 500
        self.bytes_in = 0
        self.bytes_out = 0


class AccessLog:
    """See the module docstring. `service` names the service in each record; `tracing` (from
    `dapdee.web.otel.tracer`) exports a server span per request when it is enabled."""

    def __init__(
        self, app: ASGIApp, service: str, tracing: Tracing | None = None, logger: logging.Logger | None = None
    ) -> None:
        self.app = app
        self.service = service
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.tracing is not None:
            await self.app(scope, receive, _flushing(send, self.tracing))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent, tracestate = _trace_headers(scope["headers"])
        exchange = _Exchange()
        if self.tracing is None:
            await self._serve(scope, receive, send, server_context(traceparent, tracestate), exchange)
            return
        with self.tracing.server_span(scope["method"], traceparent, tracestate) as span:
            try:
                await self._serve(scope, receive, send, span.context, exchange)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if route:  # OpenTelemetry's HTTP span name: the method and the route's template
                    span.rename(f"{scope['method']} {route}")
                span.set_attributes(_span_attributes(scope, exchange))

    async def _serve(self, scope: Scope, receive: Receive, send: Send, ctx: TraceContext, exchange: _Exchange) -> None:
        """Run the app in `ctx` with the traceparent header added and `exchange` counted; log it."""
        header = (_TRACEPARENT, ctx.traceparent.encode("ascii"))

        async def counted_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                exchange.bytes_in += len(message.get("body", b""))
            return message

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            elif message["type"] == "http.response.body":
                exchange.bytes_out += len(message.get("body", b""))
            await send(message)

        token = activate(ctx)
        start = time.perf_counter()
        failure: BaseException | None = None
        try:
            await self.app(scope, counted_receive, traced_send)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._log(scope, ctx, exchange, (time.perf_counter() - start) * 1000.0, failure)
            deactivate(token)

    def _log(
        self, scope: Scope, ctx: TraceContext, exchange: _Exchange, duration_ms: float, failure: BaseException | None
    ) -> None:
        """Write the request's record (nothing when the logger is off at its level). O(1)."""
        level = logging.INFO
        if failure is not None or (exchange.status >= 500 and exchange.status != 503):
            level = logging.ERROR
        elif exchange.status == 503:
            level = logging.WARNING
        if not self.logger.isEnabledFor(level):
            return
        path = _logged_path(scope)
        fields: dict[str, Any] = {
            "service": self.service,
            "method": scope["method"],
            "path": path,
            "route": getattr(scope.get("route"), "path", None),
            "status": exchange.status,
            "duration_ms": round(duration_ms, 3),
            "client": _client(scope),
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "trace_id": ctx.trace_id,
            "span_id": ctx.span_id,
            "parent_id": ctx.parent_id,
        }
        if failure is not None:
            fields["error"] = type(failure).__name__
        self.logger.log(level, "%s %s %d %.1f ms", scope["method"], path, exchange.status, duration_ms, extra=fields)


def _flushing(send: Send, tracing: Tracing) -> Send:
    """`send` of the lifespan, exporting the pending spans once the app has shut down (a server
    stopped by a signal ends the process right after, before any atexit hook runs)."""

    async def flushing_send(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await asyncio.to_thread(tracing.flush)
        await send(message)

    return flushing_send


def _trace_headers(headers: Any) -> tuple[str | None, str | None]:
    """The `traceparent` (None when absent or repeated: a repeated one is invalid) and the
    `tracestate` (repeated ones joined with commas, as the specification says). O(#headers)."""
    parents: list[bytes] = []
    states: list[bytes] = []
    for key, value in headers:
        if key == _TRACEPARENT:
            parents.append(value)
        elif key == _TRACESTATE:
            states.append(value)
    parent = parents[0].decode("latin-1") if len(parents) == 1 else None
    state = b",".join(states).decode("latin-1") if states else None
    return parent, state


def _logged_path(scope: Scope) -> str:
    """The path as the client sent it (percent-encoded, so no control characters), bounded."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw else scope["path"]
    return path[:MAX_LOGGED_PATH]


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _span_attributes(scope: Scope, exchange: _Exchange) -> dict[str, Any]:
    """OpenTelemetry's HTTP server attributes of the exchange. O(1)."""
    attributes: dict[str, Any] = {
        "http.request.method": scope["method"],
        "url.path": _logged_path(scope),
        "http.response.status_code": exchange.status,
        "http.request.body.size": exchange.bytes_in,
        "http.response.body.size": exchange.bytes_out,
    }
    route = getattr(scope.get("route"), "path", None)
    if route:
        attributes["http.route"] = route
    return attributes
