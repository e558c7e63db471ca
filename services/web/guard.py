"""The request guard: auth, body and buffer limits and a concurrency limit, checked before anything is parsed.

`RequestGuard` is the outermost middleware of both services (pure ASGI, installed with
`app.add_middleware`; it answers nothing itself except refusals). For each HTTP request it:

0. with `loopback_hosts_only` (a service that runs open, no token, on loopback), refuses with
   403 a request whose `Host` is not a loopback name (`localhost`, 127.0.0.0/8, `[::1]`): a web
   page could otherwise rebind its own domain to 127.0.0.1 and call every route from a
   browser on the machine (DNS rebinding);
1. matches the request to the app's route and reads the access the route declares with
   `security.require` (no declaration: admin-only; FastAPI's own docs routes: public; no route
   at all: passed on unread, so the app answers its 404/405 without the body ever being
   buffered, and with `Connection: close` when a body may follow: a request no route takes
   holds no buffer and no connection; a public route's request likewise, since none of them
   takes a body: read, anyone could fill the body buffer without a token);
2. checks the bearer token: 401 without a known one, 403 for the wrong role; then, for an
   authorised request, the service's own check of its target (`before_body(scope)`, which finds
   the matched route, its template and path parameters, in `scope[ROUTE_SCOPE_KEY]`; e.g. the
   edge's 404 for an infer to a model it does not serve, which has no body limit of its own),
   before any of the body is read;
3. reads the whole body before the app sees it: 415 (counted as bad_request) for a body sent
   with a `Content-Encoding` other than identity (bodies are taken uncompressed, so the limits
   bound what the app decodes); 413 past `max_body_bytes` (or the tighter
   per-request limit `body_limit(scope)` gives, e.g. per model; from Content-Length up front,
   else counted while streaming), 408 when it takes longer than
   `body_timeout_s` in all (a slow upload never holds a handler or a compute slot). The body
   bytes all requests hold at once stay within `max_buffered_bytes` (default: a few times
   `max_body_bytes`, see `default_buffered_bytes`): a request's bytes count from the moment
   they are announced (Content-Length, reserved up front) or arrive (counted per chunk) until
   the request ends, however it ends; one that would pass the bound gets 503 with
   `Retry-After` (so many slow uploads at once cannot hold many times `max_body_bytes` of
   memory while none of them holds a slot yet).
   A method the guard reads no body of (GET, DELETE, ...: outside `BODY_METHODS`) without a
   Content-Length is passed on unread; when it declares a chunked body (Transfer-Encoding)
   anyway, its answer, whatever it is, carries `Connection: close`, like a request no route
   takes: the server then drops the connection instead of reading and discarding a body no time
   limit bounds (an endless one would hold the connection forever);
4. holds one of `max_concurrency` slots while the app handles the request: 503 with
   `Retry-After` when none is free. Public routes (health, metrics, docs: passed on at step 1)
   bypass this limit so probes keep answering under overload.

Refusals are rendered by the service's own `render` (problem+json for the planner, OIP's
`{"error": …}` for the edge), and counted through `on_reject(reason, route)` (the route's path
template, such as `/models/{model}`). Every refusal sent
before the body was fully read (401, 403, `before_body`'s, 400, 408, 413, 415, and the 503 of a full buffer) carries
`Connection: close`, so the server drops the connection instead of reading and discarding the
rest of the body, which no time limit would bound; the 503 of no free slot (body already read)
keeps the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from starlette.routing import Match

try:  # FastAPI with lazily included routers
    from fastapi.routing import iter_route_contexts
except ImportError:  # pragma: no cover - older FastAPI: included routes are plain entries
    iter_route_contexts = None
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dapdee.bounded_cache import BoundedCache
from dapdee.web.security import (
    AUTH_SCOPE_KEY,
    DEFAULT_ACCESS,
    PUBLIC,
    Access,
    AuthFailure,
    TokenSet,
    authorize,
    is_loopback,
)
from dapdee.web.security import declared_access as route_access

if TYPE_CHECKING:
    from dapdee.web.settings import GuardSettings

Render = Callable[[int, str], tuple[bytes, str]]  # (status, message) -> (body, content type)
# a check of an authorised request's target before its body is read: (status, reason, message)
# refuses it, None lets it through
BeforeBody = Callable[[Scope], "tuple[int, str, str] | None"]
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# the routes cached per (method, path): a path is the client's to choose (up to the server's
# head limit, tens of KB), so the cache is bounded by the bytes its paths hold, not their count
ACCESS_CACHE_BYTES = 1 << 20
ROUTE_SCOPE_KEY = "dapdee.route"  # set by the guard: the request's `RouteAccess`, for its callbacks
ACCESS_ENTRY_BYTES = 256  # what an entry holds besides its path (key tuple, dict node)
BUFFERED_BODIES = 4  # the default buffer bound holds at most this many bodies of the largest size


def default_buffered_bytes(max_body_bytes: int, max_concurrency: int) -> int:
    """The default bound on the body bytes all requests hold at once: room for one largest body
    per slot plus one being received, at most `BUFFERED_BODIES` of them. O(1)."""
    return max_body_bytes * min(max_concurrency + 1, BUFFERED_BODIES)


def check_buffered_bytes(max_buffered_bytes: int | None, max_body_bytes: int | None) -> int | None:
    """`max_buffered_bytes` when it can hold one body of `max_body_bytes` (None: the default,
    which always can; `max_body_bytes` None: not known, so not checked); ValueError otherwise,
    since a body past it could never be received. O(1)."""
    if max_buffered_bytes is None or max_body_bytes is None:
        return max_buffered_bytes
    if max_buffered_bytes < max_body_bytes:
        raise ValueError(
            f"max_buffered_bytes ({max_buffered_bytes}) must be at least max_body_bytes ({max_body_bytes}), "
            "or a body within the limit could never be received"
        )
    return max_buffered_bytes


def install_request_guard(
    app: Any,
    settings: GuardSettings,
    render: Render,
    on_reject: Callable[[str, str], None],
    body_limit: Callable[[Scope], int] | None = None,
    before_body: BeforeBody | None = None,
) -> None:
    """Add the `RequestGuard` to `app` as its outermost middleware so far, over `app`'s routes,
    with the tokens in `app.state.tokens` and the limits in `settings`; `loopback_hosts_only`
    while the service runs open (no token) and `insecure` is not set: no DNS rebinding. O(1)."""
    tokens: TokenSet = app.state.tokens
    app.add_middleware(
        RequestGuard,
        routes_app=app,
        tokens=tokens,
        render=render,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_concurrency=settings.max_concurrency,
        max_buffered_bytes=settings.max_buffered_bytes,
        on_reject=on_reject,
        body_limit=body_limit,
        before_body=before_body,
        loopback_hosts_only=tokens.open and not settings.insecure,
    )


class RouteAccess(NamedTuple):
    """The route a request reaches: its declared access (None, and no template: no route takes
    the request), its path template (`/models/{model}`) and the path parameters the route's own
    match read (`(("model", "tiny"),)`)."""

    access: Access | None
    route: str
    params: tuple[tuple[str, str], ...] = ()


NO_ROUTE = RouteAccess(None, "")


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


class RequestGuard:
    """See the module docstring. `routes_app` is the FastAPI app whose routes declare access."""

    def __init__(
        self,
        app: ASGIApp,
        routes_app: Any,
        tokens: TokenSet,
        render: Render,
        max_body_bytes: int,
        body_timeout_s: float,
        max_concurrency: int,
        on_reject: Callable[[str, str], None] | None = None,
        body_limit: Callable[[Scope], int] | None = None,
        max_buffered_bytes: int | None = None,
        before_body: BeforeBody | None = None,
        loopback_hosts_only: bool = False,
    ) -> None:
        check_buffered_bytes(max_buffered_bytes, max_body_bytes)
        buffered = max_buffered_bytes
        if buffered is None:
            buffered = default_buffered_bytes(max_body_bytes, max_concurrency)
        self.app = app
        self.routes_app = routes_app
        self.tokens = tokens
        self.render = render
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_concurrency = max_concurrency
        self.on_reject = on_reject
        self.body_limit = body_limit
        self.before_body = before_body
        self.loopback_hosts_only = loopback_hosts_only
        self.active = 0  # requests holding a slot (event-loop confined: no lock needed)
        self.buffer = _BodyBuffer(buffered)
        self._watch = _BodyWatch(body_timeout_s)
        self._access: BoundedCache[tuple[str, str], RouteAccess] = BoundedCache(ACCESS_CACHE_BYTES)
        docs = (
            routes_app.openapi_url,
            routes_app.docs_url,
            routes_app.redoc_url,
            routes_app.swagger_ui_oauth2_redirect_url,
        )
        self._public_paths = frozenset(p for p in docs if p)

    def route_for(self, scope: Scope) -> RouteAccess:
        """The route `scope` reaches, with its access (`NO_ROUTE`: none). Cached per (method,
        path), the most recently used that fit ACCESS_CACHE_BYTES (paths carry names); a miss
        walks the routes: O(#routes) regex matches."""
        key = (scope["method"], scope["path"])
        found = self._access.get(key)
        if found is not None:
            return found
        found = NO_ROUTE
        if scope["path"] in self._public_paths:
            found = RouteAccess(PUBLIC, scope["path"])
        else:
            for route in _flat_routes(self.routes_app):
                match, child = route.matches(scope)
                if match == Match.FULL:
                    access = route_access(getattr(route, "dependencies", ())) or DEFAULT_ACCESS
                    params = tuple((k, str(v)) for k, v in child.get("path_params", {}).items())
                    found = RouteAccess(access, getattr(route, "path", ""), params)
                    break
        self._access.put(key, found, ACCESS_ENTRY_BYTES + 2 * len(scope["path"]))  # the path, and its parameters
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard one HTTP request (other scopes pass through); the body bytes it held go back to
        the buffer however it ends. O(body bytes) on top of the app."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hold = _Hold(self.buffer)
        try:
            await self._guarded(scope, receive, send, hold)
        finally:  # however the request ends: answered, refused, failed, cancelled
            hold.release()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, hold: _Hold) -> None:
        """The checks of the module docstring, in order, then the app; the body's bytes are
        counted in `hold`."""
        original = receive
        scope[ROUTE_SCOPE_KEY] = routed = self.route_for(scope)
        access, route = routed.access, routed.route
        if self.loopback_hosts_only and not _loopback_name(host := _header(scope, b"host")):
            shown = (host or "")[:80]
            message = f"Host {shown!r} is not a loopback name: this service runs open (no token) for loopback only"
            await self._refuse(send, _Refusal(403, "forbidden", message), route, close=True)
            return
        if access is None or access.public:  # no route (the app's 404/405), or a public one: no body read
            await self.app(scope, receive, _closing(send) if _may_have_body(scope) else send)
            return
        try:
            outcome = authorize(self.tokens, access, _header(scope, b"authorization"))
            if isinstance(outcome, AuthFailure):
                raise _Refusal(outcome.status, outcome.reason, outcome.message, outcome.headers)
            scope[AUTH_SCOPE_KEY] = outcome
            # only a caller the route lets in learns what the service's own check says
            early = self.before_body(scope) if self.before_body is not None else None
            if early is not None:
                raise _Refusal(*early)
            receive = await self._buffered(scope, receive, hold)
        except _Refusal as refusal:  # answered before the body was read (or while reading it)
            await self._refuse(send, refusal, route, close=True)
            return
        unread = _unread_body(scope, receive, original)
        if unread:  # a chunked body the guard does not read: no time limit would bound it
            send = _closing(send)
        if self.active >= self.max_concurrency:
            await self._refuse(
                send,
                _Refusal(
                    503,
                    "overloaded",
                    f"server busy ({self.max_concurrency} requests in progress); retry",
                    {"Retry-After": "1"},
                ),
                route,
                close=unread,
            )
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _buffered(self, scope: Scope, receive: Receive, hold: _Hold) -> Receive:
        """Read the whole body under the size, buffer and time limits and return a `receive` that
        replays it (later calls reach the client: disconnects stay visible); `hold` counts its
        bytes (a declared Content-Length up front). O(body bytes)."""
        # every Content-Encoding line counts: a coding on the second would pass a look at the first
        coding = ", ".join(v.decode("latin-1") for k, v in scope["headers"] if k == b"content-encoding") or None
        codings = {c.strip().lower() for c in coding.split(",")} if coding is not None else set()
        if codings - {"", "identity"} and _may_have_body(scope):
            # taken uncompressed: the size limit must bound what is decoded, not what is sent
            raise _Refusal(
                415,
                "bad_request",
                f"Content-Encoding {coding[:40]!r}: request bodies are taken uncompressed; send it without a coding",
                {"Accept-Encoding": "identity"},
            )
        limit = self.max_body_bytes
        if self.body_limit is not None:
            limit = min(limit, self.body_limit(scope))
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):  # '²'.isdigit(), but int('²') fails
                raise _Refusal(400, "bad_request", "Content-Length: not a non-negative integer")
            if int(declared) > limit:
                raise _Refusal(413, "too_large", _too_large(int(declared), limit))
            hold.cover(int(declared))
        if scope["method"] not in BODY_METHODS and not declared:
            return receive
        chunks: list[bytes] = []
        size = 0
        task = asyncio.current_task()
        assert task is not None
        self._watch.start(task, time.monotonic() + self.body_timeout_s)
        try:
            while True:
                message = await receive()
                size += self._take(message, chunks, size, limit, hold)
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if not self._watch.timed_out(task):
                raise
            raise _Refusal(408, "timeout", f"request body not received within {self.body_timeout_s:g} s") from None
        finally:
            self._watch.end(task)
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return replayed

    @staticmethod
    def _take(message: Message, chunks: list[bytes], size: int, limit: int, hold: _Hold) -> int:
        """Add one body message's bytes to `chunks`, counted in `hold` (refusals: disconnect,
        over `limit`, buffer full); its size. O(1)."""
        if message["type"] == "http.disconnect":
            raise _Refusal(400, "disconnected", "client disconnected while sending the body")
        body = message.get("body", b"")
        if size + len(body) > limit:
            raise _Refusal(413, "too_large", _too_large(None, limit))
        hold.cover(size + len(body))
        chunks.append(body)
        return len(body)

    async def _refuse(self, send: Send, refusal: _Refusal, route: str, close: bool) -> None:
        """Send `refusal` as the whole response, rendered by the service. `close`: the body was
        not (fully) read, so the response carries `Connection: close`: the server then drops the
        connection instead of reading and discarding whatever the client still sends (an endless
        body, unauthenticated and past every time limit, on a kept-alive connection)."""
        if self.on_reject is not None:
            self.on_reject(refusal.reason, route)
        body, content_type = self.render(refusal.status, refusal.message)
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyBuffer:
    """The body bytes all requests of a guard hold at once, within `limit` (event-loop confined:
    no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class _Hold:
    """The bytes one request holds in a `_BodyBuffer`; `release` gives them all back."""

    __slots__ = ("buffer", "bytes")

    def __init__(self, buffer: _BodyBuffer) -> None:
        self.buffer = buffer
        self.bytes = 0

    def cover(self, size: int) -> None:
        """Hold at least `size` bytes: take the missing ones from the buffer, or refuse with 503
        when that would pass its limit (the request's bytes held so far stay held until
        `release`). O(1)."""
        more = size - self.bytes
        if more <= 0:
            return
        if self.buffer.held + more > self.buffer.limit:
            raise _Refusal(
                503,
                "overloaded",
                f"server busy (request bodies in progress fill the {self.buffer.limit}-byte buffer); retry",
                {"Retry-After": "1"},
            )
        self.buffer.held += more
        self.bytes = size

    def release(self) -> None:
        """Give every byte held back to the buffer (idempotent). O(1)."""
        self.buffer.held -= self.bytes
        self.bytes = 0


class _BodyWatch:
    """One timer for every body read of a guard (instead of a timer per request): a watchdog task
    wakes every `tick_s` and cancels the reads past their deadline, remembering which, so the
    read can answer 408. The watchdog runs while reads happen and stops after a quiet second.
    Cost per read: two dict operations."""

    def __init__(self, timeout_s: float) -> None:
        self.tick_s = min(0.25, max(timeout_s / 4, 0.01))
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.watchdog: asyncio.Task[None] | None = None
        self.last_read = 0.0

    def start(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.deadlines[task] = deadline
        self.last_read = time.monotonic()
        if self.watchdog is None or self.watchdog.done():
            self.watchdog = asyncio.get_running_loop().create_task(self._run(), name="dapdee-body-watch")

    def end(self, task: asyncio.Task[Any]) -> None:
        self.deadlines.pop(task, None)

    def timed_out(self, task: asyncio.Task[Any]) -> bool:
        """True (once) when the watchdog cancelled `task`'s read; it then takes the cancel back."""
        if task not in self.expired:
            return False
        self.expired.discard(task)
        if hasattr(task, "uncancel"):  # Python 3.11+: keep the task's cancel count straight
            task.uncancel()
        return True

    async def _run(self) -> None:
        while self.deadlines or time.monotonic() - self.last_read < 1.0:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            for task, deadline in list(self.deadlines.items()):
                if deadline <= now:
                    del self.deadlines[task]
                    self.expired.add(task)
                    task.cancel()


def _too_large(size: int | None, limit: int) -> str:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return f"{what} exceeds the limit of {limit} bytes"


def _flat_routes(app: Any) -> Iterable[Any]:
    """The app's routes with included routers expanded: newer FastAPI keeps an included router as
    one lazy entry, and `iter_route_contexts` yields each of its routes with the include's prefix
    and dependencies applied (older FastAPI copies them into `app.router.routes`). O(#routes)."""
    if iter_route_contexts is None:
        return app.router.routes
    return iter_route_contexts(app.router.routes)


def _may_have_body(scope: Scope) -> bool:
    """Whether the request declares a body: a non-zero Content-Length, or Transfer-Encoding."""
    length = _header(scope, b"content-length")
    return (length is not None and length.strip() not in ("", "0")) or _header(scope, b"transfer-encoding") is not None


def _closing(send: Send) -> Send:
    """`send` with `Connection: close` added to the response head, so that the server drops the
    connection after the answer instead of reading and discarding a body no one reads."""

    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing


def _unread_body(scope: Scope, receive: Receive, original: Receive) -> bool:
    """Whether a body may still be on the connection: the guard passed the request on unread
    (`receive` is still the server's `original`: a method without a body and without a
    Content-Length) and it declares a chunked body (Transfer-Encoding). Its answer must then
    carry `Connection: close`. O(#headers)."""
    return receive is original and _header(scope, b"transfer-encoding") is not None


def _loopback_name(host: str | None) -> bool:
    """Whether a `Host` header names this machine's loopback (`localhost`, 127.0.0.0/8 or
    `[::1]`, any port). O(len(host))."""
    if not host:
        return False
    if host.startswith("["):  # [v6] or [v6]:port
        end = host.find("]")
        return end > 0 and is_loopback(host[1:end])
    return is_loopback(host.rsplit(":", 1)[0])


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
