"""One v2 infer request, from body to answer: decode and vet the boundary tensors against the
model's limits, batch-compute the exit, and encode `logits` (FP32) and `class` (INT64).

The inputs are boundary tensors named by graph node (first dim = rows); the worker computes
whatever the requested exit needs that was not sent. Every refusal is an `ApiError` naming the
problem: 400 malformed, 413 past a limit (rows, values), 422 when the answer would not be finite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import torch

from dapdee import wire
from dapdee.api.oip import InferResponseParameters
from dapdee.edge_worker.deps import MODEL_VERSION, ApiError, ModelEntry, WorkerState
from dapdee.executor import MissingInputsError

OUTPUT_NAMES = ("logits", "class")
THREAD_DECODE_BYTES = 256 << 10  # decode bigger bodies off the event loop
EXIT_HEADER = "x-dapdee-exit"  # the exit that answered (a metrics label)


def _short(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."


def tensor_check(entry: ModelEntry) -> wire.TensorCheck:
    """A per-request check for `wire.decode_request`: every input names a sendable value of the
    model, has its traced per-sample shape, at least 1 and at most `max_batch_rows` rows, and
    as many rows as the other inputs. Runs before any tensor data is read. O(1) per input."""
    rows_seen: list[int] = []
    max_rows = entry.limits.max_rows

    def check(name: str, shape: list[int], datatype: str) -> None:
        expected = entry.sample_shapes.get(name)
        if expected is None:
            if name in entry.loaded.executor.nodes:
                raise wire.WireError(f"input {name!r}: node does not produce a tensor and cannot be sent")
            raise wire.WireError(f"input {_short(name)!r}: unknown node of model {entry.name!r}")
        if len(shape) != len(expected) + 1 or tuple(shape[1:]) != expected:
            raise wire.WireError(
                f"input {name!r}: wrong shape; expected [batch, {', '.join(map(str, expected))}] "
                f"(batch 1..{max_rows}), got {shape}"
            )
        rows = shape[0]
        if rows < 1:
            raise wire.WireError(f"input {name!r}: batch size must be at least 1")
        if rows > max_rows:
            raise wire.WireLimitError(f"input {name!r}: {rows} rows exceed max_batch_rows={max_rows}")
        if rows_seen and rows != rows_seen[0]:
            raise wire.WireError(f"input {name!r}: batch size {rows} differs from the other inputs' {rows_seen[0]}")
        rows_seen.append(rows)

    return check


async def decode(entry: ModelEntry, body: bytes, header_length: str | None) -> wire.DecodedRequest:
    """The request, vetted by `tensor_check` and bounded by the model's value limit; off the event
    loop for big bodies. 413 past a limit, 400 for anything malformed. O(body bytes)."""
    try:
        args = (body, wire.parse_header_length(header_length), entry.limits.max_values, tensor_check(entry))
        if len(body) > THREAD_DECODE_BYTES:
            return await asyncio.to_thread(wire.decode_request, *args)
        return wire.decode_request(*args)
    except wire.WireLimitError as exc:
        raise ApiError(413, str(exc)) from None
    except wire.WireError as exc:
        raise ApiError(400, str(exc)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # a malformed body the codec missed
        raise ApiError(400, f"malformed request: {type(exc).__name__}: {str(exc)[:200]}") from None


def requested_exit(entry: ModelEntry, req: wire.DecodedRequest) -> str:
    """The `exit` parameter (default: the deepest exit), and the requested outputs checked."""
    exit_name = req.parameters.get("exit", entry.graph.exits[-1].name)
    exits = [e.name for e in entry.graph.exits]
    if not isinstance(exit_name, str) or exit_name not in exits:
        raise ApiError(
            400, f"parameter exit {str(exit_name)[:64]!r}: unknown exit; model {entry.name!r} has {exits}"
        )
    unknown = [o for o in req.outputs or () if o not in OUTPUT_NAMES]
    if unknown:
        err = ApiError(400, f"outputs: unknown output {_short(unknown[0])!r}; outputs are {list(OUTPUT_NAMES)}")
        err.exit_label = exit_name
        raise err
    return exit_name


def exit_target(entry: ModelEntry, inputs: Mapping[str, torch.Tensor], exit_name: str) -> str:
    """The exit's node, once the inputs are known to determine it (400 naming what is missing,
    and the boundary nodes a cut forgot). O(nodes the exit needs)."""
    node = entry.graph.exit(exit_name).node
    try:
        entry.loaded.executor.schedule(list(inputs), [node])
    except MissingInputsError as exc:
        boundary = _missing_boundary(entry, set(inputs), node)
        hint = f" (or the cut's boundary nodes {', '.join(boundary)})" if boundary else ""
        raise ApiError(
            400,
            f"inputs do not determine exit {exit_name!r} (node {node}): missing {', '.join(exc.missing)}{hint}",
        ) from None
    return node


def _missing_boundary(entry: ModelEntry, given: set[str], target: str) -> list[str]:
    """Nodes the sender computed-before (ancestors of what it sent) that the rest still needs but
    were not sent: the boundary tensors a cut forgot. O(V + E)."""
    g = entry.graph
    need: set[str] = set()
    stack = [target]
    while stack:
        n = stack.pop()
        if n in need or n in given or n == g.input.name:
            continue
        need.add(n)
        stack.extend(g.node(n).inputs)
    sent_side: set[str] = set()
    for n in given:
        if n != g.input.name:
            sent_side.update(g.ancestors(n))
    consumers = g.consumers()
    return [
        n.name
        for n in g.nodes
        if n.name in need and n.name in sent_side and any(c in need and c not in sent_side for c in consumers[n.name])
    ]


def answer_tensors(output: torch.Tensor, exit_name: str) -> dict[str, torch.Tensor]:
    """`logits` and `class` (per row, the argmax over the row's values) of an exit's output; 422
    naming the output and rows when the logits are not finite (inputs that drive the model past
    the float32 range). O(output)."""
    logits = output.float()
    finite = torch.isfinite(logits).reshape(len(logits), -1).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        raise ApiError(
            422,
            f"output 'logits' of exit {exit_name!r} is not finite (NaN or Inf in row {shown}): "
            "the inputs drive the model past the float32 range",
        )
    return {"logits": logits, "class": logits.reshape(len(logits), -1).argmax(dim=1)}


async def run_infer(
    state: WorkerState, entry: ModelEntry, body: bytes, headers: Mapping[str, str], t0: float
) -> tuple[bytes, dict[str, str]]:
    """Answer one infer request received at `t0` (perf_counter): the response's body and
    headers. Raises ApiError. O(body bytes) plus the batch's compute."""
    req = await decode(entry, body, headers.get(wire.HEADER_LENGTH))
    exit_name = requested_exit(entry, req)
    try:
        node = exit_target(entry, req.inputs, exit_name)
    except ApiError as exc:
        exc.exit_label = exit_name
        raise
    key = (entry.name, frozenset(req.inputs), exit_name)
    result = await state.batcher.submit(key, entry.loaded.executor, node, req.inputs)
    try:
        outputs = answer_tensors(result.output, exit_name)
    except ApiError as exc:
        exc.exit_label = exit_name
        raise
    binary: bool | dict[str, bool] = req.binary_output
    if req.outputs:
        outputs = {k: v for k, v in outputs.items() if k in req.outputs}
        binary = dict(req.outputs)
    state.metrics.queue_duration.labels(entry.name).observe(result.queue_s)
    params = InferResponseParameters(
        exit=exit_name,
        queue_ms=round(result.queue_s * 1000.0, 4),
        compute_ms=round(result.compute_s * 1000.0, 4),
        server_ms=round(max(0.0, time.perf_counter() - t0) * 1000.0, 4),
        batch_size=result.batch_size,
        batch_rows=result.batch_rows,
    )
    payload, out_headers = wire.encode_response(
        entry.name,
        outputs,
        request_id=req.id,
        parameters=params.model_dump(),
        binary=binary,
        model_version=MODEL_VERSION,
    )
    out_headers[EXIT_HEADER] = exit_name
    return payload, out_headers
