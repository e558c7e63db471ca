"""Progressive (confidence) exits at run time (`dapdee.progressive_run`, `GraphExecutor.walk`).

- The sides of every downward-closed cut of every exit are the execution model's: checked
  against the planner's own description (`ProgressiveCands.describe`) and against the rule
  written out here with plain sets; the edge's view (from what it was sent) agrees.
- A split run (device part, then the edge part from the sent tensors) answers every row where
  the calibrated rule truncated at the planned exit says, with that exit's logits, on a user DAG
  whose heads share nodes, read side branches and use `x.shape[0]` (rows cannot be dropped).
- On the shipped ResNet-18 artifact and the whole Fashion-MNIST test split, the fractions leaving
  at each exit on each side are the calibrated ones, and so is the accuracy.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dapdee import data as D
from dapdee.costgraph import CostGraph, Progressive
from dapdee.models import LoadedModel, load_model, trace
from dapdee.planning.enumerate import enumerate_ideals
from dapdee.planning.progressive import HeadStructure, ProgressiveCands
from dapdee.progressive_run import edge_sides, run_sides, split_sides
from dapdee.training.confidence import first_confident_exit

REPO = Path(__file__).resolve().parent.parent
RESNET = REPO / "artifacts" / "fmnist-resnet18"


class SharedHeads(nn.Module):
    """Trunk stem -> a -> b -> final; exit1 reads `a` and `stem` (pooled `stem` is shared with
    exit2, which reads only `stem`: with `a` on the edge, the prefix rule sends exit2 there too);
    exit3 reads `b` through a `view(x.shape[0], -1)`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.h1 = nn.Linear(8, 5)
        self.h2 = nn.Linear(4, 5)
        self.h3 = nn.Linear(4 * 8 * 8, 5)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = F.relu(self.stem(x))
        ps = s.mean((2, 3))
        a = F.relu(self.a(s))
        b = F.relu(self.b(a))
        e1 = self.h1(torch.cat([ps, a.mean((2, 3))], 1))
        e2 = self.h2(ps)
        e3 = self.h3(b.view(b.shape[0], -1))
        return e1, e2, e3, self.fc(b.mean((2, 3)) + a.amax((2, 3)))


def with_thresholds(graph: CostGraph, thresholds: dict[str, float | None]) -> CostGraph:
    """`graph` with a `progressive` field holding `thresholds` (the fractions are placeholders:
    run time does not read them)."""
    names = [e.name for e in graph.exits]
    by_exit = {}
    for i, e in enumerate(names):
        keys = [k for k in names[:i] if thresholds.get(k) is not None] + [e]
        by_exit[e] = {"fractions": {k: (1.0 if k == e else 0.0) for k in keys}, "accuracy": None}
    prog = Progressive.from_dict({"rule": "max_softmax", "thresholds": thresholds, "by_exit": by_exit})
    return CostGraph(graph.model, graph.input, graph.nodes, graph.exits, progressive=prog)


@pytest.fixture(scope="module")
def shared() -> LoadedModel:
    torch.manual_seed(0)
    module = SharedHeads().eval()
    gm, graph, ex = trace(module, (1, 3, 8, 8), "shared")
    return LoadedModel("shared", "test:shared", module, gm, graph, ex, (1, 3, 8, 8))


def closed_sets(graph: CostGraph, exit_index: int) -> list[frozenset[str]]:
    """Every downward-closed device set of the exit's ancestors."""
    st = HeadStructure.build(graph, exit_index).st
    got = enumerate_ideals(st, 100_000)
    assert got is not None
    return [frozenset(st.lists(m)[0]) for m in got[3]]


# ---- the sides ----------------------------------------------------------------------------------


def expected_sides(graph: CostGraph, exit_name: str, dev: frozenset[str]) -> dict[str, Any]:
    """The execution model with plain sets: heads in exit order, a head on the device iff its
    trunk reads are in D and every shallower head is there; own nodes to the shallower head;
    checks at the running maximum of the side's exit-node positions; the uplink."""
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    names = [e.name for e in graph.exits]
    node_of = {e.name: e.node for e in graph.exits}
    assert graph.progressive is not None
    trunk = set(graph.ancestors(node_of[exit_name]))
    heads = [k for k in names[: names.index(exit_name)] if graph.progressive.threshold(k) is not None]
    s_dev, s_edge, owned, all_dev = set(dev), trunk - dev, set(trunk), True
    side: dict[str, list[str]] = {"device": [], "edge": []}
    for k in heads:
        need = set(graph.ancestors(node_of[k]))
        all_dev = all_dev and (need & trunk) <= dev
        own = need - owned
        owned |= own
        (s_dev if all_dev else s_edge).update(own)
        side["device" if all_dev else "edge"].append(k)
    sent = {u for v in s_edge for u in graph.node(v).inputs if u == graph.input.name or u in s_dev}
    sent |= {node_of[k] for k in side["edge"] if node_of[k] in s_dev}
    checks = {}
    for part in ("device", "edge"):
        top = -1
        for k in side[part]:
            top = max(top, order[node_of[k]])
            checks[k] = graph.nodes[top].name
    return {"dev": s_dev, "edge": s_edge, "side": side, "sent": sent, "after": checks}


@pytest.mark.parametrize("model", ["shared", "resnet18"])
def test_sides_are_the_execution_model(model: str, shared: LoadedModel, resnet: LoadedModel) -> None:
    loaded = shared if model == "shared" else resnet
    graph = (
        loaded.graph
        if model == "resnet18"
        else with_thresholds(loaded.graph, {"exit1": 0.5, "exit2": 0.5, "exit3": 0.5})
    )
    checked = 0
    for i, ex in enumerate(graph.exits):
        hs = HeadStructure.build(graph, i)
        sets = closed_sets(graph, i)
        local = {v: j for j, v in enumerate(hs.st.nodes)}
        masks = [sum(1 << local[v] for v in d) for d in sets]
        cands = ProgressiveCands(hs, masks, True, None)
        for j, dev in enumerate(sets):
            sides = split_sides(graph, ex.name, dev)
            want = expected_sides(graph, ex.name, dev)
            assert set(sides.device.nodes) == want["dev"] and set(sides.edge.nodes) == want["edge"]
            assert [h.exit for h in sides.device.heads] == want["side"]["device"]
            assert [h.exit for h in sides.edge.heads] == want["side"]["edge"]
            assert {h.exit: h.after for h in (*sides.device.heads, *sides.edge.heads)} == want["after"]
            assert set(sides.transfer) == want["sent"]
            # the planner's own description of the same plan
            _, _, transfer, heads = cands.describe(j)
            assert list(sides.transfer) == [u for u, _ in transfer]
            assert [(h["exit"], h["side"]) for h in heads] == [
                (h.exit, p.side) for p in (sides.device, sides.edge) for h in p.heads
            ]
            # the edge, from what it is sent, sees the same split
            if sides.uses_edge:
                computed = [n.name for n in loaded.executor.schedule(list(sides.transfer), [sides.exit_node])]
                assert edge_sides(graph, ex.name, computed) == sides
            checked += 1
    assert checked > len(graph.exits)


def test_prefix_rule_binds_on_shared_heads(shared: LoadedModel) -> None:
    """D = the stem: exit2 reads only the stem, but exit1 (shallower) needs `a`, so both run on
    the edge; their shared pooled stem belongs to exit1 and the device sends the stem."""
    graph = with_thresholds(shared.graph, {"exit1": 0.5, "exit2": 0.5, "exit3": 0.5})
    stem = frozenset(graph.ancestors("relu"))
    sides = split_sides(graph, "final", stem)
    assert [h.exit for h in sides.edge.heads] == ["exit1", "exit2", "exit3"] and not sides.device.heads
    assert sides.transfer == ("relu",)
    assert sides.device_targets == ("relu",)
    everything = split_sides(graph, "final", graph.ancestors(graph.exit("final").node))
    assert not everything.uses_edge and everything.transfer == () and everything.device_targets == ("fc",)


def test_errors_name_the_problem(shared: LoadedModel) -> None:
    with pytest.raises(ValueError, match="confidence_exits"):
        split_sides(shared.graph, "final", [])
    graph = with_thresholds(shared.graph, {"exit1": 0.5})
    with pytest.raises(ValueError, match="not downward closed"):
        split_sides(graph, "final", ["a"])
    with pytest.raises(ValueError, match="not ancestors"):
        split_sides(graph, "exit2", ["b"])
    with pytest.raises(ValueError, match="not an exit"):
        split_sides(graph, "exit9", [])


# ---- running the sides --------------------------------------------------------------------------


def split_run(
    loaded: LoadedModel, graph: CostGraph, exit_name: str, dev: frozenset[str], x: torch.Tensor
) -> tuple[list[str], torch.Tensor, list[str]]:
    """Device part on `x`, then the edge part on the rows no device head answered, from the sent
    tensors only (`run_sides`): per row the exit, its logits and the side that answered."""
    sides = split_sides(graph, exit_name, dev)
    with torch.inference_mode():
        got = run_sides(loaded.executor, sides, graph.input.name, x)
    return got.exits, got.logits, got.sides


def test_split_runs_answer_like_the_rule(shared: LoadedModel) -> None:
    """Every cut of every exit: each row leaves where the rule truncated at the exit says, with
    that exit's whole-model logits, on the side that computes that head."""
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    names = [e.name for e in shared.graph.exits]
    with torch.inference_mode():
        ref = {e: shared.run_exit(x, e) for e in names}
    conf = {e: torch.softmax(ref[e], 1).amax(1) for e in names}
    thresholds = {"exit1": float(conf["exit1"].quantile(0.7)), "exit2": None, "exit3": float(conf["exit3"].median())}
    graph = with_thresholds(shared.graph, thresholds)
    runs = 0
    for i, exit_name in enumerate(names):
        active = [thresholds.get(k) for k in names[:i]] + [None]
        want = first_confident_exit([ref[k] for k in names[: i + 1]], active)
        for dev in closed_sets(graph, i):
            exits, logits, where = split_run(shared, graph, exit_name, dev, x)
            sides = split_sides(graph, exit_name, dev)
            side_of = {h.exit: p.side for p in (sides.device, sides.edge) for h in p.heads}
            side_of[exit_name] = "edge" if sides.uses_edge else "device"
            assert exits == [names[k] for k in want.tolist()]
            for r, e in enumerate(exits):
                assert where[r] == side_of[e]
                torch.testing.assert_close(logits[r], ref[e][r], rtol=1e-4, atol=1e-5)
            runs += 1
    assert runs > 10
    assert len(set(first_confident_exit([ref[k] for k in names], [*thresholds.values(), None]).tolist())) == 3


def test_walk_drops_rows_only_when_it_can(shared: LoadedModel) -> None:
    """Rows leave the walk (it computes the rest for the others only) unless a value held
    cannot be cut by rows; the answers are the same either way."""
    ex, inp = shared.executor, shared.graph.input.name
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([1, 4])
    with torch.inference_mode():
        walk = ex.walk({inp: x}, ["fc"], keep=["h1"])
        walk.run_until("h1")
        assert walk.select_rows(rows) and walk.rows == 2
        walk.run_until(None)
        torch.testing.assert_close(walk.value("fc"), shared.run_exit(x[rows]))
        torch.testing.assert_close(walk.value("h1"), shared.run_exit(x, "exit1")[rows])
        held = ex.walk({inp: x}, ["h3"])
        held.run_until("getitem")  # b.shape[0] is held: a number, not rows
        assert not held.select_rows(rows) and held.rows == 6
        held.run_until(None)
        torch.testing.assert_close(held.value("h3"), shared.run_exit(x, "exit3"))


# ---- the shipped ResNet-18 and the whole test split --------------------------------------------


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    return load_model("", weights=RESNET)


def test_resnet18_fractions_per_side_are_the_calibrated_ones(resnet: LoadedModel) -> None:
    """A cut where exit1 runs on the device and exit2, exit3 on the edge: on the whole test split
    the share of frames leaving at each exit (and the side) is the calibrated one, so is the
    accuracy, and frames reaching `final` get the whole model's logits."""
    graph = resnet.graph
    assert graph.progressive is not None and graph.progressive.split == "test"
    calibrated = dict(graph.progressive.outcome("final").fractions)
    dev = frozenset(set(graph.ancestors(graph.exit("exit1").node)) & set(graph.ancestors(graph.exit("final").node)))
    sides = split_sides(graph, "final", dev)
    assert [h.exit for h in sides.device.heads] == ["exit1"]
    assert [h.exit for h in sides.edge.heads] == ["exit2", "exit3"]
    images, labels = D.load_raw("fashion-mnist", "test")
    frames = D.capture_frames(images, resnet.input_shape, resnet.manifest["preprocess"])
    counts: Counter[tuple[str, str]] = Counter()
    correct = 0
    for lo in range(0, len(frames), 1000):
        x = frames[lo : lo + 1000]
        exits, logits, where = split_run(resnet, graph, "final", dev, x)
        counts.update(zip(exits, where, strict=True))
        correct += int((logits.argmax(1) == torch.as_tensor(labels[lo : lo + 1000])).sum())
        if lo == 0:
            final_rows = [r for r, e in enumerate(exits) if e == "final"]
            with torch.inference_mode():
                whole = resnet.run_exit(x[final_rows])
            torch.testing.assert_close(logits[final_rows], whole, rtol=1e-4, atol=1e-4)
    n = len(frames)
    assert n == 10_000
    assert set(counts) == {("exit1", "device"), ("exit2", "edge"), ("exit3", "edge"), ("final", "edge")}
    for (exit_name, _), c in counts.items():
        assert abs(c / n - calibrated[exit_name]) <= 3 / n, (exit_name, c / n, calibrated[exit_name])
    accuracy = graph.progressive.outcome("final").accuracy
    assert accuracy is not None and abs(correct / n - accuracy) <= 3 / n


def test_resnet18_batch_of_one_leaves_where_the_batch_does(resnet: LoadedModel) -> None:
    """The device runs one frame at a time: the same exits as a batched run."""
    graph = resnet.graph
    images, _ = D.load_raw("fashion-mnist", "test", limit=48)
    x = D.capture_frames(images, resnet.input_shape, resnet.manifest["preprocess"])
    everything = frozenset(graph.ancestors(graph.exit("final").node))
    batched, _, _ = split_run(resnet, graph, "final", everything, x)
    single = [split_run(resnet, graph, "final", everything, x[i : i + 1])[0][0] for i in range(len(x))]
    assert single == batched and len(set(single)) >= 2
