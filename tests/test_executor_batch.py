"""Batch data in the split executor and in progressive runs (`dapdee.executor`,
`dapdee.progressive_run`): only values that depend on the graph input count the rows and are
cut by rows (a parameter crossing a cut is neither, whatever its first dimension); a batch size
traced early (`x.shape[0]`) and used on the edge after a device head let rows leave; an empty
batch."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dapdee.costgraph import CostGraph
from dapdee.executor import GraphExecutor
from dapdee.models import trace
from dapdee.progressive_run import run_part, run_sides, split_sides
from dapdee.training.confidence import first_confident_exit
from tests.test_progressive_run import with_thresholds

SHAPE = (1, 3, 8, 8)


class ParamScaled(nn.Module):
    """Stem -> exit1's head, and stem -> conv -> final; a learned per-channel scale (read by
    `get_attr`: first dimension 4) multiplies the stem's output (`early`: exit1 reads the scaled
    value) or the deeper branch (not `early`: only `final` needs it)."""

    def __init__(self, early: bool) -> None:
        super().__init__()
        self.early = early
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.h1 = nn.Linear(4, 5)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale
        h = F.relu(self.stem(x))
        if self.early:
            h = h * s
        e1 = self.h1(h.mean((2, 3)))
        b = F.relu(self.b(h))
        if not self.early:
            b = b * s
        return e1, self.fc(b.mean((2, 3)))


class EarlyBatchSize(nn.Module):
    """Reads the batch size first (`n = x.shape[0]`, traced as nodes `getattr_1`, `getitem`);
    exit1's head reads the stem, `final` flattens the deeper branch with `view(n, -1)`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.h1 = nn.Linear(4, 5)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        s = F.relu(self.stem(x))
        e1 = self.h1(s.mean((2, 3)))
        b = F.relu(self.b(s))
        return e1, self.fc(b.view(n, -1))


def traced(factory: Callable[[], nn.Module]) -> tuple[nn.Module, GraphExecutor, CostGraph]:
    """(the module `factory` builds, weights seeded, in eval mode; its executor; its cost graph)."""
    torch.manual_seed(0)
    module = factory().eval()
    _, graph, ex = trace(module, SHAPE, "m")
    return module, ex, graph


def batch(rows: int, seed: int) -> torch.Tensor:
    """`rows` standard normal inputs of SHAPE, from `seed`."""
    return torch.randn(rows, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def test_batch_nodes_are_the_input_and_what_depends_on_it() -> None:
    _, ex, _ = traced(lambda: ParamScaled(early=True))
    assert {"x", "stem", "relu", "mul", "h1", "fc"} <= ex.batch_nodes
    assert "scale" not in ex.batch_nodes
    _, ex, _ = traced(EarlyBatchSize)
    assert {"getattr_1", "getitem", "view"} <= ex.batch_nodes  # a number read off the input is batch data


def test_walk_counts_rows_and_cuts_batch_values_only() -> None:
    """A parameter given first (first dimension 4) neither sets the walk's row count nor is cut
    by `select_rows`; the rows kept get the whole model's values."""
    module, ex, _ = traced(lambda: ParamScaled(early=False))
    for rows in (8, 4):
        x = batch(rows, 1)
        with torch.inference_mode():
            given = {"scale": module.scale, **ex.compute({"x": x}, ["stem"])}
            walk = ex.walk(given, ["fc"], keep=["h1"])
            assert walk.rows == rows
            walk.run_until("h1")
            keep = torch.tensor([1, rows - 1])
            assert walk.select_rows(keep) and walk.rows == 2
            assert torch.equal(walk.value("scale"), module.scale)  # held whole, not cut to 2 rows
            walk.run_until(None)
            torch.testing.assert_close(walk.value("fc"), module(x[keep])[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("early", "rows"), [(True, 8), (True, 6), (False, 4), (False, 8)])
def test_parameter_sent_over_the_cut_is_not_batch_data(early: bool, rows: int) -> None:
    """The parameter crosses the cut next to the stem's output and exit1's head runs on the
    edge: every row leaves where the rule says, with the whole model's logits there."""
    module, ex, graph = traced(lambda: ParamScaled(early))
    dev = ["scale", "stem", "relu"] if early else ["scale", "stem"]
    x = batch(rows, 2)
    with torch.inference_mode():
        ref = module(x)
    threshold = float(torch.softmax(ref[0], 1).amax(1).sort().values[1])  # all but the least confident row
    sides = split_sides(with_thresholds(graph, {"exit1": threshold}), "final", dev)
    assert sides.transfer[0] == "scale" and [h.exit for h in sides.edge.heads] == ["exit1"]
    with torch.inference_mode():
        got = run_sides(ex, sides, "x", x)
    want = [("exit1", "final")[k] for k in first_confident_exit(list(ref), [threshold, None]).tolist()]
    assert got.exits == want and {"exit1", "final"} <= set(want)
    for r, e in enumerate(got.exits):
        torch.testing.assert_close(got.logits[r], ref[0 if e == "exit1" else 1][r], rtol=0, atol=1e-6)


def test_batch_size_traced_early_and_used_on_the_edge() -> None:
    """A device head lets rows leave but the device walk cannot drop them (it holds the number
    `x.shape[0]`, which the edge reads): the values it hands on are for every row it held, and
    the rows that go on get the edge's answers, the others the device's."""
    module, ex, graph = traced(EarlyBatchSize)
    x = batch(6, 1)
    with torch.inference_mode():
        ref = module(x)
    threshold = float(torch.softmax(ref[0], 1).amax(1).median())
    sides = split_sides(with_thresholds(graph, {"exit1": threshold}), "final", ["getattr_1", "getitem", "stem", "relu"])
    assert [h.exit for h in sides.device.heads] == ["exit1"] and "getitem" in sides.transfer
    with torch.inference_mode():
        dev = run_part(ex, {"x": x}, sides.device, sides.device_targets, allowed=set(sides.device.nodes))
        got = run_sides(ex, sides, "x", x)
    assert dev.held is not None and dev.held.tolist() == list(range(6)) and dev.values["getitem"] == 6
    assert 0 < dev.rest.numel() < 6
    want = [("exit1", "final")[k] for k in first_confident_exit(list(ref), [threshold, None]).tolist()]
    assert got.exits == want
    assert got.sides == ["device" if e == "exit1" else "edge" for e in want]
    for r, e in enumerate(got.exits):
        torch.testing.assert_close(got.logits[r], ref[0 if e == "exit1" else 1][r], rtol=0, atol=1e-6)


def test_run_part_on_an_empty_batch() -> None:
    """No row: no head answers, nothing is left to answer, the targets have no rows."""
    _, ex, graph = traced(lambda: ParamScaled(early=False))
    sides = split_sides(with_thresholds(graph, {"exit1": 0.0}), "final", graph.ancestors("fc"))
    assert [h.exit for h in sides.device.heads] == ["exit1"]
    with torch.inference_mode():
        got = run_part(ex, {"x": batch(0, 1)}, sides.device, sides.device_targets)
    assert got.rows == 0 and got.left == () and got.rest.numel() == 0
    assert got.values["fc"].shape == (0, 5)
