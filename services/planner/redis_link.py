"""One planner replica's Redis connection and the rule every Redis call follows.

Every call goes through `RedisLink.call`: a failure is counted under the call's `op`
(`dapdee_planner_cache_errors_total{op}`), marks Redis down for a back-off period during which
no call is even tried, and raises `RedisUnavailable`, which the callers turn into "answer from
process memory" or "queue the write". Short socket timeouts keep a dead Redis from stalling a
request. Lua scripts run with `EVALSHA` (loaded again after a Redis restart). A script that
Redis ran and that failed (a bug, not an outage) is counted and raised the same way but logged
at ERROR and leaves the link up: it must not page as "Redis down" nor stop every other call.
A command Redis refuses (OOM under `maxmemory` + `noeviction`, READONLY, BUSY; from inside a
script too) raises `RedisRefused`: counted the same way, logged at WARNING (at most once per
REFUSAL_LOG_S for each reason), and the link stays up without a back-off: Redis still serves
reads (all but BUSY), so readiness and `dapdee_planner_redis_up` do not flap."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from dapdee.planner.config import Settings
from dapdee.planner.errors import RedisRefused, RedisUnavailable
from dapdee.planner.metrics import PlannerMetrics

log = logging.getLogger("dapdee.planner")

REDIS_CLOSE_S = 2.0  # closing the client at shutdown waits at most this
REFUSAL_LOG_S = 60.0  # a refusal of the same reason is logged again at most this often


class RedisLink:
    """The client (None when DAPDEE_REDIS_URL is none), its state (`disabled | up | down`) and
    the back-off. Create it inside a running event loop (`connect`), `close` it there."""

    def __init__(self, settings: Settings, metrics: PlannerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.client: Any = None
        self.state = "disabled"
        self._down_until = 0.0
        self._scripts: dict[str, Any] = {}
        self._refusal_logged: dict[str, float] = {}  # reason -> when last logged (monotonic)

    @property
    def enabled(self) -> bool:
        """A Redis URL is configured (whether or not Redis answers now)."""
        return self.client is not None

    def connect(self) -> None:
        """Create the client when a URL is set (no round trip: the first call connects)."""
        if not self.settings.redis_url:
            return
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        t = self.settings.redis_timeout_s
        self.client = Redis.from_url(
            self.settings.redis_url,
            socket_timeout=t,
            socket_connect_timeout=t,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.state = "up"

    def retry_now(self) -> None:
        """End the back-off, so the next call tries Redis at once."""
        self._down_until = 0.0

    async def call(self, op: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one Redis operation `fn(client)`, or raise RedisUnavailable (disabled, backing
        off, or failed now: counted under `op`, starts a back-off), or RedisRefused (a
        RedisUnavailable: Redis answered but refused it; counted, no back-off, the link stays
        up). O(1) plus the operation."""
        if self.client is None:
            raise RedisUnavailable("redis disabled", tried=False)
        if time.monotonic() < self._down_until:
            raise RedisUnavailable("redis down (backing off)", tried=False)
        from redis.exceptions import RedisError

        try:
            res = await fn(self.client)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.metrics.cache_errors.labels(op).inc()
            reason = refusal(exc)
            if reason is not None:
                self._answered()
                self._log_refusal(op, reason, exc)
                raise RedisRefused(reason, str(exc)) from None
            if _script_failed(exc):
                log.error("redis script %s failed: %s", op, exc)
                raise RedisUnavailable(str(exc)) from None
            if self.state != "down":
                log.warning("redis unavailable (%s: %s); serving from the in-process cache", op, exc)
            self.state = "down"
            self._down_until = time.monotonic() + self.settings.redis_backoff_s
            raise RedisUnavailable(str(exc)) from None
        self._answered()
        return res

    def _answered(self) -> None:
        """Redis answered (a result or a refusal): the link is up again if it was down. O(1)."""
        if self.state == "down":
            log.warning("redis is back")
            self.state = "up"

    def _log_refusal(self, op: str, reason: str, exc: BaseException) -> None:
        """Log a refused command at WARNING, at most once per REFUSAL_LOG_S for each reason. O(1)."""
        now = time.monotonic()
        last = self._refusal_logged.get(reason)
        if last is not None and now - last < REFUSAL_LOG_S:
            return
        self._refusal_logged[reason] = now
        log.warning("redis refused %s (%s): %s; writes fail until it accepts them, reads go on", op, reason, exc)

    async def check_eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy` (None if Redis does not say: down, or CONFIG disabled);
        logs a WARNING unless it is `noeviction`, the only policy under which stored models,
        profiles and workers cannot be evicted. Not counted as a failure. One round trip."""
        if self.client is None:
            return None
        from redis.exceptions import RedisError

        try:
            got = await self.client.config_get("maxmemory-policy")
        except (RedisError, OSError, asyncio.TimeoutError):
            return None
        policy = got.get("maxmemory-policy") if isinstance(got, dict) else None
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy is not None and policy != "noeviction":
            log.warning(
                "redis maxmemory-policy is %s: under memory pressure it may evict stored models, profiles "
                "and workers; run it with maxmemory-policy noeviction (the planner caps what it stores)",
                policy,
            )
        return policy

    async def script(self, op: str, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run the Lua script `source` atomically with `keys` and `args` (through `call`)."""
        if self.client is None:
            raise RedisUnavailable("redis disabled", tried=False)
        sc = self._scripts.get(source)
        if sc is None:
            sc = self._scripts[source] = self.client.register_script(source)
        return await self.call(op, lambda r: sc(keys=list(keys), args=list(args), client=r))

    async def close(self) -> None:
        """Close the client (bounded: REDIS_CLOSE_S)."""
        if self.client is None:
            return
        client, self.client = self.client, None
        try:
            await asyncio.wait_for(client.aclose(), REDIS_CLOSE_S)
        except Exception as exc:  # closing must never fail a shutdown
            log.debug("redis client close: %s", exc)


def refusal(exc: BaseException) -> str | None:
    """The reason Redis refused a command ("out of memory", "read-only", "busy"), or None when
    `exc` is no refusal. Redis says so with the reply's error code (OOM, READONLY, BUSY), which
    redis-py turns into an exception class or keeps in the text (BUSY; a pipeline prefixes the
    text with the command, a script's error keeps the code). O(len(message))."""
    from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

    if isinstance(exc, OutOfMemoryError):
        return "out of memory"
    if isinstance(exc, ReadOnlyError):
        return "read-only"
    if not isinstance(exc, ResponseError):
        return None
    text = str(exc)
    for code, reason in (("OOM", "out of memory"), ("READONLY", "read-only"), ("BUSY", "busy")):
        if text.startswith(code + " ") or f": {code} " in text:
            return reason
    return None


def _script_failed(exc: BaseException) -> bool:
    """Whether Redis ran a Lua script and it raised (Redis 7 says `user_script:<line>` or `Error
    running script`), as opposed to Redis not answering or refusing work (OOM, READONLY, BUSY:
    their replies from inside a script name `user_script:` too). O(len(message))."""
    from redis.exceptions import ResponseError

    text = str(exc)
    if not isinstance(exc, ResponseError) or refusal(exc) is not None:
        return False
    return "user_script:" in text or "Error running script" in text
