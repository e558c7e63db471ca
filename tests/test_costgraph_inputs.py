"""`CostGraph.from_dict` holds a graph to DESIGN §3.1 and its schema: the model is a model name,
`meta` an object (or null), the input shape a frame's (batch 1 first), an exit has only name,
node and accuracy; `save` gives the file the mode a plain open() would."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dapdee.costgraph import CostGraph, CostGraphError

ROOT = Path(__file__).resolve().parent.parent
TINY: dict[str, Any] = {
    "model": "tiny",
    "input": {"name": "x", "shape": [1, 4]},
    "nodes": [
        {"name": "a", "op": "", "inputs": ["x"], "out_bytes": 4},
        {"name": "b", "op": "", "inputs": ["a"], "out_bytes": 4},
    ],
    "exits": [{"name": "exit1", "node": "a", "accuracy": 0.5}, {"name": "final", "node": "b", "accuracy": 0.9}],
}


def graph(**fields: Any) -> dict[str, Any]:
    """A copy of TINY with `fields` replaced."""
    return {**json.loads(json.dumps(TINY)), **fields}


@pytest.mark.parametrize("name", ["../../etc/passwd", "", "a" * 65, "m\nx", "bad name", "a..b", "-lead"])
def test_a_model_that_is_not_a_model_name_is_refused(name: str) -> None:
    with pytest.raises(CostGraphError, match="^model: expected a model name"):
        CostGraph.from_dict(graph(model=name))


@pytest.mark.parametrize("meta", [[], 0, "", False, [1], "spec"])
def test_a_meta_that_is_not_an_object_is_refused(meta: Any) -> None:
    with pytest.raises(CostGraphError, match="^meta: expected an object"):
        CostGraph.from_dict(graph(meta=meta))


def test_absent_or_null_meta_is_empty_and_an_object_is_kept() -> None:
    assert CostGraph.from_dict(TINY).meta == {} and CostGraph.from_dict(graph(meta=None)).meta == {}
    assert CostGraph.from_dict(graph(meta={"spec": "zoo:alexnet"})).meta == {"spec": "zoo:alexnet"}


@pytest.mark.parametrize("shape", [[2, 4], [8], [3, 1, 4]])
def test_an_input_shape_whose_batch_is_not_1_is_refused(shape: list[int]) -> None:
    """A cost graph prices one frame: its input shape is a frame's, batch first."""
    with pytest.raises(CostGraphError, match=r"^input.shape: the first entry is the batch and must be 1"):
        CostGraph.from_dict(graph(input={"name": "x", "shape": shape}))
    assert CostGraph.from_dict(graph(input={"name": "x", "shape": [1]})).input.shape == (1,)


def test_a_per_exit_confidence_is_refused_pointing_at_progressive() -> None:
    """The per-exit `confidence` object was never read: calibrated confidence exits are the
    graph's `progressive` field. It is refused as the planner refuses it, not dropped."""
    g = graph()
    g["exits"][0]["confidence"] = {"threshold": 0.8, "fraction": 0.6}
    with pytest.raises(CostGraphError, match=r"exits\[0\]: unknown fields \['confidence'\].*progressive"):
        CostGraph.from_dict(g)
    g["exits"][0] = {"name": "exit1", "node": "a", "accuracy": 0.5, "acc": 1}
    with pytest.raises(CostGraphError, match=r"exits\[0\]: unknown fields \['acc'\]"):
        CostGraph.from_dict(g)


def test_the_exit_fields_are_those_of_the_schema_and_the_design() -> None:
    schema = json.loads((ROOT / "docs" / "schemas" / "cost-graph.schema.json").read_text())
    assert sorted(schema["$defs"]["exit"]["properties"]) == ["accuracy", "name", "node"]  # what from_dict takes
    assert schema["$defs"]["exit"]["additionalProperties"] is False
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    exits_row = next(line for line in design.splitlines() if line.startswith("| `exits` |"))
    assert "`confidence`" not in exits_row and "progressive" in exits_row


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_save_gives_the_mode_open_would(tmp_path: Path, umask_022: None) -> None:
    """A new file gets 0o666 less the umask; a replaced file keeps its mode (tempfile's 0o600
    used to end up on the graph)."""
    g = CostGraph.from_dict(TINY)
    new = tmp_path / "new.json"
    g.save(str(new))
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    old = tmp_path / "old.json"
    old.write_text("{}")
    old.chmod(0o640)
    g.save(str(old))
    assert stat.S_IMODE(old.stat().st_mode) == 0o640
    assert CostGraph.load(str(old)) == g
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "old.json"]  # no temporary left


def test_a_progressive_rule_other_than_max_softmax_is_refused() -> None:
    """The thresholds are max-softmax thresholds; a graph naming another rule (which nothing
    implements) would be run under max-softmax all the same. The library, the planner's API and
    the schema refuse it alike."""
    from dapdee.api.planner import ProgressiveBody

    by_exit = {
        "exit1": {"fractions": {"exit1": 1.0}, "accuracy": 0.5},
        "final": {"fractions": {"exit1": 0.5, "final": 0.5}, "accuracy": 0.9},
    }
    progressive = {"rule": "entropy", "thresholds": {"exit1": 0.9, "final": None}, "by_exit": by_exit}
    with pytest.raises(CostGraphError, match=r"^progressive\.rule: only 'max_softmax'"):
        CostGraph.from_dict(graph(progressive=progressive))
    with pytest.raises(ValueError, match="rule"):
        ProgressiveBody.model_validate(progressive)
    schema = json.loads((ROOT / "docs" / "schemas" / "cost-graph.schema.json").read_text())
    assert schema["properties"]["progressive"]["properties"]["rule"]["enum"] == ["max_softmax"]
    ok = {**progressive, "rule": "max_softmax"}
    assert CostGraph.from_dict(graph(progressive=ok)).progressive is not None
