"""Progressive (confidence) exits at run time: one side's part of a plan, stopped at the first
confident head.

This is the execution model `dapdee.planning.progressive` prices, run for real (the device
runtime and the edge worker both call it):

- `split_sides(graph, exit, device_nodes)` splits a plan (planned exit e, device set D) into
  its two sides exactly as the planner does (it reuses the planner's `HeadStructure`): the
  active heads k < e (calibrated threshold not null) in exit order, each with its own nodes (a
  node two heads share belongs to the shallower one), the first p of them on the device (a head
  runs there iff every trunk node it reads is in D and every shallower head runs there), the
  rest on the edge; S_dev = D ∪ the device heads' nodes, S_edge = E ∪ the edge heads' nodes;
  the uplink carries the input or a node of S_dev with a consumer in S_edge, and the exit node
  of an edge head that S_dev computed. Each head is checked once its side's walk (graph order)
  has passed its exit node and those of the shallower heads of its side.
- `edge_sides(graph, exit, computed)` is the same split seen from the edge, which keeps no plan:
  D = A(e) minus the nodes the edge has to compute for e from what it was sent.
- `run_part(executor, given, part, targets)` walks one side (`GraphExecutor.walk`, the one
  executor) in graph order and checks each of its heads at its point: a row leaves at the
  first head whose max softmax probability reaches the threshold (`dapdee.training.confidence`,
  the rule calibration used), the walk then drops that row, and stops as soon as every row has
  left; rows no head answered come back with the values of `targets` (the tensors to send, or
  the planned exit's logits).

Heads are checked in exit order on both sides (the device checks a prefix of them, the edge
the rest), so a frame leaves where the calibrated rule truncated at e says it leaves: the
fractions the planner prices are the fractions measured at run time, up to float differences
between a batched calibration pass and this walk.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dapdee.costgraph import CostGraph
from dapdee.executor import GraphExecutor, row_major
from dapdee.planning.progressive import HeadStructure, _check_columns, device_mask, require_progressive
from dapdee.training.confidence import confidence

DEVICE = "device"
EDGE = "edge"


@dataclass(frozen=True)
class HeadCheck:
    """One head a side checks: its exit, the exit's node (its logits), the threshold, and
    `after`: the node of the graph order once past which the head is checked."""

    exit: str
    node: str
    threshold: float
    after: str


@dataclass(frozen=True)
class SidePart:
    """What one side computes (`nodes`, graph order: its trunk nodes and its heads' own nodes)
    and the heads it checks, in check order."""

    side: str
    nodes: tuple[str, ...]
    heads: tuple[HeadCheck, ...]


@dataclass(frozen=True)
class Sides:
    """A plan split into its device and edge sides (see the module doc). `transfer` is what goes
    uplink, the input first, then nodes in graph order; empty when the edge computes nothing."""

    exit: str
    exit_node: str
    device: SidePart
    edge: SidePart
    transfer: tuple[str, ...]

    @property
    def uses_edge(self) -> bool:
        return bool(self.edge.nodes) or bool(self.edge.heads)

    @property
    def device_targets(self) -> tuple[str, ...]:
        """What the device produces for a frame no device head answered: the tensors it sends
        (the input excluded), or the planned exit's logits when the edge has no part."""
        if not self.uses_edge:
            return (self.exit_node,)
        mine = set(self.device.nodes)
        return tuple(n for n in self.transfer if n in mine)

    def as_dict(self) -> dict[str, Any]:
        """The heads with their sides, the shape of a plan's `progressive.heads` (without the
        fractions). O(heads)."""
        return {
            "exit": self.exit,
            "heads": [
                {"exit": h.exit, "node": h.node, "threshold": h.threshold, "side": part.side}
                for part in (self.device, self.edge)
                for h in part.heads
            ],
            "transfer": list(self.transfer),
        }


def split_sides(graph: CostGraph, exit_name: str, device_nodes: Collection[str]) -> Sides:
    """The sides of the plan (planned exit `exit_name`, device set `device_nodes` ⊆ A(e),
    downward closed) under the planner's execution model. ValueError naming `confidence_exits`
    when the graph has no calibrated thresholds, and naming the nodes when the device set is not
    a downward-closed part of the exit's ancestors. O(#heads · (V + E))."""
    require_progressive(graph)
    names = [e.name for e in graph.exits]
    if exit_name not in names:
        raise ValueError(f"exit {exit_name!r}: not an exit of model {graph.model!r}; it has {names}")
    hs = HeadStructure.build(graph, names.index(exit_name))
    return _sides(graph, hs, device_mask(hs, exit_name, device_nodes))


def edge_sides(graph: CostGraph, exit_name: str, computed: Collection[str]) -> Sides:
    """The sides as the edge sees them when the nodes of A(e) it must compute for exit
    `exit_name` from the values it was sent are `computed`: the device set is the rest of
    A(e). ValueError naming `confidence_exits` without calibrated thresholds. O(#heads · (V + E))."""
    require_progressive(graph)
    names = [e.name for e in graph.exits]
    if exit_name not in names:
        raise ValueError(f"exit {exit_name!r}: not an exit of model {graph.model!r}; it has {names}")
    hs = HeadStructure.build(graph, names.index(exit_name))
    mask = sum(1 << i for i, v in enumerate(hs.st.nodes) if v not in set(computed))
    return _sides(graph, hs, mask)


def _sides(graph: CostGraph, hs: HeadStructure, mask: int) -> Sides:
    p_arr, dev_in, edge_in, sent = hs.sides([mask])
    p = int(p_arr[0])
    dev_pos, edge_pos = _check_columns(hs.heads)

    def checks(idx: range, pos: Sequence[int]) -> tuple[HeadCheck, ...]:
        return tuple(
            HeadCheck(hs.heads[i].exit_name, hs.heads[i].node, hs.heads[i].threshold, hs.names[int(pos[i])])
            for i in idx
        )

    device = SidePart(
        DEVICE,
        tuple(v for u, v in enumerate(hs.names) if dev_in[0, u]),
        checks(range(p), dev_pos),
    )
    edge = SidePart(
        EDGE,
        tuple(v for u, v in enumerate(hs.names) if edge_in[0, u]),
        checks(range(p, len(hs.heads)), edge_pos[p] if hs.heads else ()),
    )
    transfer = (graph.input.name,) if hs.input_sent(edge_in)[0] else ()
    transfer += tuple(v for u, v in enumerate(hs.names) if sent[0, u])
    exit_node = graph.exit(hs.st.exit_name).node
    return Sides(hs.st.exit_name, exit_node, device, edge, transfer)


# ---- running one side ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leave:
    """The rows of a batch (indices into it) that left at `exit`, with their logits there."""

    exit: str
    rows: torch.Tensor
    logits: torch.Tensor


@dataclass(frozen=True)
class PartResult:
    """One side's progressive run over a batch of `rows` rows: the rows each head answered (in
    check order), the rows no head answered (`rest`, ascending) and the values of the targets
    asked for. Those values are for the rows `rest`, or, when `held` is set, for the rows
    `held` (ascending, a superset of `rest`): every row the walk held at its end, when rows that
    left could not be dropped from it and a target cannot be cut by rows (a number such as a
    traced `x.shape[0]` counts the rows held)."""

    rows: int
    left: tuple[Leave, ...]
    rest: torch.Tensor
    values: dict[str, Any]
    held: torch.Tensor | None = None

    @property
    def answered(self) -> bool:
        """Whether a head answered every row."""
        return self.rest.numel() == 0

    def rest_of_held(self) -> torch.Tensor | None:
        """The positions of the `rest` rows among the `held` rows (None when `held` is not set).
        O(rows · log rows)."""
        return None if self.held is None else torch.searchsorted(self.held, self.rest)

    def answers(self, exit_name: str, exit_node: str) -> tuple[list[str], torch.Tensor]:
        """Per row, the exit that answered and its logits ([rows, classes]), the rows no head
        answered taking the values of `exit_node` (a target of the run) as exit `exit_name`'s.
        O(rows · classes)."""
        exits = [exit_name] * self.rows
        parts = [(lv.rows, lv.logits) for lv in self.left]
        if self.rest.numel():
            rest_logits = self.values[exit_node]
            pick = self.rest_of_held()
            parts.append((self.rest, rest_logits if pick is None else rest_logits.index_select(0, pick)))
        first = parts[0][1]
        logits = torch.empty((self.rows, *first.shape[1:]), dtype=first.dtype)
        for rows, lg in parts:
            logits[rows] = lg.to(first.dtype)
        for lv in self.left:
            for r in lv.rows.tolist():
                exits[r] = lv.exit
        return exits, logits


def run_part(
    executor: GraphExecutor,
    given: Mapping[str, Any],
    part: SidePart,
    targets: Sequence[str],
    allowed: Collection[str] | None = None,
) -> PartResult:
    """Run one side of a progressive plan on the batch in `given` (first dimension = rows):
    compute in graph order, check each head of `part` at its point, let the confident rows leave
    there and go on with the others only; the rows no head answered get the values of `targets`
    (see `PartResult` for when those cover more rows). With `allowed`, refuses (ValueError) to
    compute a node outside it. Call under `torch.inference_mode`. Time: the side's nodes for the
    rows still in the walk, plus O(rows · classes) per head; nothing after the point where the
    last row left is computed."""
    walk = executor.walk(given, targets, keep=[h.node for h in part.heads], allowed=allowed)
    n = 1 if walk.rows is None else walk.rows
    alive = list(range(n))  # the batch row of each row in the walk
    pending = [True] * n  # per row of the walk: no head answered it yet
    left: list[Leave] = []
    for head in part.heads if n else ():  # bookkeeping in Python lists: few small tensor ops per check
        walk.run_until(head.after)
        logits = walk.value(head.node)
        confident = (confidence(logits.reshape(len(alive), -1)) >= head.threshold).tolist()
        hits = [i for i, (p, c) in enumerate(zip(pending, confident, strict=True)) if p and c]
        if not hits:
            continue
        rows = logits if len(hits) == len(alive) else logits.index_select(0, torch.tensor(hits))
        left.append(Leave(head.exit, torch.tensor([alive[i] for i in hits], dtype=torch.long), rows))
        for i in hits:
            pending[i] = False
        keep = [i for i, p in enumerate(pending) if p]
        if not keep:
            return PartResult(n, tuple(left), torch.zeros(0, dtype=torch.long), {})
        if walk.select_rows(torch.tensor(keep)):
            alive, pending = [alive[i] for i in keep], [True] * len(keep)
    walk.run_until(None)
    rest = [i for i, p in enumerate(pending) if p]
    values = {t: walk.value(t) for t in targets}
    held = None
    if len(rest) < len(alive):  # rows left that the walk could not drop
        batch = [t for t in targets if t in executor.batch_nodes]
        if all(row_major(values[t], len(alive)) for t in batch):
            values.update({t: values[t].index_select(0, torch.tensor(rest)) for t in batch})
        else:
            held = torch.tensor(alive, dtype=torch.long)
    return PartResult(n, tuple(left), torch.tensor([alive[i] for i in rest], dtype=torch.long), values, held)


@dataclass(frozen=True)
class PlanAnswers:
    """Per row of a batch run through both sides of a plan: the exit that answered, the side
    that computed it (`device` or `edge`), and its logits [rows, classes]."""

    exits: list[str]
    sides: list[str]
    logits: torch.Tensor


def run_sides(executor: GraphExecutor, sides: Sides, input_name: str, x: torch.Tensor) -> PlanAnswers:
    """The whole plan in one process on the input batch `x`: the device side (`run_part`), then
    the edge side on the rows no device head answered, from the tensors the device would send
    (what a device and a worker compute, without the network: offline accuracy, tests). Call
    under `torch.inference_mode`. Time: both sides' nodes for the rows that reach them."""
    dev = run_part(executor, {input_name: x}, sides.device, sides.device_targets, allowed=set(sides.device.nodes))
    if sides.uses_edge and dev.rest.numel():
        rows = dev.rest if dev.held is None else dev.held  # the rows the sent values are for
        sent = {n: (x[rows] if n == input_name else dev.values[n]) for n in sides.transfer}
        edge = run_part(executor, sent, sides.edge, [sides.exit_node], allowed=set(sides.edge.nodes))
        edge_exits, edge_logits = edge.answers(sides.exit, sides.exit_node)
        pick = dev.rest_of_held()
        if pick is not None:  # the edge ran every row the device held: keep the rows that went on
            edge_exits, edge_logits = [edge_exits[i] for i in pick.tolist()], edge_logits.index_select(0, pick)
        rest = PartResult(len(x), dev.left, dev.rest, {sides.exit_node: edge_logits})
        exits, logits = rest.answers(sides.exit, sides.exit_node)
        for row, e in zip(dev.rest.tolist(), edge_exits, strict=True):
            exits[row] = e
    else:
        exits, logits = dev.answers(sides.exit, sides.exit_node)
    on_device = {r for lv in dev.left for r in lv.rows.tolist()}
    if not sides.uses_edge:
        on_device = set(range(len(x)))
    return PlanAnswers(exits, [DEVICE if r in on_device else EDGE for r in range(len(x))], logits)
