"""A stand-in HTTP server for the SDK's tests: it records every request (method, path,
headers, body) and answers with what the test set, so the tests can send the SDK answers a
real service never gives (off-contract bodies, redirects) and see exactly what it sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Standin:
    """`app` answers every request with `status`, `headers` and `body` (changeable between
    requests) and appends it to `requests`."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    body: bytes = b"{}"
    requests: list[Recorded] = field(default_factory=list)

    def answer(self, body: bytes | str, status: int = 200, **headers: str) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}

    @property
    def app(self) -> FastAPI:
        app = FastAPI(openapi_url=None)

        @app.api_route("/{path:path}", methods=["GET", "PUT", "POST", "DELETE"])
        async def record(path: str, request: Request) -> Response:
            body = await request.body()
            self.requests.append(Recorded(request.method, "/" + path, dict(request.headers), body))
            return Response(self.body, self.status, headers=self.headers)

        return app


def answer_bytes(obj: Any) -> bytes:
    """`obj` as JSON, allowing NaN and Infinity (which JSON has no spelling for: what a broken
    server might send)."""
    import json

    return json.dumps(obj, allow_nan=True).encode()
