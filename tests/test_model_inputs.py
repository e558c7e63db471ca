"""What an artifact, a spec or a dataset on disk may hand the loaders: a manifest never makes
the loader import code, numbers and shapes are bounded, malformed files end in a ModelError or
DataError naming the file and the field (never OverflowError, RecursionError or TypeError)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dapdee import data as D
from dapdee import imagefolder
from dapdee.data import DataError
from dapdee.models import MANIFEST, ModelError, check_manifest, load_model, parse_spec, read_manifest, trace
from dapdee.names import MAX_INPUT_ELEMENTS
from tests.images import write_png

ROOT = Path(__file__).resolve().parent.parent
ALEXNET = ROOT / "artifacts" / "fmnist-alexnet"  # trained, with calibrated confidence exits
BIG = 10**400  # JSON allows it; a float cannot hold it


def artifact(tmp_path: Path, **fields: Any) -> Path:
    """A copy of the shipped fmnist-alexnet artifact whose manifest has `fields` replaced."""
    d = tmp_path / "artifact"
    shutil.copytree(ALEXNET, d)
    manifest = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps({**manifest, **fields}))
    return d


# ---- a manifest's spec is data, not code -------------------------------------------------------

PAYLOAD = """
from pathlib import Path
from dapdee.zoo import ZOO

def factory():
    Path(__file__).with_name("CALLED").write_text("factory called")
    return ZOO["alexnet"](width=0.5, in_channels=1)
"""


def _python(code: str, pkg: Path) -> subprocess.CompletedProcess[str]:
    """`python -c code` with `pkg` (where the payload module lives) and the repository importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_manifest_cannot_make_the_loader_import_code(tmp_path: Path) -> None:
    """`load_model("", weights=DIR)` (what `dapdee graph --weights`, the edge worker's `@DIR` and
    the device do) builds the manifest's spec only when it is a zoo: spec; the same
    package.module:factory spec named by the caller (`load_model`, the edge's `SPEC@DIR`) is
    built. The payload module is importable, so only the rule keeps it from running."""
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    (pkg / "manifest_payload.py").write_text(PAYLOAD)
    d = artifact(tmp_path, model="manifest_payload:factory")
    with pytest.raises(ModelError, match=r"manifest\.json: field model: 'manifest_payload:factory'.*import"):
        load_model("", weights=d)
    refused = _python(f"from dapdee.cli import main; raise SystemExit(main(['graph', '--weights', {str(d)!r}]))", pkg)
    assert refused.returncode == 2 and "import" in refused.stderr, refused.stderr
    assert not (pkg / "CALLED").exists()
    named = _python(
        "from dapdee.models import load_model\n"
        "from dapdee.edge_worker.app import load_models\n"
        "from dapdee.edge_worker.config import Settings\n"
        f"g = load_model('manifest_payload:factory', weights={str(d)!r}).graph\n"
        "assert g.input.dtype == 'uint8' and g.exits[-1].accuracy is not None\n"
        f"print(load_models(Settings(models='manifest_payload:factory@{d}'))[0].spec)",
        pkg,
    )
    assert named.returncode == 0, named.stderr[-2000:]
    assert named.stdout.strip() == "manifest_payload:factory"
    assert (pkg / "CALLED").read_text() == "factory called"


def test_a_zoo_manifest_still_loads_alone_and_a_different_spec_is_refused(tmp_path: Path) -> None:
    assert load_model("", weights=ALEXNET).spec == "zoo:alexnet?width=0.5&in_channels=1"
    with pytest.raises(ModelError, match="trained for"):
        load_model("zoo:alexnet?width=0.25&in_channels=1", weights=ALEXNET)
    # the same model spelt another way (options reordered, another number format) is its own
    again = load_model("zoo:alexnet?in_channels=1&width=.50", weights=ALEXNET)
    assert again.spec == "zoo:alexnet?width=0.5&in_channels=1"
    with pytest.raises(ModelError, match="trained for"):
        load_model("zoo:alexnet?in_channels=1", weights=ALEXNET)  # the default width is another model


# ---- numbers and shapes --------------------------------------------------------------------------


def test_integers_too_large_for_a_float_are_named_not_overflowerror(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="width: expected a finite number"):
        parse_spec("zoo:alexnet?width=" + "9" * 400)
    with pytest.raises(ModelError, match=r"field exits\[0\]\.accuracy"):
        check_manifest({"model": "zoo:alexnet", "exits": [{"name": "final", "accuracy": BIG}]}, "m")
    with pytest.raises(ModelError, match=r"field preprocess\.scale"):
        check_manifest({"model": "zoo:alexnet", "preprocess": {"scale": BIG}}, "m")
    with pytest.raises(ModelError, match=r"field confidence_exits\.thresholds\.exit1"):
        check_manifest({"model": "zoo:alexnet", "confidence_exits": {"thresholds": {"exit1": -BIG}}}, "m")
    with pytest.raises(ModelError, match=r"manifest\.json: field exits\[0\]\.accuracy"):
        load_model("", weights=artifact(tmp_path, exits=[{"name": "final", "accuracy": BIG}]))


def test_an_exit_named_twice_in_a_manifest_is_refused_by_name(tmp_path: Path) -> None:
    exits = [{"name": "final", "accuracy": 0.9}, {"name": "exit1", "accuracy": 0.5}, {"name": "final", "accuracy": 0.1}]
    with pytest.raises(ModelError, match=r"manifest\.json: field exits\[2\]\.name: 'final' is given twice"):
        load_model("", weights=artifact(tmp_path, exits=exits))


@pytest.mark.parametrize(
    ("shape", "problem"),
    [([1, 1, 400_000, 400_000], f"more than {MAX_INPUT_ELEMENTS} elements"), ([7, 1, 32, 32], "batch")],
)
def test_a_manifest_input_shape_is_batch_1_and_bounded(tmp_path: Path, shape: list[int], problem: str) -> None:
    d = artifact(tmp_path, input_shape=shape)
    with pytest.raises(ModelError, match=rf"manifest\.json: field input_shape: .*{problem}"):
        load_model("", weights=d)


def test_an_input_shape_argument_is_batch_1_and_bounded() -> None:
    with pytest.raises(ModelError, match=f"more than {MAX_INPUT_ELEMENTS} elements"):
        load_model("zoo:alexnet", input_shape=(1, 3, 2**20, 2**20))
    with pytest.raises(ModelError, match="batch"):
        load_model("zoo:alexnet", input_shape=(2, 3, 32, 32))
    with pytest.raises(ModelError, match="batch"):
        trace(torch.nn.Linear(4, 2), (3, 4), "lin")
    assert load_model("zoo:alexnet?width=0.125", input_shape=(1, 3, 32, 32)).graph.input.shape == (1, 3, 32, 32)


def test_a_manifest_nested_past_the_parser_stack_is_not_valid_json(tmp_path: Path) -> None:
    d = artifact(tmp_path)
    (d / MANIFEST).write_text('{"model": "zoo:alexnet", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ModelError, match=r"manifest\.json is not valid JSON"):
        read_manifest(d)


# ---- the preprocess recipe -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["scale", "mean", "std"])
def test_a_null_preprocess_field_is_refused_naming_it(tmp_path: Path, key: str) -> None:
    pre = {**json.loads((ALEXNET / MANIFEST).read_text())["preprocess"], key: None}
    d = artifact(tmp_path, preprocess=pre)
    with pytest.raises(ModelError, match=rf"field preprocess\.{key}: .*got null"):
        read_manifest(d)
    with pytest.raises(DataError, match=rf"preprocess\.{key}"):
        D.FrameNormalize.from_recipe({key: None}, 1)
    assert torch.equal(D.FrameNormalize.from_recipe({}, 1).gain, torch.full((1, 1, 1, 1), 1 / 255))  # absent: default


def test_a_mean_per_channel_of_another_model_names_the_field(tmp_path: Path) -> None:
    pre = json.loads((ALEXNET / MANIFEST).read_text())["preprocess"]
    d = artifact(tmp_path, preprocess={**pre, "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.3]})
    with pytest.raises(ModelError, match=r"manifest\.json: field preprocess\.mean: 3 values .* 1 input channel"):
        load_model("", weights=d)


def test_calibrated_thresholds_of_an_unknown_exit_name_the_manifest(tmp_path: Path) -> None:
    ce = json.loads((ALEXNET / MANIFEST).read_text())["confidence_exits"]
    ce["thresholds"]["bogus"] = 0.5
    d = artifact(tmp_path, confidence_exits=ce)
    with pytest.raises(ModelError, match=rf"{d.name}.*manifest\.json: field confidence_exits: .*bogus"):
        load_model("", weights=d)


# ---- datasets ------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, code: int) -> None:
    """`arr` as a plain IDX file of element type `code` (0x08 uint8, 0x09 int8, 0x0D float32)."""
    dtype = {0x08: "u1", 0x09: "i1", 0x0D: ">f4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(head + arr.astype(dtype).tobytes())


@pytest.mark.parametrize(
    ("labels", "code", "problem"),
    [([-1, 0, 1, 2], 0x09, "label -1 out of range"), ([3.7, 0, 1, 2], 0x0D, "expected integer labels")],
)
def test_fashion_mnist_labels_are_integers_in_0_to_9(tmp_path: Path, labels: list, code: int, problem: str) -> None:
    for images, labs in D.FMNIST_FILES.values():
        write_idx(tmp_path / images, np.zeros((4, 28, 28)), 0x08)
        write_idx(tmp_path / labs, np.array(labels), code)
    with pytest.raises(DataError, match=rf"t10k-labels-idx1-ubyte.*{problem}"):
        D.read_fashion_mnist(tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 1, 2]), 0x08)
    assert D.read_fashion_mnist(tmp_path, "test")[1].tolist() == [9, 0, 1, 2]


def test_an_image_folder_held_past_the_memory_limit_is_refused(tmp_path: Path) -> None:
    """A split is held at the reference image's size: a folder whose split would exceed the
    memory limit (MAX_FOLDER_BYTES, 4 GiB, by default) is a DataError naming it and the limit,
    before its images are read."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(5):
            write_png(root / c / f"{i}.png", rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    images, labels, classes = imagefolder.read_folder_split(root, "train")
    assert images.shape == (8, 3, 64, 48) and classes == ("cat", "dog")
    with pytest.raises(DataError, match=rf"{root.name}.*over the limit"):
        imagefolder.read_folder_split(root, "train", max_bytes=images.nbytes - 1)
    assert imagefolder.read_folder_split(root, "test", max_bytes=images.nbytes - 1)[0].shape == (2, 3, 64, 48)


# ---- in-place ops a cut would break -------------------------------------------------------------


class SharedInPlace(torch.nn.Module):
    """conv -> (conv2 reads it; then relu_ changes it in place) -> add: a split that runs relu_
    on the device before conv's value is sent gives the edge's conv2 the changed values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        c = self.conv2(a)
        b = torch.relu_(a)
        return (b + c).mean((2, 3))


class ResidualInPlace(torch.nn.Module):
    """torchvision's pattern: ReLU(inplace=True) of a tensor nothing else reads, `out += x`
    (which fx traces as an out-of-place add)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        out = self.conv2(x)
        out += x
        return self.relu(out).mean((2, 3))


def shared_in_place() -> torch.nn.Module:
    return SharedInPlace()


def residual_in_place() -> torch.nn.Module:
    return ResidualInPlace()


def test_an_in_place_op_on_a_tensor_another_node_reads_is_refused_at_trace() -> None:
    """Refused naming both nodes (silently wrong answers from some cuts otherwise); the
    torchvision residual pattern, whose in-place ops touch tensors nothing else reads, loads and
    every cut of it reproduces the whole model."""
    with pytest.raises(ModelError, match=r"relu_ changes conv in place, which conv2 also reads"):
        load_model("tests.test_model_inputs:shared_in_place", input_shape=(1, 3, 8, 8))
    m = load_model("tests.test_model_inputs:residual_in_place", input_shape=(1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    exit_node = m.exit_node()
    with torch.inference_mode():
        whole = m.module(x.clone())
        names = [n.name for n in m.graph.nodes]
        for k in range(len(names) + 1):  # the graph is a chain here: each prefix is a device part
            device = set(names[:k])
            edge = set(names[k:])
            sent = {m.input_name: x.clone()}
            needed = sorted({i for n in m.graph.nodes if n.name in edge for i in n.inputs if i in device})
            sent.update(m.executor.compute({m.input_name: x.clone()}, needed, allowed=device) if needed else {})
            out = m.executor.compute(sent, [exit_node], allowed=edge)[exit_node] if edge else None
            assert out is None or torch.allclose(out, whole, atol=1e-6), k
