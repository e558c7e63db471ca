"""Typed JSON bodies parsed by pydantic-core, as POST /plan's body is.

`validated(model, raw)` parses and validates a raw body in one pydantic-core pass, for routes
that take their body raw (POST /plan, for speed; PUT /models/{model}, to do it off the event
loop when it is large).

A route of a router made with `route_class=PydanticJsonRoute` keeps its typed body parameter
(validated, and documented in OpenAPI, by FastAPI as usual), but its JSON is parsed by
pydantic-core's parser instead of Python's `json`. That parser bounds nesting (at most 200
levels) without recursion, so a body nested thousands of levels deep is a 422 naming the body,
like every other invalid body, instead of FastAPI's generic 400 ("There was an error parsing the
body") for Python's RecursionError. Any JSON it cannot parse is the same 422, with the reason."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json

from dapdee.planner.problems import ApiProblem

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], raw: bytes) -> M:
    """`raw` parsed and validated as `model` in one pydantic-core pass; a RequestValidationError
    names every bad field under `body` (the app answers it as FastAPI's own body errors).
    O(len(raw))."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


class PydanticJsonRequest(Request):
    """A request whose `json()` is parsed by pydantic-core."""

    _parsed: Any

    async def json(self) -> Any:
        """The body as JSON (parsed once, then cached): NaN and ±Infinity allowed as by Python's
        `json`; not JSON, or nested past pydantic-core's depth limit: `ApiProblem` 422 at
        `("body",)` with the error POST /plan gives (type `json_invalid`), which FastAPI passes to
        the app's problem handler. O(len(body))."""
        if not hasattr(self, "_parsed"):
            body = await self.body()
            try:
                self._parsed = from_json(body)
            except ValueError as exc:  # also the depth limit: "recursion limit exceeded at ..."
                msg = f"Invalid JSON: {exc}"  # as POST /plan's parser words it
                errors = [{"loc": ["body"], "msg": msg, "type": "json_invalid"}]
                raise ApiProblem(422, f"body: {msg}", loc=("body",), errors=errors) from None
        return self._parsed


class PydanticJsonRoute(APIRoute):
    """An `APIRoute` whose handler sees a `PydanticJsonRequest` (FastAPI's documented way to use
    a custom request class); everything else is FastAPI's own handling."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler of this route, given the request as a `PydanticJsonRequest`. O(1)
        per request on top of FastAPI's handler."""
        handler = super().get_route_handler()

        async def parsed_by_pydantic_core(request: Request) -> Response:
            return await handler(PydanticJsonRequest(request.scope, request.receive))

        return parsed_by_pydantic_core
