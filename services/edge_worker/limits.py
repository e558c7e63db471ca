"""Per-model request limits of the edge worker, derived from the model and `max_batch_rows`.

A valid infer request sends the boundary tensors of one cut (or the graph input) for at most
`max_batch_rows` rows, each tensor at its node's traced per-sample shape. So the most values a
valid request carries is `max_batch_rows` x the model's largest boundary set (in values per
row), and its body is at most that many values in the most verbose encoding the worker accepts
(JSON text) plus a header allowance. A value computed from the model's parameters alone (no
batch dimension) may also be sent, once, at its whole shape: those add their values once, not
per row. The worker refuses anything larger before parsing it, which bounds what one request can
make the worker allocate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from dapdee.costgraph import CostGraph
from dapdee.planning.enumerate import ExitStructure, enumerate_ideals

# The longest JSON spelling of a float value (shortest repr of a float64, as a client sends FP64:
# sign, 17 digits, point, three-digit exponent, e.g. "-2.2250738585072014e-308") plus ", ".
JSON_VALUE_BYTES = 26
HEADER_BYTES = 64 << 10  # names, shapes, datatypes and parameters of the JSON header
IDEAL_CAP = 200_000  # cuts enumerated per exit before falling back to a cruder bound


@dataclass(frozen=True)
class RequestLimits:
    """What one infer request to a model may hold."""

    max_rows: int  # first dimension of every input (= the batch)
    row_values: int  # values per row of the largest boundary set
    body_bytes: int  # the request body, in bytes
    fixed_values: int = 0  # values of every parameter-only value, each sent at most once

    @property
    def max_values(self) -> int:
        """The most tensor values (elements) a valid request carries."""
        return self.max_rows * self.row_values + self.fixed_values


def largest_boundary(graph: CostGraph, row_values: Mapping[str, int]) -> int:
    """The most values per row that the boundary tensors of any cut to any exit of `graph`
    hold, with `row_values[name]` values per row for each sendable value (graph input and
    tensor nodes; others weigh 0). Enumerates each exit's cuts; where an exit has more than
    `IDEAL_CAP` of them, counts every sendable value it needs instead (an upper bound).
    O(#cuts x (width + degree)) per exit."""
    best = 0
    for i in range(len(graph.exits)):
        st = ExitStructure.build(graph, i)
        weighted = replace(
            st,
            out=tuple(row_values.get(n, 0) for n in st.nodes),
            input_bytes=row_values.get(graph.input.name, 0),
        )
        found = enumerate_ideals(weighted, IDEAL_CAP)
        if found is not None:
            best = max(best, max(found[1]))
        else:
            best = max(best, weighted.input_bytes + sum(weighted.out))
    return best


def request_limits(
    graph: CostGraph,
    sample_shapes: Mapping[str, tuple[int, ...]],
    max_rows: int,
    body_cap: int,
    fixed_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> RequestLimits:
    """The limits of one model: `max_rows` rows of its largest boundary set plus every
    parameter-only value of `fixed_shapes` (whole shapes, no rows), and the body that carries
    them as JSON text, capped at `body_cap` bytes. O(largest_boundary)."""
    row_values = {name: math.prod(shape) for name, shape in sample_shapes.items()}
    per_row = max(1, largest_boundary(graph, row_values))
    fixed = sum(math.prod(shape) for shape in (fixed_shapes or {}).values())
    body = HEADER_BYTES + (max_rows * per_row + fixed) * JSON_VALUE_BYTES
    return RequestLimits(max_rows, per_row, min(body_cap, body), fixed)
