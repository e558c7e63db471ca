"""The SDK's HTTP layer, shared by the planner and edge clients, sync and async.

A client method builds a `Call` (method, path, body bytes, the statuses that are answers and a
`parse` function: no I/O), and a transport runs it: `SyncTransport` on `httpx.Client`,
`AsyncTransport` on `httpx.AsyncClient`. Both

- send the bearer token only to their own base URL (relative paths only, redirects never
  followed);
- bound each call as a whole by its timeout (the call's, else the client's): the answer must be
  complete, its last byte read, within that many seconds of the call's start, a repeat
  included, else `TransportError` with `.timeout` true. A server that drip-feeds its answer
  cannot stretch a call past it. The async transport cancels the exchange at the deadline; the
  sync one cuts every wait on the network (connect, TLS, each write and read) to the time left
  (`dapdee.client.deadline`; with a `transport` of the caller's, the time left is checked as
  each piece of the answer arrives, and one wait may run its full timeout past it). httpx's
  per-phase timeouts are the call's timeout too, cut to the time left. A deadline that comes
  before the request began to go out (no connection yet, or none free in the pool) is
  `httpx.ConnectTimeout` / `httpx.PoolTimeout` as the cause, async as sync, so a caller can
  tell that nothing was sent; so is a proxy that never answers the `CONNECT` of its tunnel (an
  https URL through a proxy), which httpx itself reports as a read timeout. (An http URL's
  request goes to a plain-HTTP proxy at once: a proxy silent after it may have passed it on,
  and that stays a read timeout.) Both transports learn how far the exchange got from
  httpcore's `trace` extension: with a `transport` of the caller's that is not
  `httpx.HTTPTransport` / `httpx.AsyncHTTPTransport`, a timeout is reported as httpx raised it
  and an async deadline is always taken as hit after sending began;
- carry a W3C `traceparent`: the call's own, else the current context's
  (`dapdee.tracecontext.use`), else none (the server starts the trace; its sampler decides);
- ask for answers without a content coding (`Accept-Encoding: identity`), read them as they
  come off the wire, and refuse one that is encoded anyway (`ProtocolError`): a decompressor
  would turn a few hundred bytes into gigabytes before `max_response_bytes` could count them;
- read at most `max_response_bytes` of an answer;
- repeat a call at most once, and only when that cannot apply it twice (as urllib3 does): after
  `httpx.ConnectError` (no connection, so nothing was sent) any call; after a connection
  broken once the request may have gone out (`RemoteProtocolError`, `ReadError`,
  `WriteError`: typically a kept-alive connection the server had closed, but possibly after
  the server acted on the request) only a call that is idempotent, by its method (GET, HEAD,
  PUT, DELETE, OPTIONS, TRACE: RFC 9110 §9.2.2) or because its builder says so
  (`Call.idempotent`: `POST /plan`, whose repeat renews the same per-device lease). Never a
  POST otherwise (an infer, a heartbeat, a rebalance), never a call whose body was streamed
  (it cannot be replayed), never once the deadline has passed; a DELETE repeated after a
  broken connection and answered 404 succeeds (the first attempt, whose answer the connection
  lost, deleted it; after a connect error nothing was sent, and the 404 is the answer);
- turn a 3xx/4xx/5xx status outside the call's answers into `ApiError`, a 1xx/2xx one and an
  answer `parse` rejects (any ValueError, pydantic's included, or JSON nested too deep) into
  `ProtocolError`, and no answer into `TransportError`;
- check the base URL, token and extra headers when built (`RequestError` naming the problem:
  an extra header may replace the User-Agent, not ask for a content coding nor give a second
  Authorization), and refuse a call on a closed client (`RequestError`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel
from typing_extensions import Self

from dapdee import timebox
from dapdee.client.deadline import with_deadlines, within
from dapdee.client.errors import MAX_BODY_TEXT, ApiError, ProtocolError, RequestError, TransportError
from dapdee.names import ModelError, check_model_name
from dapdee.tracecontext import TRACEPARENT, outgoing_headers, parse_traceparent

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
JSON = "application/json"
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 86400.0
DEFAULT_MAX_RESPONSE_BYTES = 32 << 20
USER_AGENT = "dapdee-sdk/0.1"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.2
# As many connections kept alive as open: httpcore (1.0.x) closes an idle connection whenever
# the pool holds more than `max_keepalive_connections` connections in all, idle or not, so with
# httpx's default (20 kept of 100) a client with more than 20 calls in flight reconnected for
# almost every call (a device's pipelined stream; each reconnect costs the server a connection).
POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)
# a connection broken after the request may have been sent (a kept-alive one the server closed)
_BROKEN = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as read: status, headers, the whole body and the exchange's wall time."""

    status: int
    headers: httpx.Headers
    content: bytes
    elapsed_ms: float

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not JSON or nests too deep to read."""
        try:
            return json.loads(self.content)
        except RecursionError:
            raise ValueError("JSON nested too deep") from None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request to make and how to read its answer: `parse` turns an answer whose status is
    in `ok` into the result (raising ValueError when it breaks the contract). `idempotent`:
    whether sending it twice has the effect of sending it once (None: as its method says,
    `IDEMPOTENT_METHODS`, unless it is conditional); only such a call is repeated after a broken
    connection. A conditional write (`If-Match`) is not: if the first one was applied, the repeat
    would be refused (409) as if another write had come between, though none did."""

    method: str
    path: str
    parse: Callable[[Answer], T]
    content: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    ok: frozenset[int] = frozenset({200})
    idempotent: bool | None = None
    timeout_s: float | None = None
    traceparent: str | None = None

    @property
    def is_idempotent(self) -> bool:
        """`idempotent` when set, else whether the method is one of `IDEMPOTENT_METHODS` and the
        call carries no `If-Match`. O(#headers)."""
        if self.idempotent is not None:
            return self.idempotent
        conditional = any(k.lower() == "if-match" for k in self.headers)
        return self.method.upper() in IDEMPOTENT_METHODS and not conditional


# ---- building calls (pure) ----------------------------------------------------------------------


def check_name(value: str, what: str) -> str:
    """`value` when it is a valid model/tier name (it becomes a URL path segment), else
    RequestError naming `what`. O(len(value))."""
    try:
        return check_model_name(value)
    except ModelError as exc:
        raise RequestError(f"{what}: {exc}") from None


def check_timeout(value: float, what: str = "timeout") -> float:
    """A finite timeout in seconds, > 0 and at most a day; else RequestError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{what}: expected a finite number of seconds, got {value!r}")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise RequestError(f"{what}: expected seconds in (0, {MAX_TIMEOUT_S:g}], got {value!r}")
    return float(value)


def _unsafe_char(text: str) -> str | None:
    """The first whitespace or control character of `text`, else None. O(len(text))."""
    return next((c for c in text if c.isspace() or not c.isprintable()), None)


def check_base_url(url: str) -> str:
    """An http(s) base URL without query, fragment or credentials, without a trailing slash:
    no `?` or `#` at all (not even an empty query), no whitespace or control characters, a
    valid port; RequestError naming the problem otherwise, the URL's user info (it may hold a
    password) masked wherever the message repeats it. O(len(url))."""
    try:
        return _checked_base_url(url)
    except RequestError as exc:
        info = _user_info(url) if isinstance(url, str) else ""
        if not info:
            raise
        raise RequestError(str(exc).replace(info + "@", "***@")) from None


def _user_info(url: str) -> str:
    """The user info of `url` (what precedes the last '@' of its authority), '' without one."""
    rest = url.partition("://")[2] or url
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    return rest[: max(rest.rfind("@", 0, end), 0)]


def _checked_base_url(url: str) -> str:
    expected = f"base URL: expected http(s)://HOST[:PORT][/PATH], got {url!r}"
    if not isinstance(url, str):
        raise RequestError(expected)
    bad = _unsafe_char(url)
    if bad is not None:
        raise RequestError(f"base URL {url!r}: holds whitespace or a control character ({bad!r})")
    if "?" in url or "#" in url:
        raise RequestError(f"base URL {url!r}: no query or fragment (no '?' or '#')")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in [0, 65535]
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise RequestError(f"base URL {url!r}: {_short(exc, 200)}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError(expected)
    if parts.username or parts.password:
        raise RequestError(f"base URL {url!r}: no credentials (the token goes in `token`)")
    return url.rstrip("/")


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_token(token: str | None) -> str | None:
    """A bearer token: a non-empty string of printable ASCII without surrounding whitespace
    (None: no token); RequestError naming the problem otherwise. O(len(token))."""
    if token is None:
        return None
    if not isinstance(token, str) or not token:
        raise RequestError("token: expected a non-empty string")
    if not token.isascii() or not token.isprintable():
        raise RequestError("token: expected printable ASCII characters only")
    if token != token.strip():
        raise RequestError("token: has leading or trailing whitespace")
    return token


# headers each request's framing sets (httpx, the codec): an extra one would break the message
FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "te", "upgrade", "host", "inference-header-content-length"}
)


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Extra request headers: names HTTP tokens, not a framing header (FRAMING_HEADERS), values
    printable ASCII without surrounding whitespace; RequestError naming the header otherwise.
    O(total size)."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise RequestError(f"headers: expected a mapping of name -> value, got {type(headers).__name__}")
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not set(name) <= _TOKEN_CHARS:
            raise RequestError(f"headers: invalid header name {name!r}")
        if name.lower() in FRAMING_HEADERS:
            raise RequestError(f"header {name!r}: set by the client for each request, not a header to add")
        if not isinstance(value, str) or not value.isascii() or not value.isprintable():
            raise RequestError(f"header {name!r}: expected a string of printable ASCII characters")
        if value != value.strip():
            raise RequestError(f"header {name!r}: has leading or trailing whitespace")
    return dict(headers)


def json_content(body: Any, what: str) -> bytes:
    """`body` as compact JSON bytes; RequestError when it holds NaN, infinities or values JSON
    cannot spell. O(size)."""
    try:
        return json.dumps(body, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()
    except (ValueError, TypeError) as exc:
        raise RequestError(f"{what}: cannot be sent as JSON ({exc})") from None


def json_call(method: str, path: str, parse: Callable[[Answer], T], body: Any, **kw: Any) -> Call[T]:
    """A call with a JSON body."""
    headers = {"Content-Type": JSON, **kw.pop("headers", {})}
    return Call(method, path, parse, json_content(body, f"{method} {path} body"), headers, **kw)


def trace_headers(traceparent: str | None) -> dict[str, str]:
    """The trace headers of one request: `traceparent` as given (RequestError when it is not a
    valid one), else those of the current trace context, else none. O(1)."""
    if traceparent is None:
        return outgoing_headers()
    if not isinstance(traceparent, str):
        raise RequestError(f"traceparent: expected a string, got {type(traceparent).__name__}")
    if parse_traceparent(traceparent) is None:
        raise RequestError(f"traceparent: not a valid W3C traceparent: {traceparent[:80]!r}")
    return {TRACEPARENT: traceparent}


# ---- reading answers (pure) ---------------------------------------------------------------------


def problem_of(answer: Answer) -> dict[str, Any]:
    """The error document of a 4xx/5xx answer: the planner's problem document as parsed; the
    edge's `{"error": message}` as `{"detail": message}`; any other body as its text."""
    try:
        doc = answer.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if "detail" not in doc and isinstance(doc.get("error"), str):
            return {"detail": doc["error"]}
        return doc
    return {"detail": answer.content[:500].decode("utf-8", "replace")}


def reader(model: type[M]) -> Callable[[Answer], M]:
    """A `parse` that reads the answer's JSON into `model` (ValidationError when it does not fit)."""

    def parse(answer: Answer) -> M:
        return model.model_validate_json(answer.content)

    return parse


def api_error(method: str, path: str, answer: Answer) -> ApiError:
    """The ApiError of an error answer: its status, problem document, text and headers."""
    text = answer.content[:MAX_BODY_TEXT].decode("utf-8", "replace")
    return ApiError(method, path, answer.status, problem_of(answer), text, dict(answer.headers))


def finish(call: Call[T], answer: Answer, repeat: bool = False) -> T:
    """The result of `call` from its answer: `parse` for a status in `call.ok`; for any other,
    ProtocolError when it is a 1xx/2xx (not an error, but not an answer the call has) and
    ApiError otherwise (4xx/5xx, and a 3xx: redirects are never followed); ProtocolError when
    `parse` rejects the answer. A `repeat` (a call made again after an attempt that may have
    reached the server: a broken connection, not a connect error) of a DELETE answered 404 is
    the call's first answer without a body: the attempt before, whose answer was lost, deleted it."""
    if repeat and call.method == "DELETE" and answer.status == 404:
        answer = Answer(min(call.ok), answer.headers, b"", answer.elapsed_ms)
    if answer.status not in call.ok:
        if answer.status < 300:
            expected = ", ".join(str(s) for s in sorted(call.ok))
            detail = f"unexpected status {answer.status} (expected {expected})"
            raise ProtocolError(call.method, call.path, answer.status, detail)
        raise api_error(call.method, call.path, answer)
    try:
        return call.parse(answer)
    except (ValueError, RecursionError) as exc:  # pydantic's ValidationError, CostGraphError, WireError
        raise ProtocolError(call.method, call.path, answer.status, _short(exc)) from None


def _short(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


class _Body:
    """An answer's body as it streams in, refused when it has a content coding, past `limit`
    bytes, and once the call's `deadline` (a `time.monotonic()` instant) has passed
    (`httpx.ReadTimeout`). An error answer (a status >= 300 the call does not expect) past
    `limit` is not refused but cut there: it still raises ApiError with its status and headers
    (a 503's Retry-After), from its first `limit` bytes."""

    def __init__(self, call: Call[Any], response: httpx.Response, limit: int, deadline: float) -> None:
        self.call, self.status, self.limit, self.deadline = call, response.status_code, limit, deadline
        coding = response.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            detail = f"answer has Content-Encoding {coding[:40]!r}; this client asks for identity"
            raise ProtocolError(call.method, call.path, self.status, detail)
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> bool:
        """Keep `chunk`; False when the rest of the answer is not to be read (an error answer
        cut at `limit`). O(1) (amortised)."""
        if time.monotonic() >= self.deadline:
            raise httpx.ReadTimeout("the call's timeout ran out while the answer arrived")
        room = self.limit - self.size
        if len(chunk) > room:
            if self.status < 300 or self.status in self.call.ok:
                raise ProtocolError(self.call.method, self.call.path, self.status, f"answer over {self.limit} bytes")
            self.parts.append(chunk[:room])
            self.size = self.limit
            return False
        self.size += len(chunk)
        self.parts.append(chunk)
        return True

    def answer(self, headers: httpx.Headers, t0: float) -> Answer:
        return Answer(self.status, headers, b"".join(self.parts), (time.perf_counter() - t0) * 1000.0)


def _no_answer(call: Call[Any], exc: BaseException, sent_before: bool) -> TransportError:
    """The TransportError of a call that got no answer because of `exc` (`sent_before`: an
    earlier attempt may have reached the server); `.timeout` for httpx's timeouts and the
    call's own deadline (`asyncio.TimeoutError`, not the builtin one before Python 3.11). O(1)."""
    timeout = isinstance(exc, (httpx.TimeoutException, TimeoutError, asyncio.TimeoutError))
    return TransportError(call.method, call.path, exc, timeout=timeout, sent_before=sent_before)


class _Progress:
    """How far one exchange got, from httpcore's `trace` extension (called with each event's
    name: `note` by the sync transport, awaited by the async one): whether any connection work
    was under way (opening one, or using a pooled one) and whether the request began to go out
    (its headers being written). A proxy tunnel's `CONNECT` (an https URL through a proxy) is
    connection work: httpcore writes it with the request's own trace, but nothing of the request
    has gone out until the proxy has answered it. O(1) per event."""

    def __init__(self) -> None:
        self.connecting = False
        self.sending = False

    def note(self, event: str, info: Mapping[str, Any]) -> None:
        """Record `event` (with httpcore's `info` about it)."""
        request = info.get("request")
        if event.endswith(".send_request_headers.started") and getattr(request, "method", None) != b"CONNECT":
            self.sending = True
        else:
            self.connecting = True

    async def __call__(self, event: str, info: Mapping[str, Any]) -> None:
        self.note(event, info)

    def unsent_timeout(self) -> httpx.TimeoutException | None:
        """What a deadline hit now is, when the request had not begun to go out: ConnectTimeout
        while a connection was being made, PoolTimeout while none had been handed out yet;
        None once sending began."""
        if self.sending:
            return None
        if self.connecting:
            return httpx.ConnectTimeout("the call's timeout ran out before a connection was made")
        return httpx.PoolTimeout("the call's timeout ran out waiting for a connection")


def _unsent_cause(exc: BaseException, progress: _Progress) -> BaseException:
    """The cause to report for `exc`, which ended an exchange whose `progress` httpcore traced:
    a timeout before the request began to go out is the httpx timeout of the phase it was in
    (`_Progress.unsent_timeout`: ConnectTimeout while a connection, a proxy's CONNECT tunnel
    included, was being made), so that a caller can tell nothing was sent; else `exc`. Such a
    timeout is the async transport's deadline (`timebox.within` cancels the exchange before httpx's
    own phase timeouts, which end at the same instant, can fire), or httpx's read or write
    timeout of a CONNECT the proxy never answered. O(1)."""
    unsent = (TimeoutError, asyncio.TimeoutError, httpx.ReadTimeout, httpx.WriteTimeout)
    if not isinstance(exc, unsent):
        return exc
    cause = progress.unsent_timeout()
    if cause is None:
        return exc
    cause.__cause__ = exc
    return cause


# ---- transports ---------------------------------------------------------------------------------


def _repeatable(call: Call[Any], streamed: Any, attempt: int, exc: BaseException, deadline: float) -> bool:
    """Whether to make `call` again after `exc` (the module's rule): only after the first
    attempt, with time left and a body that was not streamed; then after a connect error (the
    request was not sent), or after a broken connection when the call is idempotent. O(1)."""
    if attempt != 0 or streamed is not None or time.monotonic() >= deadline:
        return False
    if isinstance(exc, httpx.ConnectError):
        return True
    return isinstance(exc, _BROKEN) and call.is_idempotent


class _Transport:
    """What both transports hold and check: the base URL, the default headers (token, user
    agent), the timeout, the answer limit, and the httpx client `_open` makes."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.timeout_s = check_timeout(timeout)
        token = check_token(token)
        extra_headers = check_headers(headers)
        named = {name.lower() for name in extra_headers}  # header names are case-insensitive
        if "accept-encoding" in named:
            raise RequestError("header 'Accept-Encoding': the SDK's own (answers are read without a content coding)")
        if token and "authorization" in named:
            raise RequestError("header 'Authorization': the token is given already (`token`)")
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1:
            raise RequestError(f"max_response_bytes: expected a positive integer, got {max_response_bytes!r}")
        self.max_response_bytes = max_response_bytes
        ours = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        self.default_headers = {**{k: v for k, v in ours.items() if k.lower() not in named}, **extra_headers}
        if token:
            self.default_headers["Authorization"] = f"Bearer {token}"
        # httpx's own transport (httpcore underneath) reports its progress to a `trace` extension
        self.traced = transport is None or isinstance(transport, (httpx.HTTPTransport, httpx.AsyncHTTPTransport))
        client = {
            "base_url": self.base_url,
            "headers": self.default_headers,
            "follow_redirects": False,
            "limits": POOL_LIMITS,  # httpx's own transport only: a caller's brings its own pool
        }
        self._http = self._open({**client, "transport": transport})

    def _open(self, client_args: dict[str, Any]) -> Any:
        raise NotImplementedError

    def request_args(self, call: Call[Any], streamed: Any, deadline: float) -> dict[str, Any]:
        """httpx's request arguments: the call's content, or `streamed` (the same bytes as an
        iterable, sent with the content's length rather than chunked); every phase's timeout the
        call's, cut to the time left before `deadline`."""
        timeout = max(min(self.total_s(call), deadline - time.monotonic()), 1e-3)
        headers = {**trace_headers(call.traceparent), **call.headers}
        if streamed is not None:
            headers["Content-Length"] = str(len(call.content))
        return {
            "method": call.method,
            "url": call.path,
            "headers": headers,
            "timeout": httpx.Timeout(timeout),
            "content": call.content if streamed is None else streamed,
        }

    def _check_open(self, call: Call[Any]) -> None:
        """RequestError when the client has been closed (httpx would raise a bare RuntimeError)."""
        if self._http.is_closed:
            raise RequestError(f"{call.method} {call.path}: the client is closed")

    def _cause(self, exc: BaseException, progress: _Progress) -> BaseException:
        """The cause to report for `exc` (`_unsent_cause`); `exc` itself when the transport
        reports no progress (a caller's own, not httpx's). O(1)."""
        return _unsent_cause(exc, progress) if self.traced else exc

    def total_s(self, call: Call[Any]) -> float:
        """The seconds `call` may take as a whole: its own timeout, else the client's."""
        return check_timeout(call.timeout_s) if call.timeout_s is not None else self.timeout_s


class SyncTransport(_Transport):
    """Runs calls on one `httpx.Client` (connections kept alive), each cut off at its deadline
    (`dapdee.client.deadline`). Close it (or use `with`)."""

    _http: httpx.Client

    def _open(self, client_args: dict[str, Any]) -> httpx.Client:
        if client_args.get("transport") is None:  # httpx's own, proxies from the environment included
            return with_deadlines(httpx.Client(**client_args))
        return httpx.Client(**client_args)

    def run(self, call: Call[T], body: Iterable[bytes] | None = None) -> T:
        """Make the call (its content, or `body` streamed instead) and read its result, all
        within the call's timeout."""
        self._check_open(call)
        deadline = time.monotonic() + self.total_s(call)
        with within(deadline):
            sent_before = False  # whether an attempt before this one may have reached the server
            for attempt in (0, 1):
                progress = _Progress()
                try:
                    return finish(call, self._exchange(call, body, deadline, progress), repeat=sent_before)
                except httpx.HTTPError as exc:
                    if not _repeatable(call, body, attempt, exc, deadline):
                        raise _no_answer(call, self._cause(exc, progress), sent_before) from None
                    sent_before = not isinstance(exc, httpx.ConnectError)
        raise AssertionError("unreachable")

    def _exchange(self, call: Call[Any], body: Iterable[bytes] | None, deadline: float, progress: _Progress) -> Answer:
        args = self.request_args(call, body, deadline)
        if self.traced:
            args["extensions"] = {"trace": progress.note}
        request = self._http.build_request(**args)
        t0 = time.perf_counter()
        response = self._http.send(request, stream=True)
        try:
            got = _Body(call, response, self.max_response_bytes, deadline)
            # a caller's transport may hand back a response it has read already (httpx.MockTransport)
            for chunk in [response.content] if response.is_stream_consumed else response.iter_raw():
                if not got.add(chunk):
                    break
        finally:
            response.close()
        return got.answer(response.headers, t0)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTransport(_Transport):
    """Runs calls on one `httpx.AsyncClient`, each cancelled at its deadline. Close it with
    `await aclose()` (or use `async with`)."""

    _http: httpx.AsyncClient
    _loop: asyncio.AbstractEventLoop | None = None  # the event loop of the first call

    def _open(self, client_args: dict[str, Any]) -> httpx.AsyncClient:
        return httpx.AsyncClient(**client_args)

    async def run(self, call: Call[T], body: AsyncIterable[bytes] | None = None) -> T:
        """Make the call (its content, or `body` streamed instead) and read its result, all
        within the call's timeout."""
        self._check_open(call)
        self._check_loop(call)
        deadline = time.monotonic() + self.total_s(call)
        sent_before = False  # whether an attempt before this one may have reached the server
        for attempt in (0, 1):
            progress = _Progress()
            try:
                left = deadline - time.monotonic()
                answer = await timebox.within(self._exchange(call, body, deadline, progress), left)
                return finish(call, answer, repeat=sent_before)
            except (httpx.HTTPError, TimeoutError, asyncio.TimeoutError) as exc:  # two classes before 3.11
                if not _repeatable(call, body, attempt, exc, deadline):
                    raise _no_answer(call, self._cause(exc, progress), sent_before) from None
                sent_before = not isinstance(exc, httpx.ConnectError)
        raise AssertionError("unreachable")

    def _check_loop(self, call: Call[Any]) -> None:
        """RequestError when called from another event loop than the first call's: the pooled
        connections belong to that loop (httpx would raise a bare RuntimeError once it has
        closed, e.g. a second `asyncio.run`). O(1)."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RequestError(
                f"{call.method} {call.path}: this client was first used in another event loop, which "
                "holds its connections; make one client per event loop"
            )

    async def _exchange(
        self, call: Call[Any], body: AsyncIterable[bytes] | None, deadline: float, progress: _Progress
    ) -> Answer:
        args = self.request_args(call, body, deadline)
        if self.traced:
            args["extensions"] = {"trace": progress}
        request = self._http.build_request(**args)
        t0 = time.perf_counter()
        response = await self._http.send(request, stream=True)
        try:
            got = _Body(call, response, self.max_response_bytes, deadline)
            if response.is_stream_consumed:  # read already by a caller's transport (httpx.MockTransport)
                got.add(response.content)
            else:
                async for chunk in response.aiter_raw():
                    if not got.add(chunk):
                        break
        finally:
            await response.aclose()
        return got.answer(response.headers, t0)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
