"""The camera-size ResNet-18 (`stem=patch4`): shapes, exits, shrinking stage boundaries, the
shipped 224-px artifact, and bench/cut_sweep.py's reading of plans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dapdee.bench.cut_sweep import load_candidate, summary, sweep
from dapdee.costgraph import CostGraph, Exit, InputSpec, Node
from dapdee.data import capture_frames, load_raw
from dapdee.models import ModelError, build_module, load_model, parse_spec
from dapdee.zoo import ResNet18

REPO = Path(__file__).resolve().parent.parent
CAMERA = REPO / "artifacts" / "fmnist-resnet18-224"
SPEC = "zoo:resnet18?width=0.25&stem=patch4&tail=1.5"
FRAME_BYTES = 3 * 224 * 224


def test_patch4_stage_shapes_and_exits() -> None:
    m = build_module(parse_spec(SPEC))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        s = m.stem(x)
        assert m.stem[0].kernel_size == (4, 4) and m.stem[0].stride == (4, 4)
        assert s.shape == (2, 16, 56, 56)
        shapes = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            s = layer(s)
            shapes.append(tuple(s.shape))
        outs = m(x)
    assert shapes == [(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7), (2, 192, 7, 7)]
    assert len(outs) == 4 and all(o.shape == (2, 10) for o in outs)
    assert m.fc.in_features == 192  # tail=1.5 widens layer4 only


def test_patch4_boundaries_shrink_below_the_frame() -> None:
    """Traced as an artifact is (uint8 frame in): each exit head reads a stage output, and those
    shrink stage by stage, all below the raw frame."""
    g = load_candidate(SPEC, 224, "fashion-mnist", "cam").graph
    assert g.input.dtype == "uint8" and g.input.bytes == FRAME_BYTES
    assert g.nodes[0].name == "frame"
    stage_bytes = [g.node(g.node(f"exit{i}_0").inputs[0]).out_bytes for i in (1, 2, 3)]
    assert stage_bytes == [50176, 25088, 12544]
    assert [e.name for e in g.exits] == ["exit1", "exit2", "exit3", "final"]


def test_existing_resnet18_options_unchanged() -> None:
    for stem in ("cifar", "imagenet"):
        m = ResNet18(width=0.25, stem=stem)
        assert m.layer1[0].conv1.stride == (1, 1) and m.layer4[0].conv1.stride == (2, 2)
        assert m.fc.in_features == 128
    # the shipped 32-px artifact still loads strictly into the default options
    loaded = load_model("", weights=REPO / "artifacts" / "fmnist-resnet18")
    assert loaded.input_shape == (1, 1, 32, 32)


@pytest.mark.parametrize(
    "query, message",
    [("stem=patch3", "stem: expected one of"), ("stem=patch4&tail=0", "tail: expected"), ("tail=wide", "tail: ex")],
)
def test_bad_camera_options_are_named(query: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_module(parse_spec(f"zoo:resnet18?width=0.25&{query}"))


@pytest.mark.skipif(not (CAMERA / "manifest.json").is_file(), reason="artifacts/fmnist-resnet18-224 missing")
def test_camera_artifact_accuracy_and_manifest() -> None:
    loaded = load_model("", weights=CAMERA)
    man = loaded.manifest
    assert man["model"] == SPEC and man["name"] == "resnet18-224"
    assert loaded.graph.input.dtype == "uint8" and loaded.input_shape == (1, 3, 224, 224)
    acc = {e["name"]: e["accuracy"] for e in man["exits"]}
    assert acc["final"] >= 0.90 and acc["exit1"] >= 0.75
    assert man["splits"]["train"] == 55000 and man["splits"]["test"] == 10000
    assert man["wall_time_s"] > 0 and man["notes"]
    # the weights really are that good: the serving path (uint8 frames through the graph)
    images, labels = load_raw("fashion-mnist", "test", limit=300)
    frames = capture_frames(images, loaded.input_shape, man["preprocess"])
    final = loaded.run_exit(frames, "final").argmax(1)
    assert (final == torch.as_tensor(labels)).float().mean() >= 0.85


def _chain(device_ms: list[float], out_bytes: list[int]) -> CostGraph:
    nodes, prev = [], "x"
    for i, (ms, b) in enumerate(zip(device_ms, out_bytes, strict=True)):
        nodes.append(Node(f"n{i}", "conv2d", (prev,), b, device_ms=ms, edge_ms=ms / 30))
        prev = f"n{i}"
    return CostGraph("chain", InputSpec("x", (1, 3, 8, 8), "uint8", 100_000), tuple(nodes), (Exit("final", prev),))


def test_cut_sweep_reads_cuts_off_the_plans() -> None:
    """A 4-node chain whose bytes shrink 50k -> 10k -> 1k: edge-only at a fat uplink, the
    cut moves deeper as it narrows, device-only at the thinnest."""
    g = _chain([1.0, 20.0, 40.0, 200.0], [50_000, 10_000, 1_000, 40])
    bws = [("fat", 1000.0), ("a", 50.0), ("b", 5.0), ("c", 0.5), ("thin", 0.001)]
    rows = sweep(g, bws, rtt_ms=5.0)
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "edge-only" and kinds[-1] == "device-only"
    assert [r["cut_after"] for r in rows[1:4]] == [["n0"], ["n1"], ["n2"]]
    assert [r["sent_bytes"] for r in rows] == [100_000, 50_000, 10_000, 1_000, 0]
    s = summary(rows)
    assert s["distinct_mid_cuts"] == 3 and [c["last"] for c in s["mid_cuts"]] == ["n0", "n1", "n2"]
