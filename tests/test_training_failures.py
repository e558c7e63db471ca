"""Training's fixed failure modes, on tiny runs over image folders written here (no dataset
download): bounded --threads, finite --weight-decay, a diverging run is an error and writes no
non-finite weights, splits and --out checked before the first epoch, a checkpoint whose two
files stay consistent when a write fails, a folder artifact's own class names, the channels of
a `pkg.mod:factory` model, and malformed manifests named field by field (exit 2). The
`pkg.mod:factory` models are this module's own functions (the tests' package is importable)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dapdee import data as D
from dapdee.cli import build_parser, main
from dapdee.models import MANIFEST, WEIGHTS, ModelError, read_manifest
from dapdee.training import train as T
from dapdee.training.train import TrainConfig, train
from tests.images import write_png

SPEC = "zoo:alexnet?width=0.0625&in_channels=1&num_classes=3"
QUIET = {"progress": False, "log": lambda s: None}


def make_folder(root: Path, classes: tuple[str, ...], per_class: int, size: int = 12) -> Path:
    """`root/<class>/<i>.png`: grayscale images, class k's pixels around level 30 + 80 k."""
    rng = np.random.default_rng(len(classes) * 100 + per_class)
    for k, c in enumerate(classes):
        for i in range(per_class):
            level = np.clip(rng.normal(30 + 80 * k, 12, (size, size)), 0, 255).astype(np.uint8)
            write_png(root / c / f"{i:02d}.png", level)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of 12 grayscale 12x12 images: test 8, calib 2, train 26."""
    return make_folder(tmp_path_factory.mktemp("ds") / "shapes", ("dark", "mid", "light"), 12)


def cfg(folder: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        model=SPEC, dataset=f"folder:{folder}", out=str(out), epochs=1, batch_size=8, input_size=16
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def artifact(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("art") / "tiny"
    train(cfg(folder, out, name="tiny"), **QUIET)
    return out


def _parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's usage error for `argv` (exit 2), as text."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# ---- option bounds ------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [["train", SPEC, "--out", "x"], ["eval", "a"], ["calibrate", "a"]])
def test_threads_are_bounded_like_every_command(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # a huge torch thread count crashes the process: the parser refuses it
    assert "at most 256" in _parse_error([*cmd, "--threads", "100000"], capsys)
    assert build_parser().parse_args([*cmd, "--threads", "2"]).threads == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "x"])
def test_weight_decay_must_be_finite_and_non_negative(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--weight-decay" in _parse_error(["train", SPEC, "--out", "x", "--weight-decay", value], capsys)


def test_weight_decay_checked_by_the_api(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--weight-decay"):
        train(cfg(folder, tmp_path / "o", weight_decay=math.nan), **QUIET)
    assert not (tmp_path / "o").exists()


# ---- a diverging run ---------------------------------------------------------------------------


def test_a_diverging_run_is_an_error_and_writes_nothing(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "div"
    with pytest.raises(ValueError, match="diverged"):
        train(cfg(folder, out, lr=1e6, epochs=2), **QUIET)
    assert not (out / WEIGHTS).exists() and not (out / MANIFEST).exists()


class NanGradients(nn.Module):
    """A classifier whose `gate` never changes its logits but gets a NaN gradient (torch.where's
    backward through the branch it did not take: 0 x NaN): the first update makes `gate` NaN,
    and every loss stays finite."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off = torch.where(self.gate > 1, torch.sqrt(-1 - self.gate), torch.zeros_like(self.gate))
        return self.body(x) + off


def nan_gradients() -> nn.Module:
    return NanGradients()


def test_non_finite_weights_are_never_written(folder: Path, tmp_path: Path) -> None:
    """Weights that turn NaN in an epoch whose loss was still finite (an update's NaN gradient)."""
    out = tmp_path / "nan"
    with pytest.raises(ValueError, match="diverged: gate holds NaN"):
        train(cfg(folder, out, model=f"{__name__}:nan_gradients"), **QUIET)
    assert not (out / WEIGHTS).exists() and not (out / "checkpoint" / "state.json").exists()
    layer = torch.nn.Linear(2, 2)
    T.check_finite(layer, "x")
    with torch.no_grad():
        layer.bias.fill_(math.inf)
    with pytest.raises(ValueError, match="diverged: bias"):
        T.check_finite(layer, "x")


def test_cli_diverging_run_exits_2(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", SPEC, "--dataset", f"folder:{folder}", "--epochs", "2", "--batch-size", "8"]
    args += ["--input-size", "16", "--lr", "1e6", "--no-progress", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not (tmp_path / "o" / WEIGHTS).exists()


@pytest.mark.parametrize("seed", ["184467440737096", "18446744073709551615", "-1"])
def test_cli_seed_past_the_range_exits_2_naming_it_before_anything_is_written(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: str
) -> None:
    """A seed whose per-epoch seeds would overflow torch's int64 (it did at the first epoch, with
    "Overflow when unpacking long long" and an empty --out left behind)."""
    out = tmp_path / "o"
    args = ["train", SPEC, "--dataset", f"folder:{folder}", "--epochs", "1", "--seed", seed]
    assert main([*args, "--no-progress", "--out", str(out)]) == 2
    assert f"--seed: expected an integer in 0..{T.MAX_SEED}" in capsys.readouterr().err
    assert not out.exists()


# ---- checked before the first epoch ---------------------------------------------------------


def test_a_folder_too_small_for_a_calib_split_fails_before_training(tmp_path: Path) -> None:
    small = make_folder(tmp_path / "small", ("a", "b"), 4)  # 8 images: test 2, train 6, calib 0
    logs: list[str] = []
    out = tmp_path / "o"
    with pytest.raises(D.DataError, match="too small.*calib"):
        train(cfg(small, out, model=SPEC.replace("=3", "=2")), progress=False, log=logs.append)
    assert logs == [] and not out.exists()  # no epoch ran, nothing was written


def test_an_out_that_cannot_be_created_fails_before_training(folder: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, what in ((afile, "not a directory"), (afile / "sub", "cannot create")):
        logs: list[str] = []
        with pytest.raises(ValueError, match=f"--out.*{what}"):
            train(cfg(folder, out), progress=False, log=logs.append)
        assert logs == []


# ---- checkpoints -------------------------------------------------------------------------------


def test_a_failed_checkpoint_write_leaves_a_resumable_checkpoint(folder: Path, artifact: Path, tmp_path: Path) -> None:
    """Writing state.json fails in epoch 2, after the weights file was written (a directory
    holds its temporary name, made at epoch 2's log line, which comes just before the
    checkpoint): once it is gone, the same command resumes after epoch 1 and ends bit-identical
    to an uninterrupted run."""
    out = tmp_path / "ck"
    in_the_way = out / "checkpoint" / "state.json.tmp"

    def log(line: str) -> None:
        if "epoch 2/2" in line:
            in_the_way.mkdir()

    with pytest.raises(IsADirectoryError, match="state.json.tmp"):
        train(cfg(folder, out, name="tiny", epochs=2), progress=False, log=log)
    assert (out / "checkpoint" / "state-2.safetensors").is_file()  # it failed after the weights file
    in_the_way.rmdir()
    logs: list[str] = []
    final = train(cfg(folder, out, name="tiny", epochs=2), progress=False, log=logs.append)
    assert any("after epoch 1/2" in s for s in logs)
    reference = train(cfg(folder, tmp_path / "ref", name="tiny", epochs=2), **QUIET)
    assert final["weights_sha256"] == reference["weights_sha256"]


def test_checkpoint_keeps_one_weights_file_and_reads_the_old_layout(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "ck"
    train(cfg(folder, out, epochs=3), progress=False, stop_after=2, log=lambda s: None)
    ck = out / "checkpoint"
    state = json.loads((ck / "state.json").read_text())
    assert state["weights_file"] == "state-2.safetensors"
    assert sorted(p.name for p in ck.iterdir()) == ["state-2.safetensors", "state.json"]
    # a checkpoint written before `weights_file`: one fixed name
    (ck / "state-2.safetensors").rename(ck / "state.safetensors")
    del state["weights_file"]
    (ck / "state.json").write_text(json.dumps(state))
    logs: list[str] = []
    train(cfg(folder, out, epochs=3), progress=False, log=logs.append)
    assert any("after epoch 2/3" in s for s in logs) and (out / WEIGHTS).is_file()


# ---- folder manifests ----------------------------------------------------------------------


def test_folder_artifact_records_its_own_classes_and_test_split(artifact: Path, folder: Path) -> None:
    m = read_manifest(artifact)
    assert m["classes"] == ["dark", "light", "mid"]  # class folders in name order = labels
    src = m["splits"]["test_source"]
    assert str(folder) in src and "test_batch" not in src and "t10k" not in src
    assert m["splits"]["test"] == 8 and m["splits"]["calib"] == 2


def test_builtin_manifest_split_text_is_unchanged() -> None:
    assert D.split_sources("fashion-mnist")["test_source"] == "t10k"
    assert D.split_sources("cifar10:/x")["test_source"] == "test_batch.bin"
    assert D.class_names("cifar10:/x") == D.CIFAR_CLASSES and D.class_names("fashion-mnist") == D.FMNIST_CLASSES


def test_folder_test_limit_samples_every_class(folder: Path) -> None:
    from dapdee.imagefolder import read_folder_split

    full = D.load_raw(f"folder:{folder}", "test")[1]
    limited = D.load_raw(f"folder:{folder}", "test", limit=4)[1]
    assert sorted(full.tolist()) == read_folder_split(folder, "test")[1].tolist()  # the same images
    assert full[:4].tolist() == limited.tolist()  # a limit is a prefix of one fixed order
    assert full.tolist() != sorted(full.tolist())  # not class order
    assert len(set(limited.tolist())) == 3
    assert D.load_raw(f"folder:{folder}", "test")[1].tolist() == full.tolist()  # deterministic


def test_cifar_test_order_is_the_files(tmp_path: Path) -> None:
    labels = np.array([9, 0, 5, 5, 1, 3], np.uint8)
    records = np.zeros((len(labels), D.CIFAR_RECORD), np.uint8)
    records[:, 0] = labels
    records[:, 1] = np.arange(len(labels))
    (tmp_path / "test_batch.bin").write_bytes(records.tobytes())
    images, got = D.load_raw(f"cifar10:{tmp_path}", "test", limit=4)
    assert got.tolist() == [9, 0, 5, 5] and images[:, 0, 0, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(not (D.FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(), reason="no Fashion-MNIST")
def test_fashion_mnist_test_order_is_the_files() -> None:
    want = D.read_fashion_mnist(D.FMNIST_DIR, "test")[1][:50]
    assert D.load_raw("fashion-mnist", "test", limit=50)[1].tolist() == want.tolist()


# ---- `pkg.mod:factory` models ---------------------------------------------------------------


def gray() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def rgb() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def broken() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(7, 3))


@pytest.fixture
def factories() -> str:
    """The module of the factories above: this one, importable by its name."""
    return __name__


def test_factory_models_take_the_channels_they_are_built_for(folder: Path, tmp_path: Path, factories: str) -> None:
    for fn, channels in (("gray", 1), ("rgb", 3)):  # a grayscale folder; an RGB model gets it replicated
        m = train(cfg(folder, tmp_path / fn, model=f"{factories}:{fn}"), **QUIET)
        assert m["input_shape"] == [1, channels, 16, 16]
        assert m["preprocess"]["channels"] == ("as-is" if channels == 1 else "replicate")


def test_a_factory_model_that_fails_on_the_input_is_a_model_error(
    folder: Path, tmp_path: Path, factories: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ModelError, match="cannot run on input"):
        train(cfg(folder, tmp_path / "b", model=f"{factories}:broken"), **QUIET)
    args = ["train", f"{factories}:broken", "--dataset", f"folder:{folder}", "--input-size", "16"]
    assert main([*args, "--no-progress", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "cannot run on input" in err and "Traceback" not in err


def test_eval_and_calibrate_take_the_factory_spec_an_artifact_was_trained_from(
    tmp_path: Path, factories: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An artifact trained from a `package.module:factory` spec is built only when its spec is
    named: `eval` and `calibrate` take it with --model (they had no such flag, so such an
    artifact could never be evaluated or calibrated); without it they exit 2 naming --model.
    (Its folder holds enough images for the smallest calibration split calibrate takes.)"""
    big = make_folder(tmp_path / "shapes", ("dark", "mid", "light"), 130)
    out = tmp_path / "gray"
    train(cfg(big, out, model=f"{factories}:gray"), **QUIET)
    assert main(["eval", str(out)]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", str(out), "--model", f"{factories}:gray"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in got["exits"]] == ["final"]
    assert main(["calibrate", str(out), "--dry-run"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["calibrate", str(out), "--dry-run", "--model", f"{factories}:gray"]) == 0
    assert json.loads(capsys.readouterr().out)["within_bound_on_test"] is True


def test_manifests_written_at_once_each_land_whole(tmp_path: Path) -> None:
    """Two calibrations of one artifact write its manifest at the same moment: each write
    replaces the file whole (a shared temporary name let one rename the other's half-written
    file, or find it gone: FileNotFoundError), and no temporary file is left."""
    import threading

    manifests = [{"model": "zoo:alexnet", "writer": i, "pad": "x" * 200_000} for i in range(4)]
    errors: list[BaseException] = []

    def write(m: dict[str, Any]) -> None:
        try:
            for _ in range(25):
                T.write_manifest(tmp_path, m)
        except BaseException as exc:  # noqa: BLE001 - the test judges it
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(m,)) for m in manifests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert json.loads((tmp_path / MANIFEST).read_text()) in manifests
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]


# ---- malformed manifests ------------------------------------------------------------------------

BAD_MANIFESTS: dict[str, tuple[str, Any, str]] = {  # case: (top-level key, value, field named)
    "exits": ("exits", 5, "exits"),
    "exit_no_name": ("exits", [{"accuracy": 0.5}], "exits[0]"),
    "exit_accuracy": ("exits", [{"name": "final", "accuracy": "high"}], "exits[0].accuracy"),
    "exit_accuracy_range": ("exits", [{"name": "final", "accuracy": 1.5}], "exits[0].accuracy"),
    "input_shape": ("input_shape", "abc", "input_shape"),
    "input_shape_3d": ("input_shape", [1, 16, 16], "input_shape"),
    "input_shape_zero": ("input_shape", [1, 0, 16, 16], "input_shape"),
    "splits": ("splits", 5, "splits"),
    "splits_test": ("splits", {"test": "all"}, "splits.test"),
    "model": ("model", 5, "model"),
    "mean": ("preprocess", {"mean": "x"}, "preprocess.mean"),
    # every frame is resized to it: a source shape bounded as an input is (not 14 GB per frame)
    "source_shape": ("preprocess", {"source_shape": [1, 60000, 60000]}, "preprocess.source_shape"),
    "classes": ("classes", 5, "classes"),
    "class_names": ("classes", ["shirt", 7], "classes"),
    "thresholds": ("confidence_exits", {"thresholds": {"exit1": "high"}}, "confidence_exits.thresholds.exit1"),
    "by_exit": ("confidence_exits", {"test": {"by_exit": 5}}, "confidence_exits.test.by_exit"),
}


def _bad_artifact(artifact: Path, directory: Path, case: str) -> Path:
    """A copy of `artifact` whose manifest has `case`'s malformed field."""
    key, value, _ = BAD_MANIFESTS[case]
    shutil.copytree(artifact, directory)
    manifest = read_manifest(artifact)
    if key == "preprocess":
        value = {**manifest["preprocess"], **value}
    (directory / MANIFEST).write_text(json.dumps({**manifest, key: value}))
    return directory


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifest_fields_are_named(artifact: Path, tmp_path: Path, case: str) -> None:
    bad = _bad_artifact(artifact, tmp_path / "bad", case)
    with pytest.raises(ModelError, match=re.escape(f"field {BAD_MANIFESTS[case][2]}:")):
        read_manifest(bad)


@pytest.mark.parametrize("case", ["exits", "exit_accuracy", "splits", "input_shape_3d", "classes"])
def test_malformed_manifests_exit_2_in_graph_and_eval(
    artifact: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _bad_artifact(artifact, tmp_path / "bad", case)
    for argv in (["graph", "--weights", str(bad)], ["eval", str(bad), "--limit", "4"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"field {BAD_MANIFESTS[case][2]}:" in err and "Traceback" not in err
