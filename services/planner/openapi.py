"""The planner's OpenAPI document: the description of its conventions (roles, errors, versions,
limits) and every error answer typed as an RFC 9457 `Problem` (`application/problem+json`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from dapdee.api.planner import PROBLEM_MEDIA_TYPE, Problem

DESCRIPTION = """\
Plans where to cut a DNN between a device and an edge worker, and which early exit to take.

**Access.** `Authorization: Bearer <token>`. Roles: *device* (`POST /plan`), *worker*
(`POST /workers/heartbeat`), *admin* (every write: models, profiles, deletes); reads take a
token of any role; `/healthz`, `/readyz`, `/metrics` and the docs are public. No or an unknown
token: 401 (`WWW-Authenticate: Bearer`); a token of another role: 403. Tokens and body sizes are
checked before a body is parsed.

**Errors.** Every 4xx and 5xx answer is an RFC 9457 problem document,
`application/problem+json`: `{"type", "title", "status", "detail"}`, where `type` is
`about:blank` or a URN naming the kind (`urn:dapdee:problem:validation`, `:version-conflict`,
`:capacity`, `:missing-timings`, `:plan-budget`) and `detail` names the offending field, header
or resource. A 422 adds `errors`: `[{"loc": ["body", "bandwidth_mbps"], "msg": ..., "type": ...}]`,
one entry per invalid value; an unknown field in a request body is one of them.

**Versions.** Each model has an integer `version` (1 when created, +1 with every change of its
graph or profiles), in answers and as `ETag: "<version>"`. Writes may send
`If-Match: "<version>"`: 409 when the model has moved on. `PUT` answers 201 when it created the
model or profile, 200 when it replaced it; `DELETE` answers 204.

**Limits.** Bodies over `DAPDEE_MAX_BODY_BYTES` (2 MiB): 413; bodies with a `Content-Encoding`
other than identity: 415; bodies slower than
`DAPDEE_BODY_TIMEOUT_S`: 408; more than `DAPDEE_MAX_CONCURRENCY` requests at once, or bodies
in flight past `DAPDEE_MAX_BUFFERED_BYTES` in all (default: a few bodies' worth): 503 with
`Retry-After`. Cost graphs: at most `DAPDEE_MAX_NODES` nodes, `DAPDEE_MAX_EXITS` exits,
`DAPDEE_MAX_IN_DEGREE` producers per node, byte counts <= 2^40, timings finite and <= 1e7 ms.
A plan that needs min-cuts (a graph too large to enumerate) gets `DAPDEE_PLAN_BUDGET_S`: 503
with `Retry-After` past it. Every number in a plan is finite (`throughput_fps` is null when
nothing takes time).
"""

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"description": "a problem document naming what was wrong with the request"},
    "5XX": {"description": "a problem document (503: overloaded or over the plan budget; retry)"},
}

_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def install(app: FastAPI) -> None:
    """Serve `app`'s OpenAPI document with the `Problem` schema as every error's content (built
    once, on first request). O(routes)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
            openapi_version=app.openapi_version,
        )
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(problem.pop("$defs", {}))
        comps["Problem"] = problem
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape: not ours
            comps.pop(unused, None)
        for path in spec.get("paths", {}).values():
            for operation in path.values():
                for code, response in operation.get("responses", {}).items():
                    if code[:1] in ("4", "5"):
                        response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": _PROBLEM_REF}}
        app.openapi_schema = spec
        return spec

    app.openapi = schema  # type: ignore[method-assign]  (FastAPI's documented way to extend it)
