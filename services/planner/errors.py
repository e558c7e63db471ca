"""What the planner's store raises; the HTTP layer maps each to a status (see each docstring)."""

from __future__ import annotations


class RedisUnavailable(Exception):
    """Redis is disabled, backing off after a failure, or just failed (never reaches a client:
    the store answers from process memory and queues writes instead). `tried`: the command was
    sent, so Redis may have run it (False: disabled or backing off, nothing sent)."""

    def __init__(self, message: str, tried: bool = True) -> None:
        super().__init__(message)
        self.tried = tried


class RedisRefused(RedisUnavailable):
    """Redis answered but refused the command: out of memory (`maxmemory` under `noeviction`), a
    read-only replica, or busy running a script. Redis is there and serves reads (except when
    busy): the link stays up. Callers that fall back on process memory for RedisUnavailable do
    so here too; a model or profile write is not queued but answered 503 with Retry-After (it
    changed nothing). `reason` names the refusal ("out of memory", "read-only", "busy")."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"Redis refused the command ({reason}): {detail}")
        self.reason = reason


class ModelUnreachable(Exception):
    """A model this replica has not cached could not be read because Redis is unavailable. It may
    exist (another replica stored it), yet the planner never answers 5xx because Redis is away:
    HTTP 404 whose detail says so, with Retry-After."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} is not in this planner's memory and Redis is unavailable, so it may be stored "
            "but cannot be read now; retry"
        )
        self.model = model


class MapBuildPending(Exception):
    """A plan map still being built when the request that needs it may wait no longer (HTTP 503
    plan-budget with Retry-After); the build goes on, and a retry finds its map."""


class MissingTimings(Exception):
    """A plan needs timings nobody uploaded; the message says what to upload (HTTP 409)."""


class VersionConflict(Exception):
    """A write based on `expected` found `actual` stored (None: the model does not exist), or lost
    the race against other replicas' writes too often to be retried (HTTP 409)."""

    def __init__(self, model: str, expected: int | None, actual: int | None) -> None:
        now = "does not exist" if actual is None else f"is at version {actual}"
        want = "" if expected is None else f", not {expected}"
        super().__init__(f"model {model!r} {now}{want}; read it again and retry")
        self.model = model
        self.expected = expected
        self.actual = actual


class UnknownNodes(Exception):
    """A profile names nodes that the model's graph, as stored when the write is made, lacks:
    `nodes` (sorted; HTTP 422 on `timings_ms`)."""

    def __init__(self, model: str, nodes: list[str]) -> None:
        super().__init__(f"timings_ms: unknown nodes {nodes[:5]} (model {model!r})")
        self.model = model
        self.nodes = nodes


class CapacityExceeded(Exception):
    """A new stored thing past its count cap: `what` ("models", "profiles", "workers", "pending
    writes") and the `limit` (HTTP 409). The message says what to do."""

    def __init__(self, what: str, limit: int, detail: str | None = None) -> None:
        super().__init__(detail or f"the planner holds the maximum of {limit} {what}; delete one first")
        self.what = what
        self.limit = limit
