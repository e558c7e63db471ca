"""RFC 9457 problem details: how the planner answers every 4xx/5xx.

`{"type", "title", "status", "detail"}` as `application/problem+json`, plus `errors`
(`[{"loc", "msg", "type"}]`) on validation failures. The same rendering serves the request
guard's refusals (401/403/408/413/415/503 before a body is parsed), FastAPI's and Starlette's own
errors (404 unknown route, 405, 422), the routes' `ApiProblem`s and unexpected exceptions (500).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from dapdee.api.planner import PROBLEM_MEDIA_TYPE
from dapdee.web.http_head import BoundedHeadProtocol

log = logging.getLogger("dapdee.planner")

VALIDATION = "urn:dapdee:problem:validation"
VERSION_CONFLICT = "urn:dapdee:problem:version-conflict"
CAPACITY = "urn:dapdee:problem:capacity"
MISSING_TIMINGS = "urn:dapdee:problem:missing-timings"
PLAN_BUDGET = "urn:dapdee:problem:plan-budget"
TITLES = {
    VALIDATION: "Invalid request",
    VERSION_CONFLICT: "Version conflict",
    CAPACITY: "Capacity exceeded",
    MISSING_TIMINGS: "Timings missing",
    PLAN_BUDGET: "Plan over its time budget",
}


class ApiProblem(StarletteHTTPException):
    """An error a route answers with: status, detail naming the problem, an optional problem
    type URN (default about:blank) and headers. A 422 names where the bad value was (`loc`,
    e.g. ("body", "nodes")) and is answered like every other validation error: its `errors`
    are one `value_error` at `loc` whose message is the detail, unless `errors` gives them."""

    def __init__(
        self,
        status: int,
        detail: str,
        type_: str = "about:blank",
        headers: Mapping[str, str] | None = None,
        loc: tuple[str | int, ...] = ("body",),
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(status, detail, dict(headers) if headers else None)
        self.type = type_
        self.loc = loc
        self.errors = errors


def problem_bytes(
    status: int, detail: str, type_: str = "about:blank", errors: list[dict[str, Any]] | None = None
) -> bytes:
    """The problem document as strict JSON bytes (never NaN: inputs echoed in `errors` are not
    kept). O(size of errors)."""
    title = TITLES.get(type_) or _reason(status)
    doc: dict[str, Any] = {"type": type_, "title": title, "status": status, "detail": detail or title}
    if errors is not None:
        doc["errors"] = errors
    return json.dumps(doc, allow_nan=False, default=str).encode()


def problem_response(
    status: int,
    detail: str,
    type_: str = "about:blank",
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body = b"" if status in (204, 304) else problem_bytes(status, detail, type_, errors)
    return Response(body, status, headers=dict(headers) if headers else None, media_type=PROBLEM_MEDIA_TYPE)


def render_refusal(status: int, message: str) -> tuple[bytes, str]:
    """The request guard's renderer: (body, content type) of a refusal. O(len(message))."""
    return problem_bytes(status, message), PROBLEM_MEDIA_TYPE


class ProblemHeadProtocol(BoundedHeadProtocol):
    """The bounded request head (`BoundedHeadProtocol`) answering its 408 and 431 as problem
    documents, like every other planner error; uvicorn's `http` for the planner."""

    render = render_refusal


def validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """pydantic / FastAPI errors as `[{"loc", "msg", "type"}]` (the input values are not echoed:
    they may be large, secret or not JSON). O(errors)."""
    return [{"loc": [*e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]


def validation_problem(errors: list[dict[str, Any]]) -> Response:
    """A 422 naming every invalid field: `detail` says the first (and how many more)."""
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return problem_response(422, f"{where}: {first['msg']}{more}", VALIDATION, errors)


SHOWN_PATH = 200  # the characters of a request's path a 404/405 repeats


def install(app: FastAPI) -> None:
    """Make every error of `app` a problem document (HTTP errors, validation errors, crashes)."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code == 422:
            errors = getattr(exc, "errors", None)
            if errors is None:
                errors = [{"loc": [*getattr(exc, "loc", ("body",))], "msg": detail, "type": "value_error"}]
            return problem_response(422, detail, VALIDATION, errors)
        if detail == _reason(exc.status_code):  # Starlette's own 404/405: say what was asked
            path = request.url.path  # cut: the head limit allows a path of 64 KiB
            detail = f"{detail}: {request.method} {path if len(path) <= SHOWN_PATH else path[:SHOWN_PATH] + '...'}"
        return problem_response(exc.status_code, detail, getattr(exc, "type", "about:blank"), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return validation_problem(validation_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "internal error; the planner logged it")


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
