"""The edge worker's OpenAPI document: every error answer typed as OIP's `{"error": message}`
(`ErrorResponse`), on every route.

The request guard answers before any route runs, on every route that takes a token (GET ones
included; a public route's request is passed on unread): 401/403 (token), 400/408/413/415 (the
body: malformed, too slow, too large, compressed) and 503 with `Retry-After` (the concurrency
limit). So each operation declares the `4XX` and `5XX` ranges
beside its own codes, and every error code that carries a body is typed as `ErrorResponse`
(FastAPI's default 422 body, `HTTPValidationError`, is not what this app answers). A v2 health
answer's 400 means false and has no body: it is left as declared.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from dapdee.api.oip import ErrorResponse

ERROR_RANGES: dict[str, str] = {
    "4XX": '`{"error": ...}` naming what was wrong: a missing or wrong token (401, 403), a body the '
    "request guard refused (400 malformed, 408 too slow, 413 too large, 415 compressed), an unknown "
    "model (404) or a bad tensor or parameter (400, 422)",
    "5XX": '`{"error": ...}`: 503 with `Retry-After` when the worker runs as many requests as it '
    "admits at once or shuts down, without it when an infer request's `timeout` passed before its "
    "batch started; 500 for an error of the worker itself",
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def install(app: FastAPI) -> None:
    """Serve `app`'s OpenAPI document with `ErrorResponse` as every error's content and the
    `4XX`/`5XX` ranges on every operation (built once, on first request). O(routes)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        comps["ErrorResponse"] = ErrorResponse.model_json_schema()
        for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape: not ours
            comps.pop(unused, None)
        for path in spec.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                for code, response in responses.items():
                    if code[:1] in ("4", "5") and "content" in response:
                        response["content"] = _ERROR_CONTENT
                for code, description in ERROR_RANGES.items():
                    responses.setdefault(code, {"description": description, "content": _ERROR_CONTENT})
        app.openapi_schema = spec
        return spec

    app.openapi = schema  # type: ignore[method-assign]  (FastAPI's documented way to extend it)
