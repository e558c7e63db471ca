"""One v2 infer request, from body to answer: decode and vet the boundary tensors against the
model's limits, batch-compute the exit, and encode `logits` (FP32) and `class` (INT64).

The inputs are boundary tensors named by graph node (first dim = rows); the worker computes
whatever the requested exit needs that was not sent. A value computed from the model's
parameters alone (e.g. a `get_attr` node a cut sends on) has no rows: it may be sent at its
whole traced shape, and is then dropped, the worker computing its own. With the parameter
`confidence: true` it also checks the calibrated confidence heads it computes on the way to the
exit (`dapdee.progressive_run`: the heads the sender did not compute, in exit order) and answers
each row at its first confident one; `exits_taken` says, per row, which exit answered. Every
refusal is an `ApiError` naming the problem: 400 malformed (or `confidence` for a model without
calibrated thresholds), 413 past a limit (rows, values), 422 when the answer would not be finite,
503 when the worker shuts down or the request's `timeout` passed before its batch started.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from starlette.datastructures import Headers

from dapdee import wire
from dapdee.api.oip import InferResponseParameters
from dapdee.bounded_cache import BoundedCache
from dapdee.edge_worker.batching import BatchKey, BatchResult, Expired, ShuttingDown
from dapdee.edge_worker.capacity import CapacityMeter
from dapdee.edge_worker.deps import MODEL_VERSION, ApiError, ModelEntry, WorkerState
from dapdee.edge_worker.spans import record_infer
from dapdee.executor import GraphExecutor, MissingInputsError
from dapdee.progressive_run import SidePart, edge_sides, run_part
from dapdee.web import otel

T = TypeVar("T")
OUTPUT_NAMES = ("logits", "class")
THREAD_DECODE_BYTES = 256 << 10  # decode bigger bodies off the event loop
MAX_TIMEOUT_US = (1 << 63) - 1  # the `timeout` parameter is an int64, as in Triton
EXIT_HEADER = "x-dapdee-exit"  # the exit that answered (a metrics label)
# names the confidence runs of one model hold at most (input names and the edge side's nodes;
# one run per exit and set of input names): requests may name arbitrary cuts
RUN_CACHE_NAMES = 1 << 18
_RUNS: weakref.WeakKeyDictionary[GraphExecutor, BoundedCache[tuple[str, frozenset[str]], ConfidenceRun]] = (
    weakref.WeakKeyDictionary()
)


def _short(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."


def tensor_check(entry: ModelEntry) -> wire.TensorCheck:
    """A per-request check for `wire.decode_request`: every input names a sendable value of the
    model; a batch value has its traced per-sample shape, at least 1 and at most
    `max_batch_rows` rows, and as many rows as the other batch values; a value computed from
    the parameters alone has its whole traced shape (no rows). Runs before any tensor data is
    read. O(1) per input."""
    rows_seen: list[int] = []
    max_rows = entry.limits.max_rows

    def check(name: str, shape: list[int], datatype: str) -> None:
        fixed = entry.fixed_shapes.get(name)
        if fixed is not None:
            if tuple(shape) != fixed:
                raise wire.WireError(
                    f"input {name!r}: wrong shape; expected {list(fixed)} (computed from the model's "
                    f"parameters alone: one value for every row, no batch dimension), got {shape}"
                )
            return
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


def header_length(headers: Headers) -> str | None:
    """The request's one `Inference-Header-Content-Length` value (None: absent). 400 when it
    is given more than once: a proxy that took another of them would split the body
    elsewhere. O(#headers)."""
    given = headers.getlist(wire.HEADER_LENGTH)
    if len(given) > 1:
        raise ApiError(400, f"{wire.HEADER_LENGTH}: given {len(given)} times; send it once")
    return given[0] if given else None


def raw_binary_header(entry: ModelEntry, body_bytes: int) -> bytes:
    """The JSON header a raw binary request stands for (Triton's binary data extension: an
    `Inference-Header-Content-Length` of 0, the body the bytes of a one-input model's input):
    the graph input at batch 1 in its metadata datatype, `body_bytes` long, every output
    binary. O(1)."""
    g = entry.graph
    entry_json = {
        "name": g.input.name,
        "shape": [1, *g.input.shape[1:]],
        "datatype": entry.input_datatype,
        "parameters": {"binary_data_size": body_bytes},
    }
    return json.dumps({"inputs": [entry_json], "parameters": {wire.REQUEST_BINARY_KEY: True}}).encode()


async def decode(
    entry: ModelEntry, body: bytes, header_length: str | None, meter: CapacityMeter
) -> wire.DecodedRequest:
    """The request, vetted by `tensor_check` and bounded by the model's value limit; off the event
    loop for big bodies, whose decoding CPU `meter` counts (the event loop's clock does not see
    it); a raw binary request is read as `raw_binary_header` says. 413 past a limit, 400 for
    anything malformed. O(body bytes)."""
    try:
        length = wire.parse_header_length(header_length)
        if length == 0:  # a raw binary request: the body is the model input's bytes alone
            head = raw_binary_header(entry, len(body))
            body, length = head + body, len(head)
        args = (body, length, entry.limits.max_values, tensor_check(entry))
        if len(body) > THREAD_DECODE_BYTES:
            return await _in_thread_timed(meter, wire.decode_request, *args)
        return wire.decode_request(*args)
    except wire.WireLimitError as exc:
        raise ApiError(413, str(exc)) from None
    except wire.WireError as exc:
        raise ApiError(400, str(exc)) from None
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # a malformed body the codec missed
        raise ApiError(400, f"malformed request: {type(exc).__name__}: {str(exc)[:200]}") from None


async def _in_thread_timed(meter: CapacityMeter, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a thread, its CPU time (refused or not) recorded on `meter`. O(fn)."""
    spent = [0.0]

    def timed() -> T:
        start = time.thread_time()
        try:
            return fn(*args)
        finally:
            spent[0] = time.thread_time() - start

    try:
        return await asyncio.to_thread(timed)
    finally:
        meter.record_outside(spent[0] * 1000.0)


def requested_exit(entry: ModelEntry, req: wire.DecodedRequest) -> str:
    """The `exit` parameter (default: the deepest exit), and the requested outputs checked."""
    exit_name = req.parameters.get("exit", entry.graph.exits[-1].name)
    exits = [e.name for e in entry.graph.exits]
    if not isinstance(exit_name, str) or exit_name not in exits:
        raise ApiError(
            400, f"parameter exit {wire.shown_value(exit_name)}: unknown exit; model {entry.name!r} has {exits}"
        )
    unknown = [o for o in req.outputs or () if o not in OUTPUT_NAMES]
    if unknown:
        err = ApiError(400, f"outputs: unknown output {_short(unknown[0])!r}; outputs are {list(OUTPUT_NAMES)}")
        err.exit_label = exit_name
        raise err
    return exit_name


def batch_inputs(entry: ModelEntry, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs that are batch data: values computed from the model's parameters alone are
    dropped (the worker computes its own; they are never concatenated across a batch). 400 when
    nothing is left. O(inputs)."""
    batch = {name: t for name, t in inputs.items() if name not in entry.fixed_shapes}
    if not batch:
        raise ApiError(
            400,
            f"inputs: only values computed from the model's parameters ({', '.join(map(_short, inputs))}); "
            "send the graph input or the boundary tensors of a cut",
        )
    return batch


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


def requested_deadline(req: wire.DecodedRequest, t0: float) -> float:
    """When (perf_counter time) a request received at `t0` is no longer started: `t0` plus its
    `timeout` parameter, in microseconds as in Triton's schedule-policy extension (0 or absent:
    never, `inf`); 400 naming it unless it is an integer in [0, 2**63 - 1]. O(1)."""
    timeout = req.parameters.get("timeout", 0)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 <= timeout <= MAX_TIMEOUT_US:
        shown = wire.shown_value(timeout)
        raise ApiError(400, f"parameter timeout: expected microseconds, an integer in [0, 2**63 - 1], got {shown}")
    return t0 + timeout / 1e6 if timeout else math.inf


def requested_confidence(entry: ModelEntry, req: wire.DecodedRequest, exit_name: str) -> bool:
    """The `confidence` parameter (default false): 400 naming it when it is not a boolean, or
    when it is true and the model has no calibrated confidence exits. O(1)."""
    on = req.parameters.get("confidence", False)
    if not isinstance(on, bool):
        err = ApiError(400, f"parameter confidence: expected true or false, got {wire.shown_value(on)}")
        err.exit_label = exit_name
        raise err
    if on and entry.graph.progressive is None:
        err = ApiError(
            400,
            f"parameter confidence: model {entry.name!r} has no calibrated confidence exits "
            "(no thresholds in its artifact; run `dapdee calibrate` on it)",
        )
        err.exit_label = exit_name
        raise err
    return on


@dataclass(frozen=True)
class ConfidenceRun:
    """A batch job (the batcher's `compute`) for `confidence: true`: the edge side of the
    progressive run (`run_part`) from the sent values, answering per row its logits and the
    index (into `exits`) of the exit that answered."""

    executor: GraphExecutor
    part: SidePart
    exit_name: str
    exits: tuple[str, ...]

    def compute(self, given: Mapping[str, Any], targets: Sequence[str]) -> dict[str, Any]:
        """{target: (logits [rows, classes], exit index [rows])}, `targets` = the exit's node.
        Time: the edge side's nodes for the rows still undecided."""
        node = targets[0]
        result = run_part(self.executor, given, self.part, [node])
        taken, logits = result.answers(self.exit_name, node)
        index = {e: i for i, e in enumerate(self.exits)}
        return {node: (logits, torch.tensor([index[e] for e in taken], dtype=torch.long))}


def confidence_run(entry: ModelEntry, inputs: Mapping[str, torch.Tensor], exit_name: str, node: str) -> ConfidenceRun:
    """The edge's part for these inputs: the heads of the exit that the sender did not compute
    (`edge_sides`, from the nodes the worker computes), less any whose nodes the inputs do not
    determine (a cut planned without confidence exits may not send them). Cached per (executor,
    exit, input names), the most recently used within RUN_CACHE_NAMES names per executor; a miss
    is O(#heads · (V + E))."""
    ex = entry.loaded.executor
    runs = _RUNS.get(ex)
    if runs is None:  # once per executor, not a cache built per request
        runs = _RUNS[ex] = BoundedCache(RUN_CACHE_NAMES)
    key = (exit_name, frozenset(inputs))
    run = runs.get(key)
    if run is None:
        computed = [n.name for n in ex.schedule(list(inputs), [node])]
        part = edge_sides(entry.graph, exit_name, computed).edge
        heads = tuple(h for h in part.heads if _determined(ex, inputs, h.node))
        part = SidePart(part.side, part.nodes, heads)
        run = ConfidenceRun(ex, part, exit_name, tuple(e.name for e in entry.graph.exits))
        runs.put(key, run, len(key[1]) + len(part.nodes) + len(part.heads) + 1)
    return run


def confidence_price_ms(
    entry: ModelEntry, run: ConfidenceRun, given: frozenset[str], node: str, taken: Sequence[str]
) -> float | None:
    """What the profile prices a confidence run's rows at: per row, Σ edge_ms over the nodes the
    walk ran while the row was in it, the edge side's schedule up to the point where the head it
    left at is checked (all of it for a row no head answered, `taken` its planned exit); None
    when the graph has no edge timings there. One pass over the schedule: O(schedule + rows)."""
    graph = entry.graph
    order = run.executor.order
    checks = sorted(((order[h.after], h.exit) for h in run.part.heads), reverse=True)  # next check last
    price: dict[str, float] = {}
    total = 0.0
    for step in run.executor.schedule(given, [node, *(h.node for h in run.part.heads)]):
        while checks and checks[-1][0] < order[step.name]:  # the walk checks that head before this step
            price[checks.pop()[1]] = total
        if step.name != graph.input.name:
            cost = graph.node(step.name).edge_ms
            if cost is None:
                return None
            total += cost
    price.update({exit_name: total for _, exit_name in checks})
    price[run.exit_name] = total
    return sum(price[e] for e in taken)


def _determined(ex: GraphExecutor, inputs: Mapping[str, torch.Tensor], node: str) -> bool:
    """Whether the inputs determine `node`'s value. O(nodes it needs), cached by the executor."""
    try:
        ex.schedule(list(inputs), [node])
    except MissingInputsError:
        return False
    return True


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


def _record_price(
    state: WorkerState,
    entry: ModelEntry,
    inputs: dict[str, torch.Tensor],
    given: frozenset[str],
    node: str,
    exit_name: str,
    taken: list[str] | None,
    result: BatchResult,
) -> None:
    """Tell the capacity meter what this request is priced at (the profile's compute for its
    rows: `compute_ms`, or per row for a confidence run, `confidence_price_ms`) against its
    share of its batch's slot time; nothing where the graph has no edge timings. O(1) cached,
    O(schedule) for a confidence run."""
    rows = next(iter(inputs.values())).shape[0]
    if taken is None:
        per_row = entry.compute_ms(given, node)
        predicted = None if per_row is None else per_row * rows
    else:
        predicted = confidence_price_ms(entry, confidence_run(entry, inputs, exit_name, node), given, node, taken)
    if predicted is not None:
        slot_ms = result.compute_s * 1000.0 * rows / max(1, result.batch_rows)
        state.capacity.record(predicted, entry.request_ms, slot_ms)


async def run_infer(
    state: WorkerState, entry: ModelEntry, body: bytes, headers: Headers, t0: float
) -> tuple[bytes, dict[str, str]]:
    """Answer one infer request received at `t0` (perf_counter): the response's body and
    headers. Raises ApiError, labelled with the request's exit once that is known (the metrics
    count it there). O(body bytes) plus the batch's compute."""
    req = await decode(entry, body, header_length(headers), state.capacity)
    exit_name = requested_exit(entry, req)
    try:
        return await _answer(state, entry, req, exit_name, len(body), t0)
    except ApiError as exc:
        exc.exit_label = exit_name
        raise


async def _answer(
    state: WorkerState, entry: ModelEntry, req: wire.DecodedRequest, exit_name: str, body_bytes: int, t0: float
) -> tuple[bytes, dict[str, str]]:
    """`run_infer` past the request's exit: batch the inputs, compute, encode the answer."""
    confident = requested_confidence(entry, req, exit_name)
    deadline = requested_deadline(req, t0)
    inputs = batch_inputs(entry, req.inputs)
    node = exit_target(entry, inputs, exit_name)
    tracing = otel.recording()  # None unless this request's trace is exported
    submit_ns = time.time_ns() if tracing is not None else 0
    given = frozenset(inputs)
    result = await _submit(state, entry, inputs, given, exit_name, node, confident, deadline)
    output, taken = result.output, None
    if isinstance(output, tuple):  # a confidence run: (logits, exit index) per row
        output, index = output
        taken = [entry.graph.exits[i].name for i in index.tolist()]
    _record_price(state, entry, inputs, given, node, exit_name, taken, result)
    if tracing is not None:
        record_infer(tracing, entry, inputs, node, exit_name, body_bytes, result, submit_ns)
    outputs = answer_tensors(output, exit_name)
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
        exits_taken=taken,
    )
    payload, out_headers = wire.encode_response(
        entry.name,
        outputs,
        request_id=req.id,
        parameters=params.model_dump(exclude_none=True),
        binary=binary,
        model_version=MODEL_VERSION,
    )
    out_headers[EXIT_HEADER] = exit_name
    return payload, out_headers


async def _submit(
    state: WorkerState,
    entry: ModelEntry,
    inputs: dict[str, torch.Tensor],
    given: frozenset[str],
    exit_name: str,
    node: str,
    confident: bool,
    deadline: float,
) -> BatchResult:
    """Hand the request to the batcher: the plain exit, or (`confident`) the confidence run,
    batched only with requests of the same kind; 503 when the worker shuts down before it ran
    (with Retry-After), or when its batch had not started by `deadline` (without: the worker is
    up, its queue was longer than the client would wait). O(V + E) per head to set up a
    confidence run."""
    try:
        if not confident:
            key: BatchKey = (entry.name, given, exit_name)
            return await state.batcher.submit(key, entry.loaded.executor, node, inputs, deadline)
        job = confidence_run(entry, inputs, exit_name, node)
        return await state.batcher.submit((entry.name, given, exit_name, "confidence"), job, node, inputs, deadline)
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), {"Retry-After": "1"}) from None
    except Expired as exc:
        state.metrics.expired.labels(entry.name).inc()
        state.metrics.queue_duration.labels(entry.name).observe(exc.queued_s)  # the wait is as long
        raise ApiError(503, f"parameter timeout: {exc}") from None
