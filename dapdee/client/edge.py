"""The edge worker's client: Open Inference Protocol v2 inference from any cut to any exit,
health and metadata, on `dapdee.wire` (the one tensor codec).

`EdgeClient` (sync) and `AsyncEdgeClient` (async) have the same methods. `infer` sends the
boundary tensors of a cut (named by graph node; first dimension = rows) as FP32, FP16 or INT8,
binary or JSON, and asks for one exit. The answer is checked before it is returned, since the
device trusts nothing: the model and exit it names, the request id, `logits` (floating, finite,
[rows, ...]) and `class` (INT64, [rows], a valid index), and the worker's timings (finite
numbers >= 0, of the right types); anything else is a `ProtocolError`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from typing_extensions import Unpack

from dapdee import wire
from dapdee.api.oip import InferResponseParameters, ModelMetadata, ServerMetadata
from dapdee.client.errors import RequestError
from dapdee.client.transport import (
    Answer,
    AsyncTransport,
    Call,
    SyncTransport,
    check_name,
    check_timeout,
    reader,
)

HEALTH = frozenset({200, 400, 503})  # v2 health: 200 true, a 4xx false (this worker: 400); 503 also false


@dataclass(frozen=True)
class InferResult:
    """One checked infer answer: `logits` [rows, ...] and `classes` [rows], the worker's
    parameters (exit, queue / compute / server ms, batch), the request and answer sizes and the
    exchange's wall time as this client saw it."""

    model: str
    exit: str
    logits: torch.Tensor
    classes: torch.Tensor
    parameters: InferResponseParameters
    request_bytes: int
    response_bytes: int
    elapsed_ms: float
    id: str | None = None
    exits_taken: tuple[str, ...] | None = None  # with confidence: the exit that answered each row

    @property
    def queue_ms(self) -> float:
        return self.parameters.queue_ms

    @property
    def compute_ms(self) -> float:
        return self.parameters.compute_ms

    @property
    def server_ms(self) -> float:
        """The worker's time from receiving the request to answering it."""
        return self.parameters.server_ms


# ---- requests (pure) --------------------------------------------------------------------------------


def _model_path(model: str, version: str | None) -> str:
    path = f"/v2/models/{check_name(model, 'model')}"
    return path if version is None else f"{path}/versions/{check_name(version, 'version')}"


def _rows(inputs: Mapping[str, torch.Tensor]) -> int:
    if not isinstance(inputs, Mapping) or not inputs:
        raise RequestError("inputs: expected a non-empty mapping of tensor name -> tensor")
    rows = {name: t.shape[0] for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.dim() >= 1}
    if len(rows) != len(inputs):
        bad = next(name for name in inputs if name not in rows)
        raise RequestError(f"input {bad!r}: expected a tensor with a batch dimension")
    if len(set(rows.values())) != 1:
        raise RequestError(f"inputs: every tensor needs the same number of rows, got {rows}")
    count = next(iter(rows.values()))
    if count < 1:
        raise RequestError(f"inputs: expected at least 1 row, got {count}")
    return count


class InferOptions(TypedDict, total=False):
    """The options of an infer request (every one optional)."""

    exit: str | None  # the exit to answer (default: the model's deepest)
    wire_dtype: str  # how floating tensors travel: FP32 (default), FP16 or INT8 (per-tensor scale)
    binary: bool  # binary tensor extension both ways (default); False: JSON both ways
    confidence: bool  # parameter `confidence`: the worker may answer rows at confident earlier exits
    request_id: str | None  # the request's `id`, echoed in the answer (checked)
    # seconds, finite (default: the client's); also sent as parameter `timeout` (microseconds),
    # so the worker does not start the request once this client has given up on it
    timeout: float | None
    version: str | None  # the model version's route (default: the unversioned one)
    traceparent: str | None  # W3C trace context of the request (default: the current one)


def infer_call(model: str, inputs: Mapping[str, torch.Tensor], **options: Unpack[InferOptions]) -> Call[InferResult]:
    """`POST /v2/models/{model}[/versions/{version}]/infer` (options: `InferOptions`; another
    keyword is a RequestError): `inputs` (tensors by graph node name, first dimension = rows)
    encoded by `dapdee.wire`, parameters `exit`, `confidence` and `timeout` when given; the
    answer is checked as the module says. O(input bytes)."""
    unknown = sorted(set(options) - set(InferOptions.__annotations__))
    if unknown:
        raise RequestError(f"infer: unknown options {unknown}; known: {sorted(InferOptions.__annotations__)}")
    rows = _rows(inputs)
    exit, request_id, timeout = options.get("exit"), options.get("request_id"), options.get("timeout")
    confidence, binary = options.get("confidence", False), options.get("binary", True)
    if request_id is not None and not isinstance(request_id, str):  # echoed as a string: compared as one
        raise RequestError(f"request_id: expected a string, got {type(request_id).__name__}")
    params: dict[str, Any] = {}
    if exit is not None:
        params["exit"] = exit
    if confidence:
        params["confidence"] = True
    timeout_s = None if timeout is None else check_timeout(timeout)
    if timeout_s is not None:
        params["timeout"] = math.ceil(timeout_s * 1e6)
    try:
        content, headers = wire.encode_request(
            inputs,
            parameters=params,
            request_id=request_id,
            binary=binary,
            wire_dtype=options.get("wire_dtype", "FP32"),
            binary_output=binary,
        )
    except wire.WireError as exc:
        raise RequestError(f"inputs: {exc}") from None
    expect = _Expected(model, exit, rows, request_id, confidence, len(content))
    return Call(
        "POST",
        _model_path(model, options.get("version")) + "/infer",
        expect.read,
        content,
        headers,
        idempotent=False,  # a POST: never repeated after a broken connection (the worker may have run it)
        timeout_s=timeout_s,
        traceparent=options.get("traceparent"),
    )


@dataclass(frozen=True)
class _Expected:
    """What an infer answer must say, and the reading that checks it."""

    model: str
    exit: str | None
    rows: int
    request_id: str | None
    confidence: bool
    request_bytes: int

    def read(self, answer: Answer) -> InferResult:
        decoded = wire.decode_response(answer.content, answer.headers)
        params = InferResponseParameters.model_validate(decoded.parameters, strict=True)
        if decoded.model_name != self.model:
            raise ValueError(f"model_name {decoded.model_name!r}: expected {self.model!r}")
        if self.exit is not None and params.exit != self.exit:
            raise ValueError(f"parameters.exit {params.exit!r}: expected {self.exit!r}")
        if self.request_id is not None and decoded.id != self.request_id:
            raise ValueError(f"id {decoded.id!r}: expected {self.request_id!r}")
        if params.batch_rows < self.rows:
            raise ValueError(f"parameters.batch_rows {params.batch_rows}: fewer than the {self.rows} rows sent")
        logits, classes = _outputs(decoded.outputs, self.rows)
        return InferResult(
            model=self.model,
            exit=params.exit,
            logits=logits,
            classes=classes,
            parameters=params,
            request_bytes=self.request_bytes,
            response_bytes=len(answer.content),
            elapsed_ms=answer.elapsed_ms,
            id=decoded.id,
            exits_taken=_exits_taken(decoded.parameters, self.rows) if self.confidence else None,
        )


def _outputs(outputs: Mapping[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` (floating, finite, [rows, k...]) and `class` (INT64, [rows], in [0, k...)), else
    ValueError naming the output. O(output size)."""
    missing = [name for name in ("logits", "class") if name not in outputs]
    if missing:
        raise ValueError(f"outputs: {missing} missing (got {sorted(outputs)})")
    logits, classes = outputs["logits"], outputs["class"]
    classes_per_row = logits.shape[1:].numel()
    if not logits.is_floating_point() or logits.dim() < 2 or logits.shape[0] != rows or classes_per_row < 1:
        got = f"{logits.dtype} {list(logits.shape)}"
        raise ValueError(f"output 'logits': expected floating [{rows}, classes], got {got}")
    logits = logits.to(torch.float32)  # checked as returned: an FP64 1e300 is Inf as FP32
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("output 'logits': holds NaN or Inf (as FP32)")
    if classes.dtype != torch.int64 or tuple(classes.shape) != (rows,):
        raise ValueError(f"output 'class': expected INT64 [{rows}], got {classes.dtype} {list(classes.shape)}")
    if classes.numel() and not (0 <= int(classes.min()) and int(classes.max()) < classes_per_row):
        raise ValueError(f"output 'class': indices outside [0, {classes_per_row})")
    return logits, classes


def _exits_taken(parameters: Mapping[str, Any], rows: int) -> tuple[str, ...]:
    taken = parameters.get("exits_taken")
    if not isinstance(taken, list) or len(taken) != rows or not all(isinstance(e, str) for e in taken):
        raise ValueError(f"parameters.exits_taken: expected {rows} exit names, got {str(taken)[:80]}")
    return tuple(taken)


def _ok(answer: Answer) -> bool:
    return answer.status == 200


def live_call() -> Call[bool]:
    return Call("GET", "/v2/health/live", _ok, ok=HEALTH)


def ready_call(model: str | None = None, version: str | None = None) -> Call[bool]:
    path = "/v2/health/ready" if model is None else _model_path(model, version) + "/ready"
    return Call("GET", path, _ok, ok=HEALTH)


def metadata_call(model: str, version: str | None = None) -> Call[ModelMetadata]:
    return Call("GET", _model_path(model, version), reader(ModelMetadata))


def server_metadata_call() -> Call[ServerMetadata]:
    return Call("GET", "/v2", reader(ServerMetadata))


# ---- clients ----------------------------------------------------------------------------------------


def _timed(options: InferOptions, timeout_s: float) -> InferOptions:
    """`options` with `timeout_s` (a client's) as the timeout when they give none."""
    return options if options.get("timeout") is not None else {**options, "timeout": timeout_s}


class EdgeClient(SyncTransport):
    """An edge worker's v2 routes, blocking: `EdgeClient(base_url, token=None, *, timeout=5.0,
    headers=None, transport=None)`. Errors as `PlannerClient`'s (the edge's `{"error": ...}`
    body becomes `ApiError.problem["detail"]`)."""

    def infer(
        self,
        model: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        uplink: Callable[[bytes], Iterable[bytes]] | None = None,
        **options: Unpack[InferOptions],
    ) -> InferResult:
        """Infer an exit from a cut's tensors `inputs` (`infer_call`; `options`: `InferOptions`).
        `uplink(body)` may stream the body instead (e.g. through a shaped link). The timeout
        bounds the whole exchange, upload included (`dapdee.client.transport`); the call's, else
        the client's, goes to the worker as parameter `timeout`."""
        call = infer_call(model, inputs, **_timed(options, self.timeout_s))
        return self.run(call, None if uplink is None else uplink(call.content))

    def live(self) -> bool:
        return self.run(live_call())

    def ready(self, model: str | None = None, version: str | None = None) -> bool:
        """The server's readiness, or one model's (ApiError 404 for a model it does not serve)."""
        return self.run(ready_call(model, version))

    def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        return self.run(metadata_call(model, version))

    def server_metadata(self) -> ServerMetadata:
        return self.run(server_metadata_call())


class AsyncEdgeClient(AsyncTransport):
    """`EdgeClient` for asyncio; `timeout` bounds each exchange as a whole, as in `EdgeClient`."""

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        uplink: Callable[[bytes], AsyncIterable[bytes]] | None = None,
        **options: Unpack[InferOptions],
    ) -> InferResult:
        """`EdgeClient.infer`, awaited; `uplink(body)` may stream the body (e.g.
        `dapdee.netem.ShapedUplink.shaped_body`)."""
        call = infer_call(model, inputs, **_timed(options, self.timeout_s))
        return await self.run(call, None if uplink is None else uplink(call.content))

    async def live(self) -> bool:
        return await self.run(live_call())

    async def ready(self, model: str | None = None, version: str | None = None) -> bool:
        return await self.run(ready_call(model, version))

    async def metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        return await self.run(metadata_call(model, version))

    async def server_metadata(self) -> ServerMetadata:
        return await self.run(server_metadata_call())
