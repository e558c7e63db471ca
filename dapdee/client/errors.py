"""What the SDK raises. Callers branch on the class and its fields, never on message text.

- `ApiError`: the service answered 4xx/5xx (or a 3xx: redirects are never followed).
  `.status`, `.problem` (the planner's RFC 9457 problem document as parsed; for the edge
  worker's `{"error": message}` body, `{"detail": message}`), `.detail`, `.title`, `.type`,
  `.errors` (a 422's invalid fields), `.headers` and `.body` (the raw text, bounded).
- `ProtocolError`: an answer that breaks the contract (a 2xx the call does not expect, a 2xx
  whose body is not the documented shape, JSON nested too deep, wrong types, negative or
  non-finite numbers, tensors of an unexpected shape).
- `TransportError`: no answer (connect error, timeout, a broken connection); `.cause`.
- `RequestError` (also a ValueError): a request the SDK will not send as given (an invalid
  name, base URL, token or header, NaN in a JSON body, a tensor the codec cannot encode, a
  non-finite timeout).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any

MAX_BODY_TEXT = 65536  # characters of an error answer kept in `.body`


def retry_after_seconds(value: str, now: float | None = None) -> float | None:
    """A `Retry-After` value (RFC 9110 §10.2.3) in seconds: delay-seconds (ASCII digits) as
    they are, an HTTP-date as the seconds from `now` (a `time.time()`; default the present)
    until then, 0 for a date already past; None for anything else, and for a number of digits
    past a float's range (it would read as infinity: a sleep that never ends). A date without a
    zone (`-0000`) is read as UTC, as HTTP-dates are. O(len(value))."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # Python 3.10 answers None rather than raising for some garbage
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ClientError(Exception):
    """Base of every error the SDK raises."""


class RequestError(ClientError, ValueError):
    """A request the SDK refuses to send; the message names the argument and the problem."""


class ApiError(ClientError):
    """A 4xx/5xx answer of the planner or an edge worker (see the module docstring)."""

    def __init__(
        self,
        method: str,
        path: str,
        status: int,
        problem: Mapping[str, Any],
        body: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.problem: dict[str, Any] = dict(problem)
        self.body = body[:MAX_BODY_TEXT]
        self.headers: dict[str, str] = {k.lower(): v for k, v in (headers or {}).items()}
        super().__init__(f"{method} {path}: HTTP {status}: {self.detail or self.title or 'no detail'}")

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail") or "")

    @property
    def title(self) -> str:
        return str(self.problem.get("title") or "")

    @property
    def type(self) -> str:
        """The problem type: a URN of the planner's (`urn:dapdee:problem:...`) or about:blank."""
        return str(self.problem.get("type") or "about:blank")

    @property
    def errors(self) -> list[dict[str, Any]]:
        """A 422's invalid fields, `[{"loc": [...], "msg", "type"}]` (empty otherwise)."""
        errors = self.problem.get("errors")
        return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []

    @property
    def retry_after_s(self) -> float | None:
        """The `Retry-After` header in seconds (`retry_after_seconds`), None without a valid one."""
        return retry_after_seconds(self.headers.get("retry-after", ""))


class ProtocolError(ClientError):
    """An answer that is not what the contract says; `.status` is its HTTP status."""

    def __init__(self, method: str, path: str, status: int, detail: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.detail = detail
        super().__init__(f"{method} {path}: HTTP {status}: answer breaks the contract: {detail}")


class TransportError(ClientError):
    """No answer: the request could not be sent or its answer not read. `.cause` is the
    underlying exception (of the last attempt); `.timeout` says whether a time limit ran out;
    `sent_before`: an earlier attempt of a repeated call may have reached the server."""

    def __init__(
        self, method: str, path: str, cause: BaseException, timeout: bool = False, sent_before: bool = False
    ) -> None:
        self.method = method
        self.path = path
        self.cause = cause
        self.timeout = timeout
        self.sent_before = sent_before
        what = "timed out" if timeout else f"{type(cause).__name__}: {cause or 'no answer'}"
        super().__init__(f"{method} {path}: {what}")

    @property
    def may_have_been_sent(self) -> bool:
        """Whether any of the request may have gone out: not when it never had a connection
        (refused, or timed out connecting or waiting for the client's pool; a call's timeout
        that ran out before the request began to go out is reported as one of these), unless
        an earlier attempt of the repeated call may have (`sent_before`). O(1)."""
        import httpx

        never = isinstance(self.cause, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
        return self.sent_before or not never
