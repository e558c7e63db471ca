"""Cost graphs from models (zoo and user DAGs), the split executor, and CLI bad inputs."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dapdee.cli import main as cli_main
from dapdee.costgraph import CostGraph, CostGraphError
from dapdee.costmodel import partition
from dapdee.data import FrameNormalize
from dapdee.models import LoadedModel, ModelError, load_model, trace

ZOO_SPECS = [
    "zoo:alexnet?width=0.25",
    "zoo:vgg16?width=0.25",
    "zoo:resnet18?width=0.25",
    "zoo:inception?width=0.25",
]


class TwoBranch(nn.Module):
    """A user DAG: one tensor feeding three consumers, functional ops, a method call, concat and add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 5)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = torch.sigmoid(self.b(x))
        h = self.c(torch.cat([a, b], 1)) + a * b + x.mean(1, keepdim=True)
        early = self.head(h.mean((2, 3)))
        return early, self.fc(F.max_pool2d(h, 2).view(h.shape[0], -1))


class Diamonds(nn.Module):
    """A user DAG of nested diamonds with a skip over two blocks; single output."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        s = x
        y = self.convs[0](x) + self.convs[1](x)
        z = F.relu(self.convs[2](y)) - self.convs[3](y)
        w = self.convs[4](z) * torch.tanh(self.convs[5](z)) + s
        return self.out(torch.flatten(F.adaptive_avg_pool2d(w, 1), 1))


def build_twobranch() -> nn.Module:
    return TwoBranch()


def build_diamonds() -> nn.Module:
    return Diamonds()


def not_a_module() -> int:
    return 3


def random_cut(graph: CostGraph, exit_name: str, rng: random.Random) -> list[str]:
    """A random downward-closed subset of A(exit): walk the topological order, include a node with
    probability p only if all its producers are on the device."""
    needed = graph.ancestors(graph.exit(exit_name).node)
    p = rng.random()
    dev: set[str] = set()
    for name in needed:
        if all(u == graph.input.name or u in dev for u in graph.node(name).inputs) and rng.random() < p:
            dev.add(name)
    return [n for n in needed if n in dev]


def check_random_cuts(m: LoadedModel, n_cuts: int, seed: int) -> None:
    rng = random.Random(seed)
    x = torch.randn(2, *m.input_shape[1:], generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        reference = m.module(x)
    reference = reference if isinstance(reference, tuple) else (reference,)
    for ex, ref in zip(m.graph.exits, reference, strict=True):
        for _ in range(n_cuts):
            part = partition(m.graph, ex.name, random_cut(m.graph, ex.name, rng))
            sent = [u for u, _ in part.transfer]
            on_device = {*part.device_nodes, m.input_name}
            with torch.inference_mode():
                if not part.edge_nodes:  # device-only: the device runs the exit itself
                    out = m.executor.compute({m.input_name: x}, [ex.node], allowed=on_device)[ex.node]
                else:
                    boundary = m.executor.compute({m.input_name: x}, sent, allowed=on_device)
                    assert set(boundary) == set(sent)
                    out = m.executor.compute(boundary, [ex.node], allowed=set(part.edge_nodes))[ex.node]
            assert torch.allclose(out, ref, atol=1e-5), (m.name, ex.name, part.device_nodes)


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_zoo_split_execution_matches_whole_model(spec: str) -> None:
    m = load_model(spec)
    assert len(m.graph.exits) >= 4 and m.graph.exits[-1].name == "final"
    check_random_cuts(m, n_cuts=6, seed=zlib.crc32(spec.encode()))  # the same cuts in every process


@pytest.mark.parametrize(
    "factory", ["tests.test_graph_executor:build_twobranch", "tests.test_graph_executor:build_diamonds"]
)
def test_user_dag_models_trace_and_split(factory: str) -> None:
    m = load_model(factory, input_shape=(1, 3, 16, 16) if "twobranch" in factory else (1, 4, 8, 8))
    consumers = m.graph.consumers()
    assert max(len(c) for c in consumers.values()) >= 3  # a tensor feeding several consumers
    ops = {n.op for n in m.graph.nodes}
    assert {"add", "cat"} & ops or "sub" in ops
    check_random_cuts(m, n_cuts=25, seed=1)


def test_cost_graph_fields_and_round_trip() -> None:
    m = load_model("zoo:resnet18?width=0.25")
    g = m.graph
    conv = g.node("stem_0")
    assert conv.op == "conv2d" and conv.inputs == ("x",)
    assert conv.out_bytes == 16 * 32 * 32 * 4
    assert conv.flops == 2 * 3 * 9 * 16 * 32 * 32
    assert g.node("fc").op == "linear" and g.node("fc").flops == 2 * 128 * 10
    adds = [n for n in g.nodes if n.op == "add"]
    assert len(adds) == 8 and all(len(n.inputs) == 2 for n in adds)  # residual joins
    assert CostGraph.from_json(g.to_json()) == g
    # the JSON is the DESIGN.md contract
    d = json.loads(g.to_json())
    assert set(d) >= {"model", "input", "nodes", "exits"}
    assert set(d["nodes"][0]) >= {"name", "op", "inputs", "out_bytes", "flops", "device_ms", "edge_ms"}
    assert [e["name"] for e in d["exits"]] == ["exit1", "exit2", "exit3", "final"]


def test_in_channels_option_and_28px() -> None:
    m = load_model("zoo:vgg16?width=0.25&in_channels=1", input_shape=(1, 1, 28, 28))
    assert m.graph.input.shape == (1, 1, 28, 28)
    out = m.run_exit(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_missing_inputs_named() -> None:
    from dapdee.executor import MissingInputsError

    m = load_model("zoo:resnet18?width=0.25")
    x = torch.randn(1, 3, 32, 32)
    mid = "layer2_0_conv1"  # the block's skip path also needs layer1's output
    with torch.inference_mode():
        b = m.executor.compute({"x": x}, [mid])
    with pytest.raises(MissingInputsError) as info:
        m.executor.compute(b, ["fc"])
    assert info.value.missing == ["x"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["graph", "no_such_pkg.mod:factory"], "its directory on PYTHONPATH"),
        (["graph", "tests.test_graph_executor:nope"], "has no attribute"),
        (["graph", "tests.test_graph_executor:not_a_module"], "not an nn.Module"),
        (["graph", "tests.test_graph_executor:ZOO_SPECS"], "not callable"),
        (["graph", "zoo:resnet18", "--input-shape", "1,5,32,32"], "rejects input shape"),
        (["graph", "zoo:nosuch"], "unknown zoo model"),
        (["graph", "tests.test_graph_executor:build_untraceable", "--input-shape", "1,3"], "cannot trace"),
        (["graph", "zoo:resnet18?width=abc"], "bad options"),
        (["graph", "zoo:resnet18", "--weights", "/nonexistent/artifact"], "manifest.json"),
    ],
)
def test_graph_cli_bad_inputs(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("dapdee: error:") and needle in err and "\n" not in err


@pytest.mark.parametrize(
    ("spec", "option"),
    [
        ("zoo:alexnet?width=inf", "width"),
        ("zoo:alexnet?width=1e400", "width"),
        ("zoo:alexnet?width=nan", "width"),
        ("zoo:alexnet?width=0", "width"),
        ("zoo:vgg16?width=-0.5", "width"),
        ("zoo:resnet18?width=0.25&tail=inf", "tail"),
        ("zoo:resnet18?width=1000", "width"),  # allocated gigabytes before failing
        ("zoo:resnet18?width=0.25&tail=4.5", "tail"),
        ("zoo:alexnet?width=0.25&in_channels=0", "in_channels"),
        ("zoo:alexnet?width=0.25&in_channels=100000", "in_channels"),
        ("zoo:alexnet?width=0.25&in_channels=1.5", "in_channels"),
        ("zoo:vgg16?width=0.25&num_classes=1", "num_classes"),
        ("zoo:vgg16?width=0.25&num_classes=1000000000", "num_classes"),
    ],
)
def test_graph_cli_channel_factors_and_counts_must_be_in_bounds(
    spec: str, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`width` / `tail` (finite, > 0, at most 4) and `in_channels` / `num_classes` (integers in
    bounds) of a zoo spec: exit 2 and one line naming the option, never a traceback (a width of
    1000 used to allocate gigabytes of weights first)."""
    assert cli_main(["graph", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dapdee: error:") and f"({option}: expected" in err and "\n" not in err


def test_graph_cli_takes_zoo_options_at_their_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["graph", "zoo:alexnet?width=0.125&in_channels=64&num_classes=2"]) == 0
    assert cli_main(["graph", "zoo:resnet18?width=0.0625&tail=4"]) == 0


class OwnFrame(nn.Module):
    """A model with its own layer named `frame`."""

    def __init__(self) -> None:
        super().__init__()
        self.frame = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.frame(x).mean((2, 3)))


class FrameArgument(nn.Module):
    """A model whose input is called `frame` (the traced placeholder's name)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 5)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(frame).mean((2, 3)))


@pytest.mark.parametrize("factory", [OwnFrame, FrameArgument])
def test_raw_frame_input_refuses_a_model_with_its_own_frame(factory: type[nn.Module]) -> None:
    """The raw-frame input's first node is `frame`: a model that already has that name is
    refused (naming the clash) rather than having its own `frame` replaced or renamed; traced
    without the raw-frame input it runs as it is."""
    torch.manual_seed(0)
    m = factory().eval()
    fr = FrameNormalize(1 / 255, [0.5] * 3, [0.25] * 3)
    with pytest.raises(ModelError, match="own 'frame'"):
        trace(m, (1, 3, 8, 8), "own", fr)
    _, g, ex = trace(m, (1, 3, 8, 8), "own")
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(ex.compute({g.input.name: x}, [g.exits[-1].node])[g.exits[-1].node], m(x))


class Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x
        return -x


def build_untraceable() -> nn.Module:
    return Untraceable()


def test_untraceable_is_model_error() -> None:
    with pytest.raises(ModelError, match="cannot trace"):
        trace(Untraceable(), (1, 3), "u")


def test_graph_cli_subprocess_writes_file(tmp_path) -> None:
    out = tmp_path / "g.json"
    r = subprocess.run(
        [sys.executable, "-m", "dapdee.cli", "graph", "zoo:alexnet?width=0.25", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    g = CostGraph.load(str(out))
    assert g.model == "alexnet" and len(g.exits) == 4


def test_cost_graph_validation_errors() -> None:
    base = load_model("zoo:alexnet?width=0.25").graph.to_dict()
    bad = json.loads(json.dumps(base))
    bad["nodes"][1]["inputs"] = ["ghost"]
    with pytest.raises(CostGraphError, match="unknown producer 'ghost'"):
        CostGraph.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["nodes"][0], bad["nodes"][1] = bad["nodes"][1], bad["nodes"][0]
    with pytest.raises(CostGraphError, match="topological order"):
        CostGraph.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["exits"][0]["node"] = "nowhere"
    with pytest.raises(CostGraphError, match=r"exits\[0\].node"):
        CostGraph.from_dict(bad)
    bad = json.loads(json.dumps(base))
    bad["nodes"][2]["device_ms"] = -1
    with pytest.raises(CostGraphError, match="device_ms"):
        CostGraph.from_dict(bad)
