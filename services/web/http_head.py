"""Limits on the request head, which the request guard cannot set: it runs once the head is complete.

uvicorn's httptools protocol collects the request line and headers without a size limit, and a
new connection that sends nothing, or its head a byte at a time, has no timeout (uvicorn arms
its keep-alive timer only after a response). `BoundedHeadProtocol` adds both:

- a head (request line and headers) over `max_head_bytes` is answered 431 with
  `Connection: close`, before more than one read of the socket past the limit is kept: the
  parser hands over a header only once its line is complete, so the bytes that arrive while a
  head is incomplete are counted as they come (one endless header line is refused too);
- a head not complete within `head_timeout_s` of the connection's start (of the request's first
  byte on a kept-alive connection) closes the connection, with 408 when part of it arrived.

Both answers carry the service's own error body: a service hands uvicorn a subclass whose
`render` is its request guard's renderer (the planner's problem documents, the edge's OIP
`{"error": ...}`), defined at module level so that several worker processes import it by name;
`BoundedHeadProtocol` itself answers plain text. (uvicorn's own 400 for a head its parser
cannot read stays plain text.) The body's limits stay the guard's (`dapdee.web.guard`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 << 10  # request line and headers: a token, a trace context and the usual few
HEAD_TIMEOUT_S = 10.0


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with a bounded request head (module docstring).
    Costs O(1) per parser callback on top of uvicorn's."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    # (status, message) -> (body, content type) of a 408 / 431: the service's error format
    render: ClassVar[Callable[[int, str], tuple[bytes, str]] | None] = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._awaiting_head = True  # no head complete since the connection or the last message began
        self._raw_head_bytes = 0  # bytes read while awaiting the head
        self._head_moved = False  # a head or message ended in the read being parsed
        self._head_started = False
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse `data`; then, while the head it belongs to is still incomplete, count it raw,
        and answer 431 past `max_head_bytes`. A read in which a head or message ended is not
        counted: its tail may be the next head, so one read's worth may go uncounted. O(1)."""
        self._head_moved = False
        super().data_received(data)
        if not self._awaiting_head or self._head_moved or self.transport.is_closing():
            return
        self._raw_head_bytes += len(data)
        if self._raw_head_bytes > self.max_head_bytes:
            self._head_too_large = True
            self._close_with(431, f"request head over {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._head_started = 0, True
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_started = False
        self._awaiting_head, self._head_moved = False, True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head, self._head_moved, self._raw_head_bytes = True, True, 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; a head over the limit (raised from a parser
        callback, which the parser reports as an error) gets 431 instead."""
        if self._head_too_large:
            self._close_with(431, f"request head over {self.max_head_bytes} bytes")
        else:
            super().send_400_response(msg)

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")  # stops the parser: send_400_response follows

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a request in progress (its head was complete)
        if self._head_started:
            self._close_with(408, f"request head not received within {self.head_timeout_s:g} s")
        else:
            self.transport.close()

    def _close_with(self, status: int, message: str) -> None:
        """Answer `status` with `message` in the service's error body (`render`; plain text
        without one) and close the connection."""
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        render = type(self).render
        body, ctype = render(status, message) if render else (message.encode("ascii"), "text/plain; charset=utf-8")
        head: list[Any] = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
        head += [b"content-type: %s\r\n" % ctype.encode("ascii"), b"content-length: %d\r\n" % len(body)]
        self.transport.write(b"".join([*head, b"connection: close\r\n\r\n", body]))
        self.transport.close()
