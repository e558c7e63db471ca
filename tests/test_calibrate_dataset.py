"""`dapdee eval` / `dapdee calibrate` check the --dataset against the artifact: a dataset whose
class names differ from the manifest's `classes` is refused before any work (exit 2, one line
naming --dataset and both class lists) and leaves the manifest as it was; a calibration records
the dataset it used; a calibration split under `MIN_CALIB_SAMPLES` is refused naming --limit.
Tiny real artifacts: a narrow AlexNet trained one epoch on 200 Fashion-MNIST images, and one on
an image folder of classes a, b written here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dapdee import data as D
from dapdee.cli import main
from dapdee.models import MANIFEST, read_manifest
from dapdee.training import confidence as C
from dapdee.training.train import TrainConfig, train
from tests.images import write_png

pytestmark = pytest.mark.skipif(
    not (D.FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)

SPEC = "zoo:alexnet?width=0.0625&in_channels=1"
QUIET = {"progress": False, "log": lambda s: None}


def _train(out: Path, dataset: str, num_classes: int, limit: int | None) -> Path:
    """A one-epoch artifact of SPEC (with `num_classes` outputs) on `dataset`, written to `out`."""
    torch.set_num_threads(1)
    spec = f"{SPEC}&num_classes={num_classes}"
    cfg = TrainConfig(model=spec, dataset=dataset, out=str(out), epochs=1, batch_size=32, input_size=16, limit=limit)
    train(cfg, **QUIET)
    return out


@pytest.fixture(scope="module")
def ab_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Classes a, b: 12 grayscale 12x12 images each (calib split: 2 images)."""
    root = tmp_path_factory.mktemp("ds") / "ab"
    rng = np.random.default_rng(0)
    for k, c in enumerate(("a", "b")):
        for i in range(12):
            write_png(
                root / c / f"{i:02d}.png", np.clip(rng.normal(60 + 120 * k, 12, (12, 12)), 0, 255).astype(np.uint8)
            )
    return root


@pytest.fixture(scope="module")
def fmnist_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("art") / "fm", "fashion-mnist", 10, 200)


@pytest.fixture(scope="module")
def ab_art(ab_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("art") / "ab", f"folder:{ab_folder}", 2, None)


def _refused(argv: list[str], art: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `dapdee argv`; assert exit 2 with one error line and an unchanged manifest; the line."""
    before = (art / MANIFEST).read_bytes()
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 2, (code, cap.out[-500:], cap.err)
    assert (art / MANIFEST).read_bytes() == before
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    return lines[0]


@pytest.mark.parametrize("cmd", ["eval", "calibrate"])
def test_a_folder_dataset_is_refused_for_a_fashion_mnist_artifact(
    cmd: str, fmnist_art: Path, ab_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused([cmd, str(fmnist_art), "--dataset", f"folder:{ab_folder}", "--limit", "40"], fmnist_art, capsys)
    assert "--dataset" in line and "['a', 'b']" in line and "'t-shirt'" in line, line
    assert "confidence_exits" not in read_manifest(fmnist_art)


@pytest.mark.parametrize("cmd", ["eval", "calibrate"])
def test_fashion_mnist_is_refused_for_a_folder_artifact(
    cmd: str, ab_art: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _refused([cmd, str(ab_art), "--dataset", "fashion-mnist", "--limit", "40"], ab_art, capsys)
    assert "--dataset" in line and "['a', 'b']" in line and "'t-shirt'" in line, line


def test_the_same_classes_in_another_order_are_refused(ab_art: Path, tmp_path: Path) -> None:
    """Labels are class indexes: a folder whose classes are the manifest's reordered is refused."""
    m = read_manifest(ab_art)
    assert m["classes"] == ["a", "b"]
    with pytest.raises(ValueError, match="--dataset"):
        C.check_dataset_classes(m, "fashion-mnist")
    swapped = {**m, "classes": ["b", "a"]}
    with pytest.raises(ValueError, match=r"\['b', 'a'\]"):
        C.check_dataset_classes(swapped, f"folder:{Path(m['dataset'].partition(':')[2])}")
    C.check_dataset_classes({k: v for k, v in m.items() if k != "classes"}, "fashion-mnist")  # no classes: as before


def test_a_good_calibration_records_its_dataset(
    fmnist_art: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = tmp_path / "cal"
    shutil.copytree(fmnist_art, art)
    assert (
        main(["calibrate", str(art), "--dataset", "fashion-mnist", "--limit", "60", "--max-accuracy-loss", "0.05"]) == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["dataset"] == "fashion-mnist"
    assert read_manifest(art)["confidence_exits"]["dataset"] == "fashion-mnist"
    assert main(["eval", str(art), "--limit", "40"]) == 0  # the artifact's own dataset is accepted


def test_a_calibration_split_under_the_minimum_is_refused(
    fmnist_art: Path, ab_art: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = str(C.MIN_CALIB_SAMPLES - 1)
    line = _refused(["calibrate", str(fmnist_art), "--limit", small], fmnist_art, capsys)
    assert "--limit" in line and str(C.MIN_CALIB_SAMPLES) in line, line
    line = _refused(["calibrate", str(ab_art)], ab_art, capsys)  # the folder's tiny calib split
    assert "--limit" in line, line
